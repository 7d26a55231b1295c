"""Matrix-free curvature: Hessian-, Gauss-Newton- and mixed-block-vector products.

All products are of the empirical loss ``L(θ) = mean_i loss(model(x_i; θ), y_i)`` over
a fixed sample held in memory (SPEC's subsampled Hessian), restricted to one block of
parameters with the rest held at their values. They are built from ``torch.func``
(forward-over-reverse: ``jvp`` of ``grad``), streamed over the sample in chunks so
memory is bounded by the chunk, and accept one vector ``[P]`` or a stack ``[k, P]``
(the stack is ``vmap``-ed, one pass per chunk for all ``k`` vectors).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from .batching import Batch
from .params import ParamBlock, Params

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(outputs, targets) -> mean loss over the batch`` (cross-entropy by default)."""


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs, targets)


@dataclass
class Objective:
    """``L(θ)`` = mean loss of ``model`` with parameters ``params`` over ``batch``.

    ``params`` holds every trainable parameter (the point where derivatives are
    taken); products are taken with respect to a :class:`ParamBlock` of them.
    """

    model: nn.Module
    loss_fn: LossFn
    params: Params
    batch: Batch
    chunk_size: int = 256

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

    def _loss(self, blocks: tuple[ParamBlock, ...], flats: tuple[torch.Tensor, ...], x, y) -> torch.Tensor:
        overrides: Params = {}
        for b, f in zip(blocks, flats):
            overrides.update(b.unflatten(f))
        return self.loss_fn(self._forward(overrides, x), y)

    def _chunks(self, batch: Batch | None):
        batch = self.batch if batch is None else batch
        n = len(batch)
        for chunk in batch.chunks(self.chunk_size):
            yield chunk, len(chunk) / n

    # -- first order ---------------------------------------------------------------
    def value(self, batch: Batch | None = None) -> torch.Tensor:
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for c, w in self._chunks(batch):
            total = total + w * self._loss((), (), c.x, c.y).detach()
        return total

    def gradient(self, block: ParamBlock, batch: Batch | None = None) -> torch.Tensor:
        theta = self.point(block)
        total = torch.zeros_like(theta)
        g = grad(lambda f, x, y: self._loss((block,), (f,), x, y))
        for c, w in self._chunks(batch):
            total += w * g(theta, c.x, c.y)
        return total

    # -- second order --------------------------------------------------------------
    def _batched(self, fn: Callable[[torch.Tensor, Batch], torch.Tensor], v: torch.Tensor, batch: Batch | None) -> torch.Tensor:
        if v.dim() not in (1, 2):
            raise ValueError(f"expected a vector [P] or a stack [k, P], got shape {tuple(v.shape)}")
        total = None
        for c, w in self._chunks(batch):
            out = fn(v, c) if v.dim() == 1 else vmap(lambda vv: fn(vv, c))(v)
            total = w * out if total is None else total + w * out
        return total.detach()

    def hvp(self, block: ParamBlock, v: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        """``∇²_{block} L · v``."""
        theta = self.point(block)
        g = grad(lambda f, x, y: self._loss((block,), (f,), x, y))
        return self._batched(lambda vv, c: jvp(lambda f: g(f, c.x, c.y), (theta,), (vv,))[1], v, batch)

    def ggn_vp(self, block: ParamBlock, v: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        """Generalised Gauss-Newton ``Jᵀ (∇²_out loss) J · v``: positive semi-definite
        for convex losses such as cross-entropy, whatever the network."""
        theta = self.point(block)

        def one(vv: torch.Tensor, c: Batch) -> torch.Tensor:
            net = lambda f: self._forward(block.unflatten(f), c.x)  # noqa: E731
            out, jv = jvp(net, (theta,), (vv,))
            hjv = jvp(grad(lambda o: self.loss_fn(o, c.y)), (out,), (jv,))[1]
            return vjp(net, theta)[1](hjv)[0]

        return self._batched(one, v, batch)

    def mixed_vp(self, rows: ParamBlock, cols: ParamBlock, v: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        """``∇²_{rows, cols} L · v``: ``v`` lives on ``cols``, the result on ``rows``
        (SPEC's ``∇²_WΘ F · v`` is ``mixed_vp(W, Θ, v)``)."""
        a, b = self.point(rows), self.point(cols)
        g_rows = grad(lambda fa, fb, x, y: self._loss((rows, cols), (fa, fb), x, y), argnums=0)
        return self._batched(lambda vv, c: jvp(lambda fb: g_rows(a, fb, c.x, c.y), (b,), (vv,))[1], v, batch)


@dataclass
class CurvatureOperator:
    """The damped curvature ``v ↦ (∇²_{block} L + D) v`` as a linear operator.

    ``damping`` is a scalar ``λ`` (``D = λI``) or a vector of per-coordinate shifts
    (SPEC's ``2α·P_W + λ_ft·I`` for the embedding-updated finetune Hessian).
    ``gauss_newton=True`` replaces the Hessian by the GGN. ``num_products`` counts
    Hessian-vector products (a ``[k, P]`` stack counts ``k``).
    """

    objective: Objective
    block: ParamBlock
    damping: float | torch.Tensor = 0.0
    gauss_newton: bool = False
    num_products: int = field(default=0, init=False)
    accepts_stack = True  # multiplies a stack [k, P] in one call (see solvers.as_stack_operator)

    @property
    def size(self) -> int:
        return self.block.numel

    @property
    def dtype(self) -> torch.dtype:
        return self.objective.dtype

    @property
    def shape(self) -> tuple[int, int]:
        return (self.size, self.size)

    def _apply(self, v: torch.Tensor, batch: Batch | None) -> torch.Tensor:
        if v.shape[-1] != self.size:
            raise ValueError(f"operator acts on vectors of size {self.size}, got shape {tuple(v.shape)}")
        v = v.to(dtype=self.dtype, device=self.objective.device)
        self.num_products += 1 if v.dim() == 1 else v.shape[0]
        product = self.objective.ggn_vp if self.gauss_newton else self.objective.hvp
        return product(self.block, v, batch) + self.damping * v

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self._apply(v, None)

    def minibatch(self, batch_size: int, generator: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
        """A product over a fresh random minibatch of the Hessian sample (for LiSSA's
        stochastic recursion); ``batch_size >= len(sample)`` gives the full product."""
        batch = self.objective.batch
        if batch_size >= len(batch):
            return self
        idx = torch.randperm(len(batch), generator=generator)[:batch_size].to(batch.x.device)
        mini = Batch(batch.x[idx], batch.y[idx])

        def product(v: torch.Tensor) -> torch.Tensor:
            return self._apply(v, mini)

        product.accepts_stack = True  # type: ignore[attr-defined]
        return product
