"""lissa_influence.curvature: the damped curvature operator, its dense matrix and the model-operator contract."""

import pytest
import torch
from torch.func import functional_call, hessian

from lissa_influence import CG, EKFAC, Explicit
from lissa_influence.curvature import CurvatureOperator, Objective, cross_entropy
from lissa_influence.operators import DenseOperator, ModelOperator
from lissa_influence.params import make_block, named_params, prefix_matcher

from conftest import TinyMLP, dense_hessian, make_data, rel


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


def test_a_curvature_operator_keeps_the_model_operator_contract(mlp64):
    batch = make_data(10, (5,), 3, seed=0)
    params = named_params(mlp64)
    op = CurvatureOperator(Objective(mlp64, cross_entropy, params, batch), make_block(params, lambda n: True), 0.1)
    assert isinstance(op, ModelOperator) and not isinstance(DenseOperator(torch.eye(3)), ModelOperator)
    assert op.kronecker("kfac") is op.kronecker("kfac")  # fitted once, cached on the operator
    with pytest.raises(TypeError, match="model-backed operator"):
        EKFAC().solve(torch.eye(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("gauss_newton", [False, True])
def test_the_dense_matrix_is_the_operator_on_either_route(mlp64, gauss_newton):
    batch = make_data(20, (5,), 3, seed=6)
    params = named_params(mlp64)
    head = make_block(params, prefix_matcher("head"))  # linear outputs: the Hessian is the Gauss-Newton matrix
    whole = make_block(params, lambda n: True)
    for block, route in (
        (head, "gauss-newton jacobian"),
        (whole, "gauss-newton jacobian" if gauss_newton else "products"),
    ):
        op = CurvatureOperator(Objective(mlp64, cross_entropy, params, batch, chunk_size=6), block, 0.3, gauss_newton)
        A, how = op.dense()
        assert how.startswith(route)
        eye = torch.eye(block.numel, dtype=torch.float64)
        assert rel(A, Explicit().matrix(op, block.numel, eye)) <= 1e-9


def test_a_functional_copy_takes_the_same_products(mlp64):
    batch = make_data(20, (5,), 3, seed=7)
    params = named_params(mlp64)
    block = make_block(params, lambda n: True)
    retained = CurvatureOperator(Objective(mlp64, cross_entropy, params, batch, hvp_mode="retained"), block, 2.0)
    copy = retained.functional_copy()
    assert copy is not None and copy.objective.hvp_mode == "functional" and copy.damping == 2.0
    v = torch.randn(3, block.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert rel(copy(v), retained(v)) <= 1e-12
    assert CurvatureOperator(retained.objective, block, gauss_newton=True).functional_copy() is None
    assert copy.functional_copy() is None
    x, info = CG(tol=1e-10).solve(copy, v)
    assert info.converged and rel(retained(x), v) <= 1e-8
