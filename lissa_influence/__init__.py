"""lissa_influence: matrix-free single- and multi-stage influence functions for PyTorch.

``MultiStageInfluence`` scores pretraining examples for a finetuned model's test loss
(Chen et al., NeurIPS 2020); ``Influence`` is the single-stage special case (Koh &
Liang 2017). Every inverse Hessian is applied matrix-free by a :class:`Solver`:
``CG``, ``LiSSA``, ``Explicit`` (dense, small models), ``Identity`` (ablation), or one
of your own. The mathematics is in docs/math.md, the layout in docs/architecture.md.

This package is the library; the paper's experiments (Hydra app, data, models,
training, validation) live in :mod:`lissa_influence.experiments`, which the library
never imports.
"""

from . import hf, influence
from .confidence import Interval, correlation_interval, lds_interval
from .curvature import CurvatureOperator
from .damping import CalibrationResult, DampingCalibration, heuristic_damping
from .estimator import InfluenceEstimator
from .influence import Influence
from .kfac import KroneckerCurvature, fit_kronecker
from .metrics import ErrorTrace, relative_error, score_agreement
from .multistage import MultiStageInfluence
from .objective import Objective
from .operators import (
    DampedOperator,
    DenseOperator,
    FisherType,
    FunctionOperator,
    KroneckerKind,
    LinearOperator,
    ModelOperator,
    aslinearoperator,
)
from .params import ParamBlock
from .solvers import (
    CG,
    EKFAC,
    DivergenceError,
    ExactInverse,
    Explicit,
    Identity,
    LiSSA,
    LowRank,
    NegativeCurvatureError,
    NotConvergedError,
    Nystrom,
    Preconditioner,
    SolveInfo,
    Solver,
    SolverError,
    SolverWarning,
)
from .task import LossWarning, Task, cross_entropy, eval_mode

# MultiStageInfluence lived in lissa_influence.influence before 0.2; that module no longer
# imports the multi-stage one, so the old import path is kept from here (this package's
# __init__ runs before any of its modules is imported)
influence.MultiStageInfluence = MultiStageInfluence  # type: ignore[attr-defined]

__all__ = [
    "MultiStageInfluence",
    "Influence",
    "InfluenceEstimator",
    "Solver",
    "CG",
    "LiSSA",
    "Explicit",
    "Identity",
    "EKFAC",
    "LowRank",
    "ExactInverse",
    "Preconditioner",
    "Nystrom",
    "DampedOperator",
    "SolveInfo",
    "SolverError",
    "NegativeCurvatureError",
    "NotConvergedError",
    "DivergenceError",
    "SolverWarning",
    "LinearOperator",
    "DenseOperator",
    "FunctionOperator",
    "aslinearoperator",
    "CurvatureOperator",
    "ModelOperator",
    "FisherType",
    "KroneckerKind",
    "Task",
    "KroneckerCurvature",
    "fit_kronecker",
    "Objective",
    "ParamBlock",
    "cross_entropy",
    "eval_mode",
    "LossWarning",
    "hf",
    "relative_error",
    "score_agreement",
    "ErrorTrace",
    "DampingCalibration",
    "CalibrationResult",
    "heuristic_damping",
    "Interval",
    "correlation_interval",
    "lds_interval",
]
__version__ = "0.1.0"
