"""How a batch becomes a loss: the ``forward`` and ``loss`` contract, in one place.

``outputs = forward(model, batch)``, then the mean loss over the batch's examples:

- ``(x, y)`` items with no ``forward``: ``outputs = model(x)`` and ``loss(outputs, y)``;
- any other items (a dict, a tuple of several tensors), or a custom ``forward``:
  ``loss(outputs, batch)``, where ``batch`` is the collated item structure (``(x, y)``
  for pairs).

Gauss-Newton curvature needs exactly this split of the network (``forward``) from a
convex loss of its outputs. Per-example losses, for scoring, are the same loss on
one-example batches. Every call is functional: the parameters of the block in question
are substituted for the model's own, its buffers (BatchNorm statistics) pass through
unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from .batching import Batch, describe

Forward = Callable[[nn.Module, Any], Any]
"""``forward(model, batch) -> outputs``: calls the model on a collated batch."""

LossFn = Callable[[Any, Any], torch.Tensor]
"""``loss(outputs, targets)`` for ``(x, y)`` items, ``loss(outputs, batch)`` otherwise: the
mean over the batch's examples."""


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs, targets)


class _Call(nn.Module):
    """A module whose forward is ``fn(model, batch)``, so that ``functional_call``
    substitutes parameters wherever ``fn`` reaches into the model."""

    def __init__(self, model: nn.Module, fn: Forward):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, batch: Any) -> Any:
        return self.fn(self.model, batch)


def check_batch(batch: Batch, forward: Forward | None, what: str) -> None:
    """A batch that the default forward cannot take fails here, saying what it received."""
    if forward is None and not batch.pair:
        raise TypeError(
            f"{what}: the items batch to {describe(batch.x)}, not (x, y) pairs, so the default forward model(x) "
            "does not apply and no target can be told apart. Pass forward=lambda model, batch: ... returning the "
            "model's outputs (MultiStageInfluence: pretrain_forward= / finetune_forward=), and a "
            "loss(outputs, batch) that reads its targets from the batch."
        )


def outputs(model: nn.Module, params: Mapping[str, torch.Tensor], batch: Batch, forward: Forward | None) -> Any:
    """The model's outputs on ``batch`` with ``params`` in place of its own."""
    if forward is None:
        return functional_call(model, dict(params), (batch.x,))
    # a wrapper per call (microseconds): keeping them would keep every model alive
    return functional_call(_Call(model, forward), {f"model.{n}": p for n, p in params.items()}, (batch.tree,))


def mean_loss(loss_fn: LossFn, out: Any, batch: Batch, forward: Forward | None) -> torch.Tensor:
    """``loss(outputs, y)`` for pairs with the default forward, ``loss(outputs, batch)`` otherwise."""
    return loss_fn(out, batch.y if forward is None else batch.tree)
