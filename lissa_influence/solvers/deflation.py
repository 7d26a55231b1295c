"""Recycled deflation subspaces for conjugate gradient on one operator, many right-hand sides.

The slow part of a damped Hessian's spectrum is its small end (docs/benchmarks.md,
"Many queries"): eigenvalues near the damping, many of them negative-curvature
directions shifted by it. Deflation removes it. Given ``W`` (``[m, P]``, rows spanning
approximate eigenvectors for the smallest eigenvalues of ``A``) and ``AW``, with
``E = W A Wᵀ``, ``Q = Wᵀ E⁻¹ W`` and ``Π = I − A Q`` (Saad, Yeung, Erhel & Guyomarc'h,
SIAM J. Sci. Comput. 2000; "DEF1" in Tang, Nabben, Vuik & Erlangga 2009)::

    x = Q b + Πᵀ x̃,   where CG solves  Π A x̃ = Π b

``Π A`` is symmetric positive semi-definite with ``W`` in its null space, so CG sees only
the rest of the spectrum. The residual of ``x`` in the original system is exactly the
residual of ``x̃`` in the deflated one (``A Πᵀ = Π A``), so CG's true-residual checks keep
deciding convergence; :class:`~lissa_influence.solvers.CG` also checks ``b − A x`` once at
the end, so a subspace that does not belong to ``A`` can cost products, never accuracy.

The subspace is harvested while solving, at no extra products (in the spirit of eigCG,
Stathopoulos & Orginos, SIAM J. Sci. Comput. 2010): every product ``(v, A v)`` a solve
takes is recorded, and when more than a window of them are held, a Rayleigh-Ritz step on
their span keeps the ``m`` Ritz vectors of smallest Ritz value (a thick restart). ``AW``
is the same linear combination of the recorded products, so it is exact whatever the
quality of the Ritz vectors: quality decides the speed-up, never the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..operators import DampedOperator, DerivedOperator, LinearOperator, damping_key


@dataclass(frozen=True)
class Subspace:
    """A deflation subspace of an operator ``A``: ``W`` ``[m, P]``, ``AW = A W`` (row by
    row) and the Ritz values ``values`` ``[m]`` (float64), smallest first.

    ``key`` identifies what it was harvested on (see :func:`operator_key`); a solver uses it
    only on an operator with the same key.

    Args:
        W: ``[m, n]`` vectors with orthonormal rows.
        AW: their products with ``A``.
        values: their Ritz values.
        key: what it depends on besides the operator object (:func:`operator_key`).
    """

    W: torch.Tensor
    AW: torch.Tensor
    values: torch.Tensor
    key: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if self.W.shape != self.AW.shape or self.W.dim() != 2:
            raise ValueError(f"W and AW must both be [m, P], got {tuple(self.W.shape)} and {tuple(self.AW.shape)}")
        E = (self.W.double() @ self.AW.double().T + self.AW.double() @ self.W.double().T) / 2
        chol, bad = torch.linalg.cholesky_ex(E)
        if int(bad) != 0:
            raise ValueError("a deflation subspace needs W A Wᵀ positive definite (A positive definite on W)")
        object.__setattr__(self, "_chol", chol)

    @property
    def size(self) -> int:
        return self.W.shape[0]

    def _solve_e(self, C: torch.Tensor) -> torch.Tensor:
        """``C E⁻¹`` for coefficients ``C`` ``[k, m]`` (E symmetric), in float64."""
        chol: torch.Tensor = self.__dict__["_chol"]
        return torch.cholesky_solve(C.double().T, chol).T

    def coarse(self, B: torch.Tensor) -> torch.Tensor:
        """``Q b`` per row of ``B``: the solution's part in the subspace.

        Args:
            B: ``[k, n]``.

        Returns:
            ``[k, n]``.
        """
        return (self._solve_e(B @ self.W.T) @ self.W.double()).to(B.dtype)

    def project(self, Y: torch.Tensor) -> torch.Tensor:
        """``Π y = y − A W E⁻¹ Wᵀ y`` per row of ``Y``.

        Args:
            Y: ``[k, n]``.

        Returns:
            ``[k, n]``.
        """
        return Y - (self._solve_e(Y @ self.W.T) @ self.AW.double()).to(Y.dtype)

    def project_t(self, X: torch.Tensor) -> torch.Tensor:
        """``Πᵀ x = x − W E⁻¹ (A W)ᵀ x`` per row of ``X``.

        Args:
            X: ``[k, n]``.

        Returns:
            ``[k, n]``.
        """
        return X - (self._solve_e(X @ self.AW.T) @ self.W.double()).to(X.dtype)

    def state_dict(self) -> dict[str, Any]:
        """Its vectors, their products, its Ritz values and key (what :meth:`save` writes).

        Returns:
            Plain tensors and values.
        """
        return {"W": self.W, "AW": self.AW, "values": self.values, "key": list(self.key)}

    def save(self, path: str | Path) -> None:
        """Write the subspace to ``path`` (``torch.save`` of :meth:`state_dict`).

        Args:
            path: the file.
        """
        torch.save(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | Path, map_location: Any = None) -> Subspace:
        """A subspace written by :meth:`save`.

        Args:
            path: the file.
            map_location: where the tensors go (as ``torch.load`` takes it).

        Returns:
            The :class:`Subspace`.
        """
        d = torch.load(path, map_location=map_location, weights_only=True)
        return cls(d["W"], d["AW"], d["values"], tuple(d["key"]))


def operator_key(op: LinearOperator, dtype: torch.dtype) -> tuple[Any, ...]:
    """What a subspace of ``op`` depends on besides the operator object itself.

    Its size, the dtype of the solve and, for a damped operator, the damping (a damping
    change makes every subspace of the old one stale).

    Args:
        op: the operator.
        dtype: the dtype of the solve.

    Returns:
        A hashable key.
    """
    damping = damping_key(op.damping) if isinstance(op, DampedOperator) else None
    return (op.shape[0], str(dtype), damping)


def rayleigh_ritz(
    V: torch.Tensor, AV: torch.Tensor, count: int, largest: bool = False, top: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ritz pairs of ``A`` on the span of the rows of ``V``.

    The ``count`` pairs of smallest positive Ritz value (``largest``: of largest; ``top``:
    ``count − top`` of the smallest and ``top`` of the largest, distinct). Dependent rows are
    dropped (the Gram matrix's eigenvalues below a dtype-dependent fraction of its largest),
    so any set of recorded products will do.

    Args:
        V: ``[m, n]`` vectors.
        AV: their products with ``A``.
        count: how many pairs.
        largest: take the largest instead of the smallest.
        top: how many of the ``count`` to take from the top.

    Returns:
        ``(W, AW, values)``: ``W`` with orthonormal rows, values in increasing order.
    """
    scale = torch.linalg.vector_norm(V, dim=1).clamp_min(torch.finfo(V.dtype).tiny)
    Vn, AVn = V / scale[:, None], AV / scale[:, None]
    G = Vn.double() @ Vn.double().T
    T = Vn.double() @ AVn.double().T
    T = (T + T.T) / 2
    g, U = torch.linalg.eigh(G)
    cut = g.max() * (1e-10 if V.dtype == torch.float64 else 1e-5)
    keep = g > cut
    C = U[:, keep] / g[keep].sqrt()  # Vnᵀ C has orthonormal columns
    theta, Y = torch.linalg.eigh(C.T @ T @ C)
    positive = (theta > 0).nonzero().squeeze(1)
    if largest:
        positive = positive[-count:]
    elif top and len(positive) > count:
        positive = torch.cat([positive[: count - top], positive[len(positive) - top :]])
    else:
        positive = positive[:count]
    coeffs = (C @ Y[:, positive]).T.to(V.dtype)  # [count, n]
    return coeffs @ Vn, coeffs @ AVn, theta[positive]


class Harvester:
    """Collects ``(v, A v)`` pairs of one operator across solves and compresses them to a
    ``size``-dimensional deflation subspace (thick restart whenever more than ``window``
    are held); ``start``: a subspace to refine.

    Args:
        size: how many vectors the harvested subspace keeps.
        window: how many pairs are held before a compression.
        start: a subspace to refine (None: none).
        key: the operator's key (:func:`operator_key`).
    """

    def __init__(self, size: int, window: int, start: Subspace | None = None, key: tuple[Any, ...] = ()):
        self.size, self.window, self.key = size, window, key
        self._V: list[torch.Tensor] = []
        self._AV: list[torch.Tensor] = []
        self._count = 0
        if start is not None:
            self.record(start.W, start.AW)

    def record(self, V: torch.Tensor, AV: torch.Tensor) -> None:
        """Keep rows of ``V`` and their products ``AV``.

        Args:
            V: ``[k, n]``.
            AV: ``[k, n]``.
        """
        self._V.append(V.detach().clone())
        self._AV.append(AV.detach().clone())
        self._count += V.shape[0]
        if self._count > self.window:
            self._compress()

    def _compress(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # a third from the top: its Ritz vectors converge in a few iterations, and deflating
        # them too shrinks the condition number from both ends (docs/benchmarks.md, "Many queries")
        W, AW, values = rayleigh_ritz(torch.cat(self._V), torch.cat(self._AV), self.size, top=self.size // 3)
        self._V, self._AV, self._count = [W], [AW], W.shape[0]
        return W, AW, values

    def subspace(self) -> Subspace | None:
        """The harvested subspace.

        Returns:
            The :class:`Subspace`, or None when nothing usable was recorded.
        """
        if self._count == 0:
            return None
        W, AW, values = self._compress()
        if W.shape[0] == 0:
            return None
        try:
            return Subspace(W, AW, values, self.key)
        except ValueError:  # not positive definite on the recorded span: nothing to deflate safely
            return None


class Recording(DerivedOperator):
    """``A`` itself, handing every product it takes to a :class:`Harvester`.

    Args:
        parent: ``A``.
        harvester: where the products go.
    """

    def __init__(self, parent: LinearOperator, harvester: Harvester):
        super().__init__(parent)
        self.harvester = harvester

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """The parent's products, recorded for the harvest.

        Args:
            V: ``[k, n]``.

        Returns:
            ``[k, n]``.
        """
        AV = self.parent.matmat(V)
        self.harvester.record(V, AV)
        return AV


class Balancing:
    """The balancing preconditioner ``Πᵀ M⁻¹ Π + Q`` of a subspace (``M⁻¹``: ``inner``, or the
    identity), for row CG on ``A`` itself (Tang, Nabben, Vuik & Erlangga, J. Sci. Comput.
    2009, "BNN"): symmetric positive definite, and unlike CG on ``Π A`` robust to rounding and
    to inexact subspaces, since every product and residual is of ``A``. From ``x₀ = Q b``
    it takes the iterates of deflated CG. Block CG needs ``M^{-1/2}``, which it lacks.

    Args:
        subspace: the deflated subspace.
        inner: ``M⁻¹``, a preconditioner (None: the identity).
    """

    name = "deflation"
    products = 0

    def __init__(self, subspace: Subspace, inner: Any = None):
        self.subspace, self.inner = subspace, inner

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        """``(Πᵀ M⁻¹ Π + Q) V``.

        Args:
            V: ``[k, n]``.

        Returns:
            ``[k, n]``.
        """
        s = self.subspace
        C = s._solve_e(V @ s.W.T)  # E⁻¹ Wᵀ v
        Z = V - (C @ s.AW.double()).to(V.dtype)  # Π v
        if self.inner is not None:
            Z = self.inner.apply(Z)
        return s.project_t(Z) + (C @ s.W.double()).to(V.dtype)

    def apply_sqrt(self, V: torch.Tensor) -> torch.Tensor:
        """Not available: the balancing preconditioner has no cheap square root (row CG only).

        Args:
            V: ``[k, n]``.

        Raises:
            NotImplementedError: always.
        """
        raise NotImplementedError("the balancing preconditioner has no cheap square root: row CG only")


class Deflated(DerivedOperator):
    """``Π A``: the operator CG sees once ``subspace`` is deflated.

    Args:
        parent: ``A``.
        subspace: the deflated subspace.
    """

    def __init__(self, parent: LinearOperator, subspace: Subspace):
        super().__init__(parent)
        self.subspace = subspace

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``Π A`` times each row of ``V``.

        Args:
            V: ``[k, n]``.

        Returns:
            ``[k, n]``.
        """
        return self.subspace.project(self.parent.matmat(V))
