"""Tiny MNIST and CIFAR-10 files in the exact on-disk formats torchvision reads.

So the real loading code runs in tests without the real (large, downloaded) files.
"""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np


def write_idx(path: str, array: np.ndarray) -> None:
    """An idx ("SN3 Pascal Vincent") file of uint8: magic 0x0000 08 <ndim>, big-endian dims."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(struct.pack(">I", 0x0800 | array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.tobytes())


def fake_images(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def cycle_labels(n: int, offset: int = 0) -> np.ndarray:
    return ((np.arange(n) + offset) % 10).astype(np.uint8)


def write_fake_mnist(root: str, n_train: int = 60, n_test: int = 30) -> dict[str, np.ndarray]:
    """``root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``; returns the arrays."""
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": fake_images(n_train, (28, 28), seed=0),
        "train-labels-idx1-ubyte": cycle_labels(n_train),
        "t10k-images-idx3-ubyte": fake_images(n_test, (28, 28), seed=1),
        "t10k-labels-idx1-ubyte": cycle_labels(n_test, offset=3),
    }
    for name, array in arrays.items():
        write_idx(os.path.join(raw, name), array)
    return arrays


def write_fake_cifar10(root: str, per_batch: int = 20, n_test: int = 20) -> dict[str, dict]:
    """``root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` as pickled
    dicts (uint8 ``data`` N x 3072 in channel-major order, list ``labels``)."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    batches = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        n = n_test if name == "test_batch" else per_batch
        batches[name] = {
            "batch_label": name,
            "data": fake_images(n, (3 * 32 * 32,), seed=10 + k),
            "labels": cycle_labels(n, offset=k).astype(int).tolist(),
            "filenames": [f"{name}_{i}.png" for i in range(n)],
        }
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]}
    for name, entry in {**batches, "batches.meta": meta}.items():
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(entry, f, protocol=2)  # the official files are python-2 era pickles
    return batches
