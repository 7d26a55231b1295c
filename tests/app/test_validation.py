"""Leave-one-out under several retraining seeds: averaged changes, the noise floor, the cache."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lissa_influence.experiments import validation
from lissa_influence.experiments.data import DataConfig, load_two_stage
from lissa_influence.experiments.models import build_model, finetune_model_from

from hydra_helpers import compose_cfg


def synthetic_changes(noise: float, seeds: int = 6, removals: int = 24) -> np.ndarray:
    """``[S, K, 1]``: one true change per removal, plus independent noise per seed."""
    g = np.random.default_rng(0)
    return (g.normal(size=removals)[None, :] + noise * g.normal(size=(seeds, removals)))[:, :, None]


def test_noise_floor_separates_reproducible_changes_from_seed_noise():
    clean = validation.noise_floor(synthetic_changes(0.1), None, list(range(6)), stochastic=True)
    assert clean["resolved"] is True and clean["split_half"]["low"] > 0.9
    assert clean["reliability_all_seeds"] > clean["split_half"]["estimate"]  # more seeds, more reliable
    noisy = validation.noise_floor(synthetic_changes(30.0), None, list(range(6)), stochastic=True)
    assert noisy["resolved"] is False and noisy["split_half"]["low"] < 0 < noisy["split_half"]["high"]
    assert noisy["median_standard_error"] == pytest.approx(30 / np.sqrt(6), rel=0.3)  # the noise, over sqrt(S)
    one = validation.noise_floor(synthetic_changes(0.1, seeds=1), None, [0], stochastic=True)
    assert one["resolved"] is None and "validate.seeds >= 2" in one["note"]
    assert validation.noise_floor(synthetic_changes(0.1), 0, [0], stochastic=False)["kind"] == "deterministic"


@pytest.fixture(scope="module")
def digits():
    data = load_two_stage(DataConfig(test_per_stage=6))
    pre = build_model("digits", 4, 0, torch.float64)
    return data, pre, finetune_model_from(pre, 6, 0)


def loo_cfg(tmp_path, *overrides: str):
    return OmegaConf.merge(
        compose_cfg(
            "validate.enabled=true", "validate.num_examples=3", "progress=false", f"cache_dir={tmp_path}", *overrides
        ),
        {"validate": {"pretrain_steps": 3, "finetune_steps": 3, "polish_iters": 0, "batch_size": 64}},
    )


def test_seed_averaged_leave_one_out(digits, tmp_path):
    data, pre, ft = digits
    cfg = loo_cfg(tmp_path, "validate.seeds=3")
    scores = torch.randn(1, len(data.pretrain_train), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    test = tuple(t[:4] for t in data.finetune_test.tensors)
    result = validation.run(cfg, data, pre, ft, scores, test, tmp_path, exclude=[int(scores[0].argmax())])
    saved = json.loads((tmp_path / "loo.json").read_text())
    assert saved["seeds"] == [0, 1, 2] and result["seconds"]["retrainings"] == 3 * 4
    assert int(scores[0].argmax()) not in [e["index"] for e in saved["examples"]]  # excluded: the calibration's
    controls = saved["control_test_loss_per_seed"]
    assert len(set(controls)) == 3  # the minibatch order moves the control: the seeds differ
    for e in saved["examples"]:
        assert len(e["actual_per_seed"]) == 3
        assert e["actual"] == pytest.approx(np.mean(e["actual_per_seed"]), rel=1e-12)
        assert e["actual"] == pytest.approx(np.mean(e["actual_each"]), rel=1e-12)  # query = mean of the points
    assert saved["noise_floor"]["kind"] == "split-half over seeds"
    if saved["noise_floor"]["resolved"]:
        assert saved["pearson_interval"]["low"] <= saved["pearson"] <= saved["pearson_interval"]["high"]
    else:  # below its noise floor: reported as such, with no correlation
        assert saved["pearson"] is None and saved["below_noise_floor"] and "unresolved" in saved
    # every retraining is cached: a second run retrains nothing and measures the same changes
    files = sorted(p.name for p in (tmp_path / "loo").iterdir())
    assert len(files) == 2 * 3 * 4  # pretrain + finetune per (seed, removal or control)
    again = validation.run(cfg, data, pre, ft, scores, test, tmp_path, exclude=[int(scores[0].argmax())])
    assert sorted(p.name for p in (tmp_path / "loo").iterdir()) == files
    assert [e["actual"] for e in again["examples"]] == [e["actual"] for e in saved["examples"]]


def test_deterministic_retraining_uses_one_seed(digits, tmp_path, caplog):
    data, pre, ft = digits
    cfg = loo_cfg(tmp_path, "validate.seeds=4")
    OmegaConf.update(cfg, "validate.batch_size", 10_000)  # full batch: the seed orders nothing
    test = tuple(t[:4] for t in data.finetune_test.tensors)
    scores = torch.randn(1, len(data.pretrain_train), dtype=torch.float64)
    with caplog.at_level(logging.WARNING):
        result = validation.run(cfg, data, pre, ft, scores, test, tmp_path)
    assert result["seeds"] == [0] and result["noise_floor"]["kind"] == "deterministic"
    assert "validate.seeds=4, but the retraining is deterministic" in caplog.text
