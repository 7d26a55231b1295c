"""lissa_influence.scoring: per-example losses and gradients, test-loss gradients, and the
streamed scores ``sᵀ∇g(z)``, against plain per-example autograd."""

import pytest
import torch
from torch.func import functional_call

from lissa_influence.batching import Batch
from lissa_influence.params import make_block, named_params, prefix_matcher
from lissa_influence.scoring import PerExample, loss_gradients, score_dataset
from lissa_influence.task import Task, cross_entropy

from conftest import make_data, rel


def reference_gradients(model, params, block, batch):
    rows = []
    for i in range(len(batch)):
        flat = block.flatten(params).clone().requires_grad_(True)
        out = functional_call(model, {**params, **block.unflatten(flat)}, (batch.x[i : i + 1],))
        rows.append(torch.autograd.grad(cross_entropy(out, batch.y[i : i + 1]), flat)[0])
    return torch.stack(rows)


@pytest.fixture
def setup(mlp64):
    params = named_params(mlp64)
    return mlp64, params, make_block(params, prefix_matcher("head")), make_data(13, (5,), 3, seed=30)


def test_per_example_gradients_and_losses(setup):
    model, params, block, batch = setup
    per_example = PerExample.from_task(model, Task(), params, block)
    G = per_example.gradients(batch)
    assert G.shape == (13, block.numel) and rel(G, reference_gradients(model, params, block, batch)) <= 1e-12
    losses = per_example.losses(block.flatten(params), batch)
    expected = torch.stack([cross_entropy(model(batch.x[i : i + 1]), batch.y[i : i + 1]) for i in range(13)])
    assert torch.allclose(losses, expected, rtol=1e-12)
    assert per_example.task == Task(cross_entropy, None)


@pytest.mark.parametrize("method", ["jvp", "grad"])
def test_streamed_scores_are_the_directional_derivatives(setup, method):
    model, params, block, batch = setup
    per_example = PerExample(model, cross_entropy, params, block)
    S = torch.randn(2, block.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.TensorDataset(batch.x, batch.y)
    got = score_dataset(per_example, data, S, batch_size=4, method=method, start=2, stop=11)
    assert rel(got, S @ reference_gradients(model, params, block, batch)[2:11].T) <= 1e-12
    assert score_dataset(per_example, data, S, start=5, stop=5).shape == (2, 0)
    with pytest.raises(ValueError, match="unknown scoring method"):
        per_example.directional(batch, S, "hvp")  # type: ignore[arg-type]


def test_test_loss_gradients_one_per_point_or_their_mean(setup):
    model, params, block, batch = setup
    per_example = PerExample(model, cross_entropy, params, block)
    data = torch.utils.data.TensorDataset(batch.x, batch.y)
    g = loss_gradients(per_example, data, batch_size=5, mean=False)
    assert torch.allclose(loss_gradients(per_example, data, batch_size=5, mean=True), g.mean(0, keepdim=True))
    bad = Batch(batch.x.clone(), batch.y)
    bad.x[3] = float("nan")
    with pytest.raises(FloatingPointError, match=r"test points \[3\]"):
        loss_gradients(per_example, torch.utils.data.TensorDataset(bad.x, bad.y), batch_size=5, mean=False)
