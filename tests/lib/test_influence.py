"""lissa_influence.influence: single-stage influence against the dense formula, and its task."""

import pytest
import torch
from torch.func import functional_call, hessian

from lissa_influence import CG, Explicit, Influence
from lissa_influence.curvature import cross_entropy
from lissa_influence.params import make_block, named_params
from lissa_influence.task import Task

from conftest import TinyCNN, make_data, rel, train_full_batch


def test_single_stage_equals_dense_formula():
    torch.manual_seed(3)
    model = TinyCNN(3, channels=8).double()
    train, test = make_data(70, (1, 6, 6), 3, seed=20, noise=3.0), make_data(3, (1, 6, 6), 3, seed=21, noise=3.0)
    train_full_batch(model, train, steps=200, weight_decay=0.1)
    params = named_params(model)
    block = make_block(params, lambda n: True)
    loss = lambda f, x, y: cross_entropy(functional_call(model, block.unflatten(f), (x,)), y)  # noqa: E731
    theta = block.flatten(params)
    H = hessian(loss)(theta, train.x, train.y) + 0.5 * torch.eye(block.numel, dtype=torch.float64)
    G_test = torch.stack([torch.func.grad(loss)(theta, test.x[j : j + 1], test.y[j : j + 1]) for j in range(3)])
    G_train = torch.stack([torch.func.grad(loss)(theta, train.x[i : i + 1], train.y[i : i + 1]) for i in range(70)])
    expected = -G_test @ torch.linalg.solve(H, G_train.T)
    inf = Influence(model, solver=CG(tol=1e-13, max_iter=5000), damping=0.5, hessian_samples=70).fit((train.x, train.y))
    got = inf.scores((test.x, test.y))
    assert rel(got, expected) <= 1e-8
    assert torch.allclose(inf.removal_effects((test.x, test.y)), -got / 70, rtol=1e-12)
    assert inf.diagnostics["solve"]["converged"]


def test_the_estimator_hands_one_task_to_its_objective_and_scoring():
    torch.manual_seed(4)
    model = TinyCNN(3).double()
    train = make_data(30, (1, 6, 6), 3, seed=22)
    inf = Influence(model, damping=1.0, hessian_samples="all", solver=Explicit()).fit((train.x, train.y))
    assert inf.task == Task(cross_entropy, None)
    assert inf.operator.objective.task == inf.task and inf._scored_losses().task == inf.task


def test_multistage_influence_keeps_its_old_import_path():
    from lissa_influence import MultiStageInfluence
    from lissa_influence.influence import MultiStageInfluence as old

    assert old is MultiStageInfluence
    with pytest.raises(ImportError):
        from lissa_influence.influence import Nothing  # noqa: F401
