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

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from ..operators import OperatorLike

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
    """``error`` with another message, of its own type when that type takes just a
    message (every error of this package does); a user's error class with a constructor
    of its own becomes a :class:`SolverError` whose message starts with its class name."""
    if all("__init__" not in vars(c) for c in type(error).__mro__ if issubclass(c, SolverError)):
        return type(error)(message)
    return SolverError(f"{type(error).__name__}: {message}")


@dataclass
class SolveInfo:
    """Diagnostics of one solve (all right-hand sides together)."""

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
    """Anything that solves ``A x = b`` from products with ``A``."""

    def solve(
        self, matvec: OperatorLike, b: torch.Tensor, callback: Callback | None = None
    ) -> tuple[torch.Tensor, SolveInfo]: ...


# -- helpers of the built-in solvers ---------------------------------------------------
def as_stack(b: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``b`` as a stack ``[k, P]``, and whether it was a single vector."""
    if b.dim() == 1:
        return b[None], True
    if b.dim() == 2:
        return b, False
    raise ValueError(f"right-hand side must be [P] or [k, P], got shape {tuple(b.shape)}")


def check_rhs(b: torch.Tensor) -> None:
    if not b.is_floating_point():
        raise TypeError(f"right-hand side must be a floating tensor, got {b.dtype}")
    if not torch.isfinite(b).all():
        raise FloatingPointError("right-hand side contains NaN or inf (check the gradients it came from)")


FISHERS = ("auto", "type-2", "mc", "empirical")
"""How Kronecker factors estimate the output curvature (:func:`~lissa_influence.kfac.fit_kronecker`)."""


def check_fisher(value: str) -> None:
    if value not in FISHERS:
        raise ValueError(f"fisher={value!r}: use 'auto', 'type-2', 'mc' or 'empirical'")


def positive(key: str, value: float) -> None:
    """A solver setting that must be a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{key}={value!r}: use a finite number > 0")


def non_negative(key: str, value: float) -> None:
    """A solver setting that must be a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{key}={value!r}: use a finite number >= 0")


def at_least_one(key: str, value: int) -> None:
    """A count that must be an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}={value!r}: use an integer >= 1")


def rownorm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=-1)
