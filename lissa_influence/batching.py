"""Datasets of ``(x, y)`` pairs as the influence code consumes them.

The library accepts a ``torch.utils.data.Dataset`` yielding ``(x, y)`` or a pair of
tensors ``(X, Y)``. Two access patterns are needed: a seeded subsample held in memory
(the Hessian sample, reused by every product) and a stream of batches over the whole
set (scoring), whose memory is bounded by the batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence, Sized
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.utils.data import Dataset, TensorDataset

DataLike = Dataset[Any] | Sequence[torch.Tensor]
"""What the library takes as data: a map-style ``Dataset`` or a pair of tensors ``(X, Y)``."""


class SizedDataset(Protocol):
    """A map-style dataset with a length (what :func:`as_dataset` returns)."""

    def __getitem__(self, index: int) -> Any: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class Batch:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def chunks(self, size: int) -> Iterator[Batch]:
        for start in range(0, len(self), size):
            yield Batch(self.x[start : start + size], self.y[start : start + size])


def as_dataset(data: DataLike, what: str = "data") -> SizedDataset:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{what}: inputs have {x.shape[0]} rows but targets {y.shape[0]}")
        data = TensorDataset(x, y)
    if not isinstance(data, Dataset) or not isinstance(data, Sized):
        raise TypeError(
            f"{what}: expected a torch Dataset of (x, y) with a length, or a tuple (X, Y) of tensors, got "
            f"{type(data).__name__}"
        )
    if len(data) == 0:
        raise ValueError(f"{what} is empty; influence needs at least one example")
    return data


def _cast(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Inputs follow the model's float dtype; integer targets (class labels) stay integer.
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)


def gather(
    data: SizedDataset, indices: Sequence[int] | torch.Tensor, dtype: torch.dtype, device: torch.device
) -> Batch:
    """Materialise the examples at ``indices`` as one batch."""
    idx = torch.as_tensor(indices, dtype=torch.long)
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        x, y = (t[idx] for t in data.tensors)
    elif len(idx) == 0:  # an empty shard: the shapes of one example, zero rows
        one = gather(data, [0], dtype, device)
        return Batch(one.x[:0], one.y[:0])
    else:
        pairs = [data[int(i)] for i in idx]
        x = torch.stack([torch.as_tensor(p[0]) for p in pairs])
        y = torch.stack([torch.as_tensor(p[1]) for p in pairs])
    return Batch(_cast(x, dtype, device), _cast(y, dtype, device))


def iter_batches(
    data: SizedDataset,
    batch_size: int,
    dtype: torch.dtype,
    device: torch.device,
    start: int = 0,
    stop: int | None = None,
) -> Iterator[Batch]:
    """Stream ``data[start:stop]`` in order, one batch at a time."""
    stop = len(data) if stop is None else stop
    for lo in range(start, stop, batch_size):
        yield gather(data, range(lo, min(lo + batch_size, stop)), dtype, device)


def subsample_indices(n: int, size: int, seed: int) -> torch.Tensor:
    """``size`` distinct indices out of ``n``, drawn once with ``seed`` (all of them, in order, when ``size >= n``)."""
    if size >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:size].sort().values
