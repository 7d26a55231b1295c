"""How sure a validation is: bootstrap intervals for agreement with retraining.

Leave-one-out and the linear datamodeling score (docs/validation.md) compare predicted
changes of a test loss with retrained ones over a handful of removals or subsets; with
K = 8 a Pearson of 0.5 is compatible with 0. Every figure therefore comes with a
percentile bootstrap interval: the statistic recomputed on ``resamples`` draws with
replacement of the units it averages over (the removals; for the LDS the subsets and
the test points), seeded so that the same inputs give the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

Correlation = Literal["pearson", "spearman"]


@dataclass(frozen=True)
class Interval:
    """A statistic with its percentile bootstrap interval.

    Args:
        estimate: the statistic on the data as measured.
        low: the lower end of the ``level`` percentile interval over the resamples that define
            it (a resample where the statistic is undefined, e.g. a constant column, is dropped).
        high: its upper end.
        level: the coverage, e.g. 0.95.
        resamples: how many resamples defined the interval.
    """

    estimate: float
    low: float
    high: float
    level: float
    resamples: int

    def excludes(self, value: float) -> bool:
        """Whether ``value`` lies outside the interval (e.g. 0: a correlation that is resolved).

        Args:
            value: the value to test.

        Returns:
            True when ``value < low`` or ``value > high``.
        """
        return not self.low <= value <= self.high

    def as_dict(self) -> dict[str, float]:
        """The interval as plain numbers.

        Returns:
            ``{"estimate", "low", "high", "level", "resamples"}``.
        """
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}]"


def _ranks(a: np.ndarray) -> np.ndarray:
    """Average ranks along axis 0 (ties share their mean rank), as Spearman needs."""
    from scipy import stats

    return np.asarray(stats.rankdata(a, axis=0), dtype=np.float64)


def _pearson_columns(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson per column of ``[n, T]`` arrays; NaN where a column is constant."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    den = np.sqrt((xc**2).sum(0) * (yc**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (xc * yc).sum(0) / np.where(den > 0, den, 1.0), np.nan)


def correlation(predicted: np.ndarray, actual: np.ndarray, kind: Correlation = "pearson") -> np.ndarray:
    """Pearson or Spearman between ``predicted`` and ``actual`` along axis 0, per column.

    Args:
        predicted: ``[n]`` or ``[n, T]``.
        actual: an array of the same shape.
        kind: ``"pearson"`` or ``"spearman"``.

    Returns:
        A float per column (a 0-d array for 1-d inputs); NaN where either side is constant.
    """
    p, a = np.asarray(predicted, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    if p.shape != a.shape:
        raise ValueError(f"predicted {p.shape} and actual {a.shape} must have the same shape")
    if kind not in ("pearson", "spearman"):
        raise ValueError(f"kind={kind!r}: use 'pearson' or 'spearman'")
    flat = p.ndim == 1
    p, a = (p[:, None], a[:, None]) if flat else (p, a)
    if kind == "spearman":
        p, a = _ranks(p), _ranks(a)
    out = _pearson_columns(p, a)
    return out[0] if flat else out


def bootstrap(
    statistic: Callable[[np.ndarray], float],
    n: int,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap of ``statistic(rows)`` over ``n`` units.

    Args:
        statistic: maps an index array (rows drawn with replacement from ``0..n-1``) to
            a float; NaN marks a resample where it is undefined.
        n: the number of units (removals, subsets).
        resamples: bootstrap draws.
        level: coverage of the interval.
        seed: seeds the draws.

    Returns:
        The :class:`Interval` around ``statistic(arange(n))``.
    """
    if n < 2:
        raise ValueError(f"a bootstrap needs at least 2 units, got {n}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level}")
    gen = np.random.default_rng(seed)
    values = np.array([statistic(gen.integers(0, n, n)) for _ in range(resamples)], dtype=np.float64)
    values = values[np.isfinite(values)]
    estimate = float(statistic(np.arange(n)))
    if values.size == 0:
        return Interval(estimate, math.nan, math.nan, level, 0)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return Interval(estimate, float(low), float(high), level, int(values.size))


def correlation_interval(
    predicted: np.ndarray,
    actual: np.ndarray,
    kind: Correlation = "pearson",
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Pearson or Spearman of ``[K]`` predicted and actual changes, with an interval from
    resampling the K removals.

    Args:
        predicted: ``[K]``, one entry per removal.
        actual: ``[K]``.
        kind: as :func:`correlation`.
        resamples: as :func:`bootstrap`.
        level: as :func:`bootstrap`.
        seed: as :func:`bootstrap`.

    Returns:
        The :class:`Interval`.
    """
    p, a = np.asarray(predicted, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    if p.ndim != 1 or p.shape != a.shape:
        raise ValueError(f"predicted {p.shape} and actual {a.shape} must be 1-d arrays of one length")
    return bootstrap(lambda i: float(correlation(p[i], a[i], kind)), len(p), resamples, level, seed)


def lds_interval(
    predicted: np.ndarray,
    actual: np.ndarray,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """The linear datamodeling score of ``[M, T]`` predicted and retrained losses (M
    subsets, T test points: the Spearman correlation over subsets, averaged over test
    points), with an interval from resampling subsets and test points together.

    Both are samples: the subsets from the random subsets an LDS could have drawn, the
    test points from the test set; resampling only the test points (the spread usually
    quoted) ignores that the M subsets are a sample too.

    Args:
        predicted: ``[M, T]``.
        actual: ``[M, T]``.
        resamples: as :func:`bootstrap`.
        level: as :func:`bootstrap`.
        seed: as :func:`bootstrap`.

    Returns:
        The :class:`Interval`.
    """
    p, a = np.asarray(predicted, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    if p.ndim != 2 or p.shape != a.shape:
        raise ValueError(f"predicted {p.shape} and actual {a.shape} must be [subsets, test points] arrays")
    m, t = p.shape
    if m < 3:
        raise ValueError(f"an LDS needs at least 3 subsets, got {m}")
    gen = np.random.default_rng(seed + 1)  # the test points' draws, apart from the subsets'

    def score(rows: np.ndarray, cols: np.ndarray) -> float:
        per_point = correlation(p[np.ix_(rows, cols)], a[np.ix_(rows, cols)], "spearman")
        return float(np.nanmean(per_point)) if np.isfinite(per_point).any() else math.nan

    full = np.arange(t)

    def resampled(rows: np.ndarray) -> float:
        cols = np.asarray(gen.integers(0, t, t)) if t > 1 else full
        return score(rows, cols)

    interval = bootstrap(resampled, m, resamples, level, seed)
    return Interval(score(np.arange(m), full), interval.low, interval.high, level, interval.resamples)
