"""What every influence estimator shares: settings, fitting state, scoring, removal effects.

``I(z) = dℓ/dε`` for upweighting a scored example ``z`` by ``ε`` (docs/math.md): positive
means harmful (upweighting raises the test loss), negative helpful. Removing ``z``
changes the test loss by about ``−I(z)/m`` (:meth:`InfluenceEstimator.removal_effects`).

An estimator solves once per test query for a query vector ``s`` (its
``query_vectors``), and a score is then ``I(z) = −sᵀ∇g(z)`` for the loss ``g`` of each
scored example, streamed over the scored dataset (:mod:`lissa_influence.scoring`).
:class:`~lissa_influence.Influence` (single stage) and
:class:`~lissa_influence.MultiStageInfluence` (pretraining examples of a finetuned
model) differ only in how they get ``s``.

Under ``torchrun`` (an initialised process group of several ranks, and
``distributed=True``, the default) each rank holds a shard of every Hessian sample and
the products are summed across ranks, the solvers run identically on every rank, and
scoring splits the examples across ranks and gathers the scores on every rank
(:mod:`lissa_influence.distributed`). The results equal the single-process ones up to
rounding.
"""

from __future__ import annotations

import functools
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset, default_collate

from . import distributed as _dist
from .batching import Collate, DataLike, SizedDataset, Source, as_dataset, gather
from .curvature import CurvatureOperator
from .damping import DampingCalibration, calibrate, heuristic_damping
from .objective import ADMode, HVPMode, Objective
from .params import Params
from .reports import check_rows, merged_reports, timed
from .sample import HessianSamples, hessian_sample, rank_world, trainable_params
from .scoring import PerExample, ScoringMethod, score_dataset
from .solvers import SolveInfo, Solver, SolverError
from .solvers.base import reworded
from .task import Task, check_batch
from .task import eval_mode as eval_mode  # its home before 0.2: the estimators import it from here

__all__ = [
    "HessianSamples",
    "InfluenceEstimator",
    "check_rows",
    "eval_mode",
    "hessian_sample",
    "merged_reports",
    "rank_world",
    "timed",
    "trainable_params",
]


@dataclass(eq=False, kw_only=True)
class InfluenceEstimator(ABC):
    """The base of :class:`~lissa_influence.Influence` and
    :class:`~lissa_influence.MultiStageInfluence`.

    Settings both share (keyword-only, after each estimator's own fields):
    ``gauss_newton`` curvature, the float ``dtype`` (None: the model's), ``batch_size``
    of products and scoring, the ``scoring`` path and ``jvp_max_queries``
    (:mod:`~lissa_influence.scoring`), a ``progress`` bar, ``distributed``: split the
    Hessian samples and scoring across the ranks of an initialised torch.distributed
    process group (no effect without one), and ``ad_mode``: forward- or reverse-mode
    second derivatives (``"auto"``: forward, reverse where the loss lacks forward mode;
    :data:`~lissa_influence.curvature.ADMode`); ``hvp_mode``: ``"retained"`` (the default:
    each chunk's gradient graph is kept while they take at most ``graph_budget`` bytes, and
    a product is one backward pass; measured the faster, docs/benchmarks.md) or
    ``"functional"`` Hessian-vector products (:data:`~lissa_influence.curvature.HVPMode`).

    State after ``fit``: :attr:`is_fitted`, :attr:`scored_data` (the examples that
    :meth:`scores` scores by default), ``diagnostics`` (solver reports and timings of
    the last solve; after scoring, the :meth:`fallbacks` taken, if any).

    Args:
        gauss_newton: the Gauss-Newton matrix in place of every Hessian.
        dtype: the float dtype of products and scores (None: the model's).
        batch_size: examples per chunk of products and per batch of scoring.
        scoring: ``"auto"``, ``"jvp"`` or ``"grad"`` (:mod:`~lissa_influence.scoring`).
        jvp_max_queries: where ``scoring="auto"`` changes from jvp to per-example gradients.
        progress: show progress bars.
        distributed: split the work across the ranks of an initialised process group.
        ad_mode: ``"auto"``, ``"forward"`` or ``"reverse"`` second derivatives.
        hvp_mode: ``"retained"`` or ``"functional"`` Hessian-vector products.
        graph_budget: bytes the retained graphs may take.
        collate_fn: collates items of the data given as a dataset or a list.
        query_chunk: queries solved at a time (None: all in one solve).
    """

    gauss_newton: bool = False
    dtype: torch.dtype | None = None
    batch_size: int = 256
    scoring: ScoringMethod = "auto"
    jvp_max_queries: int = 3
    progress: bool = False
    distributed: bool = True
    ad_mode: ADMode = "auto"
    hvp_mode: HVPMode = "retained"
    graph_budget: int = 2 * 2**30
    collate_fn: Collate | None = None
    query_chunk: int | None = None

    _old_data_keyword: ClassVar[str] = ""  # what ``data=`` was called before 0.2 (still accepted)

    def __post_init__(self) -> None:
        if self.hvp_mode not in ("functional", "retained"):
            raise ValueError(f"hvp_mode={self.hvp_mode!r}: use 'functional' or 'retained'")
        if isinstance(self.graph_budget, bool) or not isinstance(self.graph_budget, int) or self.graph_budget < 0:
            raise ValueError(f"graph_budget={self.graph_budget!r}: use a number of bytes >= 0")
        chunk = self.query_chunk
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"query_chunk={chunk!r}: use an integer >= 1, or None for all queries in one solve")
        self._chunked: tuple[DataLike, list[Source]] | None = None  # the last test set's chunks, kept alive
        self._diagnostics: dict[str, Any] = {}
        self.damping_report: dict[str, Any] = {}  # how each damping was set ("given", "heuristic", "auto")
        self._calibrating = False  # True while "auto" dampings are tried on one set of calibration queries
        self._scored: SizedDataset | None = None

    @property
    def diagnostics(self) -> dict[str, Any]:
        """The last solve's reports and timings (set by ``query_vectors``), with, once the
        operators ran: ``"curvature"``, how each operator's products were formed
        (``"products"``: retained graphs or functional, forward or reverse mode) and the
        parameters its Kronecker factors left to the diagonal fallback; ``"fallbacks"``
        (:meth:`fallbacks`), and ``"example_loop"``: where per-example derivatives ran
        example by example because ``vmap`` could not batch the model, and why."""
        self._diagnostics.update(self._reports())
        return self._diagnostics

    @diagnostics.setter
    def diagnostics(self, value: dict[str, Any]) -> None:
        self._diagnostics = dict(value)

    def _reports(self) -> dict[str, Any]:
        """What :attr:`diagnostics` adds to the solvers' reports, read from the operators."""
        out: dict[str, Any] = {}
        curvature: dict[str, Any] = {}
        for name, op in vars(self).items():
            if not isinstance(op, CurvatureOperator):
                continue
            factors = op.kronecker_fitted("ekfac") or op.kronecker_fitted("kfac")
            if op.product_path is None and factors is None:
                continue
            entry: dict[str, Any] = {"products": op.product_path}
            if factors is not None:
                entry["kronecker_fallback_params"] = len(factors.fallback_index)
                entry["kronecker_fallback"] = list(factors.fallback)
            curvature[name] = entry
        if curvature:
            out["curvature"] = curvature
        if fallbacks := self.fallbacks():
            out["fallbacks"] = fallbacks
            if loop := {where: f["loop"] for where, f in fallbacks.items() if "loop" in f}:
                out["example_loop"] = loop
        return out

    def _data(self, data: DataLike | Source, what: str) -> Source:
        """``data`` as the library reads it, batched with ``collate_fn`` where one was given
        (and ``data`` is not a DataLoader with its own)."""
        source = as_dataset(data, what)
        if self.collate_fn is not None and source.collate is default_collate:
            source = Source(source.dataset, self.collate_fn)
        return source

    def _collated(self, data: DataLike, what: str) -> DataLike:
        """``data`` itself without a ``collate_fn`` (its identity keys a calibration's memo), else :meth:`_data`
        (a :class:`~lissa_influence.batching.Source`, which every ``as_dataset`` takes as it is)."""
        return data if self.collate_fn is None else cast(DataLike, self._data(data, what))

    # -- what each estimator defines ---------------------------------------------------
    @abstractmethod
    def _solve_queries(self, test_data: DataLike | Source, mean: bool = False) -> torch.Tensor:
        """``s`` for the queries of ``test_data`` in one solve per stage, setting ``diagnostics``."""

    def query_vectors(self, test_data: DataLike, mean: bool = False) -> torch.Tensor:
        """``s`` per test query: all that scoring needs. Save these to score new examples later.

        With ``query_chunk``, the queries are solved ``query_chunk`` at a time, and a solver
        that keeps state on the operator (a deflated ``CG(deflate=k)``, ``LowRank``'s
        eigenpairs) carries it from chunk to chunk; ``diagnostics`` then sums the chunks'
        products, iterations and times, and lists each chunk's report under ``"chunks"``.

        Args:
            test_data: the test examples (a dataset, a DataLoader, a list or a tuple ``(X, Y)``).
            mean: one query, the mean test loss, instead of one per test example.

        Returns:
            ``[k, P]``: one row per test example (``[1, P]`` with ``mean=True``).
        """
        self._check_fitted()
        chunks = self._query_chunks(test_data, mean)
        if chunks is None:
            return self._solve_queries(self._collated(test_data, "test data"), mean)
        return self._by_chunk(chunks, lambda chunk: self._solve_queries(chunk, mean))

    def _by_chunk(self, chunks: list[Source], run: Callable[[Source], torch.Tensor]) -> torch.Tensor:
        """``run`` on each chunk, the results stacked by row and the chunks' diagnostics merged
        (:func:`~lissa_influence.reports.merged_reports`)."""
        parts, reports = [], []
        for chunk in chunks:
            parts.append(run(chunk))
            reports.append(self._diagnostics)
        self.diagnostics = merged_reports(reports)
        return torch.cat(parts)

    def _query_chunks(self, test_data: DataLike, mean: bool) -> list[Source] | None:
        """The test set in chunks of ``query_chunk`` (None: one solve). The chunks of the last
        test set are kept, so that they stay the same objects while a calibration asks again."""
        if self.query_chunk is None or mean:
            return None
        if self._chunked is not None and self._chunked[0] is test_data:
            return self._chunked[1]
        source = self._data(test_data, "test data")
        n, c = len(source), self.query_chunk
        if n <= c:
            return None
        chunks = [
            Source(Subset(cast(Dataset[Any], source.dataset), range(i, min(i + c, n))), source.collate)
            for i in range(0, n, c)
        ]
        self._chunked = (test_data, chunks)
        return chunks

    def release(self) -> None:
        """Free what the operators keep between calls: the retained gradient graphs (built at
        the first product after ``fit`` and kept while they fit in ``graph_budget``, so that
        later ``query_vectors`` calls do not rebuild them). A later product rebuilds them."""
        for value in vars(self).values():
            if isinstance(value, CurvatureOperator):
                value.objective.release_graphs()

    @abstractmethod
    def _scored_losses(self) -> PerExample:
        """The per-example loss ``g`` of the scored examples, as a function of the scored block."""

    # -- fitted state --------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return self._scored is not None

    @property
    def scored_data(self) -> SizedDataset:
        """The dataset given to ``fit`` whose examples are scored (training or pretraining data)."""
        self._check_fitted()
        assert self._scored is not None
        return self._scored

    @property
    def num_scored(self) -> int:
        """``m``, the number of scored examples (the ``1/m`` of :meth:`removal_effects`)."""
        return len(self.scored_data)

    def _fitted_on(self, scored: SizedDataset) -> None:
        self._scored = scored

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise RuntimeError(f"call {type(self).__name__}.fit(...) before scoring")

    # -- scoring -----------------------------------------------------------------------
    def as_query_vectors(self, s: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Query vectors (e.g. loaded from ``query_vectors.npy``) checked against the scored block.

        Args:
            s: ``[k, P]``, a tensor or an array.

        Returns:
            ``s`` in the dtype and device of the scored parameters.
        """
        self._check_fitted()
        per_example = self._scored_losses()
        t = next(iter(per_example.params.values()))
        s = torch.as_tensor(s).to(dtype=t.dtype, device=t.device)
        check_rows("query vectors s", s, per_example.block.numel)
        return s

    def scores_from(
        self,
        s: torch.Tensor,
        data: DataLike | None = None,
        start: int = 0,
        stop: int | None = None,
        **renamed: DataLike,
    ) -> torch.Tensor:
        """``I(z) = −sᵀ∇g(z)`` for the given query vectors.

        Distributed: each rank scores a contiguous share and every rank returns all scores,
        in dataset order.

        Args:
            s: ``[k, P]`` query vectors (:meth:`query_vectors`).
            data: the examples to score (None: :attr:`scored_data`).
            start: the first example scored.
            stop: one past the last (None: the end).
            **renamed: ``data`` under its name before 0.2 (``train_data=`` / ``pretrain_data=``),
                with a DeprecationWarning.

        Returns:
            ``[k, n]`` scores of the examples ``[start:stop]``.
        """
        given = self._renamed(data, renamed, "scores_from")
        self._check_fitted()
        scored = self.scored_data if given is None else self._data(given, "scored data")
        per_example = self._scored_losses()
        t0 = time.perf_counter()
        stop = len(scored) if stop is None else stop
        rank, world = rank_world(self.distributed)
        lo, hi = _dist.shard_range(stop - start, rank, world)
        with eval_mode(per_example.model):
            d = score_dataset(
                per_example,
                scored,
                s,
                self.batch_size,
                self.scoring,
                self.jvp_max_queries,
                start + lo,
                start + hi,
                self.progress and rank == 0,
            )
        if world > 1:
            d = _dist.all_gather_cat(d, dim=1)
        self.diagnostics.setdefault("time", {})["scoring"] = time.perf_counter() - t0
        if fallbacks := self.fallbacks():
            self.diagnostics["fallbacks"] = fallbacks
        return -d

    def fallbacks(self) -> dict[str, dict[str, str]]:
        """What ran otherwise than asked, and why, by where.

        ``"scored examples"`` (their gradients and scores) and each curvature operator (by
        attribute name): ``"loop"`` (a model vmap cannot batch), ``"reverse"`` (a loss without
        forward mode), ``"autograd"`` (a gradient-checkpointed model, differentiated by torch.autograd).

        Returns:
            ``{where: {fallback: why}}``.
        """
        out: dict[str, dict[str, str]] = {}
        if self.is_fitted and (scored := self._scored_losses().fallbacks):
            out["scored examples"] = dict(scored)
        for name, value in vars(self).items():  # the estimators keep their operators as attributes
            if isinstance(value, CurvatureOperator) and value.objective.fallbacks:
                out[name] = value.objective.fallbacks
        return out

    def scores(
        self, test_data: DataLike, data: DataLike | None = None, mean: bool = False, **renamed: DataLike
    ) -> torch.Tensor:
        """``I(z)`` of every scored example (or of ``data``) for each test query.

        Args:
            test_data: the test examples.
            data: the examples to score (None: :attr:`scored_data`).
            mean: one query, the mean test loss, instead of one per test example.
            **renamed: ``data`` under its name before 0.2, with a DeprecationWarning.

        Returns:
            ``[n_test, n]`` (``[1, n]`` with ``mean=True``).
        """
        data = self._renamed(data, renamed, "scores")
        if data is not None:  # a scored dataset the model cannot take fails before the solves, not after
            self._check_fitted()
            per_example = self._scored_losses()
            t = next(iter(per_example.params.values()))
            source = self._data(data, "scored data")
            first = gather(source, [0], t.dtype, t.device)
            check_batch(first, per_example.forward, "scored data")
            data = cast(DataLike, source)  # as_dataset takes a Source as it is
        chunks = self._query_chunks(test_data, mean)
        if chunks is None:
            return self.scores_from(self.query_vectors(test_data, mean), data)
        # chunk by chunk: only one chunk's query vectors [query_chunk, P] are held at a time
        return self._by_chunk(chunks, lambda chunk: self.scores_from(self._solve_queries(chunk, mean), data))

    def removal_effects(
        self, test_data: DataLike, data: DataLike | None = None, mean: bool = False, **renamed: DataLike
    ) -> torch.Tensor:
        """Predicted change of each test loss when each scored example is removed: ``−I(z)/m``.

        Args:
            test_data: the test examples.
            data: the examples to score (None: :attr:`scored_data`).
            mean: one query, the mean test loss, instead of one per test example.
            **renamed: ``data`` under its name before 0.2, with a DeprecationWarning.

        Returns:
            ``[n_test, n]`` (``[1, n]`` with ``mean=True``).
        """
        data = self._renamed(data, renamed, "removal_effects")
        return -self.scores(test_data, data, mean) / self.num_scored

    def _renamed(self, data: DataLike | None, renamed: dict[str, DataLike], method: str) -> DataLike | None:
        """``data``, or what came under its name before 0.2 (with a DeprecationWarning)."""
        if not renamed:
            return data
        unknown = sorted(set(renamed) - {self._old_data_keyword})
        if unknown:
            raise TypeError(f"{type(self).__name__}.{method}() got an unexpected keyword argument {unknown[0]!r}")
        if data is not None:
            raise TypeError(f"{type(self).__name__}.{method}(): pass data= or {self._old_data_keyword}=, not both")
        warnings.warn(f"{self._old_data_keyword}= is now data=", DeprecationWarning, stacklevel=3)
        return renamed[self._old_data_keyword]

    # -- damping by rule ------------------------------------------------------------------
    def _resolve_dampings(
        self,
        stages: list[tuple[str, float | str, Callable[[float], None], CurvatureOperator]],
        calibration: DampingCalibration | None,
        fraction: float,
    ) -> None:
        """Numbers for the dampings given as ``"heuristic"`` or ``"auto"`` (each stage
        ``(name, requested, set_damping, operator)``); the choices go to ``damping_report``
        and every later ``diagnostics``. A failure leaves the estimator unfitted, never at a
        trial damping.

        ``auto`` stages start at the grid's largest damping (positive definite wherever any
        grid value is) and are calibrated in the order given; with two, the first once more
        at the second's choice (coordinate ascent: the finetune damping shapes the
        pretraining right-hand side, the pretraining damping the scores of it)."""
        try:
            report: dict[str, Any] = {}
            for name, requested, set_damping, curvature in stages:
                if not isinstance(requested, str):
                    report[name] = {"rule": "given", "value": float(requested)}
                elif requested == "heuristic":
                    curvature.set_damping(0.0)  # the curvature alone (no proximity shift): its mean eigenvalue
                    value = heuristic_damping(curvature, fraction, seed=self._damping_seed)
                    set_damping(value)
                    report[name] = {"rule": "heuristic", "value": value, "heuristic": value, "fraction": fraction}
                else:
                    assert calibration is not None  # checked when the estimator was made
                    set_damping(max(calibration.grid))
                    report[name] = {"rule": "auto", "value": max(calibration.grid)}
            auto = [(name, set_damping) for name, requested, set_damping, _ in stages if requested == "auto"]
            self._calibrating = True  # an estimator may keep what a damping change leaves as it was
            for name, set_damping in auto + auto[:1] if len(auto) > 1 else auto:
                assert calibration is not None
                scores_at = functools.partial(self._calibration_scores, set_damping, calibration)
                result = calibrate(name, scores_at, calibration)
                set_damping(result.chosen)
                earlier = report[name].get("calibration")
                report[name].update(value=result.chosen, calibration=result.as_dict())
                if earlier is not None:
                    report[name]["first_pass"] = earlier
        except BaseException:
            self._scored = None  # not fitted: its operators hold a damping nobody chose
            raise
        finally:
            self._calibrating = False
        self.damping_report = report

    @property
    def seed(self) -> int:
        """The seed of the Hessian samples' draw; every estimator declares it as a field of its own."""
        raise NotImplementedError

    @property
    def _damping_seed(self) -> int:
        return int(self.seed)

    def _calibration_scores(
        self, set_damping: Callable[[float], None], calibration: DampingCalibration, damping: float
    ) -> np.ndarray:
        """``[T, m]`` scores of the calibration queries at one damping; only the removed examples are scored."""
        set_damping(damping)
        removed = sorted({int(i) for r in calibration.removals for i in r})
        s = self.query_vectors(self._collated(calibration.test_data, "calibration test data"), calibration.mean)
        out = np.zeros((s.shape[0], self.num_scored))
        subset = Subset(cast(Dataset[Any], self.scored_data), removed)
        out[:, removed] = self.scores_from(s, subset).double().cpu().numpy()
        return out

    # -- helpers of the estimators --------------------------------------------------------
    def _objective(self, model: nn.Module, task: Task, params: Params, sample: dict[str, Any]) -> Objective:
        """The one place an estimator builds an :class:`~lissa_influence.objective.Objective`:
        ``task`` for ``model`` at ``params`` over a Hessian sample (:func:`hessian_sample`),
        with the estimator's chunk size and AD settings."""
        return Objective.from_task(
            model,
            task,
            params,
            chunk_size=self.batch_size,
            ad_mode=self.ad_mode,
            hvp_mode=self.hvp_mode,
            graph_budget=self.graph_budget,
            **sample,
        )

    def _same_on_all_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's copy of a right-hand side: every rank computes it, but nondeterministic
        (GPU) kernels could differ in the last bits, and the solvers must see identical
        inputs on every rank to take identical iterates."""
        return _dist.broadcast_(t) if rank_world(self.distributed)[1] > 1 else t

    @staticmethod
    def _solve(
        solver: Solver, operator: Any, b: torch.Tensor, stage: str | None = None, damping: str | None = None
    ) -> tuple[torch.Tensor, SolveInfo]:
        """One solve; a solver error names the stage and the damping keyword it used."""
        try:
            return solver.solve(operator, b)
        except SolverError as e:
            if stage is None:
                raise
            raise reworded(e, f"{stage} solve" + (f" ({damping})" if damping else "") + f": {e}") from e
