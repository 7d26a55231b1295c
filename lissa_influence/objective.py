"""The objective: a loss over a sample, and its matrix-free Hessian-, Gauss-Newton- and mixed-block-vector products.

:class:`Objective` is what every curvature approximation is fitted from
(:mod:`lissa_influence.curvature`, :mod:`lissa_influence.kfac`); the AD-mode helpers at
the top of this module (:func:`load_forward_ad`, :func:`no_forward_ad`,
:func:`saved_tensor_hooks`, :func:`autograd_grad`) are shared with
:mod:`lissa_influence.scoring`.

All products are of the empirical loss ``L(θ) = mean_i loss(model(x_i; θ), y_i)`` (or any
``forward`` and ``loss`` of :mod:`lissa_influence.task`) over
a fixed sample held in memory (the subsampled Hessian of docs/math.md), restricted to one block of
parameters with the rest held at their values. They are built from ``torch.func``
(forward-over-reverse: ``jvp`` of ``grad``; reverse-over-reverse where a loss has no
forward-mode derivative), streamed over the sample in chunks so
memory is bounded by the chunk, and accept one vector ``[P]`` or a stack ``[k, P]``
(the stack is ``vmap``-ed, one pass per chunk for all ``k`` vectors).

Distributed (:mod:`lissa_influence.distributed`): an :class:`Objective` may hold one
rank's shard of the sample; each chunk is then weighted by its size over the whole
sample (``sample_size``) and ``reduce`` sums the ranks' partial results.

Gradient checkpointing (``torch.utils.checkpoint`` without reentrancy) works by saved
tensor hooks, which ``torch.func``'s reverse mode refuses; for such a model every product
and gradient falls back to ``torch.autograd`` (double backward), with the same results up
to rounding (:func:`saved_tensor_hooks`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
import torch.utils.checkpoint
from torch import nn
from torch.func import grad, hessian, jacrev, jvp, vjp, vmap
from torch.utils._pytree import TreeSpec, tree_flatten, tree_leaves, tree_map, tree_unflatten

from .batching import Batch
from .params import ParamBlock, Params
from .task import Forward, LossFn, Task, check_loss_of_outputs, cross_entropy, eval_mode, mean_loss, outputs

__all__ = [
    "ADMode",
    "HVPMode",
    "Objective",
    "autograd_grad",
    "check_gauss_newton",
    "cross_entropy",
    "load_forward_ad",
    "no_forward_ad",
    "saved_tensor_hooks",
]

log = logging.getLogger(__name__)


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


HVPMode = Literal["functional", "retained"]
"""How Hessian-vector products are formed: ``"functional"`` (``torch.func``, nothing kept
between products; :data:`ADMode` picks forward- or reverse-mode) or ``"retained"``: the
gradient's graph is built once per chunk of the sample and kept, and each product is one
backward pass through it (double backward), as long as the kept graphs fit in
``graph_budget`` bytes (else functional, with a log line)."""

ADMode = Literal["auto", "forward", "reverse"]
"""How second derivatives are taken: ``"forward"`` (forward-over-reverse, ``jvp`` of
``grad``), ``"reverse"`` (reverse-over-reverse, ``grad`` of an inner product with
``grad``), or ``"auto"``: forward, and reverse from then on for an objective whose loss or
model has no forward-mode derivative (``F.mse_loss``, ``F.huber_loss`` in torch 2.x)."""

_NO_FORWARD_AD = (RuntimeError, NotImplementedError)


def no_forward_ad(error: BaseException) -> bool:
    """Whether ``error`` can mean "this op has no forward-mode derivative".

    Args:
        error: the error a forward-mode product raised.

    Returns:
        True for a RuntimeError or NotImplementedError that is not an out-of-memory error
        (which a retry in another mode would not cure).
    """
    return isinstance(error, _NO_FORWARD_AD) and not isinstance(error, torch.OutOfMemoryError)


CHECKPOINTING = "the model uses gradient checkpointing (saved tensor hooks), which torch.func cannot differentiate"


def saved_tensor_hooks(error: BaseException) -> bool:
    """Whether ``error`` is ``torch.func`` refusing a model that uses saved tensor hooks.

    Gradient checkpointing without reentrancy uses them; ``torch.autograd`` differentiates
    such a model.

    Args:
        error: the error a product raised.

    Returns:
        True for that refusal.
    """
    return isinstance(error, RuntimeError) and "saved tensor hooks" in str(error)


def reason(error: BaseException) -> str:
    """An error's first line, for a fallback's record.

    Args:
        error: the error.

    Returns:
        ``"Type: first line"``, at most 200 characters of the message.
    """
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"


def autograd_grad(
    out: Sequence[torch.Tensor],
    wrt: Sequence[torch.Tensor],
    along: Sequence[torch.Tensor] | None = None,
    create_graph: bool = False,
) -> list[torch.Tensor]:
    """``Σ_i alongᵢ · ∂outᵢ/∂wrt`` by ``torch.autograd``, with the graph kept (it serves several products).

    Args:
        out: the outputs.
        wrt: the inputs to differentiate with respect to.
        along: the vectors to contract the outputs with (None: ones, for scalar outputs).
        create_graph: keep the result differentiable (for a second derivative).

    Returns:
        One gradient per ``wrt``; zeros where ``wrt`` does not reach ``out``.
    """
    pairs = [(o, a) for o, a in zip(out, along if along is not None else [None] * len(out), strict=True)]
    pairs = [(o, a) for o, a in pairs if o.requires_grad]
    got: Sequence[torch.Tensor | None] = [None] * len(wrt)
    if pairs:
        got = torch.autograd.grad(
            [o for o, _ in pairs],
            list(wrt),
            None if along is None else [a for _, a in pairs],
            retain_graph=True,
            create_graph=create_graph,
            allow_unused=True,
        )
    return [torch.zeros_like(w) if g is None else g for g, w in zip(got, wrt, strict=True)]


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


class _FloatLeaves:
    """A model's outputs split into the floating tensors that curvature differentiates and
    the rest (integer positions, masks, strings), held as they are: ``split`` at each
    forward, ``join`` rebuilds the outputs for the loss."""

    def __init__(self) -> None:
        self.spec: TreeSpec | None = None
        self.floats: list[bool] = []

    def split(self, out: Any) -> tuple[list[torch.Tensor], list[Any]]:
        leaves, self.spec = tree_flatten(out)
        self.floats = [isinstance(t, torch.Tensor) and t.is_floating_point() for t in leaves]
        return [t for t, f in zip(leaves, self.floats, strict=True) if f], [
            t for t, f in zip(leaves, self.floats, strict=True) if not f
        ]

    def join(self, floats: Sequence[torch.Tensor], rest: Sequence[Any]) -> Any:
        assert self.spec is not None
        a, b = iter(floats), iter(rest)
        return tree_unflatten([next(a) if f else next(b) for f in self.floats], self.spec)


def _tree_dot(a: Any, b: Any) -> torch.Tensor:
    """``Σ ⟨a_i, b_i⟩`` over the tensor leaves of two pytrees of the same structure."""
    return cast(torch.Tensor, sum((x * y).sum() for x, y in zip(tree_leaves(a), tree_leaves(b), strict=True)))


@dataclass
class Objective:
    """``L(θ)`` = mean loss of ``model`` with parameters ``params`` over ``batch``.

    ``params`` holds every trainable parameter (the point where derivatives are
    taken); products are taken with respect to a :class:`ParamBlock` of them. The loss of
    a batch is ``loss(forward(model, batch), ...)`` as :mod:`lissa_influence.task` defines
    it (``forward=None``: ``model(x)`` on ``(x, y)`` pairs). ``ad_mode`` picks forward- or
    reverse-mode second derivatives (:data:`ADMode`); ``ad_used`` says which one ran, and
    ``fallbacks`` what ran otherwise than asked and why (``"reverse"``: a loss without
    forward mode; ``"autograd"``: a checkpointed model, differentiated by ``torch.autograd``).

    Sharded sample (one rank of several): ``batch`` is this rank's slice
    ``[sample_offset, sample_offset + len(batch))`` of a sample of ``sample_size``
    examples, and ``reduce`` (e.g. :func:`~lissa_influence.distributed.all_reduce_sum`)
    sums the ranks' partial results, so every rank gets the product over the whole
    sample. The defaults (``sample_size=None`` = ``len(batch)``, no ``reduce``) are the
    single-process objective. A ``batch`` passed explicitly to a method is a plain local
    sample: its mean, not reduced.

    Args:
        model: the model.
        loss_fn: the loss (:mod:`lissa_influence.task`).
        params: every trainable parameter, by name (the point where derivatives are taken).
        batch: the sample (this rank's shard of it).
        chunk_size: examples per chunk of a product.
        sample_size: the whole sample's size (None: ``len(batch)``).
        sample_offset: where this rank's shard starts in the whole sample.
        reduce: sums the ranks' partial results (None: one process).
        forward: the model's forward (None: ``model(x)``).
        ad_mode: ``"auto"``, ``"forward"`` or ``"reverse"`` (:data:`ADMode`).
        hvp_mode: ``"functional"`` or ``"retained"`` (:data:`HVPMode`).
        graph_budget: bytes the retained graphs may take.
    """

    model: nn.Module
    loss_fn: LossFn
    params: Params
    batch: Batch
    chunk_size: int = 256
    sample_size: int | None = None
    sample_offset: int = 0
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    forward: Forward | None = None
    ad_mode: ADMode = "auto"
    hvp_mode: HVPMode = "functional"
    graph_budget: int = 2 * 2**30
    graph_bytes: int = field(default=0, init=False, compare=False)
    """Bytes autograd saved for the retained graphs when they were last built (0: none built)."""
    # the retained gradient graphs, per block: [(θ leaf, ∇L chunk, weight)] (None: over budget)
    _graphs: dict[tuple[str, ...], list[tuple[torch.Tensor, torch.Tensor, float]] | None] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    # which mode ran, shared by the copies that restricted() makes (a minibatch learns from its parent)
    _ad: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.ad_mode not in ("auto", "forward", "reverse"):
            raise ValueError(f"ad_mode must be 'auto', 'forward' or 'reverse', got {self.ad_mode!r}")
        if self.hvp_mode not in ("functional", "retained"):
            raise ValueError(f"hvp_mode must be 'functional' or 'retained', got {self.hvp_mode!r}")

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

    @property
    def ad_used(self) -> str | None:
        """``"forward"`` or ``"reverse"`` once a second-order product ran (None before)."""
        return self._ad.get("mode")

    @property
    def fallbacks(self) -> dict[str, str]:
        """``{"reverse": why}`` where forward mode failed, ``{"autograd": why}`` where
        ``torch.func`` could not differentiate the model (gradient checkpointing)."""
        out = {"reverse": self._ad["reason"]} if "reason" in self._ad else {}
        return out | ({"autograd": self._ad["autograd"]} if "autograd" in self._ad else {})

    def _use_autograd(self, error: BaseException) -> None:
        """From now on, products and gradients by ``torch.autograd`` (the model uses saved tensor hooks)."""
        if "autograd" not in self._ad:
            self._ad["autograd"] = reason(error)
            log.info("%s; torch.autograd products from now on", CHECKPOINTING)

    @classmethod
    def from_task(
        cls,
        model: nn.Module,
        task: Task,
        params: Params,
        batch: Batch,
        **settings: Any,
    ) -> Objective:
        """The objective of ``task`` (its loss and forward) for ``model`` at ``params`` over ``batch``.

        Args:
            model: the model.
            task: the forward and the loss.
            params: every trainable parameter, by name.
            batch: the sample (this rank's shard of it).
            **settings: the other fields (``chunk_size``, ``sample_size``, ``sample_offset``,
                ``reduce``, ``ad_mode``, ``hvp_mode``, ``graph_budget``).

        Returns:
            The :class:`Objective`.
        """
        return cls(model, task.loss, params, batch, forward=task.forward, **settings)

    @property
    def task(self) -> Task:
        """The objective's forward and loss as one :class:`~lissa_influence.task.Task`."""
        return Task(self.loss_fn, self.forward)

    def point(self, block: ParamBlock) -> torch.Tensor:
        """The parameters of ``block`` as one flat vector (where derivatives are taken).

        Args:
            block: a block of :attr:`params`.

        Returns:
            ``[block.numel]``.
        """
        return block.flatten(self.params)

    def outputs(self, batch: Batch, overrides: Params | None = None) -> Any:
        """The model's outputs on ``batch``, with ``overrides`` in place of some parameters.

        Args:
            batch: the examples.
            overrides: parameters to substitute (None: the objective's own).

        Returns:
            Whatever the forward returns.
        """
        return self._forward(overrides or {}, batch)

    # -- the loss as a function of flat blocks -----------------------------------
    def _forward(self, overrides: Params, batch: Batch) -> Any:
        return outputs(self.model, {**self.params, **overrides}, batch, self.forward)

    def _loss(self, blocks: tuple[ParamBlock, ...], flats: tuple[torch.Tensor, ...], batch: Batch) -> torch.Tensor:
        overrides: Params = {}
        for b, f in zip(blocks, flats, strict=True):
            overrides.update(b.unflatten(f))
        return mean_loss(self.loss_fn, self._forward(overrides, batch), batch, self.forward)

    def _chunks(self, batch: Batch | None) -> Iterator[tuple[Batch, float]]:
        batch, n = (self.batch, self.total) if batch is None else (batch, len(batch))
        for chunk in batch.chunks(self.chunk_size):
            yield chunk, len(chunk) / n

    def _reduced(self, total: torch.Tensor, batch: Batch | None) -> torch.Tensor:
        return self.reduce(total) if self.reduce is not None and batch is None else total

    def restricted(self, indices: torch.Tensor) -> Objective:
        """The objective over the examples at ``indices`` of the whole sample (a minibatch).

        This rank keeps those in its shard, in the order given; weights and the reduction are
        over all of them. Its products are functional (a graph kept for a minibatch would be
        built for one product).

        Args:
            indices: positions in the whole sample.

        Returns:
            A new :class:`Objective`.
        """
        lo = self.sample_offset
        local = indices[(indices >= lo) & (indices < lo + len(self.batch))] - lo
        local = local.to(self.device)
        # a minibatch is used once: a graph kept for it would be built for one product
        return dataclasses.replace(
            self, batch=self.batch.select(local), sample_size=len(indices), sample_offset=0, hvp_mode="functional"
        )

    # -- first order ---------------------------------------------------------------
    def value(self, batch: Batch | None = None) -> torch.Tensor:
        """The mean loss.

        Args:
            batch: a plain local sample to take it over (None: the objective's sample, reduced
                across ranks).

        Returns:
            A scalar.
        """
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for c, w in self._chunks(batch):
            total = total + w * self._loss((), (), c).detach()
        return self._reduced(total, batch)

    def gradient(self, block: ParamBlock, batch: Batch | None = None) -> torch.Tensor:
        """``∇_{block} L``.

        Args:
            block: the block to differentiate in.
            batch: a plain local sample (None: the objective's sample, reduced across ranks).

        Returns:
            ``[block.numel]``.
        """
        theta = self.point(block)
        total = torch.zeros_like(theta)
        g = grad(lambda f, c: self._loss((block,), (f,), c))

        def by_autograd(c: Batch) -> torch.Tensor:
            with torch.enable_grad():
                f = _leaf(theta)
                return autograd_grad([self._loss((block,), (f,), c)], [f])[0].detach()

        for c, w in self._chunks(batch):
            if "autograd" not in self._ad:
                try:
                    total += w * g(theta, c)
                    continue
                except RuntimeError as e:
                    if not saved_tensor_hooks(e):
                        raise
                    self._use_autograd(e)
            total += w * by_autograd(c)
        return self._reduced(total, batch)

    # -- second order --------------------------------------------------------------
    def _local(
        self, fn: Callable[[torch.Tensor, Batch], torch.Tensor], v: torch.Tensor, batch: Batch | None, out_size: int
    ) -> torch.Tensor:
        """This process's share of a product, before the cross-rank sum."""
        total = None
        for c, w in self._chunks(batch):
            out = fn(v, c) if v.dim() == 1 else vmap(lambda vv: fn(vv, c))(v)  # noqa: B023 (called at once)
            total = w * out if total is None else total + w * out
        if total is None:  # an empty shard (more ranks than examples): contributes zero
            total = v.new_zeros(*v.shape[:-1], out_size)
        return total.detach()

    def _by_autograd(
        self, fn: Callable[[torch.Tensor, Batch], torch.Tensor], v: torch.Tensor, batch: Batch | None, out_size: int
    ) -> torch.Tensor:
        """This process's share of a product by ``torch.autograd``: ``fn(V, chunk)`` takes a
        stack ``[k, P]`` (one backward per row) and returns ``[k, out_size]``."""
        V = v if v.dim() == 2 else v.unsqueeze(0)
        total = V.new_zeros(V.shape[0], out_size)  # an empty shard contributes zero
        with torch.enable_grad():
            for c, w in self._chunks(batch):
                total = total + w * fn(V, c).detach()
        return total if v.dim() == 2 else total[0]

    def _second_order(
        self,
        forward_mode: Callable[[torch.Tensor, Batch], torch.Tensor],
        reverse_mode: Callable[[torch.Tensor, Batch], torch.Tensor],
        by_autograd: Callable[[torch.Tensor, Batch], torch.Tensor],
        v: torch.Tensor,
        batch: Batch | None,
        out_size: int,
    ) -> torch.Tensor:
        """A product in the mode :attr:`ad_mode` asks for; ``"auto"`` tries forward mode and
        moves to reverse mode for good when the loss or the model does not support it. A
        model that ``torch.func`` cannot differentiate (gradient checkpointing) gets
        reverse-over-reverse products by ``torch.autograd`` (``by_autograd``), unless forward
        mode was demanded."""
        if v.dim() not in (1, 2):
            raise ValueError(f"expected a vector [P] or a stack [k, P], got shape {tuple(v.shape)}")
        if "autograd" not in self._ad:
            try:
                return self._reduced(self._functional(forward_mode, reverse_mode, v, batch, out_size), batch)
            except RuntimeError as e:
                if not saved_tensor_hooks(e):
                    raise
                self._use_autograd(e)
        if self.ad_mode == "forward":
            raise ValueError(
                f"ad_mode='forward': {CHECKPOINTING}, and its forward-over-reverse products need it. Use "
                "ad_mode='auto' or 'reverse' (reverse-over-reverse products by torch.autograd), or run influence on "
                "the model without checkpointing"
            )
        self._ad["mode"] = "reverse"
        return self._reduced(self._by_autograd(by_autograd, v, batch, out_size), batch)

    def _functional(
        self,
        forward_mode: Callable[[torch.Tensor, Batch], torch.Tensor],
        reverse_mode: Callable[[torch.Tensor, Batch], torch.Tensor],
        v: torch.Tensor,
        batch: Batch | None,
        out_size: int,
    ) -> torch.Tensor:
        """This process's share of a product by ``torch.func``, in the mode :attr:`ad_mode` asks for."""
        mode = "reverse" if self.ad_mode == "reverse" else self._ad.get("mode")
        if mode is not None:  # decided: errors from now on are errors
            local = self._local(reverse_mode if mode == "reverse" else forward_mode, v, batch, out_size)
            self._ad["mode"] = mode
            return local
        # the first product decides, once: forward mode, or reverse where forward fails
        load_forward_ad()
        try:
            local = self._local(forward_mode, v, batch, out_size)
            self._ad["mode"] = "forward"
        except Exception as e:
            # a checkpointed model: torch.func's reverse mode would fail the same way
            if self.ad_mode == "forward" or not no_forward_ad(e) or saved_tensor_hooks(e):
                raise
            try:
                local = self._local(reverse_mode, v, batch, out_size)
            except Exception as reverse_error:
                raise reverse_error from e
            self._ad.update(mode="reverse", reason=reason(e))
            log.info("forward-mode AD failed (%s); reverse-over-reverse products from now on", self._ad["reason"])
        return local

    def _retained(self, block: ParamBlock) -> list[tuple[torch.Tensor, torch.Tensor, float]] | None:
        """The gradient graph of every chunk, built at the first product and kept; None when
        they would take more than ``graph_budget`` bytes (counted as autograd saves them)."""
        key = tuple(block.names)
        if key in self._graphs:
            return self._graphs[key]
        saved = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[0] += t.numel() * t.element_size()
            return t

        graphs: list[tuple[torch.Tensor, torch.Tensor, float]] | None = []
        try:
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                for c, w in self._chunks(None):
                    theta = self.point(block).detach().requires_grad_(True)
                    g = torch.autograd.grad(self._loss((block,), (theta,), c), theta, create_graph=True)[0]
                    assert graphs is not None
                    graphs.append((theta, g, w))
                    if saved[0] > self.graph_budget:
                        log.info(
                            "retained HVP graphs exceed graph_budget=%d bytes after %d chunk(s); functional products",
                            self.graph_budget,
                            len(graphs),
                        )
                        graphs = None
                        break
        except (RuntimeError, NotImplementedError) as e:  # an op without a double backward, or out of memory
            log.info("retained HVP graphs could not be built (%s); functional products", str(e).splitlines()[0][:200])
            graphs = None
        self._graphs[key] = graphs
        self.graph_bytes = saved[0]
        return graphs

    def keeps_graphs(self, block: ParamBlock) -> bool:
        """Whether retained gradient graphs of ``block`` are built and kept (products are then one backward pass).

        Args:
            block: the block.

        Returns:
            True when they are built and within ``graph_budget``.
        """
        return bool(self._graphs.get(tuple(block.names)))

    def release_graphs(self) -> None:
        """Free the retained gradient graphs (the estimators call it when their solves are
        done; a later product rebuilds them)."""
        self._graphs.clear()

    def hvp(self, block: ParamBlock, v: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        """``∇²_{block} L · v``.

        Args:
            block: the block (rows and columns of the Hessian).
            v: ``[P]`` or a stack ``[k, P]``.
            batch: a plain local sample (None: the objective's sample, reduced across ranks).

        Returns:
            In the shape of ``v``.
        """
        if self.hvp_mode == "retained" and batch is None and (graphs := self._retained(block)) is not None:
            if v.dim() not in (1, 2):
                raise ValueError(f"expected a vector [P] or a stack [k, P], got shape {tuple(v.shape)}")
            total = v.new_zeros(*v.shape[:-1], block.numel)
            for leaf, grad_l, w in graphs:
                if v.dim() == 1:
                    total += w * torch.autograd.grad(grad_l, leaf, v, retain_graph=True)[0]
                else:  # one backward per row: batched backward (vmap) fails on many models' graphs
                    total += w * torch.stack([torch.autograd.grad(grad_l, leaf, r, retain_graph=True)[0] for r in v])
            return self._reduced(total.detach(), None)
        theta = self.point(block)
        g = grad(lambda f, c: self._loss((block,), (f,), c))

        def forward_mode(vv: torch.Tensor, c: Batch) -> torch.Tensor:
            return jvp(lambda f: g(f, c), (theta,), (vv,))[1]

        def reverse_mode(vv: torch.Tensor, c: Batch) -> torch.Tensor:  # H symmetric: ∇(∇L · v) = Hv
            return grad(lambda f: (g(f, c) * vv).sum())(theta)

        def by_autograd(V: torch.Tensor, c: Batch) -> torch.Tensor:
            f = _leaf(theta)
            (gl,) = autograd_grad([self._loss((block,), (f,), c)], [f], create_graph=True)
            return torch.stack([autograd_grad([gl], [f], [r])[0] for r in V])

        return self._second_order(forward_mode, reverse_mode, by_autograd, v, batch, block.numel)

    def ggn_vp(self, block: ParamBlock, v: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        """Generalised Gauss-Newton ``Jᵀ (∇²_out loss) J · v``.

        Positive semi-definite for convex losses such as cross-entropy, whatever the network.
        ``out`` is the floating leaves of the outputs; other leaves (integer positions) are held fixed.

        Args:
            block: the block.
            v: ``[P]`` or a stack ``[k, P]``.
            batch: a plain local sample (None: the objective's sample, reduced across ranks).

        Returns:
            In the shape of ``v``.
        """
        theta = self.point(block)

        def parts(
            c: Batch,
        ) -> tuple[
            Callable[[torch.Tensor], tuple[list[torch.Tensor], list[Any]]],
            Callable[[list[Any]], Callable[[list[torch.Tensor]], torch.Tensor]],
        ]:
            leaves = _FloatLeaves()

            def net(f: torch.Tensor) -> tuple[list[torch.Tensor], list[Any]]:  # (floats, the rest as aux)
                return leaves.split(self._forward(block.unflatten(f), c))

            def loss(rest: list[Any]) -> Callable[[list[torch.Tensor]], torch.Tensor]:
                return lambda o: mean_loss(self.loss_fn, leaves.join(o, rest), c, self.forward)

            return net, loss

        def forward_mode(vv: torch.Tensor, c: Batch) -> torch.Tensor:
            net, loss = parts(c)
            out, jv, rest = cast(tuple[Any, Any, Any], jvp(net, (theta,), (vv,), has_aux=True))  # typed without aux
            hjv = jvp(grad(loss(rest)), (out,), (jv,))[1]
            return vjp(net, theta, has_aux=True)[1](hjv)[0]

        def reverse_mode(vv: torch.Tensor, c: Batch) -> torch.Tensor:
            net, loss = parts(c)
            out, pullback, rest = cast(tuple[Any, Any, Any], vjp(net, theta, has_aux=True))
            # J v as the transpose of the (linear) pullback u ↦ Jᵀu
            jv = vjp(lambda u: pullback(u)[0], tree_map(torch.zeros_like, out))[1](vv)[0]
            hjv = grad(lambda o: _tree_dot(grad(loss(rest))(o), jv))(out)
            return pullback(hjv)[0]

        def by_autograd(V: torch.Tensor, c: Batch) -> torch.Tensor:
            net, loss = parts(c)
            f = _leaf(theta)
            out, rest = net(f)
            out = [o if o.requires_grad else _leaf(o) for o in out]  # a float output the block does not reach
            g_out = autograd_grad([loss(rest)(out)], out, create_graph=True)
            # J v as the transpose of the (linear) pullback u ↦ Jᵀu, as in reverse mode
            us = [torch.zeros_like(o, requires_grad=True) for o in out]
            (jtu,) = autograd_grad(out, [f], us, create_graph=True)
            rows = []
            for r in V:
                jv = autograd_grad([jtu], us, [r])
                hjv = autograd_grad(g_out, out, jv)  # ∇²_out loss · J v (the output Hessian is symmetric)
                rows.append(autograd_grad(out, [f], hjv)[0])
            return torch.stack(rows)

        return self._second_order(forward_mode, reverse_mode, by_autograd, v, batch, block.numel)

    def mixed_vp(self, rows: ParamBlock, cols: ParamBlock, v: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        """``∇²_{rows, cols} L · v``: ``v`` lives on ``cols``, the result on ``rows``.

        The ``∇²_WΘ F · v`` of docs/math.md is ``mixed_vp(W, Θ, v)``.

        Args:
            rows: the block of the result.
            cols: the block of ``v``.
            v: ``[|cols|]`` or a stack ``[k, |cols|]``.
            batch: a plain local sample (None: the objective's sample, reduced across ranks).

        Returns:
            ``[|rows|]`` or ``[k, |rows|]``.
        """
        a, b = self.point(rows), self.point(cols)

        def loss(fa: torch.Tensor, fb: torch.Tensor, c: Batch) -> torch.Tensor:
            return self._loss((rows, cols), (fa, fb), c)

        def forward_mode(vv: torch.Tensor, c: Batch) -> torch.Tensor:
            return jvp(lambda fb: grad(loss, argnums=0)(a, fb, c), (b,), (vv,))[1]

        def reverse_mode(vv: torch.Tensor, c: Batch) -> torch.Tensor:  # ∇_rows (∇_cols L · v)
            return grad(lambda fa: (grad(loss, argnums=1)(fa, b, c) * vv).sum())(a)

        def by_autograd(V: torch.Tensor, c: Batch) -> torch.Tensor:
            fa, fb = _leaf(a), _leaf(b)
            (g_cols,) = autograd_grad([loss(fa, fb, c)], [fb], create_graph=True)
            return torch.stack([autograd_grad([g_cols], [fa], [r])[0] for r in V])

        return self._second_order(forward_mode, reverse_mode, by_autograd, v, batch, rows.numel)

    def gauss_newton_matrix(self, block: ParamBlock, max_outputs: int = 2048) -> torch.Tensor:
        """The dense Gauss-Newton matrix ``(1/N) Σ_i J_iᵀ ∇²_{o_i} ℓ_i J_i`` over this process's examples.

        ``N`` is the whole sample's size (:attr:`total`); the result is not reduced across
        ranks. Formed in chunks of at most ``max_outputs`` output entries, since the output
        Hessian of a chunk is dense.

        Args:
            block: the block of parameters (``J`` is the outputs' Jacobian in it).
            max_outputs: output entries per chunk.

        Returns:
            ``[P, P]``, undamped and not symmetrised.

        Raises:
            MemoryError: one example has more than ``max_outputs`` output entries.
        """
        theta = self.point(block)
        total = theta.new_zeros(block.numel, block.numel)
        if len(self.batch) == 0:  # an empty shard adds nothing
            return total
        first = next(self.batch.chunks(1))
        per_example = sum(leaf.numel() for leaf in tree_flatten(self._forward(block.unflatten(theta), first))[0])
        if per_example > max_outputs:
            raise MemoryError(f"{per_example} outputs per example")
        chunk = max(1, max_outputs // per_example)
        n_total = self.total
        for c in self.batch.chunks(chunk):
            leaves, spec = tree_flatten(self._forward(block.unflatten(theta), c))
            shapes = [t.shape for t in leaves]

            def flat_outputs(f: torch.Tensor, c: Batch = c) -> torch.Tensor:
                return torch.cat([t.reshape(-1) for t in tree_flatten(self._forward(block.unflatten(f), c))[0]])

            def loss_of(
                o: torch.Tensor, c: Batch = c, shapes: list[torch.Size] = shapes, spec: Any = spec
            ) -> torch.Tensor:
                parts, at = [], 0
                for shape in shapes:
                    size = math.prod(shape)
                    parts.append(o[at : at + size].reshape(shape))
                    at += size
                return mean_loss(self.loss_fn, tree_unflatten(parts, spec), c, self.forward)

            o = flat_outputs(theta).detach()
            J = jacrev(flat_outputs)(theta)  # [outputs, P]
            H = hessian(loss_of)(o)  # [outputs, outputs], block diagonal over examples
            total += (len(c) / n_total) * (J.T @ (H @ J))
        return total


def check_gauss_newton(objective: Objective, what: str) -> None:
    """One forward pass on the first examples of ``objective``'s sample, refused by name
    where its loss is not a function of the outputs (:func:`~lissa_influence.task.check_loss_of_outputs`).

    Args:
        objective: the objective whose Gauss-Newton matrix will be taken.
        what: what asks for it, in errors.
    """
    if len(objective.batch) == 0:
        return
    first = objective.batch.select(slice(0, min(2, len(objective.batch))))
    with eval_mode(objective.model), torch.no_grad():
        out = objective.outputs(first)
    check_loss_of_outputs(out, objective.loss_fn, first, objective.forward, what)
