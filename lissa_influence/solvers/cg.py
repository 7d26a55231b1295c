"""Conjugate gradient: row CG (stacked) and block CG, each optionally preconditioned."""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..operators import DampedOperator, DerivedOperator, FisherType, LinearOperator, OperatorLike, damping_key
from .base import (
    Callback,
    DivergenceError,
    NegativeCurvatureError,
    NotConvergedError,
    SolveInfo,
    SolverWarning,
    accepts_matvec,
    at_least_one,
    check_fisher,
    non_negative,
    open_solve,
    rownorm,
)
from .deflation import Balancing, Deflated, Harvester, Recording, Subspace, operator_key
from .preconditioners import Diagonal, Kronecker, NamedPreconditioner, Nystrom, Preconditioner


@dataclass
class CG:
    """Conjugate gradient for symmetric positive definite ``A``, all right-hand sides
    in one batched iteration (one stacked product per iteration for the unconverged rows).

    ``preconditioner`` (:mod:`~lissa_influence.solvers.preconditioners`): ``None``;
    ``"jacobi"`` (diagonal estimated with ``jacobi_samples`` Rademacher probes,
    Hutchinson's estimator, from one stacked product) or a tensor holding the diagonal of
    ``A``; ``"nystrom"`` (a randomized rank-``rank`` sketch of ``A`` from ``rank``
    products); ``"ekfac"`` / ``"kfac"`` (Kronecker factors of the model behind a
    :class:`~lissa_influence.curvature.CurvatureOperator`, fitted once per operator, with
    ``fisher`` choosing their Fisher estimate); or any
    :class:`~lissa_influence.solvers.preconditioners.Preconditioner`. A preconditioner
    changes how fast CG converges, never what it converges to.

    ``block=True`` (the default): block CG for ``k > 1`` right-hand sides, one Krylov
    space shared by all of them (O'Leary 1980, in Dubrulle's 2001 form with
    orthonormalised residual blocks, which stays stable when the right-hand sides are
    dependent or converge at different speeds); a preconditioner is applied split,
    ``M^{-1/2} A M^{-1/2}``. Each iteration multiplies all ``k``
    columns, and it takes far fewer iterations than ``k`` separate solves (8 test queries
    of the digits model: 3.7x fewer products, docs/benchmarks.md). The result is checked
    against the true residual ``B − AX`` (``k`` products); when the block recurrence
    breaks down (``SᵀAS`` not numerically positive definite, ``stall_iters`` iterations
    without a new lowest residual, or the check fails), separate CG recursions finish from
    its iterate within the same ``max_iter``. With ``block=False`` the rows run as
    separate (stacked) CG recursions from the start.

    Either way the true residual decides: a row whose recurrence's residual reaches ``tol``
    is checked against ``b − Ax`` (one product), and restarted from it when that is above
    ``tol``. A row whose restart did not halve its true residual, or whose recurrence's
    residual ended ten times below it at ``max_iter``, has stagnated at the accuracy this
    dtype attains on this system; the warning then says so, with the residual reached,
    instead of asking for a larger ``max_iter``. ``info.residuals`` are ``‖b − Ax‖/‖b‖``
    (the recurrence's where none was computed; the last entry always is computed); a
    split block phase's ``‖M^{-1/2} r‖/‖M^{-1/2} b‖`` are in ``info.extra["split_residuals"]``.

    Args:
        tol: the relative residual ``‖b − Ax‖/‖b‖`` each right-hand side must reach (0: run
            every iteration).
        max_iter: iterations at most.
        preconditioner: None, ``"jacobi"``, ``"nystrom"``, ``"ekfac"``, ``"kfac"``, a diagonal
            tensor or a :class:`~lissa_influence.solvers.preconditioners.Preconditioner`.
        block: block CG for several right-hand sides.
        stall_iters: block iterations without a new lowest residual before row CG takes over.
        jacobi_samples: Rademacher probes of the Jacobi diagonal.
        rank: the Nyström sketch's rank.
        fisher: the Fisher estimate of Kronecker preconditioners.
        seed: the seed of the sketches and probes.
        on_negative_curvature: ``"raise"`` or ``"warn"`` (the row keeps its best iterate).
        on_not_converged: ``"warn"`` or ``"raise"``.
        deflate: the size of the subspace recycled across solves (0: no deflation).
    """

    tol: float = 1e-6
    max_iter: int = 200
    preconditioner: None | Literal["jacobi", "nystrom", "ekfac", "kfac"] | torch.Tensor | Preconditioner = None
    block: bool = True
    stall_iters: int = 50
    jacobi_samples: int = 32
    rank: int = 64
    fisher: FisherType = "auto"
    seed: int = 0
    on_negative_curvature: Literal["raise", "warn"] = "raise"
    on_not_converged: Literal["raise", "warn"] = "warn"
    deflate: int = 0

    name = "cg"
    approximate = False  # solves to tol

    def __post_init__(self) -> None:
        non_negative("tol", self.tol)  # 0: run every iteration
        # getattr on this dataclass's own fields, by name: not contract probing
        for key in ("max_iter", "jacobi_samples", "rank"):
            at_least_one(key, getattr(self, key))
        for key, why in (("stall_iters", "0 leaves all to row CG"), ("deflate", "0: no deflation")):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{key}={value!r}: use an integer >= 0 ({why})")
        for key in ("on_negative_curvature", "on_not_converged"):
            if getattr(self, key) not in ("raise", "warn"):
                raise ValueError(f"CG({key}={getattr(self, key)!r}): use 'raise' or 'warn'")
        pc = self.preconditioner
        if not (isinstance(pc, (torch.Tensor, Preconditioner)) or pc is None or pc in PRECONDITIONERS):
            raise ValueError(
                f"unknown preconditioner {pc!r}; use None, {', '.join(map(repr, PRECONDITIONERS))}, a diagonal tensor "
                "or a Preconditioner"
            )
        check_fisher(self.fisher)

    @property
    def preconditioner_name(self) -> str | None:
        pc = self.preconditioner
        if pc is None or isinstance(pc, str):
            return pc
        if torch.is_tensor(pc):
            return "diagonal"
        return pc.name if isinstance(pc, NamedPreconditioner) else type(pc).__name__

    def _preconditioner(self, op: LinearOperator, like: torch.Tensor) -> tuple[Preconditioner | None, bool]:
        """The preconditioner, and whether this solve built it (a sketch is kept on a
        ``CurvatureOperator`` and reused, as its Kronecker factors are)."""
        pc = self.preconditioner
        if pc is None or isinstance(pc, Preconditioner):
            return pc, False
        if torch.is_tensor(pc):
            return Diagonal(pc.to(like)), False
        if pc in ("ekfac", "kfac"):
            kron = Kronecker(op, pc, self.fisher, self.seed)
            return kron, False  # its fitting is reported as passes, not products
        cache = op.memo
        damping = damping_key(op.damping) if isinstance(op, DampedOperator) else None  # a sketch of the damped operator
        key = (pc, self.rank if pc == "nystrom" else self.jacobi_samples, self.seed, like.dtype, damping)
        if key in cache:
            return cache[key], False
        built: Preconditioner
        if pc == "jacobi":
            built = Diagonal.hutchinson(op, self.jacobi_samples, self.seed, like)
        else:
            built = Nystrom(op, self.rank, self.seed, like)
        cache[key] = built
        return built, True

    @accepts_matvec
    def solve(
        self, A: OperatorLike, b: torch.Tensor, callback: Callback | None = None
    ) -> tuple[torch.Tensor, SolveInfo]:
        """Solve ``A x = b`` (:meth:`lissa_influence.solvers.Solver.solve`).

        Args:
            A: the operator (symmetric positive definite), a dense matrix or a function ``v ↦ A v``.
            b: ``[P]`` or a stack ``[k, P]`` of right-hand sides.
            callback: called as ``callback(x, num_products)`` after each iteration.

        Returns:
            ``(x, info)``: ``x`` of the shape of ``b``; ``info.extra`` holds the block,
            preconditioner and deflation diagnostics.
        """
        start = time.perf_counter()
        opening = open_solve(A, b)
        op, B = opening.op, opening.B
        safe_bnorm = _safe(rownorm(B))
        report = (lambda X, n: callback(opening.shaped(X).clone(), n)) if callback is not None else None
        pc, built = self._preconditioner(op, B)
        products = pc.products if built and pc is not None else 0
        extra = self._extra(self.block and B.shape[0] > 1, pc, built)
        if self.deflate:
            X, R, products, it, history, negative, stalled = self._deflated(
                op, B, safe_bnorm, pc, products, report, extra
            )
        else:
            X, R, products, it, history, negative, stalled = self._iterate(
                op, B, safe_bnorm, pc, products, report, extra
            )
        info = self._finish(rownorm(R) / safe_bnorm, history, it, products, start, negative, stalled, extra)
        return opening.shaped(X), info

    def _iterate(
        self,
        op: LinearOperator,
        B: torch.Tensor,
        safe_bnorm: torch.Tensor,
        pc: Preconditioner | None,
        products: int,
        report: Callback | None,
        extra: dict[str, Any],
        rows: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, int, int, list[float], list[int], torch.Tensor]:
        """Block CG (when asked, for several right-hand sides) and then row CG from its iterate
        (``rows=False``: block CG only), on ``op``; residuals relative to ``safe_bnorm``. Returns
        ``X``, its true residuals ``B − op(X)``, products, iterations, the residual history, the
        rows that met negative curvature and a mask of the rows that stagnated."""
        k = B.shape[0]
        X, R, it = torch.zeros_like(B), B.clone(), 0
        history: list[float] = []
        best = _Best(B, safe_bnorm)
        block = self.block and k > 1
        stop = None
        if block:
            claims: torch.Tensor | None
            if pc is None:
                X, products, it, history, stop, claims = self._block(op, B, safe_bnorm, report, best, products)
            else:  # split: block CG on M^{-1/2} A M^{-1/2}, iterates mapped back by M^{-1/2}
                Bs = pc.apply_sqrt(B)
                mapped = (lambda Xs, n: report(pc.apply_sqrt(Xs), n)) if report is not None else None
                Xs, products, it, split, stop, _ = self._block(
                    _Split(op, pc), Bs, _safe(rownorm(Bs)), mapped, _Best(Bs, _safe(rownorm(Bs))), products
                )
                X = pc.apply_sqrt(Xs)
                # its residuals are of another norm: kept apart, so that `residuals` are all ‖b − Ax‖/‖b‖
                extra["split_residuals"] = split
                history, claims = [float((rownorm(B) / safe_bnorm).max())], None
            # The block recurrence's residual can drift from B − AX (float32, ill-conditioned
            # blocks), and a split preconditioner's is another norm: check the true residual,
            # and let row CG finish from X where needed.
            R = B - op(X)
            products += k
            _finite(R, "the residual after the block iterations")
            true_rel = rownorm(R) / safe_bnorm
            best.checked(X, torch.arange(k), true_rel, claims)
            history.append(float(true_rel.max()))
            if not rows or (stop is None and bool((true_rel <= self.tol).all())):
                if stop is not None:
                    extra["block_stopped"] = stop
                return X, R, products, it, history, [], torch.zeros(k, dtype=torch.bool)
        X, R, products, it, negative, stalled = self._rows(
            op, B, X, R, pc, safe_bnorm, products, it, history, report, best
        )
        X, R, products = best.settle(op, X, R, products)
        if block:
            extra["block_stopped"] = stop or "true residual above tol"
        extra["residual_growth"] = best.growth
        return X, R, products, it, history, negative, stalled

    def _deflated(
        self,
        op: LinearOperator,
        B: torch.Tensor,
        safe_bnorm: torch.Tensor,
        pc: Preconditioner | None,
        products: int,
        report: Callback | None,
        extra: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor, int, int, list[float], list[int], torch.Tensor]:
        """:meth:`_iterate` on ``Π A x̃ = Π b`` with the subspace kept on ``op`` for this
        damping and dtype (none yet: on ``A`` itself), ``x = Q b + Πᵀ x̃``, checked against
        ``b − A x`` (``k`` products; row CG on ``A`` finishes any row above ``tol``). Every
        product is harvested into the subspace kept for the next solve (module
        :mod:`~lissa_influence.solvers.deflation`)."""
        k = B.shape[0]
        key = operator_key(op, B.dtype)
        subspace: Subspace | None = op.memo.get(("deflation", key))
        harvester = Harvester(self.deflate, 2 * self.deflate + 2 * k, subspace, key)
        rec = Recording(op, harvester)
        report_extra: dict[str, Any] = {"used": 0}
        if subspace is None:
            X, R, products, it, history, negative, stalled = self._iterate(
                rec, B, safe_bnorm, pc, products, report, extra
            )
        else:
            report_extra["used"] = subspace.size
            X, R, products, it, history, negative, stalled = self._refined(
                rec, subspace, B, safe_bnorm, pc, products, report, extra, report_extra
            )
        harvested = harvester.subspace()
        if harvested is not None:
            op.memo[("deflation", key)] = harvested
            report_extra["kept"] = harvested.size
            report_extra["smallest_ritz_values"] = harvested.values[:4].tolist()
        extra["deflation"] = report_extra
        return X, R, products, it, history, negative, stalled

    def _refined(
        self,
        rec: LinearOperator,
        subspace: Subspace,
        B: torch.Tensor,
        safe_bnorm: torch.Tensor,
        pc: Preconditioner | None,
        products: int,
        report: Callback | None,
        extra: dict[str, Any],
        report_extra: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor, int, int, list[float], list[int], torch.Tensor]:
        """Deflated solves of ``A x = B``: block CG on ``Π A x̃ = Π r`` for the current residual
        ``r`` (iterative refinement: the deflated recurrence attains a residual some orders
        above the dtype's, a pass on the remainder recovers them), each pass's result checked
        against ``B − A x``; what is still above ``tol`` after a pass that did not halve it
        goes to row CG on ``A`` with the balancing preconditioner, which is robust to
        rounding and to a subspace that does not fit (it then costs products, never accuracy)."""
        k = B.shape[0]
        X, R = torch.zeros_like(B), B
        history: list[float] = []
        negative: list[int] = []
        it, passes = 0, 0
        rel = rownorm(R) / safe_bnorm
        while self.block and k > 1 and passes < 3 and it < self.max_iter:
            passes += 1
            X0 = subspace.coarse(R)
            mapped = (
                (lambda Xt, n, base=X + X0: report(base + subspace.project_t(Xt), n)) if report is not None else None
            )
            # block iterations only: row CG on the singular Π A meets its null space in rounding
            Xt, _, products, it, steps, negative, _ = self._iterate(
                Deflated(rec, subspace), subspace.project(R), safe_bnorm, pc, products, mapped, extra, rows=False
            )
            history.extend(steps)
            X = X + X0 + subspace.project_t(Xt)
            R = B - rec(X)  # the true residual (in exact arithmetic the deflated one): a stale subspace shows here
            products += k
            _finite(R, "the residual of the deflated solution")
            before, rel = rel, rownorm(R) / safe_bnorm
            history.append(float(rel.max()))
            if bool((rel <= self.tol).all()) or bool((rel > 0.5 * before).any()):
                break
        report_extra["passes"] = passes
        if not self.block or k == 1:  # row form: x₀ = Q b, then the balancing rows below
            X = subspace.coarse(B)
            R = B - rec(X)
            products += k
            rel = rownorm(R) / safe_bnorm
            history.append(float(rel.max()))
        short = int((rel > self.tol).sum())
        if not short or negative:
            return X, R, products, it, history, negative, torch.zeros(k, dtype=torch.bool)
        if passes:
            report_extra["finished_without"] = short
        best = _Best(B, safe_bnorm)
        best.checked(X, torch.arange(k), rel, None)
        X, R, products, it, negative, stalled = self._rows(
            rec, B, X, R, Balancing(subspace, pc), safe_bnorm, products, it, history, report, best
        )
        X, R, products = best.settle(rec, X, R, products)
        return X, R, products, it, history, negative, stalled

    def _extra(self, block: bool, pc: Preconditioner | None, built: bool) -> dict[str, Any]:
        extra: dict[str, Any] = {"block": block, "preconditioner": self.preconditioner_name}
        if pc is not None:
            extra["preconditioner_products"] = pc.products if built else 0  # paid by the solve that built it
            if isinstance(pc, Kronecker):  # Kronecker factors: their one-off fitting cost
                extra["preconditioner_fit_passes"] = pc.curvature.fit_passes
                extra["preconditioner_fit_seconds"] = pc.curvature.fit_seconds
        return extra

    def _rows(
        self,
        op: LinearOperator,
        B: torch.Tensor,
        X: torch.Tensor,
        R: torch.Tensor,
        pc: Preconditioner | None,
        safe_bnorm: torch.Tensor,
        products: int,
        it: int,
        history: list[float],
        report: Callback | None,
        best: _Best,
    ) -> tuple[torch.Tensor, torch.Tensor, int, int, list[int], torch.Tensor]:
        """Separate (stacked) CG recursions from ``X``, whose ``R`` is the true residual
        ``B − AX``, up to ``max_iter`` iterations in all; ``best`` keeps each row's best iterate.
        A row stops when its true residual is at most ``tol``, at negative curvature, or when it
        stagnates. Returns ``X``, its true residuals, products, iterations, the rows that met
        negative curvature and a mask of the rows that stagnated."""
        Z = pc.apply(R) if pc is not None else R.clone()
        D = Z.clone()
        rz = (R * Z).sum(-1)
        rel = rownorm(R) / safe_bnorm
        active = rel > 0  # a zero residual (e.g. a zero right-hand side) is solved
        verified = torch.ones_like(active)  # R is B − AX computed, not the recurrence's
        lowest = rel.clone()  # each row's lowest true residual so far
        stalled = torch.zeros_like(active)
        negative: list[int] = []
        if not history:
            history.append(float(rel.max()))
        while True:
            active &= (rel > self.tol) & ~stalled
            if not active.any() or it >= self.max_iter:
                break
            it += 1
            rows = active.nonzero().squeeze(1)
            AD = op(D[rows])
            products += len(rows)
            _finite(AD, f"an operator product at iteration {it}")
            dad = (D[rows] * AD).sum(-1)
            bad = dad <= 0
            if bad.any():
                bad_rows = rows[bad].tolist()
                negative.extend(bad_rows)
                msg = (
                    f"CG met negative curvature (pᵀAp ≤ 0) at iteration {it} for right-hand side(s) {bad_rows}: "
                    "the damped Hessian is not positive definite. Increase the damping, "
                    "or use the Gauss-Newton operator (gauss_newton=True)."
                )
                if self.on_negative_curvature == "raise":
                    raise NegativeCurvatureError(msg)
                warnings.warn(msg + " Those rows keep their best iterate (truncated CG).", SolverWarning, stacklevel=4)
                active[rows[bad]] = False
                keep = ~bad
                rows, AD, dad = rows[keep], AD[keep], dad[keep]
                if len(rows) == 0:
                    continue
            alpha = rz[rows] / dad
            X[rows] += alpha[:, None] * D[rows]
            R[rows] -= alpha[:, None] * AD
            verified[rows] = False
            Zr = pc.apply(R[rows]) if pc is not None else R[rows]
            rz_new = (R[rows] * Zr).sum(-1)
            beta = rz_new / rz[rows]
            D[rows] = Zr + beta[:, None] * D[rows]
            rz[rows] = rz_new
            rel = rownorm(R) / safe_bnorm
            # The recurrence's residual drifts from B − AX, and near the accuracy this dtype
            # attains it keeps falling while the true one does not: the true one decides.
            claims = rows[rel[rows] <= self.tol]
            if len(claims):
                T = B[claims] - op(X[claims])
                products += len(claims)
                _finite(T, f"the residual at iteration {it}")
                t = rownorm(T) / safe_bnorm[claims]
                best.checked(X, claims, t, rel[claims])
                R[claims], verified[claims] = T, True
                short = t > self.tol
                # no halving since the row's last check: it is at the accuracy this dtype attains
                stuck = short & (t > 0.5 * lowest[claims])
                stalled[claims[stuck]] = True
                lowest[claims] = torch.minimum(lowest[claims], t)
                again = claims[short & ~stuck]
                if len(again):  # restart from the true residual (residual replacement)
                    Za = pc.apply(R[again]) if pc is not None else R[again].clone()
                    D[again], rz[again] = Za, (R[again] * Za).sum(-1)
                rel = rownorm(R) / safe_bnorm
            best.offer(X, rel)
            history.append(float(rel.max()))
            if report is not None:
                report(X, products)
        left = (~verified).nonzero().squeeze(1)  # cut short by max_iter or negative curvature
        if len(left):
            T = B[left] - op(X[left])
            products += len(left)
            _finite(T, "the residual of the final iterate")
            t = rownorm(T) / safe_bnorm[left]
            best.checked(X, left, t, rel[left])
            # a recurrence that fell well below the true residual had left it behind
            stalled[left[(t > self.tol) & (t > 10 * rel[left])]] = True
            R[left] = T
        return X, R, products, it, negative, stalled

    def _finish(
        self,
        final: torch.Tensor,
        history: list[float],
        it: int,
        products: int,
        start: float,
        negative: list[int],
        stalled: torch.Tensor,
        extra: dict[str, Any],
    ) -> SolveInfo:
        """The SolveInfo of a finished solve, from the true residuals ``final``; warns (or
        raises) when it did not converge, saying whether more iterations would help."""
        if not history or history[-1] != float(final.max()):
            history.append(float(final.max()))
        converged = bool((final <= self.tol).all()) and not negative
        info = SolveInfo(
            "cg",
            converged,
            it,
            products,
            time.perf_counter() - start,
            history,
            {"relative_residuals": final.tolist(), "negative_curvature_rows": sorted(set(negative)), **extra},
        )
        if not converged and not negative:
            short = final > self.tol
            stuck = short & stalled
            float32 = final.dtype == torch.float32
            stagnated = bool((stuck == short).all())
            if stagnated:  # every row above tol had stopped falling
                worst = float(final.max())
                msg = (
                    f"CG stagnated at the attainable accuracy of this dtype ({final.dtype}) on this system: its best "
                    f"true relative residual ‖b − Ax‖/‖b‖ is {worst:.3g} (worst right-hand side, after {it} "
                    f"iterations), above tol={self.tol:g}, and more iterations do not lower it: raising max_iter "
                    f"will not help. Set tol={1.5 * worst:.0e} or above, or add damping (a "
                    "better-conditioned system attains a smaller residual)"
                    + (", or compute in float64" if float32 else "")
                )
            else:
                msg = (
                    f"CG did not reach tol={self.tol:g} in {self.max_iter} iterations (worst relative residual "
                    f"{float(final.max()):.3g}); raise max_iter, add damping, or use preconditioner='jacobi'"
                )
                if stuck.any():
                    msg += (
                        f". Right-hand side(s) {stuck.nonzero().flatten().tolist()} stagnated at the attainable "
                        f"accuracy of this dtype ({final.dtype}), {float(final[stuck].max()):.3g}"
                    )
            growth = extra.get("residual_growth", 1.0)
            if growth > 10:
                msg += (
                    f". Its residual climbed {growth:.3g} times above its best on the way ({final.dtype}): the best "
                    "iterate was kept"
                )
                if float32:  # the stagnation message already says float64
                    msg += "; float32 loses conjugacy here" + ("" if stagnated else ", compute in float64")
            if self.on_not_converged == "raise":
                raise NotConvergedError(msg)
            warnings.warn(msg, SolverWarning, stacklevel=4)
        return info

    def _block(
        self,
        op: LinearOperator,
        B: torch.Tensor,
        safe_bnorm: torch.Tensor,
        report: Callback | None,
        tracker: _Best,
        products: int,
    ) -> tuple[torch.Tensor, int, int, list[float], str | None, torch.Tensor]:
        """Dubrulle's DR-BCG on the columns ``B.T``: ``R = Q C`` with ``Q`` orthonormal, so the
        residual norms are the column norms of the small ``C``; ``S`` are the search blocks.
        Returns ``X``, products, iterations, the residual history, why it stopped early
        (``None`` when the recurrence's residuals reached ``tol``) and the recurrence's
        relative residuals of ``X``. It stops early, leaving the rest to row CG, when ``SᵀAS``
        is not numerically positive definite (negative curvature, which row CG then reports
        per row, or an ill-conditioned block) or when the residual has not reached a new low
        for ``stall_iters`` iterations."""
        Bt = B.T  # [P, k]: columns are right-hand sides
        X = torch.zeros_like(Bt)
        Q, C = torch.linalg.qr(Bt)
        S = Q
        history: list[float] = []
        it, best, best_at = 0, math.inf, 0
        while True:
            rel = torch.linalg.vector_norm(C, dim=0) / safe_bnorm
            tracker.offer(X.T, rel)
            worst = float(rel.max())
            history.append(worst)
            if worst <= self.tol:
                return X.T.contiguous(), products, it, history, None, rel
            if worst < best:
                best, best_at = worst, it
            if it - best_at >= self.stall_iters:
                return X.T.contiguous(), products, it, history, f"no progress in {self.stall_iters} iterations", rel
            if it >= self.max_iter:
                return X.T.contiguous(), products, it, history, "max_iter", rel
            AS = op(S.T).T
            products += S.shape[1]
            _finite(AS, f"an operator product at block iteration {it + 1}")
            it += 1
            M = 0.5 * (S.T @ AS + AS.T @ S)
            chol, bad = torch.linalg.cholesky_ex(M)
            if int(bad) != 0:
                return X.T.contiguous(), products, it, history, "SᵀAS not positive definite", rel
            xi = torch.cholesky_inverse(chol)
            X += S @ (xi @ C)
            Q, psi = torch.linalg.qr(Q - AS @ xi)
            S = Q + S @ psi.T
            C = psi @ C
            if report is not None:
                report(X.T, products)


PRECONDITIONERS = ("jacobi", "nystrom", "ekfac", "kfac")


def _safe(norms: torch.Tensor) -> torch.Tensor:
    return torch.where(norms > 0, norms, torch.ones_like(norms))


class _Split(DerivedOperator):
    """``M^{-1/2} A M^{-1/2}``: the operator block CG sees under a split preconditioner."""

    def __init__(self, op: LinearOperator, pc: Preconditioner):
        super().__init__(op)
        self.pc = pc

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.pc.apply_sqrt(self.parent(self.pc.apply_sqrt(V)))


def _finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise DivergenceError(
            f"CG: {what} is NaN or inf ({t.dtype}); check the damping (finite, >= 0), the model's parameters and the "
            "data"
        )


class _Best:
    """Each right-hand side's best iterate over a solve (the zero vector to begin with), by
    the residual the recurrence reports or, where one was computed, the true residual, and
    how far a residual climbed above its best."""

    def __init__(self, B: torch.Tensor, safe_bnorm: torch.Tensor):
        self.B, self.safe_bnorm = B, safe_bnorm
        self.rel = rownorm(B) / safe_bnorm  # of X = 0
        self.X = torch.zeros_like(B)
        # the last true residual found above the recurrence's: the recurrence's residuals
        # below it are not trusted (to displace a best iterate, or to measure growth from)
        self.floor = torch.zeros_like(self.rel)
        self.growth = 1.0

    def offer(self, X: torch.Tensor, rel: torch.Tensor, rows: torch.Tensor | None = None, true: bool = False) -> None:
        """Iterate ``X`` (rows ``rows`` of it, all by default) with residuals ``rel``, the
        recurrence's or (``true``) computed."""
        rows = torch.arange(len(self.rel)) if rows is None else rows
        if not true:
            rel = torch.maximum(rel, self.floor[rows])
        better = rel < self.rel[rows]
        if better.any():
            won = rows[better]
            self.rel[won], self.X[won] = rel[better], X[won]
        ratio = rel / torch.maximum(self.rel[rows], self.floor[rows]).clamp_min(torch.finfo(rel.dtype).tiny)
        self.growth = max(self.growth, float(ratio.max()))

    def checked(self, X: torch.Tensor, rows: torch.Tensor, true: torch.Tensor, claims: torch.Tensor | None) -> None:
        """The true residuals ``true`` of rows ``rows`` of ``X``, where the recurrence reported
        ``claims`` (``None``: in another norm)."""
        # where the best iterate is this one, its reported residual gives way to its true one
        same = (self.X[rows] == X[rows]).all(dim=1)
        self.rel[rows[same]] = true[same]
        if claims is not None:  # what the recurrence reported below this was never reached
            low = true > claims
            self.floor[rows[low]] = true[low]
        self.offer(X, true, rows, true=True)

    def settle(
        self, op: LinearOperator, X: torch.Tensor, R: torch.Tensor, products: int
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``X`` and its true residuals ``R``, with each row whose best iterate reported a lower
        residual replaced by that iterate when its true residual is indeed lower (a product a
        row; none when CG ended at its best)."""
        final = rownorm(R) / self.safe_bnorm
        rows = (self.rel < final).nonzero().squeeze(1)
        if len(rows) == 0:
            return X, R, products
        bests = self.B[rows] - op(self.X[rows])
        products += len(rows)
        _finite(bests, "the residual of the best iterate")
        take = rownorm(bests) < rownorm(R[rows])
        X, R = X.clone(), R.clone()
        R[rows] = torch.where(take[:, None], bests, R[rows])
        X[rows] = torch.where(take[:, None], self.X[rows], X[rows])
        return X, R, products
