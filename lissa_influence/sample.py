"""Where an estimator's Hessian sample and parameters come from: :func:`hessian_sample`
(seeded, sharded across ranks, checked) and :func:`trainable_params`."""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from . import distributed as _dist
from .batching import Batch, SizedDataset, gather, subsample_indices
from .params import Params, check_finite, named_params
from .task import Task, check_batch, check_batch_mean, eval_mode, probe

__all__ = ["HessianSamples", "hessian_sample", "rank_world", "trainable_params"]

HessianSamples = int | Literal["all"]
"""How many examples estimate a Hessian: a count (seeded subsample) or ``"all"``."""


def trainable_params(
    model: nn.Module, dtype: torch.dtype | None, what: str, frozen: Callable[[str], bool] | None = None
) -> Params:
    """The model's trainable parameters (cast to ``dtype``), checked finite.

    Args:
        model: the model.
        dtype: the float dtype to cast to (None: the model's).
        what: the model's name in errors.
        frozen: also take the frozen parameters (``requires_grad=False``) whose names it
            accepts (a fixed embedding, frozen during finetuning), in model order.

    Returns:
        The parameters by name, detached.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} must be a torch.nn.Module, got {type(model).__name__}")
    params = named_params(model)
    if frozen is not None:
        params = {n: p.detach() for n, p in model.named_parameters() if n in params or frozen(n)}
    if not params:
        raise ValueError(f"{what} has no trainable parameters")
    if dtype is not None:
        params = {n: p.to(dtype) for n, p in params.items()}
    check_finite(f"{what} parameter", params)
    return params


def rank_world(distributed: bool) -> tuple[int, int]:
    """This process's rank and the world size, ``(0, 1)`` without a process group or with ``distributed=False``.

    Args:
        distributed: whether the estimator splits its work across ranks.

    Returns:
        ``(rank, world)``.
    """
    return (_dist.rank(), _dist.world_size()) if distributed and _dist.is_distributed() else (0, 1)


def hessian_sample(
    data: SizedDataset,
    size: HessianSamples,
    seed: int,
    params: Params,
    what: str,
    distributed: bool,
    task: Task,
    model: nn.Module | None = None,
) -> dict[str, Any]:
    """The seeded Hessian sample as :class:`~lissa_influence.objective.Objective` keyword arguments.

    All of it, or under torch.distributed this rank's contiguous shard of the same draw
    (every rank draws with the same seed), its place in the sample and the cross-rank
    sum. Checked: the structure the forward needs, finite values, and (given ``model``)
    one example through the model and the loss.

    Args:
        data: the dataset to draw from.
        size: how many examples (:data:`HessianSamples`).
        seed: the draw's seed.
        params: the parameters (their dtype and device are the sample's).
        what: the data, in errors and warnings.
        distributed: shard the sample across the ranks of a process group, if there is one.
        task: the forward and the loss.
        model: the model, for the check of one example (None: not checked).

    Returns:
        ``{"batch": ...}``, plus ``sample_size``, ``sample_offset`` and ``reduce`` on a shard.
    """
    asked = size
    if size == "all":
        size = len(data)
    else:
        try:  # any integer (numpy's too), but not a bool, a float or another string
            size = operator.index(size) if not isinstance(size, bool) else 0
        except TypeError:
            size = 0
        if size < 1:
            raise ValueError(f"hessian_samples must be a positive number or 'all', got {asked!r}")
    if size > len(data):
        warnings.warn(
            f"hessian_samples={size} exceeds the {len(data)} {what} examples; using all of them "
            "(hessian_samples='all' asks for that)",
            stacklevel=3,
        )
    t = next(iter(params.values()))
    indices = subsample_indices(len(data), size, seed)
    rank, world = rank_world(distributed)
    if world == 1:
        batch = gather(data, indices, t.dtype, t.device)
        _check_sample(batch, params, task, model, f"{what} data")
        return {"batch": batch}
    lo, hi = _dist.shard_range(len(indices), rank, world)
    batch = gather(data, indices[lo:hi], t.dtype, t.device)
    _check_sample(batch, params, task, model, f"{what} data (rank {rank})")
    return {"batch": batch, "sample_size": len(indices), "sample_offset": lo, "reduce": _dist.all_reduce_sum}


def _check_sample(batch: Batch, params: Params, task: Task, model: nn.Module | None, what: str) -> None:
    """The Hessian sample: the structure the forward needs, finite values, and one example
    through the model and the loss (labels against the classes, for cross-entropy)."""
    check_batch(batch, task.forward, what)
    check_finite(f"{what} (Hessian sample)", batch.tensors())
    if model is not None and len(batch) > 0:
        with eval_mode(model):
            probe(model, params, batch, task, what)
            check_batch_mean(model, params, batch, task.forward, task.loss, what)
