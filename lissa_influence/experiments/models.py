"""The paper's networks (Table A of Chen et al. 2020) as two-stage models.

A :class:`TwoStageNet` is ``head(embedding(x))``. Parameter names therefore start
with ``embedding.`` (W of docs/math.md, shared between the stages) or ``head.`` (U for the
pretrained model, Theta for the finetuned one). Only plain Conv/Tanh/MaxPool/Linear
layers are used: no BatchNorm or dropout, so the loss is a deterministic function of
the parameters, which influence functions need.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

EMBEDDING = "embedding"
HEAD = "head"


@dataclass(frozen=True)
class ModelConfig:
    """Which network to build, how to seed its initialisation, and its float type."""

    arch: str = "digits"
    seed: int = 0
    dtype: str = "float32"  # "float32" or "float64"; float64 helps when checking theory


class TwoStageNet(nn.Module):
    """``forward(x) = head(embedding(x))``; the two submodules split W from U/Theta."""

    def __init__(
        self, embedding: nn.Module, head: nn.Module, arch: str = "", input_shape: tuple[int, ...] | None = None
    ):
        super().__init__()
        self.embedding = embedding
        self.head = head
        self.arch = arch
        self.input_shape = tuple(input_shape) if input_shape is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A wrong image size would otherwise fail deep inside a Linear layer.
        if self.input_shape is not None and tuple(x.shape[-3:]) != self.input_shape:
            raise ValueError(
                f"'{self.arch}' model expects images of shape {self.input_shape} (C, H, W), "
                f"got a tensor of shape {tuple(x.shape)}; pick the arch that matches the dataset"
            )
        return self.head(self.embedding(x))

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, input_shape={self.input_shape}"


# --- Table A -------------------------------------------------------------------------


def _digits_embedding() -> nn.Module:
    # 1x8x8 -> 8x6x6 -> 16x4x4 -> pool 16x2x2 = 64 features; small enough for dense Hessians.

    # Average pooling, unlike Table A's max-pooling, keeps the loss smooth, so that
    # L-BFGS reaches a true stationary point and the Hessian there is well defined.
    return nn.Sequential(
        nn.Conv2d(1, 8, 3),
        nn.Tanh(),
        nn.Conv2d(8, 16, 3),
        nn.Tanh(),
        nn.AvgPool2d(2, 2),
        nn.Flatten(),
    )


def _mnist14_embedding() -> nn.Module:
    # MNIST downsampled to 1x14x14 (data.image_size=14) -> 8x6x6 -> 16x2x2 = 64 features,
    # strided instead of pooled: one float64 pass over the 1600 pretraining images takes
    # ~12 ms on one core (the 8x8 digits' unstrided layers at 14x14: ~170 ms), so L-BFGS
    # reaches a stationary point and leave-one-out retrains in seconds (docs/validation.md).
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2),
        nn.Tanh(),
        nn.Conv2d(8, 16, 3, stride=2),
        nn.Tanh(),
        nn.Flatten(),
    )


def _mnist_embedding() -> nn.Module:
    # 1x28x28 -> 32x24x24 -> 32x12x12 -> 64x8x8 -> 64x4x4 = 1024 features.
    return nn.Sequential(
        nn.Conv2d(1, 32, 5),
        nn.Tanh(),
        nn.MaxPool2d(2, 2),
        nn.Conv2d(32, 64, 5),
        nn.Tanh(),
        nn.MaxPool2d(2, 2),
        nn.Flatten(),
    )


def _cifar_embedding() -> nn.Module:
    # 3x32x32 -> 30 -> 27 -> pool 13 -> 12 -> pool 6 -> 5 -> pool 2: 128x2x2 = 512 features.
    return nn.Sequential(
        nn.Conv2d(3, 32, 3),
        nn.Tanh(),
        nn.Conv2d(32, 64, 4),
        nn.Tanh(),
        nn.MaxPool2d(2, 2),
        nn.Conv2d(64, 128, 2),
        nn.Tanh(),
        nn.MaxPool2d(2, 2),
        nn.Conv2d(128, 128, 2),
        nn.Tanh(),
        nn.MaxPool2d(2, 2),
        nn.Flatten(),
    )


def _linear_head(features: int) -> Callable[[int], nn.Module]:
    return lambda classes: nn.Sequential(nn.Linear(features, classes))


def _cifar_head(classes: int) -> nn.Module:
    # Tanh after every layer but the last; the output is raw logits.
    return nn.Sequential(nn.Linear(512, 1500), nn.Tanh(), nn.Linear(1500, classes))


@dataclass(frozen=True)
class _Arch:
    input_shape: tuple[int, int, int]
    embedding: Callable[[], nn.Module]
    head: Callable[[int], nn.Module]
    features: int


ARCHS: dict[str, _Arch] = {
    "digits": _Arch((1, 8, 8), _digits_embedding, _linear_head(64), 64),
    "mnist": _Arch((1, 28, 28), _mnist_embedding, _linear_head(1024), 1024),
    "mnist14": _Arch((1, 14, 14), _mnist14_embedding, _linear_head(64), 64),
    "cifar": _Arch((3, 32, 32), _cifar_embedding, _cifar_head, 512),
}

# The arch that fits each dataset name of lissa_influence.experiments.data.
ARCH_FOR_DATASET = {"digits": "digits", "mnist": "mnist", "cifar10": "cifar"}


def _arch(arch: str) -> _Arch:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid archs are {sorted(ARCHS)}")
    return ARCHS[arch]


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    valid = {"float32": torch.float32, "float64": torch.float64}
    if dtype not in valid:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(valid)}")
    return valid[dtype]


def _check_classes(classes: int) -> None:
    if not isinstance(classes, int) or classes < 2:
        raise ValueError(f"classes must be an int >= 2 (cross-entropy over classes), got {classes!r}")


def _seeded(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    # Seed the init without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def input_shape(arch: str) -> tuple[int, int, int]:
    """The (C, H, W) image shape the arch expects."""
    return _arch(arch).input_shape


def build_embedding(arch: str) -> nn.Module:
    """The CNN layers of Table A (uses the global RNG for init; see build_model)."""
    return _arch(arch).embedding()


def build_head(arch: str, classes: int) -> nn.Module:
    """The fully connected layers of Table A ending in ``classes`` logits."""
    _check_classes(classes)
    return _arch(arch).head(classes)


def build_model(arch: str, classes: int, seed: int, dtype: str | torch.dtype = torch.float32) -> TwoStageNet:
    """A freshly initialised model; the same (arch, classes, seed) gives the same weights."""
    spec = _arch(arch)
    _check_classes(classes)
    model = _seeded(seed, lambda: TwoStageNet(spec.embedding(), spec.head(classes), arch, spec.input_shape))
    return cast(TwoStageNet, model.to(_dtype(dtype)))


def build_from_config(cfg: ModelConfig, classes: int) -> TwoStageNet:
    return build_model(cfg.arch, classes, cfg.seed, cfg.dtype)


def finetune_model_from(pretrained: TwoStageNet, classes: int, seed: int) -> TwoStageNet:
    """A finetuning model: a deep copy of the pretrained embedding and a new seeded head.

    The copy shares values, not storage, so training it never changes ``pretrained``.
    """
    if not isinstance(pretrained, TwoStageNet) or pretrained.arch not in ARCHS:
        raise TypeError("finetune_model_from needs a TwoStageNet made by build_model")
    ref = next(pretrained.parameters())
    head = _seeded(seed, lambda: build_head(pretrained.arch, classes)).to(device=ref.device, dtype=ref.dtype)
    return TwoStageNet(copy.deepcopy(pretrained.embedding), head, pretrained.arch, pretrained.input_shape)


def embedding_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.startswith(EMBEDDING + ".")]


def head_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.startswith(HEAD + ".")]


def embedding_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached clones of the embedding parameters, keyed by full name (W* of docs/math.md)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(EMBEDDING + ".")}


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
