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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as nnf

from .. import confidence
from ..progress import progress_bar
from . import plots
from .data import TwoStageData, tensor_digest
from .retraining import Retrainer, retrain_settings, without
from .training import TrainReport

log = logging.getLogger(__name__)


def choose_examples(scores: torch.Tensor, k: int, seed: int, exclude: Sequence[int] = ()) -> list[int]:
    """``k`` distinct indices: the most harmful, the most helpful, then random ones; none of ``exclude``."""
    skip = set(int(i) for i in exclude)
    order = [i for i in torch.argsort(scores).tolist() if i not in skip]
    k = min(k, len(order))
    third = k // 3
    chosen = list(dict.fromkeys(order[len(order) - third :][::-1] + order[:third])) if third else []
    taken = set(chosen) | skip
    rest = [i for i in torch.randperm(scores.numel(), generator=torch.Generator().manual_seed(seed)).tolist()]
    return chosen + [i for i in rest if i not in taken][: k - len(chosen)]


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


def seeds(cfg: Any, retrainer_seed_matters: bool) -> list[int]:
    """The retraining seeds ``validate.seed, +1, ...`` (``validate.seeds`` of them); one
    where the retraining draws nothing at random (full batch, L-BFGS): more would repeat it."""
    v = cfg.validate
    if v.seeds > 1 and not retrainer_seed_matters:
        log.warning(
            "validate.seeds=%d, but the retraining is deterministic (full batch or L-BFGS): one seed is used", v.seeds
        )
        return [v.seed]
    return [v.seed + i for i in range(v.seeds)]


@dataclass(frozen=True)
class Retrained:
    """Leave-one-out retrainings: ``losses`` ``[S, K, T]`` (seed, removal, scored point),
    ``control`` ``[S, T]``, the ``seeds``, every retraining's report, and whether the
    retraining draws anything from its seed (``stochastic``)."""

    losses: np.ndarray
    control: np.ndarray
    seeds: list[int]
    reports: list[TrainReport]
    stochastic: bool

    @property
    def changes(self) -> np.ndarray:
        """``[S, K, T]``: each seed's change against its own control."""
        return self.losses - self.control[:, None, :]


def retrained_losses(
    cfg: Any,
    data: TwoStageData,
    pretrained,
    finetuned,
    removals: list[int],
    test: tuple[torch.Tensor, torch.Tensor],
    label: str = "leave-one-out",
) -> Retrained:
    """Every scored point's float64 test loss after leaving out each example of ``removals``,
    under each retraining seed (``validate.*``), and the control's (nothing left out, same
    seed). Each retrained model is cached under ``cache_dir/loo/`` (a rerun retrains nothing)."""
    x, y = test
    m = len(data.pretrain_train)
    base = (tensor_digest(*pretrained.state_dict().values()), tensor_digest(*finetuned.state_dict().values()))
    first = Retrainer(cfg, data, pretrained, base[0], cfg.validate.seed, "warm", "loo")
    chosen = seeds(cfg, first.seed_matters)
    retrainers = [Retrainer(cfg, data, pretrained, base[0], s, "warm", "loo") for s in chosen]

    def losses_without(r: Retrainer, keep: torch.Tensor) -> np.ndarray:
        pre, pre_key = r.pretrained_on(keep)
        return test_losses(r.finetuned_on(pre, pre_key, finetuned, base[1], cfg.mode), x, y)[0].numpy()

    control = np.stack([losses_without(r, torch.arange(m)) for r in retrainers])
    losses = np.full((len(chosen), len(removals), len(x)), np.nan)
    with progress_bar(len(removals) * len(chosen), label, enabled=cfg.progress, unit="retraining") as bar:
        for k, z in enumerate(removals):
            for i, r in enumerate(retrainers):
                losses[i, k] = losses_without(r, without(m, z))
                bar.update()
    reports = [rep for r in retrainers for rep in r.reports]
    return Retrained(losses, control, chosen, reports, first.seed_matters)


def noise_floor(changes: np.ndarray, point: int | None, seeds_used: list[int], stochastic: bool) -> dict[str, Any]:
    """How much of the measured changes is the retraining's own noise.

    With two or more seeds: the split-half reliability, the Pearson correlation (with its
    bootstrap interval over the removals) between the mean change under the even-numbered
    seeds and under the odd-numbered ones (with an odd count the first half has one seed more;
    the Spearman-Brown step to all seeds assumes equal halves). A ground truth whose reliability interval does
    not lie above 0 is below its noise floor: the seeds do not agree on which removal
    moves the loss which way, so no correlation with a prediction can be read from it.
    """
    per = changes.mean(2) if point is None else changes[:, :, point]  # [S, K]
    if not stochastic:
        return {"kind": "deterministic", "resolved": True, "note": "the retraining draws nothing at random"}
    if len(seeds_used) < 2:
        return {
            "kind": "not measured",
            "resolved": None,
            "note": "one retraining seed (validate.seeds=1): set validate.seeds >= 2 to measure the noise floor",
        }
    a, b = per[0::2].mean(0), per[1::2].mean(0)
    split = confidence.correlation_interval(a, b, "pearson")
    r = split.estimate
    spread = per.std(0, ddof=1)  # per removal, over seeds
    return {
        "kind": "split-half over seeds",
        "split_half": split.as_dict(),
        # the reliability of the mean over all S seeds (Spearman-Brown from the half-and-half one)
        "reliability_all_seeds": float(2 * r / (1 + r)) if r > -1 else float("nan"),
        "median_abs_change": float(np.median(np.abs(per.mean(0)))),
        "median_standard_error": float(np.median(spread / np.sqrt(len(seeds_used)))),
        "resolved": bool(split.low > 0),
    }


def run(
    cfg: Any,
    data: TwoStageData,
    pretrained,
    finetuned,
    scores: torch.Tensor,
    test: tuple[torch.Tensor, torch.Tensor],
    out: Path,
    exclude: Sequence[int] = (),
    baselines: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Leave-one-out of ``validate.num_examples`` examples (none of ``exclude``: the damping
    calibration's removals) against ``scores``, and against each of ``baselines`` (other
    solvers' scores of the same queries) on the same retrainings; writes ``loo.json`` and
    ``loo_scatter.png``."""
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
    chosen = choose_examples(row, v.num_examples, v.seed, exclude)
    retrained = retrained_losses(cfg, data, pretrained, finetuned, chosen, test)
    control_all, seeds_used, reports = retrained.control, retrained.seeds, retrained.reports
    changes_seeds = retrained.changes  # [S, K, T]: each seed against its own control
    changes_arr = changes_seeds.mean(0)  # [K, T]
    actual_arr = changes_arr.mean(1) if point is None else changes_arr[:, point]
    per_seed = changes_seeds.mean(2) if point is None else changes_seeds[:, :, point]  # [S, K]
    control = float(control_all.mean()) if point is None else float(control_all[:, point].mean())
    predicted = (-row[chosen] / m).double().cpu().numpy()
    floor = noise_floor(changes_seeds, point, seeds_used, retrained.stochastic)
    result: dict[str, Any] = {
        "query": query,
        "test_point": point,  # index among the scored points; null: their mean
        "num_examples": len(chosen),
        "seeds": seeds_used,
        "control_test_loss": control,
        "control_test_loss_per_seed": (control_all.mean(1) if point is None else control_all[:, point]).tolist(),
        "scored_test_losses": losses.tolist(),  # of the finetuned model, before any retraining
        "retrain": {"pretrain": vars(pre_cfg), "finetune": vars(ft_cfg)},
        "max_retrain_grad_norm": {
            stage: max(r.grad_norm for r in reports if r.stage == stage) for stage in {r.stage for r in reports}
        },
        "noise_floor": floor,
        "examples": [
            {
                "index": z,
                "predicted": float(p),
                "actual": float(a),
                "actual_per_seed": ps.tolist(),
                "actual_each": c.tolist(),
            }
            for z, p, a, ps, c in zip(chosen, predicted, actual_arr, per_seed.T, changes_arr, strict=True)
        ],
    }
    try:
        check_resolved(actual_arr, control, dtype)
    except UnresolvedValidationError as e:
        (out / "loo.json").write_text(json.dumps({**result, "error": str(e)}, indent=2))  # the retrainings are kept
        raise
    intervals = {kind: confidence.correlation_interval(predicted, actual_arr, kind) for kind in ("pearson", "spearman")}
    sign = float(np.mean(np.sign(predicted) == np.sign(actual_arr)))
    if floor["resolved"] is False:
        # the seeds disagree with each other: a correlation with them would be read as a finding
        result.update(pearson=None, spearman=None, below_noise_floor=True)
        result["unresolved"] = {k: i.as_dict() for k, i in intervals.items()} | {"sign_agreement": sign}
        stats_text = f"ground truth below its noise floor (split-half r = {floor['split_half']['estimate']:.2f})"
    else:
        result.update(
            pearson=intervals["pearson"].estimate,
            spearman=intervals["spearman"].estimate,
            pearson_interval=intervals["pearson"].as_dict(),
            spearman_interval=intervals["spearman"].as_dict(),
            sign_agreement=sign,
            below_noise_floor=False,
        )
        stats_text = f"Pearson {intervals['pearson']}, Spearman {intervals['spearman']} (95% bootstrap)"
    seeds_text = f", mean of {len(seeds_used)} seeds" if len(seeds_used) > 1 else ""
    title = f"leave-one-out, embedding {cfg.mode}, solver {cfg.solver.name}{seeds_text}\n{query}"
    errors = per_seed.std(0, ddof=1) / np.sqrt(len(seeds_used)) if len(seeds_used) > 1 else None
    plots.loo_scatter(out / "loo_scatter.png", predicted, actual_arr, stats_text, title, errors)
    result["baselines"] = {}
    for name, other in (baselines or {}).items():
        other_row = other.mean(0) if point is None else other[point]
        other_pred = (-other_row[chosen] / m).double().cpu().numpy()
        entry: dict[str, Any] = {"predicted": other_pred.tolist()}
        for kind in ("pearson", "spearman"):
            ci = confidence.correlation_interval(other_pred, actual_arr, kind)
            entry[kind] = None if floor["resolved"] is False else ci.estimate
            entry[f"{kind}_interval"] = ci.as_dict()
        result["baselines"][name] = entry
    seconds = time.perf_counter() - start
    retrainings = len(seeds_used) * (len(chosen) + 1)
    result["seconds"] = {"total": seconds, "per_retraining": seconds / retrainings, "retrainings": retrainings}
    (out / "loo.json").write_text(json.dumps(result, indent=2))
    log.info("leave-one-out over %d examples: %s", len(chosen), stats_text)
    return result
