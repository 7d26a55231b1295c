"""Two-stage training: pretrain (W, U) on G, then finetune Theta (and maybe W) on F.

The objectives are exactly those of docs/math.md, because influence functions differentiate the
optimality conditions of these objectives:

- pretraining: ``G(W, U) = (1/m) sum_i w_i CE_i`` (all ``w_i = 1`` unless ``weights``
  is given; a zero weight drops an example, ``1 + eps`` upweights it);
- finetuning, embedding fixed: ``F(W*, Theta) = mean CE`` over Theta only;
- finetuning, embedding updated: ``mean CE + alpha * ||W - W*||^2`` over (W, Theta);
- each plus ``(weight_decay / 2) * ||trained parameters||^2`` when ``weight_decay > 0``.
  With ``weight_decay`` equal to the stage's influence damping, the damped Hessian of
  the influence code is exactly the Hessian of the training objective; on separable
  data (the digits) it also gives the objective a finite minimiser (docs/math.md).

Adam runs for ``steps`` steps (full batch when ``batch_size`` is None or >= n), then an
optional full-batch L-BFGS polish drives the gradient towards zero (the theory assumes
stationary points). Training functions never modify their input model: they return a
trained copy and a :class:`TrainReport`. Batches come from a seeded ``torch.Generator``,
so the same seed gives bitwise the same weights.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as nnf
from torch import nn

from ..progress import progress_bar
from .data import TwoStageData
from .models import EMBEDDING, ModelConfig, TwoStageNet, build_from_config, embedding_state, finetune_model_from

MODES = ("fixed", "updated")
CACHE_VERSION = 1  # bump when training semantics change, so old cache files are ignored
CHUNK = 2048  # examples per forward pass when evaluating the full objective


@dataclass(frozen=True)
class TrainConfig:
    """One stage's optimiser settings.

    ``batch_size``: None (or >= the number of examples) trains full batch.
    ``polish_iters``: L-BFGS iterations (full batch, strong Wolfe) after Adam; 0 = off.
    ``polish_tol``: the polish stops once every gradient entry is below this.
    """

    steps: int = 1000
    batch_size: int | None = None
    lr: float = 1e-3
    seed: int = 0
    polish_iters: int = 0
    polish_tol: float = 1e-10
    weight_decay: float = 0.0


@dataclass(frozen=True)
class TrainReport:
    """The state a stage ended in: full-data objective and the L2 norm of its gradient
    over the trained parameters (how far from stationarity the influence theory starts)."""

    stage: str
    examples: int
    steps: int
    polish_evals: int
    loss: float
    grad_norm: float
    param_norm: float  # of the trained parameters; growing without bound = separable data, no finite optimum
    seconds: float


@dataclass(frozen=True)
class TwoStageInfo:
    pretrain_key: str
    finetune_key: str
    pretrain_report: TrainReport
    finetune_report: TrainReport
    pretrain_cached: bool
    finetune_cached: bool


# --- objectives ----------------------------------------------------------------------


def proximity(model: nn.Module, w_star: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``||W - W*||^2``: sum of squares over every embedding entry."""
    params = dict(model.named_parameters())
    missing = [n for n in params if n.startswith(EMBEDDING + ".") and n not in w_star]
    if missing:
        raise KeyError(f"w_star lacks embedding parameters {missing}; pass embedding_state(pretrained_model)")
    return cast(torch.Tensor, sum(((params[n] - w.to(params[n])) ** 2).sum() for n, w in w_star.items()))


def pretrain_objective(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """G on the given examples: ``(1/m) sum_i w_i CE_i``."""
    ce = nnf.cross_entropy(model(x), y, reduction="none")
    return (ce if weights is None else weights.to(ce) * ce).mean()


def finetune_objective(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    mode: str,
    alpha: float,
    w_star: Mapping[str, torch.Tensor] | None,
) -> torch.Tensor:
    """F on the given examples, plus ``alpha ||W - W*||^2`` when the embedding is updated."""
    _check_mode(mode, alpha)
    loss = nnf.cross_entropy(model(x), y)
    if mode == "updated":
        if w_star is None:
            raise ValueError("mode='updated' needs w_star, the pretrained embedding (embedding_state(pretrained))")
        loss = loss + alpha * proximity(model, w_star)
    return loss


def leave_out(m: int, indices: Sequence[int] | int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Pretraining weights that drop ``indices`` (weight 0) and keep the rest (weight 1).

    With weights the minibatch sequence is the same as the control run's, so the only
    difference between the two runs is the dropped example's contribution.
    """
    w = torch.ones(m, dtype=dtype)
    w[torch.as_tensor(indices, dtype=torch.long)] = 0.0
    return w


# --- the optimisation loop -----------------------------------------------------------


@dataclass
class _Problem:
    """An objective ``(1/n) sum_i loss_i + extra()`` over ``params``.

    ``example_sum(idx)`` returns ``sum_{i in idx} loss_i`` with autograd.
    """

    params: list[torch.Tensor]
    n: int
    example_sum: Callable[[torch.Tensor], torch.Tensor]
    extra: Callable[[], torch.Tensor] | None = None

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def full(self) -> torch.Tensor:
        """Zero the grads, then accumulate the full objective's gradient chunk by chunk."""
        self.zero_grad()
        ref = self.params[0]
        total = torch.zeros((), dtype=ref.dtype, device=ref.device)
        for start in range(0, self.n, CHUNK):
            idx = torch.arange(start, min(start + CHUNK, self.n), device=ref.device)
            part = self.example_sum(idx) / self.n
            part.backward()
            total += part.detach()
        if self.extra is not None:
            part = self.extra()
            part.backward()
            total += part.detach()
        return total

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        """Unbiased minibatch estimate of the objective (with its gradient)."""
        self.zero_grad()
        loss = self.example_sum(idx) / len(idx)
        if self.extra is not None:
            loss = loss + self.extra()
        loss.backward()
        return loss.detach()

    def grad_norm(self) -> float:
        return math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in self.params if p.grad is not None))

    def param_norm(self) -> float:
        return math.sqrt(sum(float((p.detach().double() ** 2).sum()) for p in self.params))


def _batches(n: int, batch_size: int, steps: int, seed: int):
    """Index batches from seeded epoch permutations (independent of the global RNG)."""
    gen = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(n, generator=gen), 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        yield perm[pos : pos + batch_size]
        pos += batch_size


def _with_weight_decay(problem: _Problem, weight_decay: float) -> _Problem:
    """The same problem plus ``(weight_decay / 2) * ||params||^2``."""
    base = problem.extra

    def extra() -> torch.Tensor:
        l2 = cast(torch.Tensor, 0.5 * weight_decay * sum((p**2).sum() for p in problem.params))
        return l2 if base is None else base() + l2

    return _Problem(problem.params, problem.n, problem.example_sum, extra)


def _optimise(problem: _Problem, cfg: TrainConfig, stage: str, progress: bool = False) -> TrainReport:
    _check_train_config(cfg)
    if cfg.weight_decay:
        problem = _with_weight_decay(problem, cfg.weight_decay)
    start = time.perf_counter()
    device = problem.params[0].device
    full_batch = cfg.batch_size is None or cfg.batch_size >= problem.n
    opt = torch.optim.Adam(problem.params, lr=cfg.lr)
    steps = (
        range(cfg.steps)
        if full_batch or cfg.batch_size is None
        else _batches(problem.n, cfg.batch_size, cfg.steps, cfg.seed)
    )
    every = max(1, cfg.steps // 100)  # the loss shown on the bar: a device sync, so not every step
    with progress_bar(cfg.steps, stage, enabled=progress and cfg.steps > 0, unit="step") as bar:
        for step, idx in enumerate(steps):
            loss = problem.full() if full_batch else problem.batch(idx.to(device))
            opt.step()
            if progress and step % every == 0:
                bar.set_postfix(loss=f"{float(loss):.4g}", refresh=False)
            bar.update()
    evals = 0
    if cfg.polish_iters > 0:
        evals = _polish(problem, cfg, stage, progress)
    final = float(problem.full())
    report = TrainReport(
        stage,
        problem.n,
        cfg.steps,
        evals,
        final,
        problem.grad_norm(),
        problem.param_norm(),
        time.perf_counter() - start,
    )
    problem.zero_grad()
    if not math.isfinite(final):
        raise FloatingPointError(f"{stage} diverged (loss {final}); lower the learning rate in the {stage} config")
    return report


def _polish(problem: _Problem, cfg: TrainConfig, stage: str, progress: bool = False) -> int:
    """Full-batch L-BFGS with a strong Wolfe line search; returns the objective evaluations used."""
    opt = torch.optim.LBFGS(
        problem.params,
        lr=1.0,
        max_iter=cfg.polish_iters,
        max_eval=2 * cfg.polish_iters,
        tolerance_grad=cfg.polish_tol,
        tolerance_change=0.0,  # stop on the gradient tolerance or the iteration cap, not on tiny steps
        history_size=50,
        line_search_fn="strong_wolfe",
    )
    with progress_bar(2 * cfg.polish_iters, f"{stage} L-BFGS polish", enabled=progress, unit="eval") as bar:

        def closure() -> torch.Tensor:
            loss = problem.full()
            bar.set_postfix(loss=f"{float(loss):.4g}", refresh=False)
            bar.update()
            return loss

        opt.step(closure if progress else problem.full)
        bar.total = bar.n  # L-BFGS stops early on the gradient tolerance: the bar ends full
    return int(opt.state[opt._params[0]]["func_evals"])


# --- the two stages ------------------------------------------------------------------


def _tensors(model: nn.Module, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    ref = next(model.parameters())
    x, y = dataset.tensors
    return x.to(device=ref.device, dtype=ref.dtype), y.to(ref.device)


def _copy_with(model: TwoStageNet, init: Mapping[str, torch.Tensor] | None) -> TwoStageNet:
    model = copy.deepcopy(model)
    if init is not None:
        model.load_state_dict(init)
    return model


def pretrain(
    model: TwoStageNet,
    data: TwoStageData,
    cfg: TrainConfig,
    *,
    init: Mapping[str, torch.Tensor] | None = None,
    weights: torch.Tensor | None = None,
    progress: bool = False,
) -> tuple[TwoStageNet, TrainReport]:
    """Minimise G over all parameters, starting from ``model`` (or ``init`` weights).

    Returns a trained copy; ``model`` is not modified. ``weights`` (one per
    pretraining example) turns the objective into ``(1/m) sum_i w_i CE_i``.
    ``progress``: a progress bar with the step and the loss.
    """
    model = _copy_with(model, init)
    x, y = _tensors(model, data.pretrain_train)
    if weights is not None:
        if weights.shape != (len(y),):
            raise ValueError(
                f"weights must have one entry per pretraining example ({len(y)}), got shape {tuple(weights.shape)}"
            )
        weights = weights.to(x)

    def example_sum(idx: torch.Tensor) -> torch.Tensor:
        ce = nnf.cross_entropy(model(x[idx]), y[idx], reduction="none")
        return (ce if weights is None else weights[idx] * ce).sum()

    problem = _Problem([p for p in model.parameters()], len(y), example_sum)
    return model, _optimise(problem, cfg, "pretrain", progress)


def finetune(
    ft_model: TwoStageNet,
    data: TwoStageData,
    cfg: TrainConfig,
    mode: str = "fixed",
    alpha: float = 0.01,
    w_star: Mapping[str, torch.Tensor] | None = None,
    *,
    init: Mapping[str, torch.Tensor] | None = None,
    progress: bool = False,
) -> tuple[TwoStageNet, TrainReport]:
    """Minimise F on the finetuning set; returns a trained copy of ``ft_model``.

    ``w_star``: the pretrained embedding (``embedding_state(pretrained)``); None takes
    the embedding the model starts with. ``fixed``: the embedding is set to ``w_star``
    and never trained (only ``head.*`` moves). ``updated``: every parameter trains
    from its starting value on ``mean CE + alpha ||W - W*||^2``. To resume after
    retraining the pretrained model (leave-one-out), pass the old finetuned model and
    the new ``w_star``.
    """
    _check_mode(mode, alpha)
    model = _copy_with(ft_model, init)
    if w_star is None:
        w_star = embedding_state(model)
    else:
        w_star = {n: w.detach().clone() for n, w in w_star.items()}
        proximity(model, w_star)  # fails early with a clear message on a name mismatch
    x, y = _tensors(model, data.finetune_train)
    if mode == "fixed":
        with torch.no_grad():
            for name, p in model.embedding.named_parameters():
                p.copy_(w_star[f"{EMBEDDING}.{name}"])
            # The embedding is frozen, so its outputs are computed once, not every step.
            feats = torch.cat([model.embedding(x[i : i + CHUNK]) for i in range(0, len(x), CHUNK)])

        def example_sum(idx: torch.Tensor) -> torch.Tensor:
            return nnf.cross_entropy(model.head(feats[idx]), y[idx], reduction="sum")

        problem = _Problem(list(model.head.parameters()), len(y), example_sum)
    else:
        w_star = {n: w.to(x) for n, w in w_star.items()}

        def example_sum(idx: torch.Tensor) -> torch.Tensor:
            return nnf.cross_entropy(model(x[idx]), y[idx], reduction="sum")

        problem = _Problem(list(model.parameters()), len(y), example_sum, lambda: alpha * proximity(model, w_star))
    return model, _optimise(problem, cfg, f"finetune ({mode})", progress)


# --- cached two-stage training ---------------------------------------------------------


def settings_key(settings: Mapping) -> str:
    """Short sha256 of the canonical JSON of ``settings``."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def pretrain_settings(data: TwoStageData, model_cfg: ModelConfig, pre_cfg: TrainConfig) -> dict:
    # Only what the pretrained weights depend on, so finetuning sweeps reuse them.
    return {
        "stage": "pretrain",
        "version": CACHE_VERSION,
        "data": {"name": data.name, "classes": list(data.pretrain_classes), "digest": data.pretrain_digest},
        "model": asdict(model_cfg),
        "train": asdict(pre_cfg),
    }


def finetune_settings(
    data: TwoStageData, pretrain_key: str, model_cfg: ModelConfig, ft_cfg: TrainConfig, mode: str, alpha: float
) -> dict:
    return {
        "stage": "finetune",
        "version": CACHE_VERSION,
        "pretrain": pretrain_key,
        "data": {"name": data.name, "classes": list(data.finetune_classes), "digest": data.finetune_digest},
        "model": asdict(model_cfg),
        "train": asdict(ft_cfg),
        "mode": mode,
        "alpha": float(alpha) if mode == "updated" else None,  # alpha is unused when fixed
    }


def _load_cached(path: Path, fresh: TwoStageNet) -> tuple[TwoStageNet, TrainReport] | None:
    """Cached weights loaded into a copy of ``fresh`` (left untouched), or None on a miss."""
    if not path.is_file():
        return None
    model = copy.deepcopy(fresh)
    try:
        blob = torch.load(path, map_location=next(model.parameters()).device, weights_only=True)
        report = TrainReport(**blob["report"])
        model.load_state_dict(blob["state_dict"])
    except Exception as e:  # unreadable or from another version: retrain and overwrite
        warnings.warn(f"ignoring unreadable cache file {path} ({type(e).__name__}: {e}); retraining", stacklevel=2)
        return None
    return model, report


def atomic_save(path: Path, blob: dict) -> None:
    """``torch.save`` to a temporary file renamed into place: a killed run or a parallel
    job never reads a half-written cache file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)


def _save_cached(path: Path, model: TwoStageNet, report: TrainReport, settings: dict) -> None:
    blob = {
        "state_dict": model.state_dict(),
        "report": asdict(report),
        "settings": json.dumps(settings, sort_keys=True),
    }
    atomic_save(path, blob)


def train_two_stage(
    data: TwoStageData,
    model_cfg: ModelConfig,
    pre_cfg: TrainConfig,
    ft_cfg: TrainConfig,
    mode: str = "fixed",
    alpha: float = 0.01,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    device: torch.device | str = "cpu",
) -> tuple[TwoStageNet, TwoStageNet, TwoStageInfo]:
    """Pretrain, then finetune; each stage is loaded from ``cache_dir/<key>.pt`` when the
    same settings were trained before (None: no cache). ``progress``: a bar per stage
    that trains. ``device``: where the models train and live (weights trained on another
    kind of device are cached apart: their last bits differ)."""
    _check_mode(mode, alpha)
    device = torch.device(device)
    pre_settings = pretrain_settings(data, model_cfg, pre_cfg)
    if device.type != "cpu":  # CPU keys stay as they were, so existing caches still hit
        pre_settings["device"] = device.type
    pre_key = settings_key(pre_settings)
    ft_settings = finetune_settings(data, pre_key, model_cfg, ft_cfg, mode, alpha)
    ft_key = settings_key(ft_settings)
    cache = Path(cache_dir) if cache_dir is not None else None

    fresh = build_from_config(model_cfg, len(data.pretrain_classes)).to(device)
    hit = _load_cached(cache / f"{pre_key}.pt", fresh) if cache else None
    pre_cached = hit is not None
    if hit is not None:
        pretrained, pre_report = hit
    else:
        pretrained, pre_report = pretrain(fresh, data, pre_cfg, progress=progress)
        if cache:
            _save_cached(cache / f"{pre_key}.pt", pretrained, pre_report, pre_settings)

    fresh = finetune_model_from(pretrained, len(data.finetune_classes), model_cfg.seed)
    hit = _load_cached(cache / f"{ft_key}.pt", fresh) if cache else None
    ft_cached = hit is not None
    if hit is not None:
        finetuned, ft_report = hit
    else:
        finetuned, ft_report = finetune(
            fresh, data, ft_cfg, mode, alpha, embedding_state(pretrained), progress=progress
        )
        if cache:
            _save_cached(cache / f"{ft_key}.pt", finetuned, ft_report, ft_settings)
    info = TwoStageInfo(pre_key, ft_key, pre_report, ft_report, pre_cached, ft_cached)
    return pretrained, finetuned, info


# --- checks --------------------------------------------------------------------------


def _check_mode(mode: str, alpha: float) -> None:
    if mode not in MODES:
        raise ValueError(f"finetune mode must be one of {MODES}, got {mode!r}")
    if not (alpha >= 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")


def _check_train_config(cfg: TrainConfig) -> None:
    if cfg.steps < 0 or cfg.polish_iters < 0:
        raise ValueError(f"steps and polish_iters must be >= 0, got {cfg.steps} and {cfg.polish_iters}")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or null (full batch), got {cfg.batch_size}")
    if not cfg.lr > 0:
        raise ValueError(f"lr must be > 0, got {cfg.lr}")
    if cfg.weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {cfg.weight_decay}")
