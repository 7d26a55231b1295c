import os
from urllib.error import URLError

import numpy as np
import pytest
import torch

from lissa_influence.experiments import data as data_mod
from lissa_influence.experiments.data import (
    DataConfig,
    DatasetDownloadError,
    DatasetFormatError,
    DatasetNotFoundError,
    TwoStageData,
    load_two_stage,
)

from fake_datasets import write_fake_cifar10, write_fake_mnist

SPLITS = ("pretrain_train", "pretrain_test", "finetune_train", "finetune_test")


@pytest.fixture(scope="module")
def digits() -> TwoStageData:
    return load_two_stage(DataConfig())


def check_split(ds, n_classes: int, shape: tuple[int, ...]):
    x, y = ds.tensors
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape[1:] == shape and len(x) == len(y) > 0
    assert 0 <= int(y.min()) and int(y.max()) < n_classes


# --- digits --------------------------------------------------------------------------


def test_digits_stages(digits):
    assert digits.name == "digits"
    assert digits.pretrain_classes == (0, 1, 2, 3)
    assert digits.finetune_classes == (4, 5, 6, 7, 8, 9)
    for split in SPLITS:
        n_cls = 4 if split.startswith("pretrain") else 6
        check_split(getattr(digits, split), n_cls, (1, 8, 8))
    # sklearn's digits: 720 images of 0-3, 1077 of 4-9; 20% of each held out.
    assert (len(digits.pretrain_train), len(digits.pretrain_test)) == (576, 144)
    assert (len(digits.finetune_train), len(digits.finetune_test)) == (862, 215)
    x = digits.pretrain_train.tensors[0]
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    # every class is present in every split
    for split in SPLITS:
        y = getattr(digits, split).tensors[1]
        assert len(torch.unique(y)) == (4 if split.startswith("pretrain") else 6)


def test_digits_train_and_test_are_disjoint(digits):
    from sklearn.datasets import load_digits

    total = len(load_digits().target)
    assert sum(len(getattr(digits, s)) for s in SPLITS) == total
    # rows are images; each sklearn image appears once, so no image is in two splits
    rows = torch.cat([getattr(digits, s).tensors[0].reshape(-1, 64) for s in SPLITS])
    assert len(torch.unique(rows, dim=0)) == len(torch.unique(torch.tensor(load_digits().data), dim=0))


def test_digits_seed_determinism(digits):
    again = load_two_stage(DataConfig(seed=0))
    other = load_two_stage(DataConfig(seed=1))
    for split in SPLITS:
        assert all(
            torch.equal(a, b)
            for a, b in zip(getattr(digits, split).tensors, getattr(again, split).tensors, strict=True)
        )
    assert not torch.equal(digits.pretrain_train.tensors[0], other.pretrain_train.tensors[0])
    assert digits.pretrain_digest == again.pretrain_digest != other.pretrain_digest


def test_digits_custom_classes_and_caps():
    d = load_two_stage(
        DataConfig(pretrain_classes=(3, 7), finetune_classes=(3, 7), finetune_subsample=50, test_per_stage=10)
    )
    assert d.pretrain_classes == d.finetune_classes == (3, 7)
    assert len(d.finetune_train) == 50 and len(d.pretrain_test) == len(d.finetune_test) == 10
    assert set(d.pretrain_train.tensors[1].tolist()) == {0, 1}


def test_normalize_uses_pretrain_statistics():
    d = load_two_stage(DataConfig(normalize=True))
    x = d.pretrain_train.tensors[0]
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std()) - 1) < 1e-3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "svhn"}, "valid names"),
        ({"pretrain_classes": (1,)}, "pretrain_classes"),
        ({"finetune_classes": (4, 4)}, "finetune_classes"),
        ({"finetune_classes": (4, 12)}, "0..9"),
        ({"test_fraction": 1.5}, "test_fraction"),
        ({"finetune_subsample": 0}, "finetune_subsample"),
    ],
)
def test_bad_config_is_explained(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_two_stage(DataConfig(**kwargs))


# --- MNIST (real torchvision parsing of idx files) -------------------------------------


def test_mnist_from_idx_files(tmp_path):
    arrays = write_fake_mnist(str(tmp_path), n_train=60, n_test=30)
    d = load_two_stage(DataConfig(name="mnist", root=str(tmp_path), finetune_subsample=10))
    for split in SPLITS:
        check_split(getattr(d, split), 4 if split.startswith("pretrain") else 6, (1, 28, 28))
    train_x, train_y = arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"]
    # all training examples of 0-3 are used for pretraining, in file order, scaled to [0, 1]
    keep = train_y < 4
    assert len(d.pretrain_train) == keep.sum() == 24
    expected = torch.from_numpy(train_x[keep].astype(np.float32) / 255.0).unsqueeze(1)
    assert torch.equal(d.pretrain_train.tensors[0], expected)
    assert d.pretrain_train.tensors[1].tolist() == train_y[keep].tolist()
    # finetuning: seeded subsample of the 36 examples of 4-9, labels 4..9 -> 0..5
    assert len(d.finetune_train) == 10
    # test points come from the t10k files (labels offset by 3 there)
    test_y = arrays["t10k-labels-idx1-ubyte"]
    assert len(d.pretrain_test) == (test_y < 4).sum() and len(d.finetune_test) == (test_y >= 4).sum()
    assert torch.equal(d.finetune_test.tensors[1], torch.from_numpy(test_y[test_y >= 4].astype(np.int64) - 4))


def test_mnist_subsample_is_seeded(tmp_path):
    write_fake_mnist(str(tmp_path))
    cfg = DataConfig(name="mnist", root=str(tmp_path), finetune_subsample=10)
    a, b = load_two_stage(cfg), load_two_stage(cfg)
    c = load_two_stage(DataConfig(name="mnist", root=str(tmp_path), finetune_subsample=10, seed=5))
    assert torch.equal(a.finetune_train.tensors[0], b.finetune_train.tensors[0])
    assert not torch.equal(a.finetune_train.tensors[0], c.finetune_train.tensors[0])


def test_mnist_missing_files_offline(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_two_stage(DataConfig(name="mnist", root=str(tmp_path)))
    assert isinstance(err.value, FileNotFoundError)
    message = str(err.value)
    assert os.path.join(str(tmp_path), "MNIST", "raw") in message
    assert "train-images-idx3-ubyte" in message and "data.download=true" in message


@pytest.mark.parametrize(
    "name, downloader, advice",
    [
        ("mnist", "torchvision.datasets.mnist.download_and_extract_archive", "put the uncompressed idx files there"),
        ("cifar10", "torchvision.datasets.utils.download_and_extract_archive", "extract cifar-10-python.tar.gz"),
    ],
)
def test_failed_download_is_explained(tmp_path, monkeypatch, name, downloader, advice):
    def offline(*args, **kwargs):
        raise URLError("no internet")

    monkeypatch.setattr(downloader, offline)
    with pytest.raises(DatasetDownloadError, match=advice):
        load_two_stage(DataConfig(name=name, root=str(tmp_path), download=True))


# --- CIFAR-10 (python pickle batches) ------------------------------------------------


def test_cifar10_from_pickle_batches(tmp_path):
    batches = write_fake_cifar10(str(tmp_path), per_batch=20, n_test=20)
    d = load_two_stage(DataConfig(name="cifar10", root=str(tmp_path)))
    assert d.pretrain_classes == (2, 6) and len(d.finetune_classes) == 8
    for split in SPLITS:
        check_split(getattr(d, split), 2 if split.startswith("pretrain") else 8, (3, 32, 32))
    data = np.concatenate([batches[f"data_batch_{i}"]["data"] for i in range(1, 6)])
    labels = np.concatenate([batches[f"data_batch_{i}"]["labels"] for i in range(1, 6)])
    keep = (labels == 2) | (labels == 6)
    # channel-major rows -> C x H x W, scaled to [0, 1]; bird -> 0, frog -> 1
    expected = torch.from_numpy(data[keep].reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
    assert torch.equal(d.pretrain_train.tensors[0], expected)
    assert d.pretrain_train.tensors[1].tolist() == [0 if c == 2 else 1 for c in labels[keep]]
    assert len(d.finetune_train) == (~keep).sum()  # fewer than 5000: all kept
    test_labels = np.array(batches["test_batch"]["labels"])
    assert len(d.pretrain_test) == np.isin(test_labels, [2, 6]).sum()


def test_cifar10_presets_choose_classes(tmp_path):
    write_fake_cifar10(str(tmp_path))
    same_task = load_two_stage(DataConfig(name="cifar10", root=str(tmp_path), finetune_classes=(2, 6)))
    assert torch.equal(same_task.pretrain_train.tensors[0], same_task.finetune_train.tensors[0])
    other = load_two_stage(DataConfig(name="cifar10", root=str(tmp_path), finetune_classes=(1, 4)))
    assert other.finetune_classes == (1, 4) and set(other.finetune_train.tensors[1].tolist()) == {0, 1}


def test_cifar10_missing_files_offline(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_two_stage(DataConfig(name="cifar10", root=str(tmp_path)))
    message = str(err.value)
    assert os.path.join(str(tmp_path), "cifar-10-batches-py") in message and "data.download=true" in message


def test_cifar10_corrupt_batch(tmp_path):
    write_fake_cifar10(str(tmp_path))
    with open(os.path.join(str(tmp_path), "cifar-10-batches-py", "data_batch_3"), "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(DatasetFormatError, match="data_batch_3"):
        load_two_stage(DataConfig(name="cifar10", root=str(tmp_path)))


def test_loaders_cover_the_dataset_names():
    assert set(data_mod.DATASETS) == set(data_mod._LOADERS) == set(data_mod.DEFAULT_CLASSES)
