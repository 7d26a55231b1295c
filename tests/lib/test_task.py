"""Any model, any batch, any loss: regression losses, dict batches, DataLoaders, lists,
a torchvision ResNet with BatchNorm and a small transformer, each against a dense reference."""

from __future__ import annotations

import collections

import dense
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lissa_influence import CG, Influence, MultiStageInfluence
from lissa_influence.batching import Batch
from lissa_influence.curvature import Objective
from lissa_influence.params import make_block, name_matcher, named_params

from conftest import TinyCNN, make_data, rel, train_full_batch


# --- regression losses -------------------------------------------------------------------
@pytest.fixture(scope="module")
def regression():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 3, generator=g, dtype=torch.float64)
    y = torch.sin(x[:, :2]) + 0.1 * torch.randn(30, 2, generator=g, dtype=torch.float64)
    opt = torch.optim.LBFGS(model.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure():  # near a minimum, where the damped Hessian is positive definite
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    return model, x, y


@pytest.mark.parametrize("loss", [F.mse_loss, F.huber_loss], ids=["mse", "huber"])
@pytest.mark.parametrize("ad_mode", ["auto", "reverse", "retained"])
def test_regression_losses_equal_the_dense_formula(regression, loss, ad_mode):
    """torch has no forward-mode second derivative of these losses: "auto" falls back to
    reverse-over-reverse products, with the same numbers; retained-graph products need no
    forward mode at all."""
    model, x, y = regression
    mode = dict(hvp_mode="retained") if ad_mode == "retained" else dict(ad_mode=ad_mode, hvp_mode="functional")
    inf = Influence(model, loss=loss, damping=0.5, hessian_samples="all", solver=CG(tol=1e-12), **mode)
    got = inf.fit((x, y)).scores((x[:3], y[:3]))
    assert rel(got, dense.single_stage_of(model, loss, x, y, 3, 0.5, inf.block)) <= 1e-9
    assert inf.operator.objective.ad_used == (None if ad_mode == "retained" else "reverse")
    ggn = Influence(model, loss=loss, damping=0.5, hessian_samples="all", gauss_newton=True, solver=CG(tol=1e-12))
    assert torch.isfinite(ggn.fit((x, y)).scores((x[:3], y[:3]))).all()  # Gauss-Newton products run too


def test_forward_mode_only_says_what_failed(regression):
    model, x, y = regression
    inf = Influence(
        model, loss=F.huber_loss, damping=0.5, hessian_samples="all", ad_mode="forward", hvp_mode="functional"
    )
    with pytest.raises(NotImplementedError, match="forward AD"):
        inf.fit((x, y)).scores((x[:1], y[:1]))


# --- data in every shape --------------------------------------------------------------------
class Dicts(Dataset):
    """Items as a HuggingFace dataset gives them: a dict per example."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixels": self.x[i], "label": self.y[i]}


class DictLabelPairs(Dicts):
    def __getitem__(self, i):
        return {"pixels": self.x[i]}, self.y[i]


@pytest.fixture(scope="module")
def cnn_data():
    torch.manual_seed(0)
    model = TinyCNN().double()
    train = make_data(40, (1, 6, 6), 3, seed=5, noise=2.0)
    train_full_batch(model, train, steps=100, weight_decay=0.1)
    return model, train


def test_dict_batches_loaders_and_lists_give_the_same_scores(cnn_data):
    model, train = cnn_data
    x, y = train.x, train.y
    settings = dict(damping=0.3, hessian_samples=25, solver=CG(tol=1e-12), batch_size=16)
    reference = Influence(model, **settings).fit((x, y)).scores((x[:3], y[:3]))

    def dict_forward(m, batch):
        return m(batch["pixels"])

    def dict_loss(out, batch):
        return F.cross_entropy(out, batch["label"])

    as_dicts = Influence(model, loss=dict_loss, forward=dict_forward, **settings)
    assert rel(as_dicts.fit(Dicts(x, y)).scores(Dicts(x[:3], y[:3])), reference) <= 1e-10

    pair_forward = lambda m, batch: m(batch[0]["pixels"])  # noqa: E731
    pair_loss = lambda out, batch: F.cross_entropy(out, batch[1])  # noqa: E731
    as_pairs = Influence(model, loss=pair_loss, forward=pair_forward, **settings)
    assert rel(as_pairs.fit(DictLabelPairs(x, y)).scores(DictLabelPairs(x[:3], y[:3])), reference) <= 1e-10

    loader = DataLoader(TensorDataset(x, y), batch_size=7, shuffle=True)  # the library indexes it: order is ours
    assert rel(Influence(model, **settings).fit(loader).scores((x[:3], y[:3])), reference) <= 1e-10
    items = [(x[i], y[i]) for i in range(len(x))]
    assert rel(Influence(model, **settings).fit(items).scores(items[:3]), reference) <= 1e-10
    dict_loader = DataLoader(Dicts(x, y), batch_size=5)
    assert rel(as_dicts.fit(dict_loader).scores(Dicts(x[:3], y[:3])), reference) <= 1e-10


def test_a_batch_that_does_not_fit_is_refused_by_name(cnn_data):
    model, train = cnn_data
    x, y = train.x, train.y
    mask = torch.ones(len(x), 3)
    with pytest.raises(TypeError, match=r"a list of 3 .*not \(x, y\) pairs.*forward="):
        Influence(model, hessian_samples=10).fit(TensorDataset(x, mask, y))  # never the mask as the target
    with pytest.raises(TypeError, match=r"a dict with keys \['label', 'pixels'\].*forward="):
        Influence(model, hessian_samples=10).fit(Dicts(x, y))
    with pytest.raises(TypeError, match="map-style Dataset.*got generator"):
        Influence(model).fit(p for p in zip(x, y, strict=True))
    fitted = Influence(model, hessian_samples=10).fit((x, y))
    with pytest.raises(TypeError, match="test data: the items batch to a dict"):
        fitted.scores(Dicts(x[:2], y[:2]))
    with pytest.raises(TypeError, match="scored data: the items batch to a dict"):
        fitted.scores((x[:2], y[:2]), Dicts(x, y))  # before any solve


def test_shared_by_prefix_list_or_predicate():
    torch.manual_seed(0)
    pre, ft = TinyCNN(3).double(), TinyCNN(2).double()
    ft.embedding.load_state_dict(pre.embedding.state_dict())
    pre_data, ft_data = make_data(30, (1, 6, 6), 3, seed=1), make_data(20, (1, 6, 6), 2, seed=2)
    data = ((pre_data.x, pre_data.y), (ft_data.x, ft_data.y))
    test = (ft_data.x[:2], ft_data.y[:2])
    scores = []
    for shared in ("embedding", ["embedding.0"], lambda n: n.startswith("embedding.")):
        msi = MultiStageInfluence(
            pre,
            ft,
            shared=shared,
            pretrain_damping=2.0,
            finetune_damping=2.0,
            hessian_samples="all",
            solver=CG(tol=1e-12),
        )
        scores.append(msi.fit(*data).scores(test))
    assert torch.equal(scores[0], scores[1]) and torch.equal(scores[0], scores[2])
    assert name_matcher(["conv1", "layer1"])("layer1.0.conv1.weight") and not name_matcher("conv1")("conv10.weight")
    with pytest.raises(TypeError, match="list of prefixes"):
        name_matcher([1, 2])


# --- BatchNorm and dropout: eval mode, buffers untouched -------------------------------------
def test_batchnorm_and_dropout_are_taken_in_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 3)).double()
    x = torch.randn(40, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    model.train()
    for _ in range(5):  # running statistics that differ from the defaults
        model(x)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    inf = Influence(model, damping=1.0, hessian_samples="all", solver=CG(tol=1e-12))
    got = inf.fit((x, y)).scores((x[:2], y[:2]))
    assert model.training  # restored
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())  # statistics not updated
    model.eval()
    assert rel(got, dense.single_stage_of(model, F.cross_entropy, x, y, 2, 1.0, inf.block)) <= 1e-9


# --- CUDA ------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_scores_equal_cpu_scores(cnn_data):
    model, train = cnn_data
    settings = dict(damping=0.3, hessian_samples=25, solver=CG(tol=1e-12))
    cpu = Influence(model, **settings).fit((train.x, train.y)).scores((train.x[:3], train.y[:3]))
    gpu_model = TinyCNN().double().cuda()
    gpu_model.load_state_dict(model.state_dict())
    gpu = Influence(gpu_model, **settings).fit((train.x, train.y)).scores((train.x[:3], train.y[:3]))
    assert gpu.device.type == "cuda" and rel(gpu.cpu(), cpu) <= 1e-8


def test_make_block_still_takes_a_predicate():
    params = named_params(TinyCNN())
    assert make_block(params, name_matcher(["head"])).names == ("head.weight", "head.bias")


def test_regression_finetuning_runs_the_mixed_product_in_reverse_mode():
    """A classifier pretrained with cross-entropy, finetuned as a regressor with MSE: the
    finetune Hessian and the mixed block ∇²_WΘ F have no forward mode, the chain still
    equals the dense formula."""
    torch.manual_seed(0)
    pre = nn.Sequential(nn.Sequential(nn.Linear(4, 5), nn.Tanh()), nn.Linear(5, 3)).double()
    ft = nn.Sequential(nn.Sequential(nn.Linear(4, 5), nn.Tanh()), nn.Linear(5, 2)).double()
    ft[0].load_state_dict(pre[0].state_dict())
    g = torch.Generator().manual_seed(3)
    xp, yp = torch.randn(25, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (25,), generator=g)
    xf, yf = torch.randn(20, 4, generator=g, dtype=torch.float64), torch.randn(20, 2, generator=g, dtype=torch.float64)
    msi = MultiStageInfluence(
        pre,
        ft,
        shared="0",
        finetune_loss=F.mse_loss,
        pretrain_damping=1.0,
        finetune_damping=1.0,
        hessian_samples="all",
        solver=CG(tol=1e-12),
        hvp_mode="functional",
    )
    got = msi.fit((xp, yp), (xf, yf)).scores((xf[:2], yf[:2]))
    assert msi.ft_objective.ad_used == "reverse" and msi.pre_objective.ad_used == "forward"

    def on(model, loss, x, y):
        return lambda p: loss(functional_call(model, p, (x,)), y)

    expected = dense.multistage_fixed(
        named_params(pre),
        named_params(ft),
        msi.W,
        msi.U,
        msi.Theta,
        on(pre, F.cross_entropy, xp, yp),
        on(ft, F.mse_loss, xf, yf),
        [on(ft, F.mse_loss, xf[j : j + 1], yf[j : j + 1]) for j in range(2)],
        [on(pre, F.cross_entropy, xp[i : i + 1], yp[i : i + 1]) for i in range(25)],
        1.0,
        1.0,
    )
    assert rel(got, expected) <= 1e-9


def test_gauss_newton_products_in_both_modes_equal_the_dense_ggn(regression):
    """``Jᵀ (∇²_out loss) J v`` from the dense Jacobian and output Hessian; cross-entropy
    runs forward mode, MSE falls back to reverse mode."""
    model, x, y = regression
    params = named_params(model)
    block = make_block(params, lambda n: True)
    theta = block.flatten(params)
    v = torch.randn(2, block.numel, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    labels = (y[:, 0] > 0).long()
    for loss, target, mode in ((F.cross_entropy, labels, "forward"), (F.mse_loss, y, "reverse")):

        def net(f):
            return functional_call(model, {**params, **block.unflatten(f)}, (x,))

        out = net(theta)
        J = torch.func.jacrev(net)(theta).reshape(out.numel(), -1)
        H_out = torch.func.hessian(lambda o: loss(o.reshape(out.shape), target))(out.reshape(-1))  # noqa: B023
        expected = v @ (J.T @ H_out @ J).T
        for ad_mode in ("auto", "reverse"):
            obj = Objective(model, loss, params, Batch(x, target), chunk_size=7, ad_mode=ad_mode)
            assert rel(obj.ggn_vp(block, v), expected) <= 1e-10
            assert obj.ad_used == (mode if ad_mode == "auto" else "reverse")


class Branchy(nn.Module):
    """A model with data-dependent control flow, which vmap cannot batch."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x) if float(x.sum()) > 0 else self.lin(-x)


def test_a_model_vmap_cannot_batch_is_scored_example_by_example():
    torch.manual_seed(0)
    model = Branchy().double()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(12, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)
    inf = Influence(model, damping=1.0, hessian_samples="all", batch_size=1, solver=CG(tol=1e-12))
    got = inf.fit((x, y)).scores((x[:2], y[:2]))
    assert "loop" in inf._per_example.fallbacks and "reverse" not in inf._per_example.fallbacks
    params = named_params(model)

    def ce(rows):  # one example at a time: the branch is per example
        return lambda p: (
            sum(F.cross_entropy(functional_call(model, p, (x[i : i + 1],)), y[i : i + 1]) for i in range(12)[rows])
            / len(range(12)[rows])
        )

    expected = dense.single_stage(
        params,
        inf.block,
        ce(slice(None)),
        [ce(slice(j, j + 1)) for j in range(2)],
        [ce(slice(i, i + 1)) for i in range(12)],
        1.0,
    )
    assert rel(got, expected) <= 1e-9


def test_a_loaders_batch_sampler_and_collate_fn_are_used(cnn_data):
    """Length-bucketed loaders hand their batching to a batch_sampler, with a collate_fn of
    their own: here one that turns (x, y) items into a dict batch."""
    model, train = cnn_data
    x, y = train.x, train.y
    settings = dict(damping=0.3, hessian_samples=25, solver=CG(tol=1e-12), batch_size=16)
    reference = Influence(model, **settings).fit((x, y)).scores((x[:3], y[:3]))

    def to_dict(items):
        xs, ys = zip(*items, strict=True)
        return collections.UserDict({"pixels": torch.stack(xs), "label": torch.stack(ys)})

    sampler = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(range(40)), 6, drop_last=False)
    loader = DataLoader(TensorDataset(x, y), batch_sampler=sampler, collate_fn=to_dict)
    inf = Influence(
        model, loss=lambda out, b: F.cross_entropy(out, b["label"]), forward=lambda m, b: m(b["pixels"]), **settings
    )
    assert (
        rel(
            inf.fit(loader).scores(DataLoader(TensorDataset(x[:3], y[:3]), batch_size=2, collate_fn=to_dict)), reference
        )
        <= 1e-10
    )
    with pytest.raises(TypeError, match="batch_size=None"):
        Influence(model, **settings).fit(DataLoader(TensorDataset(x, y), batch_size=None))
    with pytest.raises(TypeError, match=r"\['str'\] values besides tensors"):
        Influence(model, **settings).fit([(x[i], y[i], "a caption") for i in range(40)])
