"""Preconditioners for CG: approximate inverses ``M⁻¹ ≈ A⁻¹`` of the damped curvature.

A preconditioner gives ``M⁻¹ V`` (:meth:`Preconditioner.apply`) and the symmetric square
root ``M^{-1/2} V`` (:meth:`Preconditioner.apply_sqrt`). Row CG uses the first; block CG
uses the second, as a split preconditioner: it runs on ``M^{-1/2} A M^{-1/2}`` with
right-hand sides ``M^{-1/2} B`` and maps its iterate back, so the block recurrence keeps
its symmetric form. Neither changes the solution CG converges to, only how fast.

- :class:`Diagonal`: Jacobi, a given or Hutchinson-estimated diagonal;
- :class:`Nystrom`: a randomized rank-``r`` Nyström sketch of ``A`` from ``r`` products
  (Frangella, Tropp & Udell 2023): exact on the sketched top eigenspace, the identity
  scaled to its smallest kept eigenvalue elsewhere;
- :class:`Kronecker`: K-FAC / EK-FAC factors of the operator's model
  (:mod:`lissa_influence.kfac`), damped like the operator.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ..operators import FisherType, KroneckerKind, LinearOperator, ModelOperator


@runtime_checkable
class Preconditioner(Protocol):
    """``apply(V) = M⁻¹ V`` and ``apply_sqrt(V) = M^{-1/2} V`` (symmetric) for ``V`` ``[k, n]``.
    ``products`` is what building it cost, in products with ``A``.

    Attributes:
        products: what building it cost, in products with ``A``.
    """

    products: int

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        """``M⁻¹ V``.

        Args:
            V: ``[k, n]``.

        Returns:
            ``[k, n]``.
        """
        ...

    def apply_sqrt(self, V: torch.Tensor) -> torch.Tensor:
        """The symmetric ``M^{-1/2} V``.

        Args:
            V: ``[k, n]``.

        Returns:
            ``[k, n]``.
        """
        ...


@runtime_checkable
class NamedPreconditioner(Preconditioner, Protocol):
    """A :class:`Preconditioner` with a ``name`` for the diagnostics (every built-in one;
    others are named by their class).

    Attributes:
        name: its name in the diagnostics.
    """

    name: str


class Diagonal:
    """Jacobi: ``M = diag(d)``, with ``d`` floored at ``1e-3·mean|d|`` so that a noisy or
    non-positive estimate cannot break CG (any SPD preconditioner keeps it exact).

    Args:
        diag: the diagonal of ``A`` (or an estimate of it).
        products: what estimating it cost, in products with ``A``.
    """

    name = "diagonal"

    def __init__(self, diag: torch.Tensor, products: int = 0):
        floor = 1e-3 * diag.abs().mean().clamp_min(torch.finfo(diag.dtype).tiny)
        self.inv = 1.0 / diag.clamp_min(floor)
        self.inv_sqrt = self.inv.sqrt()
        self.products = products

    @classmethod
    def hutchinson(cls, op: LinearOperator, samples: int, seed: int, like: torch.Tensor) -> Diagonal:
        """``diag(A)`` estimated from ``samples`` Rademacher probes in one stacked product.

        Args:
            op: the operator.
            samples: how many probes.
            seed: draws them.
            like: a tensor of the dtype and device wanted.

        Returns:
            The Jacobi preconditioner (its ``products`` is ``samples``).
        """
        g = torch.Generator().manual_seed(seed)
        z = (torch.randint(0, 2, (samples, op.shape[0]), generator=g) * 2 - 1).to(like)
        return cls((z * op(z)).mean(0), products=samples)

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        """``M⁻¹ V``.

        Args:
            V: ``[k, n]``.

        Returns:
            ``[k, n]``.
        """
        return V * self.inv

    def apply_sqrt(self, V: torch.Tensor) -> torch.Tensor:
        """The symmetric ``M^{-1/2} V``.

        Args:
            V: ``[k, n]``.

        Returns:
            ``[k, n]``.
        """
        return V * self.inv_sqrt


class Nystrom:
    """Randomized Nyström preconditioner of a symmetric positive (semi-)definite ``A``.

    ``A Ω`` for ``rank`` orthonormal Gaussian columns ``Ω`` gives ``Â = U Λ Uᵀ``, the
    Nyström approximation (with the stabilising shift of Frangella et al.); then
    ``M⁻¹ = λ_r U Λ⁻¹ Uᵀ + (I − U Uᵀ)``. The damped ``A`` is sketched directly, so its
    damping is in ``Λ`` and ``λ_r`` (the smallest kept eigenvalue) stands for the
    unsketched rest of the spectrum. ``rank`` products, in one stack.

    Args:
        op: the operator to sketch.
        rank: the sketch's rank (at most the operator's size).
        seed: draws the sketch.
        like: a tensor of the dtype and device wanted.
    """

    name = "nystrom"

    def __init__(self, op: LinearOperator, rank: int, seed: int, like: torch.Tensor):
        n = op.shape[0]
        rank = min(rank, n)
        g = torch.Generator().manual_seed(seed)
        # float64 for the small dense algebra: the sketch's eigenvalues span A's condition number
        omega = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64))[0]
        Y = op(omega.T.to(like)).T.to(torch.float64)  # [n, r]
        self.products = rank
        if not torch.isfinite(Y).all():
            raise FloatingPointError("Nyström preconditioner: a product with the operator is NaN or inf")
        shift = torch.finfo(like.dtype).eps * float(torch.linalg.matrix_norm(Y))
        for _ in range(8):  # an indefinite A needs more shift before Ωᵀ(Y + νΩ) is positive definite
            Yv = Y + shift * omega
            core = omega.T @ Yv
            chol, info = torch.linalg.cholesky_ex(0.5 * (core + core.T))
            if int(info) == 0:
                break
            shift = max(10 * shift, 1e-12 * float(torch.linalg.matrix_norm(Y)))
        else:
            raise ValueError(
                "Nyström preconditioner: the operator is not positive semi-definite along its sketch; "
                "add damping, or use the Gauss-Newton operator"
            )
        B = torch.linalg.solve_triangular(chol, Yv.T, upper=False).T  # Yv L⁻ᵀ
        U, sigma, _ = torch.linalg.svd(B, full_matrices=False)
        lam = (sigma**2 - shift).clamp_min(0)
        keep = lam > lam[0] * 1e-14 if len(lam) else lam.bool()
        U, lam = U[:, keep], lam[keep]
        if len(lam) == 0:
            raise ValueError("Nyström preconditioner: the sketched operator is zero")
        self.U = U.to(like)
        self.scale_inv = (lam[-1] / lam - 1).to(like)  # M⁻¹ = I + U diag(λ_r/λ − 1) Uᵀ
        self.scale_inv_sqrt = ((lam[-1] / lam).sqrt() - 1).to(like)
        self.eigenvalues = lam

    def _mix(self, V: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return V + ((V @ self.U) * d) @ self.U.T

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        """``M⁻¹ V``.

        Args:
            V: ``[k, n]``.

        Returns:
            ``[k, n]``.
        """
        return self._mix(V, self.scale_inv)

    def apply_sqrt(self, V: torch.Tensor) -> torch.Tensor:
        """The symmetric ``M^{-1/2} V``.

        Args:
            V: ``[k, n]``.

        Returns:
            ``[k, n]``.
        """
        return self._mix(V, self.scale_inv_sqrt)


class Kronecker:
    """K-FAC / EK-FAC of a model-backed operator, damped like it: ``(G̃ + D)⁻¹``.

    The factors are fitted once per operator (cached by
    :meth:`~lissa_influence.curvature.CurvatureOperator.kronecker`) and reused by every
    later solve; they approximate the Gauss-Newton matrix, which is what the Hessian is
    near a minimum, so they precondition either.

    Args:
        op: a :class:`~lissa_influence.operators.ModelOperator`, which fits the factors.
        kind: ``"ekfac"`` or ``"kfac"``.
        fisher: the output-curvature estimate.
        seed: draws the labels of ``fisher="mc"``.
    """

    def __init__(self, op: LinearOperator, kind: KroneckerKind, fisher: FisherType, seed: int):
        if not isinstance(op, ModelOperator):
            raise TypeError(
                f"preconditioner={kind!r} needs the model behind the operator (a CurvatureOperator, as the "
                f"influence estimators build); got {type(op).__name__}. Use 'nystrom' or 'jacobi' for other operators"
            )
        self.name = kind
        self.curvature = op.kronecker(kind, fisher, seed)
        self.damping = op.damping
        self.products = 0  # fitting costs passes over the sample, reported as curvature.fit_passes

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        """``M⁻¹ V``.

        Args:
            V: ``[k, n]``.

        Returns:
            ``[k, n]``.
        """
        return self.curvature.inverse(V, self.damping)

    def apply_sqrt(self, V: torch.Tensor) -> torch.Tensor:
        """The symmetric ``M^{-1/2} V``.

        Args:
            V: ``[k, n]``.

        Returns:
            ``[k, n]``.
        """
        return self.curvature.inverse_sqrt(V, self.damping)
