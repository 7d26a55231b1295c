"""Solvers at the edges (issue 26): LiSSA's automatic scale with minibatches, Explicit's basis
blocks through retained graphs, and the product count of a stochastic LiSSA solve."""

import pytest
import torch
from torch import nn

from lissa_influence import CG, Explicit, LiSSA
from lissa_influence.curvature import CurvatureOperator, Objective, cross_entropy
from lissa_influence.experiments.accuracy import _solve, full_products
from lissa_influence.operators import DenseOperator, LinearOperator
from lissa_influence.params import make_block, named_params
from lissa_influence.solvers import DivergenceError, power_iteration

from conftest import TinyMLP, dense_hessian, make_data, rel

# a stochastic LiSSA run stops at its depth above tol (its noise floor), and says so: expected here
pytestmark = pytest.mark.filterwarnings("ignore:LiSSA stopped at depth")


class LeastSquares(LinearOperator):
    """``X_Bᵀ X_B / |B| + damping·I`` over the rows ``B`` of ``X``: the Hessian of a linear
    least-squares model, which draws minibatches of its rows."""

    def __init__(self, x: torch.Tensor, damping: float):
        self.x, self.damping = x, damping
        self.sample_size = len(x)

    @property
    def shape(self):
        return (self.x.shape[1], self.x.shape[1])

    @property
    def dtype(self):
        return self.x.dtype

    @property
    def device(self):
        return self.x.device

    def matmat(self, V):
        return (V @ self.x.T) @ self.x / len(self.x) + self.damping * V

    def minibatch(self, batch_size, generator):
        return LeastSquares(self.x[torch.randperm(len(self.x), generator=generator)[:batch_size]], self.damping)


def gaussian(n, d, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def top_eigenvalue(op):
    return power_iteration(op, op.shape[0], torch.float64, iters=200, rtol=1e-8)


@pytest.fixture(scope="module")
def logistic():
    """A logistic regression (50 features, 3 classes, 153 parameters) on 1,000 Gaussian
    examples. A minibatch of 10 has fewer examples than features: its top eigenvalue is about
    (1 + √(d/b))² ≈ 10 times the softmax curvature, the full sample's (1 + √(d/n))² ≈ 1.5 times."""
    torch.manual_seed(0)
    model = nn.Linear(50, 3).double()
    params = named_params(model)
    batch = make_data(1000, (50,), 3, seed=5, noise=1.0)
    return CurvatureOperator(Objective(model, cross_entropy, params, batch), make_block(params, lambda n: True), 0.1)


def test_lissa_auto_scale_suits_the_minibatches_it_multiplies_by(logistic):
    b = torch.randn(2, logistic.size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dense = Explicit().matrix(logistic, logistic.size, b)
    exact = torch.linalg.solve(dense, b.T).T
    full_top = float(torch.linalg.eigvalsh(dense)[-1])
    # the premise: the scale that suits the full Hessian (the old scale='auto') diverges on its minibatches
    with pytest.raises(DivergenceError, match="minibatches"):
        LiSSA(scale=1.2 * full_top, batch_size=10, depth=100).solve(logistic, b)
    x, info = LiSSA(batch_size=10, depth=250, repeats=2).solve(logistic, b)
    tops = info.extra["minibatch_top_eigenvalues"]
    assert len(tops) == 5 and info.extra["top_eigenvalue"] == max(tops) > 3 * full_top
    assert info.extra["scale"] == pytest.approx(1.2 * max(tops))
    cg, _ = CG(tol=1e-10).solve(logistic, b)
    assert rel(cg, exact) < 1e-8 and rel(x, exact) < 0.2, rel(x, exact)  # a stochastic estimate of the solution


def test_lissa_auto_scale_on_least_squares_minibatches():
    op = LeastSquares(gaussian(2000, 40), damping=0.5)
    b = gaussian(1, 40, seed=1)[0]
    exact = torch.linalg.solve(op(torch.eye(40, dtype=torch.float64)), b)
    full_top = top_eigenvalue(op)
    with pytest.raises(DivergenceError):
        LiSSA(scale=1.2 * full_top, batch_size=8, depth=500).solve(op, b)
    x, info = LiSSA(batch_size=8, depth=500, repeats=8).solve(op, b)
    assert info.extra["top_eigenvalue"] > 3 * full_top and rel(x, exact) < 0.1, rel(x, exact)


def test_lissa_auto_scale_products_and_generators():
    op = LeastSquares(gaussian(200, 10), damping=1.0)
    b = gaussian(3, 10, seed=2)
    solver = LiSSA(batch_size=20, depth=30, scale_batches=3, power_iters=40, tol=0.0)
    x, info = solver.solve(op, b)
    assert torch.equal(x, solver.solve(op, b)[0])  # seeded: the same minibatches
    # the power iterations of 3 minibatches, then 3 rows per step: all minibatch products; one full check per row
    assert info.extra["minibatch_products"] == 3 * 40 + 30 * 3 and info.num_products == 3 * 40 + 30 * 3 + 3
    g = torch.Generator().manual_seed(solver.seed)  # the scale's minibatches are the recursion's first ones
    expected = [power_iteration(op.minibatch(20, g), 10, torch.float64, iters=40) for _ in range(3)]
    assert info.extra["minibatch_top_eigenvalues"] == pytest.approx(expected, rel=1e-12)
    # a minibatch of the whole sample is the full operator: one power iteration
    _, whole = LiSSA(batch_size=500, depth=30, tol=0.0).solve(op, b)
    assert len(whole.extra["minibatch_top_eigenvalues"]) == 1 and whole.num_products == 50 + 30 * 3 + 3
    # deterministic: the full operator's power iteration, as before
    _, plain = LiSSA(depth=30, tol=0.0).solve(torch.diag(torch.linspace(0.01, 2, 10, dtype=torch.float64)), b)
    assert plain.extra["minibatch_top_eigenvalues"] == [] and plain.extra["minibatch_products"] == 0
    assert plain.num_products == 50 + 30 * 3 + 3
    with pytest.raises(ValueError, match="scale_batches=0"):
        LiSSA(scale_batches=0)


def test_explicit_basis_blocks_through_retained_curvature_rows_vmapped_or_timed():
    model = TinyMLP().double()
    params = named_params(model)
    block = make_block(params, lambda n: True)
    batch = make_data(40, (5,), 3, seed=2)
    reference = dense_hessian(model, params, block, batch) + torch.eye(block.numel, dtype=torch.float64)
    b = torch.randn(2, block.numel, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = torch.linalg.solve(reference, b.T).T
    for how in ("vmap", "rows", "auto"):
        objective = Objective(model, cross_entropy, params, batch, chunk_size=16, hvp_mode="retained")
        op = CurvatureOperator(objective, block, damping=1.0)  # positive definite at the random weights
        x, info = Explicit(block_size=8, basis_products=how).solve(op, b)
        assert rel(Explicit(block_size=8, basis_products=how).matrix(op, op.size, b), reference) <= 1e-10
        assert rel(x, exact) <= 1e-10 and info.num_products == op.size and op.num_products == 2 * op.size
        assert objective.hvp_mode == "retained"  # the operator is left as it was
        if how == "auto":  # a block each way, timed; the faster takes the rest
            seconds = info.extra["seconds_per_row"]
            assert info.extra["basis_products"] == min(seconds, key=seconds.get)
        else:  # vmapped: one pass per block and chunk, so no graphs kept for it
            assert info.extra["basis_products"] == how and (objective.graph_bytes == 0) == (how == "vmap")
    with pytest.raises(ValueError, match="basis_products='batched'"):
        Explicit(basis_products="batched")  # type: ignore[arg-type]


class Sampled(DenseOperator):  # a Hessian sample of 200 examples whose minibatches are the matrix itself
    sample_size = 200

    def minibatch(self, *_):
        return self


def test_accuracy_counts_lissa_residual_check_as_a_full_product():
    op = Sampled(2 * torch.eye(4, dtype=torch.float64))
    b = torch.ones(2, 4, dtype=torch.float64)
    fixed = LiSSA(scale=4.0, batch_size=50, depth=40, tol=0.0)
    _, row = _solve(fixed, op, b, None)
    # per right-hand side: 40 minibatch products at a quarter of the sample each, and one full residual check
    assert row["status"] == "ok" and row["hvps"] == pytest.approx(40 * 0.25 + 1)
    auto = LiSSA(batch_size=50, depth=40, tol=0.0, power_iters=50)
    _, row = _solve(auto, op, b, None)
    # the power iterations of 5 minibatches are minibatch products too, shared by the 2 rows
    assert row["hvps"] == pytest.approx((5 * 50 + 2 * 40) * 0.25 / 2 + 1)
    # a callback's count during the recursion holds minibatch products only
    assert full_products(auto, op, 5 * 50 + 2 * 10) == pytest.approx((5 * 50 + 2 * 10) * 0.25)
    _, row = _solve(LiSSA(depth=40, tol=0.0), op, b, None)  # deterministic: every product full
    assert row["hvps"] == pytest.approx((50 + 2 * 40 + 2) / 2)
