"""Per-example derivatives: test-loss gradients and ``sᵀ∇g(z)`` over a whole dataset.

After the solves, a score is the directional derivative of one example's loss along a
query vector ``s``. Two ways to get it for a batch of examples:

- ``"jvp"``: one forward-mode pass of the per-example losses along each ``s``
  (``torch.func.jvp``, ``vmap``-ed over the ``k`` query vectors); costs about ``k``
  forward passes and stores no per-example gradient.
- ``"grad"``: per-example gradients ``[B, P]`` (``vmap(grad)``) times the stacked
  ``S [k, P]``; one backward pass whatever ``k``, but ``B × P`` memory.

``"auto"`` uses ``jvp`` up to ``jvp_max_queries`` queries (see docs/benchmarks.md for
the measured cross-over) and ``grad`` beyond.

A gradient-checkpointed model (saved tensor hooks, which ``torch.func``'s reverse mode
refuses) gets its per-example gradients from ``torch.autograd``, one example at a time;
``jvp`` scoring needs no reverse mode and runs as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
from torch import nn
from torch.func import grad, jvp, vmap

from .batching import Batch, SizedDataset, iter_batches
from .objective import ADMode, autograd_grad, load_forward_ad, no_forward_ad, reason, saved_tensor_hooks
from .params import ParamBlock, Params
from .progress import progress_bar
from .task import Forward, LossFn, Task, check_batch, check_labels, cross_entropy, mean_loss, outputs, probe

ScoringMethod = Literal["auto", "jvp", "grad"]

# what vmap raises for a model it cannot batch (data-dependent control flow, an op without a batching rule)
_NOT_BATCHABLE = (RuntimeError, NotImplementedError, ValueError)


@dataclass(frozen=True)
class PerExample:
    """Per-example losses of ``model`` at ``params`` as a function of one block: the
    loss of :mod:`lissa_influence.task` on one-example batches, ``vmap``-ed over a batch.

    A model that ``vmap`` cannot batch (data-dependent control flow) is run example by
    example instead, with ``ad_mode="auto"`` a loss without a forward-mode derivative
    is scored from per-example gradients, and a model that ``torch.func`` cannot
    differentiate (gradient checkpointing) gets them from ``torch.autograd``; all with the
    same results, up to rounding. ``fallbacks`` records which of them happened and why
    (``"loop"``, ``"reverse"``, ``"autograd"``).

    Args:
        model: the model.
        loss_fn: the loss.
        params: every trainable parameter, by name.
        block: the block the gradients are taken in.
        forward: the model's forward (None: ``model(x)``).
        ad_mode: ``"auto"``, ``"forward"`` or ``"reverse"``.
        fallbacks: what ran otherwise than asked, and why (filled as it runs).
    """

    model: nn.Module
    loss_fn: LossFn
    params: Params
    block: ParamBlock
    forward: Forward | None = None
    ad_mode: ADMode = "auto"
    fallbacks: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    _worked: set[str] = field(default_factory=set, compare=False, repr=False)  # paths that ran once: no fallback
    _seen: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # a probe's outputs, per dataset

    @classmethod
    def from_task(
        cls, model: nn.Module, task: Task, params: Params, block: ParamBlock, ad_mode: ADMode = "auto"
    ) -> PerExample:
        """The per-example losses of ``task`` (its forward and loss) for ``model`` at ``params``.

        Args:
            model: the model.
            task: the forward and the loss.
            params: every trainable parameter, by name.
            block: the block the gradients are taken in.
            ad_mode: forward- or reverse-mode derivatives (:data:`~lissa_influence.objective.ADMode`).

        Returns:
            The :class:`PerExample`.
        """
        return cls(model, task.loss, params, block, task.forward, ad_mode)

    @property
    def task(self) -> Task:
        """The forward and the loss as one :class:`~lissa_influence.task.Task`."""
        return Task(self.loss_fn, self.forward)

    def _loss_one(self, flat: torch.Tensor, example: Any, pair: bool) -> torch.Tensor:
        """The loss of one example (its tensors without the batch dimension, as ``vmap`` passes them)."""
        one = Batch(*example) if pair else Batch(example)
        return self._loss_of(flat, one.map(lambda t: t.unsqueeze(0)))

    def _loss_of(self, flat: torch.Tensor, batch: Batch) -> torch.Tensor:
        out = outputs(self.model, {**self.params, **self.block.unflatten(flat)}, batch, self.forward)
        return mean_loss(self.loss_fn, out, batch, self.forward)

    def _fallback(self, kind: str, error: BaseException) -> None:
        self.fallbacks[kind] = reason(error)

    def _per_example(
        self, batched: Callable[[], torch.Tensor], looped: Callable[[int], torch.Tensor], n: int
    ) -> torch.Tensor:
        """``batched()`` (vmap over the examples), or example by example where vmap cannot
        batch the model. The loop is adopted only once it succeeded, so that an error of
        another kind (no forward-mode derivative, under a jvp) is raised as it is."""
        if "loop" in self.fallbacks:
            return torch.stack([looped(i) for i in range(n)])
        try:
            return batched()
        except _NOT_BATCHABLE as e:
            if isinstance(e, torch.OutOfMemoryError) or saved_tensor_hooks(e):  # not a batching problem
                raise
            try:
                result = torch.stack([looped(i) for i in range(n)])
            except Exception:
                raise e from None
            self._fallback("loop", e)
            return result

    def losses(self, flat: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Each example's loss.

        Args:
            flat: the block's parameters as one flat vector.
            batch: the examples.

        Returns:
            ``[B]``.
        """
        return self._per_example(
            lambda: vmap(partial(self._loss_one, pair=batch.pair), in_dims=(None, 0))(flat, batch.tree),
            lambda i: self._loss_of(flat, batch.select(slice(i, i + 1))),
            len(batch),
        )

    def gradients(self, batch: Batch) -> torch.Tensor:
        """The gradient of each example's loss in the block.

        Args:
            batch: the examples.

        Returns:
            ``[B, P]``.
        """
        theta = self.block.flatten(self.params)
        if "autograd" not in self.fallbacks:
            try:
                return self._per_example(
                    lambda: vmap(grad(partial(self._loss_one, pair=batch.pair)), in_dims=(None, 0))(theta, batch.tree),
                    lambda i: grad(self._loss_of)(theta, batch.select(slice(i, i + 1))),
                    len(batch),
                )
            except RuntimeError as e:
                if not saved_tensor_hooks(e):
                    raise
                self._fallback("autograd", e)
        with torch.enable_grad():
            rows = []
            for i in range(len(batch)):
                f = theta.detach().requires_grad_(True)
                rows.append(autograd_grad([self._loss_of(f, batch.select(slice(i, i + 1)))], [f])[0].detach())
        return torch.stack(rows) if rows else theta.new_zeros(0, theta.numel())

    def directional(
        self, batch: Batch, S: torch.Tensor, method: ScoringMethod = "auto", jvp_max_queries: int = 3
    ) -> torch.Tensor:
        """``S[i]ᵀ ∇loss(example j)``.

        Args:
            batch: the examples.
            S: ``[k, P]`` directions (query vectors).
            method: ``"jvp"`` (forward-mode directional derivatives), ``"grad"`` (per-example
                gradients) or ``"auto"`` (jvp up to ``jvp_max_queries`` directions).
            jvp_max_queries: where ``"auto"`` changes to per-example gradients.

        Returns:
            ``[k, B]``.
        """
        if method == "auto":
            method = "jvp" if S.shape[0] <= jvp_max_queries else "grad"
        if method not in ("jvp", "grad"):
            raise ValueError(f"unknown scoring method {method!r}; use 'auto', 'jvp' or 'grad'")
        if method == "jvp" and self.ad_mode != "reverse" and "reverse" not in self.fallbacks:
            load_forward_ad()
            theta = self.block.flatten(self.params)
            along = lambda s: jvp(lambda f: self.losses(f, batch), (theta,), (s,))[1]  # noqa: E731
            try:
                result = vmap(along)(S)
            except Exception as e:  # decided once: after jvp has run, an error is an error
                if "jvp" in self._worked or self.ad_mode == "forward" or not no_forward_ad(e):
                    raise
                self._fallback("reverse", e)  # the same numbers from per-example gradients
            else:
                self._worked.add("jvp")
                return result
        return S @ self.gradients(batch).T


def loss_gradients(per_example: PerExample, data: SizedDataset, batch_size: int, mean: bool) -> torch.Tensor:
    """Gradients of the test losses.

    Args:
        per_example: the losses.
        data: the test examples.
        batch_size: examples per batch.
        mean: the gradient of their mean instead.

    Returns:
        ``[n_test, P]``, or ``[1, P]`` of their mean.
    """
    dtype, device = _dtype_device(per_example.params)
    rows: list[torch.Tensor] = []
    for b in iter_batches(data, batch_size, dtype, device):
        _check(per_example, b, "test data", first=not rows)
        rows.append(per_example.gradients(b))
    g = torch.cat(rows)
    if not torch.isfinite(g).all():
        bad = (~torch.isfinite(g).all(1)).nonzero().squeeze(1).tolist()
        raise FloatingPointError(
            f"test-loss gradients are NaN or inf for test points {bad[:10]}; check those inputs and the model"
        )
    return g.mean(0, keepdim=True) if mean else g


def score_dataset(
    per_example: PerExample,
    data: SizedDataset,
    S: torch.Tensor,
    batch_size: int = 256,
    method: ScoringMethod = "auto",
    jvp_max_queries: int = 3,
    start: int = 0,
    stop: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """``S[i]ᵀ ∇loss(z_j)`` for every example ``z_j`` of ``data[start:stop]``.

    Streamed in batches, so memory does not grow with ``n``.

    Args:
        per_example: the losses.
        data: the examples to score.
        S: ``[k, P]`` query vectors.
        batch_size: examples per batch.
        method: as :meth:`PerExample.directional`.
        jvp_max_queries: as :meth:`PerExample.directional`.
        start: the first example.
        stop: one past the last (None: the end).
        progress: show a progress bar.

    Returns:
        ``[k, stop − start]``.
    """
    dtype, device = _dtype_device(per_example.params)
    S = S.to(dtype=dtype, device=device)
    stop = len(data) if stop is None else stop
    out = []
    bar = progress_bar(stop - start, "scoring", enabled=progress, unit="ex")
    for lo, b in zip(
        range(start, stop, batch_size), iter_batches(data, batch_size, dtype, device, start, stop), strict=True
    ):
        if len(b):
            _check(per_example, b, "scored data", first=lo == start)
        d = per_example.directional(b, S, method, jvp_max_queries).detach()
        if not torch.isfinite(d).all():
            bad = (~torch.isfinite(d).all(0)).nonzero().squeeze(1)
            raise FloatingPointError(
                f"scores are NaN or inf for examples {(bad + lo).tolist()[:10]}; "
                "check those inputs (NaN pixels?) and the model's parameters"
            )
        out.append(d)
        bar.update(len(b))
    bar.close()
    if not out:  # an empty range (e.g. a rank's share of fewer examples than ranks)
        return S.new_zeros(S.shape[0], 0)
    return torch.cat(out, dim=1)


def _check(per_example: PerExample, batch: Batch, what: str, first: bool) -> None:
    """The structure of every batch; the first one also through the model and the loss
    (the shapes do not change between batches); the labels of every batch, for the
    default cross-entropy, against the classes the first one showed."""
    check_batch(batch, per_example.forward, what)
    if first:
        per_example._seen[what] = probe(per_example.model, per_example.params, batch, per_example.task, what)
    elif per_example.forward is None and per_example.loss_fn is cross_entropy and what in per_example._seen:
        check_labels(batch, per_example._seen[what], what)


def _dtype_device(params: Params) -> tuple[torch.dtype, torch.device]:
    t = next(iter(params.values()))
    return t.dtype, t.device
