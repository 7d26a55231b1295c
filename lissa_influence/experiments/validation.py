"""Leave-one-out validation (docs/validation.md; the paper's Figure A).

For K chosen pretraining examples (a third with the largest scores, a third with the
smallest, a third at random): remove the example, retrain pretraining then finetuning
*from the trained weights* for the configured steps, and record the test-loss change
against a control run on the full data with the same steps and seed (so that optimiser
drift cancels). Compare with the prediction ``−I(z)/m``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch.nn import functional as nnf

from ..progress import progress_bar
from . import config, plots
from .data import TwoStageData
from .models import embedding_state
from .training import TrainConfig, finetune, leave_out, pretrain

log = logging.getLogger(__name__)


def choose_examples(scores: torch.Tensor, k: int, seed: int) -> list[int]:
    """``k`` distinct indices: the most harmful, the most helpful, then random ones."""
    m = scores.numel()
    k = min(k, m)
    third = k // 3
    order = torch.argsort(scores)
    chosen = list(dict.fromkeys(order[-third:].tolist()[::-1] + order[:third].tolist())) if third else []
    rest = [
        i for i in torch.randperm(m, generator=torch.Generator().manual_seed(seed)).tolist() if i not in set(chosen)
    ]
    return chosen + rest[: k - len(chosen)]


def retrain_settings(cfg: Any) -> tuple[TrainConfig, TrainConfig]:
    """The stages' training settings with the validation's step counts and seed."""
    v = cfg.validate
    pre = config.to_frozen(TrainConfig, cfg.pretrain.train)
    ft = config.to_frozen(TrainConfig, cfg.finetune.train)
    common = dict(polish_iters=v.polish_iters, polish_tol=v.polish_tol, seed=v.seed)
    return replace(pre, steps=v.pretrain_steps, **common), replace(ft, steps=v.finetune_steps, **common)


def test_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    ref = next(model.parameters())
    with torch.no_grad():
        return float(nnf.cross_entropy(model(x.to(ref)), y.to(ref.device)))


def run(
    cfg: Any,
    data: TwoStageData,
    pretrained,
    finetuned,
    scores: torch.Tensor,
    test: tuple[torch.Tensor, torch.Tensor],
    out: Path,
) -> dict[str, Any]:
    v = cfg.validate
    x, y = test
    if scores.shape[0] == 1 or v.test_index < 0:
        row = scores.mean(0)  # by linearity, the scores of the mean test loss
        query = "mean of the scored test points"
    else:
        if v.test_index >= scores.shape[0]:
            raise ValueError(f"validate.test_index={v.test_index} but only {scores.shape[0]} test points were scored")
        row = scores[v.test_index]
        x, y = x[v.test_index : v.test_index + 1], y[v.test_index : v.test_index + 1]
        query = f"test point {v.test_index}"
    m = len(data.pretrain_train)
    pre_cfg, ft_cfg = retrain_settings(cfg)

    def retrained_loss(removed: int | None) -> float:
        weights = None if removed is None else leave_out(m, removed, dtype=next(pretrained.parameters()).dtype)
        pre, _ = pretrain(pretrained, data, pre_cfg, weights=weights, progress=cfg.progress)
        ft, _ = finetune(finetuned, data, ft_cfg, cfg.mode, cfg.alpha, embedding_state(pre), progress=cfg.progress)
        return test_loss(ft, x, y)

    control = retrained_loss(None)
    chosen = choose_examples(row, v.num_examples, v.seed)
    actual = []
    with progress_bar(len(chosen), "leave-one-out", enabled=cfg.progress, unit="example") as bar:
        for z in chosen:
            actual.append(retrained_loss(z) - control)
            bar.update()
    predicted = (-row[chosen] / m).double().cpu().numpy()
    actual_arr = np.asarray(actual)
    pearson = float(stats.pearsonr(predicted, actual_arr)[0]) if len(chosen) > 2 else float("nan")
    spearman = float(stats.spearmanr(predicted, actual_arr)[0]) if len(chosen) > 2 else float("nan")
    title = f"leave-one-out, embedding {cfg.mode}, solver {cfg.solver.name}"
    plots.loo_scatter(out / "loo_scatter.png", predicted, actual_arr, pearson, spearman, title)
    result = {
        "query": query,
        "num_examples": len(chosen),
        "pearson": pearson,
        "spearman": spearman,
        "control_test_loss": control,
        "retrain": {"pretrain": vars(pre_cfg), "finetune": vars(ft_cfg)},
        "examples": [
            {"index": z, "predicted": float(p), "actual": float(a)}
            for z, p, a in zip(chosen, predicted, actual, strict=True)
        ],
    }
    (out / "loo.json").write_text(json.dumps(result, indent=2))
    log.info("leave-one-out over %d examples: Pearson %.3f, Spearman %.3f", len(chosen), pearson, spearman)
    return result
