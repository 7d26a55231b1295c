"""Correct at the edges (issue 26): a dtype cast with buffers, integer outputs under
Gauss-Newton, gradient-checkpointed models."""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint_sequential

from lissa_influence import CG, EKFAC, Influence, LiSSA, MultiStageInfluence
from lissa_influence.batching import Batch

from conftest import rel, train_full_batch


def _data(n: int, d: int, classes: int, seed: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g).to(dtype), torch.randint(0, classes, (n,), generator=g)


def _randomise_batchnorm(model: nn.Module) -> None:
    """Running statistics far from (0, 1), so that a wrong dtype or a skipped buffer shows."""
    g = torch.Generator().manual_seed(7)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


# ------------------------------------------------------------ 1. dtype cast with float buffers
def test_float64_influence_of_a_float32_batchnorm_model_equals_the_float64_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).eval()
    _randomise_batchnorm(model)
    x, y = _data(30, 4, 2, seed=1)
    train_full_batch(model, Batch(x, y), steps=50, weight_decay=0.1)
    settings = dict(damping=0.1, hessian_samples="all", solver=CG(tol=1e-12))
    got = Influence(model, dtype=torch.float64, **settings).fit((x, y)).scores((x[:3], y[:3]))
    reference = copy.deepcopy(model).double()
    expected = Influence(reference, **settings).fit((x.double(), y)).scores((x[:3].double(), y[:3]))
    assert got.dtype == torch.float64 and rel(got, expected) <= 1e-9
    assert model[1].running_mean.dtype == torch.float32  # the model itself is left as it was


def test_float64_influence_of_a_float32_model_with_a_frozen_layer_equals_the_float64_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = _data(30, 4, 3, seed=8)
    train_full_batch(model, Batch(x, y), steps=50, weight_decay=0.1)
    model[0].requires_grad_(False)  # left out of the blocks, held at its float32 values
    settings = dict(damping=0.1, hessian_samples="all", solver=CG(tol=1e-12), scoring="grad")
    got = Influence(model, dtype=torch.float64, **settings).fit((x, y)).scores((x[:3], y[:3]))
    reference = copy.deepcopy(model).double()
    expected = Influence(reference, **settings).fit((x.double(), y)).scores((x[:3].double(), y[:3]))
    assert got.dtype == torch.float64 and rel(got, expected) <= 1e-9


@pytest.mark.parametrize("mode", ["fixed", "updated"])
def test_float64_multistage_influence_of_float32_batchnorm_models(mode):
    torch.manual_seed(0)
    pre = nn.Sequential(nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh()), nn.Linear(5, 3)).eval()
    ft = nn.Sequential(nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh()), nn.Linear(5, 2)).eval()
    _randomise_batchnorm(pre)
    xp, yp = _data(25, 4, 3, seed=2)
    xf, yf = _data(20, 4, 2, seed=3)
    train_full_batch(pre, Batch(xp, yp), steps=50, weight_decay=0.1)
    ft[0].load_state_dict(pre[0].state_dict())
    ft[0].requires_grad_(False)
    train_full_batch(ft, Batch(xf, yf), steps=50, weight_decay=0.1)
    ft[0].requires_grad_(True)
    settings = dict(
        shared="0",
        mode=mode,
        pretrain_damping=0.5,
        finetune_damping=0.2,
        hessian_samples="all",
        solver=CG(tol=1e-12),
    )
    msi = MultiStageInfluence(pre, ft, dtype=torch.float64, **settings)
    got = msi.fit((xp, yp), (xf, yf)).scores((xf[:2], yf[:2]))
    pre64, ft64 = copy.deepcopy(pre).double(), copy.deepcopy(ft).double()
    ref = MultiStageInfluence(pre64, ft64, **settings)
    expected = ref.fit((xp.double(), yp), (xf.double(), yf)).scores((xf[:2].double(), yf[:2]))
    assert msi.finetune_path == ref.finetune_path
    assert got.dtype == torch.float64 and rel(got, expected) <= 1e-9


# -------------------------------------------------------------- 2. integer leaves of the outputs
class WithPositions(nn.Module):
    """Returns its logits and an int64 tensor (positions), as models returning a dict do."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x), torch.arange(x.shape[0])


@pytest.mark.parametrize("ad_mode", ["auto", "reverse"])
def test_gauss_newton_skips_integer_outputs(ad_mode):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = _data(20, 4, 3, seed=4, dtype=torch.float64)
    settings = dict(damping=0.1, hessian_samples="all", solver=CG(tol=1e-12), gauss_newton=True, ad_mode=ad_mode)
    expected = Influence(plain, **settings).fit((x, y)).scores((x[:2], y[:2]))
    model = WithPositions(plain)
    inf = Influence(model, loss=lambda out, y: F.cross_entropy(out[0], y), **settings)
    got = inf.fit((x, y)).scores((x[:2], y[:2]))
    assert rel(got, expected) <= 1e-12


# ------------------------------------------------------------------ 3. gradient checkpointing
class Layers(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, classes))

    def forward(self, x):
        return self.layers(x)


class Checkpointed(Layers):
    """The same network, its activations recomputed in the backward pass (saved tensor hooks)."""

    def forward(self, x):
        return checkpoint_sequential(self.layers, 2, x, use_reentrant=False)


def _pair(x: torch.Tensor, y: torch.Tensor, classes: int = 3, seed: int = 0, frozen: Layers | None = None):
    """A network trained on ``(x, y)`` (near a minimum: the damped Hessian is positive definite)
    and its checkpointed copy; ``frozen``: its first layer is taken from there and kept."""
    torch.manual_seed(seed)
    plain = Layers(classes).double()
    if frozen is not None:
        plain.layers[0].load_state_dict(frozen.layers[0].state_dict())
        plain.layers[0].requires_grad_(False)
    train_full_batch(plain, Batch(x, y), steps=100, weight_decay=0.01)
    plain.requires_grad_(True)
    checkpointed = Checkpointed(classes).double()
    checkpointed.load_state_dict(plain.state_dict())
    return plain, checkpointed


CASES = {
    "default": {},
    "functional": dict(hvp_mode="functional"),
    "gauss-newton": dict(gauss_newton=True),
    "reverse": dict(hvp_mode="functional", ad_mode="reverse"),
    "grad scoring": dict(scoring="grad"),
    "over budget": dict(graph_budget=0),
    "lissa": dict(solver=LiSSA(scale="auto", depth=200, batch_size=10, seed=0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_checkpointed_model_scores_as_without_checkpointing(case):
    x, y = _data(30, 4, 3, seed=5, dtype=torch.float64)
    plain, checkpointed = _pair(x, y)
    settings = {**dict(damping=0.5, hessian_samples="all", solver=CG(tol=1e-13), batch_size=8), **CASES[case]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LiSSA's notices
        expected = Influence(plain, **settings).fit((x, y)).scores((x[:4], y[:4]))
        inf = Influence(checkpointed, **settings).fit((x, y))
        got = inf.scores((x[:4], y[:4]))
    assert rel(got, expected) <= 1e-10
    assert "saved tensor hooks" in inf.diagnostics["fallbacks"]["scored examples"]["autograd"]


@pytest.mark.parametrize("mode", ["fixed", "updated"])
@pytest.mark.parametrize("head_only", [True, False])
def test_a_checkpointed_multistage_pair_scores_as_without_checkpointing(mode, head_only):
    xp, yp = _data(25, 4, 3, seed=6, dtype=torch.float64)
    xf, yf = _data(20, 4, 2, seed=7, dtype=torch.float64)
    pre, pre_ck = _pair(xp, yp, 3, seed=1)
    ft, ft_ck = _pair(xf, yf, 2, seed=2, frozen=pre)  # the first layer shared, as fixed mode requires
    settings = dict(
        shared="layers.0",
        mode=mode,
        pretrain_damping=0.5,
        finetune_damping=0.2,
        hessian_samples="all",
        solver=CG(tol=1e-13),
        head_only=head_only if mode == "fixed" else "auto",
        scoring="grad",
    )
    expected = MultiStageInfluence(pre, ft, **settings).fit((xp, yp), (xf, yf)).scores((xf[:3], yf[:3]))
    got = MultiStageInfluence(pre_ck, ft_ck, **settings).fit((xp, yp), (xf, yf)).scores((xf[:3], yf[:3]))
    assert rel(got, expected) <= 1e-10


@pytest.mark.parametrize("settings", [dict(hvp_mode="functional"), dict(gauss_newton=True)], ids=str)
def test_forward_mode_second_derivatives_of_a_checkpointed_model_are_refused_by_name(settings):
    x, y = _data(30, 4, 3, seed=5, dtype=torch.float64)
    _, checkpointed = _pair(x, y)
    inf = Influence(checkpointed, damping=0.5, hessian_samples="all", ad_mode="forward", **settings).fit((x, y))
    with pytest.raises(ValueError, match=r"gradient checkpointing \(saved tensor hooks\).*ad_mode='auto'"):
        inf.scores((x[:2], y[:2]))


def test_kronecker_factors_of_a_checkpointed_model_are_refused_by_name():
    x, y = _data(30, 4, 3, seed=5, dtype=torch.float64)
    _, checkpointed = _pair(x, y)
    inf = Influence(checkpointed, damping=0.5, hessian_samples="all", solver=EKFAC()).fit((x, y))
    with pytest.raises(ValueError, match=r"ekfac factors: the model uses gradient checkpointing.*CG, LiSSA"):
        inf.scores((x[:2], y[:2]))
