"""Solvers for ``A x = b`` given only products ``v ↦ A v`` (``A`` = damped curvature).

One module per method family: :mod:`.cg` (conjugate gradient, block CG) with its
:mod:`.preconditioners`, :mod:`.lissa` (the Neumann series), :mod:`.direct` (the dense
solve, a model operator's matrix factored once, and the identity), :mod:`.ekfac` (the
Kronecker-factored approximate solve),
:mod:`.lowrank` (top eigenpairs from Lanczos), :mod:`.deflation` (the subspaces CG recycles
across solves), and
:mod:`.base` (the :class:`Solver` protocol, :class:`SolveInfo` and the errors every
solver shares, and the opening steps of each solve). Any object with a
``solve(A, b, callback=None) -> (x, SolveInfo)`` method is a solver: see docs/architecture.md.
"""

from .base import (
    ApproximateSolver,
    Callback,
    DivergenceError,
    NegativeCurvatureError,
    NotConvergedError,
    SolveInfo,
    Solver,
    SolverError,
    SolverWarning,
    is_approximate,
)
from .cg import CG
from .deflation import Subspace
from .direct import ExactInverse, Explicit, Identity
from .ekfac import EKFAC
from .lissa import LiSSA, power_iteration
from .lowrank import LowRank
from .preconditioners import Diagonal, Kronecker, Nystrom, Preconditioner

__all__ = [
    "Solver",
    "ApproximateSolver",
    "is_approximate",
    "SolveInfo",
    "Callback",
    "CG",
    "LiSSA",
    "Explicit",
    "Identity",
    "ExactInverse",
    "EKFAC",
    "LowRank",
    "Subspace",
    "power_iteration",
    "Preconditioner",
    "Diagonal",
    "Nystrom",
    "Kronecker",
    "SolverError",
    "NegativeCurvatureError",
    "NotConvergedError",
    "DivergenceError",
    "SolverWarning",
]
