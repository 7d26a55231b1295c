"""Tiny models, data and dense references shared by the tests (re-exported by tests/conftest.py,
which the tests import them from). float64 where exactness is the point."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, hessian

from lissa_influence.batching import Batch
from lissa_influence.params import ParamBlock
from lissa_influence.task import cross_entropy

# The test models are tiny: one thread avoids OpenMP oversubscription, which on a shared
# 2-core machine made products 100x slower. Benchmarks set their own thread counts.
torch.set_num_threads(1)


class TinyCNN(nn.Module):
    """Conv embedding + linear head on 1x6x6 inputs (69 parameters with 3 channels)."""

    def __init__(self, classes: int = 3, channels: int = 3):
        super().__init__()
        self.embedding = nn.Sequential(nn.Conv2d(1, channels, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten())
        self.head = nn.Linear(4 * channels, classes)

    def forward(self, x):
        return self.head(self.embedding(x))


class TinyMLP(nn.Module):
    def __init__(self, d_in: int = 5, hidden: int = 6, classes: int = 3):
        super().__init__()
        self.embedding = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.embedding(x))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative difference ``‖a − b‖ / ‖b‖``."""
    return float((a - b).norm() / b.norm())


def make_data(
    n: int, shape: tuple[int, ...], classes: int, seed: int, dtype=torch.float64, noise: float | None = None
) -> Batch:
    """Random inputs; labels uniform at random, or (with ``noise``) from a fixed random
    linear teacher plus Gaussian noise, so that a model learns without interpolating."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=dtype)
    if noise is None:
        return Batch(x, torch.randint(0, classes, (n,), generator=g))
    teacher = torch.randn(x[0].numel(), classes, generator=torch.Generator().manual_seed(1234), dtype=dtype)
    logits = x.reshape(n, -1) @ teacher + noise * torch.randn(n, classes, generator=g, dtype=dtype)
    return Batch(x, logits.argmax(1))


def dense_hessian(model, params, block: ParamBlock, batch: Batch, loss_fn=cross_entropy) -> torch.Tensor:
    """Reference ∇²L over the whole batch by torch.func.hessian (no chunking, no vmap)."""

    def loss(flat):
        p = {**params, **block.unflatten(flat)}
        return loss_fn(functional_call(model, p, (batch.x,)), batch.y)

    return hessian(loss)(block.flatten(params))


def train_full_batch(model, batch: Batch, steps: int = 200, weight_decay: float = 0.0) -> None:
    """L-BFGS to a near-stationary point (full batch, deterministic)."""
    opt = torch.optim.LBFGS(
        model.parameters(),
        lr=1,
        max_iter=steps,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = cross_entropy(model(batch.x), batch.y)
        if weight_decay:
            loss = loss + 0.5 * weight_decay * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
