"""The fixed-embedding finetuning stage as a function of the head alone.

With the embedding fixed, the finetuning objective depends on the head ``Θ`` only, and
every finetune product ran the whole network to recompute the same embedding outputs.
:func:`head_objective` computes those outputs once for the Hessian sample (a forward
hook on the embedding module) and returns an :class:`~lissa_influence.curvature.Objective`
of ``Θ`` alone, in which the embedding module replays them: the model's own forward
still runs around it, so any head (a Linear, an MLP, a transformer's classifier) and any
``forward`` / ``loss`` work. It is used only after a check: the head objective's loss
and gradient on the first chunk must equal the full network's, which fails for a model
that calls its embedding twice, or transforms the input only on the way to it.

Its products cost a small fraction of the full ones (no convolution runs), and a head
of up to some thousands of parameters is small enough to factor exactly
(:class:`ExactInverse`), in float64, which removes the finetune solve's ill-conditioning
(damping 1e-8 on a softmax head whose Hessian is singular) from the chain.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.func import hessian, jacrev
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .batching import Batch
from .curvature import CurvatureOperator, Objective
from .params import ParamBlock, Params, make_block
from .solvers.base import Callback, DivergenceError, SolveInfo, SolverWarning, as_stack, check_rhs, rownorm
from .solvers.direct import Explicit
from .task import eval_mode, mean_loss, outputs

__all__ = ["ExactInverse", "head_objective"]

log = logging.getLogger(__name__)


class _Replay(nn.Module):
    """Stands in for the embedding module: returns the features of the current chunk."""

    def __init__(self) -> None:
        super().__init__()
        self.features: Any = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # a copy: the next layer may work in place (ReLU(inplace=True)) on what it is given
        return tree_map(torch.clone, self.features)


def _detached(x: Any) -> Any:
    return x.detach() if isinstance(x, torch.Tensor) else x


def _replaced(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """A structural copy of ``model`` with the submodule at ``path`` replaced by ``new``:
    the modules along the path are shallow copies, every other module (and every
    parameter and buffer) is shared with ``model``, which stays untouched."""
    root = copy.copy(model)
    root._modules = dict(model._modules)
    node, parts = root, path.split(".")
    for part in parts[:-1]:
        child = copy.copy(node._modules[part])
        assert child is not None
        child._modules = dict(child._modules)
        node._modules[part] = child
        node = child
    node._modules[parts[-1]] = new
    return root


def embedding_module(model: nn.Module, names: Sequence[str]) -> str | None:
    """The path of the outermost submodule whose trainable parameters (or all parameters,
    for a frozen embedding) are exactly ``names`` (the embedding whose outputs the head
    reads), or None."""
    if not names:
        return None
    parts = [n.split(".")[:-1] for n in names]
    common: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    for depth in range(1, len(common) + 1):  # outermost first
        path = ".".join(common[:depth])
        module = model.get_submodule(path)
        params = list(module.named_parameters())
        trainable = {f"{path}.{n}" for n, p in params if p.requires_grad}
        # a frozen embedding (fixed mode takes it with its frozen parameters) is all of the module's
        if set(names) in (trainable, {f"{path}.{n}" for n, _ in params}):
            return path
    return None


def head_objective(
    objective: Objective, embedding: str, theta: ParamBlock, dtype: torch.dtype | None = None
) -> tuple[Objective, ParamBlock]:
    """``objective`` restricted to the block ``theta`` with the embedding module at path
    ``embedding`` replaced by its precomputed outputs on the Hessian sample, in ``dtype``
    (None: the objective's). Raises ValueError when the head objective does not
    reproduce the full one (loss and ``∇_Θ`` on the first chunk)."""
    model, forward = objective.model, objective.forward
    dtype = dtype or objective.dtype
    target = model.get_submodule(embedding)
    if len(objective.batch) == 0:  # an empty shard (more ranks than examples): nothing to replay
        raise ValueError("this rank's share of the Hessian sample is empty")
    captured: list[Any] = []
    hook = target.register_forward_hook(lambda m, args, out: captured.append(tree_map(_detached, out)))
    feats = []
    try:
        with torch.no_grad():
            for chunk in objective.batch.chunks(objective.chunk_size):
                captured.clear()
                outputs(model, objective.params, chunk, forward)
                if len(captured) != 1:
                    raise ValueError(f"the embedding module {embedding!r} ran {len(captured)} times in one forward")
                feats.append(captured[0])
    finally:
        hook.remove()
    for leaf in tree_flatten(feats[0])[0]:
        # a cache object (transformers' DynamicCache when use_cache is on) cannot be split by example:
        # the caller falls back to the full network
        if not isinstance(leaf, torch.Tensor):
            raise ValueError(
                f"the embedding module {embedding!r} returns a {type(leaf).__name__}, not only tensors "
                "(a transformers model: call it with use_cache=False)"
            )
    features = tree_map(lambda *parts: torch.cat(parts), *feats) if len(feats) > 1 else feats[0]
    for leaf in tree_flatten(features)[0]:
        if leaf.dim() == 0 or leaf.shape[0] != len(objective.batch):
            raise ValueError(f"the embedding module {embedding!r} does not return one output row per example")
    features = tree_map(lambda t: t.to(dtype) if t.is_floating_point() else t, features)

    replay = _Replay()
    head_model = _replaced(model, embedding, replay)
    user_loss = objective.loss_fn

    def head_forward(m: nn.Module, tree: dict[str, Any]) -> Any:
        replay.features = tree["features"]
        batch = Batch(tree["x"], tree["y"])
        # the head model's parameters are substituted by the enclosing functional_call
        return m(batch.x) if forward is None else forward(m, batch.tree)

    def head_loss(out: Any, tree: dict[str, Any]) -> torch.Tensor:
        return mean_loss(user_loss, out, Batch(tree["x"], tree["y"]), forward)

    params: Params = {n: objective.params[n].to(dtype) for n in theta.names}
    # the head's float buffers (BatchNorm statistics) follow the head's dtype
    params.update(
        {
            n: b.to(dtype)
            for n, b in head_model.named_buffers()
            if b.is_floating_point() and not n.startswith(embedding + ".")
        }
    )
    head = Objective(
        head_model,
        head_loss,
        params,
        Batch({"features": features, "x": objective.batch.x, "y": objective.batch.y}),
        chunk_size=objective.chunk_size,
        sample_size=objective.sample_size,
        sample_offset=objective.sample_offset,
        reduce=objective.reduce,
        forward=head_forward,
        ad_mode=objective.ad_mode,
        hvp_mode=objective.hvp_mode,
        graph_budget=objective.graph_budget,
    )
    block = make_block(params, theta.names)
    _check_same(objective, theta, head, block)
    return head, block


def _check_same(full: Objective, theta: ParamBlock, head: Objective, block: ParamBlock) -> None:
    first = next(full.batch.chunks(full.chunk_size))
    head_first = next(head.batch.chunks(head.chunk_size))
    loss_full, loss_head = full.value(first), head.value(head_first).to(full.dtype)
    g_full = full.gradient(theta, first)
    g_head = head.gradient(block, head_first).to(full.dtype)
    tol = torch.finfo(full.dtype).eps ** 0.5
    gap = float((g_full - g_head).norm() / g_full.norm().clamp_min(torch.finfo(full.dtype).tiny))
    if abs(float(loss_full - loss_head)) > tol * max(1.0, abs(float(loss_full))) or gap > tol:
        raise ValueError(
            f"replaying the embedding's outputs changes the loss ({float(loss_full):.6g} vs {float(loss_head):.6g}) "
            f"or its gradient (relative gap {gap:.2g}): the model does more with its input than pass it to the "
            "embedding"
        )


def dense_curvature(op: CurvatureOperator, block_size: int = 256) -> tuple[torch.Tensor, str]:
    """The dense damped matrix of ``op`` and how it was formed.

    Where the curvature is a Gauss-Newton matrix (``op.gauss_newton``, or a head whose
    outputs are linear in its parameters, as a softmax's linear layer: then the Hessian
    *is* the GGN, checked on one random vector), it is assembled as ``Σ Jᵀ (∇²_out L) J``
    from the outputs' Jacobian, a few large matrix products per chunk; otherwise from
    ``P`` products with basis vectors.

    On a shard of the sample (torch.distributed: the objective's ``reduce``), each rank
    assembles its share and the shares are summed, so every rank factors the same matrix."""
    n = op.shape[0]
    damping = torch.as_tensor(op.damping, dtype=op.dtype, device=op.device)
    objective = op.objective
    v = torch.randn(n, dtype=op.dtype, generator=torch.Generator().manual_seed(0)).to(op.device)
    try:  # reduced products: every rank takes the same decision
        ggn = op.gauss_newton or _close(objective.hvp(op.block, v), objective.ggn_vp(op.block, v))
    except (RuntimeError, NotImplementedError):  # no Gauss-Newton products for this model
        ggn = False
    if ggn:
        part: torch.Tensor | None = None
        try:
            part = _gauss_newton_matrix(objective, op.block)
        except (RuntimeError, NotImplementedError, MemoryError):  # outputs too large, or not batchable
            pass
        if objective.reduce is not None:  # the ranks agree on the route before summing, or their collectives differ
            failed = objective.reduce(torch.tensor([float(part is None)], dtype=op.dtype, device=op.device))
            part = None if float(failed[0]) > 0 or part is None else objective.reduce(part)
        if part is not None:
            return 0.5 * (part + part.T) + torch.diag(damping.expand(n)), "gauss-newton jacobian"
    like = torch.zeros(1, dtype=op.dtype, device=op.device)
    return Explicit(max_params=n, block_size=block_size).matrix(op, n, like), "products with basis vectors"


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).norm()) <= 1e-9 * max(float(b.norm()), torch.finfo(b.dtype).tiny)


def _gauss_newton_matrix(objective: Objective, block: ParamBlock, max_outputs: int = 2048) -> torch.Tensor:
    """``(1/N) Σ_i J_iᵀ ∇²_{o_i} ℓ_i J_i`` over this process's examples (``N`` the whole
    sample's size; not reduced across ranks), in chunks of at most ``max_outputs`` output
    entries (the output Hessian of a chunk is dense)."""
    theta = objective.point(block)
    total = theta.new_zeros(block.numel, block.numel)
    if len(objective.batch) == 0:  # an empty shard adds nothing
        return total
    first = next(objective.batch.chunks(1))
    per_example = sum(leaf.numel() for leaf in tree_flatten(objective._forward(block.unflatten(theta), first))[0])
    if per_example > max_outputs:
        raise MemoryError(f"{per_example} outputs per example")
    chunk = max(1, max_outputs // per_example)
    n_total = objective.total
    for c in objective.batch.chunks(chunk):
        leaves, spec = tree_flatten(objective._forward(block.unflatten(theta), c))
        shapes = [t.shape for t in leaves]

        def flat_outputs(f: torch.Tensor, c: Batch = c) -> torch.Tensor:
            return torch.cat([t.reshape(-1) for t in tree_flatten(objective._forward(block.unflatten(f), c))[0]])

        def loss_of(o: torch.Tensor, c: Batch = c, shapes: list[torch.Size] = shapes, spec: Any = spec) -> torch.Tensor:
            parts, at = [], 0
            for shape in shapes:
                size = math.prod(shape)
                parts.append(o[at : at + size].reshape(shape))
                at += size
            return mean_loss(objective.loss_fn, tree_unflatten(parts, spec), c, objective.forward)

        o = flat_outputs(theta).detach()
        J = jacrev(flat_outputs)(theta)  # [outputs, P]
        H = hessian(loss_of)(o)  # [outputs, outputs], block diagonal over examples
        total += (len(c) / n_total) * (J.T @ (H @ J))
    return total


class ExactInverse:
    """``(∇²_ΘΘ F + λI)⁻¹`` of a small head, formed densely from products and factored
    once (Cholesky; eigenvalues when it is not positive definite), then applied to any
    number of right-hand sides. The :class:`~lissa_influence.solvers.Solver` the
    fixed-embedding finetune solve uses by default where the head fits."""

    name = "exact"

    def __init__(self, max_params: int = 10_000, block_size: int = 256):
        self.max_params, self.block_size = max_params, block_size
        self.assembly = ""
        # the operator it was built for, that operator's damping then, and the factor
        self._factor: tuple[CurvatureOperator, torch.Tensor, tuple[str, torch.Tensor, torch.Tensor | None, float, int]]
        self._factor = None  # type: ignore[assignment]

    def _factorised(self, op: CurvatureOperator) -> tuple[str, torch.Tensor, torch.Tensor | None, float, int]:
        damping = torch.as_tensor(op.damping).detach().clone()
        cached = self._factor
        if cached is None or cached[0] is not op or not torch.equal(cached[1], damping):
            t0 = time.perf_counter()
            n = op.shape[0]
            if n > self.max_params:
                raise MemoryError(f"the exact head inverse refuses {n} parameters (limit {self.max_params})")
            a, self.assembly = dense_curvature(op, self.block_size)
            if not torch.isfinite(a).all():
                raise DivergenceError("the head's Hessian holds NaN or inf; check the damping and the parameters")
            chol, info = torch.linalg.cholesky_ex(a)
            entry: tuple[str, torch.Tensor, torch.Tensor | None, float, int]
            if int(info) == 0:
                entry = ("cholesky", chol, None, time.perf_counter() - t0, n)
            else:  # not positive definite (a head far from its minimum): the pseudo-inverse on |λ|
                evals, evecs = torch.linalg.eigh(a)
                log.warning(
                    "the damped head Hessian is not positive definite (eigenvalues from %.3g); solving on |λ|",
                    float(evals[0]),
                )
                mag = evals.abs()
                inv = torch.where(mag > torch.finfo(mag.dtype).eps * mag.max(), 1 / mag, torch.zeros_like(mag))
                entry = ("eigh", evecs, inv, time.perf_counter() - t0, n)
            self._factor = (op, damping, entry)  # one operator at a time: a refit replaces it
        return self._factor[2]

    def solve(self, matvec: Any, b: torch.Tensor, callback: Callback | None = None) -> tuple[torch.Tensor, SolveInfo]:
        if not isinstance(matvec, CurvatureOperator):
            raise TypeError("ExactInverse solves a CurvatureOperator (it caches the factor per operator)")
        check_rhs(b)
        start = time.perf_counter()
        B, single = as_stack(b)
        before = self._factor
        with eval_mode(matvec.objective.model):  # as the operator's own products (a user may call this directly)
            method, f, evals, factor_s, n = self._factorised(matvec)
        built = self._factor is not before
        B64 = B.to(matvec.dtype)
        if method == "cholesky":
            X = torch.cholesky_solve(B64.T, f).T
        else:
            assert evals is not None  # here the inverse magnitudes, small ones cut to 0
            X = ((B64 @ f) * evals) @ f.T
        resid = float((rownorm(matvec(X) - B64) / rownorm(B64).clamp_min(torch.finfo(B64.dtype).tiny)).max())
        X = X.to(B.dtype)
        # the residual check's products, and what forming the matrix took: n basis-vector
        # products, or the two that showed the Hessian equals the Gauss-Newton matrix
        products = B.shape[0] + ((n if self.assembly.startswith("products") else 2) if built else 0)
        converged = resid <= torch.finfo(matvec.dtype).eps ** 0.5
        if not converged:
            warnings.warn(
                f"the exact head solve left a relative residual of {resid:.3g} ({method}): the damped head Hessian "
                "is (nearly) singular; add finetune damping",
                SolverWarning,
                stacklevel=2,
            )
        info = SolveInfo(
            "exact",
            converged,
            1,
            products,
            time.perf_counter() - start,
            [resid],
            {
                "method": method,
                "dtype": str(matvec.dtype),
                "factor_seconds": factor_s,
                "size": n,
                "assembly": self.assembly,
            },
        )
        if callback is not None:
            callback(X[0] if single else X, products)
        return (X[0] if single else X), info
