"""lissa_influence.objective: matrix-free products equal dense Hessians (float64, rel. err <= 1e-10),
and the task contract of an Objective."""

import pytest
import torch

from lissa_influence.batching import Batch
from lissa_influence.curvature import CurvatureOperator
from lissa_influence.objective import Objective, cross_entropy
from lissa_influence.params import make_block, named_params, prefix_matcher
from lissa_influence.task import Task

from conftest import TinyCNN, TinyMLP, dense_hessian, make_data, rel


@pytest.mark.parametrize("arch,shape", [(TinyCNN, (1, 6, 6)), (TinyMLP, (5,))])
@pytest.mark.parametrize("subset", ["all", "head", "embedding"])
def test_hvp_matches_dense_hessian(arch, shape, subset):
    torch.manual_seed(0)
    model = arch().double()
    batch = make_data(50, shape, 3, seed=1)
    params = named_params(model)
    block = make_block(params, (lambda n: True) if subset == "all" else prefix_matcher(subset))
    # chunk_size 16 < 50 examples: the chunked sum must equal the whole-batch Hessian
    obj = Objective(model, cross_entropy, params, batch, chunk_size=16)
    H = dense_hessian(model, params, block, batch)
    v = torch.randn(3, block.numel, dtype=torch.float64)
    op = CurvatureOperator(obj, block, damping=0.3)
    assert rel(op(v[0]), H @ v[0] + 0.3 * v[0]) <= 1e-10
    assert rel(op(v), v @ H.T + 0.3 * v) <= 1e-10  # stacked right-hand sides
    assert op.num_products == 4


@pytest.mark.parametrize("subset", ["all", "head"])
def test_retained_graph_hvp_matches_dense_hessian(subset):
    torch.manual_seed(0)
    model = TinyCNN().double()
    batch = make_data(50, (1, 6, 6), 3, seed=1)
    params = named_params(model)
    block = make_block(params, (lambda n: True) if subset == "all" else prefix_matcher(subset))
    obj = Objective(model, cross_entropy, params, batch, chunk_size=16, hvp_mode="retained")
    H = dense_hessian(model, params, block, batch)
    v = torch.randn(3, block.numel, dtype=torch.float64)
    assert rel(obj.hvp(block, v[0]), H @ v[0]) <= 1e-10
    assert rel(obj.hvp(block, v), v @ H.T) <= 1e-10
    graphs = obj._graphs[tuple(block.names)]
    assert graphs is not None and len(graphs) == 4  # 50 examples in chunks of 16, built once
    assert obj.graph_bytes > 0
    obj.hvp(block, v[0])
    assert obj._graphs[tuple(block.names)] is graphs  # reused, not rebuilt


def test_retained_graphs_over_budget_fall_back_to_functional(caplog):
    torch.manual_seed(0)
    model = TinyMLP().double()
    batch = make_data(30, (5,), 3, seed=1)
    params = named_params(model)
    block = make_block(params, lambda n: True)
    H = dense_hessian(model, params, block, batch)
    v = torch.randn(block.numel, dtype=torch.float64)
    tight = Objective(model, cross_entropy, params, batch, chunk_size=8, hvp_mode="retained", graph_budget=0)
    with caplog.at_level("INFO", logger="lissa_influence.objective"):
        assert rel(tight.hvp(block, v), H @ v) <= 1e-10
    assert tight._graphs[tuple(block.names)] is None and "exceed graph_budget=0" in caplog.text

    with pytest.raises(ValueError, match="hvp_mode must be"):
        Objective(model, cross_entropy, params, batch, hvp_mode="kept")


def test_mixed_block_matches_dense_hessian(cnn64):
    batch = make_data(40, (1, 6, 6), 3, seed=2)
    params = named_params(cnn64)
    W = make_block(params, prefix_matcher("embedding"))
    T = make_block(params, prefix_matcher("head"))
    obj = Objective(cnn64, cross_entropy, params, batch, chunk_size=7)
    H = dense_hessian(cnn64, params, W + T, batch)
    H_WT = H[: W.numel, W.numel :]
    v = torch.randn(T.numel, dtype=torch.float64)
    assert rel(obj.mixed_vp(W, T, v), H_WT @ v) <= 1e-10
    V = torch.randn(2, T.numel, dtype=torch.float64)
    assert rel(obj.mixed_vp(W, T, V), V @ H_WT.T) <= 1e-10


def test_an_objective_built_from_a_task_is_the_objective_of_its_loss_and_forward(mlp64):
    batch = make_data(12, (5,), 3, seed=4)
    params = named_params(mlp64)
    block = make_block(params, lambda n: True)
    forward = lambda m, b: m(b[0])  # noqa: E731 (the pair as the batch, read by a custom forward)
    loss = lambda out, b: cross_entropy(out, b[1])  # noqa: E731
    task = Task(loss, forward)
    by_task = Objective.from_task(mlp64, task, params, batch, chunk_size=5)
    by_keywords = Objective(mlp64, cross_entropy, params, batch, chunk_size=5)
    assert by_task.task == task and by_task.chunk_size == 5
    v = torch.randn(block.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert rel(by_task.hvp(block, v), by_keywords.hvp(block, v)) <= 1e-12
    assert torch.equal(by_task.outputs(batch), mlp64(batch.x))
    assert float(by_task.value()) == pytest.approx(float(task.mean_loss(mlp64, params, batch)), rel=1e-12)


def test_the_dense_gauss_newton_matrix_matches_its_products(mlp64):
    batch = make_data(17, (5,), 3, seed=5)
    params = named_params(mlp64)
    block = make_block(params, prefix_matcher("head"))
    objective = Objective(mlp64, cross_entropy, params, batch, chunk_size=4)
    G = objective.gauss_newton_matrix(block, max_outputs=12)  # several chunks
    eye = torch.eye(block.numel, dtype=torch.float64)
    assert rel(G, objective.ggn_vp(block, eye)) <= 1e-10
    with pytest.raises(MemoryError, match="3 outputs per example"):
        objective.gauss_newton_matrix(block, max_outputs=2)
    empty = Objective(mlp64, cross_entropy, params, Batch(batch.x[:0], batch.y[:0]))
    assert torch.equal(empty.gauss_newton_matrix(block), torch.zeros(block.numel, block.numel, dtype=torch.float64))
