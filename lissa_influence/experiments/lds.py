"""The linear datamodeling score (LDS; Park et al. 2023, TRAK) for the pretrain → finetune chain.

``lissa-influence experiment=digits_lds`` (``analysis.name=lds``; docs/validation.md):

1. ``lds.num_subsets`` (M) seeded subsets of the pretraining set, each keeping a
   fraction ``lds.fraction`` of the ``m`` examples (the same subsets for every variant).
2. Ground truth: for each subset and each finetuning mode in ``lds.modes``, retrain
   pretraining without the removed examples and then finetuning, and record the
   finetuned loss of each of the ``test_points`` test points (float64).
   ``lds.protocol=warm`` retrains from the trained weights with the leave-one-out
   settings (:func:`.retraining.retrain_settings`, weights 0 on the removed examples as
   :func:`.training.leave_out` sets them); ``scratch`` trains both stages from a fresh
   initialisation with ``pretrain.train`` / ``finetune.train`` and one fixed seed (TRAK).
3. Prediction for subset ``S`` and test point ``t``: the trained model's loss plus
   ``Σ_{z removed} −I_t(z)/m``, ``I`` from ``scores`` (docs/math.md: removing ``z`` is
   ``ε = −1/m``; the pretraining objective keeps its ``1/m`` under zero weights, so the
   sum is the first-order change exactly).
4. LDS per test point: Spearman between predicted and actual losses over the M subsets;
   the variant's ``lds`` is their mean.

Retrained models are cached under ``cache_dir/lds/`` by the subset's kept indices and
every setting they depend on (the pretraining stage once for both modes), written
atomically as each finishes: a rerun (or another variant, solver or mode) retrains
nothing that exists, and a killed run resumes. ``lds.world`` > 1 (or ``torchrun``)
retrains only subsets ``i ≡ lds.rank (mod lds.world)``, so parallel jobs fill one cache.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from scipy import stats
from torch.nn import functional as nnf

from .. import confidence, distributed
from ..damping import DampingCalibration
from ..influence import Influence
from ..progress import progress_bar
from . import calibration, config, pipeline, plots
from .analyses import variant
from .retraining import PROTOCOLS, Retrainer, removed

log = logging.getLogger(__name__)

# name -> (solver.name, gauss_newton) of a multi-stage variant; "single_stage" is the baseline
SOLVER_VARIANTS = {
    "cg": ("cg", False),
    "lissa": ("lissa", False),
    "ekfac": ("ekfac", False),
    "gauss_newton": ("cg", True),
    "identity": ("identity", False),
}
VARIANTS = (*SOLVER_VARIANTS, "single_stage")


# --- subsets and the retraining ------------------------------------------------------------


def subsets(m: int, count: int, fraction: float, seed: int) -> list[torch.Tensor]:
    """``count`` sorted index sets of ``round(fraction * m)`` kept examples. One generator
    draws them in turn, so the first subsets stay the same when ``count`` grows."""
    keep = round(fraction * m)
    if not 1 <= keep < m:
        raise ValueError(f"lds.fraction={fraction} keeps {keep} of {m} pretraining examples; it must keep 1..{m - 1}")
    gen = torch.Generator().manual_seed(seed)
    return [torch.sort(torch.randperm(m, generator=gen)[:keep]).values for _ in range(count)]


def point_losses(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Per-test-point cross-entropy in float64."""
    ref = next(model.parameters())
    with torch.no_grad():
        logits = model(x.to(ref)).double()
        return nnf.cross_entropy(logits, y.to(ref.device), reduction="none").cpu().numpy()


# --- scores of each variant --------------------------------------------------------------


def multistage_scores(
    cfg: Any,
    mode: str,
    name: str,
    pretrained,
    finetuned,
    data,
    x,
    y,
    ground_truth: DampingCalibration | None = None,
    dampings: dict[str, float] | None = None,
    model_keys: tuple[str, ...] = (),
) -> tuple[torch.Tensor, dict]:
    """One multi-stage variant's scores; ``dampings`` (stage -> number) overrides the config's;
    ``model_keys``: the trained models' cache keys, which a cached calibration is keyed by."""
    solver, gauss_newton = SOLVER_VARIANTS[name]
    changes = {"mode": mode, "solver.name": solver, "gauss_newton": gauss_newton}
    changes.update({f"{stage}.damping": value for stage, value in (dampings or {}).items()})
    vcfg = variant(cfg, changes)
    if ground_truth is None or not calibration.wanted(vcfg):
        msi = pipeline.build_influence(vcfg, pretrained, finetuned, data)
    else:  # calibrated on the calibration subsets, or at the dampings chosen before with the same settings
        msi = calibration.calibrated(  # type: ignore[assignment]  # build returns a MultiStageInfluence
            vcfg,
            calibration.cache_parts(vcfg, f"lds/{mode}", *model_keys),
            lambda c, truth: pipeline.build_influence(c, pretrained, finetuned, data, truth),
            lambda: ground_truth,
        )
    scores = msi.scores_from(msi.query_vectors((x, y)))
    return scores, dict(msi.diagnostics)


def single_stage_scores(
    cfg: Any, pretrained, data, x, ground_truth: DampingCalibration | None = None
) -> tuple[torch.Tensor, dict]:
    """Koh & Liang influence on the *pretrained* model, ignoring finetuning. The finetuning
    test points belong to classes the pretrained model has no output for, so the query is
    each test input's loss under its pseudo-label, the pretraining class the pretrained
    model gives it (the nearest analogue of "its own class")."""
    ref = next(pretrained.parameters())
    with torch.no_grad():
        pseudo = pretrained(x.to(ref)).argmax(1).cpu()
    damping = config.damping_value(cfg.pretrain.damping)
    # its queries are the pseudo-labelled test inputs, judged against the same retrained finetuned losses
    cal = replace(ground_truth, test_data=(x, pseudo)) if ground_truth is not None and damping == "auto" else None
    inf = Influence(
        pretrained,
        solver=config.build_solver(cfg.solver),
        damping=damping,
        hessian_samples=cfg.pretrain.hessian_samples,
        calibration=cal,
        heuristic_fraction=cfg.calibration.heuristic_fraction,
        **pipeline.estimator_settings(cfg),
    ).fit(data.pretrain_train)
    scores = inf.scores((x, pseudo))
    return scores, {**dict(inf.diagnostics), "pseudo_labels": [int(data.pretrain_classes[p]) for p in pseudo]}


def predict(full_loss: np.ndarray, scores: np.ndarray, kept: list[torch.Tensor], m: int) -> np.ndarray:
    """``[M, T]``: ``full_loss[t] + Σ_{z ∉ kept} −I_t(z)/m`` for every subset."""
    removed = np.ones((len(kept), m))
    for k, keep in enumerate(kept):
        removed[k, keep.numpy()] = 0.0
    return full_loss[None, :] - removed @ scores.T / m


def lds(predicted: np.ndarray, actual: np.ndarray) -> list[float]:
    """Spearman over the subsets (rows), per test point (column); NaN where one side is constant."""
    out = []
    for t in range(actual.shape[1]):
        if np.ptp(predicted[:, t]) == 0 or np.ptp(actual[:, t]) == 0:
            out.append(1.0 if np.array_equal(predicted[:, t], actual[:, t]) else float("nan"))
        else:
            out.append(float(stats.spearmanr(predicted[:, t], actual[:, t])[0]))
    return out


# --- the run ---------------------------------------------------------------------------


def check(cfg: Any) -> None:
    c = cfg.lds
    if c.protocol not in PROTOCOLS:
        raise ValueError(f"lds.protocol={c.protocol!r} is not one of {PROTOCOLS}")
    if c.num_subsets < 3:
        raise ValueError(f"lds.num_subsets={c.num_subsets} must be >= 3 (a Spearman correlation over subsets)")
    if not 0 < c.fraction < 1:
        raise ValueError(f"lds.fraction={c.fraction} must lie strictly between 0 and 1")
    for mode in c.modes:
        if mode not in ("fixed", "updated"):
            raise ValueError(f"lds.modes has {mode!r}; use fixed and/or updated")
    unknown = [v for v in c.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"lds.variants has {unknown}; use any of {VARIANTS}")
    if not 0 <= c.rank < max(c.world, 1):
        raise ValueError(f"lds.rank={c.rank} must be in 0..lds.world-1 (lds.world={c.world})")
    if calibration.wanted(cfg) and cfg.calibration.seed == c.seed:
        raise ValueError(
            f"calibration.seed={cfg.calibration.seed} equals lds.seed: the calibration subsets would be the first "
            "evaluated ones; give calibration.seed another value"
        )
    if "updated" in c.modes and not cfg.alpha > 0:
        raise ValueError(f"lds.modes has updated, which needs alpha > 0, got alpha={cfg.alpha}")


def _share() -> tuple[int, int]:
    return distributed.rank(), distributed.world_size()


def run(cfg: Any, out_dir: str | Path) -> dict[str, Any] | None:
    """Fill the subset cache (this rank's share), then score every variant and write
    ``lds.json``, ``lds.csv`` and ``lds.png`` into ``out_dir`` (rank 0, once all subsets exist)."""
    config.check(cfg)
    check(cfg)
    distributed.init_from_env()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    c = cfg.lds
    rank, world = (c.rank, c.world) if c.world > 1 else _share()
    out = Path(out_dir)
    start = time.perf_counter()

    seeds = [c.seed] + ([c.noise_seed] if c.noise_floor else [])
    models: dict[str, tuple] = {}
    for mode in c.modes:
        with distributed.rank0_first():  # rank 0 trains into the cache, the others read it
            models[mode] = pipeline.train(variant(cfg, {"mode": mode}))
    data, pretrained, _, info0 = models[c.modes[0]]
    m = len(data.pretrain_train)
    kept = subsets(m, c.num_subsets, c.fraction, c.seed)
    idx = pipeline.test_indices(len(data.finetune_test), cfg.test_points, cfg.seed)
    x, y = (t[idx] for t in data.finetune_test.tensors)

    # The ground truth: every (seed, subset, mode), this rank's share retrained.
    retrainers = {s: Retrainer(cfg, data, pretrained, info0.pretrain_key, s, c.protocol) for s in seeds}
    actual = {(s, mode): np.full((c.num_subsets, len(idx)), np.nan) for s in seeds for mode in c.modes}
    mine = [k for k in range(c.num_subsets) if k % world == rank]
    retrain_start = time.perf_counter()
    with progress_bar(len(seeds) * len(mine), "LDS retraining", enabled=cfg.progress, unit="subset") as bar:
        for s in seeds:
            for k in mine:
                pre, pre_key = retrainers[s].pretrained_on(kept[k])
                for mode in c.modes:
                    _, _, finetuned, info = models[mode]
                    ft = retrainers[s].finetuned_on(pre, pre_key, finetuned, info.finetune_key, mode)
                    actual[s, mode][k] = point_losses(ft, x, y)
                bar.update()
    ground_truth: dict[str, DampingCalibration] = {}
    if calibration.wanted(cfg):  # damping=auto: its own subsets (calibration.seed), never the evaluated ones
        cal_kept = subsets(m, cfg.calibration.budget, c.fraction, cfg.calibration.seed)
        cal_losses = {mode: np.full((len(cal_kept), len(idx)), np.nan) for mode in c.modes}
        with (
            distributed.rank0_first(),
            progress_bar(len(cal_kept), "LDS calibration retraining", enabled=cfg.progress, unit="subset") as bar,
        ):
            for k, keep in enumerate(cal_kept):
                pre, pre_key = retrainers[c.seed].pretrained_on(keep)
                for mode in c.modes:
                    _, _, finetuned, info = models[mode]
                    ft = retrainers[c.seed].finetuned_on(pre, pre_key, finetuned, info.finetune_key, mode)
                    cal_losses[mode][k] = point_losses(ft, x, y)
                bar.update()
        ground_truth = {
            mode: DampingCalibration(
                test_data=(x, y),
                removals=[removed(m, keep).tolist() for keep in cal_kept],
                actual=cal_losses[mode],
                grid=tuple(cfg.calibration.grid),
                metric="spearman",
            )
            for mode in c.modes
        }
    retrained = sum(r.trained for r in retrainers.values())
    retrain_seconds = time.perf_counter() - retrain_start
    log.info("LDS: %d stage retrainings in %.1fs (subsets %d mod %d)", retrained, retrain_seconds, rank, world)
    distributed.barrier()  # torchrun: every subset is cached once all ranks pass this
    missing = [
        k
        for k in range(c.num_subsets)
        for s in seeds
        for mode in c.modes
        if not retrainers[s].is_cached(kept[k], models[mode][3].finetune_key, mode)
    ]
    if missing:
        msg = (
            f"LDS: {len(set(missing))} of {c.num_subsets} subsets are not retrained yet (other ranks); "
            "rerun without lds.world once they finish: it reuses the cache and scores"
        )
        log.warning(msg)
        print(msg)
        return None
    for s in seeds:  # the other ranks' subsets, from the cache
        for k in range(c.num_subsets):
            if k in mine:
                continue
            pre, pre_key = retrainers[s].pretrained_on(kept[k])
            for mode in c.modes:
                _, _, finetuned, info = models[mode]
                actual[s, mode][k] = point_losses(
                    retrainers[s].finetuned_on(pre, pre_key, finetuned, info.finetune_key, mode), x, y
                )

    result = score_variants(cfg, models, kept, x, y, actual, ground_truth)
    reports = [r for rt in retrainers.values() for r in rt.reports]
    result["protocol"] = {
        "num_subsets": c.num_subsets,
        "fraction": c.fraction,
        "kept_per_subset": len(kept[0]),
        "num_pretrain": m,
        "subset_seed": c.seed,
        "retrain_seed": c.seed,
        "noise_seed": c.noise_seed if c.noise_floor else None,
        "protocol": c.protocol,
        "modes": list(c.modes),
        "test_indices": idx.tolist(),
        "test_labels": [int(data.finetune_classes[int(t)]) for t in y],
        "prediction": "full-data loss + sum over removed z of -I(z)/m (docs/math.md)",
        "retrain": {"pretrain": asdict(retrainers[c.seed].pre_cfg), "finetune": asdict(retrainers[c.seed].ft_cfg)},
        "retrained_this_run": retrained,
        # how far from stationarity the retrained models stopped, per stage (cached ones included)
        "max_retrain_grad_norm": {
            stage: max(r.grad_norm for r in reports if r.stage == stage) for stage in {r.stage for r in reports}
        },
        "retrain_seconds": retrain_seconds,
        "seconds": time.perf_counter() - start,
    }
    result["actual_losses"] = {mode: actual[c.seed, mode].tolist() for mode in c.modes}
    result["config"] = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
    result["versions"] = pipeline.versions()
    if not distributed.is_main():  # torchrun: every rank took part in the solves, rank 0 writes
        return result
    out.mkdir(parents=True, exist_ok=True)
    (out / "lds.json").write_text(json.dumps(result, indent=2, default=str))
    write_csv(out / "lds.csv", result)
    plot(out / "lds.png", result, f"{cfg.data.name}: LDS over {c.num_subsets} subsets ({c.fraction:g} kept)")
    curves = {
        f"{key} {stage}": d["calibration"]
        for key, v in result["variants"].items()
        for stage, d in (v.get("damping") or {}).items()
        if "calibration" in d
    }
    if curves:  # damping=auto: agreement on the calibration subsets against damping
        plots.calibration_curves(out / "calibration.png", curves, f"{cfg.data.name}: LDS calibration subsets")
    print(summary(result))
    return result


def score_variants(
    cfg: Any, models: dict, kept, x, y, actual: dict, ground_truth: dict[str, DampingCalibration] | None = None
) -> dict[str, Any]:
    """Every variant's LDS, with its bootstrap interval, against the same retrained losses; per
    mode: the noise floor, the multi-stage solvers, the single-stage baseline. With
    ``damping=auto`` each variant is calibrated on ``ground_truth[mode]`` (its own subsets),
    except LiSSA, which approximates the same damped inverse as CG and takes CG's dampings."""
    c = cfg.lds
    ground_truth = ground_truth or {}
    variants: dict[str, dict[str, Any]] = {}
    floors: dict[str, confidence.Interval] = {}

    def attempt(key: str, mode: str, method: str, compute, *args) -> tuple[torch.Tensor, dict] | None:
        t0 = time.perf_counter()
        try:
            scores, diag = compute(*args)
        except Exception as e:  # e.g. ekfac before its solver exists: the table says why
            log.warning("LDS variant %s skipped: %s: %s", key, type(e).__name__, e)
            variants[key] = {"mode": mode, "method": method, "lds": None, "skipped": f"{type(e).__name__}: {e}"}
            return None
        return scores, {"seconds": time.perf_counter() - t0, "diagnostics": diag}

    def judge(key: str, mode: str, method: str, scores: torch.Tensor, extra: dict) -> None:
        s = scores.double().cpu().numpy()
        predicted = predict(point_losses(models[mode][2], x, y), s, kept, s.shape[1])
        per_point = lds(predicted, actual[c.seed, mode])
        interval = confidence.lds_interval(predicted, actual[c.seed, mode])
        entry = {
            "mode": mode,
            "method": method,
            "lds": float(np.nanmean(per_point)) if not all(np.isnan(per_point)) else float("nan"),
            "interval": interval.as_dict(),
            "per_test_point": per_point,
            "damping": (extra.get("diagnostics") or {}).get("damping"),
            **extra,
        }
        floor = floors.get(mode)
        if floor is not None and not floor.low > 0:  # the seeds do not agree: no correlation to read
            entry.update(lds=None, below_noise_floor=True, unresolved_lds=entry["lds"])
        variants[key] = entry

    for mode in c.modes:  # first: a ground truth below its noise floor gets no correlation
        if c.noise_floor:
            per_point = lds(actual[c.noise_seed, mode], actual[c.seed, mode])
            floors[mode] = confidence.lds_interval(actual[c.noise_seed, mode], actual[c.seed, mode])
            variants[f"{mode}/noise_floor"] = {
                "mode": mode,
                "method": "noise_floor",
                "lds": float(np.nanmean(per_point)),
                "interval": floors[mode].as_dict(),
                "per_test_point": per_point,
                "note": f"retrained losses under seed {c.noise_seed} as the prediction of those under seed {c.seed}",
            }
    single: dict[str, tuple[torch.Tensor, dict] | None] = {}
    for mode in c.modes:
        data, pretrained, finetuned, _ = models[mode]
        truth = ground_truth.get(mode)
        chosen: dict[str, float] = {}  # CG's calibrated dampings, for LiSSA
        for name in c.variants:
            key = f"{mode}/{name}"
            if name == "single_stage":
                # one pretrained model for every mode; calibrated per mode when each has its own ground truth
                first = next(iter(single), None)
                if truth is None and first is not None:
                    done = single[first]
                    if done is None:  # skipped: the same reason
                        variants[key] = {**variants[f"{first}/single_stage"], "mode": mode}
                else:
                    done = single[mode] = attempt(key, mode, name, single_stage_scores, cfg, pretrained, data, x, truth)
                if done is not None:
                    judge(key, mode, name, *done)
                continue
            dampings = chosen if name == "lissa" and chosen else None
            keys = (models[mode][3].pretrain_key, models[mode][3].finetune_key)
            done = attempt(
                key,
                mode,
                name,
                multistage_scores,
                cfg,
                mode,
                name,
                pretrained,
                finetuned,
                data,
                x,
                y,
                truth,
                dampings,
                keys,
            )
            if done is not None:
                if dampings:  # LiSSA at CG's calibrated dampings: say so
                    for stage in dampings:
                        done[1]["diagnostics"]["damping"][stage]["rule"] = "auto (CG's choice)"
                judge(key, mode, name, *done)
                if name == "cg" and truth is not None:
                    report = done[1]["diagnostics"].get("damping", {})
                    chosen = {stage: r["value"] for stage, r in report.items() if r["rule"] == "auto"}
    return {"analysis": "lds", "variants": variants}


def write_csv(path: Path, result: dict[str, Any]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "variant",
                "mode",
                "method",
                "lds",
                "ci_low",
                "ci_high",
                "std_over_test_points",
                "min",
                "max",
                "seconds",
                "skipped",
            ]
        )
        for key, v in result["variants"].items():
            pts = np.asarray(v.get("per_test_point") or [np.nan], dtype=float)
            ok = not np.all(np.isnan(pts))
            w.writerow(
                [
                    key,
                    v["mode"],
                    v["method"],
                    "" if v["lds"] is None else f"{v['lds']:.4f}",
                    f"{v['interval']['low']:.4f}" if v["lds"] is not None and "interval" in v else "",
                    f"{v['interval']['high']:.4f}" if v["lds"] is not None and "interval" in v else "",
                    f"{np.nanstd(pts):.4f}" if ok else "",
                    f"{np.nanmin(pts):.4f}" if ok else "",
                    f"{np.nanmax(pts):.4f}" if ok else "",
                    f"{v['seconds']:.1f}" if "seconds" in v else "",
                    v.get("skipped", "below noise floor" if v.get("below_noise_floor") else ""),
                ]
            )


def plot(path: Path, result: dict[str, Any], title: str) -> None:
    """Mean LDS per variant (bars) with each test point's LDS (dots), one panel per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(v["mode"] for v in result["variants"].values()))
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 3.6), squeeze=False, sharex=True)
    for ax, mode in zip(axes[0], modes, strict=True):
        rows = [(v["method"], v) for v in result["variants"].values() if v["mode"] == mode]
        for i, (name, v) in enumerate(rows):
            if v["lds"] is None:
                why = "below noise floor" if v.get("below_noise_floor") else "skipped"
                ax.text(0.02, i, why, va="center", fontsize=8, color="grey")
                continue
            color = "0.6" if name == "noise_floor" else ("tab:orange" if name == "single_stage" else "tab:blue")
            plots.interval_bar(ax, i, v["lds"], v.get("interval"), color, 0.8, f"{v['lds']:.2f}")
            ax.plot(v["per_test_point"], [i] * len(v["per_test_point"]), "k.", ms=3)
        ax.set_yticks(range(len(rows)), [name for name, _ in rows])
        ax.invert_yaxis()
        ax.axvline(0, color="k", lw=0.6)
        ax.set_xlim(-1, 1.1)
        ax.set_xlabel("LDS (Spearman, predicted vs retrained test loss)")
        ax.set_title(f"embedding {mode}", fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(r: dict[str, Any]) -> str:
    p = r["protocol"]
    lines = [
        f"LDS over {p['num_subsets']} subsets keeping {p['kept_per_subset']} of {p['num_pretrain']} pretraining "
        f"examples ({p['protocol']} retraining, {len(p['test_indices'])} test points; "
        f"{p['retrained_this_run']} stage retrainings this run, {p['seconds'] / 60:.1f} min), "
        "95% bootstrap intervals over subsets and test points:"
    ]
    for key, v in r["variants"].items():
        if v.get("skipped"):
            lines.append(f"  {key:<24} skipped ({v['skipped']})")
        elif v.get("below_noise_floor"):
            lines.append(f"  {key:<24} ground truth below its noise floor ({v['unresolved_lds']:+.3f} unresolved)")
        else:
            i = v["interval"]
            damping = v.get("damping") or {}
            chosen = ", ".join(f"{stage} {d['value']:.3g} ({d['rule']})" for stage, d in damping.items())
            seconds = f", {v['seconds']:.0f}s" if "seconds" in v else ""
            lines.append(
                f"  {key:<24} {v['lds']:+.3f} [{i['low']:+.3f}, {i['high']:+.3f}]"
                + (f"  damping {chosen}" if chosen else "")
                + seconds
            )
    return "\n".join(lines)
