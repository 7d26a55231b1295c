"""Direct solvers: the dense matrix from products (:class:`Explicit`) and the identity."""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..operators import DenseOperator, LinearOperator, OperatorLike, aslinearoperator
from .base import (
    Callback,
    DivergenceError,
    NegativeCurvatureError,
    SolveInfo,
    SolverWarning,
    as_stack,
    at_least_one,
    check_rhs,
    rownorm,
)


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
    """

    method: Literal["auto", "cholesky", "eigh", "lu"] = "auto"
    max_params: int = 10_000
    block_size: int = 256
    basis_products: Literal["auto", "vmap", "rows"] = "rows"

    name = "explicit"

    def __post_init__(self) -> None:
        if self.method not in ("auto", "cholesky", "eigh", "lu"):
            raise ValueError(f"unknown method {self.method!r}; use 'auto', 'cholesky', 'eigh' or 'lu'")
        at_least_one("max_params", self.max_params)
        at_least_one("block_size", self.block_size)
        if self.basis_products not in ("auto", "vmap", "rows"):
            raise ValueError(f"basis_products={self.basis_products!r}: use 'auto', 'vmap' or 'rows'")

    def matrix(self, matvec: OperatorLike, size: int, like: torch.Tensor) -> torch.Tensor:
        """The dense ``[size, size]`` matrix of the operator, in ``like``'s dtype and device."""
        return self._matrix(matvec, size, like)[0]

    def _matrix(self, matvec: OperatorLike, size: int, like: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """The matrix, and how its basis blocks were taken (``basis_products``, for the diagnostics)."""
        op = aslinearoperator(matvec, like)
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
        from ..curvature import CurvatureOperator  # here, not above: curvature imports the solvers (through kfac)

        # Gauss-Newton products take the functional path whatever hvp_mode says: nothing to choose
        if not (isinstance(op, CurvatureOperator) and op.objective.hvp_mode == "retained") or op.gauss_newton:
            return [op(block) for block in blocks], {}
        mode = self.basis_products
        if mode == "auto" and (len(blocks) < 3 or len(blocks[0]) < 2):
            mode = "rows"  # auto times a block each way, and needs one after them to choose for
        if mode == "rows":
            return [op(block) for block in blocks], {"basis_products": "rows"}
        vmapped = dataclasses.replace(op, objective=dataclasses.replace(op.objective, hvp_mode="functional"))
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

    def solve(
        self, matvec: OperatorLike, b: torch.Tensor, callback: Callback | None = None
    ) -> tuple[torch.Tensor, SolveInfo]:
        check_rhs(b)
        start = time.perf_counter()
        B, single = as_stack(b)
        size = B.shape[1]
        op = aslinearoperator(matvec, B)
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
                    stacklevel=2,
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
            callback(X[0] if single else X, products)
        return (X[0] if single else X), info


@dataclass
class Identity:
    """``x = b``: every inverse Hessian replaced by the identity (the paper's ablation)."""

    name = "identity"
    approximate = True  # replaces the inverse by design: the chain keeps it for every stage

    def solve(
        self, matvec: OperatorLike, b: torch.Tensor, callback: Callback | None = None
    ) -> tuple[torch.Tensor, SolveInfo]:
        check_rhs(b)
        if callback is not None:
            callback(b.clone(), 0)
        return b.clone(), SolveInfo("identity", True, 0, 0, 0.0, [])
