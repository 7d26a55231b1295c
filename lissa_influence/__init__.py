"""lissa_influence: matrix-free single- and multi-stage influence functions for PyTorch.

``MultiStageInfluence`` scores pretraining examples for a finetuned model's test loss
(Chen et al., NeurIPS 2020); ``Influence`` is the single-stage special case (Koh &
Liang 2017). Every inverse Hessian is applied matrix-free by one of the solvers
``CG``, ``LiSSA``, ``Explicit`` (dense, small models) or ``Identity`` (ablation).
"""

from .curvature import CurvatureOperator, Objective, cross_entropy
from .influence import Influence, MultiStageInfluence
from .params import ParamBlock
from .solvers import (CG, DivergenceError, Explicit, Identity, LiSSA, NegativeCurvatureError, NotConvergedError,
                      SolveInfo, SolverError, SolverWarning)

__all__ = [
    "MultiStageInfluence", "Influence",
    "CG", "LiSSA", "Explicit", "Identity", "SolveInfo",
    "SolverError", "NegativeCurvatureError", "NotConvergedError", "DivergenceError", "SolverWarning",
    "CurvatureOperator", "Objective", "ParamBlock", "cross_entropy",
]
__version__ = "0.1.0"
