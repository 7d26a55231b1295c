"""Solvers against a dense solve on a damped Hessian of a small trained model."""

import tracemalloc
import warnings

import pytest
import torch

from lissa_influence import CG, EKFAC, ExactInverse, Explicit, Identity, LiSSA, LowRank, SolveInfo, Solver
from lissa_influence.curvature import CurvatureOperator, Objective, cross_entropy
from lissa_influence.operators import aslinearoperator
from lissa_influence.params import make_block, named_params
from lissa_influence.solvers import (
    ApproximateSolver,
    DivergenceError,
    NegativeCurvatureError,
    SolverWarning,
    is_approximate,
)
from lissa_influence.solvers.base import open_solve

from conftest import TinyCNN, TinyMLP, make_data, rel, train_full_batch


@pytest.fixture(scope="module")
def damped_operator():
    torch.manual_seed(0)
    model = TinyCNN().double()
    batch = make_data(120, (1, 6, 6), 3, seed=4)
    # weight decay: random labels have no finite minimiser without it, and the weights that
    # L-BFGS then runs off to (norm ~1e5, tanh saturated) differ from one CPU's rounding to another's
    train_full_batch(model, batch, steps=500, weight_decay=1e-3)
    params = named_params(model)
    block = make_block(params, lambda n: True)
    return CurvatureOperator(Objective(model, cross_entropy, params, batch, chunk_size=64), block, damping=1e-2)


@pytest.fixture(scope="module")
def dense(damped_operator):
    return Explicit().matrix(damped_operator, damped_operator.size, torch.zeros(1, dtype=torch.float64))


@pytest.fixture(scope="module")
def lissa_operator(damped_operator):
    """The same Hessian, damped enough (condition number ~20) for LiSSA to converge in a few hundred steps."""
    return CurvatureOperator(damped_operator.objective, damped_operator.block, damping=0.3)


@pytest.fixture(scope="module")
def lissa_dense(lissa_operator):
    return Explicit().matrix(lissa_operator, lissa_operator.size, torch.zeros(1, dtype=torch.float64))


def rhs(op, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, op.size, generator=g, dtype=torch.float64)


def test_explicit_matches_linalg_solve(damped_operator, dense):
    b = rhs(damped_operator, 2)
    x, info = Explicit().solve(damped_operator, b)
    assert rel(x, torch.linalg.solve(dense, b.T).T) <= 1e-10
    assert info.extra["method"] == "cholesky" and info.residuals[-1] < 1e-10


def test_cg_matches_explicit_and_batches(damped_operator, dense):
    b = rhs(damped_operator, 4)
    exact = torch.linalg.solve(dense, b.T).T
    x, info = CG(tol=1e-10, max_iter=2000, block=False).solve(damped_operator, b)
    assert info.converged
    assert rel(x, exact) <= 1e-6
    one_at_a_time = torch.stack([CG(tol=1e-10, max_iter=2000).solve(damped_operator, row)[0] for row in b])
    assert rel(x, one_at_a_time) <= 1e-8
    assert info.num_products <= 4 * (info.iterations + 1)  # + a product a row checking the true residual


def test_block_cg_matches_explicit_in_fewer_products(damped_operator, dense):
    b = rhs(damped_operator, 6)
    exact = torch.linalg.solve(dense, b.T).T
    seen, callback = record()
    x, info = CG(tol=1e-10, max_iter=2000, block=True).solve(damped_operator, b, callback=callback)
    _, rows = CG(tol=1e-10, max_iter=2000, block=False).solve(damped_operator, b)
    assert info.converged and info.extra["block"] and not rows.extra["block"] and rel(x, exact) <= 1e-7
    true_residual = (x @ dense - b).norm(dim=1) / b.norm(dim=1)
    assert float(true_residual.max()) <= 1e-8  # the recurrence's residual is not fooling itself
    assert info.num_products < rows.num_products and len(seen) == info.iterations and torch.equal(seen[-1][0], x)
    # at a looser tolerance the recurrence alone converges: its iterations plus one checking product per row
    _, loose = CG(tol=1e-6, max_iter=2000, block=True).solve(damped_operator, b)
    assert loose.converged and "block_stopped" not in loose.extra
    assert loose.num_products == 6 * (loose.iterations + 1)


def test_block_cg_handles_dependent_and_zero_right_hand_sides(damped_operator, dense):
    b = rhs(damped_operator, 2)
    b = torch.cat([b, 3 * b[:1], torch.zeros(1, damped_operator.size, dtype=torch.float64)])
    x, info = CG(tol=1e-10, max_iter=2000, block=True).solve(damped_operator, b)
    assert info.converged and rel(x, torch.linalg.solve(dense, b.T).T) <= 1e-7
    assert torch.equal(x[3], torch.zeros_like(x[3]))


def test_block_cg_hands_over_to_row_cg_when_it_stops_early(damped_operator):
    b = rhs(damped_operator, 3).float()
    op = lambda v: damped_operator(v.double()).float()  # noqa: E731  (a float32 solve)
    rows_x, rows = CG(tol=1e-5, max_iter=500, block=False).solve(op, b)
    # stall_iters=0 stops the block recurrence at once: row CG then does all the work from X = 0
    x, info = CG(tol=1e-5, max_iter=500, block=True, stall_iters=0).solve(op, b)
    assert info.converged and info.extra["block_stopped"].startswith("no progress")
    assert torch.equal(x, rows_x) and info.num_products == rows.num_products + 3  # + the residual check
    with pytest.warns(SolverWarning, match="did not reach"):  # the budget is shared: max_iter in all
        _, capped = CG(tol=1e-12, max_iter=5, block=True).solve(damped_operator, rhs(damped_operator, 3))
    assert capped.iterations == 5 and capped.extra["block_stopped"] == "max_iter"


def test_block_cg_reports_negative_curvature():
    a = torch.diag(torch.tensor([3.0, 1.0, -2.0], dtype=torch.float64))
    b = torch.eye(3, dtype=torch.float64)[:2] + 1.0
    with pytest.raises(NegativeCurvatureError, match="damping.*Gauss-Newton"):
        CG(block=True).solve(a, b)
    with pytest.raises(NegativeCurvatureError):  # and with a (split) preconditioner
        CG(block=True, preconditioner=torch.ones(3, dtype=torch.float64)).solve(a, b)


def test_cg_jacobi_preconditioner_converges(damped_operator, dense):
    b = rhs(damped_operator, 1)[0]
    x, info = CG(tol=1e-10, max_iter=2000, preconditioner=torch.diagonal(dense)).solve(damped_operator, b)
    assert info.converged and rel(x, torch.linalg.solve(dense, b)) <= 1e-6
    x2, info2 = CG(tol=1e-10, max_iter=2000, preconditioner="jacobi").solve(damped_operator, b)
    assert info2.converged and rel(x2, torch.linalg.solve(dense, b)) <= 1e-6


@pytest.mark.parametrize("block", [True, False])
@pytest.mark.parametrize("preconditioner", ["jacobi", "nystrom", "ekfac", "kfac"])
def test_preconditioned_cg_reaches_the_dense_solution_in_fewer_products(damped_operator, dense, preconditioner, block):
    b = rhs(damped_operator, 4)
    exact = torch.linalg.solve(dense, b.T).T
    plain_x, plain = CG(tol=1e-10, max_iter=2000, block=block).solve(damped_operator, b)
    x, info = CG(tol=1e-10, max_iter=2000, block=block, preconditioner=preconditioner, rank=20).solve(
        damped_operator, b
    )
    assert info.converged and rel(x, exact) <= 1e-8 and rel(plain_x, exact) <= 1e-8
    assert info.extra["preconditioner"] == preconditioner and info.extra["block"] == block


@pytest.mark.parametrize("block", [True, False])
def test_nystrom_cuts_the_products_of_an_ill_conditioned_solve(block):
    # a top-heavy spectrum, where a sketch of the top is what CG needs: 20 eigenvalues spread
    # over 1..1e4 above 49 clustered in 0.01..0.02 (a trained model's Hessian need not be so:
    # docs/benchmarks.md measures when Nyström pays)
    g = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(69, 69, generator=g, dtype=torch.float64))[0]
    evals = torch.cat(
        [torch.logspace(0, 4, 20, dtype=torch.float64), torch.linspace(0.01, 0.02, 49, dtype=torch.float64)]
    )
    op = aslinearoperator(q @ torch.diag(evals) @ q.T, torch.zeros(69, dtype=torch.float64))
    b = torch.randn(4, 69, generator=g, dtype=torch.float64)
    _, plain = CG(tol=1e-10, max_iter=2000, block=block).solve(op, b)
    _, info = CG(tol=1e-10, max_iter=2000, block=block, preconditioner="nystrom", rank=20).solve(op, b)
    assert info.converged and info.extra["preconditioner_products"] == 20
    assert info.num_products < 0.7 * plain.num_products, (info.num_products, plain.num_products)
    # the sketch is kept on the operator: a second solve does not pay for it again
    _, again = CG(tol=1e-10, max_iter=2000, block=block, preconditioner="nystrom", rank=20).solve(op, b)
    assert again.num_products == info.num_products - 20


def test_nystrom_removes_the_top_of_the_spectrum():
    from lissa_influence.solvers.preconditioners import Nystrom

    g = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))[0]
    evals = torch.cat([torch.tensor([100.0, 50.0, 10.0], dtype=torch.float64), torch.full((27,), 0.1)])
    a = q @ torch.diag(evals) @ q.T
    pc = Nystrom(aslinearoperator(a, a), rank=6, seed=0, like=a)
    assert pc.products == 6
    # M^{-1} A maps the sketched top eigenvalues near λ_r: condition number 1000 -> below 2
    ev = torch.linalg.eigvals(pc.apply(a)).real
    assert float(ev.max() / ev.min()) < 2
    assert (
        rel(
            pc.apply_sqrt(pc.apply_sqrt(torch.eye(30, dtype=torch.float64))),
            pc.apply(torch.eye(30, dtype=torch.float64)),
        )
        < 1e-12
    )


def test_kronecker_preconditioner_needs_a_model_backed_operator():
    a = torch.eye(3, dtype=torch.float64)
    with pytest.raises(TypeError, match="needs the model behind the operator"):
        CG(preconditioner="ekfac").solve(a, torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown preconditioner 'nystroem'"):
        CG(preconditioner="nystroem")


def test_cg_not_converged_is_reported(damped_operator):
    with pytest.warns(SolverWarning, match="did not reach"):
        _, info = CG(tol=1e-12, max_iter=3).solve(damped_operator, rhs(damped_operator, 1)[0])
    assert not info.converged and info.iterations == 3


def test_cg_reports_negative_curvature():
    a = torch.diag(torch.tensor([3.0, 1.0, -2.0], dtype=torch.float64))
    b = torch.ones(3, dtype=torch.float64)
    with pytest.raises(NegativeCurvatureError, match="damping.*Gauss-Newton"):
        CG().solve(a, b)
    with pytest.warns(SolverWarning, match="negative curvature"):
        _, info = CG(on_negative_curvature="warn").solve(a, b)
    assert not info.converged and info.extra["negative_curvature_rows"] == [0]


def test_lissa_auto_scale_matches_explicit(lissa_operator, lissa_dense):
    b = rhs(lissa_operator, 2)
    exact = torch.linalg.solve(lissa_dense, b.T).T
    x, info = LiSSA(scale="auto", depth=2000, tol=1e-7).solve(lissa_operator, b)
    assert info.converged
    assert rel(x, exact) <= 1e-2
    assert info.extra["top_eigenvalue"] == pytest.approx(float(torch.linalg.eigvalsh(lissa_dense)[-1]), rel=0.05)


def test_lissa_own_damping_is_d_times_scale():
    a = torch.diag(torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64))
    b = torch.ones(3, dtype=torch.float64)
    x, info = LiSSA(scale=4.0, damping=0.1, depth=5000, tol=1e-14).solve(a, b)
    assert torch.allclose(x, b / (torch.diagonal(a) + 0.4), rtol=1e-10)
    assert info.extra["effective_damping"] == pytest.approx(0.4)


def test_lissa_too_small_scale_raises_with_advice(lissa_operator, lissa_dense):
    top = float(torch.linalg.eigvalsh(lissa_dense)[-1])
    with pytest.raises(DivergenceError, match=r"scale ≥") as err:
        LiSSA(scale=top / 4, depth=500).solve(lissa_operator, rhs(lissa_operator, 1)[0])
    assert "top eigenvalue" in str(err.value)


def test_lissa_minibatch_recursion_is_seeded_and_close(lissa_operator, lissa_dense):
    b = rhs(lissa_operator, 1)[0]
    exact = torch.linalg.solve(lissa_dense, b)
    solver = LiSSA(scale="auto", safety=2.0, depth=300, repeats=3, batch_size=60, seed=3)
    x1, info = solver.solve(lissa_operator, b)
    x2, _ = solver.solve(lissa_operator, b)
    assert torch.equal(x1, x2)  # same seed, same minibatches
    # the auto scale's power iterations on 5 minibatches, the minibatch products, and one full
    # product to measure the residual
    assert info.extra["stochastic"] and info.num_products == 5 * 50 + 3 * 300 + 1
    assert not info.converged and 0 < info.extra["relative_residual"] < 0.3  # a stochastic run vouches for no tol
    assert rel(x1, exact) <= 0.3  # a noisy estimate of the same solution


def record():
    seen: list[tuple[torch.Tensor, int]] = []
    return seen, lambda x, n: seen.append((x.clone(), n))


def test_cg_callback_sees_every_iterate(damped_operator, dense):
    b = rhs(damped_operator, 2)
    exact = torch.linalg.solve(dense, b.T).T
    seen, callback = record()
    x, info = CG(tol=1e-10, max_iter=2000, block=False).solve(damped_operator, b, callback=callback)
    assert len(seen) == info.iterations and seen[-1][1] == info.num_products
    assert torch.equal(seen[-1][0], x)
    counts = [n for _, n in seen]
    assert counts == sorted(counts) and counts[0] == 2  # one stacked product of both rows
    errors = [rel(xi, exact) for xi, _ in seen]
    # CG's error norm falls monotonically (Hestenes & Stiefel); allow rounding at the end
    assert all(e2 <= e1 * (1 + 1e-6) + 1e-12 for e1, e2 in zip(errors, errors[1:], strict=False))
    assert errors[0] > 1e4 * errors[-1]


def test_lissa_callback_reports_the_running_average(lissa_operator):
    b = rhs(lissa_operator, 1)[0]
    seen, callback = record()
    with pytest.warns(SolverWarning, match="stopped at depth 40"):
        x, info = LiSSA(scale="auto", depth=40, tol=0.0).solve(lissa_operator, b, callback=callback)
    assert [n for _, n in seen] == list(range(51, 91))  # after 50 power-iteration products
    assert torch.equal(seen[-1][0], x) and seen[-1][0].shape == b.shape
    seen, callback = record()
    x, info = LiSSA(scale="auto", depth=20, repeats=3, batch_size=60, seed=1).solve(
        lissa_operator, b, callback=callback
    )
    assert len(seen) == 60 and seen[-1][1] + 1 == info.num_products  # + the full product of the residual check
    assert torch.allclose(seen[-1][0], x, rtol=1e-12, atol=0)  # the average of the three recursions


def test_direct_solvers_call_back_once(damped_operator):
    b = rhs(damped_operator, 1)[0]
    for solver in (Explicit(), Identity()):
        seen, callback = record()
        x, info = solver.solve(damped_operator, b, callback=callback)
        assert len(seen) == 1 and torch.equal(seen[0][0], x) and seen[0][1] == info.num_products


def test_lissa_memory_is_flat_over_depth():
    # Cheap operator (an MLP on 10 examples): only memory growth over depth matters here.
    model = TinyMLP().double()
    params = named_params(model)
    op = CurvatureOperator(
        Objective(model, cross_entropy, params, make_data(10, (5,), 3, seed=0)),
        make_block(params, lambda n: True),
        damping=1.0,
    )
    b = rhs(op, 1)[0]

    def peak(depth):
        tracemalloc.start()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SolverWarning)
            LiSSA(scale=20.0, depth=depth, tol=0.0).solve(op, b)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    peak(10), peak(1000)  # warm up torch's caches (some fill only on a long run); then measure
    small, large = peak(100), peak(1000)
    assert large < 1.5 * small + 100_000, (small, large)


def test_identity_and_shapes():
    b = torch.randn(2, 5, dtype=torch.float64)
    x, info = Identity().solve(lambda v: v, b)
    assert torch.equal(x, b) and x is not b and info.num_products == 0
    with pytest.raises(ValueError, match=r"\[P\] or \[k, P\]"):
        CG().solve(torch.eye(5), torch.zeros(1, 2, 5))
    with pytest.raises(FloatingPointError):
        CG().solve(torch.eye(2), torch.tensor([1.0, float("nan")]))


def test_explicit_refuses_large_models():
    with pytest.raises(MemoryError, match="CG or LiSSA"):
        Explicit(max_params=10).solve(lambda v: v, torch.ones(11))


def test_plain_callable_and_dense_matrix_are_operators():
    a = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64)
    x1, _ = CG(tol=1e-12).solve(lambda v: a @ v, b)
    x2, _ = CG(tol=1e-12).solve(a, b)
    assert torch.allclose(x1, torch.linalg.solve(a, b.T).T) and torch.allclose(x1, x2)


def test_explicit_methods_and_an_indefinite_matrix():
    g = torch.Generator().manual_seed(3)
    m = torch.randn(6, 6, generator=g, dtype=torch.float64)
    spd, b = m @ m.T + torch.eye(6, dtype=torch.float64), torch.randn(2, 6, generator=g, dtype=torch.float64)
    exact = torch.linalg.solve(spd, b.T).T
    for method in ("auto", "cholesky", "eigh", "lu"):
        x, info = Explicit(method=method).solve(spd, b)
        assert rel(x, exact) <= 1e-12 and info.num_products == 0  # a dense matrix costs no product
    assert Explicit(method="eigh").solve(spd, b)[1].extra["min_eigenvalue"] > 0
    indefinite = spd - 20 * torch.eye(6, dtype=torch.float64)
    with pytest.raises(NegativeCurvatureError, match="not positive definite"):
        Explicit(method="cholesky").solve(indefinite, b)
    with pytest.warns(SolverWarning, match="solving with LU"):
        x, info = Explicit().solve(indefinite, b)
    assert info.extra["method"] == "lu" and rel(x, torch.linalg.solve(indefinite, b.T).T) <= 1e-10
    with pytest.raises(ValueError, match="unknown method 'qr'"):
        Explicit(method="qr")  # type: ignore[arg-type]  # refused at construction


def near_float64_limit():
    """``U Uᵀ/32 + 1e-8 I`` with ``U`` 400 × 32: condition number ~1e9, where a float64 LU
    solve's own relative residual is ~3e-7, so tol=1e-12 cannot be reached by any solver."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(400, 32, generator=g, dtype=torch.float64)
    a = u @ u.T / 32 + 1e-8 * torch.eye(400, dtype=torch.float64)
    return a, torch.randn(16, 400, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("block", [False, True])
def test_cg_stagnating_at_the_attainable_accuracy_says_so_in_both_modes(block):
    a, b = near_float64_limit()
    with pytest.warns(SolverWarning, match="attainable accuracy") as caught:
        x, info = CG(tol=1e-12, max_iter=5000, block=block).solve(a, b)
    true = (b - x @ a).norm(dim=1) / b.norm(dim=1)
    # the verdict rests on the true residual, not the recurrence's (which falls far below it); at
    # this level b − Ax is itself rounding, and another order of summation changes it by ~2x
    assert not info.converged and float(true.max()) > 1e-9
    assert 0.5 < info.residuals[-1] / float(true.max()) < 2
    assert all(0.5 < r / t < 2 for r, t in zip(info.extra["relative_residuals"], true.tolist(), strict=True))
    assert info.iterations < 1000  # it stopped when progress stalled, not at max_iter
    message = str(caught[0].message)
    assert f"{info.residuals[-1]:.3g}" in message and "raise max_iter" not in message
    # a residual measured against a recurrence's claim far below the attainable accuracy is no growth
    assert info.extra["residual_growth"] < 1e6


@pytest.mark.parametrize("block", [False, True])
def test_cg_cut_short_by_max_iter_still_says_raise_max_iter(block):
    a, b = near_float64_limit()
    with pytest.warns(SolverWarning, match="raise max_iter") as caught:
        x, info = CG(tol=1e-12, max_iter=5, block=block).solve(a, b)
    assert "attainable" not in str(caught[0].message) and info.iterations == 5
    true = (b - x @ a).norm(dim=1) / b.norm(dim=1)
    assert info.residuals[-1] == pytest.approx(float(true.max()), rel=1e-6)


def test_split_preconditioned_block_cg_keeps_its_norm_apart_from_the_residuals():
    g = torch.Generator().manual_seed(1)
    q = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64))[0]
    s = torch.logspace(0, 2, 60, dtype=torch.float64)
    a = s[:, None] * (q @ torch.diag(torch.linspace(1, 20, 60, dtype=torch.float64)) @ q.T) * s[None, :]
    b = torch.randn(3, 60, generator=g, dtype=torch.float64)
    seen, callback = record()
    x, info = CG(tol=1e-10, max_iter=500, preconditioner=torch.diagonal(a)).solve(a, b, callback=callback)
    assert info.converged and "block_stopped" not in info.extra

    def true(z):
        return float(((b - z @ a).norm(dim=1) / b.norm(dim=1)).max())

    # `residuals`: ‖b − Ax‖/‖b‖ only (x = 0, then the check of the block iterate); the block
    # recurrence's ‖M^{-1/2} r‖/‖M^{-1/2} b‖, one per block iteration and x = 0, in its own field
    assert info.residuals == pytest.approx([1.0, true(x)], rel=1e-6)
    split = info.extra["split_residuals"]
    assert len(split) == info.iterations + 1 == len(seen) + 1 and split[-1] <= 1e-10
    assert any(abs(s - true(z)) > 0.5 * true(z) for s, (z, _) in zip(split[1:], seen, strict=True))  # another norm


# -- the Solver contract: the operator argument A (once matvec), the opening steps, approximate -----
@pytest.mark.parametrize("solver", [CG(tol=1e-12), LiSSA(depth=400, tol=1e-12), Explicit(), Identity()])
def test_solve_takes_A_and_its_old_name_matvec_with_a_deprecation_warning(solver):
    A = torch.diag(torch.tensor([1.0, 1.5, 2.0], dtype=torch.float64))
    b = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    x, _ = solver.solve(A=A, b=b)
    with pytest.warns(DeprecationWarning, match=r"solve\(matvec=...\) is deprecated"):
        old, _ = solver.solve(matvec=A, b=b)
    assert torch.equal(x, old)
    with pytest.raises(TypeError, match="both A and matvec"):
        solver.solve(A, b, matvec=A)


def test_every_built_in_solver_declares_whether_it_is_approximate():
    exact = [CG(), LiSSA(), Explicit(), ExactInverse()]
    approximate = [Identity(), EKFAC(), LowRank()]
    assert all(isinstance(s, ApproximateSolver) and not is_approximate(s) for s in exact)
    assert all(is_approximate(s) for s in approximate)

    class Plain:  # a user's solver that declares nothing is an exact one
        def solve(self, A, b, callback=None):
            return b, SolveInfo("plain", True, 0, 0, 0.0)

    assert isinstance(Plain(), Solver) and not isinstance(Plain(), ApproximateSolver) and not is_approximate(Plain())


def test_the_opening_steps_of_a_solve():
    opening = open_solve(torch.eye(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    assert opening.single and opening.B.shape == (1, 3) and opening.op.shape == (3, 3)
    assert opening.shaped(opening.B).shape == (3,)
    stacked = open_solve(lambda v: 2 * v, torch.ones(2, 3))
    assert not stacked.single and torch.equal(stacked.op(torch.ones(3)), torch.full((3,), 2.0))
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        open_solve(torch.eye(2), torch.tensor([1.0, float("nan")]))
    with pytest.raises(TypeError, match="floating"):
        open_solve(torch.eye(2), torch.tensor([1, 2]))
