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
from typing import TYPE_CHECKING, Any

import torch

from ..operators import OperatorLike
from .base import Callback, SolveInfo, as_stack, check_fisher, check_rhs, rownorm

if TYPE_CHECKING:
    from ..kfac import FisherType, KroneckerKind


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

    def solve(
        self, matvec: OperatorLike, b: torch.Tensor, callback: Callback | None = None
    ) -> tuple[torch.Tensor, SolveInfo]:
        check_rhs(b)
        kronecker = getattr(matvec, "kronecker", None)
        damping = getattr(matvec, "damping", None)
        if not callable(kronecker) or damping is None:
            raise TypeError(
                f"EKFAC needs a model-backed operator that can fit Kronecker factors (a CurvatureOperator, as "
                f"Influence and MultiStageInfluence pass), got {type(matvec).__name__}; for a dense matrix or a "
                "function use CG or Explicit"
            )
        start = time.perf_counter()
        curvature = kronecker(self.kind, self.fisher, self.seed)
        fitted = time.perf_counter()
        B, single = as_stack(b)
        X = curvature.inverse(B, damping).to(B)
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
            matmat = getattr(matvec, "matmat", None)
            AX = matmat(X) if callable(matmat) else torch.stack([matvec(x) for x in X])  # type: ignore[operator]
            products = X.shape[0]
            resid = rownorm(B - AX) / rownorm(B).clamp_min(torch.finfo(B.dtype).tiny)
            residuals = [float(resid.max())]
            extra["relative_residual"] = residuals[0]
        x = X[0] if single else X
        if callback is not None:
            callback(x, products)
        return x, SolveInfo(self.name, True, 1, products, time.perf_counter() - start, residuals, extra)
