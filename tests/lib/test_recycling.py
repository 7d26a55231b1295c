"""Many queries on one operator: deflated (recycled) CG, the low-rank solver, query chunks,
retained graphs kept between calls (docs/math.md, "Many queries")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lissa_influence import CG, Influence, LowRank, MultiStageInfluence
from lissa_influence.operators import DenseOperator
from lissa_influence.solvers import Subspace
from lissa_influence.solvers.deflation import Harvester, Recording, operator_key, rayleigh_ritz

from conftest import TinyMLP, rel
from hydra_helpers import compose_cfg


def spd_small_end(n: int = 120, seed: int = 0) -> torch.Tensor:
    """A damped-Hessian-like spectrum: a dense small end (40 eigenvalues in 1e-4..1e-3), the
    rest spread over 1e-2..10, so that the small end is what slows CG."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    small = n // 3
    evals = torch.cat(
        [torch.logspace(-4, -3, small, dtype=torch.float64), torch.logspace(-2, 1, n - small, dtype=torch.float64)]
    )
    return (q * evals) @ q.T


def pairs(n: int, seed: int, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def mlp(classes: int = 3, seed: int = 0) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP(classes=classes).double()


def rhs(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(k, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("block", [True, False])
def test_deflated_cg_reaches_the_dense_solution_and_a_reused_subspace_cuts_products(block):
    A = spd_small_end()
    op = DenseOperator(A)  # the subspace is kept on the operator object between solves
    # tol 1e-9: the deflated recurrence attains a residual some orders above float64's (rounding in
    # Π), recovered by refinement passes at a cost; 1e-9 is where a second solve saves the most
    solver = CG(tol=1e-9, max_iter=3000, block=block, deflate=24)
    products = []
    for chunk in range(3):
        B = rhs(120, 4, chunk)
        x, info = solver.solve(op, B)
        assert info.converged
        assert rel(x, torch.linalg.solve(A, B.T).T) < 1e-8
        products.append(info.num_products)
        assert info.extra["deflation"]["used"] == (0 if chunk == 0 else 24)
    # the first solve harvests the subspace at no extra product; the later ones deflate it
    assert products[1] < 0.8 * products[0] and products[2] < 0.8 * products[0], products


def test_harvested_ritz_values_approach_the_smallest_eigenvalues():
    A = spd_small_end()
    op = DenseOperator(A)
    solver = CG(tol=1e-11, max_iter=3000, deflate=8)
    for chunk in range(3):
        solver.solve(op, rhs(120, 4, chunk))
    (subspace,) = op.memo.values()
    evals = torch.linalg.eigvalsh(A)
    assert subspace.size == 8 and subspace.key == operator_key(op, torch.float64)
    # 8 − 8 // 3 = 6 from the small end, 2 from the top
    assert torch.allclose(subspace.values[:5], evals[:5], rtol=1e-2), (subspace.values, evals[:5])
    assert torch.allclose(subspace.values[6:], evals[-2:], rtol=1e-6), (subspace.values, evals[-2:])
    # AW is exactly A W: the subspace is consistent whatever the quality of its vectors
    assert rel(subspace.AW, subspace.W @ A) < 1e-9


def test_rayleigh_ritz_on_dependent_products_keeps_a_basis_of_their_span():
    A = spd_small_end(30)
    V = rhs(30, 10, 1)
    V = torch.cat([V, V[:3] * 2.0])  # dependent rows are dropped, not divided by zero
    W, AW, values = rayleigh_ritz(V, V @ A, 5)
    assert torch.allclose(W @ W.T, torch.eye(5, dtype=torch.float64), atol=1e-10)
    assert rel(AW, W @ A) < 1e-12 and bool((values[1:] >= values[:-1]).all())


def test_a_subspace_of_another_damping_or_operator_is_never_used():
    from lissa_influence.batching import Batch
    from lissa_influence.curvature import CurvatureOperator, Objective
    from lissa_influence.params import make_block, named_params
    from lissa_influence.task import cross_entropy

    model = mlp()
    batch = Batch(*pairs(40, 0))
    params = named_params(model)
    block = make_block(params, lambda n: True)
    op = CurvatureOperator(Objective(model, cross_entropy, params, batch), block, damping=0.1, gauss_newton=True)
    B = rhs(block.numel, 3, 0)
    solver = CG(tol=1e-10, max_iter=2000, deflate=6)
    solver.solve(op, B)
    assert len(op.memo) == 1
    op.set_damping(0.05)  # another operator: what was kept for 0.1 goes
    assert len(op.memo) == 0
    x, info = solver.solve(op, B)
    assert info.extra["deflation"]["used"] == 0
    # a subspace installed under another damping's key (a cache file of another run) is ignored
    stale = next(iter(op.memo.values()))
    op.set_damping(0.1)
    op.memo[("deflation", stale.key)] = stale
    x, info = solver.solve(op, B)
    assert info.extra["deflation"]["used"] == 0
    dense = torch.stack([op(e) for e in torch.eye(block.numel, dtype=torch.float64)])
    assert rel(x, torch.linalg.solve(dense, B.T).T) < 1e-7


def test_a_subspace_that_does_not_belong_to_the_operator_costs_products_never_accuracy():
    A = spd_small_end()
    op = DenseOperator(A)
    CG(tol=1e-11, max_iter=3000, deflate=16).solve(op, rhs(120, 4, 0))
    A.mul_(1.5)  # the matrix changed in place under the kept subspace
    B = rhs(120, 4, 1)
    x, info = CG(tol=1e-11, max_iter=3000, deflate=16).solve(op, B)
    assert info.converged and info.extra["deflation"]["finished_without"] > 0
    assert rel(x, torch.linalg.solve(A, B.T).T) < 1e-8


def test_subspace_save_and_load(tmp_path):
    A = spd_small_end(40)
    W, AW, values = rayleigh_ritz(rhs(40, 12, 0), rhs(40, 12, 0) @ A, 4)
    sub = Subspace(W, AW, values, (40, "torch.float64", 0.1))
    sub.save(tmp_path / "s.pt")
    back = Subspace.load(tmp_path / "s.pt")
    assert back.key == sub.key and torch.equal(back.W, sub.W) and torch.equal(back.AW, sub.AW)
    with pytest.raises(ValueError, match="positive definite"):
        Subspace(W, -AW, values)


def test_recording_hands_every_product_to_the_harvester():
    A = spd_small_end(20)
    h = Harvester(size=3, window=1000)
    Recording(DenseOperator(A), h).matmat(rhs(20, 5, 0))
    assert sum(v.shape[0] for v in h._V) == 5


def test_cg_rejects_a_negative_deflate():
    with pytest.raises(ValueError, match="deflate=-1"):
        CG(deflate=-1)


# -- the low-rank solver -----------------------------------------------------------------
def test_lowrank_at_full_rank_is_the_dense_solve_and_below_it_the_truncated_inverse():
    n, lam = 30, 0.1
    H = spd_small_end(n) - 0.05 * torch.eye(n, dtype=torch.float64)  # negative curvature, as a Hessian
    A = H + lam * torch.eye(n, dtype=torch.float64)
    B = rhs(n, 3, 0)
    x, info = LowRank(rank=n, shift=lam).solve(A, B)
    assert rel(x, torch.linalg.solve(A, B.T).T) < 1e-10 and info.num_products == n + 3
    # rank k: V Θ⁻¹ Vᵀ b + (b − V Vᵀ b)/λ with V the top k eigenvectors of A
    k = 6
    x, info = LowRank(rank=k, steps=n, shift=lam).solve(A, B)
    evals, U = torch.linalg.eigh(A)
    V, theta = U[:, -k:], evals[-k:]
    expected = (B @ V) / theta @ V.T + (B - (B @ V) @ V.T) / lam
    assert rel(x, expected) < 1e-8
    assert info.extra["rank"] == k and info.extra["relative_residual"] > 0


def test_lowrank_keeps_its_eigenpairs_on_the_operator_and_needs_a_positive_damping():
    A = spd_small_end(30)
    op = DenseOperator(A)
    solver = LowRank(rank=4, shift=0.01)
    _, first = solver.solve(op, rhs(30, 2, 0))
    _, second = solver.solve(op, rhs(30, 2, 1))
    assert first.extra["lanczos_products"] == 8 and second.extra["lanczos_products"] == 0
    assert second.num_products == 2  # the residual check only
    with pytest.raises(TypeError, match="shift"):
        LowRank(rank=4).solve(op, rhs(30, 2, 0))
    with pytest.raises(ValueError, match="steps=2 < rank=4"):
        LowRank(rank=4, steps=2)


def test_lowrank_replaces_both_inverses_of_the_multistage_chain():
    pre, ft = mlp(3, 0), mlp(2, 1)
    ft.embedding.load_state_dict(pre.embedding.state_dict())
    pre_batch, ft_batch, test = pairs(40, 0), pairs(30, 1, 2), pairs(3, 2, 2)
    settings = {"pretrain_damping": 0.1, "finetune_damping": 0.1, "hessian_samples": "all", "gauss_newton": True}
    msi = MultiStageInfluence(pre, ft, solver=LowRank(rank=10_000), **settings).fit(pre_batch, ft_batch)
    exact = MultiStageInfluence(
        pre,
        ft,
        solver=CG(tol=1e-12, max_iter=5000),
        finetune_solver=CG(tol=1e-12, max_iter=5000),
        **settings,
    ).fit(pre_batch, ft_batch)
    s = msi.query_vectors(test)
    assert msi.diagnostics["finetune"]["solver"] == msi.diagnostics["pretrain"]["solver"] == "lowrank"
    assert rel(s, exact.query_vectors(test)) < 1e-7


# -- query chunks and kept graphs -------------------------------------------------------------
def test_query_chunks_give_the_same_scores_and_sum_their_reports():
    model = mlp()
    data, tdata = pairs(60, 0), pairs(7, 1)
    solver = CG(tol=1e-10, max_iter=2000, deflate=8)
    whole = (
        Influence(model, solver=solver, damping=0.1, hessian_samples="all", gauss_newton=True).fit(data).scores(tdata)
    )
    inf = Influence(model, solver=solver, damping=0.1, hessian_samples="all", gauss_newton=True, query_chunk=3).fit(
        data
    )
    chunked = inf.scores(tdata)
    assert chunked.shape == whole.shape and rel(chunked, whole) < 1e-7
    chunks = inf.diagnostics["chunks"]
    assert len(chunks) == 3  # 3 + 3 + 1 queries
    assert inf.diagnostics["solve"]["num_products"] == sum(c["solve"]["num_products"] for c in chunks)
    assert [c["solve"]["deflation"]["used"] for c in chunks] == [0, 8, 8]
    assert (
        rel(
            inf.query_vectors(tdata),
            Influence(model, damping=0.1, hessian_samples="all", gauss_newton=True, solver=CG(tol=1e-10, max_iter=2000))
            .fit(data)
            .query_vectors(tdata),
        )
        < 1e-7
    )
    with pytest.raises(ValueError, match="query_chunk=0"):
        Influence(model, query_chunk=0)


def test_retained_graphs_are_kept_between_calls_until_released():
    model = mlp()
    test = pairs(4, 1)
    inf = Influence(model, damping=1.0, hessian_samples="all", hvp_mode="retained", batch_size=16).fit(pairs(60, 0))
    objective = inf.operator.objective
    first = inf.query_vectors(test)
    graphs = dict(objective._graphs)
    assert graphs and all(g is not None for g in graphs.values()) and objective.graph_bytes > 0
    second = inf.query_vectors(test)
    # the same graph objects: not rebuilt by the second call
    assert all(objective._graphs[k] is v for k, v in graphs.items())
    assert torch.equal(first, second)
    inf.release()
    assert not objective._graphs
    assert torch.equal(inf.query_vectors(test), first)  # rebuilt on demand, the same numbers


def test_app_deflation_subspaces_are_saved_and_reused_by_a_rerun(tmp_path):
    from lissa_influence.experiments import pipeline

    from hydra_helpers import TINY

    overrides = [
        *TINY,
        f"cache_dir={tmp_path / 'cache'}",
        "solver.deflate=6",
        "query_chunk=1",
        "gauss_newton=true",
        "solver.max_iter=500",
    ]
    first = pipeline.run(compose_cfg(*overrides), tmp_path / "a")["influence"]
    assert first["subspaces"] == {"loaded": [], "saved": ["pretrain"]}  # fixed mode: the head is solved exactly
    assert len(first["chunks"]) == 2 and first["chunks"][1]["pretrain"]["deflation"]["used"] == 6
    second = pipeline.run(compose_cfg(*overrides), tmp_path / "b")["influence"]
    assert second["subspaces"]["loaded"] == ["pretrain"]
    assert second["chunks"][0]["pretrain"]["deflation"]["used"] == 6
    a, b = np.load(tmp_path / "a" / "scores.npy"), np.load(tmp_path / "b" / "scores.npy")
    assert np.abs(a - b).max() < 1e-5 * np.abs(a).max()  # the same scores, to CG's tolerance
