"""``pretrain.damping=auto`` / ``finetune.damping=auto`` in the app: the retrained ground truth
the library's calibration (:class:`lissa_influence.damping.DampingCalibration`) chooses by.

The budget (``calibration.budget`` retrainings) is spent with the run's own protocol, on
removals drawn apart from the ones that are validated:

- the main job: leave-one-out of ``budget`` seeded random pretraining examples, retrained
  as ``validate.*`` says (seed-averaged under ``validate.seeds``), judged by Pearson; the
  leave-one-out validation then never removes them;
- the LDS (``analysis.name=lds``): ``budget`` seeded subsets drawn with ``calibration.seed``
  (not the evaluated subsets' ``lds.seed``), judged by the LDS's Spearman.

Every retraining is cached (:mod:`.retraining`), so a second run, or a sweep over solvers,
pays for them once. The agreement at each damping of ``calibration.grid`` and the choice
land in ``metrics.json`` / ``lds.json`` (``damping``) and in ``calibration.png``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from omegaconf import OmegaConf

from .. import distributed
from ..damping import DampingCalibration
from ..estimator import InfluenceEstimator
from . import config, plots
from .data import TwoStageData
from .training import settings_key
from .validation import retrained_losses

log = logging.getLogger(__name__)

STAGES = ("pretrain", "finetune")
CACHE_VERSION = 1  # bump when the calibration changes meaning, so old choices are ignored


def wanted(cfg: Any) -> bool:
    """Whether a stage's damping is ``auto``."""
    return any(str(cfg[stage].damping) == "auto" for stage in STAGES)


def removals(m: int, budget: int, seed: int) -> list[int]:
    """``budget`` distinct seeded pretraining examples for leave-one-out calibration."""
    return torch.randperm(m, generator=torch.Generator().manual_seed(seed))[:budget].tolist()


def excluded(cfg: Any, m: int) -> list[int]:
    """The leave-one-out calibration's removals (none without ``damping=auto``): never validated."""
    return removals(m, cfg.calibration.budget, cfg.calibration.seed) if wanted(cfg) else []


def leave_one_out(
    cfg: Any, data: TwoStageData, pretrained, finetuned, test: tuple[torch.Tensor, torch.Tensor]
) -> DampingCalibration:
    """The main job's calibration: ``calibration.budget`` leave-one-out retrainings (``validate.*``)."""
    chosen = removals(len(data.pretrain_train), cfg.calibration.budget, cfg.calibration.seed)
    changes = retrained_losses(cfg, data, pretrained, finetuned, chosen, test, "damping calibration").changes.mean(0)
    mean = cfg.query == "mean"
    return DampingCalibration(
        test_data=test,
        removals=[[z] for z in chosen],
        actual=changes.mean(1) if mean else changes,
        grid=tuple(cfg.calibration.grid),
        metric="pearson",
        mean=mean,
    )


def _path(cfg: Any, parts: dict[str, Any]) -> Path:
    return Path(cfg.cache_dir).expanduser() / "calibration" / f"{settings_key(parts)}.json"


def cache_parts(cfg: Any, purpose: str, *model_keys: str) -> dict[str, Any]:
    """What a calibrated damping depends on: the scored config (which, with ``damping=auto``,
    includes the retraining and calibration settings), the trained models, and the purpose."""
    return {"version": CACHE_VERSION, "purpose": purpose, "config": config.scored_config(cfg), "models": model_keys}


def load(cfg: Any, parts: dict[str, Any]) -> dict[str, Any] | None:
    """A calibration made before with the same settings and models (its report), or None."""
    path = _path(cfg, parts)
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return cast(dict[str, Any], report)


def save(cfg: Any, parts: dict[str, Any], report: dict[str, Any]) -> None:
    """The report into the cache (atomically), so that a rerun solves the grid no more."""
    path = _path(cfg, parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report))
    os.replace(tmp, path)


def with_dampings(cfg: Any, report: dict[str, Any]) -> Any:
    """``cfg`` with each calibrated stage's damping set to the number chosen."""
    out = copy.deepcopy(cfg)
    for stage, r in report.items():
        if stage in STAGES and r.get("rule") == "auto":
            OmegaConf.update(out, f"{stage}.damping", float(r["value"]), merge=False)
    return out


def calibrated(
    cfg: Any,
    parts: dict[str, Any],
    build: Callable[[Any, DampingCalibration | None], InfluenceEstimator],
    ground_truth: Callable[[], DampingCalibration],
) -> InfluenceEstimator:
    """``build(cfg, ground_truth())`` calibrated, its choice saved under ``parts``; or, when a run
    with the same settings and models chose before, ``build`` at those dampings (no retraining,
    no grid solved)."""
    report = load(cfg, parts)
    if report is not None:
        estimator = build(with_dampings(cfg, report), None)
        estimator.damping_report = report
        return estimator
    estimator = build(cfg, ground_truth())
    if distributed.is_main():
        save(cfg, parts, estimator.damping_report)
    return estimator


def figure(path: Path, report: dict[str, Any], title: str) -> None:
    """Agreement against damping for every calibrated stage (nothing when none was)."""
    curves = {stage: r["calibration"] for stage, r in report.items() if "calibration" in r}
    if curves:
        plots.calibration_curves(path, curves, title)


def summary(report: dict[str, Any]) -> str:
    """One line per stage: how its damping was set."""
    parts = []
    for stage, r in report.items():
        if "calibration" in r:
            c = r["calibration"]
            best = np.nanmax(np.asarray(c["agreement"], dtype=float))
            parts.append(f"{stage} {r['value']:.3g} (auto: {c['metric']} {best:.3f} over {len(c['grid'])} values)")
        elif r["rule"] == "heuristic":
            parts.append(f"{stage} {r['value']:.3g} (heuristic: {r['fraction']:g} x mean eigenvalue)")
        else:
            parts.append(f"{stage} {r['value']:.3g}")
    return "damping: " + ", ".join(parts)
