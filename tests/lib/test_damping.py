"""Damping by rule: calibration against retraining recovers a known damping; the heuristic; bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from lissa_influence import CG, DenseOperator, Influence, MultiStageInfluence
from lissa_influence.damping import DampingCalibration, calibrate, heuristic_damping, mean_eigenvalue

from twostage import TwoStage


def squared_error(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((outputs.squeeze(-1) - y) ** 2).mean()


def least_squares(scales: np.ndarray, m: int = 80, t: int = 4, seed: int = 0):
    """Features of very different scales (the Hessian's eigenvalues span four decades),
    the least-squares fit, and ``t`` test points."""
    g = torch.Generator().manual_seed(seed)
    d = len(scales)
    x = torch.randn(m + t, d, generator=g, dtype=torch.float64) * torch.as_tensor(scales)
    y = x @ torch.randn(d, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        m + t, generator=g, dtype=torch.float64
    )
    theta = torch.linalg.lstsq(x[:m], y[:m]).solution
    return x[:m], y[:m], x[m:], y[m:], theta


def test_calibration_recovers_the_proximity_of_a_proximal_retraining():
    # Retraining that stays near the trained weights (Bae et al. 2022's proximal response):
    # argmin (1/m) sum_{i != z} l_i + (lam/2) ||theta - theta_hat||^2, solved exactly. The
    # damped influence at damping lam is its first-order prediction; the calibration must
    # find lam among the grid from ten removals.
    x, y, xt, yt, theta = least_squares(np.logspace(-2, 0.5, 6))
    m, lam = len(y), 1e-1

    def test_losses(th):
        return 0.5 * (xt @ th - yt) ** 2

    actual = []
    removals = [[z] for z in range(0, 40, 4)]
    for (z,) in removals:
        keep = torch.arange(m) != z
        a = x[keep].T @ x[keep] / m + lam * torch.eye(x.shape[1], dtype=torch.float64)
        b = x[keep].T @ y[keep] / m + lam * theta
        actual.append((test_losses(torch.linalg.solve(a, b)) - test_losses(theta)).numpy())
    model = nn.Linear(x.shape[1], 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(theta[None])
    grid = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
    cal = DampingCalibration((xt, yt), removals, np.asarray(actual), grid=grid, metric="pearson")
    inf = Influence(
        model, loss=squared_error, solver=CG(tol=1e-12), damping="auto", calibration=cal, hessian_samples="all"
    ).fit((x, y))
    report = inf.damping_report["influence"]
    assert inf.damping == lam and report["value"] == lam and report["rule"] == "auto"
    agreement = report["calibration"]["agreement"]
    assert agreement[grid.index(lam)] > 0.999
    # a sharp optimum: a decade either side agrees measurably less
    assert agreement[grid.index(1e-2)] < agreement[grid.index(lam)] - 1e-3
    assert agreement[grid.index(1.0)] < agreement[grid.index(lam)] - 1e-3
    assert inf.operator.damping == lam  # the chosen damping is what later solves use
    assert inf.scores((xt, yt)).shape == (len(yt), m)
    assert inf.diagnostics["damping"]["influence"]["value"] == lam


def test_calibration_of_both_stages_finds_the_weight_decay_of_converged_retraining():
    # Both stages trained to machine precision with weight decay 1e-2 (= their damping in the
    # theory) and retrained exactly (Newton) without each removed example: the damped Hessian
    # that predicts this retraining has damping 1e-2 in each stage.
    ts = TwoStage.build("fixed", lam_pre=1e-2, lam_ft=1e-2)
    m = len(ts.pre_data.y)
    removals = [[z] for z in range(0, m, 4)]

    def test_losses(z: int, eps: float) -> np.ndarray:
        wu = ts.retrain_pretrain(ts.wu, z, eps)
        wt = ts.retrain_finetune(wu[: ts.W.numel], ts.wt)
        out = functional_call(ts.ft, (ts.W + ts.T).unflatten(wt), (ts.test.x,))
        return nn.functional.cross_entropy(out, ts.test.y, reduction="none").detach().numpy()

    # removing z is eps = -1/m; its first-order change, by central differences of exact retrainings
    eps = 1e-4
    actual = [-(test_losses(z, eps) - test_losses(z, -eps)) / (2 * eps) / m for (z,) in removals]
    grid = (1e-4, 1e-2, 1.0)
    cal = DampingCalibration((ts.test.x, ts.test.y), removals, np.asarray(actual), grid=grid)
    msi = MultiStageInfluence(
        ts.pre,
        ts.ft,
        mode="fixed",
        solver=CG(tol=1e-12, max_iter=500),
        pretrain_damping="auto",
        finetune_damping="auto",
        calibration=cal,
        hessian_samples="all",
        exact_finetune=False,
    ).fit((ts.pre_data.x, ts.pre_data.y), (ts.ft_data.x, ts.ft_data.y))
    assert (msi.finetune_damping, msi.pretrain_damping) == (1e-2, 1e-2)
    ft, pre = (
        np.nan_to_num(msi.damping_report[s]["calibration"]["agreement"], nan=-1) for s in ("finetune", "pretrain")
    )
    assert ft.argmax() == 1 and pre.argmax() == 1
    # the finetune sweep ran with the pretraining damping still at its heuristic start; with both
    # right, the first-order prediction is exact
    assert pre[1] > 0.9999 and pre[1] - max(pre[0], pre[2]) > 0.01
    assert msi.pre_operator.damping == 1e-2


def test_heuristic_is_a_fraction_of_the_mean_eigenvalue():
    # Rademacher probes give v^T D v = tr(D) exactly for a diagonal D
    d = torch.diag(torch.tensor([1.0, 2.0, 3.0, 10.0], dtype=torch.float64))
    assert mean_eigenvalue(DenseOperator(d), probes=3) == pytest.approx(4.0, rel=1e-14)
    assert heuristic_damping(DenseOperator(d), fraction=0.1) == pytest.approx(0.4, rel=1e-14)
    with pytest.raises(ValueError, match="must be > 0. Give the damping as a number"):
        heuristic_damping(DenseOperator(-d))
    # on a model: the same number as the dense Hessian's trace, to Hutchinson's accuracy
    x, y, *_ = least_squares(np.logspace(-1, 0, 5))
    model = nn.Linear(5, 1, bias=False).double()
    inf = Influence(model, loss=squared_error, damping="heuristic", hessian_samples="all").fit((x, y))
    exact = 0.1 * float(torch.trace(x.T @ x / len(y))) / 5
    assert inf.damping == pytest.approx(exact, rel=0.3)
    assert inf.damping_report["influence"] == {
        "rule": "heuristic",
        "value": inf.damping,
        "heuristic": inf.damping,
        "fraction": 0.1,
    }


def test_bad_calibration_input_says_what_to_change():
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    model = nn.Linear(3, 1).double()
    with pytest.raises(ValueError, match="needs calibration=DampingCalibration.*use 'heuristic'"):
        Influence(model, damping="auto")
    with pytest.raises(ValueError, match="pretrain_damping='automatic': use a number >= 0, 'auto'"):
        MultiStageInfluence(model, model, shared="0", pretrain_damping="automatic")
    with pytest.raises(ValueError, match=r"damping=-1 must be a finite number >= 0"):
        Influence(model, damping=-1)
    with pytest.raises(ValueError, match="grid values must be finite and > 0, got \\[0.0\\]"):
        DampingCalibration((x, y), [[0], [1], [2]], [1.0, 2.0, 3.0], grid=(0.0, 1.0))
    with pytest.raises(ValueError, match="at least 2 values"):
        DampingCalibration((x, y), [[0], [1], [2]], [1.0, 2.0, 3.0], grid=(1.0,))
    with pytest.raises(ValueError, match="at least 3 retrainings.*got 0; with no retraining budget use"):
        DampingCalibration((x, y), [], [])
    with pytest.raises(ValueError, match="actual has 2 rows for 3 removals"):
        DampingCalibration((x, y), [[0], [1], [2]], [1.0, 2.0])
    with pytest.raises(ValueError, match="NaN or inf"):
        DampingCalibration((x, y), [[0], [1], [2]], [1.0, float("nan"), 2.0])
    with pytest.raises(ValueError, match="removal 1 names examples outside 0..9"):
        DampingCalibration((x, y), [[0], [12], [2]], [1.0, 2.0, 3.0]).removal_matrix(10)
    with pytest.raises(TypeError, match="calibration must be a DampingCalibration"):
        Influence(model, damping="auto", calibration={"grid": [1.0]})  # type: ignore[arg-type]
    # constant predictions everywhere: no damping can be chosen, and the error says so
    cal = DampingCalibration((x, y), [[0], [1], [2]], [1.0, 2.0, 3.0], grid=(1.0, 2.0))
    with pytest.raises(ValueError, match="no damping of the grid"):
        calibrate("pretrain", lambda d: np.zeros((1, 10)), cal)
