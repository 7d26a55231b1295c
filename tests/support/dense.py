"""A dense reference for influence with any model, forward and loss: full Hessians by
double backward (every loss has a reverse-mode derivative) and ``torch.linalg.solve``;
gradients one example at a time. Independent of the library's
products, solvers and scoring."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.func import grad

from lissa_influence.params import ParamBlock, Params

Loss = Callable[[Params], torch.Tensor]  # a scalar loss of the full parameter dict


def hessian(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Row by row with plain autograd (double backward), no ``vmap``: the batching rules
    of some kernels (attention under a padding mask) gave asymmetric Hessians."""
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x), x, create_graph=True)
    rows = [torch.autograd.grad(g[i], x, retain_graph=True)[0] for i in range(len(x))]
    return torch.stack(rows).detach()


def single_stage(
    params: Params, block: ParamBlock, train: Loss, tests: Sequence[Loss], examples: Sequence[Loss], damping: float
) -> torch.Tensor:
    """``I(z) = −∇ℓᵀ (∇²G + λI)⁻¹ ∇g(z)``, ``[len(tests), len(examples)]``."""
    theta = block.flatten(params)

    def at(loss: Loss) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda f: loss({**params, **block.unflatten(f)})

    H = hessian(at(train), theta) + damping * torch.eye(block.numel, dtype=theta.dtype)
    G = torch.stack([grad(at(e))(theta) for e in examples])
    T = torch.stack([grad(at(t))(theta) for t in tests])
    return -T @ torch.linalg.solve(H, G.T)


def multistage_fixed(
    pre_params: Params,
    ft_params: Params,
    W: ParamBlock,
    U: ParamBlock,
    T: ParamBlock,
    pretrain: Loss,
    finetune: Loss,
    tests: Sequence[Loss],
    examples: Sequence[Loss],
    lam_pre: float,
    lam_ft: float,
) -> torch.Tensor:
    """The embedding-fixed chain of docs/math.md, ``[len(tests), len(examples)]``."""
    WU, WT, nW = W + U, W + T, W.numel
    wu, wt = WU.flatten(pre_params), WT.flatten(ft_params)

    def pre_at(loss: Loss) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda f: loss({**pre_params, **WU.unflatten(f)})

    def ft_at(loss: Loss) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda f: loss({**ft_params, **WT.unflatten(f)})

    eye = lambda n: torch.eye(n, dtype=wu.dtype)  # noqa: E731
    H_pre = hessian(pre_at(pretrain), wu) + lam_pre * eye(WU.numel)
    H_ft = hessian(ft_at(finetune), wt)
    G = torch.stack([grad(pre_at(e))(wu) for e in examples])
    rows = []
    for t in tests:
        g = grad(ft_at(t))(wt)
        v = torch.linalg.solve(H_ft[nW:, nW:] + lam_ft * eye(T.numel), g[nW:])
        u = g[:nW] - H_ft[:nW, nW:] @ v
        s = torch.linalg.solve(H_pre, torch.cat([u, torch.zeros(U.numel, dtype=wu.dtype)]))
        rows.append(-(G @ s))
    return torch.stack(rows)


def single_stage_of(
    model: torch.nn.Module,
    loss: Callable,
    x: torch.Tensor,
    y: torch.Tensor,
    tests: int,
    damping: float,
    block: ParamBlock,
) -> torch.Tensor:
    """:func:`single_stage` for ``(x, y)`` tensors: the first ``tests`` examples as test
    points, every example scored, ``loss(model(x), y)`` as the mean loss."""
    from torch.func import functional_call

    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def mean_loss(rows: slice) -> Loss:
        return lambda p: loss(functional_call(model, p, (x[rows],)), y[rows])

    return single_stage(
        params,
        block,
        mean_loss(slice(None)),
        [mean_loss(slice(j, j + 1)) for j in range(tests)],
        [mean_loss(slice(i, i + 1)) for i in range(len(x))],
        damping,
    )
