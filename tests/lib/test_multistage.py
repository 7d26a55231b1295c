"""lissa_influence.multistage: the influence chain against dense algebra, against retraining, and
across solvers; its errors."""

import copy
import warnings

import pytest
import torch
from torch.func import functional_call, hessian

from lissa_influence import CG, Explicit, Identity, LiSSA, MultiStageInfluence
from lissa_influence.curvature import cross_entropy
from lissa_influence.params import make_block, named_params, prefix_matcher

from conftest import TinyCNN, make_data, rel, train_full_batch
from twostage import TwoStage


def pearson(a, b):
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


# --------------------------------------------------------------------------- fixtures
class CNNTwoStage:
    """A small trained CNN pretrained on 3 classes and finetuned on 2 (float64)."""

    def __init__(self, mode: str, alpha: float = 0.05):
        torch.manual_seed(0)
        self.pre_data = make_data(80, (1, 6, 6), 3, seed=10, noise=3.0)
        self.ft_data = make_data(60, (1, 6, 6), 2, seed=11, noise=3.0)
        self.test = make_data(4, (1, 6, 6), 2, seed=12, noise=3.0)
        self.pre = TinyCNN(3, channels=8).double()
        train_full_batch(self.pre, self.pre_data, steps=200, weight_decay=0.1)
        self.ft = TinyCNN(2, channels=8).double()
        self.ft.embedding.load_state_dict(self.pre.embedding.state_dict())
        if mode == "fixed":
            self.ft.embedding.requires_grad_(False)
            train_full_batch(self.ft, self.ft_data, steps=200, weight_decay=0.05)
            self.ft.embedding.requires_grad_(True)
        else:
            w_star = [p.detach().clone() for p in self.pre.embedding.parameters()]
            opt = torch.optim.LBFGS(self.ft.parameters(), max_iter=200, line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                prox = sum(((p - w) ** 2).sum() for p, w in zip(self.ft.embedding.parameters(), w_star, strict=True))
                loss = (
                    cross_entropy(self.ft(self.ft_data.x), self.ft_data.y)
                    + alpha * prox
                    + 0.025 * sum((p**2).sum() for p in self.ft.parameters())
                )
                loss.backward()
                return loss

            opt.step(closure)
        self.mode, self.alpha = mode, alpha

    def msi(self, solver, **kw):
        settings = dict(
            mode=self.mode,
            alpha=self.alpha,
            solver=solver,
            pretrain_damping=0.5,
            finetune_damping=0.2,
            hessian_samples=len(self.pre_data),
            finetune_hessian_samples=len(self.ft_data),
        )
        settings.update(kw)
        return MultiStageInfluence(self.pre, self.ft, **settings).fit(
            (self.pre_data.x, self.pre_data.y), (self.ft_data.x, self.ft_data.y)
        )


@pytest.fixture(scope="module", params=["fixed", "updated"])
def cnn(request):
    return CNNTwoStage(request.param)


def dense_reference(t: CNNTwoStage, lam_pre=0.5, lam_ft=0.2):
    """The formula of docs/math.md with full Hessians from torch.func.hessian and torch.linalg.solve;
    per-example gradients by plain autograd, one example at a time."""
    pre_p, ft_p = named_params(t.pre), named_params(t.ft)
    W = make_block(pre_p, prefix_matcher("embedding"))
    U = make_block(pre_p, prefix_matcher("head"))
    T = make_block(ft_p, prefix_matcher("head"))
    WU, WT = W + U, W + T
    nW = W.numel

    def G(f):
        return cross_entropy(functional_call(t.pre, WU.unflatten(f), (t.pre_data.x,)), t.pre_data.y)

    def F(f):
        return cross_entropy(functional_call(t.ft, WT.unflatten(f), (t.ft_data.x,)), t.ft_data.y)

    wu, wt = WU.flatten(pre_p), WT.flatten(ft_p)
    H_pre = hessian(G)(wu) + lam_pre * torch.eye(WU.numel, dtype=torch.float64)
    H_ft = hessian(F)(wt)
    scores = []
    for j in range(len(t.test)):
        f = wt.clone().requires_grad_(True)
        loss = cross_entropy(functional_call(t.ft, WT.unflatten(f), (t.test.x[j : j + 1],)), t.test.y[j : j + 1])
        g = torch.autograd.grad(loss, f)[0]
        if t.mode == "fixed":
            v = torch.linalg.solve(H_ft[nW:, nW:] + lam_ft * torch.eye(T.numel, dtype=torch.float64), g[nW:])
            u = g[:nW] - H_ft[:nW, nW:] @ v
        else:
            D = torch.full((WT.numel,), lam_ft, dtype=torch.float64)
            D[:nW] += 2 * t.alpha
            v = torch.linalg.solve(H_ft + torch.diag(D), g)
            u = 2 * t.alpha * v[:nW]
        s = torch.linalg.solve(H_pre, torch.cat([u, torch.zeros(U.numel, dtype=torch.float64)]))
        row = []
        for i in range(len(t.pre_data)):
            f = wu.clone().requires_grad_(True)
            li = cross_entropy(
                functional_call(t.pre, WU.unflatten(f), (t.pre_data.x[i : i + 1],)), t.pre_data.y[i : i + 1]
            )
            row.append(-(s @ torch.autograd.grad(li, f)[0]))
        scores.append(torch.stack(row))
    return torch.stack(scores)


# ------------------------------------------------------------------ against dense algebra
@pytest.mark.parametrize("solver", [Explicit(), CG(tol=1e-13, max_iter=5000)], ids=["explicit", "cg"])
def test_multistage_equals_dense_formula(cnn, solver):
    expected = dense_reference(cnn)
    got = cnn.msi(solver, batch_size=32).scores((cnn.test.x, cnn.test.y))
    assert got.shape == (len(cnn.test), len(cnn.pre_data))
    assert rel(got, expected) <= 1e-8


def test_mean_query_is_the_mean_of_the_queries(cnn):
    msi = cnn.msi(Explicit())
    per_point = msi.scores((cnn.test.x, cnn.test.y))
    mean = msi.scores((cnn.test.x, cnn.test.y), mean=True)
    assert mean.shape == (1, len(cnn.pre_data))
    assert rel(mean[0], per_point.mean(0)) <= 1e-10
    assert set(msi.diagnostics["time"]) >= {"finetune_solve", "mixed_product", "pretrain_solve", "scoring"}


def test_chain_steps_compose_to_query_vectors(cnn):
    msi = cnn.msi(Explicit())
    test = (cnn.test.x, cnn.test.y)
    g = msi.test_gradients(test)
    v, _ = Explicit().solve(msi.ft_operator, msi.finetune_rhs(g))
    s, _ = Explicit().solve(msi.pre_operator, msi.pretrain_rhs(v, g))
    assert rel(s, msi.query_vectors(test)) <= 1e-12
    with pytest.raises(ValueError, match=r"v \(finetune solution\) must be \[k, \d+\]"):
        msi.pretrain_rhs(v[:, :-1], g)
    with pytest.raises(ValueError, match=r"g \(test gradients\) must be"):
        msi.finetune_rhs(g[0])


# ---------------------------------------------------------------------- against retraining
@pytest.mark.parametrize("mode", ["fixed", "updated"])
def test_matches_retraining_finite_differences(mode):
    ts = TwoStage.build(mode)
    msi = MultiStageInfluence(
        ts.pre,
        ts.ft,
        mode=mode,
        alpha=ts.alpha,
        solver=Explicit(),
        pretrain_damping=ts.lam_pre,
        finetune_damping=ts.lam_ft,
    )
    scores = msi.fit((ts.pre_data.x, ts.pre_data.y), (ts.ft_data.x, ts.ft_data.y)).scores((ts.test.x, ts.test.y))
    row = scores[0]
    helpful, harmful = int(row.argmin()), int(row.argmax())
    assert row[helpful] < 0 < row[harmful]
    eps = 1e-5
    for z in {helpful, harmful, 0, 11}:
        fd = (ts.test_loss_after_upweighting(z, eps, 0) - ts.test_loss_after_upweighting(z, -eps, 0)) / (2 * eps)
        assert abs(float(row[z]) - fd) <= 1e-6 * abs(fd), (z, float(row[z]), fd)


# ----------------------------------------------------------------------- across solvers
def test_cg_and_lissa_agree_with_explicit(cnn):
    exact = cnn.msi(Explicit()).scores((cnn.test.x, cnn.test.y))
    cg = cnn.msi(CG(tol=1e-6, max_iter=1000)).scores((cnn.test.x, cnn.test.y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lissa = cnn.msi(LiSSA(scale="auto", depth=1000, tol=1e-6)).scores((cnn.test.x, cnn.test.y))
    assert pearson(cg, exact) >= 0.999
    assert pearson(lissa, exact) >= 0.99
    identity = cnn.msi(Identity()).scores((cnn.test.x, cnn.test.y))
    assert pearson(identity, exact) < 0.99  # the ablation is a different estimate


def test_jvp_scoring_equals_per_example_gradients(cnn):
    s = cnn.msi(Explicit()).query_vectors((cnn.test.x, cnn.test.y))
    a = cnn.msi(Explicit(), scoring="jvp", batch_size=16).scores_from(s)
    b = cnn.msi(Explicit(), scoring="grad", batch_size=32).scores_from(s)
    assert rel(a, b) <= 1e-12
    part = cnn.msi(Explicit(), scoring="jvp").scores_from(s, start=10, stop=25)
    assert torch.allclose(part, a[:, 10:25], rtol=1e-12)


# ------------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def fixed():
    return CNNTwoStage("fixed")


def test_shared_prefix_matching_nothing(fixed):
    with pytest.raises(ValueError, match=r"shared='encoder' matches no parameter.*\['embedding', 'head'\]"):
        MultiStageInfluence(fixed.pre, fixed.ft, shared="encoder")


def test_shared_parameters_with_different_shapes(fixed):
    other = TinyCNN(2, channels=4).double()
    with pytest.raises(ValueError, match="shape"):
        MultiStageInfluence(fixed.pre, other, mode="updated")


def test_fixed_mode_refuses_a_trained_embedding(fixed):
    moved = copy.deepcopy(fixed.ft)
    with torch.no_grad():
        moved.embedding[0].weight.add_(1e-3)
    with pytest.raises(ValueError, match="mode='updated'"):
        MultiStageInfluence(fixed.pre, moved, mode="fixed")
    MultiStageInfluence(fixed.pre, moved, mode="updated")  # fine there


def test_unknown_mode(fixed):
    with pytest.raises(ValueError, match="unknown mode 'frozen'"):
        MultiStageInfluence(fixed.pre, fixed.ft, mode="frozen")


def test_nan_in_parameters_data_and_gradients(fixed):
    broken = copy.deepcopy(fixed.pre)
    with torch.no_grad():
        broken.head.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="head.weight"):
        MultiStageInfluence(broken, fixed.ft)
    bad_x = fixed.pre_data.x.clone()
    bad_x[3] = float("nan")
    with pytest.raises(FloatingPointError, match="pretraining data"):
        MultiStageInfluence(fixed.pre, fixed.ft).fit((bad_x, fixed.pre_data.y), (fixed.ft_data.x, fixed.ft_data.y))
    msi = fixed.msi(Explicit())
    with pytest.raises(FloatingPointError, match=r"examples \[3\]"):
        msi.scores((fixed.test.x, fixed.test.y), (bad_x, fixed.pre_data.y))
    bad_test = fixed.test.x.clone()
    bad_test[1] = float("inf")
    with pytest.raises(FloatingPointError, match=r"test points \[1\]"):
        msi.scores((bad_test, fixed.test.y))


def test_hessian_samples_clamped_with_notice(fixed):
    with pytest.warns(UserWarning, match="hessian_samples=5000 exceeds the 80 pretraining examples"):
        msi = fixed.msi(Explicit(), hessian_samples=5000, finetune_hessian_samples=60)
    assert len(msi.pre_objective.batch) == 80


def test_empty_datasets(fixed):
    empty = (fixed.pre_data.x[:0], fixed.pre_data.y[:0])
    with pytest.raises(ValueError, match="pretraining data is empty"):
        MultiStageInfluence(fixed.pre, fixed.ft).fit(empty, (fixed.ft_data.x, fixed.ft_data.y))
    with pytest.raises(ValueError, match="test data is empty"):
        fixed.msi(Explicit()).scores((fixed.test.x[:0], fixed.test.y[:0]))
