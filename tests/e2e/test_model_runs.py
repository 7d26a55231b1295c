"""The long end-to-end model runs: a torchvision ResNet-18 as a two-stage model, and a
transformer pretrained as a language model then finetuned as a classifier, each against the
dense formula (the task contract of lissa_influence.task on real architectures; the short
contract tests are tests/lib/test_task.py)."""

from __future__ import annotations

import contextlib
import time
import warnings

import dense
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, TensorDataset

from lissa_influence import CG, MultiStageInfluence, SolverWarning
from lissa_influence.params import named_params

from conftest import rel

# --- a torchvision ResNet-18 as a two-stage model ---------------------------------------------
BODY = ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]


@pytest.mark.slow
def test_resnet18_two_stage_equals_the_dense_formula():
    """Random-init ResNet-18s on 16x16 images: the body (a list of prefixes, BatchNorm in eval
    mode) shared, a new ``fc`` for the finetuning task. The dense reference needs a small
    parameter set, so only the shift of ``bn1`` in the body and the ``fc`` biases train; the rest of the
    network (11M parameters) runs through every product unchanged."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    pre = torchvision.models.resnet18(num_classes=3).double().eval()
    ft = torchvision.models.resnet18(num_classes=2).double().eval()
    ft.load_state_dict({k: v for k, v in pre.state_dict().items() if not k.startswith("fc.")}, strict=False)
    for model in (pre, ft):
        for name, p in model.named_parameters():
            p.requires_grad_(name in ("bn1.bias", "fc.bias"))
    g = torch.Generator().manual_seed(0)
    xp, yp = torch.randn(6, 3, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
    xf, yf = torch.randn(8, 3, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 2, (8,), generator=g)
    msi = MultiStageInfluence(
        pre,
        ft,
        shared=BODY,
        pretrain_damping=0.5,
        finetune_damping=0.5,
        hessian_samples="all",
        solver=CG(tol=1e-12, max_iter=500),
        batch_size=4,
    )
    got = msi.fit((xp, yp), DataLoader(TensorDataset(xf, yf), batch_size=4)).scores((xf[:2], yf[:2]))
    assert msi.W.names == ("bn1.bias",) and msi.Theta.names == ("fc.bias",)
    pre_p, ft_p = named_params(pre), named_params(ft)

    def ce(model, x, y):
        return lambda p: F.cross_entropy(functional_call(model, p, (x,)), y)

    expected = dense.multistage_fixed(
        pre_p,
        ft_p,
        msi.W,
        msi.U,
        msi.Theta,
        ce(pre, xp, yp),
        ce(ft, xf, yf),
        [ce(ft, xf[j : j + 1], yf[j : j + 1]) for j in range(2)],
        [ce(pre, xp[i : i + 1], yp[i : i + 1]) for i in range(6)],
        0.5,
        0.5,
    )
    assert rel(got, expected) <= 1e-7
    assert msi.diagnostics["pretrain"]["converged"] and msi.diagnostics["finetune"]["converged"]


# --- a small transformer with dict batches -----------------------------------------------------
VOCAB, LENGTH, PAD = 11, 6, 0


class TinyTransformer(nn.Module):
    """Token embedding, learned positions, one encoder layer; ``head`` predicts the next
    token (language model) or the class of the sequence (classifier)."""

    def __init__(self, outputs: int, d: int = 8):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(0.1 * torch.randn(LENGTH, d))
        layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=16, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(d, outputs)

    def body(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embed(ids) + self.pos[: ids.shape[1]], src_key_padding_mask=mask == 0)


def lm_forward(model, batch):
    return model.head(model.body(batch["input_ids"], batch["attention_mask"]))


def lm_loss(logits, batch):
    """Next-token cross-entropy, mean over each sequence's tokens (padding ignored), then
    over the sequences: the mean over the batch's examples that the contract asks for."""
    labels = batch["labels"]
    tokens = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return (tokens.sum(1) / (labels != -100).sum(1)).mean()


def classifier_forward(model, batch):
    h, mask = model.body(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"].unsqueeze(-1)
    return model.head((h * mask).sum(1) / mask.sum(1))


def classifier_loss(logits, batch):
    return F.cross_entropy(logits, batch["labels"])


def sequences(n: int, seed: int, classify: bool) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, LENGTH + 1, (1,), generator=g))
        ids = torch.full((LENGTH,), PAD)
        ids[:length] = torch.randint(1, VOCAB, (length,), generator=g)
        mask = (ids != PAD).long()
        if classify:
            labels = (ids[:length].sum() % 2).reshape(())
        else:
            labels = torch.full((LENGTH,), -100)
            labels[: length - 1] = ids[1:length]
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def test_transformer_lm_pretraining_then_classifier_finetuning():
    torch.manual_seed(0)
    pre, ft = TinyTransformer(VOCAB).double().eval(), TinyTransformer(2).double().eval()
    ft.load_state_dict({k: v for k, v in pre.state_dict().items() if not k.startswith("head.")}, strict=False)
    lm_data, cls_data = sequences(12, 1, classify=False), sequences(10, 2, classify=True)
    tests = cls_data[:2]
    msi = MultiStageInfluence(
        pre,
        ft,
        shared=["embed", "pos", "encoder"],
        pretrain_loss=lm_loss,
        finetune_loss=classifier_loss,
        pretrain_forward=lm_forward,
        finetune_forward=classifier_forward,
        pretrain_damping=2.0,  # the untrained LM's Hessian has eigenvalues down to -1.5
        finetune_damping=2.0,
        hessian_samples="all",
        solver=CG(tol=1e-10, max_iter=500),
        batch_size=8,
    )
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error", SolverWarning)  # both solves converge
        got = msi.fit(lm_data, DataLoader(cls_data, batch_size=4)).scores(tests)
    seconds = time.perf_counter() - t0
    print(
        f"transformer: {msi.W.numel} shared, {msi.U.numel} LM head, {msi.Theta.numel} classifier parameters; "
        f"{seconds:.2f} s; finetune {msi.diagnostics['finetune']['iterations']} / pretrain "
        f"{msi.diagnostics['pretrain']['iterations']} CG iterations; scores {got.tolist()}"
    )
    collate = torch.utils.data.default_collate

    def on(model, forward, loss, items):
        batch = collate(items)
        return lambda p: loss(_call(model, forward, p, batch), batch)

    # attention in its twice-differentiable form (torch's fused kernels have no second derivative)
    with sdpa_kernel([SDPBackend.MATH]), mha_fastpath(False):
        expected = dense.multistage_fixed(
            named_params(pre),
            named_params(ft),
            msi.W,
            msi.U,
            msi.Theta,
            on(pre, lm_forward, lm_loss, lm_data),
            on(ft, classifier_forward, classifier_loss, cls_data),
            [on(ft, classifier_forward, classifier_loss, [t]) for t in tests],
            [on(pre, lm_forward, lm_loss, [e]) for e in lm_data],
            2.0,
            2.0,
        )
    assert got.shape == (2, 12) and rel(got, expected) <= 1e-7


@contextlib.contextmanager
def mha_fastpath(enabled: bool):
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


class _Bound(nn.Module):
    def __init__(self, model, forward):
        super().__init__()
        self.model, self.forward_fn = model, forward

    def forward(self, batch):
        return self.forward_fn(self.model, batch)


def _call(model, forward, params, batch):
    """``forward(model, batch)`` with ``params``, by plain ``functional_call`` (independent of the library's)."""
    return functional_call(_Bound(model, forward), {f"model.{k}": v for k, v in params.items()}, (batch,))
