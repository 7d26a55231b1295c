"""Fitting K-FAC / EK-FAC factors from an objective: :func:`fit_kronecker`.

Forward hooks on the supported layers capture their inputs and output gradients over the
objective's sample (package docstring, :mod:`lissa_influence.kfac`); the result is a
:class:`~lissa_influence.kfac.factors.KroneckerCurvature`.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn
from torch.func import jacrev, vjp, vmap
from torch.nn import functional as F
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ..batching import Batch
from ..objective import Objective
from ..operators import FisherType, KroneckerKind, check_fisher
from ..params import ParamBlock, Params
from ..task import check_loss_of_outputs, cross_entropy, mean_loss, outputs
from .factors import KroneckerCurvature, Layer, fallback_index, layer_index

__all__ = ["EIGH_FLOAT64_MAX", "TYPE2_MAX_OUTPUTS", "fit_kronecker"]

TYPE2_MAX_OUTPUTS = 256
"""``fisher="auto"`` takes the exact type-2 factors up to this many outputs per example
(one backward pass per output)."""

EIGH_FLOAT64_MAX = 4096
"""Factors up to this size are eigendecomposed in float64 (cheap, and exact to rounding)."""


@dataclass
class _Spec:
    """A supported layer found in the model, and the statistics captured on it."""

    name: str
    module: nn.Module  # nn.Linear, nn.Conv2d or transformers' Conv1D (_supported)
    weight: str
    bias: str | None
    inputs: list[torch.Tensor] = field(default_factory=list)
    probes: list[torch.Tensor] = field(default_factory=list)

    def patches(self) -> torch.Tensor:
        """The layer's input as ``[B, T, in(+1)]`` rows (im2col patches for a convolution)."""
        (x,) = self.inputs
        m = self.module
        if isinstance(m, nn.Conv2d):
            pad = cast(tuple[int, int], (0, 0) if m.padding == "valid" else m.padding)
            x = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=pad, stride=m.stride).transpose(1, 2)
        else:
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        if self.bias is not None:
            x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
        return x

    @property
    def transposed(self) -> bool:
        return _is_conv1d(self.module)

    @property
    def sizes(self) -> tuple[int, int]:
        """``(inputs, outputs)`` of the layer (inputs without the bias column)."""
        w = self.module.weight
        assert isinstance(w, torch.Tensor)
        if self.transposed:
            return int(w.shape[0]), int(w.shape[1])
        return math.prod(w.shape[1:]), int(w.shape[0])

    def out_grads(self, g: torch.Tensor | None) -> torch.Tensor:
        """The gradient at the layer's output as ``[B, T, out]``."""
        (z,) = self.probes
        g = torch.zeros_like(z) if g is None else g
        if isinstance(self.module, nn.Conv2d):
            return g.flatten(2).transpose(1, 2)
        return g.reshape(g.shape[0], -1, g.shape[-1])


def _is_conv1d(m: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): ``x @ weight + bias``, ``weight`` ``[in, out]``;
    recognised by its attributes, so that transformers need not be installed (getattr on
    the user's modules: not a contract of ours)."""
    weight = getattr(m, "weight", None)
    return (
        type(m).__name__ == "Conv1D"
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and getattr(m, "nf", None) == weight.shape[1]
    )


def _supported(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear) or _is_conv1d(m):
        return True
    if isinstance(m, nn.Conv2d):
        return m.groups == 1 and m.padding_mode == "zeros" and (m.padding == "valid" or not isinstance(m.padding, str))
    return False


@contextmanager
def _capture(specs: list[_Spec]) -> Iterator[None]:
    """Record each layer's input, and add a zero probe to its output whose gradient is the
    output's gradient (a probe stays valid where later code modifies the output in place)."""

    def hook(spec: _Spec) -> Callable[[nn.Module, tuple[Any, ...], torch.Tensor], torch.Tensor]:
        def fn(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            spec.inputs.append(args[0].detach())
            z = torch.zeros_like(out, requires_grad=True)
            spec.probes.append(z)
            return out + z

        return fn

    for s in specs:
        s.inputs.clear()
        s.probes.clear()
    handles = [s.module.register_forward_hook(hook(s)) for s in specs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _examples(chunk: Batch) -> tuple[list[torch.Tensor], Callable[[list[torch.Tensor]], Batch]]:
    """The tensor leaves of ``chunk`` (examples along dim 0), and how one example's leaves
    (inside ``vmap``) become a one-example batch; other leaves (a None target) pass as they are."""
    leaves, spec = tree_flatten((chunk.x, chunk.y) if chunk.pair else chunk.x)
    kept = [isinstance(t, torch.Tensor) for t in leaves]

    def one(example: list[torch.Tensor]) -> Batch:
        it = iter(example)
        tree = tree_unflatten([next(it).unsqueeze(0) if k else t for t, k in zip(leaves, kept, strict=True)], spec)
        return Batch(*tree) if chunk.pair else Batch(tree)

    return [t for t, k in zip(leaves, kept, strict=True) if k], one


def _is_cross_entropy(loss_fn: Any) -> bool:
    return loss_fn is cross_entropy or loss_fn is F.cross_entropy


class _Fitter:
    def __init__(self, objective: Objective, block: ParamBlock, fisher: FisherType, seed: int):
        self.obj, self.block, self.seed = objective, block, seed
        self.params: Params = {n: t.detach() for n, t in objective.params.items()}
        self.dtype, self.device = objective.dtype, objective.device
        model = objective.model
        in_block = set(block.names)
        uses: dict[int, int] = {}
        for _, p in model.named_parameters(remove_duplicate=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
        candidates = []
        for name, m in model.named_modules():
            if not _supported(m):
                continue
            pre = f"{name}." if name else ""
            # getattr on the user's module (a layer may be built with bias=False): not contract probing
            weight, bias = pre + "weight", (pre + "bias" if getattr(m, "bias", None) is not None else None)
            if weight not in in_block or (bias is not None and bias not in in_block):
                continue
            if any(uses.get(id(p), 0) != 1 for p in m.parameters(recurse=False)):
                continue  # shared weights: one Kronecker block cannot hold two layers' statistics
            candidates.append(_Spec(name, m, weight, bias))
        # a probe forward: only layers that run exactly once per pass are Kronecker blocks
        batch = objective.batch
        probe = batch.select(slice(0, 1))
        with torch.no_grad(), _capture(candidates):
            out = outputs(model, self.params, probe, objective.forward)
        check_loss_of_outputs(out, objective.loss_fn, probe, objective.forward, "K-FAC / EK-FAC factors")
        self.specs = [s for s in candidates if len(s.inputs) == 1]
        owned = {n for s in self.specs for n in (s.weight, s.bias) if n is not None}
        self.fallback = tuple(n for n in block.names if n not in owned)
        self.fb_block = ParamBlock(self.fallback, tuple(block.shapes[block.names.index(n)] for n in self.fallback))
        self.fisher = self._resolve(fisher, out)
        self.passes = 0.0

    def _resolve(self, fisher: FisherType, out: Any) -> str:
        tensor_out = isinstance(out, torch.Tensor) and out.dim() >= 1
        m = math.prod(out.shape[1:]) if isinstance(out, torch.Tensor) else 0
        ce = (
            self.obj.forward is None
            and _is_cross_entropy(self.obj.loss_fn)
            and isinstance(out, torch.Tensor)
            and out.dim() == 2
        )
        if fisher == "auto":
            return "type-2" if tensor_out and m <= TYPE2_MAX_OUTPUTS else "mc" if ce else "empirical"
        if fisher == "type-2" and not tensor_out:
            raise ValueError("fisher='type-2' needs the forward to return one tensor [batch, ...]; use 'empirical'")
        if fisher == "mc" and not ce:
            raise ValueError(
                "fisher='mc' samples labels from the softmax: it needs the default forward, the cross-entropy loss "
                "and logits [batch, classes]; use 'type-2' (small outputs) or 'empirical'"
            )
        return fisher

    # -- gradients at the outputs whose outer products average to H_i ----------------
    def _seeds(self, out: Any, chunk: Batch, start: int) -> list[Any]:
        """Cotangents at the outputs, ``[K]`` pytrees of the outputs' structure."""
        if self.fisher == "type-2":
            o = cast(torch.Tensor, out).detach()
            B, shape = o.shape[0], o.shape[1:]
            H = self._output_hessians(o.reshape(B, -1), chunk, shape)
            evals, evecs = torch.linalg.eigh(H)
            # eigenvalues at rounding level are zero (cross-entropy's H has one): no backward pass for them
            tol = evals.abs().amax(dim=-1, keepdim=True) * evals.shape[-1] * torch.finfo(evals.dtype).eps
            evals = torch.where(evals > tol, evals, torch.zeros_like(evals))
            S = evecs * evals.sqrt().unsqueeze(1)  # H = S Sᵀ, columns along the last dim
            keep = (evals > 0).any(dim=0)
            return [S[:, :, c].reshape(B, *shape) for c in range(S.shape[-1]) if bool(keep[c])]
        if self.fisher == "mc":
            o = cast(torch.Tensor, out).detach()
            p = o.softmax(dim=-1)
            # one uniform draw per example of the whole sample: shards draw what one process draws
            g = torch.Generator().manual_seed(self.seed)
            u = torch.rand(self.obj.total, generator=g, dtype=torch.float64)
            lo = self.obj.sample_offset + start
            u = u[lo : lo + o.shape[0]].to(device=o.device, dtype=p.dtype)
            y = torch.searchsorted(p.cumsum(-1), u[:, None]).clamp_max(p.shape[-1] - 1).squeeze(-1)
            return [p - F.one_hot(y, p.shape[-1]).to(p)]
        # empirical: the gradient of each example's own loss (the loss of a batch is its mean)
        leaves, spec = tree_flatten(out)
        detached = [t.detach().requires_grad_(True) for t in leaves]
        loss = mean_loss(self.obj.loss_fn, tree_unflatten(detached, spec), chunk, self.obj.forward)
        grads = torch.autograd.grad(loss * len(chunk), detached, allow_unused=True)
        return [
            tree_unflatten(
                [torch.zeros_like(t) if g is None else g for t, g in zip(detached, grads, strict=True)], spec
            )
        ]

    def _output_hessians(self, o: torch.Tensor, chunk: Batch, shape: torch.Size) -> torch.Tensor:
        """``∇²_out loss_i`` of each example's loss on its own, ``[B, M, M]``."""
        leaves, example = _examples(chunk)

        def loss(flat: torch.Tensor, ex: list[Any]) -> torch.Tensor:
            one = example(ex)
            return mean_loss(self.obj.loss_fn, flat.reshape(1, *shape), one, self.obj.forward)

        try:
            return cast(torch.Tensor, vmap(jacrev(jacrev(loss)))(o, leaves))
        except (RuntimeError, NotImplementedError, ValueError):  # a loss vmap cannot batch: one example at a time
            rows = [jacrev(jacrev(loss))(o[i], [t[i] for t in leaves]) for i in range(o.shape[0])]
            return torch.stack(rows)

    # -- the passes over the sample ------------------------------------------------------
    def _chunks(self) -> Iterator[tuple[Batch, int]]:
        start = 0
        for chunk in self.obj.batch.chunks(self.obj.chunk_size):
            yield chunk, start
            start += len(chunk)

    def _reduced(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """All ranks' sums, in one collective."""
        if self.obj.reduce is None or not tensors:
            return tensors
        flat = self.obj.reduce(torch.cat([t.reshape(-1) for t in tensors]))
        return [
            p.reshape(t.shape) for p, t in zip(torch.split(flat, [t.numel() for t in tensors]), tensors, strict=True)
        ]

    def _layer_grads(self, chunk: Batch, start: int) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor], Any]]:
        """Per seed column: each layer's output gradients ``[B, T, out]``; with the inputs ``[B, T, in(+1)]``
        and the seeds."""
        with _capture(self.specs):
            out = outputs(self.obj.model, self.params, chunk, self.obj.forward)
        seeds = self._seeds(out, chunk, start)
        patches = [s.patches() for s in self.specs]
        out_leaves = tree_flatten(out)[0]
        probes = [s.probes[0] for s in self.specs]
        self.passes += len(seeds) * len(chunk) / max(len(self.obj.batch), 1)
        for k, seed in enumerate(seeds):
            if probes:
                grads = torch.autograd.grad(
                    out_leaves,
                    probes,
                    grad_outputs=tree_flatten(seed)[0],
                    retain_graph=k < len(seeds) - 1,
                    allow_unused=True,
                )
                yield [s.out_grads(g) for s, g in zip(self.specs, grads, strict=True)], patches, seeds
            else:
                yield [], patches, seeds

    def factors(self) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """First pass: ``Ω`` and ``Γ`` of every layer and the fallback diagonal, over the whole sample."""
        n = self.obj.total
        A = [self._square(s.sizes[0] + (s.bias is not None)) for s in self.specs]
        G = [self._square(s.sizes[1]) for s in self.specs]
        diag = torch.zeros(self.fb_block.numel, dtype=self.dtype, device=self.device)
        for chunk, start in self._chunks():
            seeds: Any = None
            for column, (gs, patches, chunk_seeds) in enumerate(self._layer_grads(chunk, start)):
                seeds = chunk_seeds
                for i, g in enumerate(gs):
                    g2 = g.reshape(-1, g.shape[-1])
                    G[i] += g2.T @ g2 / n
                if column == 0:
                    for i, a in enumerate(patches):
                        a2 = a.reshape(-1, a.shape[-1])
                        A[i] += a2.T @ a2 / (n * a.shape[1])
            if self.fallback and seeds is not None:
                diag += self._fallback_grads(chunk, seeds).pow(2).sum(dim=(0, 1)) / n
        reduced = self._reduced([*A, *G, diag])
        k = len(self.specs)
        return reduced[:k], reduced[k : 2 * k], reduced[2 * k]

    def corrections(self, bases: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """Second pass (EK-FAC): the mean squared per-example gradient in each layer's eigenbasis."""
        n = self.obj.total
        lam = [torch.zeros(q_g.shape[0], q_a.shape[0], dtype=self.dtype, device=self.device) for q_a, q_g in bases]
        for chunk, start in self._chunks():
            rotated: list[torch.Tensor] = []
            for gs, patches, _ in self._layer_grads(chunk, start):
                if not rotated:  # the inputs are the same for every seed column: rotate them once
                    rotated = [a @ q_a for a, (q_a, _) in zip(patches, bases, strict=True)]
                for i, (g, a) in enumerate(zip(gs, rotated, strict=True)):
                    # rotate before the per-example product: Q_Γᵀ (Σ_t g_t a_tᵀ) Q_Ω = Σ_t (Q_Γᵀ g_t)(Q_Ωᵀ a_t)ᵀ
                    g = g @ bases[i][1]
                    if g.shape[1] == 1:  # one position: a rank-one gradient, squared entry by entry
                        lam[i] += g[:, 0].pow(2).T @ a[:, 0].pow(2) / n
                    else:
                        lam[i] += torch.einsum("bto,bti->boi", g, a).pow(2).sum(0) / n
        return self._reduced(lam)

    def _square(self, size: int) -> torch.Tensor:
        return torch.zeros(size, size, dtype=self.dtype, device=self.device)

    def _fallback_grads(self, chunk: Batch, seeds: list[Any]) -> torch.Tensor:
        """Per-example, per-seed gradients of the fallback parameters, ``[B, K, P_fb]``:
        ``J_iᵀ s`` by a ``vjp`` of each example's outputs."""
        block, obj = self.fb_block, self.obj
        theta = block.flatten(self.params)
        leaves, example = _examples(chunk)
        stacked = tree_map(lambda *xs: torch.stack(xs, dim=1), *seeds)  # [B, K, ...] per leaf

        def per_example(ex: list[Any], s: Any) -> torch.Tensor:
            one = example(ex)
            net = lambda f: outputs(obj.model, {**self.params, **block.unflatten(f)}, one, obj.forward)
            pull = vjp(net, theta)[1]
            return cast(torch.Tensor, vmap(lambda c: pull(tree_map(lambda t: t.unsqueeze(0), c))[0])(s))

        self.passes += len(seeds) * len(chunk) / max(len(obj.batch), 1)
        try:
            return vmap(per_example)(leaves, stacked)
        except (RuntimeError, NotImplementedError, ValueError):  # a model vmap cannot batch: one example at a time
            rows = [
                per_example([t[i] for t in leaves], tree_map(lambda t, i=i: t[i], stacked)) for i in range(len(chunk))
            ]
            return torch.stack(rows)


def _eigh(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (clamped at 0: the factors are PSD up to rounding) and eigenvectors, in ``m``'s dtype."""
    work = m.double() if m.shape[0] <= EIGH_FLOAT64_MAX else m
    evals, evecs = torch.linalg.eigh(0.5 * (work + work.T))
    return evals.clamp_min(0).to(m.dtype), evecs.to(m.dtype)


def fit_kronecker(
    objective: Objective,
    block: ParamBlock,
    kind: KroneckerKind = "ekfac",
    fisher: FisherType = "auto",
    seed: int = 0,
) -> KroneckerCurvature:
    """Fit K-FAC or EK-FAC factors of ``objective``'s Gauss-Newton matrix over ``block``.

    One pass over the objective's sample (``batch``, in chunks of ``chunk_size``) for the
    factors, a second one for EK-FAC's eigenvalue correction (the package docstring; the
    Gauss-Newton matrix of docs/math.md). The model stays in the mode it is in.

    Args:
        objective: the loss and its sample.
        block: the parameters to approximate the curvature of.
        kind: ``"ekfac"`` or ``"kfac"``.
        fisher: the output-curvature estimate (:data:`~lissa_influence.operators.FisherType`).
        seed: draws the labels of ``fisher="mc"``.

    Returns:
        The :class:`~lissa_influence.kfac.KroneckerCurvature`.
    """
    if kind not in ("ekfac", "kfac"):
        raise ValueError(f"kind={kind!r}: use 'ekfac' or 'kfac'")
    check_fisher(fisher)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r}: use an integer")
    started = time.perf_counter()
    fitter = _Fitter(objective, block, fisher, seed)
    A, G, diag = fitter.factors()
    layers = []
    bases = []
    for s, a, g in zip(fitter.specs, A, G, strict=True):
        lam_a, q_a = _eigh(a)
        lam_g, q_g = _eigh(g)
        bases.append((q_a, q_g))
        shape = cast(torch.Tensor, s.module.weight).shape
        index = layer_index(block, s.weight, s.bias, shape, s.transposed)
        layers.append(Layer(s.name, s.weight, s.bias, q_a, q_g, torch.outer(lam_g, lam_a), index, s.transposed))
    if kind == "ekfac" and layers:
        for layer, lam in zip(layers, fitter.corrections(bases), strict=True):
            layer.lam = lam
    if fitter.fallback:  # once per fit: the operators cache their factors
        count = sum(math.prod(block.shapes[block.names.index(n)]) for n in fitter.fallback)
        warnings.warn(
            f"{kind}: {count} of {block.numel} parameters ({len(fitter.fallback)} tensors, e.g. "
            f"{list(fitter.fallback[:3])}) are in no Linear, Conv2d or Conv1D layer that runs once per forward "
            "and get a diagonal Gauss-Newton block; their curvature is approximated more coarsely (an exact "
            "solver, CG or Explicit, has no such limit)",
            stacklevel=3,
        )
    return KroneckerCurvature(
        block,
        layers,
        fitter.fallback,
        fallback_index(block, fitter.fallback),
        diag,
        kind,
        fitter.fisher,
        fisher,
        seed,
        time.perf_counter() - started,
        fitter.passes,
    )
