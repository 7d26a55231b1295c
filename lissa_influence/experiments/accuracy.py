"""Solver accuracy against the explicit solve: one benchmark row per solver configuration.

``lissa-influence-accuracy`` (Hydra config ``conf/accuracy.yaml``: the main job's config
plus ``accuracy.*``) trains or loads the two-stage model of the config and runs the
configured solver (``solver``, ``gauss_newton``) through the multi-stage chain of docs/math.md,
measuring each step against exact linear algebra on the damped **Hessians** (never
Gauss-Newton: that is one of the approximations measured):

- finetune solve ``v = A_ft⁻¹ b_ft``: relative error against the dense solve;
- pretrain solve ``s = H_G⁻¹ [u; 0]``: relative error against the dense solve of the
  *same* right-hand side (the one the candidate's own ``v`` produced), so the solver's
  error is separated from the error it inherits;
- final query vectors and scores: ``ŝ`` against the fully exact ``s*``; the scores
  ``I(z) = −ŝᵀ∇g(z)`` against the exact scores by relative error, Pearson and Spearman
  correlation and the overlap of the ``accuracy.top_k`` largest ``|I|``;
- vector products per right-hand side (a stochastic LiSSA minibatch product counts as
  its fraction of the Hessian sample, its final residual check as one full product),
  iterations, convergence and wall time per solve;
  with ``accuracy.trace`` the errors after every solver iteration (the error-vs-HVP
  curves), through the solvers' ``callback``.

The exact reference (eigendecompositions of both dense damped Hessians, the exact
``v*``, ``s*`` and scores) is built once per model, data, damping and query and cached
under ``cache_dir``; small models only (``accuracy.max_params``). Each job writes
``accuracy.json``; :func:`summarise` (run by the multirun callback
:class:`AccuracySummary`, or ``python -m lissa_influence.experiments.accuracy DIR...``) collects the
rows below a folder into ``solver_accuracy.csv`` and ``error_vs_hvps.png`` (and one
figure per iterative solver).
A solver that fails (negative curvature, divergence, a refused size) gives a row with
its error message, so one bad configuration does not end a sweep.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .. import results
from ..metrics import ErrorTrace, relative_error, score_agreement
from ..solvers import Explicit, LiSSA, SolverError, SolverWarning
from . import config, pipeline, plots, sweep
from .errors import in_config_terms

log = logging.getLogger(__name__)

REFERENCE_VERSION = 1  # bump when the cached reference's contents change
# Keys that do not change the exact reference (they choose or tune the candidate).
NOT_IN_REFERENCE = (
    "solver",
    "gauss_newton",
    "scoring",
    "batch_size",
    "accuracy",
    "analysis",
    "hvp",
    "graph_budget_mib",
    "head_only",
    "exact_finetune",
)


# -- the exact inverse -----------------------------------------------------------------
@dataclass
class DenseInverse:
    """``A⁻¹`` of a small symmetric matrix through its eigendecomposition (also gives
    the spectrum: a negative eigenvalue is reported, not hidden)."""

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor

    @classmethod
    def of(cls, matrix: torch.Tensor) -> DenseInverse:
        evals, evecs = torch.linalg.eigh(matrix)
        return cls(evals, evecs)

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        v = self.eigenvectors
        return ((b.to(v) @ v) / self.eigenvalues) @ v.T

    def spectrum(self) -> dict[str, float]:
        lo, hi = float(self.eigenvalues[0]), float(self.eigenvalues[-1])
        return {"min_eigenvalue": lo, "max_eigenvalue": hi, "condition": hi / lo if lo > 0 else math.inf}


# -- the exact reference --------------------------------------------------------------
def _reference_key(cfg: Any) -> tuple[str, dict]:
    hashed = {k: v for k, v in config.scored_config(cfg).items() if k not in NOT_IN_REFERENCE}
    hashed["reference_version"] = REFERENCE_VERSION
    return results.config_hash(hashed), hashed


def reference(cfg: Any, pretrained, finetuned, data, test) -> dict[str, Any]:
    """The exact chain for ``cfg``'s model, data, damping and query (cached in
    ``cache_dir/accuracy/``): dense inverses of both damped Hessians, ``g``, ``v*``,
    ``s*`` and the exact scores."""
    key, hashed = _reference_key(cfg)
    path = Path(cfg.cache_dir).expanduser() / "accuracy" / f"reference_{key}.pt"
    if path.is_file():
        return torch.load(path, weights_only=False)
    t0 = time.perf_counter()
    exact_cfg = OmegaConf.merge(cfg, {"gauss_newton": False})
    msi = pipeline.build_influence(exact_cfg, pretrained, finetuned, data)
    dense = Explicit(block_size=cfg.accuracy.block_size, max_params=cfg.accuracy.max_params)
    g = msi.test_gradients(test, mean=cfg.query == "mean")
    inverses = {}
    for stage, op in (("finetune", msi.ft_operator), ("pretrain", msi.pre_operator)):
        log.info("accuracy reference: dense %s Hessian (%d x %d)", stage, op.size, op.size)
        inverses[stage] = DenseInverse.of(dense.matrix(op, op.size, g))
    v = inverses["finetune"].solve(msi.finetune_rhs(g))
    s = inverses["pretrain"].solve(msi.pretrain_rhs(v, g))
    ref = {
        "config": hashed,
        "g": g,
        "v": v,
        "s": s,
        "scores": msi.scores_from(s),
        "inverses": inverses,
        "seconds": time.perf_counter() - t0,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")  # parallel jobs may build the same reference
    torch.save(ref, tmp)
    os.replace(tmp, path)
    return ref


# -- one job ---------------------------------------------------------------------------
def full_products(solver, op, n: int, minibatch: int | None = None) -> float:
    """``n`` products in full-Hessian-sample equivalents, of which ``minibatch`` were with a
    stochastic LiSSA's minibatches, each costing its fraction of the sample; the rest (the
    full product that checks its residual at the end) cost one each. ``minibatch=None``: all
    ``n``, as a callback counts them during the recursion (``scale="auto"``'s power iteration
    runs on minibatches too); a finished solve reports its count (``minibatch_products``)."""
    if not (isinstance(solver, LiSSA) and solver.batch_size and op.sample_size is not None):
        return float(n)
    mini = n if minibatch is None else minibatch
    return (n - mini) + mini * min(1.0, solver.batch_size / op.sample_size)


def _solve(solver, op, b: torch.Tensor, trace: ErrorTrace | None) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """Run one solve; a solver failure becomes the row's status instead of an exception."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SolverWarning)
        try:
            x, info = solver.solve(op, b, callback=trace)
        except (SolverError, MemoryError) as e:
            return None, {"status": f"{type(e).__name__}: {in_config_terms(str(e))}"}
    d = info.as_dict()
    out = {
        "status": "ok",
        "iterations": d["iterations"],
        "hvps": full_products(solver, op, d["num_products"], d.get("minibatch_products")) / b.shape[0],
        "converged": d["converged"],
        "seconds": d["wall_time"],
        "final_residual": d["final_residual"],
    }
    solver_warnings = [w for w in caught if issubclass(w.category, SolverWarning)]
    for w in caught:  # anything else (a library's deprecation notice) is passed on
        if w not in solver_warnings:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if solver_warnings:  # expected ones (a capped CG) go into the row, not the console
        out["warnings"] = sorted({in_config_terms(str(w.message).split(";")[0]) for w in solver_warnings})
    return x, out


def run(cfg: Any, out_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Measure ``cfg.solver`` against the exact reference; writes ``accuracy.json``.
    ``overrides``: the job's command-line overrides, which name its row."""
    config.check(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    data, pretrained, finetuned, _ = pipeline.train(cfg)
    idx = pipeline.test_indices(len(data.finetune_test), cfg.test_points, cfg.seed)
    test = tuple(t[idx] for t in data.finetune_test.tensors)
    ref = reference(cfg, pretrained, finetuned, data, test)
    msi = pipeline.build_influence(cfg, pretrained, finetuned, data)
    solver = config.build_solver(cfg.solver)
    inv_ft, inv_pre = ref["inverses"]["finetune"], ref["inverses"]["pretrain"]
    g, rows, trace_on = ref["g"], ref["g"].shape[0], cfg.accuracy.trace

    row: dict[str, Any] = {
        "label": " ".join(overrides) or "defaults",
        "overrides": " ".join(overrides),
        "mode": cfg.mode,
        "solver": cfg.solver.name,
        "gauss_newton": cfg.gauss_newton,
        "query": cfg.query,
        "right_hand_sides": rows,
        "finetune_params": msi.ft_block.numel,
        "pretrain_params": msi.pre_block.numel,
        "finetune_damping": cfg.finetune.damping,
        "pretrain_damping": cfg.pretrain.damping,
        "reference_seconds": ref["seconds"],
        **{f"finetune_{k}": v for k, v in inv_ft.spectrum().items()},
        **{f"pretrain_{k}": v for k, v in inv_pre.spectrum().items()},
    }
    curves: dict[str, list] = {}
    t0 = time.perf_counter()
    b_ft = msi.finetune_rhs(g)
    ft_trace = (
        ErrorTrace({"finetune": ref["v"]}, rows, partial(full_products, solver, msi.ft_operator)) if trace_on else None
    )
    v, ft = _solve(solver, msi.ft_operator, b_ft, ft_trace)
    row.update({f"finetune_{k}": x for k, x in ft.items()})
    if v is not None:
        row["finetune_error"] = relative_error(v, ref["v"])
        b_pre = msi.pretrain_rhs(v, g)
        s_same_rhs = inv_pre.solve(b_pre)  # the exact solve of the candidate's own right-hand side
        pre_trace = (
            ErrorTrace(
                {"pretrain": s_same_rhs, "query": ref["s"]},
                rows,
                partial(full_products, solver, msi.pre_operator),
                {"query": ft["hvps"]},
            )
            if trace_on
            else None
        )
        s, pre = _solve(solver, msi.pre_operator, b_pre, pre_trace)
        row.update({f"pretrain_{k}": x for k, x in pre.items()})
        if s is not None:
            row["pretrain_error"] = relative_error(s, s_same_rhs)
            row["query_error"] = relative_error(s, ref["s"])
            row.update(score_agreement(msi.scores_from(s), ref["scores"], cfg.accuracy.top_k))
            row["hvps"] = ft["hvps"] + pre["hvps"]
        if pre_trace:
            curves.update(pre_trace.points)
    if ft_trace:
        curves.update(ft_trace.points)
    row["seconds"] = time.perf_counter() - t0
    failed = [row[k] for k in ("finetune_status", "pretrain_status") if row.get(k, "ok") != "ok"]
    row["status"] = failed[0] if failed else "ok"
    payload = {
        "row": row,
        "curves": curves,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "versions": pipeline.versions(),
    }
    (out / "accuracy.json").write_text(json.dumps(payload, indent=2, default=str))
    print(format_rows([row]))
    return payload


# -- summary ---------------------------------------------------------------------------
COLUMNS = [
    "label",
    "status",
    "mode",
    "solver",
    "gauss_newton",
    "finetune_error",
    "pretrain_error",
    "query_error",
    "scores_error",
    "pearson",
    "spearman",
    "top10_overlap",
    "hvps",
    "finetune_hvps",
    "pretrain_hvps",
    "finetune_iterations",
    "pretrain_iterations",
    "finetune_converged",
    "pretrain_converged",
    "seconds",
    "finetune_seconds",
    "pretrain_seconds",
    "finetune_condition",
    "pretrain_condition",
    "finetune_min_eigenvalue",
    "pretrain_min_eigenvalue",
    "finetune_params",
    "pretrain_params",
    "finetune_damping",
    "pretrain_damping",
    "right_hand_sides",
    "reference_seconds",
    "job",
    "overrides",
]


def collect(root: Path) -> list[dict[str, Any]]:
    """Every ``accuracy.json`` below ``root`` (jobs of one or several sweeps), in path
    order (job numbers numerically)."""
    found = []
    for p in sorted(root.rglob("accuracy.json"), key=lambda p: [int(s) if s.isdigit() else s for s in p.parts]):
        payload = json.loads(p.read_text())
        payload["row"]["job"] = str(p.parent.relative_to(root))
        found.append(payload)
    return found


def summarise(root: str | Path, out: str | Path | None = None) -> list[dict[str, Any]]:
    """Rows of every job below ``root`` into ``solver_accuracy.csv``, ``error_vs_hvps.png``
    and one ``error_vs_hvps_<solver>.png`` per iterative solver (in ``out``, default ``root``)."""
    root = Path(root)
    payloads = collect(root)
    if not payloads:
        return []
    # Name each row by what sets it apart: the overrides not shared by every row.
    overrides = [p["row"].get("overrides", p["row"]["label"]).split() for p in payloads]
    common = set.intersection(*map(set, overrides)) if len(payloads) > 1 else set()
    for p, o in zip(payloads, overrides, strict=True):
        p["row"]["label"] = " ".join(x for x in o if x not in common) or "defaults"
    out = Path(out) if out else root
    out.mkdir(parents=True, exist_ok=True)
    rows = [p["row"] for p in payloads]
    top = next((k for r in rows for k in r if k.startswith("top") and k.endswith("_overlap")), "top10_overlap")
    columns = [top if c == "top10_overlap" else c for c in COLUMNS]
    with open(out / "solver_accuracy.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    plots.error_vs_hvps(out / "error_vs_hvps.png", payloads)
    # one figure per iterative solver, identity as the reference line (the explicit
    # solve's 1e-13 would only stretch the error axis)
    identity = [p for p in payloads if p["row"]["solver"] == "identity"]
    for name in sorted({r["solver"] for r in rows} - {"explicit", "identity"}):
        plots.error_vs_hvps(
            out / f"error_vs_hvps_{name}.png", [p for p in payloads if p["row"]["solver"] == name] + identity
        )
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    return sweep.format_table(
        rows,
        ["label", "status", "finetune_error", "pretrain_error", "query_error", "spearman", "hvps", "seconds"],
        max_width=60,
    )


class AccuracySummary(Callback):
    """Hydra callback: at the end of a multirun, summarise its sweep folder."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = summarise(sweep_dir)
        if rows:
            print(
                f"solver accuracy ({sweep_dir / 'solver_accuracy.csv'}, {sweep_dir / 'error_vs_hvps.png'}):\n"
                + format_rows(rows)
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lissa_influence.experiments.accuracy",
        description="Collect the accuracy.json rows of one or more sweep folders.",
    )
    parser.add_argument("root", help="folder searched recursively for accuracy.json (e.g. one suite's output)")
    parser.add_argument("--out", help="where solver_accuracy.csv and error_vs_hvps.png go (default: root)")
    args = parser.parse_args(argv)
    rows = summarise(args.root, args.out)
    if not rows:
        raise SystemExit(f"no accuracy.json below {args.root}")
    print(format_rows(rows))


if __name__ == "__main__":
    main()
