"""Data as the influence code consumes it: any map-style dataset, batched, moved as used.

The library takes data as

- a map-style ``Dataset`` whose items are any pytree of tensors: an ``(x, y)`` pair, a
  tensor tuple, a dict (``{"input_ids", "attention_mask", "labels"}``), a ``(dict,
  tensor)`` pair;
- a ``DataLoader``: its dataset, indexed by the library (the seeded Hessian sample, then
  every example in order for scoring), batched with the loader's own ``collate_fn``;
- a list of such items;
- a pair of tensors ``(X, Y)``, one row per example.

Two access patterns are needed: a seeded subsample held in memory (the Hessian sample,
reused by every product) and a stream of batches over the whole set (scoring), whose
memory is bounded by the batch. Each batch is moved to the model's device as it is
used; floating tensors take the model's dtype, integer ones (labels, token ids) keep
theirs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate

DataLike = Dataset[Any] | DataLoader[Any] | Sequence[Any]
"""What the library takes as data: a map-style ``Dataset``, a ``DataLoader``, a list of
items, or a pair of tensors ``(X, Y)``."""

Collate = Callable[[list[Any]], Any]


class SizedDataset(Protocol):
    """A map-style dataset with a length."""

    def __getitem__(self, index: int) -> Any: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class Batch:
    """A collated batch: every tensor leaf has the examples along its first dimension.

    ``Batch(x, y)`` holds ``(x, y)`` pairs, for which the default forward ``model(x)``
    applies; ``Batch(tree)`` (``y`` left out) holds any other item structure, a dict or
    a tuple of several tensors, which takes a ``forward(model, batch)``.

    Args:
        x: the inputs of ``(x, y)`` pairs, or the whole item tree.
        y: the targets of pairs (None: ``x`` is the item tree).
    """

    x: Any
    y: Any = None

    @property
    def pair(self) -> bool:
        return self.y is not None

    @property
    def tree(self) -> Any:
        """What a custom ``forward`` and ``loss`` receive: ``(x, y)`` or the item tree."""
        return (self.x, self.y) if self.pair else self.x

    def __len__(self) -> int:
        return _leading(self.tree)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        """The batch with ``fn`` applied to every tensor leaf.

        Args:
            fn: maps a tensor to a tensor.

        Returns:
            A new :class:`Batch`.
        """

        def leaf(t: Any) -> Any:
            return fn(t) if isinstance(t, torch.Tensor) else t

        return Batch(tree_map(leaf, self.x), tree_map(leaf, self.y) if self.pair else None)

    def select(self, index: slice | torch.Tensor) -> Batch:
        """The examples at ``index``.

        Args:
            index: a slice or an index tensor along the first dimension.

        Returns:
            A new :class:`Batch`.
        """
        return self.map(lambda t: t[index])

    def chunks(self, size: int) -> Iterator[Batch]:
        """The batch in consecutive chunks.

        Args:
            size: examples per chunk (the last may hold fewer).

        Yields:
            One :class:`Batch` per chunk, in order.
        """
        for start in range(0, len(self), size):
            yield self.select(slice(start, start + size))

    def tensors(self) -> list[torch.Tensor]:
        """The tensor leaves of the batch.

        Returns:
            Every tensor in :attr:`tree`, in flattening order.
        """
        return [t for t in tree_flatten(self.tree)[0] if isinstance(t, torch.Tensor)]


def _leading(tree: Any) -> int:
    for leaf in tree_flatten(tree)[0]:
        if isinstance(leaf, torch.Tensor):
            return int(leaf.shape[0]) if leaf.dim() > 0 else 1
    raise ValueError(f"a batch needs at least one tensor, got {type(tree).__name__}")


@dataclass(frozen=True)
class Source:
    """Indexable examples and how to collate them into a batch (what :func:`as_dataset` returns).

    Args:
        dataset: the examples.
        collate: turns a list of items into a batch (torch's default collate unless given).
    """

    dataset: SizedDataset
    collate: Collate = default_collate

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]


def _is_pair(item: Any) -> bool:
    return isinstance(item, (tuple, list)) and len(item) == 2


def describe(item: Any) -> str:
    """A short description of an item's structure, for error messages.

    Args:
        item: a tensor, or a tuple, list or dict of them.

    Returns:
        E.g. ``"a dict with keys ['ids', 'mask']"``.
    """
    if isinstance(item, torch.Tensor):
        return f"a tensor of shape {tuple(item.shape)}"
    if isinstance(item, dict):
        return f"a dict with keys {sorted(map(str, item))}"
    if isinstance(item, (tuple, list)):
        return f"a {type(item).__name__} of {len(item)} ({', '.join(describe(i) for i in item)})"
    return f"a {type(item).__name__}"


def as_dataset(data: DataLike | Source, what: str = "data") -> Source:
    """``data`` as a :class:`Source`, checked non-empty.

    Args:
        data: a ``Dataset``, a ``DataLoader`` (its dataset and ``collate_fn``), a list of
            items, ``(X, Y)`` tensors, or a :class:`Source` (returned as it is).
        what: the data, in errors.

    Returns:
        The :class:`Source`.
    """
    if isinstance(data, Source):
        return data
    collate: Collate = default_collate
    if isinstance(data, DataLoader):
        if data.batch_sampler is None:
            raise TypeError(
                f"{what}: a DataLoader with batch_size=None hands out its dataset's items as they are (often "
                "ready-made batches); the library batches single examples itself. Pass a DataLoader with a "
                "batch_size or batch_sampler, or the dataset of single examples"
            )
        collate = data.collate_fn
        data = data.dataset
    # only a tuple means (X, Y): a list of two tensors is a list of two items
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{what}: inputs have {x.shape[0]} rows but targets {y.shape[0]}")
        data = TensorDataset(x, y)
    if not isinstance(data, (Dataset, Sequence)) or not isinstance(data, Sized):
        raise TypeError(
            f"{what}: expected a map-style Dataset (with a length), a DataLoader over one, a list of items or a "
            f"tuple (X, Y) of tensors, got {type(data).__name__}"
        )
    if len(data) == 0:
        raise ValueError(f"{what} is empty; influence needs at least one example")
    dataset: SizedDataset = data
    return Source(dataset, collate)


def _cast(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Inputs follow the model's float dtype; integer targets (class labels, token ids) stay integer.
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)


def gather(
    data: SizedDataset, indices: Sequence[int] | torch.Tensor, dtype: torch.dtype, device: torch.device
) -> Batch:
    """Materialise the examples at ``indices`` as one batch on ``device``.

    Args:
        data: the dataset.
        indices: which examples, in order.
        dtype: the float dtype of the batch's floating tensors.
        device: where the batch goes.

    Returns:
        The collated :class:`Batch`.
    """
    source = data if isinstance(data, Source) else as_dataset(data)  # type: ignore[arg-type]
    idx = torch.as_tensor(indices, dtype=torch.long)
    base = source.dataset
    if isinstance(base, TensorDataset) and len(base.tensors) == 2 and source.collate is default_collate:
        x, y = (t[idx] for t in base.tensors)  # fast path: index the tensors, no per-item work
        return Batch(_cast(x, dtype, device), _cast(y, dtype, device))
    if len(idx) == 0:  # an empty shard: the structure of one example, zero rows
        return gather(source, [0], dtype, device).select(slice(0, 0))
    collated = source.collate([base[int(i)] for i in idx])
    if isinstance(collated, Mapping) and not isinstance(collated, dict):
        collated = dict(collated)  # a UserDict (transformers' BatchEncoding) is a pytree leaf otherwise
    # (x, y) pairs take the default forward; any other structure takes a custom one
    batch = Batch(collated[0], collated[1]) if _is_pair(collated) else Batch(collated)
    strays = [type(leaf).__name__ for leaf in tree_flatten(batch.tree)[0] if not isinstance(leaf, torch.Tensor)]
    if strays:
        raise TypeError(
            f"a batch holds {sorted(set(strays))} values besides tensors ({describe(collated)}); they cannot be "
            "split into examples or moved to the device: keep only tensors in the items (tokenize text in the "
            "dataset, turn numbers into tensors)"
        )
    return batch.map(lambda t: _cast(t, dtype, device))


def iter_batches(
    data: SizedDataset,
    batch_size: int,
    dtype: torch.dtype,
    device: torch.device,
    start: int = 0,
    stop: int | None = None,
) -> Iterator[Batch]:
    """Stream ``data[start:stop]`` in order, one batch at a time.

    Args:
        data: the dataset.
        batch_size: examples per batch.
        dtype: the float dtype of the batches' floating tensors.
        device: where the batches go.
        start: the first example.
        stop: one past the last (None: the end).

    Yields:
        One :class:`Batch` per ``batch_size`` examples.
    """
    stop = len(data) if stop is None else stop
    for lo in range(start, stop, batch_size):
        yield gather(data, range(lo, min(lo + batch_size, stop)), dtype, device)


def subsample_indices(n: int, size: int, seed: int) -> torch.Tensor:
    """``size`` distinct indices out of ``n``, drawn once with ``seed``.

    Args:
        n: how many items there are.
        size: how many to draw (all of them, in order, when ``size >= n``).
        seed: the draw's seed.

    Returns:
        A long tensor of the indices.
    """
    if size >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:size].sort().values
