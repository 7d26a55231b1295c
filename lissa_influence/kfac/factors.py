"""Kronecker factors once fitted: :class:`KroneckerCurvature`, its products, damped inverse
and square root, and its persistence (``state_dict`` / ``save`` / ``load``).

Fitting them from an objective is :mod:`lissa_influence.kfac.fit`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..operators import KroneckerKind
from ..params import ParamBlock

__all__ = ["Damping", "KroneckerCurvature", "Layer", "fallback_index", "layer_index"]

Damping = float | torch.Tensor
"""A damping: a scalar ``λ``, or a ``[P]`` vector constant within each Kronecker block."""

_FORMAT = 1


@dataclass
class Layer:
    """One Kronecker block: a Linear or Conv2d layer, ``G_l ≈ Q (diag Λ) Qᵀ`` with
    ``Q = Q_Γ ⊗ Q_Ω``. ``index[o, j]`` is the flat coordinate of output ``o``, input ``j``
    (the bias is input column ``in``).

    Args:
        module: the layer's module path.
        weight: its weight's name.
        bias: its bias's name, or None.
        q_a: the eigenvectors of the input factor ``Ω``.
        q_g: the eigenvectors of the output-gradient factor ``Γ``.
        lam: the eigenvalues in that basis, ``[out, in(+1)]``.
        index: the flat coordinates (:func:`layer_index`).
        transposed: the weight is stored ``[in, out]``.
    """

    module: str
    weight: str
    bias: str | None
    q_a: torch.Tensor  # [in(+1), in(+1)]
    q_g: torch.Tensor  # [out, out]
    lam: torch.Tensor  # [out, in(+1)]
    index: torch.Tensor  # [out, in(+1)] long
    transposed: bool = False  # the weight is stored [in, out] (transformers' Conv1D)


def layer_index(
    block: ParamBlock, weight: str, bias: str | None, shape: torch.Size, transposed: bool = False
) -> torch.Tensor:
    """The flat coordinates of one layer's weight (and bias) in the block.

    Args:
        block: the block.
        weight: the weight's name.
        bias: the bias's name, or None.
        shape: the weight's shape.
        transposed: the weight is stored ``[in, out]`` (transformers' ``Conv1D``).

    Returns:
        ``[out, in(+1)]`` long: entry ``[o, j]`` is the coordinate of output ``o``, input ``j``
        (the bias is input column ``in``).
    """
    sw = block.slice_of(weight)
    if transposed:  # W[j, o] of a [in, out] weight: the flat coordinate of output o, input j
        out = int(shape[1])
        idx = torch.arange(sw.start, sw.stop).reshape(-1, out).T
    else:
        out = int(shape[0])
        idx = torch.arange(sw.start, sw.stop).reshape(out, -1)
    if bias is not None:
        sb = block.slice_of(bias)
        idx = torch.cat([idx, torch.arange(sb.start, sb.stop).reshape(out, 1)], dim=1)
    return idx


@dataclass
class KroneckerCurvature:
    """A block-diagonal approximation ``G̃`` of the undamped Gauss-Newton matrix of an
    objective's mean loss over ``block`` (flat coordinates in ``block.flatten`` order).

    Built by :func:`fit_kronecker` (or :meth:`from_state_dict` / :meth:`load` from saved
    factors). :meth:`matmat` gives ``G̃ v``, :meth:`inverse` ``(G̃ + D)⁻¹ v`` and
    :meth:`inverse_sqrt` the symmetric ``(G̃ + D)^{-1/2} v``, where the damping ``D`` is a
    scalar or a ``[P]`` vector constant within each Kronecker block (docs/math.md,
    "Embedding updated": ``λ + 2α`` on ``W``, ``λ`` on ``Θ``). ``fit_passes`` counts the
    backward passes over the sample the fit took (each about a gradient's cost).

    Args:
        block: the parameters.
        layers: the Kronecker blocks.
        fallback: the names of the parameters with a diagonal block.
        fallback_index: their flat coordinates.
        fallback_diag: their diagonal.
        kind: ``"ekfac"`` or ``"kfac"``.
        fisher: the Fisher estimate used.
        requested_fisher: the one asked for (``"auto"`` resolves to one of the others).
        seed: the seed of ``fisher="mc"``.
        fit_seconds: the time the fit took.
        fit_passes: the backward passes over the sample it took.
    """

    block: ParamBlock
    layers: list[Layer]
    fallback: tuple[str, ...]
    fallback_index: torch.Tensor
    fallback_diag: torch.Tensor
    kind: KroneckerKind
    fisher: str
    requested_fisher: str = "auto"
    seed: int = 0
    fit_seconds: float = 0.0
    fit_passes: float = 0.0

    @property
    def size(self) -> int:
        return self.block.numel

    def describe(self) -> dict[str, Any]:
        """Which parameters are Kronecker blocks (by module) and which got the diagonal fallback.

        Returns:
            The kind, Fisher estimate, the layers, the fallback parameters and the fitting cost.
        """
        return {
            "kind": self.kind,
            "fisher": self.fisher,
            "kronecker": {
                layer.module: [n for n in (layer.weight, layer.bias) if n is not None] for layer in self.layers
            },
            "fallback": list(self.fallback),
            "fallback_params": len(self.fallback_index),
            "fit_seconds": self.fit_seconds,
            "fit_passes": self.fit_passes,
        }

    # -- products ----------------------------------------------------------------------
    def _damping(self, damping: Damping) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per-layer scalar and fallback per-coordinate damping, checked."""
        d = torch.as_tensor(damping, dtype=torch.float64)
        if not bool(torch.isfinite(d).all()) or bool((d < 0).any()):
            raise ValueError(f"damping must be finite and >= 0, got {damping!r}")
        if d.dim() == 0:
            return [d] * len(self.layers), d.expand(len(self.fallback_index))
        if d.shape != (self.size,):
            raise ValueError(f"a damping vector needs {self.size} entries, got shape {tuple(d.shape)}")
        per_layer = []
        for layer in self.layers:
            part = d[layer.index.to(d.device)]
            lo, hi = float(part.min()), float(part.max())
            if hi - lo > 1e-12 * max(abs(hi), 1.0):
                raise ValueError(
                    f"damping varies within the Kronecker block of layer '{layer.module}' (from {lo:g} to {hi:g}); "
                    "its inverse needs one value per layer. Give every parameter of a layer the same damping "
                    "(or fit with that layer left out of the block)"
                )
            per_layer.append(part.reshape(-1)[0])
        return per_layer, d[self.fallback_index.to(d.device)]

    def _apply(
        self, V: torch.Tensor, damping: Damping, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """``Q fn(Λ, d) Qᵀ V`` per block: ``fn`` maps eigenvalues and damping to the factor applied."""
        if V.dim() not in (1, 2) or V.shape[-1] != self.size:
            raise ValueError(f"expected a vector [{self.size}] or a stack [k, {self.size}], got shape {tuple(V.shape)}")
        layer_d, fb_d = self._damping(damping)
        X = V[None] if V.dim() == 1 else V
        out = torch.empty_like(X)
        for layer, d in zip(self.layers, layer_d, strict=True):
            q_a, q_g = layer.q_a.to(X), layer.q_g.to(X)
            factor = fn(layer.lam.to(X), d.to(X))
            R = q_g.T @ X[:, layer.index.to(X.device)] @ q_a  # into the eigenbasis
            out[:, layer.index.to(X.device)] = q_g @ (R * factor) @ q_a.T
        if len(self.fallback_index):
            idx = self.fallback_index.to(X.device)
            out[:, idx] = X[:, idx] * fn(self.fallback_diag.to(X), fb_d.to(X))
        return out[0] if V.dim() == 1 else out

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``G̃ v``.

        Args:
            V: ``[P]`` or ``[k, P]``.

        Returns:
            The products, in the shape of ``V``.
        """
        return self._apply(V, 0.0, lambda lam, d: lam)

    def inverse(self, V: torch.Tensor, damping: Damping) -> torch.Tensor:
        """``(G̃ + D)⁻¹ v``.

        Args:
            V: ``[P]`` or ``[k, P]``.
            damping: ``D``, a scalar or a ``[P]`` vector constant within each Kronecker block.

        Returns:
            The solutions, in the shape of ``V``.
        """
        return self._apply(V, damping, lambda lam, d: 1 / _positive(lam + d))

    def inverse_sqrt(self, V: torch.Tensor, damping: Damping) -> torch.Tensor:
        """The symmetric ``(G̃ + D)^{-1/2} v`` (a split preconditioner: applied twice, :meth:`inverse`).

        Args:
            V: ``[P]`` or ``[k, P]``.
            damping: ``D``, as :meth:`inverse` takes it.

        Returns:
            In the shape of ``V``.
        """
        return self._apply(V, damping, lambda lam, d: _positive(lam + d).rsqrt())

    # -- persistence -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The factors as plain tensors, strings and numbers.

        Returns:
            A dict that ``torch.load(..., weights_only=True)`` reads back.
        """
        return {
            "format": _FORMAT,
            "names": list(self.block.names),
            "shapes": [list(s) for s in self.block.shapes],
            "kind": self.kind,
            "fisher": self.fisher,
            "requested_fisher": self.requested_fisher,
            "seed": self.seed,
            "fit_seconds": self.fit_seconds,
            "fit_passes": self.fit_passes,
            "layers": [
                {
                    "module": la.module,
                    "weight": la.weight,
                    "bias": la.bias if la.bias is not None else "",
                    "q_a": la.q_a,
                    "q_g": la.q_g,
                    "lam": la.lam,
                    "transposed": la.transposed,
                }
                for la in self.layers
            ],
            "fallback": list(self.fallback),
            "fallback_diag": self.fallback_diag,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> KroneckerCurvature:
        """Factors from a :meth:`state_dict`.

        Args:
            state: the saved dict.

        Returns:
            The :class:`KroneckerCurvature`.

        Raises:
            ValueError: an unknown format.
        """
        if state.get("format") != _FORMAT:
            raise ValueError(f"unknown Kronecker factor format {state.get('format')!r} (this version reads {_FORMAT})")
        block = ParamBlock(tuple(state["names"]), tuple(torch.Size(s) for s in state["shapes"]))
        shapes = dict(zip(block.names, block.shapes, strict=True))
        layers = []
        for la in state["layers"]:
            bias = la["bias"] or None
            transposed = bool(la.get("transposed", False))  # saved before Conv1D was factored: never
            index = layer_index(block, la["weight"], bias, shapes[la["weight"]], transposed)
            layers.append(Layer(la["module"], la["weight"], bias, la["q_a"], la["q_g"], la["lam"], index, transposed))
        fallback = tuple(state["fallback"])
        return cls(
            block,
            layers,
            fallback,
            fallback_index(block, fallback),
            state["fallback_diag"],
            state["kind"],
            state["fisher"],
            state["requested_fisher"],
            int(state["seed"]),
            float(state["fit_seconds"]),
            float(state["fit_passes"]),
        )

    def save(self, path: str | Path) -> None:
        """Write the factors to ``path`` (``torch.save`` of :meth:`state_dict`).

        Args:
            path: the file.
        """
        torch.save(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device | None = None) -> KroneckerCurvature:
        """Factors saved by :meth:`save`.

        Args:
            path: the file.
            map_location: where the tensors go (as ``torch.load`` takes it).

        Returns:
            The :class:`KroneckerCurvature`.
        """
        return cls.from_state_dict(torch.load(path, map_location=map_location, weights_only=True))

    def check_block(self, block: ParamBlock) -> None:
        """Raise when these factors were fitted for another block of parameters.

        Args:
            block: the block they are to serve.

        Raises:
            ValueError: other names or shapes.
        """
        if block.names != self.block.names or tuple(block.shapes) != tuple(self.block.shapes):
            raise ValueError(
                f"these Kronecker factors were fitted for parameters {list(self.block.names)[:4]}... "
                f"({self.block.numel} entries), not {list(block.names)[:4]}... ({block.numel} entries)"
            )


def _positive(x: torch.Tensor) -> torch.Tensor:
    if bool((x <= 0).any()):
        raise ValueError(
            "the damped Kronecker curvature is singular (zero curvature along some direction and no damping there); "
            "use a damping > 0"
        )
    return x


def fallback_index(block: ParamBlock, names: tuple[str, ...]) -> torch.Tensor:
    """The flat coordinates of the parameters ``names`` in the block.

    Args:
        block: the block.
        names: parameter names of the block.

    Returns:
        A long tensor (empty for no names).
    """
    parts = [torch.arange(s.start, s.stop) for s in map(block.slice_of, names)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
