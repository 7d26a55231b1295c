"""A worked Hugging Face example: a tiny GPT-2 pretrained as a language model on text the
package makes, finetuned as ``GPT2ForSequenceClassification``, scored by multi-stage
influence in both modes and checked against the dense solve (``Explicit``).

The text: sequences of 4-8 tokens drawn from one of two seeded Markov chains over a small
vocabulary; pretraining models the tokens, finetuning tells the chains apart. Nothing is
downloaded; the models are built from configs. Needs ``pip install ".[hf]"``.

``lissa-influence experiment=gpt2_text`` runs it (``analysis.name=gpt2``), writing
``scores_fixed.npy``, ``scores_updated.npy`` and ``gpt2.json``; docs/usage.md shows the same
steps as library calls, and tests/lib/test_hf.py runs them.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lissa_influence import CG, Explicit, MultiStageInfluence, hf, score_agreement

__all__ = ["Gpt2Config", "make_text", "run", "train", "worked_example"]


@dataclass
class Gpt2Config:
    """The example's sizes and recipe (the ``gpt2:`` config section)."""

    pretrain_sequences: int = 48
    finetune_sequences: int = 32
    test_points: int = 4
    vocab: int = 16
    n_embd: int = 8
    n_layer: int = 1
    n_head: int = 2
    steps: int = 150
    lr: float = 0.02
    pretrain_damping: float = 0.1
    finetune_damping: float = 0.01
    alpha: float = 0.01
    seed: int = 0


def make_text(n: int, vocab: int, seed: int, labelled: bool) -> list[dict[str, torch.Tensor]]:
    """``n`` token sequences of 4-8 tokens from two seeded Markov chains over ``vocab - 1``
    tokens (0 is padding); with ``labelled``, each item's ``labels`` is its chain."""
    g = torch.Generator().manual_seed(seed)
    chains = torch.softmax(3 * torch.randn(2, vocab - 1, vocab - 1, generator=torch.Generator().manual_seed(1)), -1)
    items = []
    for i in range(n):
        label = i % 2
        length = int(torch.randint(4, 9, (1,), generator=g))
        tokens = [int(torch.randint(0, vocab - 1, (1,), generator=g))]
        for _ in range(length - 1):
            tokens.append(int(torch.multinomial(chains[label, tokens[-1]], 1, generator=g)))
        item = {"input_ids": torch.tensor(tokens) + 1}
        if labelled:
            item["labels"] = torch.tensor(label)
        items.append(item)
    return items


def train(model: nn.Module, task: hf.Task, data: list[dict[str, torch.Tensor]], cfg: Gpt2Config) -> float:
    """Full-batch Adam on ``task``'s loss over the trainable parameters; the final loss."""
    batch = hf.pad_collate(0)(data)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    model.train()
    for _ in range(cfg.steps):
        opt.zero_grad()
        loss = task.loss(task.forward(model, batch), batch)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return float(task.loss(task.forward(model, batch), batch))


def worked_example(cfg: Gpt2Config) -> dict[str, Any]:
    """Pretrain, finetune (head only, and the whole model with the proximity term), score
    with CG and with the dense solve; the scores and how closely CG matches."""
    import transformers  # the hf extra

    transformers.logging.set_verbosity_error()
    torch.manual_seed(cfg.seed)
    arch: dict[str, Any] = dict(n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head, vocab_size=cfg.vocab)
    arch.update(n_positions=8, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    pre_text = make_text(cfg.pretrain_sequences, cfg.vocab, cfg.seed, labelled=False)
    ft_text = make_text(cfg.finetune_sequences + cfg.test_points, cfg.vocab, cfg.seed + 1, labelled=True)
    ft_train, test = ft_text[: cfg.finetune_sequences], ft_text[cfg.finetune_sequences :]
    lm_task, cls_task = hf.task("causal-lm"), hf.task("classification")

    lm = transformers.GPT2LMHeadModel(transformers.GPT2Config(**arch)).double()
    report: dict[str, Any] = {"pretrain_loss": train(lm, lm_task, pre_text, cfg)}
    classifier = transformers.GPT2ForSequenceClassification(
        transformers.GPT2Config(**{**arch, "num_labels": 2})
    ).double()
    classifier.transformer.load_state_dict(lm.transformer.state_dict())
    fixed = copy.deepcopy(classifier)
    fixed.transformer.requires_grad_(False)  # finetune the head only: the body stays the pretrained one
    report["finetune_loss_fixed"] = train(fixed, cls_task, ft_train, cfg)
    updated = copy.deepcopy(classifier)
    report["finetune_loss_updated"] = train(updated, cls_task, ft_train, cfg)

    out: dict[str, Any] = {"report": report, "scores": {}}
    for mode, finetuned in (("fixed", fixed), ("updated", updated)):
        kw: dict[str, Any] = dict(
            mode=mode,
            alpha=cfg.alpha,
            **lm_task.kwargs("pretrain"),
            **cls_task.kwargs("finetune"),
            collate_fn=hf.pad_collate(pad_token_id=0),
            pretrain_damping=cfg.pretrain_damping,
            finetune_damping=cfg.finetune_damping,
            hessian_samples="all",
            gauss_newton=True,
        )
        t0 = time.perf_counter()
        msi = MultiStageInfluence(lm, finetuned, solver=CG(tol=1e-10, max_iter=2000), **kw).fit(pre_text, ft_train)
        scores = msi.scores(test)
        seconds = time.perf_counter() - t0
        dense = MultiStageInfluence(lm, finetuned, solver=Explicit(), **kw).fit(pre_text, ft_train).scores(test)
        out["scores"][mode] = scores
        report[mode] = {
            "seconds": seconds,
            "against_dense": score_agreement(scores, dense),
            "shared": msi.shared,
            "tied": msi.tied,
            "finetune_path": msi.finetune_path,
            "diagnostics": msi.diagnostics,
        }
    return out


def run(cfg: Any, out_dir: str | Path) -> dict[str, Any]:
    """The Hydra analysis ``gpt2``: :func:`worked_example` with ``cfg.gpt2``; writes the
    scores and ``gpt2.json`` into ``out_dir``."""
    settings = Gpt2Config(**{k: v for k, v in dict(cfg.gpt2).items()})
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    result = worked_example(settings)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for mode, scores in result["scores"].items():
        np.save(out / f"scores_{mode}.npy", scores.detach().cpu().numpy())
    (out / "gpt2.json").write_text(json.dumps(result["report"], indent=2, default=str))
    return result["report"]
