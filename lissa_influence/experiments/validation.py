"""Leave-one-out validation (docs/validation.md; the paper's Figure A).

For K chosen pretraining examples (a third with the largest scores, a third with the
smallest, a third at random): remove the example, retrain pretraining then finetuning
*from the trained weights* for the configured steps, and record the test-loss change
against a control run on the full data with the same steps and seed (so that optimiser
drift cancels). Compare with the prediction ``−I(z)/m``.

The validated query is one scored test point (``validate.test_point``: the highest loss,
a misclassified one, a random one, an index) or their mean; losses and their changes are
float64 whatever the model's type, and changes the arithmetic cannot resolve stop the
run with an error instead of a NaN correlation.
"""

from __future__ import annotations

import json
import logging
import time
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


TEST_POINTS = ("highest_loss", "misclassified", "random", "mean")


class UnresolvedValidationError(RuntimeError):
    """The leave-one-out changes of the test loss are all zero or below its float resolution."""


def test_losses(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per test point: the float64 cross-entropy and whether the prediction is right.

    The logits are cast to float64 before the log-softmax: in float32 a confident
    point's loss rounds to exactly 0.0 (log(1 - 1e-9) = 0), and so do its changes.
    """
    ref = next(model.parameters())
    with torch.no_grad():
        logits = model(x.to(ref)).double()
        y = y.to(ref.device)
        return nnf.cross_entropy(logits, y, reduction="none").cpu(), (logits.argmax(1) == y).cpu()


def test_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The mean float64 test loss over ``x``."""
    return float(test_losses(model, x, y)[0].mean())


def choose_test_point(spec: str | int, losses: torch.Tensor, correct: torch.Tensor, seed: int) -> int | None:
    """The scored test point to validate (``None``: the mean loss of all of them).

    ``highest_loss``: the largest control loss; ``misclassified``: the first scored point
    the finetuned model gets wrong (the scored points are in a seeded random order);
    ``random``: a seeded choice; ``mean``: the mean test loss; an int: that scored point.
    """
    n = len(losses)
    spec = str(spec)
    if spec == "mean":
        return None
    if spec == "highest_loss":
        return int(torch.argmax(losses))
    if spec == "misclassified":
        wrong = torch.nonzero(~correct).squeeze(1)
        if len(wrong) == 0:
            raise ValueError(
                f"validate.test_point=misclassified, but the finetuned model classifies all {n} scored test points "
                "correctly; score more of them (test_points) or use validate.test_point=highest_loss"
            )
        return int(wrong[0])
    if spec == "random":
        return int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)))
    try:
        index = int(spec)
    except ValueError:
        raise ValueError(
            f"validate.test_point={spec!r}: use one of {', '.join(TEST_POINTS)} or the index of a scored test point"
        ) from None
    if not 0 <= index < n:
        raise ValueError(
            f"validate.test_point={index}, but the scored test points are 0..{n - 1} (test_points={n}); "
            "validate.test_point=mean validates their mean loss"
        )
    return index


def check_resolved(actual: np.ndarray, control: float, dtype: torch.dtype) -> None:
    """Refuse a correlation against changes the arithmetic cannot see.

    The logits carry the model's float type, so a change of the loss below about
    ``eps(dtype) * loss`` is rounding, not retraining: zero or at that level everywhere,
    Pearson and Spearman are undefined (NaN) or measure noise.
    """
    resolution = torch.finfo(dtype).eps * abs(control)
    largest = float(np.max(np.abs(actual))) if actual.size else 0.0
    if largest > resolution and np.ptp(actual) > 0:
        return
    raise UnresolvedValidationError(
        f"all {actual.size} leave-one-out changes of the test loss are zero or below its float resolution "
        f"(largest |change| {largest:.3g}; control loss {control:.3g}, resolution {resolution:.3g} in "
        f"{str(dtype).replace('torch.', '')}), so no correlation can be measured. Validate a test point whose "
        "loss is not negligible (validate.test_point=highest_loss or misclassified, with more test_points to "
        "choose from), retrain further (validate.pretrain_steps / finetune_steps, or validate.polish_iters "
        "with weight decay equal to the damping), or train in float64 (model.dtype=float64)"
    )


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
    start = time.perf_counter()
    losses, correct = test_losses(finetuned, x, y)
    point = None if scores.shape[0] == 1 else choose_test_point(v.test_point, losses, correct, v.seed)
    if point is None:
        row = scores.mean(0)  # by linearity, the scores of the mean test loss
        query = f"mean of the {len(losses)} scored test points"
    else:
        row = scores[point]
        query = f"test point {point} (loss {float(losses[point]):.3g}, {'right' if correct[point] else 'wrong'})"
    m = len(data.pretrain_train)
    dtype = next(pretrained.parameters()).dtype
    pre_cfg, ft_cfg = retrain_settings(cfg)

    def retrained_losses(removed: int | None) -> torch.Tensor:
        weights = None if removed is None else leave_out(m, removed, dtype=dtype)
        pre, _ = pretrain(pretrained, data, pre_cfg, weights=weights, progress=cfg.progress)
        ft, _ = finetune(finetuned, data, ft_cfg, cfg.mode, cfg.alpha, embedding_state(pre), progress=cfg.progress)
        return test_losses(ft, x, y)[0]  # every scored point: the changes of the others are kept too

    control_all = retrained_losses(None)
    control_seconds = time.perf_counter() - start
    chosen = choose_examples(row, v.num_examples, v.seed)
    changes = []  # float64 [example, scored point]
    with progress_bar(len(chosen), "leave-one-out", enabled=cfg.progress, unit="example") as bar:
        for z in chosen:
            changes.append((retrained_losses(z) - control_all).numpy())
            partial = [{"index": i, "actual_each": c.tolist()} for i, c in zip(chosen, changes, strict=False)]
            # each retraining takes minutes on real data: an interrupted run keeps what it measured
            (out / "loo.partial.json").write_text(json.dumps({"query": query, "examples": partial}))
            bar.update()
    (out / "loo.partial.json").unlink(missing_ok=True)  # loo.json holds all of it from here on
    changes_arr = np.asarray(changes, dtype=np.float64).reshape(len(chosen), len(losses))
    actual_arr = changes_arr.mean(1) if point is None else changes_arr[:, point]
    control = float(control_all.mean()) if point is None else float(control_all[point])
    predicted = (-row[chosen] / m).double().cpu().numpy()
    result: dict[str, Any] = {
        "query": query,
        "test_point": point,  # index among the scored points; null: their mean
        "num_examples": len(chosen),
        "control_test_loss": control,
        "scored_test_losses": losses.tolist(),  # of the finetuned model, before any retraining
        "retrain": {"pretrain": vars(pre_cfg), "finetune": vars(ft_cfg)},
        "examples": [
            {"index": z, "predicted": float(p), "actual": float(a), "actual_each": c.tolist()}
            for z, p, a, c in zip(chosen, predicted, actual_arr, changes_arr, strict=True)
        ],
    }
    try:
        check_resolved(actual_arr, control, dtype)
    except UnresolvedValidationError as e:
        (out / "loo.json").write_text(json.dumps({**result, "error": str(e)}, indent=2))  # the retrainings are kept
        raise
    pearson = float(stats.pearsonr(predicted, actual_arr)[0])
    spearman = float(stats.spearmanr(predicted, actual_arr)[0])
    title = f"leave-one-out, embedding {cfg.mode}, solver {cfg.solver.name}\n{query}"
    plots.loo_scatter(out / "loo_scatter.png", predicted, actual_arr, pearson, spearman, title)
    seconds = time.perf_counter() - start
    result.update(
        pearson=pearson,
        spearman=spearman,
        sign_agreement=float(np.mean(np.sign(predicted) == np.sign(actual_arr))),
        seconds={
            "control": control_seconds,
            "per_example": (seconds - control_seconds) / len(chosen),
            "total": seconds,
        },
    )
    (out / "loo.json").write_text(json.dumps(result, indent=2))
    log.info("leave-one-out over %d examples: Pearson %.3f, Spearman %.3f", len(chosen), pearson, spearman)
    return result
