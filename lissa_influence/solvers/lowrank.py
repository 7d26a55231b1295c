"""The low-rank solve: the top eigenpairs of the damped curvature from Lanczos, ``1/λ`` elsewhere.

``A = H + D`` restricted to the span of its top ``rank`` eigenvectors ``V`` (found by
matrix-free Lanczos with full reorthogonalisation, once per operator) is inverted
exactly there, and the damping alone is inverted on the complement::

    x = V Θ⁻¹ Vᵀ b + (I − V Vᵀ) D⁻¹ (I − V Vᵀ) b        (D = λI: the last term is (b − V Vᵀ b)/λ)

as in Schioppa, Zablotskaia, Vilar & Sokolov (AAAI 2022), who take the Arnoldi iteration
on the Hessian. It is exact when ``rank`` is the whole space, and otherwise an
approximation that ignores the curvature below the top ``rank`` directions, like
EK-FAC's: in the multi-stage chain it replaces both inverses (``approximate = True``).
After the Lanczos products (``steps``, on the first solve), a solve costs no product but
the residual check.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from ..operators import DampedOperator, LinearOperator, OperatorLike
from .base import Callback, SolveInfo, accepts_matvec, at_least_one, open_solve, rownorm
from .deflation import operator_key, rayleigh_ritz


@dataclass(frozen=True)
class Eigenpairs:
    """Ritz pairs of a symmetric operator: ``vectors`` ``[r, P]`` (orthonormal rows), their
    ``values`` (float64, increasing), and the ``products`` Lanczos took to find them.

    Args:
        vectors: ``[r, P]``, orthonormal rows.
        values: ``[r]``, float64, increasing.
        products: the Lanczos products taken.
        seconds: the time they took.
    """

    vectors: torch.Tensor
    values: torch.Tensor
    products: int
    seconds: float


def lanczos(op: LinearOperator, rank: int, steps: int, seed: int, dtype: torch.dtype) -> Eigenpairs:
    """The ``rank`` largest Ritz pairs of ``op`` after ``steps`` Lanczos steps (full
    reorthogonalisation, a fresh random direction at an invariant subspace), from a seeded
    random start. The Ritz pairs come from ``Q A Qᵀ`` computed from the products
    themselves, not from the three-term recurrence, so rounding in it cannot shift them.

    Args:
        op: a symmetric operator.
        rank: how many of the top Ritz pairs to keep.
        steps: Lanczos steps (products), at least ``rank``; the operator's size caps it.
        seed: the random start.
        dtype: the dtype of the vectors.

    Returns:
        The :class:`Eigenpairs`.
    """
    start = time.perf_counter()
    n = op.shape[0]
    steps = min(steps, n)
    g = torch.Generator().manual_seed(seed)
    Q = torch.zeros(steps, n, dtype=dtype, device=op.device)
    AQ = torch.zeros_like(Q)
    q = torch.randn(n, generator=g, dtype=dtype).to(op.device)
    for j in range(steps):
        before = torch.linalg.vector_norm(q)
        for _ in range(2):  # twice is enough (Kahan): q orthogonal to Q[:j] to rounding
            q = q - Q[:j].T @ (Q[:j] @ q)
        if j > 0 and not bool(torch.linalg.vector_norm(q) > 1e-10 * before):
            # the Krylov space is invariant under A: go on from a fresh direction
            q = torch.randn(n, generator=g, dtype=dtype).to(op.device)
            for _ in range(2):
                q = q - Q[:j].T @ (Q[:j] @ q)
        Q[j] = q / torch.linalg.vector_norm(q)
        AQ[j] = op.matmat(Q[j : j + 1])[0]
        q = AQ[j].clone()
    if not bool(torch.isfinite(AQ).all()):
        raise FloatingPointError("LowRank: an operator product is NaN or inf; check the damping and the model")
    W, _, values = rayleigh_ritz(Q, AQ, rank, largest=True)
    return Eigenpairs(W, values, steps, time.perf_counter() - start)


@dataclass
class LowRank:
    """``x ≈ A⁻¹ b`` from the top ``rank`` eigenpairs of ``A`` and its damping on the rest.

    ``steps``: Lanczos steps (``None``: ``2 × rank``; at most the operator's size), run once
    per operator and damping and kept on the operator (:attr:`~lissa_influence.operators.LinearOperator.memo`);
    ``seed``: the random start. ``shift``: the value ``λ`` inverted on the complement; ``None``
    takes the damping of a :class:`~lissa_influence.operators.DampedOperator` (a
    :class:`~lissa_influence.curvature.CurvatureOperator`: its scalar or per-coordinate
    damping). ``check_residual`` measures ``‖b − A x‖/‖b‖`` with one stacked product.

    Args:
        rank: the eigenpairs kept.
        steps: Lanczos steps (None: ``2 × rank``).
        seed: the random start.
        shift: the value inverted on the complement (None: the operator's damping).
        check_residual: measure the relative residual against the true operator.
    """

    rank: int = 64
    steps: int | None = None
    seed: int = 0
    shift: float | None = None
    check_residual: bool = True

    name = "lowrank"
    approximate = True  # replaces the inverse by design: the chain keeps it for every stage

    def __post_init__(self) -> None:
        at_least_one("rank", self.rank)
        if self.steps is not None:
            at_least_one("steps", self.steps)
            if self.steps < self.rank:
                raise ValueError(f"steps={self.steps} < rank={self.rank}: Lanczos finds at most steps eigenpairs")
        if self.shift is not None and not (isinstance(self.shift, (int, float)) and self.shift > 0):
            raise ValueError(f"shift={self.shift!r}: use a number > 0, or None for the operator's damping")
        if not isinstance(self.check_residual, bool):
            raise ValueError(f"check_residual={self.check_residual!r}: use True or False")

    def _complement(self, op: LinearOperator) -> torch.Tensor:
        """``D``: the shift inverted outside the subspace, a scalar or a vector, all > 0."""
        if self.shift is not None:
            return torch.tensor(float(self.shift), dtype=torch.float64)
        if not isinstance(op, DampedOperator):
            raise TypeError(
                f"LowRank inverts the damping outside its subspace, and {type(op).__name__} has none: pass "
                "LowRank(shift=λ), or a CurvatureOperator"
            )
        d = torch.as_tensor(op.damping, dtype=torch.float64)
        if bool((d <= 0).any()):
            raise ValueError(
                "LowRank inverts the damping outside its subspace (1/λ) and this operator's damping is 0 there: "
                "set a damping > 0, or LowRank(shift=λ)"
            )
        return d

    def eigenpairs(self, op: LinearOperator, dtype: torch.dtype) -> tuple[Eigenpairs, bool]:
        """The top eigenpairs of ``op``, found now or kept from an earlier solve.

        Args:
            op: the operator (they are kept in its :attr:`~lissa_influence.operators.LinearOperator.memo`).
            dtype: the dtype of the vectors.

        Returns:
            ``(pairs, found)``: ``found`` is True when this call ran Lanczos.
        """
        steps = 2 * self.rank if self.steps is None else self.steps
        key = ("lowrank", self.rank, steps, self.seed, operator_key(op, dtype))
        if key in op.memo:
            return op.memo[key], False
        pairs = lanczos(op, self.rank, steps, self.seed, dtype)
        op.memo[key] = pairs
        return pairs, True

    @accepts_matvec
    def solve(
        self, A: OperatorLike, b: torch.Tensor, callback: Callback | None = None
    ) -> tuple[torch.Tensor, SolveInfo]:
        """Solve ``A x = b`` (:meth:`lissa_influence.solvers.Solver.solve`).

        Args:
            A: the operator, a dense matrix or a function ``v ↦ A v``.
            b: ``[P]`` or a stack ``[k, P]`` of right-hand sides.
            callback: called as ``callback(x, num_products)`` after each solve (once).

        Returns:
            ``(x, info)``: ``x`` of the shape of ``b``, and the :class:`~lissa_influence.solvers.SolveInfo`.
        """
        start = time.perf_counter()
        opening = open_solve(A, b)
        op, B = opening.op, opening.B
        D = self._complement(op).to(device=B.device)
        pairs, found = self.eigenpairs(op, B.dtype)
        V = pairs.vectors
        C = B @ V.T  # [k, r]
        Y = B - C @ V
        Z = (Y.double() / D).to(B.dtype)
        if D.dim() > 0:  # a vector damping does not keep the complement: project again
            Z = Z - (Z @ V.T) @ V
        X = (C.double() / pairs.values).to(B.dtype) @ V + Z
        if not bool(torch.isfinite(X).all()):
            raise FloatingPointError("LowRank: the solution holds NaN or inf; check the damping and the model")
        products = pairs.products if found else 0
        extra: dict[str, Any] = {
            "rank": V.shape[0],
            "lanczos_products": pairs.products if found else 0,
            "lanczos_seconds": pairs.seconds if found else 0.0,
            "top_eigenvalue": float(pairs.values[-1]) if len(pairs.values) else None,
            "smallest_kept_eigenvalue": float(pairs.values[0]) if len(pairs.values) else None,
        }
        residuals: list[float] = []
        if self.check_residual:
            R = B - op.matmat(X)
            products += X.shape[0]
            residuals = [float((rownorm(R) / rownorm(B).clamp_min(torch.finfo(B.dtype).tiny)).max())]
            extra["relative_residual"] = residuals[0]
        x = opening.shaped(X)
        if callback is not None:
            callback(x, products)
        return x, SolveInfo(self.name, True, 1, products, time.perf_counter() - start, residuals, extra)
