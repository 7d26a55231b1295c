"""Direct solvers: the dense matrix from products (:class:`Explicit`), a model operator's
matrix factored once (:class:`ExactInverse`), and the identity."""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..operators import DenseOperator, LinearOperator, ModelOperator, OperatorLike, aslinearoperator
from .base import (
    Callback,
    DivergenceError,
    NegativeCurvatureError,
    SolveInfo,
    SolverWarning,
    accepts_matvec,
    at_least_one,
    check_rhs,
    open_solve,
    rownorm,
)

__all__ = ["ExactInverse", "Explicit", "Identity"]

log = logging.getLogger(__name__)


@dataclass
class Explicit:
    """Dense ``A`` from stacked products with basis vectors, then a direct solve.

    For small models and tests: refuses above ``max_params`` (the matrix takes
    ``P² × itemsize`` bytes). ``method``: ``"cholesky"``, ``"eigh"``, ``"lu"``, or
    ``"auto"`` (Cholesky, falling back to LU with a warning when ``A`` is not
    positive definite). ``block_size``: basis vectors per stacked product.

    ``basis_products``: how a curvature operator in ``hvp_mode="retained"`` takes the
    blocks. ``"rows"``: through its kept gradient graphs, one backward pass per basis
    vector, which wins where a product is costly (40 against 50 ms per row on the digits
    CNN); ``"vmap"``: functional products vmapped over the block, one pass per chunk of the
    sample, which wins where a product is cheap and its overhead dominates (2.5× on a
    7,850-parameter logistic regression; memory grows with ``block_size`` × the chunk × the
    model's activations); ``"auto"``: one block each way, timed, then the faster. Other
    operators take the blocks as they are. The same matrix, up to rounding: the default
    ``"rows"`` keeps it bit for bit from run to run, which ``"auto"`` (a choice by timing)
    does not.

    Args:
        method: ``"auto"``, ``"cholesky"``, ``"eigh"`` or ``"lu"``.
        max_params: the largest operator it forms.
        block_size: basis vectors per stacked product.
        basis_products: ``"rows"``, ``"vmap"`` or ``"auto"``.
    """

    method: Literal["auto", "cholesky", "eigh", "lu"] = "auto"
    max_params: int = 10_000
    block_size: int = 256
    basis_products: Literal["auto", "vmap", "rows"] = "rows"

    name = "explicit"
    approximate = False  # a direct solve

    def __post_init__(self) -> None:
        if self.method not in ("auto", "cholesky", "eigh", "lu"):
            raise ValueError(f"unknown method {self.method!r}; use 'auto', 'cholesky', 'eigh' or 'lu'")
        at_least_one("max_params", self.max_params)
        at_least_one("block_size", self.block_size)
        if self.basis_products not in ("auto", "vmap", "rows"):
            raise ValueError(f"basis_products={self.basis_products!r}: use 'auto', 'vmap' or 'rows'")

    def matrix(self, A: OperatorLike, size: int, like: torch.Tensor) -> torch.Tensor:
        """The dense matrix of an operator, from products with basis vectors.

        Args:
            A: the operator, a dense matrix or a function ``v ↦ A v``.
            size: its size ``P``.
            like: a tensor of the dtype and device wanted.

        Returns:
            ``[size, size]``, symmetrised.
        """
        return self._matrix(A, size, like)[0]

    def _matrix(self, A: OperatorLike, size: int, like: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """The matrix, and how its basis blocks were taken (``basis_products``, for the diagnostics)."""
        op = aslinearoperator(A, like)
        if isinstance(op, DenseOperator):
            return op.matrix.to(like), {}
        if size > self.max_params:
            gib = size * size * like.element_size() / 2**30
            raise MemoryError(
                f"Explicit solver refuses {size} parameters (the dense matrix needs {gib:.1f} GiB; limit "
                f"max_params={self.max_params}); use CG or LiSSA for this model"
            )
        eye = torch.eye(size, dtype=like.dtype, device=like.device)
        rows, how = self._basis_rows(op, [eye[i : i + self.block_size] for i in range(0, size, self.block_size)])
        a = torch.cat(rows)
        return 0.5 * (a + a.T), how  # rows of a symmetric operator; symmetrise the rounding

    def _basis_rows(self, op: LinearOperator, blocks: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict[str, Any]]:
        # a model operator on retained graphs can also take functional (vmapped) products; any other
        # operator (Gauss-Newton products too: functional whatever hvp_mode says) has nothing to choose
        vmapped = op.functional_copy() if isinstance(op, ModelOperator) else None
        if vmapped is None or not isinstance(op, ModelOperator):
            return [op(block) for block in blocks], {}
        mode = self.basis_products
        if mode == "auto" and (len(blocks) < 3 or len(blocks[0]) < 2):
            mode = "rows"  # auto times a block each way, and needs one after them to choose for
        if mode == "rows":
            return [op(block) for block in blocks], {"basis_products": "rows"}
        try:
            if mode == "vmap":
                return [vmapped(block) for block in blocks], {"basis_products": "vmap"}
            first = [op(blocks[0][:1])]  # builds the kept graphs (once), outside the timing
            start = time.perf_counter()
            first.append(op(blocks[0][1:]))
            per_row = (time.perf_counter() - start) / (len(blocks[0]) - 1)
            start = time.perf_counter()
            second = vmapped(blocks[1])
            per_vmapped = (time.perf_counter() - start) / len(blocks[1])
            faster, name = (op, "rows") if per_row <= per_vmapped else (vmapped, "vmap")
            rows = [torch.cat(first), second, *(faster(block) for block in blocks[2:])]
            return rows, {"basis_products": name, "seconds_per_row": {"rows": per_row, "vmap": per_vmapped}}
        finally:
            op.num_products += vmapped.num_products  # counted where the caller looks

    @accepts_matvec
    def solve(
        self, A: OperatorLike, b: torch.Tensor, callback: Callback | None = None
    ) -> tuple[torch.Tensor, SolveInfo]:
        """Solve ``A x = b`` densely (:meth:`lissa_influence.solvers.Solver.solve`).

        Args:
            A: the operator, a dense matrix or a function ``v ↦ A v``.
            b: ``[P]`` or a stack ``[k, P]`` of right-hand sides.
            callback: called once, as ``callback(x, num_products)``.

        Returns:
            ``(x, info)``; ``info.extra`` holds the factorisation used.
        """
        start = time.perf_counter()
        opening = open_solve(A, b)
        op, B = opening.op, opening.B
        size = B.shape[1]
        a, how = self._matrix(op, size, B)
        if not torch.isfinite(a).all():
            raise DivergenceError("Explicit: the matrix holds NaN or inf; check the damping and the model's parameters")
        extra: dict[str, Any] = {"method": self.method, **how}
        method = self.method
        if method in ("auto", "cholesky"):
            chol, info = torch.linalg.cholesky_ex(a)
            if int(info) == 0:
                X = torch.cholesky_solve(B.T, chol).T
                extra["method"] = "cholesky"
            elif method == "cholesky":
                raise NegativeCurvatureError(
                    "Explicit(method='cholesky'): the damped Hessian is not positive definite; "
                    "add damping or use gauss_newton=True"
                )
            else:
                warnings.warn(
                    "Explicit: the damped Hessian is not positive definite; solving with LU. "
                    "Influence assumes a minimum: add damping or use gauss_newton=True.",
                    SolverWarning,
                    stacklevel=3,
                )
                method = "lu"
        if method == "eigh":
            evals, evecs = torch.linalg.eigh(a)
            X = ((B @ evecs) / evals) @ evecs.T
            extra.update(method="eigh", min_eigenvalue=float(evals[0]), max_eigenvalue=float(evals[-1]))
        elif method == "lu":
            X = torch.linalg.solve(a, B.T).T
            extra["method"] = "lu"
        elif method not in ("auto", "cholesky"):
            raise ValueError(f"unknown method {self.method!r}; use 'auto', 'cholesky', 'eigh' or 'lu'")
        if not torch.isfinite(X).all():
            raise DivergenceError(f"Explicit ({extra['method']}): the solution holds NaN or inf (a singular matrix?)")
        resid = float((rownorm(X @ a - B) / rownorm(B).clamp_min(torch.finfo(B.dtype).tiny)).max())
        products = 0 if isinstance(op, DenseOperator) else size
        info = SolveInfo("explicit", True, 1, products, time.perf_counter() - start, [resid], extra)
        if callback is not None:
            callback(opening.shaped(X), products)
        return opening.shaped(X), info


@dataclass
class Identity:
    """``x = b``: every inverse Hessian replaced by the identity (the paper's ablation)."""

    name = "identity"
    approximate = True  # replaces the inverse by design: the chain keeps it for every stage

    @accepts_matvec
    def solve(
        self, A: OperatorLike, b: torch.Tensor, callback: Callback | None = None
    ) -> tuple[torch.Tensor, SolveInfo]:
        """``x = b`` (:meth:`lissa_influence.solvers.Solver.solve`); ``A`` is not used.

        Args:
            A: the operator (ignored).
            b: ``[P]`` or a stack ``[k, P]`` of right-hand sides.
            callback: called once, as ``callback(x, 0)``.

        Returns:
            ``(b, info)``, a copy of ``b``.
        """
        check_rhs(b)
        if callback is not None:
            callback(b.clone(), 0)
        return b.clone(), SolveInfo("identity", True, 0, 0, 0.0, [])


class ExactInverse:
    """``(∇²_ΘΘ F + λI)⁻¹`` of a small head, formed densely and factored once (Cholesky;
    eigenvalues when it is not positive definite), then applied to any number of
    right-hand sides. The :class:`~lissa_influence.solvers.Solver` the fixed-embedding
    finetune solve uses by default where the head fits.

    The matrix is the operator's own (:meth:`~lissa_influence.operators.ModelOperator.dense`:
    the Gauss-Newton Jacobian where the curvature is one, else products with basis vectors),
    in the operator's dtype; the factor is kept for that operator and damping.

    Args:
        max_params: refuse operators above this size (the matrix takes ``P²`` entries).
        block_size: basis vectors per stacked product.
    """

    name = "exact"
    approximate = False  # a direct solve

    def __init__(self, max_params: int = 10_000, block_size: int = 256):
        self.max_params, self.block_size = max_params, block_size
        self.assembly = ""
        # the operator it was built for, that operator's damping then, and the factor
        self._factor: tuple[ModelOperator, torch.Tensor, tuple[str, torch.Tensor, torch.Tensor | None, float, int]]
        self._factor = None  # type: ignore[assignment]

    def _factorised(self, op: ModelOperator) -> tuple[str, torch.Tensor, torch.Tensor | None, float, int]:
        damping = torch.as_tensor(op.damping).detach().clone()
        cached = self._factor
        if cached is None or cached[0] is not op or not torch.equal(cached[1], damping):
            t0 = time.perf_counter()
            n = op.shape[0]
            if n > self.max_params:
                raise MemoryError(f"the exact head inverse refuses {n} parameters (limit {self.max_params})")
            a, self.assembly = op.dense(self.block_size)
            if not torch.isfinite(a).all():
                raise DivergenceError("the head's Hessian holds NaN or inf; check the damping and the parameters")
            chol, info = torch.linalg.cholesky_ex(a)
            entry: tuple[str, torch.Tensor, torch.Tensor | None, float, int]
            if int(info) == 0:
                entry = ("cholesky", chol, None, time.perf_counter() - t0, n)
            else:  # not positive definite (a head far from its minimum): the pseudo-inverse on |λ|
                evals, evecs = torch.linalg.eigh(a)
                log.warning(
                    "the damped head Hessian is not positive definite (eigenvalues from %.3g); solving on |λ|",
                    float(evals[0]),
                )
                mag = evals.abs()
                inv = torch.where(mag > torch.finfo(mag.dtype).eps * mag.max(), 1 / mag, torch.zeros_like(mag))
                entry = ("eigh", evecs, inv, time.perf_counter() - t0, n)
            self._factor = (op, damping, entry)  # one operator at a time: a refit replaces it
        return self._factor[2]

    @accepts_matvec
    def solve(
        self, A: OperatorLike, b: torch.Tensor, callback: Callback | None = None
    ) -> tuple[torch.Tensor, SolveInfo]:
        """Solve ``A x = b`` with the factored matrix (:meth:`lissa_influence.solvers.Solver.solve`).

        Args:
            A: a :class:`~lissa_influence.operators.ModelOperator` (a
                :class:`~lissa_influence.curvature.CurvatureOperator`); its matrix is formed
                (in eval mode) and factored at the first solve.
            b: ``[P]`` or a stack ``[k, P]`` of right-hand sides.
            callback: called once, as ``callback(x, num_products)``.

        Returns:
            ``(x, info)``; ``info.extra`` holds the factorisation and how the matrix was formed.
        """
        if not isinstance(A, ModelOperator):
            raise TypeError("ExactInverse solves a CurvatureOperator (it caches the factor per operator)")
        op = A
        start = time.perf_counter()
        opening = open_solve(A, b)
        B = opening.B
        before = self._factor
        method, f, evals, factor_s, n = self._factorised(op)
        built = self._factor is not before
        B64 = B.to(op.dtype)
        if method == "cholesky":
            X = torch.cholesky_solve(B64.T, f).T
        else:
            assert evals is not None  # here the inverse magnitudes, small ones cut to 0
            X = ((B64 @ f) * evals) @ f.T
        resid = float((rownorm(op(X) - B64) / rownorm(B64).clamp_min(torch.finfo(B64.dtype).tiny)).max())
        X = X.to(B.dtype)
        # the residual check's products, and what forming the matrix took: n basis-vector
        # products, or the two that showed the Hessian equals the Gauss-Newton matrix
        products = B.shape[0] + ((n if self.assembly.startswith("products") else 2) if built else 0)
        converged = resid <= torch.finfo(op.dtype).eps ** 0.5
        if not converged:
            warnings.warn(
                f"the exact head solve left a relative residual of {resid:.3g} ({method}): the damped head Hessian "
                "is (nearly) singular; add finetune damping",
                SolverWarning,
                stacklevel=3,
            )
        info = SolveInfo(
            "exact",
            converged,
            1,
            products,
            time.perf_counter() - start,
            [resid],
            {
                "method": method,
                "dtype": str(op.dtype),
                "factor_seconds": factor_s,
                "size": n,
                "assembly": self.assembly,
            },
        )
        if callback is not None:
            callback(opening.shaped(X), products)
        return opening.shaped(X), info
