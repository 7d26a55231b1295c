"""How close one answer is to another: errors, score agreement, error traces of solvers.

For comparing solvers against a reference solve (the exact dense solve, or a tight CG)
and scores against reference scores, as the solver-accuracy benchmarks do
(docs/benchmarks.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖x − ref‖_F / ‖ref‖_F`` over all rows.

    Args:
        x: the estimate.
        ref: the reference, of the same shape.

    Returns:
        The relative error (in float64).
    """
    return float(torch.linalg.norm((x - ref).double()) / torch.linalg.norm(ref.double()).clamp_min(1e-300))


def score_agreement(scores: torch.Tensor, ref: torch.Tensor, top_k: int = 10) -> dict[str, float]:
    """Agreement of ``[k, n]`` scores with reference scores.

    Relative error, and per query (then averaged) Pearson, Spearman and the overlap
    fraction of the ``top_k`` examples of largest ``|I|``. A query whose scores are constant
    has no correlation: NaN.

    Args:
        scores: ``[k, n]``.
        ref: ``[k, n]`` reference scores.
        top_k: how many of the largest ``|I|`` to compare.

    Returns:
        ``{"scores_error", "pearson", "spearman", "top{top_k}_overlap"}``.
    """
    from scipy import stats  # imported on use: scipy.stats takes a second to import

    a, b = scores.double().cpu().numpy(), ref.double().cpu().numpy()
    k = min(top_k, a.shape[1])
    pearson, spearman, overlap = [], [], []
    for x, y in zip(a, b, strict=True):
        constant = np.ptp(x) == 0 or np.ptp(y) == 0
        pearson.append(math.nan if constant else float(stats.pearsonr(x, y)[0]))
        spearman.append(math.nan if constant else float(stats.spearmanr(x, y)[0]))
        top_x, top_y = np.argsort(-np.abs(x))[:k], np.argsort(-np.abs(y))[:k]
        overlap.append(len(set(top_x) & set(top_y)) / k)
    return {
        "scores_error": relative_error(scores, ref),
        "pearson": float(np.mean(pearson)),
        "spearman": float(np.mean(spearman)),
        f"top{top_k}_overlap": float(np.mean(overlap)),
    }


@dataclass
class ErrorTrace:
    """A solver ``callback``: after each iteration, the relative error of the iterate
    against each named target, with the products per right-hand side so far.

    ``cost`` turns a product count into full-product equivalents (a minibatch product
    costs its fraction of the sample); ``offsets`` adds the products spent before this
    solve (for end-to-end curves over several solves). ``points[name]`` collects
    ``[products per right-hand side, relative error]`` pairs.

    Args:
        targets: reference solutions by name.
        rows: right-hand sides per solve.
        cost: turns a product count into full-product equivalents.
        offsets: products spent before this solve, by name.
        points: the recorded ``[products, error]`` pairs, by name.
    """

    targets: dict[str, torch.Tensor]
    rows: int
    cost: Callable[[int], float] = float
    offsets: dict[str, float] = field(default_factory=dict)
    points: dict[str, list[list[float]]] = field(default_factory=dict)

    def __call__(self, x: torch.Tensor, num_products: int) -> None:
        x = x if x.dim() == 2 else x[None]
        for name, target in self.targets.items():
            at = self.offsets.get(name, 0.0) + self.cost(num_products) / self.rows
            self.points.setdefault(name, []).append([at, relative_error(x, target)])
