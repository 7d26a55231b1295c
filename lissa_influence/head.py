"""The fixed-embedding finetuning stage as a function of the head alone.

With the embedding fixed, the finetuning objective depends on the head ``Θ`` only, and
every finetune product ran the whole network to recompute the same embedding outputs.
:func:`head_objective` computes those outputs once for the Hessian sample (a forward
hook on the embedding module) and returns an :class:`~lissa_influence.objective.Objective`
of ``Θ`` alone, in which the embedding module replays them: the model's own forward
still runs around it, so any head (a Linear, an MLP, a transformer's classifier) and any
``forward`` / ``loss`` work. It is used only after a check: the head objective's loss
and gradient on the first chunk must equal the full network's, which fails for a model
that calls its embedding twice, or transforms the input only on the way to it.

Its products cost a small fraction of the full ones (no convolution runs), and a head
of up to some thousands of parameters is small enough to factor exactly
(:class:`~lissa_influence.solvers.direct.ExactInverse`, re-exported here, its home before
0.2), in float64, which removes the finetune solve's ill-conditioning (damping 1e-8 on a
softmax head whose Hessian is singular) from the chain.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from .batching import Batch
from .objective import Objective
from .operators import ModelOperator
from .params import ParamBlock, Params, make_block
from .solvers.direct import ExactInverse  # its home before 0.2
from .task import mean_loss, outputs

__all__ = ["ExactInverse", "embedding_module", "head_objective"]


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
    """The path of the outermost submodule whose parameters are exactly ``names``.

    Its trainable parameters, or all of them for a frozen embedding: the embedding whose
    outputs the head reads.

    Args:
        model: the finetuned model.
        names: the embedding's parameter names.

    Returns:
        The module path, or None.
    """
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
    """``objective`` restricted to the block ``theta``, the embedding replaced by its outputs.

    The embedding module at path ``embedding`` is replaced by its precomputed outputs on the
    Hessian sample.

    Args:
        objective: the full finetuning objective.
        embedding: the embedding module's path.
        theta: the head's block.
        dtype: the head objective's dtype (None: the objective's).

    Returns:
        ``(head objective, its block)``.

    Raises:
        ValueError: the head objective does not reproduce the full one (loss and ``∇_Θ`` on
            the first chunk), or the embedding's outputs cannot be replayed.
    """
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


def dense_curvature(op: ModelOperator, block_size: int = 256) -> tuple[torch.Tensor, str]:
    """The dense damped matrix of ``op`` and how it was formed (its home before 0.2; now
    :meth:`~lissa_influence.curvature.CurvatureOperator.dense`).

    Args:
        op: a :class:`~lissa_influence.operators.ModelOperator`.
        block_size: basis vectors per stacked product.

    Returns:
        ``(matrix, how)``.
    """
    return op.dense(block_size)
