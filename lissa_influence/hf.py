"""Hugging Face ``transformers`` models as users bring them: the forward, the loss, the batches.

A ``transformers`` model computes its own loss when given ``labels``, and that loss is not
what influence needs: it averages tokens over the whole batch (with padding, not the mean
of the per-sequence losses that scoring uses), casts the logits with ``.float()`` (a
float64 model gets a float32 loss), and, being computed inside the model, leaves the
Gauss-Newton matrix nothing to work with. :func:`task` gives instead a ``forward`` that
calls ``model(**inputs, use_cache=False)`` without the labels and returns the logits, and
a per-sequence loss in the model's dtype that honours ``attention_mask`` and ``-100``:

.. code-block:: python

    from lissa_influence import MultiStageInfluence, hf

    lm, classify = hf.task("causal-lm"), hf.task("classification")
    msi = MultiStageInfluence(gpt2_lm, gpt2_classifier, **lm.kwargs("pretrain"),
                              **classify.kwargs("finetune"), collate_fn=hf.pad_collate(pad_token_id=0))

``shared=`` then defaults to the models' ``base_model_prefix`` (``"transformer"``).
:func:`pad_collate` batches lists of tokenizer-style dicts of unequal lengths (a
tokenizer's ``DataCollatorWithPadding`` works as well). ``transformers`` itself is not
imported here: any model with that calling convention works.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from .task import Forward, LossFn

__all__ = ["Task", "TaskKind", "pad_collate", "task"]

TaskKind = Literal["causal-lm", "masked-lm", "classification"]
_KINDS = ("causal-lm", "masked-lm", "classification")


def _takes(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` has a parameter ``name`` (not merely ``**kwargs``)."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # no signature to read
        return False


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    logits = getattr(out, "logits", None)  # a user model's output object (ModelOutput): not a contract of ours
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(f"the model returned {type(out).__name__} without logits; use a model with a task head")


def _sequence_mean(tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean over sequences of each sequence's mean token loss (``-100``: no loss)."""
    counted = (labels != -100).sum(1)
    if bool((counted == 0).any()):
        empty = (counted == 0).nonzero().squeeze(1).tolist()
        raise ValueError(
            f"sequences {empty[:10]} of the batch have no labelled token (all -100 or padding): such an example has "
            "no loss and no influence; drop it"
        )
    return (tokens.sum(1) / counted.to(tokens.dtype)).mean()


@dataclass(frozen=True)
class Task:
    """A ``forward`` and a per-sequence ``loss`` for one kind of ``transformers`` head.

    Batches are dicts of tensors (``input_ids``, ``attention_mask``, ``token_type_ids``
    ..., and ``labels_key``). The forward passes every key but the labels to the model,
    with ``use_cache=False`` where the model takes it (a cache object among the outputs
    would stop the head path and Gauss-Newton products), and returns the logits.

    Losses, all in the logits' dtype and averaged first within each sequence, then over
    the batch (so that a batch's loss is the mean of its examples' losses):

    - ``"causal-lm"``: next-token cross-entropy; labels are ``labels_key`` if the batch
      has it, else the ``input_ids`` with padding (``attention_mask == 0``) set to -100;
    - ``"masked-lm"``: cross-entropy on the tokens whose label is not -100;
    - ``"classification"``: cross-entropy of ``[batch, classes]`` logits against class
      indices.

    Args:
        kind: the head, one of ``"causal-lm"``, ``"masked-lm"``, ``"classification"``.
        labels_key: the batch key of the labels.
    """

    kind: TaskKind
    labels_key: str = "labels"

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"kind={self.kind!r}: use one of {list(_KINDS)}")

    def forward(self, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        """The logits of ``model`` on ``batch`` (without its labels).

        Args:
            model: a ``transformers`` model (or any module called with keyword inputs).
            batch: a dict of tensors.

        Returns:
            The logits.
        """
        if not isinstance(batch, Mapping):
            raise TypeError(f"hf.task({self.kind!r}) takes dict batches (tokenizer output), got {type(batch).__name__}")
        inputs = {k: v for k, v in batch.items() if k != self.labels_key}
        if _takes(model, "use_cache"):
            inputs["use_cache"] = False
        return _logits(model(**inputs))

    def labels(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The labels of ``batch``.

        Args:
            batch: a tokenizer-style dict.

        Returns:
            ``batch[labels_key]``; for ``"causal-lm"`` without them, the unpadded ``input_ids``.
        """
        if self.labels_key in batch:
            return batch[self.labels_key]
        if self.kind != "causal-lm":
            raise KeyError(f"hf.task({self.kind!r}): the batch has no {self.labels_key!r} key")
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        return ids if mask is None else ids.masked_fill(mask == 0, -100)

    def loss(self, logits: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """The mean over the batch's examples of each example's loss.

        Args:
            logits: what :meth:`forward` returned.
            batch: the same batch.

        Returns:
            A scalar in the logits' dtype.
        """
        labels = self.labels(batch)
        if self.kind == "classification":
            return F.cross_entropy(logits, labels)
        if self.kind == "causal-lm":  # position t predicts token t + 1
            logits, labels = logits[:, :-1], labels[:, 1:]
        tokens = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
        return _sequence_mean(tokens, labels)

    def kwargs(self, stage: Literal["pretrain", "finetune"] | None = None) -> dict[str, Forward | LossFn]:
        """Estimator keyword arguments: ``forward=``, ``loss=`` (``stage=None``: :class:`~lissa_influence.Influence`)
        or ``pretrain_forward=``, ``pretrain_loss=`` / ``finetune_...`` (:class:`~lissa_influence.MultiStageInfluence`).

        Args:
            stage: None, ``"pretrain"`` or ``"finetune"``.

        Returns:
            A dict to unpack into the estimator.
        """
        if stage is None:
            return {"forward": self.forward, "loss": self.loss}
        if stage not in ("pretrain", "finetune"):
            raise ValueError(f"stage={stage!r}: use None, 'pretrain' or 'finetune'")
        return {f"{stage}_forward": self.forward, f"{stage}_loss": self.loss}


def task(kind: TaskKind, labels_key: str = "labels") -> Task:
    """The forward and per-sequence loss for a ``transformers`` head (:class:`Task`).

    Args:
        kind: ``"causal-lm"``, ``"masked-lm"`` or ``"classification"``.
        labels_key: the batch key of the labels.

    Returns:
        The :class:`Task`; ``Influence(model, **task(...).kwargs())``.
    """
    return Task(kind, labels_key)


_PAD_DEFAULTS = {"labels": -100, "attention_mask": 0, "token_type_ids": 0}


def pad_collate(
    pad_token_id: int = 0, pad_values: Mapping[str, int] | None = None
) -> Callable[[Sequence[Mapping[str, Any]]], dict[str, torch.Tensor]]:
    """A ``collate_fn`` for tokenizer-style dicts of unequal lengths: every sequence key
    right-padded to the batch's longest (``input_ids`` with ``pad_token_id``, ``labels``
    with -100, ``attention_mask`` and ``token_type_ids`` with 0, or ``pad_values``), a
    missing ``attention_mask`` made from the lengths, scalars (a class label) stacked.

    Args:
        pad_token_id: the padding token of ``input_ids`` (and of any other unknown key).
        pad_values: padding per key, over the defaults.

    Returns:
        ``collate(items) -> dict of tensors``, for ``collate_fn=`` of the estimators or a DataLoader.
    """
    pads = {**_PAD_DEFAULTS, **(pad_values or {})}

    def collate(items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not items or not all(isinstance(i, Mapping) for i in items):
            raise TypeError("pad_collate takes a list of dicts (one tokenized example each)")
        out: dict[str, torch.Tensor] = {}
        for key in items[0]:
            rows = [torch.as_tensor(i[key]) for i in items]
            if rows[0].dim() == 0:
                out[key] = torch.stack(rows)
                continue
            longest = max(r.shape[0] for r in rows)
            fill = pads.get(key, pad_token_id)
            out[key] = torch.stack([F.pad(r, (0, longest - r.shape[0]), value=fill) for r in rows])
        if "attention_mask" not in out and "input_ids" in out and out["input_ids"].dim() == 2:
            lengths = torch.tensor([len(i["input_ids"]) for i in items])
            out["attention_mask"] = (torch.arange(out["input_ids"].shape[1]) < lengths[:, None]).long()
        return out

    return collate
