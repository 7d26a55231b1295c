"""Matrix-free curvature: Hessian-, Gauss-Newton- and mixed-block-vector products.

All products are of the empirical loss ``L(θ) = mean_i loss(model(x_i; θ), y_i)`` over
a fixed sample held in memory (the subsampled Hessian of docs/math.md), restricted to one block of
parameters with the rest held at their values. They are built from ``torch.func``
(forward-over-reverse: ``jvp`` of ``grad``), streamed over the sample in chunks so
memory is bounded by the chunk, and accept one vector ``[P]`` or a stack ``[k, P]``
(the stack is ``vmap``-ed, one pass per chunk for all ``k`` vectors).

Distributed (:mod:`lissa_influence.distributed`): an :class:`Objective` may hold one
rank's shard of the sample; each chunk is then weighted by its size over the whole
sample (``sample_size``) and ``reduce`` sums the ranks' partial results.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from .batching import Batch
from .operators import LinearOperator
from .params import ParamBlock, Params


@functools.cache
def load_forward_ad() -> None:
    """Let torch load its forward-mode AD decompositions, once, before our first ``jvp``.

    torch scripts them on first use and warns that ``torch.jit.script`` is deprecated:
    harmless, and nothing a user of this package can act on. That one warning is silenced
    here, for this one load; every other warnings filter stays as the program set it.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        jvp(torch.sin, (torch.zeros(1),), (torch.ones(1),))


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(outputs, targets) -> mean loss over the batch`` (cross-entropy by default)."""


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs, targets)


@dataclass
class Objective:
    """``L(θ)`` = mean loss of ``model`` with parameters ``params`` over ``batch``.

    ``params`` holds every trainable parameter (the point where derivatives are
    taken); products are taken with respect to a :class:`ParamBlock` of them.

    Sharded sample (one rank of several): ``batch`` is this rank's slice
    ``[sample_offset, sample_offset + len(batch))`` of a sample of ``sample_size``
    examples, and ``reduce`` (e.g. :func:`~lissa_influence.distributed.all_reduce_sum`)
    sums the ranks' partial results, so every rank gets the product over the whole
    sample. The defaults (``sample_size=None`` = ``len(batch)``, no ``reduce``) are the
    single-process objective. A ``batch`` passed explicitly to a method is a plain local
    sample: its mean, not reduced.
    """

    model: nn.Module
    loss_fn: LossFn
    params: Params
    batch: Batch
    chunk_size: int = 256
    sample_size: int | None = None
    sample_offset: int = 0
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def total(self) -> int:
        """Size of the whole sample (over all ranks)."""
        return len(self.batch) if self.sample_size is None else self.sample_size

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def point(self, block: ParamBlock) -> torch.Tensor:
        return block.flatten(self.params)

    # -- the loss as a function of flat blocks -----------------------------------
    def _forward(self, overrides: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, {**self.params, **overrides}, (x,))

    def _loss(
        self, blocks: tuple[ParamBlock, ...], flats: tuple[torch.Tensor, ...], x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        overrides: Params = {}
        for b, f in zip(blocks, flats, strict=True):
            overrides.update(b.unflatten(f))
        return self.loss_fn(self._forward(overrides, x), y)

    def _chunks(self, batch: Batch | None) -> Iterator[tuple[Batch, float]]:
        batch, n = (self.batch, self.total) if batch is None else (batch, len(batch))
        for chunk in batch.chunks(self.chunk_size):
            yield chunk, len(chunk) / n

    def _reduced(self, total: torch.Tensor, batch: Batch | None) -> torch.Tensor:
        return self.reduce(total) if self.reduce is not None and batch is None else total

    def restricted(self, indices: torch.Tensor) -> Objective:
        """The objective over the examples at ``indices`` of the whole sample (a
        minibatch): this rank keeps those in its shard, in the order given; weights and
        the reduction are over all of them."""
        lo = self.sample_offset
        local = indices[(indices >= lo) & (indices < lo + len(self.batch))] - lo
        local = local.to(self.batch.x.device)
        mini = Batch(self.batch.x[local], self.batch.y[local])
        return dataclasses.replace(self, batch=mini, sample_size=len(indices), sample_offset=0)

    # -- first order ---------------------------------------------------------------
    def value(self, batch: Batch | None = None) -> torch.Tensor:
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for c, w in self._chunks(batch):
            total = total + w * self._loss((), (), c.x, c.y).detach()
        return self._reduced(total, batch)

    def gradient(self, block: ParamBlock, batch: Batch | None = None) -> torch.Tensor:
        theta = self.point(block)
        total = torch.zeros_like(theta)
        g = grad(lambda f, x, y: self._loss((block,), (f,), x, y))
        for c, w in self._chunks(batch):
            total += w * g(theta, c.x, c.y)
        return self._reduced(total, batch)

    # -- second order --------------------------------------------------------------
    def _batched(
        self, fn: Callable[[torch.Tensor, Batch], torch.Tensor], v: torch.Tensor, batch: Batch | None, out_size: int
    ) -> torch.Tensor:
        if v.dim() not in (1, 2):
            raise ValueError(f"expected a vector [P] or a stack [k, P], got shape {tuple(v.shape)}")
        load_forward_ad()
        total = None
        for c, w in self._chunks(batch):
            out = fn(v, c) if v.dim() == 1 else vmap(lambda vv: fn(vv, c))(v)  # noqa: B023 (called at once)
            total = w * out if total is None else total + w * out
        if total is None:  # an empty shard (more ranks than examples): contributes zero
            total = v.new_zeros(*v.shape[:-1], out_size)
        return self._reduced(total.detach(), batch)

    def hvp(self, block: ParamBlock, v: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        """``∇²_{block} L · v``."""
        theta = self.point(block)
        g = grad(lambda f, x, y: self._loss((block,), (f,), x, y))
        return self._batched(lambda vv, c: jvp(lambda f: g(f, c.x, c.y), (theta,), (vv,))[1], v, batch, block.numel)

    def ggn_vp(self, block: ParamBlock, v: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        """Generalised Gauss-Newton ``Jᵀ (∇²_out loss) J · v``: positive semi-definite
        for convex losses such as cross-entropy, whatever the network."""
        theta = self.point(block)

        def one(vv: torch.Tensor, c: Batch) -> torch.Tensor:
            def net(f: torch.Tensor) -> torch.Tensor:
                return self._forward(block.unflatten(f), c.x)

            def loss(o: torch.Tensor) -> torch.Tensor:
                return self.loss_fn(o, c.y)

            out, jv = jvp(net, (theta,), (vv,))[:2]
            hjv = jvp(grad(loss), (out,), (jv,))[1]
            return vjp(net, theta)[1](hjv)[0]

        return self._batched(one, v, batch, block.numel)

    def mixed_vp(self, rows: ParamBlock, cols: ParamBlock, v: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        """``∇²_{rows, cols} L · v``: ``v`` lives on ``cols``, the result on ``rows``
        (the ``∇²_WΘ F · v`` of docs/math.md is ``mixed_vp(W, Θ, v)``)."""
        a, b = self.point(rows), self.point(cols)
        g_rows = grad(lambda fa, fb, x, y: self._loss((rows, cols), (fa, fb), x, y), argnums=0)
        return self._batched(
            lambda vv, c: jvp(lambda fb: g_rows(a, fb, c.x, c.y), (b,), (vv,))[1], v, batch, rows.numel
        )


@dataclass(eq=False)
class CurvatureOperator(LinearOperator):
    """The damped curvature ``v ↦ (∇²_{block} L + D) v`` as a :class:`~lissa_influence.operators.LinearOperator`.

    ``damping`` is a scalar ``λ`` (``D = λI``) or a vector of per-coordinate shifts
    (``2α·P_W + λ_ft·I`` for the embedding-updated finetune Hessian, docs/math.md).
    ``gauss_newton=True`` replaces the Hessian by the GGN. ``num_products`` counts
    Hessian-vector products (a ``[k, P]`` stack counts ``k``). It can draw minibatches of
    its Hessian sample (:meth:`minibatch`, for LiSSA's stochastic recursion).
    """

    objective: Objective
    block: ParamBlock
    damping: float | torch.Tensor = 0.0
    gauss_newton: bool = False
    num_products: int = field(default=0, init=False)

    @property
    def size(self) -> int:
        return self.block.numel

    @property
    def dtype(self) -> torch.dtype:
        return self.objective.dtype

    @property
    def device(self) -> torch.device:
        return self.objective.device

    @property
    def shape(self) -> tuple[int, int]:
        return (self.size, self.size)

    @property
    def sample_size(self) -> int:  # type: ignore[override]
        """Examples in the Hessian sample (over all ranks)."""
        return self.objective.total

    def _apply(self, v: torch.Tensor, objective: Objective) -> torch.Tensor:
        if v.shape[-1] != self.size:
            raise ValueError(f"operator acts on vectors of size {self.size}, got shape {tuple(v.shape)}")
        v = v.to(dtype=self.dtype, device=self.objective.device)
        self.num_products += 1 if v.dim() == 1 else v.shape[0]
        product = objective.ggn_vp if self.gauss_newton else objective.hvp
        return product(self.block, v) + self.damping * v

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self._apply(v, self.objective)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self._apply(V, self.objective)

    def minibatch(self, batch_size: int, generator: torch.Generator) -> LinearOperator:
        """The operator over a fresh random minibatch of the Hessian sample (for LiSSA's
        stochastic recursion); ``batch_size >= sample_size`` gives the full operator.
        The indices are drawn over the whole sample, so ranks with the same ``generator``
        state agree on the minibatch and each contributes the part in its shard."""
        if batch_size >= self.objective.total:
            return self
        mini = self.objective.restricted(torch.randperm(self.objective.total, generator=generator)[:batch_size])
        return _Minibatch(self, mini)


class _Minibatch(LinearOperator):
    """One drawn minibatch of a :class:`CurvatureOperator` (its products are counted there)."""

    def __init__(self, parent: CurvatureOperator, objective: Objective):
        self.parent, self.objective = parent, objective

    @property
    def shape(self) -> tuple[int, int]:
        return self.parent.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.parent.dtype

    @property
    def device(self) -> torch.device:
        return self.parent.device

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self.parent._apply(v, self.objective)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.parent._apply(V, self.objective)
