"""What every solver shares: the :class:`Solver` protocol, :class:`SolveInfo`, the errors.

A solver is any object with one seam, ``solve(A, b, callback=None) -> (x, info)``, in
the manner of ``scipy.sparse.linalg``: ``A`` is a
:class:`~lissa_influence.operators.LinearOperator` (or a dense matrix, or a function
``v ↦ A v``, see :func:`~lissa_influence.operators.aslinearoperator`), ``b`` is ``[P]``
or a stack ``[k, P]`` of right-hand sides, ``x`` has the shape of ``b`` and ``info`` is
a :class:`SolveInfo`. ``callback(x, num_products)``, when given, is called after each
iteration with the current iterate (shape of ``b``) and the count of vector products
so far, as ``scipy.sparse.linalg.cg`` calls its ``callback(xk)``; solver-accuracy
benchmarks trace the error against the product count with it
(:class:`~lissa_influence.metrics.ErrorTrace`).

A user-written solver needs nothing from this package but the return type; see
docs/architecture.md for an example.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, cast, runtime_checkable

import torch

from ..operators import FISHERS, LinearOperator, OperatorLike, aslinearoperator, check_fisher

__all__ = [
    "FISHERS",
    "ApproximateSolver",
    "Callback",
    "DivergenceError",
    "NegativeCurvatureError",
    "NotConvergedError",
    "Opening",
    "SolveInfo",
    "Solver",
    "SolverError",
    "SolverWarning",
    "accepts_matvec",
    "check_fisher",
    "is_approximate",
    "open_solve",
]

Callback = Callable[[torch.Tensor, int], None]


class SolverError(RuntimeError):
    """A solve that cannot give a trustworthy answer."""


class NegativeCurvatureError(SolverError):
    """The damped curvature is not positive definite along a search direction."""


class NotConvergedError(SolverError):
    """The solver stopped before reaching its tolerance (when asked to raise)."""


class DivergenceError(SolverError):
    """An iteration that grows instead of converging."""


class SolverWarning(RuntimeWarning):
    """A solve that finished but deserves attention (not converged, truncated)."""


def reworded(error: SolverError, message: str) -> SolverError:
    """``error`` with another message.

    Of its own type when that type takes just a message (every error of this package
    does); a user's error class with a constructor of its own becomes a :class:`SolverError`
    whose message starts with its class name.

    Args:
        error: the error.
        message: the new message.

    Returns:
        The error to raise.
    """
    if all("__init__" not in vars(c) for c in type(error).__mro__ if issubclass(c, SolverError)):
        return type(error)(message)
    return SolverError(f"{type(error).__name__}: {message}")


@dataclass
class SolveInfo:
    """Diagnostics of one solve (all right-hand sides together).

    Args:
        solver: the solver's name.
        converged: whether every right-hand side reached the tolerance.
        iterations: iterations taken.
        num_products: products with ``A`` taken (a ``[k, P]`` stack counts ``k``).
        wall_time: seconds.
        residuals: the residual history, per iteration (the attribute's note).
        extra: the solver's own diagnostics.
    """

    solver: str
    converged: bool
    iterations: int
    num_products: int
    wall_time: float
    residuals: list[float] = field(default_factory=list)
    """CG: worst relative residual ``‖b − Ax‖/‖b‖`` per iteration, as its recurrence tracks it
    where not computed (the last entry always is); a split-preconditioned block phase tracks
    another norm, kept apart in ``extra["split_residuals"]``. LiSSA: worst relative update
    ``‖h_{t+1} − h_t‖/‖h_t‖`` per step; Explicit: the final relative residual."""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The diagnostics as plain values, with ``extra`` merged in.

        Returns:
            A JSON-ready dict (``final_residual``: the last of ``residuals``).
        """
        return {
            "solver": self.solver,
            "converged": self.converged,
            "iterations": self.iterations,
            "num_products": self.num_products,
            "wall_time": self.wall_time,
            "final_residual": self.residuals[-1] if self.residuals else None,
            **self.extra,
        }


@runtime_checkable
class Solver(Protocol):
    """Anything that solves ``A x = b`` from products with ``A``.

    The one required member is :meth:`solve`. A solver may also declare
    ``approximate: bool`` (:class:`ApproximateSolver`): ``True`` for one that replaces the
    inverse by design (``Identity``, ``EKFAC``, ``LowRank``), which the multi-stage chain
    then keeps for every stage; a solver that does not declare it is exact.
    """

    def solve(
        self, A: OperatorLike, b: torch.Tensor, callback: Callback | None = None
    ) -> tuple[torch.Tensor, SolveInfo]:
        """Solve ``A x = b``.

        Args:
            A: a :class:`~lissa_influence.operators.LinearOperator`, a dense matrix, or a
                function ``v ↦ A v``.
            b: ``[P]`` or a stack ``[k, P]`` of right-hand sides.
            callback: called as ``callback(x, num_products)`` after each iteration.

        Returns:
            ``(x, info)``: ``x`` of the shape of ``b``, and the :class:`SolveInfo`.
        """
        ...


@runtime_checkable
class ApproximateSolver(Solver, Protocol):
    """A :class:`Solver` that declares whether it replaces the inverse by design
    (``approximate = True``) or solves to a tolerance (``False``). Every built-in solver
    declares it.

    Attributes:
        approximate: True where the solver replaces the inverse by design.
    """

    approximate: bool


def is_approximate(solver: Solver) -> bool:
    """Whether ``solver`` declares itself approximate (:class:`ApproximateSolver`).

    Args:
        solver: any solver.

    Returns:
        Its ``approximate`` flag; False for a solver that does not declare one (exact).
    """
    return isinstance(solver, ApproximateSolver) and bool(solver.approximate)


F = TypeVar("F", bound=Callable[..., Any])


def accepts_matvec(solve: F) -> F:
    """Let ``solve(matvec=...)``, the name of ``A`` before 0.2, keep working, with a
    :class:`DeprecationWarning`.

    Args:
        solve: a ``solve(self, A, b, callback=None)`` method.

    Returns:
        The method, taking ``matvec=`` as ``A=``. It runs one frame below its caller: a
        warning the method raises for its caller takes ``stacklevel`` one higher.
    """

    @functools.wraps(solve)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if "matvec" in kwargs:
            if args or "A" in kwargs:
                raise TypeError(f"{type(self).__name__}.solve() got both A and matvec (its old name)")
            warnings.warn(
                f"{type(self).__name__}.solve(matvec=...) is deprecated: the operator is now the argument A",
                DeprecationWarning,
                stacklevel=2,
            )
            kwargs["A"] = kwargs.pop("matvec")
        return solve(self, *args, **kwargs)

    return cast(F, wrapper)


@dataclass(frozen=True)
class Opening:
    """What every built-in solver starts from: the operator, the right-hand sides as a
    stack, and whether they were one vector (:func:`open_solve`).

    Args:
        op: the operator.
        B: the right-hand sides, ``[k, P]``.
        single: whether ``b`` was one vector ``[P]``.
    """

    op: LinearOperator
    B: torch.Tensor
    single: bool

    def shaped(self, X: torch.Tensor) -> torch.Tensor:
        """``X`` ``[k, P]`` in the shape of the right-hand side as given (``[P]`` for one vector).

        Args:
            X: a stack, one row per right-hand side.

        Returns:
            ``X[0]`` for a single vector, else ``X``.
        """
        return X[0] if self.single else X


def open_solve(A: OperatorLike, b: torch.Tensor) -> Opening:
    """The opening steps of a solve: ``b`` checked (floating, finite), made a stack, and ``A`` an operator.

    Args:
        A: the operator, a dense matrix or a function ``v ↦ A v``.
        b: ``[P]`` or ``[k, P]``.

    Returns:
        The :class:`Opening`.
    """
    check_rhs(b)
    B, single = as_stack(b)
    return Opening(aslinearoperator(A, B), B, single)


# -- helpers of the built-in solvers ---------------------------------------------------
def as_stack(b: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``b`` as a stack ``[k, P]``, and whether it was a single vector.

    Args:
        b: ``[P]`` or ``[k, P]``.

    Returns:
        ``(B, single)``.
    """
    if b.dim() == 1:
        return b[None], True
    if b.dim() == 2:
        return b, False
    raise ValueError(f"right-hand side must be [P] or [k, P], got shape {tuple(b.shape)}")


def check_rhs(b: torch.Tensor) -> None:
    """Refuse a right-hand side that is not floating or not finite.

    Args:
        b: the right-hand side.
    """
    if not b.is_floating_point():
        raise TypeError(f"right-hand side must be a floating tensor, got {b.dtype}")
    if not torch.isfinite(b).all():
        raise FloatingPointError("right-hand side contains NaN or inf (check the gradients it came from)")


def positive(key: str, value: float) -> None:
    """Refuse a solver setting that is not a finite number > 0.

    Args:
        key: its keyword, in the error.
        value: the setting.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{key}={value!r}: use a finite number > 0")


def non_negative(key: str, value: float) -> None:
    """Refuse a solver setting that is not a finite number >= 0.

    Args:
        key: its keyword, in the error.
        value: the setting.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{key}={value!r}: use a finite number >= 0")


def at_least_one(key: str, value: int) -> None:
    """Refuse a count that is not an integer >= 1.

    Args:
        key: its keyword, in the error.
        value: the setting.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}={value!r}: use an integer >= 1")


def rownorm(x: torch.Tensor) -> torch.Tensor:
    """The Euclidean norm of each row.

    Args:
        x: ``[..., n]``.

    Returns:
        ``[...]``.
    """
    return torch.linalg.vector_norm(x, dim=-1)
