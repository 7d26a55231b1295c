"""Named parameters <-> flat vectors, for any subset of a model's parameters.

Every stage of the influence chain works on a block of parameters (W, U, Θ, or
(W, Θ) in the notation of docs/math.md). A :class:`ParamBlock` fixes which names belong to the block
and in what order, so that flat vectors from different operators line up.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ParamBlock:
    """An ordered set of parameter names with their shapes.

    ``flatten`` and ``unflatten`` are inverses; ``unflatten`` also accepts a leading
    batch dimension (``[k, P]`` -> tensors of shape ``[k, *shape]``).

    Args:
        names: the parameters' names, in the order of the flat vector.
        shapes: their shapes.

    Example:
        >>> import torch
        >>> params = dict(torch.nn.Linear(3, 2).named_parameters())
        >>> block = make_block(params, ["weight", "bias"])
        >>> block.numel, block.unflatten(block.flatten(params))["bias"].shape
        (8, torch.Size([2]))
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The block's tensors as one flat vector.

        Args:
            tensors: a mapping that holds every name of the block.

        Returns:
            ``[numel]``.

        Raises:
            KeyError: names of the block are missing.
        """
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise KeyError(f"flatten: missing parameters {missing}")
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def unflatten(self, flat: torch.Tensor) -> Params:
        """A flat vector (or a stack of them) as named tensors.

        Args:
            flat: ``[numel]`` or ``[k, numel]``.

        Returns:
            The tensors by name, of shape ``[*shape]`` or ``[k, *shape]``.
        """
        if flat.shape[-1] != self.numel:
            raise ValueError(f"unflatten: vector has {flat.shape[-1]} entries, block has {self.numel}")
        lead = flat.shape[:-1]
        parts = torch.split(flat, list(self.sizes), dim=-1)
        return {n: p.reshape(*lead, *s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)}

    def slice_of(self, name: str) -> slice:
        """Position of one parameter inside the flat vector.

        Args:
            name: a name of the block.

        Returns:
            Its slice.
        """
        start = 0
        for n, size in zip(self.names, self.sizes, strict=True):
            if n == name:
                return slice(start, start + size)
            start += size
        raise KeyError(name)

    def embed(self, sub: ParamBlock, flat_sub: torch.Tensor) -> torch.Tensor:
        """Place a vector of a sub-block into this block, zeros elsewhere (``[u; 0]``).

        Args:
            sub: a block whose names are in this one.
            flat_sub: ``[|sub|]`` or ``[k, |sub|]``.

        Returns:
            ``[numel]`` or ``[k, numel]``.
        """
        out = flat_sub.new_zeros(*flat_sub.shape[:-1], self.numel)
        for name, piece in sub.unflatten(flat_sub).items():
            out[..., self.slice_of(name)] = piece.reshape(*flat_sub.shape[:-1], -1)
        return out

    def restrict(self, sub: ParamBlock, flat: torch.Tensor) -> torch.Tensor:
        """The entries of ``flat`` (a vector of this block) that belong to ``sub``.

        Args:
            sub: a block whose names are in this one.
            flat: ``[numel]`` or ``[k, numel]``.

        Returns:
            ``[|sub|]`` or ``[k, |sub|]``.
        """
        return torch.cat([flat[..., self.slice_of(n)] for n in sub.names], dim=-1)

    def __add__(self, other: ParamBlock) -> ParamBlock:
        overlap = set(self.names) & set(other.names)
        if overlap:
            raise ValueError(f"blocks overlap in {sorted(overlap)}")
        return ParamBlock(self.names + other.names, self.shapes + other.shapes)


def named_params(model: nn.Module) -> Params:
    """The trainable parameters, detached (sharing their storage), in model order.

    Args:
        model: the model.

    Returns:
        The parameters by name.
    """
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def make_block(params: Mapping[str, torch.Tensor], select: Callable[[str], bool] | Iterable[str]) -> ParamBlock:
    """The block of ``params`` chosen by a predicate on names or an explicit list of names.

    Args:
        params: the parameters by name.
        select: a predicate on names, or the names.

    Returns:
        The :class:`ParamBlock`, in the order of ``params``.
    """
    if callable(select):
        names = [n for n in params if select(n)]
    else:
        names = list(select)
        unknown = [n for n in names if n not in params]
        if unknown:
            raise KeyError(f"unknown parameter names {unknown}; the model has {list(params)}")
    return ParamBlock(tuple(names), tuple(params[n].shape for n in names))


def prefix_matcher(prefix: str) -> Callable[[str], bool]:
    """A predicate for names equal to ``prefix`` or below it as a module path.

    Args:
        prefix: e.g. ``"embedding"``, which matches ``embedding.0.weight`` but not
            ``embedding_extra.weight``.

    Returns:
        The predicate.
    """
    prefix = prefix.rstrip(".")
    return lambda n: n == prefix or n.startswith(prefix + ".")


NameSelector = str | Sequence[str] | Callable[[str], bool]
"""Which parameters: a module-path prefix, a list of prefixes, or a predicate on names."""


def name_matcher(select: NameSelector) -> Callable[[str], bool]:
    """A predicate on parameter names.

    Args:
        select: a prefix (``"embedding"``), a list of prefixes (``["conv1", "bn1", "layer1"]``)
            or a predicate itself.

    Returns:
        The predicate.
    """
    if isinstance(select, str):
        return prefix_matcher(select)
    if callable(select):
        return select
    prefixes = list(select)
    if not prefixes or not all(isinstance(p, str) for p in prefixes):
        raise TypeError(f"expected a prefix, a non-empty list of prefixes or a predicate on names, got {select!r}")
    matchers = [prefix_matcher(p) for p in prefixes]
    return lambda n: any(m(n) for m in matchers)


def check_finite(what: str, tensors: Mapping[str, torch.Tensor] | torch.Tensor | Sequence[torch.Tensor]) -> None:
    """Raise a clear error naming the first non-finite tensor.

    Args:
        what: what the tensors are, in the error.
        tensors: named tensors, a tensor, or a sequence of them.

    Raises:
        FloatingPointError: NaN or inf in one of them.
    """
    items = tensors.items() if isinstance(tensors, Mapping) else [("", t) for t in _as_list(tensors)]
    for name, t in items:
        if t.is_floating_point() and not torch.isfinite(t).all():
            where = f" '{name}'" if name else ""
            raise FloatingPointError(
                f"{what}{where} contains NaN or inf; influence needs a finite model and data "
                "(check the training run for divergence, or the inputs for missing values)"
            )


def _as_list(tensors: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
