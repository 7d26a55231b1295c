"""Bootstrap intervals: right where the answer is known, seeded, and honest about their inputs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from lissa_influence.confidence import Interval, bootstrap, correlation, correlation_interval, lds_interval
from lissa_influence.experiments.lds import lds


def test_correlation_matches_scipy_per_column():
    g = np.random.default_rng(0)
    p, a = g.normal(size=(30, 4)), g.normal(size=(30, 4))
    a[:, 0] += 3 * p[:, 0]
    a[5, 1] = a[6, 1]  # a tie, which Spearman ranks as scipy does
    for j in range(4):
        assert correlation(p, a, "pearson")[j] == pytest.approx(stats.pearsonr(p[:, j], a[:, j])[0], abs=1e-12)
        assert correlation(p, a, "spearman")[j] == pytest.approx(stats.spearmanr(p[:, j], a[:, j])[0], abs=1e-12)
    assert float(correlation(p[:, 0], a[:, 0])) == pytest.approx(stats.pearsonr(p[:, 0], a[:, 0])[0], abs=1e-12)
    assert np.isnan(correlation(np.ones(5), np.arange(5.0)))  # constant: undefined, not 0
    with pytest.raises(ValueError, match="same shape"):
        correlation(np.ones(3), np.ones(4))


def test_interval_covers_the_true_correlation_and_shrinks_with_more_removals():
    rho = 0.6
    cov = [[1, rho], [rho, 1]]
    covered, widths = 0, {}
    for n in (40, 400):
        for seed in range(40 if n == 40 else 5):
            x = np.random.default_rng(seed).multivariate_normal([0, 0], cov, size=n)
            ci = correlation_interval(x[:, 0], x[:, 1], "pearson", resamples=400, seed=seed)
            assert ci.low <= ci.estimate <= ci.high and ci.level == 0.95 and ci.resamples == 400
            covered += n == 40 and ci.low <= rho <= ci.high
            widths.setdefault(n, []).append(ci.high - ci.low)
    assert covered >= 34  # nominal 95% of 40; the percentile bootstrap is a little narrow at n = 40
    assert np.mean(widths[400]) < 0.4 * np.mean(widths[40])  # ~ 1/sqrt(n)


def test_interval_says_when_nothing_is_resolved():
    g = np.random.default_rng(1)
    noise = correlation_interval(g.normal(size=8), g.normal(size=8))
    assert not noise.excludes(0.0)  # 8 independent pairs: an interval that contains 0
    exact = correlation_interval(np.arange(10.0), 2 * np.arange(10.0) + 1)
    assert (exact.estimate, exact.low, exact.high) == pytest.approx((1.0, 1.0, 1.0))
    assert exact.excludes(0.0)
    assert str(exact) == "1.000 [1.000, 1.000]"
    # seeded: the same inputs, the same interval
    assert correlation_interval(np.arange(6.0), [0, 2, 1, 3, 5, 4.0], seed=3) == correlation_interval(
        np.arange(6.0), [0, 2, 1, 3, 5, 4.0], seed=3
    )


def test_lds_interval_is_around_the_lds_and_resamples_subsets_and_test_points():
    g = np.random.default_rng(2)
    actual = g.normal(size=(50, 6))
    predicted = actual + g.normal(size=(50, 6)) * np.array([0.1, 0.3, 1.0, 3.0, 10.0, 30.0])
    ci = lds_interval(predicted, actual, resamples=300)
    assert ci.estimate == pytest.approx(np.mean(lds(predicted, actual)), abs=1e-12)
    assert ci.low < ci.estimate < ci.high
    # the test points differ a lot here: resampling them widens the interval beyond the subsets' alone
    subsets_only = bootstrap(
        lambda rows: float(np.mean(correlation(predicted[rows], actual[rows], "spearman"))), 50, 300
    )
    assert ci.high - ci.low > subsets_only.high - subsets_only.low
    one_point = lds_interval(predicted[:, :1], actual[:, :1], resamples=300)
    assert one_point.estimate == pytest.approx(lds(predicted[:, :1], actual[:, :1])[0])
    with pytest.raises(ValueError, match="at least 3 subsets"):
        lds_interval(predicted[:2], actual[:2])
    with pytest.raises(ValueError, match=r"\[subsets, test points\]"):
        lds_interval(predicted[:, 0], actual[:, 0])


def test_bootstrap_rejects_what_it_cannot_resample():
    with pytest.raises(ValueError, match="at least 2 units"):
        bootstrap(lambda i: 0.0, 1)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        bootstrap(lambda i: 0.0, 5, level=1.0)
    nan = bootstrap(lambda i: float("nan"), 5, resamples=10)
    assert nan.resamples == 0 and np.isnan(nan.low)
    assert isinstance(nan, Interval)
