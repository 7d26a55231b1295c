"""The main job: data -> two-stage training (cached) -> multi-stage influence -> outputs.

Configured by a :class:`~lissa_influence.experiments.config.RunSchema` node (Hydra composes it from
``conf/``); writes into ``out_dir``:

- ``scores.npy``: ``[n_queries, n_pretrain]`` float array of ``I(z)`` (the sign of docs/math.md:
  positive = harmful); ``query_vectors.npy``: the solved ``s`` per query, enough to
  score new pretraining examples later without solving again;
- ``scores/``: the same scores in shards of ``shard_size`` examples with a manifest,
  written as they are computed, and the solved ``s`` (:mod:`lissa_influence.results`):
  rerunning the same config into the same directory solves nothing again and scores
  only the missing shards; another config there is refused;
- ``metrics.json``: config, package versions, data sizes, training reports, solver
  diagnostics, timings, and the top helpful / harmful examples per query;
- ``top_examples.png``: each test point with its most helpful and harmful pretraining images.

Under ``torchrun`` every rank runs this job (docs/scaling.md): rank 0 trains first (or
loads the weight cache) and the weights are broadcast from it, the Hessian samples and
the scoring are split across ranks, and only rank 0 writes files and prints.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from omegaconf import OmegaConf

from .. import __version__, distributed, results
from ..curvature import CurvatureOperator
from ..damping import DampingCalibration
from ..kfac import KroneckerCurvature
from ..multistage import MultiStageInfluence
from ..operators import damping_key
from ..solvers import NotConvergedError, Solver, Subspace
from . import calibration, config, plots, rundir
from .data import DataConfig, TwoStageData, load_two_stage, tensor_digest
from .models import ModelConfig, TwoStageNet
from .training import TrainConfig, TwoStageInfo, atomic_save, train_two_stage

log = logging.getLogger(__name__)


def versions() -> dict[str, str]:
    import hydra
    import scipy
    import torchvision

    out = {
        "lissa_influence": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "hydra": hydra.__version__,
    }
    try:  # a source checkout records its commit; an installed wheel has none
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        if commit.returncode == 0:
            out["git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def train(cfg: Any) -> tuple[TwoStageData, TwoStageNet, TwoStageNet, TwoStageInfo]:
    """Load the data and train (or load from the cache) both stages."""
    data = load_two_stage(config.to_frozen(DataConfig, cfg.data))
    pretrained, finetuned, info = train_two_stage(
        data,
        config.to_frozen(ModelConfig, cfg.model),
        config.to_frozen(TrainConfig, cfg.pretrain.train),
        config.to_frozen(TrainConfig, cfg.finetune.train),
        cfg.mode,
        cfg.alpha,
        Path(cfg.cache_dir).expanduser(),
        progress=cfg.progress and distributed.is_main(),
        device=config.resolve_device(cfg.device),
    )
    return data, pretrained, finetuned, info


def test_indices(n: int, count: int, seed: int) -> torch.Tensor:
    """The scored finetuning test points: the first ``count`` of a seeded permutation."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(count, n)]


def estimator_settings(cfg: Any) -> dict[str, Any]:
    """The settings every estimator of the app takes from the config."""
    return {
        "seed": cfg.seed,
        "gauss_newton": cfg.gauss_newton,
        "batch_size": cfg.batch_size,
        "scoring": cfg.scoring,
        "hvp_mode": cfg.hvp,
        "graph_budget": cfg.graph_budget_mib * 2**20,
        "query_chunk": cfg.query_chunk,
    }


def build_influence(
    cfg: Any,
    pretrained,
    finetuned,
    data: TwoStageData,
    calibration: DampingCalibration | None = None,
    solver: Solver | None = None,
) -> MultiStageInfluence:
    """The configured estimator, fitted; ``calibration``: the retrained ground truth for
    ``damping=auto``; ``solver``: in place of ``cfg.solver``'s (benchmarks compare several)."""
    msi = MultiStageInfluence(
        pretrained,
        finetuned,
        shared="embedding",
        mode=cfg.mode,
        alpha=cfg.alpha,
        solver=config.build_solver(cfg.solver) if solver is None else solver,
        pretrain_damping=config.damping_value(cfg.pretrain.damping),
        finetune_damping=config.damping_value(cfg.finetune.damping),
        hessian_samples=cfg.pretrain.hessian_samples,
        finetune_hessian_samples=cfg.finetune.hessian_samples,
        calibration=calibration,
        heuristic_fraction=cfg.calibration.heuristic_fraction,
        progress=cfg.progress,
        **estimator_settings(cfg),
        head_only=config.tristate("head_only", cfg.head_only),
        exact_finetune=config.tristate("exact_finetune", cfg.exact_finetune),
    )
    return msi.fit(data.pretrain_train, data.finetune_train)


def calibrated_influence(
    cfg: Any, pretrained, finetuned, data: TwoStageData, info: TwoStageInfo, test
) -> MultiStageInfluence:
    """``build_influence``; with ``damping=auto``, calibrated against leave-one-out retrainings
    (:mod:`.calibration`), or at the dampings a run with the same settings chose before."""
    if not calibration.wanted(cfg):
        return build_influence(cfg, pretrained, finetuned, data)
    parts = calibration.cache_parts(cfg, "leave-one-out", info.pretrain_key, info.finetune_key)

    def ground_truth() -> DampingCalibration:
        with distributed.rank0_first():  # rank 0 retrains into the cache, the others read its models
            return calibration.leave_one_out(cfg, data, pretrained, finetuned, test)

    msi = calibration.calibrated(
        cfg, parts, lambda c, truth: build_influence(c, pretrained, finetuned, data, truth), ground_truth
    )
    return cast(MultiStageInfluence, msi)


def kronecker_kinds(cfg: Any) -> list[str]:
    """The Kronecker factors (``ekfac`` / ``kfac``) the configured solver fits, if any."""
    s = cfg.solver
    if s.name in ("ekfac", "kfac"):
        return [s.name]
    return [s.preconditioner] if s.name == "cg" and s.preconditioner in ("ekfac", "kfac") else []


def _stage_operators(msi: MultiStageInfluence) -> dict[str, CurvatureOperator]:
    return {"pretrain": msi.pre_operator, "finetune": msi.ft_operator}


def _factor_file(cfg: Any, stage: str, op: CurvatureOperator, kind: str, extra: str = "") -> Path:
    """Where a stage's factors are cached: keyed by what determines them (the parameters at
    which they are taken, the Hessian sample, the block, the estimate), not by the damping
    (``extra``: what else a cached item depends on)."""
    o = op.objective
    state = [*o.params.values(), *(b for b in o.model.buffers())]
    digest = tensor_digest(*state, *o.batch.tensors())
    spec = (
        f"{__version__}|{stage}|{kind}|{cfg.solver.fisher}|{cfg.solver.seed}|{cfg.gauss_newton}|"
        f"{','.join(op.block.names)}{extra}"
    )
    key = hashlib.sha256(f"{spec}|{digest}".encode()).hexdigest()[:20]
    return Path(cfg.cache_dir).expanduser() / "factors" / f"{stage}_{kind}_{key}.pt"


def load_factors(cfg: Any, msi: MultiStageInfluence) -> list[str]:
    """Install cached Kronecker factors on the stage operators; returns the stages that had
    them. Single-process runs only: under torchrun every rank fits (and reduces) its own."""
    loaded: list[str] = []
    if distributed.world_size() > 1:  # each rank holds a shard: its key would differ, and so would its decision
        return loaded
    for kind in kronecker_kinds(cfg):
        for stage, op in _stage_operators(msi).items():
            path = _factor_file(cfg, stage, op, kind)
            if path.is_file():
                op.set_kronecker(KroneckerCurvature.load(path, map_location=op.device))
                loaded.append(f"{stage}_{kind}")
    return loaded


def save_factors(cfg: Any, msi: MultiStageInfluence, out: Path) -> list[str]:
    """The fitted Kronecker factors into the cache (for later runs) and the run folder."""
    saved: list[str] = []
    if distributed.world_size() > 1:
        return saved
    for kind in kronecker_kinds(cfg):
        for stage, op in _stage_operators(msi).items():
            fitted = op.kronecker_fitted(kind)
            if fitted is None:
                continue
            path = _factor_file(cfg, stage, op, kind)
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                fitted.save(path)
            (out / "factors").mkdir(exist_ok=True)
            fitted.save(out / "factors" / f"{stage}_{kind}.pt")
            saved.append(f"{stage}_{kind}")
    return saved


def _subspace_file(cfg: Any, stage: str, op: CurvatureOperator) -> Path:
    """Where a stage's deflation subspace is cached: as its factors, and by damping and dtype."""
    return _factor_file(cfg, stage, op, f"deflate{cfg.solver.deflate}", f"|{damping_key(op.damping)}|{op.dtype}")


def load_subspaces(cfg: Any, msi: MultiStageInfluence) -> list[str]:
    """Install cached deflation subspaces (``solver.deflate``) on the stage operators, so that
    a rerun's first solve is already deflated; returns the stages that had one."""
    loaded: list[str] = []
    if cfg.solver.name != "cg" or not cfg.solver.deflate or distributed.world_size() > 1:
        return loaded
    for stage, op in _stage_operators(msi).items():
        path = _subspace_file(cfg, stage, op)
        if path.is_file():
            subspace = Subspace.load(path, map_location=op.device)
            op.memo[("deflation", subspace.key)] = subspace  # CG uses it only under a key that matches its solve
            loaded.append(stage)
    return loaded


def save_subspaces(cfg: Any, msi: MultiStageInfluence) -> list[str]:
    """The stage operators' deflation subspaces into the cache, for the next run."""
    saved: list[str] = []
    if cfg.solver.name != "cg" or not cfg.solver.deflate or distributed.world_size() > 1:
        return saved
    for stage, op in _stage_operators(msi).items():
        for key, value in op.memo.items():
            if isinstance(key, tuple) and key[0] == "deflation" and isinstance(value, Subspace):
                path = _subspace_file(cfg, stage, op)
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_save(path, value.state_dict())
                saved.append(stage)
    return saved


def check_solves(info: dict[str, Any], allow_unconverged: bool) -> None:
    """Refuse to score from a solve that did no better than the zero vector (relative
    residual 1 or above: CG hands back its best iterate, so no progress at all), unless
    ``allow_unconverged``. An approximate inverse (``solver=ekfac|kfac``) is not a solve
    that failed: its residual, however large, is logged as the measure of its approximation."""
    for stage in ("finetune", "pretrain"):
        d = info.get(stage) or {}
        worst = max([*d.get("relative_residuals", []), d.get("relative_residual") or 0.0], default=0.0)
        if d.get("solver") == "ekfac":
            log.log(
                logging.WARNING if worst >= 1 else logging.INFO,
                "%s: %s's approximate inverse has relative residual %.3g against the exact damped curvature",
                stage,
                d.get("kind", "ekfac"),
                worst,
            )
            continue
        if (worst >= 1 or worst != worst) and not allow_unconverged:
            raise NotConvergedError(
                f"the {stage} solve ended at a relative residual of {worst:.3g}, no better than no solve at all; its "
                f"scores would be noise. Raise {stage}.damping or solver.max_iter, compute in float64 "
                "(model.dtype=float64), or set allow_unconverged=true to score anyway"
            )


def top_examples(scores: torch.Tensor, k: int) -> list[dict[str, list]]:
    """Per query: the ``k`` most helpful (most negative ``I``) and most harmful examples."""
    out = []
    for row in scores:
        helpful = torch.argsort(row)[:k]
        harmful = torch.argsort(row, descending=True)[:k]
        out.append(
            {
                "helpful": helpful.tolist(),
                "helpful_scores": row[helpful].tolist(),
                "harmful": harmful.tolist(),
                "harmful_scores": row[harmful].tolist(),
            }
        )
    return out


def run(cfg: Any, out_dir: str | Path) -> dict[str, Any]:
    """The main job into ``out_dir``, which it owns meanwhile (:mod:`.rundir`: one run per folder)."""
    config.check(cfg)
    distributed.init_from_env()
    if not distributed.is_main():
        return _run(cfg, out_dir)
    rundir.acquire(out_dir)
    try:
        return _run(cfg, out_dir)
    finally:
        rundir.release(out_dir)


def _run(cfg: Any, out_dir: str | Path) -> dict[str, Any]:
    main = distributed.is_main()
    out = Path(out_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    hashed = config.scored_config(cfg)
    key = results.config_hash(hashed)
    # before any training: a results folder of another config is refused at once
    distributed.on_rank0(lambda: results.ShardStore.check_folder(out / "scores", key, hashed))

    start = time.perf_counter()
    with distributed.rank0_first():  # rank 0 downloads and trains into the cache, the others read it
        data, pretrained, finetuned, info = train(cfg)
    timings = training_timings(info, time.perf_counter() - start)
    distributed.broadcast_module(pretrained)  # identical weights on every rank, even without a shared cache
    distributed.broadcast_module(finetuned)
    log.info(
        "trained: pretrain loss %.4g (|grad| %.2g%s), finetune loss %.4g (|grad| %.2g%s)",
        info.pretrain_report.loss,
        info.pretrain_report.grad_norm,
        ", cached" if info.pretrain_cached else "",
        info.finetune_report.loss,
        info.finetune_report.grad_norm,
        ", cached" if info.finetune_cached else "",
    )

    idx = test_indices(len(data.finetune_test), cfg.test_points, cfg.seed)
    x_test, y_test = (t[idx] for t in data.finetune_test.tensors)
    msi = calibrated_influence(cfg, pretrained, finetuned, data, info, (x_test, y_test))
    factors_loaded = load_factors(cfg, msi)
    subspaces_loaded = load_subspaces(cfg, msi)
    s, scores, resumed = results.resumable_scores(
        msi,
        (x_test, y_test),
        out / "scores",
        key,
        cfg.shard_size,
        mean=cfg.query == "mean",
        config=hashed,
        on_solved=lambda info: check_solves(info, cfg.allow_unconverged),
    )
    solve_diagnostics = dict(resumed["solve"])
    solve_diagnostics["time"] = {**solve_diagnostics.get("time", {}), "scoring": resumed["scoring_time"]}
    solve_diagnostics["resumed"] = {
        "solve": resumed["resumed_solve"],
        "shards_computed": resumed["shards_computed"],
        "shards_total": resumed["shards_total"],
    }
    solve_diagnostics["world_size"] = distributed.world_size()
    timings.update(solve_diagnostics["time"])

    top = top_examples(scores, cfg.top_k)
    metrics: dict[str, Any] = {
        "config": OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg,
        "versions": versions(),
        "data": data.describe(),
        "training": {
            "pretrain": vars(info.pretrain_report),
            "finetune": vars(info.finetune_report),
            "pretrain_cached": info.pretrain_cached,
            "finetune_cached": info.finetune_cached,
        },
        "test_indices": idx.tolist(),
        "test_labels": y_test.tolist(),
        "influence": {
            **solve_diagnostics,
            "num_pretrain": scores.shape[1],
            "num_queries": scores.shape[0],
            "mean_abs_score": float(scores.abs().mean()),
            "score_range": [float(scores.min()), float(scores.max())],
        },
        "damping": msi.damping_report,
        "top_examples": top,
    }
    # every rank solves for the baselines: their estimators' products are collectives under torchrun
    baselines = baseline_scores(cfg, msi, pretrained, finetuned, data, (x_test, y_test)) if cfg.validate.enabled else {}
    if not main:  # the other ranks of a torchrun job: same numbers, no files
        return metrics
    if kronecker_kinds(cfg):
        metrics["influence"]["factors"] = {"loaded": factors_loaded, "saved": save_factors(cfg, msi, out)}
    if cfg.solver.name == "cg" and cfg.solver.deflate:
        metrics["influence"]["subspaces"] = {"loaded": subspaces_loaded, "saved": save_subspaces(cfg, msi)}
    np.save(out / "scores.npy", scores.double().cpu().numpy())
    np.save(out / "query_vectors.npy", s.double().cpu().numpy())
    if cfg.query == "each":
        plots.top_examples_grid(
            out / "top_examples.png", x_test, y_test, data, top, data.finetune_classes, data.pretrain_classes
        )
    calibration.figure(out / "calibration.png", msi.damping_report, f"{cfg.data.name}, embedding {cfg.mode}")
    if cfg.validate.enabled:
        from . import validation

        m = len(data.pretrain_train)  # the calibration's removals are never validated
        exclude = (
            calibration.removals(m, cfg.calibration.budget, cfg.calibration.seed) if calibration.wanted(cfg) else []
        )
        metrics["validation"] = validation.run(
            cfg, data, pretrained, finetuned, scores, (x_test, y_test), out, exclude=exclude, baselines=baselines
        )
        timings["validation"] = metrics["validation"]["seconds"]["total"]
    timings["total"] = time.perf_counter() - start
    metrics["timings"] = timings
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    print(summary(metrics))  # once: under Hydra a log.info would repeat it on the console
    return metrics


def baseline_scores(cfg: Any, msi: MultiStageInfluence, pretrained, finetuned, data, test) -> dict[str, torch.Tensor]:
    """``validate.baselines``: each solver's scores of the same queries, at the dampings the run used
    (numbers: a calibrated damping is not calibrated again for a baseline)."""
    out = {}
    for name in cfg.validate.baselines:
        vcfg = copy.deepcopy(cfg)
        OmegaConf.update(vcfg, "solver.name", name, merge=False)
        OmegaConf.update(vcfg, "pretrain.damping", float(msi.pretrain_damping), merge=False)
        OmegaConf.update(vcfg, "finetune.damping", float(msi.finetune_damping), merge=False)
        other = build_influence(vcfg, pretrained, finetuned, data)
        out[name] = other.scores_from(other.query_vectors(test, cfg.query == "mean"))
    return out


def training_timings(info: TwoStageInfo, seconds: float) -> dict[str, float]:
    """Seconds of data loading and of each stage's training; a stage loaded from the cache
    took no training time in this run (its ``metrics.json`` report keeps the original's)."""
    trained = {
        "pretrain_training": 0.0 if info.pretrain_cached else info.pretrain_report.seconds,
        "finetune_training": 0.0 if info.finetune_cached else info.finetune_report.seconds,
    }
    return {"data_and_cache": max(0.0, seconds - sum(trained.values())), **trained}


def summary(m: dict[str, Any]) -> str:
    inf = m["influence"]
    lines = [
        f"multi-stage influence ({m['config']['mode']}, solver={m['config']['solver']['name']}): "
        f"{inf['num_queries']} queries x {inf['num_pretrain']} pretraining examples, mean |I| = "
        f"{inf['mean_abs_score']:.4g}",
    ]
    for stage in ("finetune", "pretrain"):
        d = inf.get(stage)
        if d:
            res = d.get("final_residual")
            lines.append(
                f"  {stage} solve: {d['iterations']} iterations, {d['num_products']} products, "
                f"converged={d['converged']}" + (f", residual {res:.2g}" if res is not None else "")
            )
    if m.get("damping"):
        lines.append("  " + calibration.summary(m["damping"]))
    times = m.get("timings", inf["time"])
    cached = [s for s in ("pretrain", "finetune") if m.get("training", {}).get(f"{s}_cached")]
    lines.append(
        "  time: "
        + ", ".join(f"{k.replace('_', ' ')} {v:.2f}s" for k, v in times.items())
        + (f" ({' and '.join(cached)} weights from the cache)" if cached else "")
    )
    for q, t in enumerate(m["top_examples"][:3]):
        lines.append(
            f"  query {q}: most helpful {t['helpful'][:3]} {[round(v, 4) for v in t['helpful_scores'][:3]]}, "
            f"most harmful {t['harmful'][:3]} {[round(v, 4) for v in t['harmful_scores'][:3]]}"
        )
    if "validation" in m:
        v = m["validation"]
        seeds = len(v["seeds"])
        if v.get("below_noise_floor"):
            found = (
                f"ground truth below its noise floor (split-half r {v['noise_floor']['split_half']['estimate']:.2f})"
            )
        else:
            p, s = v["pearson_interval"], v["spearman_interval"]
            found = (
                f"Pearson {p['estimate']:.3f} [{p['low']:.3f}, {p['high']:.3f}], "
                f"Spearman {s['estimate']:.3f} [{s['low']:.3f}, {s['high']:.3f}] (95% bootstrap)"
            )
        lines.append(
            f"  leave-one-out ({v['query']}): {found} over {v['num_examples']} examples"
            + (f", mean of {seeds} retraining seeds" if seeds > 1 else "")
            + f"; {v['seconds']['retrainings']} retrainings, {v['seconds']['per_retraining']:.1f}s each; "
            f"retrained |grad| <= {max(v['max_retrain_grad_norm'].values()):.2g}"
        )
        for name, b in v.get("baselines", {}).items():
            p = b["pearson_interval"]
            lines.append(
                f"    the same retrainings, solver={name}: "
                f"Pearson {p['estimate']:.3f} [{p['low']:.3f}, {p['high']:.3f}]"
            )
    return "\n".join(lines)
