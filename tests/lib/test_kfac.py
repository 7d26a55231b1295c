"""K-FAC / EK-FAC (lissa_influence.kfac) and the EKFAC solver: exact where the theory says
so, consistent everywhere else, and usable through the estimators. float64 throughout."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from test_multistage import CNNTwoStage
from torch import nn
from torch.nn import functional as F

from lissa_influence import EKFAC, CurvatureOperator, Explicit, KroneckerCurvature, fit_kronecker
from lissa_influence.batching import Batch
from lissa_influence.curvature import Objective, cross_entropy
from lissa_influence.distributed import shard_range
from lissa_influence.metrics import score_agreement
from lissa_influence.params import ParamBlock, make_block, named_params

from conftest import TinyMLP, make_data, rel


def block_of(model: nn.Module, select=None) -> ParamBlock:
    params = named_params(model)
    return make_block(params, select if select is not None else (lambda n: True))


def objective(model, batch, loss=cross_entropy, chunk_size=4, **kw) -> Objective:
    return Objective(model, loss, named_params(model), batch, chunk_size=chunk_size, **kw)


def dense(fn, size: int) -> torch.Tensor:
    """The matrix of a linear map ``[k, P] -> [k, P]`` (rows = products with basis vectors)."""
    return fn(torch.eye(size, dtype=torch.float64))


def exact_ggn(obj: Objective, block: ParamBlock) -> torch.Tensor:
    return dense(lambda V: obj.ggn_vp(block, V), block.numel)


def mse(out, y):
    return F.mse_loss(out, y)


class CNN(nn.Module):
    """Two convolutions (one with padding and stride, one with BatchNorm after it) and two linear layers."""

    def __init__(self, classes: int = 3, bn: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1, stride=2)
        self.conv2 = nn.Conv2d(3, 4, 2)
        self.bn = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.fc1 = nn.Linear(36, 6)
        self.fc2 = nn.Linear(6, classes)

    def forward(self, x):
        h = torch.tanh(self.conv1(x))
        h = torch.tanh(self.bn(self.conv2(h)))
        return self.fc2(torch.tanh(self.fc1(h.flatten(1))))


# ------------------------------------------------------------- 1. exact where K-FAC is exact
@pytest.mark.parametrize("kind", ["ekfac", "kfac"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_one_linear_layer_one_example_is_exact(kind, loss):
    """One example through one Linear layer: ``G = Σ_c (g_c g_cᵀ) ⊗ (ã ãᵀ)`` exactly, so the
    damped inverse is the exact damped GGN inverse."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).double()
    x = torch.randn(1, 4, dtype=torch.float64)
    if loss == "mse":
        batch, loss_fn = Batch(x, torch.randn(1, 3, dtype=torch.float64)), mse
    else:
        batch, loss_fn = Batch(x, torch.tensor([2])), cross_entropy
    obj, block = objective(layer, batch, loss_fn), block_of(layer)
    curv = fit_kronecker(obj, block, kind=kind, fisher="type-2")
    assert curv.describe()["kronecker"] == {"": ["weight", "bias"]} and curv.describe()["fallback"] == []
    G = exact_ggn(obj, block)
    torch.testing.assert_close(dense(curv.matmat, block.numel), G, rtol=0, atol=1e-13)
    lam = 0.3
    V = torch.randn(5, block.numel, dtype=torch.float64)
    ref = torch.linalg.solve(G + lam * torch.eye(block.numel, dtype=torch.float64), V.T).T
    assert rel(curv.inverse(V, lam), ref) < 1e-10
    assert rel(curv.inverse(V[0], lam), ref[0]) < 1e-10  # one vector too


def test_empirical_fisher_of_one_example_is_its_gradient_outer_product():
    torch.manual_seed(1)
    layer = nn.Linear(4, 3).double()
    batch = Batch(torch.randn(1, 4, dtype=torch.float64), torch.tensor([1]))
    obj, block = objective(layer, batch), block_of(layer)
    g = obj.gradient(block)
    for kind in ("ekfac", "kfac"):
        curv = fit_kronecker(obj, block, kind=kind, fisher="empirical")
        torch.testing.assert_close(dense(curv.matmat, block.numel), torch.outer(g, g), rtol=0, atol=1e-14)


# ------------------------------------------------------ 2. what holds for any model and sample
class TokenMLP(nn.Module):
    """A Linear applied to every token ([N, T, d]), then LayerNorm (fallback), mean over tokens, a head."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Linear(4, 5)
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.tok(x))).mean(1))


@pytest.mark.parametrize("arch", ["mlp", "tokens"])
def test_ekfac_diagonal_in_its_eigenbasis_equals_the_ggn_and_fallback_is_the_ggn_diagonal(arch):
    """EK-FAC's eigenvalues are the exact GGN's diagonal in the Kronecker eigenbasis
    (``(Q_Γ ⊗ Q_Ω)ᵀ G_l (Q_Γ ⊗ Q_Ω)``, with tokens summed over too), its off-diagonal blocks
    are zero, and a fallback parameter's diagonal is the GGN's diagonal."""
    torch.manual_seed(2)
    if arch == "mlp":
        model, batch = TinyMLP(5, 6, 3).double(), make_data(7, (5,), 3, seed=3)
    else:
        model, batch = TokenMLP().double(), make_data(7, (3, 4), 3, seed=3)
    obj, block = objective(model, batch, chunk_size=3), block_of(model)
    curv = fit_kronecker(obj, block, fisher="type-2")
    G, approx = exact_ggn(obj, block), dense(curv.matmat, block.numel)
    assert len(curv.layers) == 2
    for layer in curv.layers:
        idx = layer.index.reshape(-1)
        U = torch.kron(layer.q_g, layer.q_a)  # columns: vec of q_g[:, i] q_a[:, j]ᵀ, row-major
        torch.testing.assert_close(torch.diag(U.T @ G[idx][:, idx] @ U), layer.lam.reshape(-1), rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(approx[idx][:, idx], U @ torch.diag(layer.lam.reshape(-1)) @ U.T)
    fb = curv.fallback_index
    assert curv.fallback == (() if arch == "mlp" else ("norm.weight", "norm.bias"))
    torch.testing.assert_close(torch.diag(approx)[fb], torch.diag(G)[fb], rtol=1e-10, atol=1e-14)
    off = approx.clone()
    for layer in curv.layers:
        idx = layer.index.reshape(-1)
        off[idx[:, None], idx] = 0
    off[fb, fb] = 0
    assert off.abs().max() == 0  # block-diagonal
    # K-FAC has the same eigenbasis with λ_Γ ⊗ λ_Ω: its diagonal there is not the GGN's in general
    kfac = fit_kronecker(obj, block, kind="kfac", fisher="type-2")
    assert kfac.fit_passes < curv.fit_passes
    layer = kfac.layers[0]
    U = torch.kron(layer.q_g, layer.q_a)
    idx = layer.index.reshape(-1)
    assert rel(layer.lam.reshape(-1), torch.diag(U.T @ G[idx][:, idx] @ U)) > 1e-3


# --------------------------------------------------------------------- 3. the three products agree
def test_inverse_sqrt_squared_is_inverse_and_inverse_undoes_matmat():
    torch.manual_seed(3)
    model = CNN(bn=True).double().eval()
    batch = make_data(9, (1, 8, 8), 3, seed=4)
    obj, block = objective(model, batch), block_of(model)
    curv = fit_kronecker(obj, block)
    V = torch.randn(3, block.numel, dtype=torch.float64)
    d = torch.full((block.numel,), 0.05, dtype=torch.float64)
    for name in curv.fallback:  # the fallback may vary per coordinate
        d[block.slice_of(name)] = torch.rand(block.sizes[block.names.index(name)], dtype=torch.float64)
    for damping in (0.05, d):
        inv = curv.inverse(V, damping)
        torch.testing.assert_close(curv.inverse_sqrt(curv.inverse_sqrt(V, damping), damping), inv)
        torch.testing.assert_close(curv.inverse(curv.matmat(V) + damping * V, damping), V)
        # symmetric: <u, S v> = <S u, v>
        S = dense(lambda W: curv.inverse_sqrt(W, damping), block.numel)  # noqa: B023
        torch.testing.assert_close(S, S.T)


# --------------------------------------------------------- 4. convolutions, fallback, preconditioning
def test_conv_and_batchnorm_fallback_are_spd():
    torch.manual_seed(4)
    model = CNN(bn=True).double().eval()
    batch = make_data(12, (1, 8, 8), 3, seed=5)
    obj, block = objective(model, batch), block_of(model)
    for fisher in ("type-2", "mc", "empirical"):
        curv = fit_kronecker(obj, block, fisher=fisher)
        info = curv.describe()
        assert set(info["kronecker"]) == {"conv1", "conv2", "fc1", "fc2"} and info["fallback"] == [
            "bn.weight",
            "bn.bias",
        ]
        M = dense(curv.matmat, block.numel)
        torch.testing.assert_close(M, M.T, rtol=0, atol=1e-12)
        assert torch.linalg.eigvalsh(M).min() > -1e-12
        assert torch.linalg.eigvalsh(M + 1e-3 * torch.eye(block.numel, dtype=torch.float64)).min() > 0
    assert not any(m._forward_hooks for m in model.modules()) and not model.training  # left as it was
    # a block with only a bias of a layer: the fallback alone, equal to the GGN diagonal there
    only_bias = block_of(model, ["fc1.bias"])
    curv = fit_kronecker(obj, only_bias, fisher="type-2")
    assert curv.layers == [] and curv.fallback == ("fc1.bias",)
    torch.testing.assert_close(torch.diag(dense(curv.matmat, 6)), torch.diag(exact_ggn(obj, only_bias)))


def test_ekfac_on_a_small_cnn_is_closer_than_kfac_and_the_identity():
    """Sanity checks that can fail, on a two-layer CNN (64 examples): EK-FAC is nearer the exact
    layer blocks than K-FAC in Frobenius norm (it is the best diagonal in K-FAC's eigenbasis), and
    its damped solve is nearer the exact damped GGN solve than the best multiple of ``b``.

    Not claimed: fewer CG iterations as a preconditioner. On these tiny CNNs even the exact
    block-diagonal (block Jacobi) preconditioner needs more CG iterations than plain CG (e.g. 114
    vs 70 at λ=1e-3), since it spreads the GGN's cluster of near-null directions; EK-FAC needs
    about as many as block Jacobi (124)."""
    torch.manual_seed(5)
    model = CNN().double()
    batch = make_data(64, (1, 8, 8), 3, seed=6, noise=1.0)
    obj, block = objective(model, batch, chunk_size=32), block_of(model)
    G = exact_ggn(obj, block)
    curvs = {kind: fit_kronecker(obj, block, kind=kind, fisher="type-2") for kind in ("ekfac", "kfac")}
    approx = {kind: dense(c.matmat, block.numel) for kind, c in curvs.items()}
    for layer in curvs["ekfac"].layers:
        idx = layer.index.reshape(-1)
        exact = G[idx][:, idx]
        distance = {kind: rel(M[idx][:, idx], exact) for kind, M in approx.items()}
        assert distance["ekfac"] < distance["kfac"] < 1, (layer.module, distance)
    lam = 1e-2
    A = G + lam * torch.eye(block.numel, dtype=torch.float64)
    b = torch.randn(4, block.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x_star = torch.linalg.solve(A, b.T).T
    identity_error = rel((b * x_star).sum() / (b * b).sum() * b, x_star)  # 0.24
    for kind, c in curvs.items():
        assert rel(c.inverse(b, lam), x_star) < 0.9 * identity_error, kind  # 0.20 both


# ------------------------------------------------------------------------ 5. any batch structure
def test_dict_batches_with_custom_forward_and_loss():
    torch.manual_seed(6)
    model = TinyMLP(5, 6, 3).double()
    pairs = make_data(10, (5,), 3, seed=7)
    tree = Batch({"features": pairs.x, "label": pairs.y})
    forward = lambda m, b: m(b["features"])
    loss = lambda out, b: F.cross_entropy(out, b["label"])
    block = block_of(model)
    for fisher in ("type-2", "empirical", "auto"):
        ref = fit_kronecker(objective(model, pairs), block, fisher=fisher)
        got = fit_kronecker(objective(model, tree, loss, forward=forward), block, fisher=fisher)
        assert got.fisher == ref.fisher
        torch.testing.assert_close(dense(got.matmat, block.numel), dense(ref.matmat, block.numel))
    with pytest.raises(ValueError, match="fisher='mc'"):
        fit_kronecker(objective(model, tree, loss, forward=forward), block, fisher="mc")

    class DictOut(nn.Module):  # outputs that are not one tensor: empirical only
        def __init__(self):
            super().__init__()
            self.net = TinyMLP(5, 6, 3)

        def forward(self, x):
            return {"logits": self.net(x)}

    wrapped = DictOut().double()
    wrapped.net.load_state_dict(model.state_dict())
    obj = objective(wrapped, tree, lambda out, b: F.cross_entropy(out["logits"], b["label"]), forward=forward)
    got = fit_kronecker(obj, block_of(wrapped))
    assert got.fisher == "empirical"
    empirical = fit_kronecker(objective(model, pairs), block, fisher="empirical")
    torch.testing.assert_close(dense(got.matmat, block.numel), dense(empirical.matmat, block.numel))
    with pytest.raises(ValueError, match="type-2"):
        fit_kronecker(obj, block_of(wrapped), fisher="type-2")


# ------------------------------------------------------------------- 6. persistence and damping
def test_save_load_round_trip_and_damping_per_block(tmp_path):
    torch.manual_seed(7)
    model = CNN(bn=True).double().eval()
    batch = make_data(8, (1, 8, 8), 3, seed=8)
    obj, block = objective(model, batch), block_of(model)
    curv = fit_kronecker(obj, block, fisher="mc", seed=3)
    curv.save(tmp_path / "factors.pt")
    back = KroneckerCurvature.load(tmp_path / "factors.pt")
    V = torch.randn(2, block.numel, dtype=torch.float64)
    assert torch.equal(back.inverse(V, 0.1), curv.inverse(V, 0.1)) and torch.equal(back.matmat(V), curv.matmat(V))
    assert back.describe() == curv.describe() and back.seed == 3 and back.fisher == "mc"
    # a damping vector constant on every layer (the updated mode's λ + 2α on W, λ on Θ)
    W = [n for n in block.names if n.startswith(("conv", "bn"))]
    d = torch.full((block.numel,), 0.1, dtype=torch.float64)
    for n in W:
        d[block.slice_of(n)] += 0.5
    torch.testing.assert_close(curv.inverse(curv.matmat(V) + d * V, d), V)
    d[block.slice_of("fc1.bias")][0] += 1e-3  # one layer's bias differs from its weight
    with pytest.raises(ValueError, match="varies within the Kronecker block of layer 'fc1'"):
        curv.inverse(V, d)
    with pytest.raises(ValueError, match="damping"):
        curv.inverse(V, -1.0)
    with pytest.raises(ValueError, match="singular"):
        fit_kronecker(obj, block, kind="kfac").inverse(V, 0.0)  # a bias-free rank deficiency needs damping
    # an operator takes saved factors and does not refit them
    op = CurvatureOperator(obj, block, 0.1)
    op.set_kronecker(back)
    assert op.kronecker("ekfac", "mc", 3) is back
    assert op.kronecker("ekfac", "auto", 0) is op.kronecker("ekfac", "auto", 0) is not back  # fitted once
    with pytest.raises(ValueError, match="fitted for parameters"):
        CurvatureOperator(obj, block_of(model, ["fc2.weight"])).set_kronecker(back)


# ----------------------------------------------------------------------------------- settings
def test_settings_and_operators_are_checked():
    with pytest.raises(ValueError, match="kind"):
        EKFAC(kind="kfc")
    with pytest.raises(ValueError, match="fisher"):
        EKFAC(fisher="true")
    with pytest.raises(ValueError, match="seed"):
        EKFAC(seed=1.5)
    with pytest.raises(TypeError, match="CurvatureOperator"):
        EKFAC().solve(torch.eye(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    model = TinyMLP().double()
    obj = objective(model, make_data(4, (5,), 3, seed=0))
    with pytest.raises(ValueError, match="kind"):
        fit_kronecker(obj, block_of(model), kind="diag")
    regression = Batch(torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="fisher='mc'"):
        fit_kronecker(objective(model, regression, mse), block_of(model), fisher="mc")


# ------------------------------------------------------------------- 7. through the estimator
@pytest.fixture(scope="module", params=["fixed", "updated"])
def cnn_chain(request):
    """The trained two-stage CNN of test_influence (80 pretraining, 60 finetuning examples), and
    its exact scores (Explicit: the dense solve, what tight CG converges to)."""
    t = CNNTwoStage(request.param)
    return t, t.msi(Explicit()).scores((t.test.x, t.test.y))


# Spearman of EK-FAC's scores against the exact ones, as measured (mean over the 4 queries):
# fixed 0.974 (the finetune solve is the exact head solve unless a finetune_solver is given;
# with EKFAC there too, 0.97), updated 0.64. The Gauss-Newton matrix itself is not the
# loss: exact GGN scores reach 0.99 / 0.96. Updated mode is the weak case: the conv layer's
# Kronecker block misses most of its top curvature direction (spread over ~21 vectors of the
# Kronecker eigenbasis), relative residual of the finetune solve about 2.
SPEARMAN = {"fixed": 0.95, "updated": 0.55}


def test_ekfac_solver_in_the_multistage_chain(cnn_chain):
    t, exact = cnn_chain
    test = (t.test.x, t.test.y)
    msi = t.msi(EKFAC())
    scores = msi.scores(test)
    agreement = score_agreement(scores, exact)
    assert agreement["spearman"] > SPEARMAN[t.mode], agreement
    info = msi.diagnostics["pretrain"]
    assert info["solver"] == "ekfac" and info["fisher"] == "type-2" and info["kind"] == "ekfac"
    assert info["num_products"] == len(t.test.x) and 0 < info["relative_residual"] < 3 and info["fit_passes"] > 0
    # the factors are fitted once per stage and reused by later queries
    fitted = dict(msi.pre_operator._kronecker)
    torch.testing.assert_close(msi.scores(test), scores, rtol=0, atol=0)
    assert msi.pre_operator._kronecker == fitted and len(fitted) == 1
    if t.mode == "fixed":  # the head-only finetune products take EKFAC too
        both = t.msi(EKFAC(), finetune_solver=EKFAC())
        assert score_agreement(both.scores(test), exact)["spearman"] > SPEARMAN["fixed"]
        assert both.diagnostics["finetune"]["solver"] == "ekfac"
    kfac = t.msi(EKFAC(kind="kfac", check_residual=False))
    assert score_agreement(kfac.scores(test), exact)["spearman"] > SPEARMAN[t.mode] - 0.1
    assert kfac.diagnostics["pretrain"]["num_products"] == 0


# ----------------------------------------------------------------------------- 8. distributed
def fake_ranks(objectives, fn):
    """Run ``fn(objective)`` for every shard at once in threads, with a ``reduce`` that sums
    across them as ``all_reduce_sum`` would."""
    world = len(objectives)
    barrier, slots, results = threading.Barrier(world, timeout=120), [None] * world, [None] * world

    def reducer(rank):
        def reduce(t):
            slots[rank] = t.clone()
            barrier.wait()
            total = sum(slots)
            barrier.wait()
            return total

        return reduce

    def run(rank):
        objectives[rank].reduce = reducer(rank)
        try:
            results[rank] = fn(objectives[rank])
        except BaseException as e:  # the other ranks must not wait for this one
            results[rank] = e
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


@pytest.mark.parametrize("fisher", ["type-2", "mc"])
def test_two_ranks_give_one_ranks_factors(fisher):
    torch.manual_seed(8)
    model = CNN(bn=True).double().eval()
    batch = make_data(11, (1, 8, 8), 3, seed=9)
    block = block_of(model)
    full = fit_kronecker(objective(model, batch), block, fisher=fisher, seed=5)
    shards = []
    for r in range(2):
        lo, hi = shard_range(11, r, 2)
        replica = copy.deepcopy(model)  # one model per rank, as processes have (hooks and functional_call modify it)
        shards.append(objective(replica, batch.select(slice(lo, hi)), chunk_size=3, sample_size=11, sample_offset=lo))
    curvs = fake_ranks(shards, lambda o: fit_kronecker(o, block, fisher=fisher, seed=5))
    V = torch.randn(3, block.numel, dtype=torch.float64)
    for c in curvs:
        torch.testing.assert_close(c.matmat(V), full.matmat(V), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(c.inverse(V, 0.01), full.inverse(V, 0.01), rtol=1e-9, atol=1e-10)
