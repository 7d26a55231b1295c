"""The fixed-embedding finetune stage on the head alone: same numbers as the full network."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lissa_influence import CG, MultiStageInfluence
from lissa_influence.batching import Batch
from lissa_influence.head import ExactInverse

from conftest import TinyCNN, make_data, rel


def _pair(classes_pre: int = 3, classes_ft: int = 2, model=TinyCNN):
    torch.manual_seed(0)
    pre = model(classes_pre).double()
    ft = model(classes_ft).double()
    ft.embedding.load_state_dict(pre.embedding.state_dict())
    pre_data = make_data(60, (1, 6, 6), classes_pre, seed=1)
    ft_data = make_data(40, (1, 6, 6), classes_ft, seed=2)
    test = make_data(3, (1, 6, 6), classes_ft, seed=3)
    return pre, ft, pre_data, ft_data, test


def _fit(pre, ft, pre_data, ft_data, **kw):
    tight = CG(tol=1e-12, max_iter=2000)
    kw.setdefault("solver", tight)
    kw.setdefault("gauss_newton", True)  # untrained models: the Hessians are indefinite
    return MultiStageInfluence(pre, ft, finetune_damping=1e-3, hessian_samples="all", **kw).fit(
        (pre_data.x, pre_data.y), (ft_data.x, ft_data.y)
    )


def test_head_only_products_equal_the_full_network():
    pre, ft, pre_data, ft_data, test = _pair()
    full = _fit(pre, ft, pre_data, ft_data, head_only=False)
    head = _fit(pre, ft, pre_data, ft_data, finetune_solver=CG(tol=1e-12, max_iter=2000))
    assert full.finetune_path == "full network (head_only=False)"
    assert head.finetune_path == "head only"
    v = torch.randn(4, head.Theta.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert rel(head.ft_operator(v), full.ft_operator(v)) < 1e-12
    s_full = full.query_vectors((test.x, test.y))
    s_head = head.query_vectors((test.x, test.y))
    assert rel(s_head, s_full) < 1e-9


def test_exact_head_is_the_default_and_matches_cg():
    pre, ft, pre_data, ft_data, test = _pair()
    exact = _fit(pre, ft, pre_data, ft_data)
    assert exact.finetune_path == "head only, exact (float64)"
    assert exact.ft_operator.dtype == torch.float64
    s_exact = exact.query_vectors((test.x, test.y))
    info = exact.diagnostics["finetune"]
    assert info["solver"] == "exact" and info["method"] == "cholesky" and info["final_residual"] < 1e-12
    s_cg = _fit(pre, ft, pre_data, ft_data, head_only=False).query_vectors((test.x, test.y))
    assert rel(s_exact, s_cg) < 1e-9


def test_exact_head_solves_in_float64_for_a_float32_model():
    """The MNIST failure: float32 CG on a softmax head at damping 1e-8 diverged; the exact
    head inverse is formed and factored in float64 and returns the model's dtype."""
    pre, ft, pre_data, ft_data, test = _pair()
    pre, ft = pre.float(), ft.float()
    f32 = lambda b: (b.x.float(), b.y)  # noqa: E731
    msi = MultiStageInfluence(
        pre, ft, finetune_damping=1e-8, hessian_samples="all", solver=CG(tol=1e-5), gauss_newton=True
    ).fit(f32(pre_data), f32(ft_data))
    b = msi.finetune_rhs(msi.test_gradients(f32(test)))
    v, info = ExactInverse().solve(msi.ft_operator, b.double())
    assert info.residuals[-1] < 1e-8
    s = msi.query_vectors(f32(test))
    assert s.dtype == torch.float32 and torch.isfinite(s).all()


class TwiceEmbedded(TinyCNN):
    def forward(self, x):  # the embedding runs twice: replaying one output would be wrong
        return self.head(self.embedding(x) + self.embedding(-x))


def test_a_model_the_head_path_cannot_replay_falls_back():
    pre, ft, pre_data, ft_data, test = _pair(model=TwiceEmbedded)
    msi = _fit(pre, ft, pre_data, ft_data)
    assert msi.finetune_path.startswith("full network (the embedding module 'embedding' ran 2 times")
    assert not ft.embedding._forward_hooks  # the capture hook is gone
    with pytest.raises(ValueError, match="head_only=True, but"):
        _fit(pre, ft, pre_data, ft_data, head_only=True)
    with pytest.raises(ValueError, match="exact_finetune=True needs"):
        _fit(pre, ft, pre_data, ft_data, exact_finetune=True)


class Transformed(TinyCNN):
    def forward(self, x):  # the input reaches the head by another way too
        return self.head(self.embedding(x)) + x.flatten(1)[:, : self.head.out_features]


def test_a_model_with_a_second_path_is_caught_by_the_check():
    pre, ft, pre_data, ft_data, test = _pair(model=Transformed)
    msi = _fit(pre, ft, pre_data, ft_data)
    assert "full network (replaying" not in msi.finetune_path  # replay of x-path is still exact here
    # the residual path depends on x only, not on the embedding: the head objective is right
    full = _fit(pre, ft, pre_data, ft_data, head_only=False)
    assert rel(msi.query_vectors((test.x, test.y)), full.query_vectors((test.x, test.y))) < 1e-9


class DictNet(nn.Module):
    def __init__(self, classes: int):
        super().__init__()
        self.embedding = nn.Sequential(nn.Linear(5, 4), nn.Tanh())
        self.head = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, classes))

    def forward(self, x):
        return self.head(self.embedding(x))


def test_dict_batches_and_a_deeper_head():
    torch.manual_seed(0)
    pre, ft = DictNet(3).double(), DictNet(2).double()
    ft.embedding = copy.deepcopy(pre.embedding)
    g = torch.Generator().manual_seed(0)

    def items(n, c):
        x = torch.randn(n, 5, generator=g, dtype=torch.float64)
        y = torch.randint(0, c, (n,), generator=g)
        return [{"features": x[i], "label": y[i]} for i in range(n)]

    forward = lambda model, b: model(b["features"])  # noqa: E731
    loss = lambda out, b: nn.functional.cross_entropy(out, b["label"])  # noqa: E731
    kw = dict(
        gauss_newton=True,
        finetune_forward=forward,
        pretrain_forward=forward,
        finetune_loss=loss,
        pretrain_loss=loss,
        hessian_samples="all",
    )
    pre_items, ft_items, test = items(50, 3), items(30, 2), items(2, 2)
    tight = CG(tol=1e-12, max_iter=1000)
    head = MultiStageInfluence(pre, ft, finetune_damping=1e-3, solver=tight, **kw).fit(pre_items, ft_items)
    full = MultiStageInfluence(pre, ft, finetune_damping=1e-3, head_only=False, solver=tight, **kw).fit(
        pre_items, ft_items
    )
    assert head.finetune_path == "head only, exact (float64)"
    assert rel(head.query_vectors(test), full.query_vectors(test)) < 1e-10


def test_head_batch_keeps_the_inputs_aligned_with_their_features():
    pre, ft, pre_data, ft_data, test = _pair()
    msi = MultiStageInfluence(pre, ft, finetune_damping=1e-3, hessian_samples="all", batch_size=7).fit(
        (pre_data.x, pre_data.y), (ft_data.x, ft_data.y)
    )
    chunks = list(msi.ft_operator.objective.batch.chunks(7))
    assert isinstance(chunks[0], Batch) and len(chunks) == 6
    feats = torch.cat([c.x["features"] for c in chunks])
    assert rel(feats, ft.embedding(ft_data.x).detach()) < 1e-15


class BNNet(nn.Module):
    def __init__(self, classes: int):
        super().__init__()
        self.embedding = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh())
        self.head = nn.Linear(4, classes)

    def forward(self, x):
        return self.head(self.embedding(x))


def test_fit_leaves_batchnorm_statistics_alone_and_takes_the_head_path():
    torch.manual_seed(0)
    pre, ft = BNNet(3).double(), BNNet(2).double()
    ft.embedding.load_state_dict(pre.embedding.state_dict())
    pre.train(), ft.train()  # as a training loop leaves them
    stats = {k: v.clone() for k, v in ft.state_dict().items() if "running" in k}
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 5, generator=g, dtype=torch.float64), torch.randint(0, 2, (40,), generator=g)
    msi = MultiStageInfluence(pre, ft, gauss_newton=True, hessian_samples="all").fit(
        (x, torch.randint(0, 3, (40,), generator=g)), (x, y)
    )
    assert msi.finetune_path == "head only, exact (float64)"
    assert all(torch.equal(ft.state_dict()[k], v) for k, v in stats.items())
    assert ft.training  # and the mode is given back


def test_exact_inverse_refactors_when_the_damping_changes_and_says_when_it_cannot_solve():
    pre, ft, pre_data, ft_data, test = _pair()
    msi = _fit(pre, ft, pre_data, ft_data)
    b = msi.finetune_rhs(msi.test_gradients((test.x, test.y)))
    solver, op = msi._exact, msi.ft_operator
    _, first = solver.solve(op, b)
    op.damping = 10.0
    x, again = solver.solve(op, b)
    assert again.residuals[-1] < 1e-12 and again.num_products == first.num_products  # rebuilt, for the new damping
    with pytest.raises(ValueError, match="exact_finetune=True, but a finetune_solver was given"):
        _fit(pre, ft, pre_data, ft_data, exact_finetune=True, finetune_solver=CG())
    with pytest.raises(ValueError, match="above exact_max_params=5"):
        _fit(pre, ft, pre_data, ft_data, exact_finetune=True, exact_max_params=5)
