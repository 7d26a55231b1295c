"""The single-stage linear datamodeling score on dattri's MNIST-10 benchmark (``experiment=mnist5k_single_lds``).

``analysis.name=single_lds`` (docs/benchmarks.md, "Single-stage LDS"):

1. The task of :mod:`.mnist10`: ``single_lds.train_size`` / ``test_size`` images of the
   bundled digits, dattri's ``lr`` or ``mlp`` (``single_lds.arch``) and its SGD recipe.
2. Ground truth as dattri builds it: ``single_lds.num_subsets`` seeded subsets, each
   keeping ``single_lds.fraction`` of the training set, each trained once from scratch
   (seed ``single_lds.seed + 1000 + i``), and the test loss of every test image under
   each. ``single_lds.noise_floor`` retrains every subset under a second seed: the LDS of
   one retraining against the other is what seed noise leaves to predict.
3. Scores of the single-stage :class:`~lissa_influence.Influence` for every method of
   ``single_lds.methods`` (solver names, the ``solver.*`` settings otherwise) at every
   damping of ``single_lds.dampings`` (numbers, ``auto``: calibrated on
   ``calibration.budget`` subsets of its own drawn with ``calibration.seed``, measured on
   the first ``single_lds.calibration_points`` test points, or ``heuristic``), averaged
   over ``single_lds.ensemble`` independently trained models
   (each on a seeded ``single_lds.ensemble_fraction`` of the training set; 1: the
   full-data model alone). dattri's own methods (``single_lds.peers``) run on the same
   model, data and ground truth.
4. LDS per test point: Spearman, across subsets, between the summed scores of the kept
   examples and the retrained test loss (dattri's ``metric.lds``; in this package's sign a
   harmful example has a positive score, so the two rise together); the figure is the
   mean over the first ``test_points`` test images, with a bootstrap interval over
   subsets and test points together (:func:`~lissa_influence.confidence.lds_interval`).

Trained models and retrained losses are cached under ``cache_dir/single_lds/`` by every
setting they depend on, written as each finishes: a rerun, another method or damping
retrains nothing, and a killed run resumes.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from .. import confidence
from ..damping import DampingCalibration, check_damping
from ..influence import Influence
from ..progress import progress_bar
from . import config, mnist10, peers, plots
from .data import tensor_digest
from .lds import subsets
from .pipeline import versions
from .retraining import removed
from .training import atomic_save, settings_key

log = logging.getLogger(__name__)
CACHE_VERSION = 1


@dataclass(frozen=True)
class Task:
    """What a trained model of the benchmark depends on: the split, the arch and the recipe."""

    arch: str
    recipe: mnist10.Recipe
    split: mnist10.Split

    @cached_property  # digests of the split, taken once
    def key(self) -> dict[str, Any]:
        return {
            "single_lds": CACHE_VERSION,
            "arch": self.arch,
            "train": tensor_digest(*self.split.train),
            "test": tensor_digest(*self.split.test),
        }


class ModelCache:
    """Trained networks and retrained test losses, cached by what they depend on.

    Args:
        task: the benchmark task.
        folder: the cache folder (``cache_dir/single_lds``).
    """

    def __init__(self, task: Task, folder: Path):
        self.task, self.folder = task, folder
        self.trained = 0  # networks trained (not loaded) by this process
        self.train_seconds = 0.0

    def _path(self, kind: str, keep: torch.Tensor | None, seed: int, recipe: mnist10.Recipe) -> tuple[Path, dict]:
        settings = {**self.task.key, "recipe": asdict(recipe), "kind": kind, "seed": seed}
        if keep is not None:
            settings["kept"] = tensor_digest(keep)
        return self.folder / f"{kind}_{settings_key(settings)}.pt", settings

    def _train(self, keep: torch.Tensor | None, seed: int, recipe: mnist10.Recipe) -> nn.Module:
        x, y = self.task.split.train
        if keep is not None:
            x, y = x[keep], y[keep]
        t0 = time.perf_counter()
        net = mnist10.train(self.task.arch, x, y, recipe, seed)
        self.train_seconds += time.perf_counter() - t0
        self.trained += 1
        return net

    def model(self, keep: torch.Tensor | None, seed: int, epochs: int | None = None) -> nn.Module:
        """A network trained on the kept training images (all when ``keep`` is None), for
        ``epochs`` epochs of the recipe (None: the recipe's own)."""
        recipe = self.task.recipe if epochs is None else replace(self.task.recipe, epochs=epochs)
        path, settings = self._path("model", keep, seed, recipe)
        net = mnist10.build(self.task.arch, seed, recipe.dropout)
        if path.is_file():
            net.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
            return net
        net = self._train(keep, seed, recipe)
        atomic_save(path, {"state_dict": net.state_dict(), "settings": json.dumps(settings, default=str)})
        return net

    def losses(self, keep: torch.Tensor, seed: int) -> np.ndarray:
        """``[n_test]``: every test image's loss after retraining on the kept images."""
        path, settings = self._path("losses", keep, seed, self.task.recipe)
        if path.is_file():
            return np.asarray(torch.load(path, weights_only=True)["losses"].numpy())
        net = self._train(keep, seed, self.task.recipe)
        losses = mnist10.test_losses(net, *self.task.split.test)
        atomic_save(path, {"losses": losses, "settings": json.dumps(settings, default=str)})
        return np.asarray(losses.numpy())


def retrained_losses(cache: ModelCache, kept: list[torch.Tensor], seed: int, what: str, show: bool) -> np.ndarray:
    """``[M, n_test]``: the test losses of one training per subset (subset ``i`` under seed ``seed + i``)."""
    rows = []
    with progress_bar(len(kept), what, show) as bar:
        for i, keep in enumerate(kept):
            rows.append(cache.losses(keep, seed + i))
            bar.update()
    return np.stack(rows)


def summed_scores(scores: np.ndarray, kept: list[torch.Tensor]) -> np.ndarray:
    """``[M, T]``: per subset, the sum of each test point's scores over the kept examples."""
    mask = np.zeros((len(kept), scores.shape[1]))
    for i, keep in enumerate(kept):
        mask[i, keep.numpy()] = 1.0
    return mask @ scores.T


# --- our scores -------------------------------------------------------------------------


def ensemble_models(cfg: Any, cache: ModelCache) -> list[nn.Module]:
    """The ``single_lds.ensemble`` models scores are averaged over: model ``e`` trained
    with seed ``e`` on a seeded ``ensemble_fraction`` of the training set, for
    ``fit_epochs`` epochs of the recipe (the fit point; the ground truth keeps the recipe's)."""
    c = cfg.single_lds
    m = len(cache.task.split.x_train)
    models = []
    for e in range(c.ensemble):
        keep = None
        if c.ensemble_fraction < 1:
            gen = torch.Generator().manual_seed(10_000 + e)
            keep = torch.sort(torch.randperm(m, generator=gen)[: round(c.ensemble_fraction * m)]).values
        models.append(cache.model(keep, seed=e, epochs=c.fit_epochs))
    return models


def influence_scores(
    cfg: Any,
    method: str,
    damping: Any,
    models: list[nn.Module],
    task: Task,
    test: tuple[torch.Tensor, torch.Tensor],
    calibration: DampingCalibration | None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """``[T, n_train]`` scores of one method at one damping, averaged over ``models``.

    A damping by rule is resolved on the first model (``auto``: calibrated on the
    calibration subsets) and that value is used for the others.
    """
    solver_cfg = OmegaConf.merge(cfg.solver, {"name": method})
    total: np.ndarray | None = None
    info: dict[str, Any] = {}
    value = config.damping_value(damping)
    for i, net in enumerate(models):
        inf = Influence(
            net,
            solver=config.build_solver(solver_cfg),
            damping=value,
            hessian_samples=cfg.single_lds.hessian_samples,
            calibration=calibration if value == "auto" else None,
            heuristic_fraction=cfg.calibration.heuristic_fraction,
            gauss_newton=bool(cfg.gauss_newton),
            dtype=torch.float64,
            batch_size=cfg.batch_size,
            hvp_mode=cfg.hvp,
            query_chunk=cfg.query_chunk,
        ).fit(task.split.train)
        scores = inf.scores(test).numpy()
        total = scores if total is None else total + scores
        if i == 0:
            info = {"damping": inf.damping, "damping_rule": inf.damping_report, "solve": inf.diagnostics.get("solve")}
            value = inf.damping  # the resolved number, for the other members
    assert total is not None
    return total / len(models), info


def calibration_truth(cfg: Any, cache: ModelCache, test: tuple[torch.Tensor, torch.Tensor]) -> DampingCalibration:
    """``calibration.budget`` subsets of their own (``calibration.seed``), retrained: what ``auto`` is chosen by."""
    c, m = cfg.single_lds, len(cache.task.split.x_train)
    kept = subsets(m, cfg.calibration.budget, c.fraction, cfg.calibration.seed)
    seed = cfg.calibration.seed * 100_000 + 1000
    losses = retrained_losses(cache, kept, seed, "calibration subsets", cfg.progress)[:, : len(test[0])]
    return DampingCalibration(
        test_data=test,
        removals=[removed(m, keep).tolist() for keep in kept],
        actual=losses,
        grid=list(cfg.calibration.grid),
        metric="spearman",
    )


# --- the run ------------------------------------------------------------------------------


def check(cfg: Any) -> None:
    c = cfg.single_lds
    if c.arch not in mnist10.ARCHS:
        raise ValueError(f"single_lds.arch={c.arch!r} is not one of {mnist10.ARCHS}")
    if c.num_subsets < 3:
        raise ValueError(f"single_lds.num_subsets={c.num_subsets} must be >= 3 (a Spearman correlation over subsets)")
    if not 0 < c.fraction < 1:
        raise ValueError(f"single_lds.fraction={c.fraction} must lie strictly between 0 and 1")
    if c.ensemble < 1:
        raise ValueError(f"single_lds.ensemble={c.ensemble} must be >= 1 (models the scores are averaged over)")
    if c.calibration_points < 1:
        raise ValueError(f"single_lds.calibration_points={c.calibration_points} must be >= 1")
    if c.fit_epochs is not None and c.fit_epochs < 1:
        raise ValueError(f"single_lds.fit_epochs={c.fit_epochs} must be >= 1 or null (the recipe's epochs)")
    if not 0 < c.ensemble_fraction <= 1:
        raise ValueError(f"single_lds.ensemble_fraction={c.ensemble_fraction} must lie in (0, 1]")
    if not 1 <= cfg.test_points <= c.test_size:
        raise ValueError(f"test_points={cfg.test_points} must lie in 1..single_lds.test_size ({c.test_size})")
    unknown = [mth for mth in c.methods if mth not in config.SOLVERS]
    if unknown:
        raise ValueError(f"single_lds.methods has {unknown}; use solver names: {config.SOLVERS}")
    for d in c.dampings:
        check_damping(f"single_lds.dampings has {d!r}:", config.damping_value(d))
    for name in c.peers:
        peers.check(name)
    if any(str(d) == "auto" for d in c.dampings) and cfg.calibration.seed == c.seed:
        raise ValueError(
            f"calibration.seed={cfg.calibration.seed} equals single_lds.seed: the calibration subsets would be the "
            "evaluated ones; give calibration.seed another value"
        )


def run(cfg: Any, out_dir: str | Path) -> dict[str, Any]:
    """Retrain (or load) the ground truth, score every method and peer, and write
    ``lds.json``, ``lds.csv`` and ``lds.png`` into ``out_dir``."""
    config.check(cfg)
    check(cfg)
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    c = cfg.single_lds
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recipe = mnist10.RECIPES[c.arch]
    task = Task(c.arch, recipe, mnist10.split(c.train_size, c.test_size, c.split_seed))
    cache = ModelCache(task, Path(cfg.cache_dir).expanduser() / "single_lds")
    m = len(task.split.x_train)
    kept = subsets(m, c.num_subsets, c.fraction, c.seed)
    t0 = time.perf_counter()
    actual = retrained_losses(cache, kept, c.seed + 1000, "LDS subsets", cfg.progress)[:, : cfg.test_points]
    gt_seconds = time.perf_counter() - t0
    test = (task.split.x_test[: cfg.test_points], task.split.y_test[: cfg.test_points])
    variants: dict[str, dict[str, Any]] = {}

    def judge(key: str, scores: np.ndarray, extra: dict[str, Any]) -> None:
        predicted = summed_scores(scores, kept)
        interval = confidence.lds_interval(predicted, actual)
        per_point = confidence.correlation(predicted, actual, "spearman")
        variants[key] = {"lds": interval.estimate, "interval": interval.as_dict(), **extra}
        variants[key]["per_test_point"] = [None if np.isnan(v) else float(v) for v in per_point]
        log.info("%s: LDS %s", key, interval)

    if c.noise_floor:
        again = retrained_losses(cache, kept, c.seed + 1_000_000, "noise-floor retraining", cfg.progress)
        interval = confidence.lds_interval(again[:, : cfg.test_points], actual)
        variants["noise_floor"] = {
            "lds": interval.estimate,
            "interval": interval.as_dict(),
            "method": "noise_floor",
            "note": "the same subsets retrained under another seed, as the prediction",
        }
    t0 = time.perf_counter()
    models = ensemble_models(cfg, cache)
    model_seconds = time.perf_counter() - t0
    calibrate = any(str(d) == "auto" for d in c.dampings)
    # agreement on a few test points is enough to rank a grid, and each grid value is a full solve
    points = min(c.calibration_points, cfg.test_points)
    truth = calibration_truth(cfg, cache, (test[0][:points], test[1][:points])) if calibrate else None
    for method in c.methods:
        for damping in c.dampings:
            key = f"{method}@{damping}"
            t0 = time.perf_counter()
            try:
                scores, extra = influence_scores(cfg, method, damping, models, task, test, truth)
            except (ValueError, RuntimeError) as e:  # e.g. Explicit refusing the MLP's 109,386 parameters
                variants[key] = {"method": method, "lds": None, "skipped": f"{type(e).__name__}: {e}"}
                log.warning("%s skipped: %s", key, e)
                continue
            extra.update(method=method, library="lissa_influence", ensemble=len(models))
            extra["seconds"] = time.perf_counter() - t0
            judge(key, scores, extra)
    peer_damping = next((float(d) for d in c.dampings if str(d) not in ("auto", "heuristic")), 1e-2)
    for name in c.peers:
        trak = []
        if name.startswith("trak_"):  # TRAK's models: each trained on a seeded half, as dattri's benchmark has them
            for k in range(int(name[5:])):
                gen = torch.Generator().manual_seed(20_000 + k)
                trak.append(cache.model(torch.sort(torch.randperm(m, generator=gen)[: m // 2]).values, seed=100 + k))
        try:
            scores_t, seconds = peers.dattri_scores(name, models[0], task.split.train, test, peer_damping, trak)
        except (ImportError, RuntimeError, ValueError) as e:
            variants[f"dattri:{name}"] = {"method": name, "lds": None, "skipped": f"{type(e).__name__}: {e}"}
            log.warning("dattri %s skipped: %s", name, e)
            continue
        extra = {"method": name, "library": "dattri", "seconds": seconds}
        if not name.startswith("trak_"):
            extra["damping"] = peer_damping
        judge(f"dattri:{name}", scores_t.numpy(), extra)
    result = {
        "protocol": {
            "benchmark": "dattri MNIST-10 LDS on the bundled 5,000 real digits",
            "arch": c.arch,
            "recipe": asdict(recipe),
            "num_train": m,
            "num_test_scored": cfg.test_points,
            "num_subsets": c.num_subsets,
            "kept_per_subset": len(kept[0]),
            "ensemble": c.ensemble,
            "ensemble_fraction": c.ensemble_fraction,
            "fit_epochs": c.fit_epochs if c.fit_epochs is not None else recipe.epochs,
            "ground_truth_seconds": gt_seconds,
            "model_seconds": model_seconds,
            "trained_this_run": cache.trained,
            "seconds": time.perf_counter() - t_start,
        },
        "variants": variants,
        "config": OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else None,
        "versions": versions(),
    }
    (out / "lds.json").write_text(json.dumps(result, indent=2, default=str))
    write_csv(out / "lds.csv", result)
    plot(out / "lds.png", result, f"single-stage LDS, dattri MNIST-10 {c.arch} on the bundled digits")
    log.info("\n%s", summary(result))
    return result


def write_csv(path: Path, result: dict[str, Any]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["variant", "library", "method", "damping", "ensemble", "lds", "ci_low", "ci_high", "seconds", "note"]
        )
        for key, v in result["variants"].items():
            ci = v.get("interval") or {}
            w.writerow(
                [
                    key,
                    v.get("library", ""),
                    v.get("method", ""),
                    "" if v.get("damping") is None else f"{v['damping']:.3g}",
                    v.get("ensemble", ""),
                    "" if v.get("lds") is None else f"{v['lds']:.4f}",
                    f"{ci['low']:.4f}" if ci else "",
                    f"{ci['high']:.4f}" if ci else "",
                    f"{v['seconds']:.1f}" if "seconds" in v else "",
                    v.get("skipped", v.get("note", "")),
                ]
            )


def plot(path: Path, result: dict[str, Any], title: str) -> None:
    """LDS per variant with its 95% interval; ours blue, dattri's orange, the noise floor grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(result["variants"].items())
    fig, ax = plt.subplots(figsize=(6.5, 0.35 * len(rows) + 1.2))
    for i, (_, v) in enumerate(rows):
        if v["lds"] is None:
            ax.text(0.02, i, "skipped", va="center", fontsize=8, color="grey")
            continue
        color = {"dattri": "tab:orange", "lissa_influence": "tab:blue"}.get(v.get("library", ""), "0.6")
        plots.interval_bar(ax, i, v["lds"], v["interval"], color, 0.85, f"{v['lds']:.3f}")
    ax.set_yticks(range(len(rows)), [key for key, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.6)
    ax.set_xlim(min(-0.05, *(v["lds"] - 0.05 for _, v in rows if v["lds"] is not None)), 1.0)
    ax.set_xlabel("LDS (Spearman over subsets, mean over test points)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(result: dict[str, Any]) -> str:
    p = result["protocol"]
    lines = [
        f"single-stage LDS ({p['arch']}): {p['num_subsets']} subsets keeping {p['kept_per_subset']} of "
        f"{p['num_train']} training images, {p['num_test_scored']} test points, ensemble of {p['ensemble']}; "
        f"{p['trained_this_run']} trainings this run, {p['seconds'] / 60:.1f} min; 95% bootstrap intervals:"
    ]
    for key, v in result["variants"].items():
        if v["lds"] is None:
            lines.append(f"  {key:<24} skipped ({v['skipped']})")
            continue
        i = v["interval"]
        damping = f"  damping {v['damping']:.3g}" if v.get("damping") is not None else ""
        seconds = f", {v['seconds']:.0f}s" if "seconds" in v else ""
        lines.append(f"  {key:<24} {v['lds']:+.3f} [{i['low']:+.3f}, {i['high']:+.3f}]{damping}{seconds}")
    return "\n".join(lines)
