"""Single-stage influence (Koh & Liang 2017): ``I(z) = −∇ℓᵀ (∇²G + λI)⁻¹ ∇g(z)`` (docs/math.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from .batching import DataLike, Source, as_dataset
from .curvature import CurvatureOperator
from .damping import DampingCalibration, DampingRule, check_dampings
from .estimator import InfluenceEstimator
from .params import make_block
from .reports import timed
from .sample import HessianSamples, hessian_sample, trainable_params
from .scoring import PerExample, loss_gradients
from .solvers import CG, Solver
from .task import Forward, LossFn, Task, cross_entropy, eval_mode

# MultiStageInfluence lived in this module before 0.2: lissa_influence/__init__.py sets it here,
# so that the old import path keeps working without this module importing the multi-stage one
__all__ = ["Influence"]


@dataclass(eq=False)
class Influence(InfluenceEstimator):
    """Single-stage influence of training examples on a model's test loss.

    ``fit(train_data)`` fixes the Hessian sample (``hessian_samples`` seeded examples, or
    ``"all"``); ``scores(test_data, train_data)`` returns ``[n_test, n_train]``
    (``[1, n_train]`` with ``mean=True``: the mean test loss as one query). ``loss`` and
    the optional ``forward(model, batch)`` follow :mod:`lissa_influence.task`.

    Args:
        model: the trained model.
        loss: the training loss.
        solver: the solver of ``(∇²G + λI) s = ∇ℓ``.
        damping: ``λ``, or ``"auto"`` (calibrated) / ``"heuristic"``.
        hessian_samples: examples in the Hessian sample (or ``"all"``).
        seed: the seed of the Hessian sample's draw.
        forward: the model's forward (None: ``model(x)``).
        calibration: retrained ground truth for ``damping="auto"``.
        heuristic_fraction: the share of the mean eigenvalue ``damping="heuristic"`` takes.
    """

    model: nn.Module
    loss: LossFn = cross_entropy
    solver: Solver = field(default_factory=CG)
    damping: float | DampingRule = 1e-2
    hessian_samples: HessianSamples = 1000
    seed: int = 0
    forward: Forward | None = None
    calibration: DampingCalibration | None = None
    heuristic_fraction: float = 0.1

    _old_data_keyword: ClassVar[str] = "train_data"

    def __post_init__(self) -> None:
        self._requested_damping = self.damping
        check_dampings({"damping": self.damping}, self.calibration)
        super().__post_init__()

    def fit(self, train_data: DataLike) -> Influence:
        """Draw the Hessian sample and build the damped operator.

        Args:
            train_data: the training examples (a dataset, a DataLoader, a list or ``(X, Y)``).

        Returns:
            ``self``, fitted.
        """
        train = self._data(train_data, "training data")
        self.params = trainable_params(self.model, self.dtype, "model")
        self.block = make_block(self.params, lambda n: True)
        sample = hessian_sample(
            train, self.hessian_samples, self.seed, self.params, "training", self.distributed, self.task, self.model
        )
        self.damping = 0.0 if isinstance(self._requested_damping, str) else float(self._requested_damping)
        self.operator = CurvatureOperator(
            self._objective(self.model, self.task, self.params, sample), self.block, self.damping, self.gauss_newton
        )
        self._per_example = PerExample.from_task(self.model, self.task, self.params, self.block, self.ad_mode)
        self._fitted_on(train)
        self._resolve_dampings(
            [("influence", self._requested_damping, self._set_damping, self.operator)],
            self.calibration,
            self.heuristic_fraction,
        )
        return self

    @property
    def task(self) -> Task:
        """The model's forward and loss as one :class:`~lissa_influence.task.Task`."""
        return Task(self.loss, self.forward)

    def _set_damping(self, damping: float) -> None:
        self.damping = damping
        self.operator.set_damping(damping)

    @property
    def num_train(self) -> int:
        return self.num_scored

    def _scored_losses(self) -> PerExample:
        return self._per_example

    def _solve_queries(self, test_data: DataLike | Source, mean: bool = False) -> torch.Tensor:
        """``s = (∇²G + λI)⁻¹ ∇ℓ`` per test query, ``[k, P]``: all that scoring needs."""
        test = as_dataset(test_data, "test data")
        timings: dict[str, float] = {}
        with eval_mode(self.model):
            grads = loss_gradients(self._scored_losses(), test, self.batch_size, mean)
            grads = self._same_on_all_ranks(grads)
            with timed(timings, "solve"):
                s, info = self._solve(self.solver, self.operator, grads, "influence", f"damping={self.damping:g}")
        self.diagnostics = {"solve": info.as_dict(), "time": timings, "damping": self.damping_report}
        return s
