"""lissa_influence.sample: the seeded Hessian sample and the parameters an estimator takes."""

import pytest
import torch
from torch import nn

from lissa_influence.sample import hessian_sample, rank_world, trainable_params
from lissa_influence.task import Task

from conftest import TinyMLP, make_data


def test_the_sample_is_seeded_checked_and_clamped():
    torch.manual_seed(0)
    model = TinyMLP().double()
    params = trainable_params(model, None, "model")
    data = make_data(30, (5,), 3, seed=50)
    dataset = torch.utils.data.TensorDataset(data.x, data.y)
    a = hessian_sample(dataset, 10, 3, params, "training", True, Task(), model)
    b = hessian_sample(dataset, 10, 3, params, "training", True, Task(), model)
    assert set(a) == {"batch"} and len(a["batch"]) == 10 and torch.equal(a["batch"].x, b["batch"].x)
    assert rank_world(True) == (0, 1)
    with pytest.warns(UserWarning, match="hessian_samples=50 exceeds the 30 training examples"):
        assert len(hessian_sample(dataset, 50, 0, params, "training", False, Task())["batch"]) == 30
    with pytest.raises(ValueError, match="hessian_samples must be a positive number"):
        hessian_sample(dataset, 0, 0, params, "training", False, Task())
    wide = torch.utils.data.TensorDataset(torch.randn(5, 7, dtype=torch.float64), data.y[:5])
    with pytest.raises(ValueError, match="the model cannot take its examples"):
        hessian_sample(wide, "all", 0, params, "training", False, Task(), model)


def test_trainable_parameters_are_cast_and_checked():
    model = nn.Linear(3, 2)
    params = trainable_params(model, torch.float64, "model")
    assert set(params) == {"weight", "bias"} and params["weight"].dtype == torch.float64
    model.bias.requires_grad_(False)
    assert set(trainable_params(model, None, "model")) == {"weight"}
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="weight"):
        trainable_params(model, None, "model")
