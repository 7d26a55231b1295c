"""lissa_influence.estimator: what both estimators share (query vectors in chunks, scores from
saved query vectors, removal effects), and the names kept at their old home."""

import pytest
import torch

from lissa_influence import Explicit, Influence, InfluenceEstimator
from lissa_influence.estimator import eval_mode, hessian_sample, trainable_params
from lissa_influence.sample import hessian_sample as sample_home
from lissa_influence.task import eval_mode as task_home

from conftest import TinyMLP, make_data


@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    model = TinyMLP().double()
    train, test = make_data(24, (5,), 3, seed=60), make_data(5, (5,), 3, seed=61)
    return model, train, test


def test_query_chunks_scores_from_and_removal_effects_agree(fitted):
    model, train, test = fitted
    settings = dict(damping=1.0, hessian_samples="all", solver=Explicit())
    whole = Influence(model, **settings).fit((train.x, train.y))
    chunked = Influence(model, query_chunk=2, **settings).fit((train.x, train.y))
    s = whole.query_vectors((test.x, test.y))
    assert torch.allclose(chunked.query_vectors((test.x, test.y)), s, rtol=1e-12)
    assert len(chunked.diagnostics["chunks"]) == 3
    scores = whole.scores_from(whole.as_query_vectors(s.numpy()))
    assert torch.allclose(scores, whole.scores((test.x, test.y)), rtol=1e-12)
    assert torch.allclose(whole.removal_effects((test.x, test.y)), -scores / len(train), rtol=1e-12)
    assert whole.is_fitted and whole.num_scored == len(whole.scored_data) == 24


def test_the_estimators_share_one_base_and_keep_their_old_names():
    assert issubclass(Influence, InfluenceEstimator)
    assert eval_mode is task_home and hessian_sample is sample_home and callable(trainable_params)
    with pytest.raises(RuntimeError, match="fit"):
        Influence(TinyMLP()).scores((torch.zeros(1, 5), torch.zeros(1, dtype=torch.long)))
