"""The Kronecker-factored approximate solve: ``x = (G̃ + D)⁻¹ b`` with EK-FAC or K-FAC factors.

No iterations: the factors of the operator's Gauss-Newton matrix
(:mod:`lissa_influence.kfac`) are fitted once on its Hessian sample, cached on the
operator and reused by every solve; each solve is then a few small matrix products per
layer. It is an approximation of the influence, like ``gauss_newton=True`` and more so
(docs/math.md, "Gauss-Newton"): the relative residual ``‖b − A x‖/‖b‖`` against the true
operator, measured with one stacked product, says how far off it is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from ..operators import FisherType, KroneckerKind, ModelOperator, OperatorLike
from .base import Callback, SolveInfo, accepts_matvec, check_fisher, open_solve, rownorm


@dataclass
class EKFAC:
    """``x = (G̃ + D)⁻¹ b`` from Kronecker factors of the operator's Gauss-Newton matrix.

    ``kind``: ``"ekfac"`` (eigenvalue-corrected) or ``"kfac"``; ``fisher``: how the
    output curvature is estimated (``"auto"``, ``"type-2"``, ``"mc"``, ``"empirical"``,
    see :func:`~lissa_influence.kfac.fit_kronecker`); ``seed`` draws the labels of
    ``"mc"``. The operator must be model-backed
    (:class:`~lissa_influence.curvature.CurvatureOperator`, which fits and caches the
    factors); its damping ``D`` is applied as in the exact solve. In the multi-stage chain
    it replaces both inverse solves; the mixed product stays exact. ``check_residual``
    measures ``‖b − A x‖/‖b‖`` with one stacked product of the true operator
    (``num_products`` counts it).

    Args:
        kind: ``"ekfac"`` or ``"kfac"``.
        fisher: the output-curvature estimate (:data:`~lissa_influence.operators.FisherType`).
        seed: draws the labels of ``fisher="mc"``.
        check_residual: measure the relative residual against the true operator.
    """

    kind: KroneckerKind = "ekfac"
    fisher: FisherType = "auto"
    seed: int = 0
    check_residual: bool = True

    name = "ekfac"
    approximate = True  # replaces the inverse by design: the chain keeps it for every stage

    def __post_init__(self) -> None:
        if self.kind not in ("ekfac", "kfac"):
            raise ValueError(f"kind={self.kind!r}: use 'ekfac' or 'kfac'")
        check_fisher(self.fisher)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r}: use an integer")
        if not isinstance(self.check_residual, bool):
            raise ValueError(f"check_residual={self.check_residual!r}: use True or False")

    @accepts_matvec
    def solve(
        self, A: OperatorLike, b: torch.Tensor, callback: Callback | None = None
    ) -> tuple[torch.Tensor, SolveInfo]:
        """``x = (G̃ + D)⁻¹ b`` (:meth:`lissa_influence.solvers.Solver.solve`).

        Args:
            A: a :class:`~lissa_influence.operators.ModelOperator` (a
                :class:`~lissa_influence.curvature.CurvatureOperator`), which fits and caches the factors.
            b: ``[P]`` or a stack ``[k, P]`` of right-hand sides.
            callback: called once, as ``callback(x, num_products)``.

        Returns:
            ``(x, info)``; ``info.extra`` holds the factors' kind, Fisher estimate and fitting cost.
        """
        opening = open_solve(A, b)
        op, B = opening.op, opening.B
        if not isinstance(op, ModelOperator):
            raise TypeError(
                f"EKFAC needs a model-backed operator that can fit Kronecker factors (a CurvatureOperator, as "
                f"Influence and MultiStageInfluence pass), got {type(A).__name__}; for a dense matrix or a "
                "function use CG or Explicit"
            )
        start = time.perf_counter()
        curvature = op.kronecker(self.kind, self.fisher, self.seed)
        fitted = time.perf_counter()
        X = curvature.inverse(B, op.damping).to(B)
        extra: dict[str, Any] = {
            "kind": curvature.kind,
            "fisher": curvature.fisher,
            "fit_seconds": curvature.fit_seconds,
            "fit_passes": curvature.fit_passes,
            "solve_seconds": time.perf_counter() - fitted,
        }
        if not bool(torch.isfinite(X).all()):
            raise FloatingPointError("EKFAC: the solution holds NaN or inf; check the damping and the model")
        residuals, products = [], 0
        if self.check_residual:
            AX = op.matmat(X)
            products = X.shape[0]
            resid = rownorm(B - AX) / rownorm(B).clamp_min(torch.finfo(B.dtype).tiny)
            residuals = [float(resid.max())]
            extra["relative_residual"] = residuals[0]
        x = opening.shaped(X)
        if callback is not None:
            callback(x, products)
        return x, SolveInfo(self.name, True, 1, products, time.perf_counter() - start, residuals, extra)
