"""lissa_influence: matrix-free single- and multi-stage influence functions for PyTorch."""

from .solvers import CG, Explicit, Identity, LiSSA, SolveInfo, SolverError

__all__ = ["CG", "LiSSA", "Explicit", "Identity", "SolveInfo", "SolverError"]
__version__ = "0.1.0"
