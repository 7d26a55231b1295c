"""lissa_influence.results: score shards written once, checked on reopening, resumed after a kill."""

import numpy as np
import pytest
import torch

from lissa_influence import Explicit, Influence
from lissa_influence.results import ResultsMismatchError, ShardStore, config_diff, config_hash, resumable_scores

from conftest import TinyMLP, make_data


def test_a_store_is_refused_for_another_configuration(tmp_path):
    config = {"solver": {"name": "cg", "tol": 1e-6}, "seed": 0}
    store = ShardStore(tmp_path, config_hash(config), n=5, k=2, shard_size=2, config=config)
    assert store.num_shards == 3 and store.bounds(2) == (4, 5) and store.pending() == [0, 1, 2]
    other = {"solver": {"name": "cg", "tol": 1e-8}, "seed": 0}
    assert config_diff(config, other) == ["solver.tol: 1e-06 -> 1e-08"]
    with pytest.raises(ResultsMismatchError, match="solver.tol"):
        ShardStore(tmp_path, config_hash(other), n=5, k=2, shard_size=2, config=other)
    with pytest.raises(ResultsMismatchError):
        ShardStore(tmp_path, config_hash(config), n=5, k=2, shard_size=3, config=config)


def test_resumable_scores_equal_the_estimators_and_resume(tmp_path):
    torch.manual_seed(0)
    model = TinyMLP().double()
    train, test = make_data(20, (5,), 3, seed=40), make_data(3, (5,), 3, seed=41)
    inf = Influence(model, damping=1.0, hessian_samples="all", solver=Explicit()).fit((train.x, train.y))
    expected = inf.scores((test.x, test.y))
    written = []
    s, scores, info = resumable_scores(
        inf, (test.x, test.y), tmp_path, "h", shard_size=6, on_shard=lambda i, lo, hi: written.append(i)
    )
    assert torch.allclose(scores, expected, rtol=1e-12) and written == [0, 1, 2, 3]
    store = ShardStore(tmp_path, "h", n=20, k=3, shard_size=6)
    store.shard_file(2).unlink()  # as if killed before this shard was written
    again = []
    with pytest.warns(UserWarning, match="shard_00002.npy is missing"):
        _, rescored, _ = resumable_scores(
            inf, (test.x, test.y), tmp_path, "h", shard_size=6, on_shard=lambda i, lo, hi: again.append(i)
        )
    assert again == [2] and np.array_equal(rescored.numpy(), scores.numpy())
