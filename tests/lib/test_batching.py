"""lissa_influence.batching: data as the library reads it, and the seeded subsample."""

import pytest
import torch

from lissa_influence.batching import Batch, as_dataset, gather, subsample_indices


def test_pairs_and_trees_select_chunk_and_map():
    pairs = Batch(torch.arange(10.0).reshape(5, 2), torch.arange(5))
    assert pairs.pair and len(pairs) == 5 and [len(c) for c in pairs.chunks(2)] == [2, 2, 1]
    assert torch.equal(pairs.select(slice(1, 3)).y, torch.tensor([1, 2]))
    tree = Batch({"ids": torch.zeros(4, 3, dtype=torch.long), "mask": torch.ones(4, 3)})
    assert not tree.pair and len(tree) == 4 and tree.tree is tree.x
    assert tree.map(lambda t: t[:2]).x["mask"].shape == (2, 3) and len(tree.tensors()) == 2


def test_any_data_reads_the_same_and_the_subsample_is_seeded():
    x, y = torch.randn(6, 2, dtype=torch.float64), torch.arange(6)
    for data in ((x, y), torch.utils.data.TensorDataset(x, y), list(zip(x, y, strict=True))):
        source = as_dataset(data)
        batch = gather(source, [4, 1], torch.float64, torch.device("cpu"))
        assert torch.equal(batch.x, x[[4, 1]]) and torch.equal(batch.y, y[[4, 1]])
    a, b = subsample_indices(100, 10, seed=3), subsample_indices(100, 10, seed=3)
    assert torch.equal(a, b) and len(set(a.tolist())) == 10
    with pytest.raises(ValueError, match="empty"):
        as_dataset((x[:0], y[:0]), "training data")
