"""The influence chain of SPEC: single-stage and multi-stage influence scores.

``I(z) = dℓ/dε`` for upweighting pretraining example ``z`` by ``ε``: positive means
harmful (upweighting raises the test loss), negative helpful. Removing ``z`` changes
the test loss by about ``−I(z)/m`` (:meth:`removal_effects`).

Multi-stage, embedding fixed (SPEC)::

    v = (∇²_ΘΘ F + λ_ft·I)⁻¹ ∇_Θ ℓ
    u = ∇_W ℓ − (∇²_WΘ F) v
    s = H_G⁻¹ [u ; 0]
    I(z) = −sᵀ ∇g(z)

Multi-stage, embedding updated::

    v = (∇²_{(W,Θ)} F + 2α·P_W + λ_ft·I)⁻¹ ∇_{(W,Θ)} ℓ
    u = 2α [v]_W
    s = H_G⁻¹ [u ; 0]
    I(z) = −sᵀ ∇g(z)

The two solves run once for all test queries (a stack of right-hand sides); scoring
then streams the pretraining set (:mod:`lissa_influence.scoring`).

Under ``torchrun`` (an initialised process group of several ranks, and
``distributed=True``, the default) each rank holds a shard of every Hessian sample and
the products are summed across ranks, the solvers run identically on every rank, and
scoring splits the examples across ranks and gathers the scores on every rank
(:mod:`lissa_influence.distributed`). The results equal the single-process ones up to
rounding.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import torch
from torch import nn

from . import distributed as _dist
from .batching import Batch, DataLike, as_dataset, gather, subsample_indices
from .curvature import CurvatureOperator, LossFn, Objective, cross_entropy
from .params import ParamBlock, Params, check_finite, make_block, named_params, prefix_matcher
from .scoring import PerExample, ScoringMethod, loss_gradients, score_dataset
from .solvers import CG, Solver, SolveInfo

Mode = Literal["fixed", "updated"]


@contextlib.contextmanager
def _eval_mode(*models: nn.Module) -> Iterator[None]:
    """Influence is a property of the deterministic (eval-mode) function."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, was in zip(models, modes):
            m.train(was)


def _params(model: nn.Module, dtype: torch.dtype | None, what: str) -> Params:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} must be a torch.nn.Module, got {type(model).__name__}")
    params = named_params(model)
    if not params:
        raise ValueError(f"{what} has no trainable parameters")
    if dtype is not None:
        params = {n: p.to(dtype) for n, p in params.items()}
    check_finite(f"{what} parameter", params)
    return params


def _rank_world(distributed: bool) -> tuple[int, int]:
    return (_dist.rank(), _dist.world_size()) if distributed and _dist.is_distributed() else (0, 1)


def _hessian_sample(data, size: int, seed: int, params: Params, what: str, distributed: bool) -> dict[str, Any]:
    """The seeded Hessian sample as :class:`Objective` keyword arguments: all of it, or
    under torch.distributed this rank's contiguous shard of the same draw (every rank
    draws with the same seed), its place in the sample and the cross-rank sum."""
    if size < 1:
        raise ValueError(f"hessian_samples must be positive, got {size}")
    if size > len(data):
        warnings.warn(f"hessian_samples={size} exceeds the {len(data)} {what} examples; using all of them", stacklevel=3)
    t = next(iter(params.values()))
    indices = subsample_indices(len(data), size, seed)
    rank, world = _rank_world(distributed)
    if world == 1:
        batch = gather(data, indices, t.dtype, t.device)
        check_finite(f"{what} data (Hessian sample)", batch.x)
        return {"batch": batch}
    lo, hi = _dist.shard_range(len(indices), rank, world)
    batch = gather(data, indices[lo:hi], t.dtype, t.device)
    check_finite(f"{what} data (Hessian sample, rank {rank})", batch.x)
    return {"batch": batch, "sample_size": len(indices), "sample_offset": lo, "reduce": _dist.all_reduce_sum}


def _same_on_all_ranks(est: "Influence | MultiStageInfluence", t: torch.Tensor) -> torch.Tensor:
    """Rank 0's copy of a right-hand side: every rank computes it, but nondeterministic
    (GPU) kernels could differ in the last bits, and the solvers must see identical
    inputs on every rank to take identical iterates."""
    return _dist.broadcast_(t) if _rank_world(est.distributed)[1] > 1 else t


def _check_rows(what: str, t: torch.Tensor, size: int) -> None:
    if t.dim() != 2 or t.shape[1] != size:
        raise ValueError(f"{what} must be [k, {size}] (one row per query), got shape {tuple(t.shape)}")


def _timed(timings: dict[str, float], key: str):
    @contextlib.contextmanager
    def ctx():
        t0 = time.perf_counter()
        yield
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0

    return ctx()


def _influence_scores(est: "Influence | MultiStageInfluence", per_example: PerExample, data, s: torch.Tensor,
                      start: int, stop: int | None) -> torch.Tensor:
    """``I(z) = −sᵀ∇g(z)`` over ``data[start:stop]`` with the estimator's scoring settings;
    records the time in ``est.diagnostics``. Distributed: each rank scores a contiguous
    share and every rank returns all scores, in dataset order."""
    t0 = time.perf_counter()
    stop = len(data) if stop is None else stop
    rank, world = _rank_world(est.distributed)
    lo, hi = _dist.shard_range(stop - start, rank, world)
    with _eval_mode(per_example.model):
        d = score_dataset(per_example, data, s, est.batch_size, est.scoring, est.jvp_max_queries, start + lo, start + hi,
                          est.progress and rank == 0)
    if world > 1:
        d = _dist.all_gather_cat(d, dim=1)
    est.diagnostics.setdefault("time", {})["scoring"] = time.perf_counter() - t0
    return -d


@dataclass(eq=False, kw_only=True)
class _Settings:
    """Settings both estimators share (keyword-only, after each estimator's own fields):
    Gauss-Newton curvature, float type, batch size of products and scoring, the scoring
    path (:mod:`~lissa_influence.scoring`), a progress bar, and ``distributed``: split
    the Hessian samples and scoring across the ranks of an initialised
    torch.distributed process group (no effect without one)."""

    gauss_newton: bool = False
    dtype: torch.dtype | None = None
    batch_size: int = 256
    scoring: ScoringMethod = "auto"
    jvp_max_queries: int = 3
    progress: bool = False
    distributed: bool = True


@dataclass(eq=False)
class Influence(_Settings):
    """Single-stage influence (Koh & Liang 2017): ``I(z) = −∇ℓᵀ (∇²G + λI)⁻¹ ∇g(z)``.

    ``fit(train_data)`` fixes the Hessian sample; ``scores(test_data, train_data)``
    returns ``[n_test, n_train]`` (``[1, n_train]`` with ``mean=True``: the mean test
    loss as one query).
    """

    model: nn.Module
    loss: LossFn = cross_entropy
    solver: Solver = field(default_factory=CG)
    damping: float = 1e-2
    hessian_samples: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        self.diagnostics: dict[str, Any] = {}
        self._fitted = False

    def fit(self, train_data: DataLike) -> "Influence":
        train = as_dataset(train_data, "training data")
        self.params = _params(self.model, self.dtype, "model")
        self.block = make_block(self.params, lambda n: True)
        sample = _hessian_sample(train, self.hessian_samples, self.seed, self.params, "training", self.distributed)
        self.operator = CurvatureOperator(Objective(self.model, self.loss, self.params, chunk_size=self.batch_size, **sample),
                                          self.block, self.damping, self.gauss_newton)
        self.num_train = len(train)
        self._train = train
        self._fitted = True
        return self

    def _check_fitted(self) -> None:
        if not self._fitted:
            raise RuntimeError("call fit(train_data) before scoring")

    def query_vectors(self, test_data: DataLike, mean: bool = False) -> torch.Tensor:
        """``s = (∇²G + λI)⁻¹ ∇ℓ`` per test query, ``[k, P]``: all that scoring needs."""
        self._check_fitted()
        test = as_dataset(test_data, "test data")
        timings: dict[str, float] = {}
        with _eval_mode(self.model):
            grads = loss_gradients(PerExample(self.model, self.loss, self.params, self.block), test, self.batch_size, mean)
            grads = _same_on_all_ranks(self, grads)
            with _timed(timings, "solve"):
                s, info = self.solver.solve(self.operator, grads)
        self.diagnostics = {"solve": info.as_dict(), "time": timings}
        return s

    def scores_from(self, s: torch.Tensor, train_data: DataLike | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """``I(z) = −sᵀ∇g(z)`` for the given query vectors, ``[k, n]``."""
        self._check_fitted()
        train = self._train if train_data is None else as_dataset(train_data, "training data")
        return _influence_scores(self, PerExample(self.model, self.loss, self.params, self.block), train, s, start, stop)

    def scores(self, test_data: DataLike, train_data: DataLike | None = None, mean: bool = False) -> torch.Tensor:
        return self.scores_from(self.query_vectors(test_data, mean), train_data)

    def removal_effects(self, test_data: DataLike, train_data: DataLike | None = None, mean: bool = False) -> torch.Tensor:
        """Predicted change of each test loss when each training example is removed: ``−I(z)/m``."""
        return -self.scores(test_data, train_data, mean) / self.num_train


@dataclass(eq=False)
class MultiStageInfluence(_Settings):
    """Multi-stage influence (Chen et al. 2020) of pretraining examples on a finetuned
    model's test loss, with the embedding ``fixed`` or ``updated`` during finetuning.

    ``shared`` is the name prefix of the embedding parameters ``W`` present in both
    models; the pretrained model's other parameters are ``U``, the finetuned model's
    are ``Θ``. ``pretrain_solver`` / ``finetune_solver`` default to ``solver``.
    ``hessian_samples`` examples (seeded) estimate each Hessian;
    ``finetune_hessian_samples`` overrides it for the finetuning stage.
    """

    pretrained: nn.Module
    finetuned: nn.Module
    shared: str = "embedding"
    pretrain_loss: LossFn = cross_entropy
    finetune_loss: LossFn = cross_entropy
    mode: Mode = "fixed"
    alpha: float = 0.01
    solver: Solver = field(default_factory=CG)
    pretrain_solver: Solver | None = None
    finetune_solver: Solver | None = None
    pretrain_damping: float = 1e-2
    finetune_damping: float = 1e-8
    hessian_samples: int = 1000
    finetune_hessian_samples: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("fixed", "updated"):
            raise ValueError(f"unknown mode {self.mode!r}; use 'fixed' (embedding frozen in finetuning) or 'updated'")
        if self.mode == "updated" and not self.alpha > 0:
            raise ValueError(f"mode='updated' needs alpha > 0 (the proximity weight α of α‖W − W*‖²), got {self.alpha}")
        self.diagnostics: dict[str, Any] = {}
        self._fitted = False
        self._setup_blocks()

    # -- parameter blocks ---------------------------------------------------------------
    def _setup_blocks(self) -> None:
        self.pre_params = _params(self.pretrained, self.dtype, "pretrained model")
        self.ft_params = _params(self.finetuned, self.dtype, "finetuned model")
        is_w = prefix_matcher(self.shared)
        pre_w = [n for n in self.pre_params if is_w(n)]
        ft_w = [n for n in self.ft_params if is_w(n)]
        if not pre_w or not ft_w:
            which = "pretrained" if not pre_w else "finetuned"
            tops = sorted({n.split(".")[0] for n in (self.pre_params if not pre_w else self.ft_params)})
            raise ValueError(f"shared={self.shared!r} matches no parameter of the {which} model; "
                             f"its top-level parameter prefixes are {tops}")
        if set(pre_w) != set(ft_w):
            raise ValueError(f"shared={self.shared!r} names different parameters in the two models: "
                             f"only pretrained {sorted(set(pre_w) - set(ft_w))}, only finetuned {sorted(set(ft_w) - set(pre_w))}")
        for n in pre_w:
            if self.pre_params[n].shape != self.ft_params[n].shape:
                raise ValueError(f"shared parameter {n!r} has shape {tuple(self.pre_params[n].shape)} in the pretrained "
                                 f"model but {tuple(self.ft_params[n].shape)} in the finetuned one")
        self.W = make_block(self.pre_params, pre_w)
        self.U = make_block(self.pre_params, lambda n: not is_w(n))
        self.Theta = make_block(self.ft_params, lambda n: not is_w(n))
        if self.Theta.numel == 0:
            raise ValueError("the finetuned model has no parameters outside the shared embedding (no finetuning head Θ)")
        self.pre_block = self.W + self.U
        if self.mode == "fixed":
            for n in pre_w:
                a, b = self.pre_params[n], self.ft_params[n]
                if not torch.allclose(a, b, rtol=1e-6, atol=1e-8):
                    raise ValueError(f"mode='fixed' but the embedding parameter {n!r} differs between the pretrained "
                                     f"and finetuned models (max |Δ| = {float((a - b).abs().max()):.3g}); "
                                     "use mode='updated' when finetuning trained the embedding")
            self.ft_block = self.Theta
        else:
            self.ft_block = self.W + self.Theta

    # -- fit ------------------------------------------------------------------------
    def fit(self, pretrain_data: DataLike, finetune_data: DataLike) -> "MultiStageInfluence":
        """Draw the Hessian samples of both stages and build the damped operators."""
        pre = as_dataset(pretrain_data, "pretraining data")
        ft = as_dataset(finetune_data, "finetuning data")
        pre_sample = _hessian_sample(pre, self.hessian_samples, self.seed, self.pre_params, "pretraining", self.distributed)
        ft_n = self.finetune_hessian_samples or self.hessian_samples
        ft_sample = _hessian_sample(ft, ft_n, self.seed + 1, self.ft_params, "finetuning", self.distributed)
        self.pre_objective = Objective(self.pretrained, self.pretrain_loss, self.pre_params, chunk_size=self.batch_size,
                                       **pre_sample)
        self.ft_objective = Objective(self.finetuned, self.finetune_loss, self.ft_params, chunk_size=self.batch_size,
                                      **ft_sample)
        self.pre_operator = CurvatureOperator(self.pre_objective, self.pre_block, self.pretrain_damping, self.gauss_newton)
        ft_damping: float | torch.Tensor = self.finetune_damping
        if self.mode == "updated":
            # The proximity term α‖W − W*‖² adds 2α on the W block of the finetune Hessian.
            ft_damping = torch.full((self.ft_block.numel,), self.finetune_damping, dtype=self.ft_objective.dtype,
                                    device=self.ft_objective.device)
            ft_damping[: self.W.numel] += 2 * self.alpha
        self.ft_operator = CurvatureOperator(self.ft_objective, self.ft_block, ft_damping, self.gauss_newton)
        self.num_pretrain = len(pre)
        self._pretrain = pre
        self._fitted = True
        return self

    # -- the chain ------------------------------------------------------------------
    # query_vectors runs the three steps below; they are public so that solver
    # benchmarks (lissa_influence.accuracy) can run each solve on its own.
    def test_gradients(self, test_data: DataLike, mean: bool = False) -> torch.Tensor:
        """``∇_{(W,Θ)} ℓ`` at the finetuned parameters, ``[k, |W|+|Θ|]`` (one row per test
        point, or one row for the mean test loss)."""
        self._check_fitted()
        test = as_dataset(test_data, "test data")
        with _eval_mode(self.pretrained, self.finetuned):
            g = loss_gradients(PerExample(self.finetuned, self.finetune_loss, self.ft_params, self.W + self.Theta),
                               test, self.batch_size, mean)
        return _same_on_all_ranks(self, g)

    def finetune_rhs(self, g: torch.Tensor) -> torch.Tensor:
        """The right-hand side of the finetune solve: ``∇_Θ ℓ`` (fixed) or ``∇_{(W,Θ)} ℓ`` (updated)."""
        _check_rows("g (test gradients)", g, self.W.numel + self.Theta.numel)
        return g[:, self.W.numel :] if self.mode == "fixed" else g

    def pretrain_rhs(self, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``[u; 0]`` on the pretraining block from the finetune solution ``v``:
        ``u = ∇_W ℓ − (∇²_WΘ F) v`` (fixed) or ``u = 2α [v]_W`` (updated)."""
        _check_rows("v (finetune solution)", v, self.ft_block.numel)
        _check_rows("g (test gradients)", g, self.W.numel + self.Theta.numel)
        if self.mode == "fixed":
            with _eval_mode(self.pretrained, self.finetuned):
                u = g[:, : self.W.numel] - self.ft_objective.mixed_vp(self.W, self.Theta, v)
        else:
            u = 2 * self.alpha * v[:, : self.W.numel]
        return self.pre_block.embed(self.W, u)

    def query_vectors(self, test_data: DataLike, mean: bool = False) -> torch.Tensor:
        """``s = H_G⁻¹ [u; 0]`` per test query, ``[k, |W|+|U|]``: the two solves and the
        mixed product of SPEC. Save these to score new pretraining examples later."""
        self._check_fitted()
        ft_solver = self.finetune_solver or self.solver
        pre_solver = self.pretrain_solver or self.solver
        timings: dict[str, float] = {}
        infos: dict[str, SolveInfo] = {}
        with _eval_mode(self.pretrained, self.finetuned):
            with _timed(timings, "test_gradients"):
                g = self.test_gradients(test_data, mean)
            with _timed(timings, "finetune_solve"):
                v, infos["finetune"] = ft_solver.solve(self.ft_operator, self.finetune_rhs(g))
            with _timed(timings, "mixed_product"):
                b = self.pretrain_rhs(v, g)
            with _timed(timings, "pretrain_solve"):
                s, infos["pretrain"] = pre_solver.solve(self.pre_operator, b)
        self.diagnostics = {**{k: i.as_dict() for k, i in infos.items()}, "time": timings}
        return s

    def _check_fitted(self) -> None:
        if not self._fitted:
            raise RuntimeError("call fit(pretrain_data, finetune_data) before scoring")

    def scores_from(self, s: torch.Tensor, pretrain_data: DataLike | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """``I(z) = −sᵀ∇g(z)`` for every pretraining example (or ``[start:stop]``), ``[k, n]``."""
        self._check_fitted()
        pre = self._pretrain if pretrain_data is None else as_dataset(pretrain_data, "pretraining data")
        per_example = PerExample(self.pretrained, self.pretrain_loss, self.pre_params, self.pre_block)
        return _influence_scores(self, per_example, pre, s, start, stop)

    def scores(self, test_data: DataLike, pretrain_data: DataLike | None = None, mean: bool = False) -> torch.Tensor:
        """``[n_test, n_pretrain]`` (``[1, n_pretrain]`` with ``mean=True``): ``I(z)`` of SPEC."""
        return self.scores_from(self.query_vectors(test_data, mean), pretrain_data)

    def removal_effects(self, test_data: DataLike, pretrain_data: DataLike | None = None, mean: bool = False) -> torch.Tensor:
        """Predicted change of each test loss when each pretraining example is removed: ``−I(z)/m``."""
        return -self.scores(test_data, pretrain_data, mean) / self.num_pretrain
