"""Models as Hugging Face users bring them: no silent wrong answer.

The first part reproduces each defect in plain torch (no transformers needed); the second
runs tiny GPT-2 models built from configs (``pytest.importorskip("transformers")``), all in
float64 against dense references (tests/support/dense.py, and per-example losses computed on the
unpadded sequences).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from dense import hessian, multistage_fixed
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from lissa_influence import (
    CG,
    EKFAC,
    Explicit,
    Influence,
    LossWarning,
    MultiStageInfluence,
    eval_mode,
    fit_kronecker,
    hf,
    score_agreement,
)

from conftest import make_data, rel


# ------------------------------------------------------------ plain torch: the defects
class CachingBody(nn.Module):
    """Returns ``(features, "cache")``, as a transformers body returns a DynamicCache."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return torch.tanh(self.lin(x)), "cache"


class CachingNet(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.body, self.head = CachingBody(), nn.Linear(3, classes)

    def forward(self, x):
        return self.head(self.body(x)[0])


def _two_stage(net=CachingNet):
    torch.manual_seed(0)
    pre, ft = net(3).double(), net(2).double()
    ft.body.load_state_dict(pre.body.state_dict())
    return pre, ft, make_data(12, (4,), 3, seed=1), make_data(10, (4,), 2, seed=2), make_data(2, (4,), 2, seed=3)


def _dense_fixed(msi, pre, ft, pre_data, ft_data, test, lam_pre, lam_ft):
    def loss_of(model, x, y):
        return lambda p: F.cross_entropy(functional_call(model, p, (x,)), y)

    return multistage_fixed(
        msi.pre_params,
        msi.ft_params,
        msi.W,
        msi.U,
        msi.Theta,
        loss_of(pre, pre_data.x, pre_data.y),
        loss_of(ft, ft_data.x, ft_data.y),
        [loss_of(ft, test.x[j : j + 1], test.y[j : j + 1]) for j in range(len(test.x))],
        [loss_of(pre, pre_data.x[i : i + 1], pre_data.y[i : i + 1]) for i in range(len(pre_data.x))],
        lam_pre,
        lam_ft,
    )


def test_fixed_mode_takes_a_shared_module_that_returns_a_non_tensor():
    """Defect 1: the head path detached every output leaf (TypeError on a str); now the
    finetune stage runs on the full network, and the scores are the dense ones."""
    pre, ft, pre_data, ft_data, test = _two_stage()
    msi = MultiStageInfluence(
        pre,
        ft,
        shared="body",
        mode="fixed",
        solver=Explicit(),
        pretrain_damping=0.5,
        finetune_damping=0.1,
        hessian_samples="all",
    ).fit((pre_data.x, pre_data.y), (ft_data.x, ft_data.y))
    assert msi.finetune_path.startswith("full network") and "str" in msi.finetune_path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Explicit's LU on an indefinite Hessian
        scores = msi.scores((test.x, test.y))
    assert rel(scores, _dense_fixed(msi, pre, ft, pre_data, ft_data, test, 0.5, 0.1)) < 1e-10


class DropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.drop, self.out = nn.Linear(4, 6), nn.Dropout(0.5), nn.Linear(6, 3)

    def forward(self, x):
        return self.out(self.drop(torch.tanh(self.lin(x))))


def test_a_users_product_in_train_mode_changes_no_later_answer():
    """Defect 2: a product called by hand in train mode built (and left) dropout graphs that
    the next query_vectors reused; the operator now enters eval mode itself."""
    torch.manual_seed(0)
    model = DropoutNet().double()
    data, test = make_data(20, (4,), 3, seed=1), make_data(3, (4,), 3, seed=2)
    inf = Influence(model, solver=CG(tol=1e-12, max_iter=500), damping=1.0, gauss_newton=True, hessian_samples="all")
    inf.fit((data.x, data.y))
    first = inf.query_vectors((test.x, test.y))
    model.train()
    v = torch.randn(inf.block.numel, dtype=torch.float64)
    hv = inf.operator(v)
    with eval_mode(model):  # the public context: the same product by hand
        assert rel(inf.operator(v), hv) < 1e-13
    assert model.training and model.drop.training  # each module's mode is restored
    again = inf.query_vectors((test.x, test.y))
    assert rel(again, first) < 1e-12
    assert inf.diagnostics["curvature"]["operator"]["products"].startswith("gauss-newton")


class Body(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return torch.tanh(self.lin(x))


class Net(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.body, self.head = Body(), nn.Linear(3, classes)

    def forward(self, x):
        return self.head(self.body(x))


def test_fixed_mode_accepts_a_frozen_shared_body_and_other_modes_name_it():
    """Defect 3: a frozen body was dropped, then 'matches no parameter'; fixed mode takes it
    (same scores as unfrozen), updated mode names the frozen parameters."""
    pre, ft, pre_data, ft_data, test = _two_stage(Net)
    kw = dict(shared="body", solver=CG(tol=1e-12, max_iter=500), gauss_newton=True, hessian_samples="all")
    data = ((pre_data.x, pre_data.y), (ft_data.x, ft_data.y))
    reference = MultiStageInfluence(pre, ft, **kw).fit(*data).scores((test.x, test.y))
    frozen = copy.deepcopy(ft)
    frozen.body.requires_grad_(False)
    msi = MultiStageInfluence(pre, frozen, **kw).fit(*data)
    assert msi.finetune_path.startswith("head only")
    assert rel(msi.scores((test.x, test.y)), reference) < 1e-10
    with pytest.raises(ValueError, match=r"only frozen parameters .*'body.lin.weight'.*requires_grad=True"):
        MultiStageInfluence(pre, frozen, mode="updated", **kw)


class LossInside(nn.Module):
    """A model that computes its loss when given labels, and returns a cache, as transformers does."""

    def __init__(self, cache: bool = False) -> None:
        super().__init__()
        self.net, self.cache = Net(3), cache

    def forward(self, x, labels=None):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        if self.cache:
            out["cache"] = CachingBody  # any object that is not a tensor
        return out


def _dict_items(data):
    return [{"x": x, "labels": y} for x, y in zip(data.x, data.y, strict=True)]


def test_gauss_newton_refuses_a_loss_computed_inside_the_model():
    """Defect 4: Gauss-Newton of a loss read from the outputs was exactly zero (damping-only
    scores); and a cache among the outputs failed inside torch.func."""
    torch.manual_seed(0)
    data = _dict_items(make_data(10, (4,), 3, seed=1))
    inside = dict(forward=lambda m, b: m(**b), loss=lambda o, b: o["loss"], hessian_samples="all")
    with pytest.raises(ValueError, match="computed inside the model.*without labels"):
        Influence(LossInside().double(), gauss_newton=True, **inside).fit(data)
    with pytest.raises(ValueError, match="use_cache=False"):
        Influence(
            LossInside(cache=True).double(),
            gauss_newton=True,
            forward=lambda m, b: m(b["x"]),
            loss=lambda o, b: F.cross_entropy(o["logits"], b["labels"]),
            hessian_samples="all",
        ).fit(data)
    with pytest.raises(ValueError, match="computed inside the model"):  # EK-FAC's factors are Gauss-Newton ones
        inf = Influence(LossInside().double(), solver=EKFAC(), **inside).fit(data)
        inf.query_vectors(data[:2])
    # the Hessian needs no split of the loss from the outputs: the same numbers as outside
    model = LossInside().double()
    a = Influence(model, solver=CG(tol=1e-12), damping=2.0, **inside).fit(data).query_vectors(data[:2])
    outside = dict(forward=lambda m, b: m(b["x"])["logits"], loss=lambda o, b: F.cross_entropy(o, b["labels"]))
    b = Influence(model, solver=CG(tol=1e-12), damping=2.0, hessian_samples="all", **outside).fit(data)
    assert rel(a, b.query_vectors(data[:2])) < 1e-10


class TokenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.out = nn.Embedding(7, 4), nn.Linear(4, 7)

    def forward(self, ids):
        return self.out(torch.tanh(self.emb(ids)))


def test_a_batch_token_mean_and_a_float32_loss_are_warned_about():
    """Pitfalls: a loss averaging tokens over the padded batch is not the mean of the
    per-example losses (warned, with the numbers); a float32 loss of a float64 model is
    warned about."""
    torch.manual_seed(0)
    model = TokenNet().double()
    items = [{"ids": torch.tensor([1, 2, 3, 4]), "labels": torch.tensor([2, 3, 4, 5])}]
    items.append({"ids": torch.tensor([1, 5, 0, 0]), "labels": torch.tensor([5, 6, -100, -100])})
    fwd = lambda m, b: m(b["ids"])
    batch_mean = lambda o, b: F.cross_entropy(o.transpose(1, 2), b["labels"], ignore_index=-100)
    with pytest.warns(LossWarning, match="not the mean of their one-example losses"):
        Influence(model, forward=fwd, loss=batch_mean, hessian_samples="all").fit(items)
    per_sequence = hf.Task("masked-lm", labels_key="labels").loss
    with warnings.catch_warnings():
        warnings.simplefilter("error", LossWarning)
        Influence(model, forward=fwd, loss=per_sequence, hessian_samples="all").fit(items)
    as_float32 = lambda o, b: per_sequence(o.float(), b)
    with pytest.warns(LossWarning, match="loss is torch.float32 while the parameters are torch.float64"):
        Influence(model, forward=fwd, loss=as_float32, hessian_samples="all").fit(items)


class Conv1D(nn.Module):
    """transformers' Conv1D, as GPT-2 has it: ``x @ weight + bias`` with ``weight [in, out]``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)


def _mlp(layer):
    torch.manual_seed(0)
    net = nn.Sequential(layer(5, 4), nn.Tanh(), nn.LayerNorm(5), layer(3, 5)).double()
    return net


def test_ekfac_factors_conv1d_as_the_linear_layer_it_is():
    """A Conv1D is a Linear with its weight transposed: its EK-FAC inverse equals the Linear's
    on the same coordinates, and only the LayerNorm is left to the diagonal (warned once)."""
    conv = _mlp(Conv1D)
    lin = _mlp(lambda nf, nx: nn.Linear(nx, nf))
    with torch.no_grad():
        for i in (0, 3):
            lin[i].weight.copy_(conv[i].weight.T)
            lin[i].bias.copy_(conv[i].bias)
        lin[2].load_state_dict(conv[2].state_dict())
    data = make_data(16, (6, 4), 3, seed=1)  # [N, T, in]: tokens
    loss = lambda o, y: F.cross_entropy(o.mean(1), y)
    out = {}
    for name, net in (("conv", conv), ("lin", lin)):
        inf = Influence(net, loss=loss, hessian_samples="all", solver=EKFAC())
        inf.fit((data.x, data.y))
        with pytest.warns(UserWarning, match="10 of 53 parameters"):
            curv = inf.operator.kronecker()
        assert curv.describe()["fallback"] == ["2.weight", "2.bias"] and curv.describe()["fallback_params"] == 10
        out[name] = (inf, curv)
    (ci, cc), (li, lc) = out["conv"], out["lin"]
    v = torch.randn(53, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # the Linear's flat vector ↔ the Conv1D's: transpose each weight
    to_lin = lambda x: li.block.flatten(
        {n: (t.T if n.endswith("weight") and t.dim() == 2 else t) for n, t in ci.block.unflatten(x).items()}
    )
    assert rel(to_lin(cc.inverse(v, 0.1)), lc.inverse(to_lin(v), 0.1)) < 1e-10
    assert rel(to_lin(cc.matmat(v)), lc.matmat(to_lin(v))) < 1e-10
    saved = type(cc).from_state_dict(cc.state_dict())
    assert rel(saved.inverse(v, 0.1), cc.inverse(v, 0.1)) < 1e-14
    # diagnostics count the fallback after a solve
    ci.query_vectors((data.x[:2], data.y[:2]))
    assert ci.diagnostics["curvature"]["operator"]["kronecker_fallback_params"] == 10


# ------------------------------------------------------------------- transformers
V = 12  # vocabulary


@pytest.fixture(scope="module")
def gpt2():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = dict(n_layer=1, n_embd=2, n_head=2, vocab_size=V, n_positions=8, pad_token_id=0, bos_token_id=1)
    cfg["eos_token_id"] = 1
    torch.manual_seed(0)
    lm = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg)).double()
    classifier = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(**cfg, num_labels=2)).double()
    classifier.transformer.load_state_dict(lm.transformer.state_dict())
    lm.eval(), classifier.eval()  # the dense references take the deterministic function (no dropout)
    g = torch.Generator().manual_seed(0)

    def sequences(n):
        return [
            {"input_ids": torch.randint(1, V, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g)}
            for _ in range(n)
        ]

    text = sequences(6)
    labelled = [{**s, "labels": torch.tensor(i % 2)} for i, s in enumerate(sequences(6))]
    return transformers, lm, classifier, text, labelled


def _lm_loss(model, item):
    """One unpadded sequence's mean next-token loss (the dense reference's own)."""
    ids = item["input_ids"][None]
    logits = functional_call(model[0], model[1], (), {"input_ids": ids, "use_cache": False}).logits
    return F.cross_entropy(logits[0, :-1], ids[0, 1:])


def _cls_loss(model, item):
    ids = item["input_ids"][None]
    logits = functional_call(model[0], model[1], (), {"input_ids": ids, "use_cache": False}).logits
    return F.cross_entropy(logits, item["labels"][None])


def _mean(fn, model, items):
    return lambda p: torch.stack([fn((model, p), i) for i in items]).mean()


def _gpt2_msi(lm, classifier, mode, **kw):
    lm_task, cls_task = hf.task("causal-lm"), hf.task("classification")
    return MultiStageInfluence(
        lm,
        classifier,
        mode=mode,
        **lm_task.kwargs("pretrain"),
        **cls_task.kwargs("finetune"),
        collate_fn=hf.pad_collate(pad_token_id=0),
        pretrain_damping=1.0,
        finetune_damping=0.1,
        hessian_samples="all",
        **kw,
    )


def test_gpt2_fixed_mode_equals_the_dense_reference(gpt2):
    """GPT-2 pretrained as a language model, finetuned as a sequence classifier (the body
    shared: shared= defaults to base_model_prefix, the tied lm_head reported), padded
    batches of unequal sequences collated by hf.pad_collate, against per-sequence losses
    computed on the unpadded sequences."""
    _, lm, classifier, text, labelled = gpt2
    msi = _gpt2_msi(lm, classifier, "fixed", solver=Explicit()).fit(text, labelled)
    assert msi.shared == "transformer" and msi.tied == {"lm_head.weight": "transformer.wte.weight"}
    assert msi.finetune_path == "head only, exact (float64)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Explicit's LU on the indefinite pretraining Hessian
        scores = msi.scores(labelled[:2])
    with eval_mode(lm, classifier):  # the public context: math attention, which has a double backward
        dense = _dense_fixed_gpt2(msi, lm, classifier, text, labelled)
    assert rel(scores, dense) < 1e-9
    assert "scored examples" in msi.diagnostics["example_loop"]  # sdpa's mask code: example by example


def _dense_fixed_gpt2(msi, lm, classifier, text, labelled):
    return multistage_fixed(
        msi.pre_params,
        msi.ft_params,
        msi.W,
        msi.U,
        msi.Theta,
        _mean(_lm_loss, lm, text),
        _mean(_cls_loss, classifier, labelled),
        [_mean(_cls_loss, classifier, [t]) for t in labelled[:2]],
        [_mean(_lm_loss, lm, [z]) for z in text],
        1.0,
        0.1,
    )


def test_gpt2_updated_mode_equals_the_dense_reference(gpt2):
    _, lm, classifier, text, labelled = gpt2
    tuned = copy.deepcopy(classifier)
    with torch.no_grad():
        for p in tuned.transformer.parameters():
            p.add_(0.01 * torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(p.numel())))
    alpha = 0.05
    msi = _gpt2_msi(lm, tuned, "updated", alpha=alpha, solver=Explicit()).fit(text, labelled)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = msi.scores(labelled[:2])
    with eval_mode(lm, tuned):
        dense = _dense_updated_gpt2(msi, lm, tuned, text, labelled, alpha)
    assert rel(scores, dense) < 1e-9


def _dense_updated_gpt2(msi, lm, tuned, text, labelled, alpha):
    WU, WT, nW = msi.W + msi.U, msi.W + msi.Theta, msi.W.numel
    wu, wt = WU.flatten(msi.pre_params), WT.flatten(msi.ft_params)
    pre_at = lambda loss: lambda f: loss({**msi.pre_params, **WU.unflatten(f)})
    ft_at = lambda loss: lambda f: loss({**msi.ft_params, **WT.unflatten(f)})
    shift = torch.full((WT.numel,), 0.1, dtype=torch.float64)
    shift[:nW] += 2 * alpha
    H_ft = hessian(ft_at(_mean(_cls_loss, tuned, labelled)), wt) + torch.diag(shift)
    H_pre = hessian(pre_at(_mean(_lm_loss, lm, text)), wu) + torch.eye(WU.numel, dtype=torch.float64)
    G = torch.stack([torch.func.grad(pre_at(_mean(_lm_loss, lm, [z])))(wu) for z in text])
    rows = []
    for t in labelled[:2]:
        v = torch.linalg.solve(H_ft, torch.func.grad(ft_at(_mean(_cls_loss, tuned, [t])))(wt))
        s = torch.linalg.solve(H_pre, torch.cat([2 * alpha * v[:nW], torch.zeros(msi.U.numel, dtype=torch.float64)]))
        rows.append(-(G @ s))
    return torch.stack(rows)


def test_gpt2_chain_step_by_step_in_eval_mode_equals_query_vectors(gpt2):
    """Defect 2 on GPT-2: the documented chain, called by hand on a model in eval mode,
    met sdpa's flash kernel (no double backward); the operators now take the math one."""
    _, lm, classifier, text, labelled = gpt2
    msi = _gpt2_msi(lm, classifier, "fixed", solver=CG(tol=1e-12, max_iter=500), gauss_newton=True)
    msi.fit(text, labelled)
    lm.eval(), classifier.eval()
    g = msi.test_gradients(labelled[:2])
    v, _ = msi.finetune_stage_solver.solve(msi.ft_operator, msi.finetune_rhs(g).to(msi.ft_operator.dtype))
    s, _ = msi.solver.solve(msi.pre_operator, msi.pretrain_rhs(v.to(g.dtype), g))
    assert rel(s, msi.query_vectors(labelled[:2])) < 1e-9


def test_gpt2_own_loss_is_warned_about_and_refused_for_gauss_newton(gpt2):
    """HF's outputs.loss: a token mean over the padded batch in float32, computed inside the model."""
    _, lm, _, text, _ = gpt2
    own = dict(
        forward=lambda m, b: m(**b, labels=b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)),
        loss=lambda o, b: o.loss,
        collate_fn=hf.pad_collate(0),
        hessian_samples="all",
    )
    with pytest.warns(LossWarning) as caught:
        Influence(lm, **own).fit(text)
    messages = " ".join(str(w.message) for w in caught)
    assert "not the mean of their one-example losses" in messages and "torch.float32" in messages
    with pytest.raises(ValueError, match="use_cache=False"), warnings.catch_warnings():
        warnings.simplefilter("ignore", LossWarning)
        Influence(lm, gauss_newton=True, **own).fit(text)  # the cache is on by default
    no_cache = own["forward"]
    own["forward"] = lambda m, b: no_cache(m, {**b, "use_cache": False})
    with pytest.raises(ValueError, match="computed inside the model"), warnings.catch_warnings():
        warnings.simplefilter("ignore", LossWarning)
        Influence(lm, gauss_newton=True, **own).fit(text)


def test_gpt2_ekfac_factors_the_conv1d_layers(gpt2):
    """Every Conv1D of GPT-2 is a Kronecker block; only embeddings and LayerNorms fall back."""
    _, lm, _, text, _ = gpt2
    task = hf.task("causal-lm")
    inf = Influence(lm, **task.kwargs(), collate_fn=hf.pad_collate(0), hessian_samples="all", gauss_newton=True)
    inf.fit(text)
    with pytest.warns(UserWarning, match="diagonal Gauss-Newton block"):
        curv = fit_kronecker(inf.operator.objective, inf.operator.block)
    factored = curv.describe()["kronecker"]
    assert {"transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc"} <= set(factored)
    assert all(n.split(".")[1] in ("wte", "wpe", "ln_f") or ".ln_" in n for n in curv.fallback)
    exact = Influence(
        lm,
        **task.kwargs(),
        collate_fn=hf.pad_collate(0),
        hessian_samples="all",
        gauss_newton=True,
        solver=CG(tol=1e-10, max_iter=1000),
        damping=0.1,
    )
    approx = Influence(
        lm,
        **task.kwargs(),
        collate_fn=hf.pad_collate(0),
        hessian_samples="all",
        gauss_newton=True,
        solver=EKFAC(),
        damping=0.1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = approx.fit(text).scores(text[:2])
    b = exact.fit(text).scores(text[:2])
    assert score_agreement(a, b)["pearson"] > 0.5


def test_collate_fn_equals_a_dataloader_with_it(gpt2):
    _, lm, _, text, _ = gpt2
    task = hf.task("causal-lm")
    kw = dict(**task.kwargs(), hessian_samples="all", gauss_newton=True, solver=CG(tol=1e-12), damping=0.1)
    a = Influence(lm, collate_fn=hf.pad_collate(0), **kw).fit(text).scores(text[:2])
    loader = torch.utils.data.DataLoader(text, batch_size=4, collate_fn=hf.pad_collate(0))
    b = (
        Influence(lm, **kw)
        .fit(loader)
        .scores(torch.utils.data.DataLoader(text[:2], batch_size=2, collate_fn=hf.pad_collate(0)))
    )
    assert rel(a, b) < 1e-12


def test_the_gpt2_preset_runs_the_worked_example_end_to_end(tmp_path):
    """experiment=gpt2_text composes, and its analysis (here at the smallest sizes) writes
    scores equal to the dense solve's in both modes."""
    pytest.importorskip("transformers")
    from lissa_influence.experiments import gpt2

    from hydra_helpers import compose_cfg

    cfg = compose_cfg(
        "experiment=gpt2_text",
        "gpt2.pretrain_sequences=6",
        "gpt2.finetune_sequences=6",
        "gpt2.test_points=2",
        "gpt2.n_embd=2",
        "gpt2.vocab=8",
        "gpt2.steps=20",
    )
    assert cfg.analysis.name == "gpt2"
    report = gpt2.run(cfg, tmp_path)
    for mode in ("fixed", "updated"):
        assert report[mode]["against_dense"]["scores_error"] < 1e-8
        assert (tmp_path / f"scores_{mode}.npy").is_file()
    assert report["fixed"]["finetune_path"] == "head only, exact (float64)"  # the frozen body, fixed mode
    assert report["fixed"]["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    assert (tmp_path / "gpt2.json").is_file()
