"""Multi-stage influence (Chen et al., NeurIPS 2020): pretraining examples scored for a finetuned model.

Embedding fixed during finetuning (docs/math.md)::

    v = (∇²_ΘΘ F + λ_ft·I)⁻¹ ∇_Θ ℓ
    u = ∇_W ℓ − (∇²_WΘ F) v
    s = H_G⁻¹ [u ; 0]
    I(z) = −sᵀ ∇g(z)

Embedding updated::

    v = (∇²_{(W,Θ)} F + 2α·P_W + λ_ft·I)⁻¹ ∇_{(W,Θ)} ℓ
    u = 2α [v]_W
    s = H_G⁻¹ [u ; 0]
    I(z) = −sᵀ ∇g(z)

The two solves run once for all test queries (a stack of right-hand sides); scoring
then streams the pretraining set (:class:`~lissa_influence.estimator.InfluenceEstimator`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from .batching import DataLike, Source
from .curvature import CurvatureOperator
from .damping import DampingCalibration, DampingRule, check_dampings
from .estimator import InfluenceEstimator
from .head import embedding_module, head_objective
from .objective import Objective
from .params import NameSelector, ParamBlock, make_block, name_matcher
from .reports import check_rows, timed
from .sample import HessianSamples, hessian_sample, trainable_params
from .scoring import PerExample, loss_gradients
from .solvers import CG, ExactInverse, SolveInfo, Solver, is_approximate
from .solvers.base import at_least_one, non_negative
from .task import Forward, LossFn, Task, cross_entropy, eval_mode

Mode = Literal["fixed", "updated"]

log = logging.getLogger(__name__)


def default_shared(pretrained: nn.Module, finetuned: nn.Module) -> str:
    """The shared prefix when none is given: the ``base_model_prefix`` both models declare
    (Hugging Face models: ``"transformer"``, ``"bert"``) where both hold that submodule,
    else ``"embedding"``.

    Args:
        pretrained: the pretrained model.
        finetuned: the finetuned model.

    Returns:
        A module-path prefix.
    """
    # getattr on the user's models for Hugging Face's optional base_model_prefix: not a contract of ours
    prefix = getattr(pretrained, "base_model_prefix", None)
    if isinstance(prefix, str) and prefix and getattr(finetuned, "base_model_prefix", None) == prefix:
        if all(isinstance(getattr(m, prefix, None), nn.Module) for m in (pretrained, finetuned)):
            return prefix
    return "embedding"


def tied_parameters(model: nn.Module, shared: list[str]) -> dict[str, str]:
    """The parameters of ``model`` outside ``shared`` that are the same tensor as a shared one.

    A tied language-model head, say.

    Args:
        model: the model.
        shared: the names of the shared parameters.

    Returns:
        ``{tied name: the shared name it stands for}``.
    """
    names: dict[int, str] = {}
    out: dict[str, str] = {}
    wanted = set(shared)
    for n, p in model.named_parameters(remove_duplicate=False):
        if n in wanted:
            names.setdefault(id(p), n)
    for n, p in model.named_parameters(remove_duplicate=False):
        if n not in wanted and id(p) in names:
            out[n] = names[id(p)]
    return out


@dataclass(eq=False)
class MultiStageInfluence(InfluenceEstimator):
    """Multi-stage influence (Chen et al. 2020) of pretraining examples on a finetuned
    model's test loss, with the embedding ``fixed`` or ``updated`` during finetuning.

    ``shared`` picks the embedding parameters ``W`` present in both models: a name
    prefix (``"embedding"``), a list of prefixes (``["conv1", "bn1", "layer1"]``) or a
    predicate on parameter names; None (the default): the models' ``base_model_prefix``
    where both have the same one (a Hugging Face ``"transformer"``, ``"bert"``), else
    ``"embedding"``. The pretrained model's other parameters are ``U``, the finetuned
    model's are ``Θ``; a head weight tied to a shared one (GPT-2's ``lm_head.weight``) is
    the shared parameter, counted once in ``W``, and listed in :attr:`tied`. With
    ``mode="fixed"`` the shared parameters may be frozen (``requires_grad=False``).
    Losses and the optional ``pretrain_forward`` / ``finetune_forward`` follow
    :mod:`lissa_influence.task`. ``pretrain_solver`` / ``finetune_solver`` default to ``solver``.
    ``hessian_samples`` examples (seeded, or ``"all"``) estimate each Hessian;
    ``finetune_hessian_samples`` overrides it for the finetuning stage.

    Embedding fixed: when ``shared`` is exactly one submodule's parameters, the finetune
    products run on the head alone, with that module's outputs on the Hessian sample
    computed once (``head_only``: ``"auto"`` where the model allows it, checked on the
    first chunk; :mod:`lissa_influence.head`). Then, unless a ``finetune_solver`` is
    given or ``solver`` is an approximation (``Identity``, ``EKFAC``: they replace every
    inverse), a head of at most ``exact_max_params`` parameters is solved exactly: its
    damped Hessian formed in float64 and factored once (``exact_finetune``).

    The chain (docs/math.md) runs in :meth:`query_vectors`: :meth:`test_gradients`, the
    finetune solve of :meth:`finetune_rhs`, :meth:`pretrain_rhs`, the pretrain solve.

    Args:
        pretrained: the pretrained model.
        finetuned: the finetuned model.
        shared: the embedding parameters ``W`` (a prefix, a list of prefixes or a predicate).
        pretrain_loss: the pretraining loss.
        finetune_loss: the finetuning loss.
        mode: ``"fixed"`` or ``"updated"`` embedding during finetuning.
        alpha: the proximity weight ``α`` of ``α‖W − W*‖²`` (``mode="updated"``).
        solver: solves both stages unless overridden.
        pretrain_solver: the pretraining stage's solver (None: ``solver``).
        finetune_solver: the finetuning stage's solver (None: the exact head inverse where it
            applies, else ``solver``).
        pretrain_damping: ``λ`` of the pretraining Hessian, or ``"auto"`` / ``"heuristic"``.
        finetune_damping: ``λ`` of the finetuning Hessian, or ``"auto"`` / ``"heuristic"``.
        hessian_samples: examples per Hessian sample (or ``"all"``).
        finetune_hessian_samples: the finetuning stage's (None: ``hessian_samples``).
        seed: the seed of the Hessian samples' draws.
        pretrain_forward: the pretrained model's forward (None: ``model(x)``).
        finetune_forward: the finetuned model's forward (None: ``model(x)``).
        head_only: finetune products on the head alone (``"auto"``: where the model allows it).
        exact_finetune: solve the finetune stage exactly in float64 (``"auto"``: where it applies).
        exact_max_params: the largest head solved exactly.
        calibration: retrained ground truth for ``"auto"`` dampings.
        heuristic_fraction: the share of the mean eigenvalue a ``"heuristic"`` damping takes.
    """

    pretrained: nn.Module
    finetuned: nn.Module
    shared: NameSelector | None = None
    pretrain_loss: LossFn = cross_entropy
    finetune_loss: LossFn = cross_entropy
    mode: Mode = "fixed"
    alpha: float = 0.01
    solver: Solver = field(default_factory=CG)
    pretrain_solver: Solver | None = None
    finetune_solver: Solver | None = None
    pretrain_damping: float | DampingRule = 1e-2
    finetune_damping: float | DampingRule = 1e-8
    hessian_samples: HessianSamples = 1000
    finetune_hessian_samples: HessianSamples | None = None
    seed: int = 0
    pretrain_forward: Forward | None = None
    finetune_forward: Forward | None = None
    head_only: bool | Literal["auto"] = "auto"
    exact_finetune: bool | Literal["auto"] = "auto"
    exact_max_params: int = 10_000
    calibration: DampingCalibration | None = None
    heuristic_fraction: float = 0.1

    _old_data_keyword: ClassVar[str] = "pretrain_data"

    def __post_init__(self) -> None:
        if self.mode not in ("fixed", "updated"):
            raise ValueError(f"unknown mode {self.mode!r}; use 'fixed' (embedding frozen in finetuning) or 'updated'")
        if self.mode == "updated" and not self.alpha > 0:
            raise ValueError(f"mode='updated' needs alpha > 0 (the proximity weight α of α‖W − W*‖²), got {self.alpha}")
        self._requested_damping = {"finetune": self.finetune_damping, "pretrain": self.pretrain_damping}
        check_dampings({f"{k}_damping": v for k, v in self._requested_damping.items()}, self.calibration)
        non_negative("alpha", self.alpha)
        for key in ("head_only", "exact_finetune"):  # getattr on own fields, by name: not contract probing
            if getattr(self, key) not in (True, False, "auto"):
                raise ValueError(f"{key}={getattr(self, key)!r}: use True, False or 'auto'")
        at_least_one("exact_max_params", self.exact_max_params)
        super().__post_init__()
        self._setup_blocks()

    # -- parameter blocks ---------------------------------------------------------------
    def _setup_blocks(self) -> None:
        if self.shared is None:
            self.shared = default_shared(self.pretrained, self.finetuned)
        is_w = name_matcher(self.shared)
        self.pre_params = trainable_params(self.pretrained, self.dtype, "pretrained model")
        if self.mode == "fixed":
            # the embedding is fixed in finetuning by definition: W is what pretraining trained, frozen
            # (requires_grad=False) in the finetuned model or not; all of it where the body is frozen in both
            # (one module object shared by the two models). Frozen parameters of a partly trainable body stay
            # out, as everywhere: freezing is how a user leaves parameters out of the question
            if not any(map(is_w, self.pre_params)):
                self.pre_params = trainable_params(self.pretrained, self.dtype, "pretrained model", is_w)
            in_w = {n for n in self.pre_params if is_w(n)}
            self.ft_params = trainable_params(self.finetuned, self.dtype, "finetuned model", in_w.__contains__)
        else:
            self.ft_params = trainable_params(self.finetuned, self.dtype, "finetuned model")
        pre_w = [n for n in self.pre_params if is_w(n)]
        ft_w = [n for n in self.ft_params if is_w(n)]
        if not pre_w or not ft_w:
            which = "pretrained" if not pre_w else "finetuned"
            model = self.pretrained if not pre_w else self.finetuned
            locked = [n for n, p in model.named_parameters() if not p.requires_grad and is_w(n)]
            if locked:
                raise ValueError(
                    f"shared={self.shared!r} matches only frozen parameters (requires_grad=False) of the {which} "
                    f"model: {locked[:6]}{' ...' if len(locked) > 6 else ''}. mode='fixed' takes a frozen shared "
                    "embedding; with mode='updated' finetuning trained it, so set requires_grad=True on them"
                )
            tops = sorted({n.split(".")[0] for n in (self.pre_params if not pre_w else self.ft_params)})
            raise ValueError(
                f"shared={self.shared!r} matches no parameter of the {which} model; "
                f"its top-level parameter prefixes are {tops}"
            )
        self.tied = tied_parameters(self.pretrained, pre_w) | tied_parameters(self.finetuned, ft_w)
        if self.tied:
            log.info("parameters tied to the shared embedding (counted once, as W): %s", self.tied)
        if set(pre_w) != set(ft_w):
            raise ValueError(
                f"shared={self.shared!r} names different parameters in the two models: "
                f"only pretrained {sorted(set(pre_w) - set(ft_w))}, only finetuned {sorted(set(ft_w) - set(pre_w))}"
            )
        for n in pre_w:
            if self.pre_params[n].shape != self.ft_params[n].shape:
                raise ValueError(
                    f"shared parameter {n!r} has shape {tuple(self.pre_params[n].shape)} in the pretrained "
                    f"model but {tuple(self.ft_params[n].shape)} in the finetuned one"
                )
        self.W = make_block(self.pre_params, pre_w)
        self.U = make_block(self.pre_params, lambda n: not is_w(n))
        self.Theta = make_block(self.ft_params, lambda n: not is_w(n))
        if self.Theta.numel == 0:
            raise ValueError(
                "the finetuned model has no parameters outside the shared embedding (no finetuning head Θ)"
            )
        self.pre_block = self.W + self.U
        if self.mode == "fixed":
            for n in pre_w:
                a, b = self.pre_params[n], self.ft_params[n]
                if not torch.allclose(a, b, rtol=1e-6, atol=1e-8):
                    raise ValueError(
                        f"mode='fixed' but the embedding parameter {n!r} differs between the pretrained "
                        f"and finetuned models (max |Δ| = {float((a - b).abs().max()):.3g}); "
                        "use mode='updated' when finetuning trained the embedding"
                    )
            self.ft_block = self.Theta
        else:
            self.ft_block = self.W + self.Theta

    # -- fit ------------------------------------------------------------------------
    def fit(self, pretrain_data: DataLike, finetune_data: DataLike) -> MultiStageInfluence:
        """Draw the Hessian samples of both stages and build the damped operators.

        Args:
            pretrain_data: the pretraining examples (the ones scored).
            finetune_data: the finetuning examples.

        Returns:
            ``self``, fitted.
        """
        pre = self._data(pretrain_data, "pretraining data")
        ft = self._data(finetune_data, "finetuning data")
        pre_task, ft_task = self.pretrain_task, self.finetune_task
        pre_sample = hessian_sample(
            pre,
            self.hessian_samples,
            self.seed,
            self.pre_params,
            "pretraining",
            self.distributed,
            pre_task,
            self.pretrained,
        )
        ft_n = self.finetune_hessian_samples or self.hessian_samples
        ft_sample = hessian_sample(
            ft, ft_n, self.seed + 1, self.ft_params, "finetuning", self.distributed, ft_task, self.finetuned
        )
        self.pre_objective = self._objective(self.pretrained, pre_task, self.pre_params, pre_sample)
        self.ft_objective = self._objective(self.finetuned, ft_task, self.ft_params, ft_sample)
        # a damping given by rule starts at 0 and is resolved once the operators exist
        initial = {k: 0.0 if isinstance(v, str) else float(v) for k, v in self._requested_damping.items()}
        self.pretrain_damping, self.finetune_damping = initial["pretrain"], initial["finetune"]
        self.pre_operator = CurvatureOperator(
            self.pre_objective, self.pre_block, self.pretrain_damping, self.gauss_newton
        )
        self._exact: ExactInverse | None = None
        # per calibration query set (or chunk of it): the data itself, kept alive so that its id stays its own
        self._finetune_memo: dict[tuple[Any, ...], tuple[Any, tuple[torch.Tensor, torch.Tensor, SolveInfo]]] = {}
        self.finetune_path = "full network"
        ft_objective, ft_block = self.ft_objective, self.ft_block
        if self.mode == "fixed":
            with eval_mode(self.pretrained, self.finetuned):  # no BatchNorm statistics move, no dropout
                head = self._head()
            if head is not None:
                ft_objective, ft_block = head
        self.ft_operator = CurvatureOperator(
            ft_objective, ft_block, self._finetune_shift(self.finetune_damping), self.gauss_newton
        )
        self._per_example = PerExample.from_task(
            self.pretrained, pre_task, self.pre_params, self.pre_block, self.ad_mode
        )
        self._fitted_on(pre)
        # the finetune stage first: its damping changes the pretraining right-hand side
        self._resolve_dampings(
            [
                ("finetune", self._requested_damping["finetune"], self._set_finetune_damping, self.ft_operator),
                ("pretrain", self._requested_damping["pretrain"], self._set_pretrain_damping, self.pre_operator),
            ],
            self.calibration,
            self.heuristic_fraction,
        )
        return self

    @property
    def pretrain_task(self) -> Task:
        """The pretrained model's forward and loss as one :class:`~lissa_influence.task.Task`."""
        return Task(self.pretrain_loss, self.pretrain_forward)

    @property
    def finetune_task(self) -> Task:
        """The finetuned model's forward and loss as one :class:`~lissa_influence.task.Task`."""
        return Task(self.finetune_loss, self.finetune_forward)

    def _finetune_shift(self, damping: float) -> float | torch.Tensor:
        """The finetune operator's shift: ``λ_ft``, plus ``2α`` on the W block when the embedding is
        updated (the proximity term α‖W − W*‖²)."""
        if self.mode == "fixed":
            return damping
        shift = torch.full(
            (self.ft_block.numel,), damping, dtype=self.ft_objective.dtype, device=self.ft_objective.device
        )
        shift[: self.W.numel] += 2 * self.alpha
        return shift

    def _set_finetune_damping(self, damping: float) -> None:
        self.finetune_damping = damping
        self.ft_operator.set_damping(self._finetune_shift(damping))

    def _set_pretrain_damping(self, damping: float) -> None:
        self.pretrain_damping = damping
        self.pre_operator.set_damping(damping)

    def _head(self) -> tuple[Objective, ParamBlock] | None:
        """The head-only finetune objective (fixed mode), in float64 when it will be solved exactly."""
        # an approximation chosen for every inverse (identity ablation, EK-FAC) is kept for this one too
        chosen_approximation = is_approximate(self.solver) and self.exact_finetune is not True
        exact = self.finetune_solver is None and self.exact_finetune is not False and not chosen_approximation
        fits = self.Theta.numel <= self.exact_max_params
        if self.exact_finetune is True and not (exact and fits):
            raise ValueError(
                "exact_finetune=True, but "
                + (
                    f"the head has {self.Theta.numel} parameters, above exact_max_params={self.exact_max_params}"
                    if not fits
                    else "a finetune_solver was given, and it solves the finetune stage"
                )
            )
        head = None
        if self.head_only is False:
            reason = "head_only=False"
        elif (path := embedding_module(self.finetuned, self.W.names)) is None:
            reason = f"shared={self.shared!r} is not exactly the parameters of one submodule"
        else:
            try:
                head = head_objective(self.ft_objective, path, self.Theta, torch.float64 if exact and fits else None)
            except (ValueError, RuntimeError, NotImplementedError) as e:  # e.g. a model torch.func cannot replay
                reason = str(e).splitlines()[0][:300]
        if self.ft_objective.reduce is not None:  # every rank takes the same path, or their collectives differ
            ok = self.ft_objective.reduce(torch.tensor([float(head is not None), 1.0], device=self.ft_objective.device))
            if head is not None and float(ok[0]) < float(ok[1]):
                head, reason = None, "the head path is not available on every rank"
        if head is not None:
            if exact and fits:
                self._exact = ExactInverse(self.exact_max_params)
                self.finetune_path = "head only, exact (float64)"
            else:
                self.finetune_path = "head only"
            return head
        if self.head_only is True:
            raise ValueError(f"head_only=True, but the finetune products cannot run on the head alone: {reason}")
        if self.exact_finetune is True:
            raise ValueError(f"exact_finetune=True needs the head-only products, which are not available: {reason}")
        self.finetune_path = f"full network ({reason})"
        log.info("finetune products on the full network: %s", reason)
        return None

    @property
    def finetune_stage_solver(self) -> Solver:
        """What solves the finetune stage: ``finetune_solver``, else the exact head inverse
        where it applies, else ``solver``."""
        return self.finetune_solver or self._exact or self.solver

    @property
    def num_pretrain(self) -> int:
        return self.num_scored

    def _scored_losses(self) -> PerExample:
        return self._per_example

    # -- the chain ------------------------------------------------------------------
    # query_vectors runs the three steps below; they are public so that solver
    # benchmarks (lissa_influence.experiments.accuracy) can run each solve on its own.
    def test_gradients(self, test_data: DataLike | Source, mean: bool = False) -> torch.Tensor:
        """``∇_{(W,Θ)} ℓ`` at the finetuned parameters.

        Args:
            test_data: the test examples.
            mean: one row, the mean test loss, instead of one per test point.

        Returns:
            ``[k, |W|+|Θ|]``.
        """
        self._check_fitted()
        test = self._data(test_data, "test data")
        with eval_mode(self.pretrained, self.finetuned):
            g = loss_gradients(
                PerExample.from_task(
                    self.finetuned, self.finetune_task, self.ft_params, self.W + self.Theta, self.ad_mode
                ),
                test,
                self.batch_size,
                mean,
            )
        return self._same_on_all_ranks(g)

    def finetune_rhs(self, g: torch.Tensor) -> torch.Tensor:
        """The right-hand side of the finetune solve.

        Args:
            g: test gradients (:meth:`test_gradients`).

        Returns:
            ``∇_Θ ℓ`` (fixed) or ``∇_{(W,Θ)} ℓ`` (updated), one row per query.
        """
        check_rows("g (test gradients)", g, self.W.numel + self.Theta.numel)
        return g[:, self.W.numel :] if self.mode == "fixed" else g

    def pretrain_rhs(self, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``[u; 0]`` on the pretraining block from the finetune solution ``v``.

        ``u = ∇_W ℓ − (∇²_WΘ F) v`` (fixed) or ``u = 2α [v]_W`` (updated).

        Args:
            v: the finetune solution, one row per query.
            g: test gradients (:meth:`test_gradients`).

        Returns:
            One row per query on the pretraining block.
        """
        check_rows("v (finetune solution)", v, self.ft_block.numel)
        check_rows("g (test gradients)", g, self.W.numel + self.Theta.numel)
        if self.mode == "fixed":
            with eval_mode(self.pretrained, self.finetuned):
                u = g[:, : self.W.numel] - self.ft_objective.mixed_vp(self.W, self.Theta, v)
        else:
            u = 2 * self.alpha * v[:, : self.W.numel]
        return self.pre_block.embed(self.W, u)

    def _solve_queries(self, test_data: DataLike | Source, mean: bool = False) -> torch.Tensor:
        """``s = H_G⁻¹ [u; 0]`` per test query, ``[k, |W|+|U|]``: the two solves and the
        mixed product of docs/math.md."""
        ft_solver = self.finetune_stage_solver
        pre_solver = self.pretrain_solver or self.solver
        timings: dict[str, float] = {}
        infos: dict[str, SolveInfo] = {}
        # while a calibration tries pretraining dampings, the finetune solve of its queries is the same
        memo_key = (id(test_data), mean, float(self.finetune_damping))
        with eval_mode(self.pretrained, self.finetuned):
            if self._calibrating and memo_key in self._finetune_memo:
                g, v, infos["finetune"] = self._finetune_memo[memo_key][1]
            else:
                with timed(timings, "test_gradients"):
                    g = self.test_gradients(test_data, mean)
                with timed(timings, "finetune_solve"):
                    v, infos["finetune"] = self._solve(
                        ft_solver,
                        self.ft_operator,
                        self.finetune_rhs(g).to(self.ft_operator.dtype),  # float64 for the exact head
                        "finetune",
                        f"finetune_damping={self.finetune_damping:g}",
                    )
                    v = v.to(g.dtype)
                    infos["finetune"].extra["path"] = self.finetune_path
                if self._calibrating:
                    self._finetune_memo[memo_key] = (test_data, (g, v, infos["finetune"]))
                else:
                    self._finetune_memo.clear()
            with timed(timings, "mixed_product"):
                b = self.pretrain_rhs(v, g)
            with timed(timings, "pretrain_solve"):
                s, infos["pretrain"] = self._solve(
                    pre_solver, self.pre_operator, b, "pretrain", f"pretrain_damping={self.pretrain_damping:g}"
                )
        self.diagnostics = {
            **{k: i.as_dict() for k, i in infos.items()},
            "time": timings,
            "damping": self.damping_report,
        }
        return s
