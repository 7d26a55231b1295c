"""Single-stage influence (Koh & Liang 2017): ``I(z) = −∇ℓᵀ (∇²G + λI)⁻¹ ∇g(z)`` (docs/math.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from .batching import DataLike, Source, as_dataset
from .curvature import CurvatureOperator, Objective
from .damping import DampingCalibration, DampingRule, check_dampings
from .estimator import HessianSamples, InfluenceEstimator, eval_mode, hessian_sample, timed, trainable_params
from .params import make_block
from .scoring import PerExample, loss_gradients
from .solvers import CG, Solver
from .task import Forward, LossFn, cross_entropy

__all__ = ["Influence", "MultiStageInfluence"]


@dataclass(eq=False)
class Influence(InfluenceEstimator):
    """Single-stage influence of training examples on a model's test loss.

    ``fit(train_data)`` fixes the Hessian sample (``hessian_samples`` seeded examples, or
    ``"all"``); ``scores(test_data, train_data)`` returns ``[n_test, n_train]``
    (``[1, n_train]`` with ``mean=True``: the mean test loss as one query). ``loss`` and
    the optional ``forward(model, batch)`` follow :mod:`lissa_influence.task`.
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
        train = self._data(train_data, "training data")
        self.params = trainable_params(self.model, self.dtype, "model")
        self.block = make_block(self.params, lambda n: True)
        sample = hessian_sample(
            train,
            self.hessian_samples,
            self.seed,
            self.params,
            "training",
            self.distributed,
            self.forward,
            self.model,
            self.loss,
        )
        self.damping = 0.0 if isinstance(self._requested_damping, str) else float(self._requested_damping)
        self.operator = CurvatureOperator(
            Objective(
                self.model,
                self.loss,
                self.params,
                chunk_size=self.batch_size,
                forward=self.forward,
                ad_mode=self.ad_mode,
                hvp_mode=self.hvp_mode,
                graph_budget=self.graph_budget,
                **sample,
            ),
            self.block,
            self.damping,
            self.gauss_newton,
        )
        self._per_example = PerExample(self.model, self.loss, self.params, self.block, self.forward, self.ad_mode)
        self._fitted_on(train)
        self._resolve_dampings(
            [("influence", self._requested_damping, self._set_damping, self.operator)],
            self.calibration,
            self.heuristic_fraction,
        )
        return self

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


# MultiStageInfluence lived in this module before 0.2: the old import path keeps working.
from .multistage import MultiStageInfluence  # noqa: E402
