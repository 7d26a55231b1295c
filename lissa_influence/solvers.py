"""Solvers for ``A x = b`` given only products ``v ↦ A v`` (``A`` = damped curvature).

Each solver is a configured object with one seam, ``solve(matvec, b) -> (x, info)``,
in the manner of ``scipy.sparse.linalg``: ``matvec`` is a callable on a 1-D tensor
(or a dense matrix), ``b`` is ``[P]`` or a stack ``[k, P]`` of right-hand sides, ``x``
has the shape of ``b`` and ``info`` is a :class:`SolveInfo`.

Every ``solve`` also takes ``callback(x, num_products)``, called after each iteration
with the current iterate (shape of ``b``) and the count of vector products so far, as
``scipy.sparse.linalg.cg`` calls its ``callback(xk)``: solver-accuracy benchmarks
trace the error against the product count with it (:mod:`lissa_influence.accuracy`).

Operators that can multiply a whole stack ``[k, P]`` in one call (every operator of
:mod:`lissa_influence.curvature`) say so with an ``accepts_stack = True`` attribute
(see :func:`stacked`); a plain callable is applied row by row.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch

Matvec = Callable[[torch.Tensor], torch.Tensor]
Callback = Callable[[torch.Tensor, int], None]


class SolverError(RuntimeError):
    """A solve that cannot give a trustworthy answer."""


class NegativeCurvatureError(SolverError):
    pass


class NotConvergedError(SolverError):
    pass


class DivergenceError(SolverError):
    pass


class SolverWarning(RuntimeWarning):
    pass


@dataclass
class SolveInfo:
    """Diagnostics of one solve (all right-hand sides together)."""

    solver: str
    converged: bool
    iterations: int
    num_products: int
    wall_time: float
    residuals: list[float] = field(default_factory=list)
    """CG: worst relative residual ``‖b − Ax‖/‖b‖`` per iteration; LiSSA: worst
    relative update ``‖h_{t+1} − h_t‖/‖h_t‖`` per step; Explicit: the final relative residual."""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "solver": self.solver,
            "converged": self.converged,
            "iterations": self.iterations,
            "num_products": self.num_products,
            "wall_time": self.wall_time,
            "final_residual": self.residuals[-1] if self.residuals else None,
            **self.extra,
        }


def stacked(fn: Matvec) -> Matvec:
    """Mark ``fn`` as accepting a stack ``[k, P]`` (rows are vectors) as well as ``[P]``."""
    fn.accepts_stack = True  # type: ignore[attr-defined]
    return fn


def as_stack_operator(matvec: Matvec | torch.Tensor) -> Matvec:
    """``[k, P] -> [k, P]`` product from a dense matrix, a stack-aware operator or a plain matvec."""
    if torch.is_tensor(matvec):
        a = matvec
        return lambda v: v @ a.T.to(v.dtype)
    if getattr(matvec, "accepts_stack", False):
        return matvec
    return lambda v: torch.stack([matvec(row) for row in v])


def _stack(b: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if b.dim() == 1:
        return b[None], True
    if b.dim() == 2:
        return b, False
    raise ValueError(f"right-hand side must be [P] or [k, P], got shape {tuple(b.shape)}")


def _check_rhs(b: torch.Tensor) -> None:
    if not b.is_floating_point():
        raise TypeError(f"right-hand side must be a floating tensor, got {b.dtype}")
    if not torch.isfinite(b).all():
        raise FloatingPointError("right-hand side contains NaN or inf (check the gradients it came from)")


def _rownorm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=-1)


def power_iteration(matvec: Matvec, size: int, dtype: torch.dtype, device: torch.device | str = "cpu", iters: int = 30, seed: int = 0, rtol: float = 1e-3) -> float:
    """Estimate of the eigenvalue of largest magnitude of a symmetric operator (a
    lower bound of it, in exact arithmetic), by power iteration."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(size, generator=g, dtype=dtype).to(device)
    v /= v.norm()
    estimate = 0.0
    for _ in range(iters):
        w = matvec(v)
        new = float(v @ w)
        norm = float(w.norm())
        if norm == 0.0 or not math.isfinite(norm):
            return new
        v = w / norm
        if abs(new - estimate) <= rtol * abs(new):
            return new
        estimate = new
    return estimate


# ---------------------------------------------------------------------------------
@dataclass
class CG:
    """Conjugate gradient for symmetric positive definite ``A``, all right-hand sides
    in one batched iteration (one stacked product per iteration for the unconverged rows).

    ``preconditioner``: ``None``, ``"jacobi"`` (diagonal estimated with
    ``jacobi_samples`` Rademacher probes, Hutchinson's estimator, from one stacked
    product), or a tensor holding the diagonal of ``A``.

    ``block=True`` (the default): block CG for ``k > 1`` right-hand sides, one Krylov
    space shared by all of them (O'Leary 1980, in Dubrulle's 2001 form with
    orthonormalised residual blocks, which stays stable when the right-hand sides are
    dependent or converge at different speeds). Each iteration multiplies all ``k``
    columns, and it takes far fewer iterations than ``k`` separate solves (8 test queries
    of the digits model: 3.7x fewer products, docs/benchmarks.md). The result is checked
    against the true residual ``B − AX`` (``k`` products); when the block recurrence
    breaks down (``SᵀAS`` not numerically positive definite, ``stall_iters`` iterations
    without a new lowest residual, or the check fails), separate CG recursions finish from
    its iterate within the same ``max_iter``. With a preconditioner, or ``block=False``,
    the rows run as separate (stacked) CG recursions from the start.
    """

    tol: float = 1e-6
    max_iter: int = 200
    preconditioner: None | Literal["jacobi"] | torch.Tensor = None
    block: bool = True
    stall_iters: int = 50
    jacobi_samples: int = 32
    seed: int = 0
    on_negative_curvature: Literal["raise", "warn"] = "raise"
    on_not_converged: Literal["raise", "warn"] = "warn"

    name = "cg"

    def _inverse_diagonal(self, op: Matvec, size: int, like: torch.Tensor) -> torch.Tensor | None:
        pc = self.preconditioner
        if pc is None:
            return None
        if torch.is_tensor(pc):
            diag = pc.to(like)
        elif pc == "jacobi":
            g = torch.Generator().manual_seed(self.seed)
            z = (torch.randint(0, 2, (self.jacobi_samples, size), generator=g) * 2 - 1).to(like)
            diag = (z * op(z)).mean(0)
        else:
            raise ValueError(f"unknown preconditioner {pc!r}; use None, 'jacobi' or a diagonal tensor")
        # A noisy or non-positive estimate must not break CG: any SPD preconditioner is exact.
        floor = 1e-3 * diag.abs().mean().clamp_min(torch.finfo(like.dtype).tiny)
        return 1.0 / diag.clamp_min(floor)

    def solve(self, matvec: Matvec | torch.Tensor, b: torch.Tensor, callback: Callback | None = None) -> tuple[torch.Tensor, SolveInfo]:
        _check_rhs(b)
        start = time.perf_counter()
        op = as_stack_operator(matvec)
        B, single = _stack(b)
        k, size = B.shape
        bnorm = _rownorm(B)
        safe_bnorm = torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
        report = (lambda X, n: callback((X[0] if single else X).clone(), n)) if callback is not None else None
        X, R, products, it, history = torch.zeros_like(B), B.clone(), 0, 0, []
        block = self.block and k > 1 and self.preconditioner is None
        if block:
            X, products, it, history, stop = self._block(op, B, safe_bnorm, report)
            # The block recurrence's residual can drift from B − AX (float32, ill-conditioned
            # blocks): check the true residual, and let row CG finish from X where needed.
            R = B - op(X)
            products += k
            true_rel = _rownorm(R) / safe_bnorm
            if stop is None and bool((true_rel <= self.tol).all()):
                return (X[0] if single else X), self._finish(true_rel, history, it, products, start, [],
                                                             {"block": True, "preconditioner": None})
            history.append(float(true_rel.max()))
        minv = self._inverse_diagonal(op, size, B)
        if minv is not None and not torch.is_tensor(self.preconditioner):
            products += self.jacobi_samples
        X, R, products, it, negative = self._rows(op, X, R, minv, safe_bnorm, products, it, history, report)
        extra = {"block": block, "preconditioner": None if self.preconditioner is None else
                 ("diagonal" if torch.is_tensor(self.preconditioner) else self.preconditioner)}
        if block:
            extra["block_stopped"] = stop or "residual above tol"
        info = self._finish(_rownorm(R) / safe_bnorm, history, it, products, start, negative, extra)
        return (X[0] if single else X), info

    def _rows(self, op: Matvec, X: torch.Tensor, R: torch.Tensor, minv: torch.Tensor | None, safe_bnorm: torch.Tensor,
              products: int, it: int, history: list[float], report) -> tuple:
        """Separate (stacked) CG recursions from ``X`` with residuals ``R``, up to ``max_iter`` iterations in all."""
        Z = R * minv if minv is not None else R.clone()
        D = Z.clone()
        rz = (R * Z).sum(-1)
        active = _rownorm(R) > 0  # a zero residual (e.g. a zero right-hand side) is solved
        negative: list[int] = []
        while it < self.max_iter:
            rel = _rownorm(R) / safe_bnorm
            active &= rel > self.tol
            history.append(float(rel.max()))
            if not active.any():
                break
            it += 1
            rows = active.nonzero().squeeze(1)
            AD = op(D[rows])
            products += len(rows)
            dad = (D[rows] * AD).sum(-1)
            bad = dad <= 0
            if bad.any():
                bad_rows = rows[bad].tolist()
                negative.extend(bad_rows)
                msg = (
                    f"CG met negative curvature (pᵀAp ≤ 0) at iteration {it} for right-hand side(s) {bad_rows}: "
                    "the damped Hessian is not positive definite. Increase the damping "
                    "(e.g. pretrain.damping / finetune.damping), or use the Gauss-Newton operator (gauss_newton=true)."
                )
                if self.on_negative_curvature == "raise":
                    raise NegativeCurvatureError(msg)
                warnings.warn(msg + " Those rows keep the last iterate (truncated CG).", SolverWarning, stacklevel=3)
                active[rows[bad]] = False
                keep = ~bad
                rows, AD, dad = rows[keep], AD[keep], dad[keep]
                if len(rows) == 0:
                    continue
            alpha = rz[rows] / dad
            X[rows] += alpha[:, None] * D[rows]
            R[rows] -= alpha[:, None] * AD
            Zr = R[rows] * minv if minv is not None else R[rows]
            rz_new = (R[rows] * Zr).sum(-1)
            beta = rz_new / rz[rows]
            D[rows] = Zr + beta[:, None] * D[rows]
            rz[rows] = rz_new
            if report is not None:
                report(X, products)
        return X, R, products, it, negative

    def _finish(self, final: torch.Tensor, history: list[float], it: int, products: int, start: float,
                negative: list[int], extra: dict[str, Any]) -> SolveInfo:
        """The SolveInfo of a finished solve; warns (or raises) when it did not converge."""
        if not history or history[-1] != float(final.max()):
            history.append(float(final.max()))
        converged = bool((final <= self.tol).all()) and not negative
        info = SolveInfo("cg", converged, it, products, time.perf_counter() - start, history,
                         {"relative_residuals": final.tolist(), "negative_curvature_rows": sorted(set(negative)), **extra})
        if not converged and not negative:
            msg = (f"CG did not reach tol={self.tol:g} in {self.max_iter} iterations (worst relative residual "
                   f"{float(final.max()):.3g}); raise max_iter, add damping, or use preconditioner='jacobi'")
            if self.on_not_converged == "raise":
                raise NotConvergedError(msg)
            warnings.warn(msg, SolverWarning, stacklevel=3)
        return info

    def _block(self, op: Matvec, B: torch.Tensor, safe_bnorm: torch.Tensor, report) -> tuple:
        """Dubrulle's DR-BCG on the columns ``B.T``: ``R = Q C`` with ``Q`` orthonormal, so the
        residual norms are the column norms of the small ``C``; ``S`` are the search blocks.
        Returns ``X``, products, iterations, the residual history and why it stopped early
        (``None`` when the recurrence's residuals reached ``tol``). It stops early, leaving
        the rest to row CG, when ``SᵀAS`` is not numerically positive definite (negative
        curvature, which row CG then reports per row, or an ill-conditioned block) or when
        the residual has not reached a new low for ``stall_iters`` iterations."""
        Bt = B.T  # [P, k]: columns are right-hand sides
        X = torch.zeros_like(Bt)
        Q, C = torch.linalg.qr(Bt)
        S = Q
        history: list[float] = []
        products, it, best, best_at = 0, 0, math.inf, 0
        while True:
            rel = torch.linalg.vector_norm(C, dim=0) / safe_bnorm
            worst = float(rel.max())
            history.append(worst)
            if worst <= self.tol:
                return X.T.contiguous(), products, it, history, None
            if worst < best:
                best, best_at = worst, it
            if it - best_at >= self.stall_iters:
                return X.T.contiguous(), products, it, history, f"no progress in {self.stall_iters} iterations"
            if it >= self.max_iter:
                return X.T.contiguous(), products, it, history, "max_iter"
            AS = op(S.T).T
            products += S.shape[1]
            it += 1
            M = 0.5 * (S.T @ AS + AS.T @ S)
            chol, bad = torch.linalg.cholesky_ex(M)
            if int(bad) != 0:
                return X.T.contiguous(), products, it, history, "SᵀAS not positive definite"
            xi = torch.cholesky_inverse(chol)
            X += S @ (xi @ C)
            Q, psi = torch.linalg.qr(Q - AS @ xi)
            S = Q + S @ psi.T
            C = psi @ C
            if report is not None:
                report(X.T, products)


# ---------------------------------------------------------------------------------
@dataclass
class LiSSA:
    """Stochastic Neumann-series solver (Agarwal et al. 2017; Koh & Liang 2017).

    ``h ← b + (1 − damping)·h − A h / scale`` for ``depth`` steps, result ``h / scale``:
    it solves ``(A + damping·scale·I) x = b`` and converges when every eigenvalue of
    ``A`` lies in ``(−damping·scale, (2 − damping)·scale)``. ``scale="auto"`` takes
    ``safety ×`` a power-iteration estimate of the top eigenvalue.

    ``batch_size``: Hessian samples per step, used when the operator can draw
    minibatches (``operator.minibatch(batch_size, generator)``, as
    :class:`~lissa_influence.curvature.CurvatureOperator` does); ``repeats``
    independent recursions are averaged. With a plain ``matvec`` (or no
    ``batch_size``) the recursion is deterministic and one repeat is run.
    ``tol``: stop early when the worst relative update falls below it (deterministic
    runs only; a stochastic recursion has a noise floor).
    """

    scale: float | Literal["auto"] = "auto"
    damping: float = 0.0
    depth: int = 1000
    repeats: int = 1
    batch_size: int | None = None
    seed: int = 0
    tol: float = 1e-6
    safety: float = 1.2
    power_iters: int = 50
    check_every: int = 10

    name = "lissa"

    def _top_eigenvalue(self, op: Matvec, size: int, like: torch.Tensor) -> float:
        return power_iteration(lambda v: op(v[None])[0], size, like.dtype, like.device, self.power_iters, self.seed)

    def solve(self, matvec: Matvec | torch.Tensor, b: torch.Tensor, callback: Callback | None = None) -> tuple[torch.Tensor, SolveInfo]:
        _check_rhs(b)
        start = time.perf_counter()
        full = as_stack_operator(matvec)
        B, single = _stack(b)
        size = B.shape[1]
        products = 0
        lam_max = None
        scale = self.scale
        if scale == "auto":
            lam_max = self._top_eigenvalue(full, size, B)
            products += self.power_iters
            if lam_max <= 0:
                raise DivergenceError(f"power iteration found top eigenvalue {lam_max:.3g} ≤ 0: the operator is not positive definite; add damping")
            scale = self.safety * lam_max
        elif not (isinstance(scale, (int, float)) and scale > 0):
            raise ValueError(f"scale must be a positive number or 'auto', got {scale!r}")
        scale = float(scale)

        stochastic = self.batch_size is not None and hasattr(matvec, "minibatch")
        repeats = self.repeats if stochastic else 1
        g = torch.Generator().manual_seed(self.seed)
        total = torch.zeros_like(B)
        history: list[float] = []
        steps = 0
        for r in range(repeats):
            h = B.clone()
            smallest = math.inf
            for t in range(1, self.depth + 1):
                op = as_stack_operator(matvec.minibatch(self.batch_size, g)) if stochastic else full
                h_new = B + (1.0 - self.damping) * h - op(h) / scale
                products += B.shape[0]
                if callback is not None:  # the running average, counting the current recursion
                    x = (total + h_new / scale) / (r + 1)
                    callback(x[0] if single else x, products)
                if t % self.check_every == 0 or t == self.depth:
                    upd = float((_rownorm(h_new - h) / _rownorm(h).clamp_min(torch.finfo(B.dtype).tiny)).max())
                    history.append(upd)
                    if not math.isfinite(upd) or upd > 1e2 * smallest or upd > 1e6:
                        raise self._divergence(full, size, B, scale, t)
                    smallest = min(smallest, upd)
                    if not stochastic and upd <= self.tol:
                        h = h_new
                        steps = max(steps, t)
                        break
                h = h_new
                steps = max(steps, t)
            total += h / scale
        X = total / repeats
        final = history[-1] if history else math.nan
        converged = stochastic or final <= self.tol
        info = SolveInfo("lissa", converged, steps, products, time.perf_counter() - start, history,
                         {"scale": scale, "top_eigenvalue": lam_max, "effective_damping": self.damping * scale,
                          "repeats": repeats, "stochastic": stochastic})
        if not converged:
            warnings.warn(f"LiSSA stopped at depth {self.depth} with relative update {final:.3g} > tol={self.tol:g}: "
                          "the error is about update/(1 − rate); raise depth, lower scale towards the top eigenvalue, or add damping",
                          SolverWarning, stacklevel=2)
        return (X[0] if single else X), info

    def _divergence(self, op: Matvec, size: int, like: torch.Tensor, scale: float, step: int) -> DivergenceError:
        lam = self._top_eigenvalue(op, size, like)
        need = lam / (2.0 - self.damping) if self.damping < 2 else math.inf
        return DivergenceError(
            f"LiSSA diverged at step {step} with scale={scale:.4g}: the top eigenvalue of the damped Hessian is about "
            f"{lam:.4g} (power iteration), and the recursion converges only for scale > {need:.4g}; use "
            f"scale ≥ {self.safety * lam:.4g} or scale='auto'. If the Hessian has negative eigenvalues, add damping "
            "or use the Gauss-Newton operator."
        )


# ---------------------------------------------------------------------------------
@dataclass
class Explicit:
    """Dense ``A`` from stacked products with basis vectors, then a direct solve.

    For small models and tests: refuses above ``max_params`` (the matrix takes
    ``P² × itemsize`` bytes). ``method``: ``"cholesky"``, ``"eigh"``, ``"lu"``, or
    ``"auto"`` (Cholesky, falling back to LU with a warning when ``A`` is not
    positive definite).
    """

    method: Literal["auto", "cholesky", "eigh", "lu"] = "auto"
    max_params: int = 10_000
    block_size: int = 256

    name = "explicit"

    def matrix(self, matvec: Matvec | torch.Tensor, size: int, like: torch.Tensor) -> torch.Tensor:
        if torch.is_tensor(matvec):
            return matvec.to(like)
        if size > self.max_params:
            gib = size * size * like.element_size() / 2**30
            raise MemoryError(
                f"Explicit solver refuses {size} parameters (the dense matrix needs {gib:.1f} GiB; limit "
                f"max_params={self.max_params}); use CG or LiSSA for this model"
            )
        op = as_stack_operator(matvec)
        eye = torch.eye(size, dtype=like.dtype, device=like.device)
        rows = [op(eye[i : i + self.block_size]) for i in range(0, size, self.block_size)]
        a = torch.cat(rows)
        return 0.5 * (a + a.T)  # rows of a symmetric operator; symmetrise the rounding

    def solve(self, matvec: Matvec | torch.Tensor, b: torch.Tensor, callback: Callback | None = None) -> tuple[torch.Tensor, SolveInfo]:
        _check_rhs(b)
        start = time.perf_counter()
        B, single = _stack(b)
        size = B.shape[1]
        a = self.matrix(matvec, size, B)
        extra: dict[str, Any] = {"method": self.method}
        method = self.method
        if method in ("auto", "cholesky"):
            chol, info = torch.linalg.cholesky_ex(a)
            if int(info) == 0:
                X = torch.cholesky_solve(B.T, chol).T
                extra["method"] = "cholesky"
            elif method == "cholesky":
                raise NegativeCurvatureError("Explicit(method='cholesky'): the damped Hessian is not positive definite; add damping or use gauss_newton")
            else:
                warnings.warn("Explicit: the damped Hessian is not positive definite; solving with LU. "
                              "Influence assumes a minimum: add damping or use gauss_newton.", SolverWarning, stacklevel=2)
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
        resid = float((_rownorm(X @ a - B) / _rownorm(B).clamp_min(torch.finfo(B.dtype).tiny)).max())
        products = 0 if torch.is_tensor(matvec) else size
        info = SolveInfo("explicit", True, 1, products, time.perf_counter() - start, [resid], extra)
        if callback is not None:
            callback(X[0] if single else X, products)
        return (X[0] if single else X), info


@dataclass
class Identity:
    """``x = b``: every inverse Hessian replaced by the identity (the paper's ablation)."""

    name = "identity"

    def solve(self, matvec: Matvec | torch.Tensor, b: torch.Tensor, callback: Callback | None = None) -> tuple[torch.Tensor, SolveInfo]:
        _check_rhs(b)
        if callback is not None:
            callback(b.clone(), 0)
        return b.clone(), SolveInfo("identity", True, 0, 0, 0.0, [])


Solver = CG | LiSSA | Explicit | Identity
