"""Choosing the damping: calibrated against retraining, or a free heuristic.

Damping is a modelling choice, not only a regulariser for the solver (docs/math.md,
"Which damping"): the damped influence ``−(H + λI)⁻¹ ∇ℓ`` predicts the response of a
retraining that stays near the trained weights, and ``λ`` sets how near. The retraining a
user trusts therefore decides it:

- ``damping="auto"`` picks each stage's damping from a log grid by the agreement of the
  predicted changes with a small budget of retrainings the caller measured
  (:class:`DampingCalibration`: leave-one-out removals or LDS subsets, and the test losses
  they retrained to);
- ``damping="heuristic"`` costs no retraining: a fraction of the curvature's mean
  eigenvalue ``tr(H)/P``, estimated by Hutchinson's estimator (Rademacher probes), as
  Kronfluence sets EK-FAC's damping from the mean eigenvalue of its factors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from .confidence import correlation
from .operators import LinearOperator

DampingRule = Literal["auto", "heuristic"]
"""A damping given by rule instead of a number (see the module docstring)."""

Metric = Literal["pearson", "spearman"]

DEFAULT_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def check_damping(name: str, value: Any) -> None:
    """Refuse a damping that is not a finite number >= 0, ``"auto"`` or ``"heuristic"``.

    Args:
        name: its keyword, in the error.
        value: the damping.
    """
    if isinstance(value, str):
        if value not in ("auto", "heuristic"):
            raise ValueError(f"{name}={value!r}: use a number >= 0, 'auto' (calibrated) or 'heuristic'")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}={value!r} must be a finite number >= 0, 'auto' or 'heuristic'")


def check_dampings(dampings: dict[str, Any], calibration: DampingCalibration | None) -> None:
    """Every damping valid; ``"auto"`` only with retrained ground truth to calibrate against.

    Args:
        dampings: the dampings by keyword.
        calibration: the ground truth, or None.
    """
    for name, value in dampings.items():
        check_damping(name, value)
    auto = [name for name, value in dampings.items() if value == "auto"]
    if auto and calibration is None:
        raise ValueError(
            f"{auto[0]}='auto' chooses the damping by agreement with retraining, and needs "
            "calibration=DampingCalibration(test_data, removals, actual) with the losses the removals retrained to; "
            "without a retraining budget use 'heuristic' (a fraction of the mean eigenvalue) or a number"
        )
    if calibration is not None and not isinstance(calibration, DampingCalibration):
        raise TypeError(f"calibration must be a DampingCalibration, got {type(calibration).__name__}")


@dataclass(frozen=True)
class DampingCalibration:
    """Retrained ground truth to choose a damping by (``damping="auto"``).

    Args:
        test_data: the calibration queries: test points whose loss was measured after each
            retraining (any data the estimator's ``query_vectors`` takes).
        removals: one index set per retraining: the scored (pretraining) examples it left
            out; a single index per set is leave-one-out, half the examples an LDS subset.
        actual: ``[R]`` or ``[R, T]``: the retrained test loss (or its change; only
            differences across removals matter) of each query after each removal.
        grid: the damping values tried for each stage, all > 0.
        metric: ``"pearson"`` (leave-one-out) or ``"spearman"`` (the LDS) between the
            predicted and the retrained losses over the removals, averaged over the queries.
        mean: the queries are the mean loss of ``test_data`` (one column of ``actual``).
    """

    test_data: Any
    removals: Sequence[Sequence[int]]
    actual: np.ndarray | Sequence[float] | Sequence[Sequence[float]]
    grid: Sequence[float] = DEFAULT_GRID
    metric: Metric = "pearson"
    mean: bool = False

    def __post_init__(self) -> None:
        if len(self.removals) < 3:
            raise ValueError(
                f"DampingCalibration needs at least 3 retrainings (removals) to measure agreement, got "
                f"{len(self.removals)}; with no retraining budget use damping='heuristic'"
            )
        if any(len(r) == 0 for r in self.removals):
            raise ValueError("every removal of DampingCalibration must leave out at least one example")
        if len(self.grid) < 2:
            raise ValueError(f"the damping grid needs at least 2 values to choose from, got {list(self.grid)}")
        bad = [g for g in self.grid if not (isinstance(g, (int, float)) and math.isfinite(g) and g > 0)]
        if bad:
            raise ValueError(f"damping grid values must be finite and > 0, got {bad}")
        if self.metric not in ("pearson", "spearman"):
            raise ValueError(f"metric={self.metric!r}: use 'pearson' or 'spearman'")
        actual = self.actual_matrix
        if actual.shape[0] != len(self.removals):
            raise ValueError(f"actual has {actual.shape[0]} rows for {len(self.removals)} removals")
        if self.mean and actual.shape[1] != 1:
            raise ValueError(f"mean=True queries the mean test loss: actual needs one column, got {actual.shape[1]}")
        if not np.isfinite(actual).all():
            raise ValueError("actual holds NaN or inf: every retraining must have finished with a finite loss")

    @property
    def actual_matrix(self) -> np.ndarray:
        """``actual`` as ``[R, T]`` float64."""
        a = np.asarray(self.actual, dtype=np.float64)
        return a[:, None] if a.ndim == 1 else a

    def removal_matrix(self, m: int) -> np.ndarray:
        """``[R, m]``: 1 where a removal leaves an example out.

        Args:
            m: the number of scored examples.

        Returns:
            A float array.
        """
        out = np.zeros((len(self.removals), m))
        for r, removal in enumerate(self.removals):
            idx = np.asarray(removal, dtype=np.int64)
            if idx.min() < 0 or idx.max() >= m:
                raise ValueError(f"removal {r} names examples outside 0..{m - 1}")
            out[r, idx] = 1.0
        return out

    def predicted(self, scores: np.ndarray) -> np.ndarray:
        """The changes of the test losses that ``scores`` predict for each removal (docs/math.md).

        Args:
            scores: ``[T, m]`` influence scores.

        Returns:
            ``[R, T]``: ``Σ_{z removed} −I_t(z)/m``.
        """
        m = scores.shape[1]
        return -self.removal_matrix(m) @ scores.T / m

    def agreement(self, scores: np.ndarray) -> float:
        """The metric between predicted and retrained losses over the removals, averaged over queries.

        Args:
            scores: ``[T, m]`` influence scores.

        Returns:
            The mean correlation.
        """
        per_query = np.atleast_1d(correlation(self.predicted(scores), self.actual_matrix, self.metric))
        return float(np.nanmean(per_query)) if np.isfinite(per_query).any() else math.nan


@dataclass(frozen=True)
class CalibrationResult:
    """One stage's calibration: the agreement at each damping of the grid and the choice.

    Args:
        stage: which damping (``pretrain``, ``finetune``, ``influence``).
        grid: the damping values tried.
        agreement: the metric at each (NaN where the solve failed or the scores were constant).
        chosen: the damping of the best agreement.
        metric: ``pearson`` or ``spearman``.
        errors: per grid value that failed, why.
    """

    stage: str
    grid: tuple[float, ...]
    agreement: tuple[float, ...]
    chosen: float
    metric: str
    errors: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The result as plain numbers and lists.

        Returns:
            A JSON-ready dict.
        """
        return {
            "stage": self.stage,
            "grid": list(self.grid),
            "agreement": list(self.agreement),
            "chosen": self.chosen,
            "metric": self.metric,
            "errors": dict(self.errors),
        }


def calibrate(
    stage: str,
    scores_at: Callable[[float], np.ndarray],
    calibration: DampingCalibration,
) -> CalibrationResult:
    """Try every damping of the grid and keep the one whose predictions agree best.

    Args:
        stage: the damping's name, for the result and the errors.
        scores_at: ``damping -> [T, m]`` scores of the calibration queries with that damping.
        calibration: the retrained ground truth and the grid.

    Returns:
        The :class:`CalibrationResult`; ties go to the larger damping (the better
        conditioned solve). A grid value whose solve raises is recorded with its error.

    Raises:
        ValueError: no grid value gave a finite agreement.
    """
    from .solvers import SolverError

    values, errors = [], {}
    for damping in calibration.grid:
        try:
            values.append(calibration.agreement(np.asarray(scores_at(float(damping)), dtype=np.float64)))
        except SolverError as e:  # e.g. negative curvature at a small damping: that value is not a choice
            values.append(math.nan)
            errors[f"{damping:g}"] = f"{type(e).__name__}: {e}"
    finite = [(v, g) for v, g in zip(values, calibration.grid, strict=True) if math.isfinite(v)]
    if not finite:
        raise ValueError(
            f"{stage}_damping='auto': no damping of the grid {list(calibration.grid)} gave a finite agreement "
            f"with the retrained losses ({errors or 'constant predictions or losses'}); check the retrained "
            "losses vary across removals, or widen the grid"
        )
    best = max(finite, key=lambda vg: (vg[0], vg[1]))
    return CalibrationResult(
        stage, tuple(float(g) for g in calibration.grid), tuple(values), best[1], calibration.metric, errors
    )


def mean_eigenvalue(operator: LinearOperator, probes: int = 32, seed: int = 0) -> float:
    """Hutchinson's estimate of ``tr(A)/n``: the mean of ``vᵀAv/n`` over Rademacher probes ``v``.

    Args:
        operator: the (undamped) curvature.
        probes: the number of probe vectors (one stacked product).
        seed: seeds the probes.

    Returns:
        The estimated mean eigenvalue.
    """
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    n = operator.shape[0]
    gen = torch.Generator().manual_seed(seed)
    v = (torch.randint(0, 2, (probes, n), generator=gen) * 2 - 1).to(dtype=operator.dtype, device=operator.device)
    return float((v * operator.matmat(v)).sum(1).mean()) / n


def heuristic_damping(operator: LinearOperator, fraction: float = 0.1, probes: int = 32, seed: int = 0) -> float:
    """``damping="heuristic"``: ``fraction`` of the curvature's mean eigenvalue (Hutchinson).

    Args:
        operator: the undamped curvature of the stage.
        fraction: the share of the mean eigenvalue (Kronfluence uses 0.1 for EK-FAC).
        probes: as :func:`mean_eigenvalue`.
        seed: as :func:`mean_eigenvalue`.

    Returns:
        The damping, > 0.

    Raises:
        ValueError: the estimated mean eigenvalue is not positive (a curvature with as much
            negative as positive mass: give a number, or use gauss_newton=True).
    """
    if not (math.isfinite(fraction) and fraction > 0):
        raise ValueError(f"the heuristic damping's fraction must be finite and > 0, got {fraction}")
    mean = mean_eigenvalue(operator, probes, seed)
    if not (math.isfinite(mean) and mean > 0):
        raise ValueError(
            f"damping='heuristic' takes a fraction of the mean eigenvalue of the curvature, estimated at {mean:.3g}; "
            "it must be > 0. Give the damping as a number, or use the Gauss-Newton curvature (gauss_newton=True)"
        )
    return fraction * mean
