"""How a batch becomes a loss: the ``forward`` and ``loss`` contract, in one place.

``outputs = forward(model, batch)``, then the mean loss over the batch's examples:

- ``(x, y)`` items with no ``forward``: ``outputs = model(x)`` and ``loss(outputs, y)``;
- any other items (a dict, a tuple of several tensors), or a custom ``forward``:
  ``loss(outputs, batch)``, where ``batch`` is the collated item structure (``(x, y)``
  for pairs).

Gauss-Newton curvature needs exactly this split of the network (``forward``) from a
convex loss of its outputs. Per-example losses, for scoring, are the same loss on
one-example batches. Every call is functional: the parameters of the block in question
are substituted for the model's own, its buffers (BatchNorm statistics) and frozen
parameters pass through unchanged, or cast to the parameters' dtype where those were cast
(an estimator's ``dtype``).
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


def cast_state(model: nn.Module, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's floating buffers (BatchNorm statistics) and frozen parameters in the dtype
    of ``params`` where ``params`` are a cast of its parameters (``dtype=torch.float64`` on a
    float32 model), else nothing: a layer cannot mix the two dtypes. Cast at each call, so
    that they stay the model's own."""
    name, p = next(iter(params.items()), (None, None))
    if name is None or p is None or not p.is_floating_point():
        return {}
    try:
        own = model.get_parameter(name)
    except AttributeError:  # not one of the model's parameters (a head objective's buffer, say)
        return {}
    if own.dtype == p.dtype:
        return {}
    rest = [*model.named_buffers(), *((n, q) for n, q in model.named_parameters() if n not in params)]
    return {n: t.detach().to(p.dtype) for n, t in rest if t.is_floating_point() and t.dtype != p.dtype}


def outputs(model: nn.Module, params: Mapping[str, torch.Tensor], batch: Batch, forward: Forward | None) -> Any:
    """The model's outputs on ``batch`` with ``params`` in place of its own (and its float
    buffers and frozen parameters in their dtype, where that differs from the model's:
    :func:`cast_state`)."""
    tensors = {**cast_state(model, params), **params}
    if forward is None:
        return functional_call(model, tensors, (batch.x,))
    # a wrapper per call (microseconds): keeping them would keep every model alive
    return functional_call(_Call(model, forward), {f"model.{n}": p for n, p in tensors.items()}, (batch.tree,))


def mean_loss(loss_fn: LossFn, out: Any, batch: Batch, forward: Forward | None) -> torch.Tensor:
    """``loss(outputs, y)`` for pairs with the default forward, ``loss(outputs, batch)`` otherwise."""
    return loss_fn(out, batch.y if forward is None else batch.tree)


def probe(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    batch: Batch,
    forward: Forward | None,
    loss_fn: LossFn,
    what: str,
) -> Any:
    """One forward pass and loss on the first example of ``batch``, so that data the model or
    the loss cannot take fails by name here, not deep inside torch; the outputs."""
    one = batch.select(slice(0, 1))
    try:
        out = outputs(model, params, one, forward)
    except (RuntimeError, IndexError, TypeError, ValueError, KeyError) as e:
        raise ValueError(
            f"{what}: the model cannot take its examples ({describe(one.tree)} for one example): "
            f"{type(e).__name__}: {str(e).splitlines()[0]}"
        ) from e
    if forward is None and loss_fn is cross_entropy:
        check_labels(batch, out, what)
    try:
        mean_loss(loss_fn, out, one, forward)
    except (RuntimeError, IndexError, TypeError, ValueError, KeyError) as e:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"{what}: the loss cannot take the model's outputs ({shape}) and "
            f"{'the targets ' + describe(one.y) if forward is None else 'the batch'}: "
            f"{type(e).__name__}: {str(e).splitlines()[0]}"
        ) from e
    return out


def check_labels(batch: Batch, out: Any, what: str) -> None:
    """Class labels for the default cross-entropy: integers in ``[0, classes)``."""
    y = batch.y
    if not isinstance(y, torch.Tensor) or not isinstance(out, torch.Tensor) or out.dim() != 2:
        return
    if y.is_floating_point():
        if y.shape[1:] == out.shape[1:]:
            return  # class probabilities: cross-entropy takes those too
        raise ValueError(
            f"{what}: the targets are {y.dtype} of shape {tuple(y.shape)}; cross-entropy takes class indices "
            "(an integer tensor, e.g. y.long()) or class probabilities of the outputs' shape. For regression pass "
            "loss=torch.nn.functional.mse_loss"
        )
    classes = out.shape[1]
    if bool((y == -100).any()):
        raise ValueError(
            f"{what}: label -100 (cross-entropy's ignore_index) at examples "
            f"{(y == -100).nonzero().squeeze(1).tolist()[:10]}: such an example has no loss and no influence; "
            "drop those examples, or pass a loss of your own"
        )
    bad = ((y < 0) | (y >= classes)).nonzero().squeeze(1)
    if len(bad):
        raise ValueError(
            f"{what}: labels {sorted(set(y[bad].tolist()))[:10]} at examples {bad.tolist()[:10]} are outside the "
            f"model's {classes} classes [0, {classes})"
        )
