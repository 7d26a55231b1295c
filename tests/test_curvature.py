"""Matrix-free products equal dense Hessians (float64, rel. err <= 1e-10)."""

import pytest
import torch
from torch.func import functional_call, hessian

from lissa_influence.curvature import CurvatureOperator, Objective, cross_entropy
from lissa_influence.params import make_block, named_params, prefix_matcher

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
    with caplog.at_level("INFO", logger="lissa_influence.curvature"):
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


def test_gauss_newton_matches_dense_ggn_and_is_psd(mlp64):
    batch = make_data(30, (5,), 3, seed=3)
    params = named_params(mlp64)
    block = make_block(params, lambda n: True)
    theta = block.flatten(params)
    net = lambda f: functional_call(mlp64, block.unflatten(f), (batch.x,))
    J = torch.func.jacrev(net)(theta).reshape(-1, block.numel)  # [n*c, P]
    out = net(theta)
    Hout = hessian(lambda o: cross_entropy(o, batch.y))(out).reshape(J.shape[0], J.shape[0])
    G = J.T @ Hout @ J
    op = CurvatureOperator(Objective(mlp64, cross_entropy, params, batch, chunk_size=8), block, gauss_newton=True)
    v = torch.randn(block.numel, dtype=torch.float64)
    assert rel(op(v), G @ v) <= 1e-10
    assert torch.linalg.eigvalsh(G).min() > -1e-12


def test_float32_follows_model():
    torch.manual_seed(0)
    model = TinyMLP()
    batch = make_data(20, (5,), 3, seed=0, dtype=torch.float32)
    params = named_params(model)
    block = make_block(params, lambda n: True)
    op = CurvatureOperator(Objective(model, cross_entropy, params, batch), block)
    v = torch.randn(block.numel, dtype=torch.float64)
    out = op(v)
    assert out.dtype == torch.float32
    params64 = {k: t.double() for k, t in params.items()}
    batch64 = type(batch)(batch.x.double(), batch.y)
    H = dense_hessian(model.double(), params64, block, batch64)
    assert rel(out.double(), H @ v) <= 1e-5


def test_wrong_vector_size_is_a_clear_error(mlp64):
    batch = make_data(10, (5,), 3, seed=0)
    params = named_params(mlp64)
    op = CurvatureOperator(Objective(mlp64, cross_entropy, params, batch), make_block(params, lambda n: True))
    with pytest.raises(ValueError, match="size"):
        op(torch.zeros(3, dtype=torch.float64))
