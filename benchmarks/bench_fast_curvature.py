"""Fast curvature: products and seconds to a given accuracy, per solver and preconditioner.

For the two-stage model of a main-job config (trained, or loaded from cache_dir), the
pretraining solve ``s = H_G⁻¹ [u; 0]`` of the multi-stage chain (docs/math.md) is run
by each method on the same right-hand sides (the test queries' ``[u; 0]``, from the
exact finetune solution), and its query vectors are traced against a reference after
every iteration:

- the reference: the dense solve (``Explicit``) where the stage fits
  (``--dense-max`` parameters), else CG to ``--ref-tol`` in float64;
- methods: block CG (plain, and with the ``jacobi``, ``nystrom`` and ``ekfac`` / ``kfac``
  preconditioners), row CG, and the ``EKFAC`` / ``KFAC`` solvers (one approximate solve);
- per method: the products (preconditioner products included) and seconds to reach a
  relative error of 1e-2 and 1e-4 in ``s``, the final error, and the agreement of the
  scores of every pretraining example with the reference's (Pearson, Spearman, top-10);
- the HVP implementations (``hvp=functional|retained``) on the plain block CG solve;
- the fixed-mode finetune solve: the full network with CG (before the head-only path),
  the head alone with CG, and the head's exact float64 factorisation (the default).

    python benchmarks/bench_fast_curvature.py --out docs/figures                 # digits
    python benchmarks/bench_fast_curvature.py data=mnist5k --out docs/figures    # MNIST CNN

Trailing ``key=value`` arguments are main-job config overrides (conf/).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir

from lissa_influence import CG, EKFAC, Explicit, SolverWarning
from lissa_influence.curvature import CurvatureOperator
from lissa_influence.estimator import eval_mode
from lissa_influence.experiments import config, pipeline
from lissa_influence.metrics import relative_error, score_agreement

from _common import ROOT, markdown, pyplot, save_figure, setup_threads, table, write_json

THRESHOLDS = (1e-2, 1e-4)


def compose_cfg(overrides: list[str]):
    config.register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


class Trace:
    """Error of each iterate against the reference, with the products and seconds so far."""

    def __init__(self, ref: torch.Tensor, start_products: int = 0):
        self.ref, self.t0 = ref, time.perf_counter()
        self.points: list[tuple[int, float, float]] = []
        self.start_products = start_products
        self.paused = 0.0

    def __call__(self, x: torch.Tensor, n: int) -> None:
        t = time.perf_counter()
        self.points.append((n + self.start_products, t - self.t0 - self.paused, relative_error(x, self.ref)))
        self.paused += time.perf_counter() - t  # the error itself is not the method's time

    def reach(self, thr: float) -> tuple[int | None, float | None]:
        for n, s, e in self.points:
            if e <= thr:
                return n, s
        return None, None


def run_method(
    name: str, solver, op: CurvatureOperator, b: torch.Tensor, ref: torch.Tensor
) -> tuple[dict[str, Any], torch.Tensor]:
    trace = Trace(ref)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)
        x, info = solver.solve(op, b, callback=trace)
    seconds = time.perf_counter() - t0 - trace.paused
    row: dict[str, Any] = {
        "method": name,
        "products": info.num_products,
        "seconds": seconds,
        "error": relative_error(x, ref),
        "converged": info.converged,
    }
    for thr in THRESHOLDS:
        n, s = trace.reach(thr)
        row[f"products_to_{thr:g}"], row[f"seconds_to_{thr:g}"] = n, s
    fit = info.extra.get("preconditioner_fit_seconds") or info.extra.get("fit_seconds")
    if fit is not None:
        row["fit_seconds"] = fit
    row["trace"] = trace.points
    return row, x


def methods(args) -> dict[str, Any]:
    cg = dict(tol=args.tol, max_iter=args.max_iter)
    out: dict[str, Any] = {
        "CG (block)": CG(**cg),
        "CG (rows)": CG(block=False, **cg),
        "CG + jacobi": CG(preconditioner="jacobi", **cg),
    }
    for r in args.ranks:
        out[f"CG + nystrom r={r}"] = CG(preconditioner="nystrom", rank=r, **cg)
    out["CG + kfac"] = CG(preconditioner="kfac", **cg)
    out["CG + ekfac"] = CG(preconditioner="ekfac", **cg)
    out["K-FAC"] = EKFAC(kind="kfac")
    out["EK-FAC"] = EKFAC(kind="ekfac")
    return out


def finetune_solves(cfg, pre, ft, data, test, before_iters: int) -> list[dict[str, Any]]:
    """The fixed-mode finetune solve before (full network, CG) and after (head only). The
    full-network CG runs ``before_iters`` iterations; its time for the configured
    ``solver.max_iter`` is projected from its seconds per product, since CG did not
    converge there (the MNIST failure) and would run them all."""
    rows = []
    variants = {
        "full network, CG (before)": dict(head_only="false", exact_finetune="false"),
        "head only, CG": dict(head_only="true", exact_finetune="false"),
        "head only, exact float64 (default)": dict(head_only="true", exact_finetune="auto"),
    }
    for name, over in variants.items():
        c = cfg.copy()
        c.head_only, c.exact_finetune = over["head_only"], over["exact_finetune"]
        t0 = time.perf_counter()
        msi = pipeline.build_influence(c, pre, ft, data)
        fit_s = time.perf_counter() - t0
        solver = msi.finetune_stage_solver
        if name.startswith("full"):
            solver = CG(tol=cfg.solver.tol, max_iter=min(before_iters, cfg.solver.max_iter))
        with eval_mode(pre, ft), warnings.catch_warnings():
            warnings.simplefilter("ignore", SolverWarning)
            g = msi.test_gradients(test, mean=cfg.query == "mean")
            t0 = time.perf_counter()
            v, info = solver.solve(msi.ft_operator, msi.finetune_rhs(g).to(msi.ft_operator.dtype))
            solve_s = time.perf_counter() - t0
        row = {
            "finetune solve": name,
            "seconds": solve_s,
            "fit_seconds": fit_s,
            "products": info.num_products,
            "converged": info.converged,
            "residual": info.residuals[-1] if info.residuals else None,
            "v": v.to(torch.float64),
        }
        if name.startswith("full") and not info.converged:
            row["projected_seconds"] = solve_s / info.num_products * cfg.solver.max_iter * len(g)
        rows.append(row)
    exact = rows[-1]["v"]
    before = rows[0].get("projected_seconds", rows[0]["seconds"])
    for r in rows:
        r["error_vs_exact"] = relative_error(r.pop("v"), exact)
        r["speedup_vs_before"] = before / r["seconds"]
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default="fixed,updated")
    ap.add_argument("--tol", type=float, default=1e-10)
    ap.add_argument("--max-iter", type=int, default=1000)
    ap.add_argument("--ranks", default="32,128", help="Nyström sketch ranks")
    ap.add_argument("--dense-max", type=int, default=10_000, help="largest stage solved densely for the reference")
    ap.add_argument("--ref-tol", type=float, default=1e-12)
    ap.add_argument("--dtype", default="float64", help="the solves' float type (the model is cast)")
    ap.add_argument("--before-iters", type=int, default=30, help="iterations of the full-network finetune CG")
    ap.add_argument("--skip", default="", help="comma-separated method names to leave out")
    ap.add_argument("--out", default=None)
    args, overrides = ap.parse_known_args(argv)
    args.ranks = [int(r) for r in args.ranks.split(",") if r]
    env = setup_threads(args.threads)
    t_start = time.perf_counter()
    res: dict[str, Any] = {"env": env, "args": vars(args), "overrides": overrides, "modes": {}}
    dtype = getattr(torch, args.dtype)
    for mode in args.modes.split(","):
        cfg = compose_cfg([f"mode={mode}", "progress=false", *overrides])
        data, pre, ft, _ = pipeline.train(cfg)
        pre, ft = pre.to(dtype), ft.to(dtype)
        test_idx = pipeline.test_indices(len(data.finetune_test), cfg.test_points, cfg.seed)
        xt, yt = data.finetune_test.tensors
        test = (xt[test_idx], yt[test_idx])  # the library casts floating inputs to the model's dtype
        msi = pipeline.build_influence(cfg, pre, ft, data)
        with eval_mode(pre, ft):
            g = msi.test_gradients(test, mean=cfg.query == "mean")
            v, _ = msi.finetune_stage_solver.solve(msi.ft_operator, msi.finetune_rhs(g).to(msi.ft_operator.dtype))
            b = msi.pretrain_rhs(v.to(g.dtype), g)
            op = msi.pre_operator
            P = op.shape[0]
            t0 = time.perf_counter()
            if P <= args.dense_max:
                ref, ref_info = Explicit(method="eigh").solve(op, b)
                ref_kind = f"dense eigh ({P} parameters)"
                cond = ref_info.extra["max_eigenvalue"] / ref_info.extra["min_eigenvalue"]
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", SolverWarning)
                    ref, ref_info = CG(tol=args.ref_tol, max_iter=20 * args.max_iter).solve(op, b)
                ref_kind = f"CG to {ref_info.residuals[-1]:.1e} ({ref_info.num_products} products, {P} parameters)"
                cond = None
            ref_s = time.perf_counter() - t0
            ref_scores = msi.scores_from(ref)
            print(f"[{mode}] reference: {ref_kind}, {ref_s:.1f}s; condition number {cond}", flush=True)
            rows = []
            skip = set(args.skip.split(","))
            for name, solver in methods(args).items():
                if name in skip:
                    continue
                row, x = run_method(name, solver, op, b, ref)
                row.update(score_agreement(msi.scores_from(x), ref_scores))
                rows.append(row)
                print(
                    f"  {name}: {row['products']} products, {row['seconds']:.2f}s, error {row['error']:.2e}",
                    flush=True,
                )
            # the HVP implementations on the plain block CG solve
            hvp_rows = []
            for hvp in ("functional", "retained"):
                c = cfg.copy()
                c.hvp = hvp
                m2 = pipeline.build_influence(c, pre, ft, data)
                solver = CG(tol=args.tol, max_iter=args.max_iter)
                row, _ = run_method(f"CG (block), hvp={hvp}", solver, m2.pre_operator, b, ref)
                row["graph_mib"] = m2.pre_objective.graph_bytes / 2**20
                hvp_rows.append(row)
                print(f"  hvp={hvp}: {row['seconds']:.2f}s for {row['products']} products", flush=True)
        res["modes"][mode] = {
            "parameters": P,
            "hessian_samples": len(op.objective.batch),
            "test_points": len(test_idx),
            "reference": ref_kind,
            "reference_seconds": ref_s,
            "condition_number": cond,
            "rows": rows,
            "hvp": hvp_rows,
        }
        if mode == "fixed":
            res["finetune"] = finetune_solves(cfg, pre, ft, data, test, args.before_iters)
    res["total_seconds"] = time.perf_counter() - t_start
    report(res)
    if args.out:
        name = f"fast_curvature_{compose_cfg(overrides).data.name}"
        write_json(args.out, f"{name}.json", res)
        plot(res, Path(args.out), name)
    return res


COLS = [
    "method",
    "products_to_0.01",
    "seconds_to_0.01",
    "products_to_0.0001",
    "seconds_to_0.0001",
    "products",
    "seconds",
    "error",
    "pearson",
    "spearman",
    "top_k_overlap",
]


def report(res: dict) -> None:
    for mode, m in res["modes"].items():
        print(
            table(
                COLS,
                [[r.get(c) for c in COLS] for r in m["rows"] + m["hvp"]],
                title=f"\n{mode}: {m['parameters']} parameters, {m['hessian_samples']} Hessian samples, "
                f"{m['test_points']} queries; reference {m['reference']}",
            )
        )
    if "finetune" in res:
        cols = [
            "finetune solve",
            "seconds",
            "projected_seconds",
            "products",
            "residual",
            "error_vs_exact",
            "speedup_vs_before",
        ]
        print(table(cols, [[r.get(c) for c in cols] for r in res["finetune"]], title="\nfixed-mode finetune solve"))
        print(markdown(cols, [[r.get(c) for c in cols] for r in res["finetune"]]))
    for mode, m in res["modes"].items():
        print(f"\n{mode}\n" + markdown(COLS, [[r.get(c) for c in COLS] for r in m["rows"] + m["hvp"]]))
    print(f"total {res['total_seconds']:.0f}s")


def plot(res: dict, out: Path, name: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    modes = list(res["modes"])
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.2), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        for r in res["modes"][mode]["rows"]:
            pts = r["trace"]
            if len(pts) > 1:
                ax.semilogy([p[0] for p in pts], [max(p[2], 1e-16) for p in pts], label=r["method"])
            elif pts:
                ax.semilogy([pts[0][0]], [max(pts[0][2], 1e-16)], "o", label=r["method"])
        for thr in THRESHOLDS:
            ax.axhline(thr, color="grey", lw=0.5, ls=":")
        ax.set_xlabel("Hessian-vector products (all queries)")
        ax.set_ylabel("relative error of s")
        ax.set_title(f"{name}, {mode}: pretraining solve")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out, f"{name}.png")


if __name__ == "__main__":
    main()
