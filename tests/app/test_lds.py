"""The linear datamodeling score harness (lissa_influence/experiments/lds.py) on tiny settings:
a few Adam steps, 4 subsets, 2 test points. Checks the outputs, that the cached subset
models are reused (a second run retrains nothing), and that ranks fill one cache."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lissa_influence.experiments import lds

from hydra_helpers import assert_png, compose_cfg

TINY = [
    "experiment=digits_lds",
    "pretrain.train.steps=10",
    "pretrain.train.polish_iters=0",
    "finetune.train.steps=10",
    "finetune.train.polish_iters=0",
    "validate.pretrain_steps=5",
    "validate.finetune_steps=5",
    "validate.polish_iters=0",
    "test_points=2",
    "pretrain.hessian_samples=32",
    "finetune.hessian_samples=32",
    "solver.max_iter=10",
    "pretrain.damping=1.0",  # the tiny models are far from a minimum: damping keeps CG positive definite
    "finetune.damping=1.0",
    "solver.depth=5",
    "threads=1",
    "progress=false",
    "lds.num_subsets=4",
]

pytestmark = pytest.mark.filterwarnings("ignore::lissa_influence.SolverWarning", "ignore::UserWarning")


def test_prediction_is_full_loss_minus_removed_scores_over_m():
    kept = [torch.tensor([0, 2]), torch.tensor([1, 2])]
    scores = np.array([[1.0, 2.0, 4.0]])  # one test point, m = 3
    pred = lds.predict(np.array([10.0]), scores, kept, 3)
    np.testing.assert_allclose(pred[:, 0], [10.0 - 2.0 / 3, 10.0 - 1.0 / 3])


def test_subsets_are_seeded_prefix_stable_and_checked():
    a, b = lds.subsets(20, 3, 0.5, 0), lds.subsets(20, 5, 0.5, 0)
    assert all(torch.equal(x, y) and len(x) == 10 for x, y in zip(a, b[:3], strict=True))
    with pytest.raises(ValueError, match="lds.fraction"):
        lds.subsets(3, 2, 0.1, 0)


def test_lds_harness_writes_the_table_and_reuses_cached_subsets(tmp_path):
    cache = tmp_path / "cache"
    cfg = compose_cfg(*TINY, f"cache_dir={cache}", "lds.variants=[cg,gauss_newton,identity,ekfac,single_stage]")
    # rank 1 of 2 retrains subsets 1 and 3 only, then waits for the rest (no table yet)
    part = compose_cfg(*TINY, f"cache_dir={cache}", "lds.world=2", "lds.rank=1", "lds.variants=[identity]")
    assert lds.run(part, tmp_path / "rank1") is None
    assert not (tmp_path / "rank1" / "lds.json").exists()

    first = lds.run(cfg, tmp_path / "run1")
    # subsets 0 and 2 (and their noise-seed twins: full batch, so the same cached models):
    # 2 pretrainings + 2 x 2 finetunings
    assert first["protocol"]["retrained_this_run"] == 6
    written = json.loads((tmp_path / "run1" / "lds.json").read_text())
    assert_png(tmp_path / "run1" / "lds.png")
    assert (tmp_path / "run1" / "lds.csv").read_text().startswith("variant,mode,method,lds")
    v = written["variants"]
    for mode in ("fixed", "updated"):
        for name in ("cg", "gauss_newton", "identity", "single_stage"):
            row = v[f"{mode}/{name}"]
            assert len(row["per_test_point"]) == 2 and math.isfinite(row["lds"]), (mode, name, row)
            assert -1 <= row["lds"] <= 1
        # warm, full-batch retraining draws nothing at random: the two seeds agree exactly
        assert v[f"{mode}/noise_floor"]["lds"] == 1.0
        assert v[f"{mode}/ekfac"]["lds"] is not None or v[f"{mode}/ekfac"]["skipped"]
    assert written["protocol"]["num_subsets"] == 4 and written["protocol"]["kept_per_subset"] == 288

    # a second run, another solver: every subset model comes from the cache
    again = lds.run(compose_cfg(*TINY, f"cache_dir={cache}", "lds.variants=[identity]"), tmp_path / "run2")
    assert again["protocol"]["retrained_this_run"] == 0
    np.testing.assert_array_equal(again["actual_losses"]["fixed"], first["actual_losses"]["fixed"])
    assert again["variants"]["fixed/identity"]["lds"] == first["variants"]["fixed/identity"]["lds"]


def test_lds_settings_are_checked():
    with pytest.raises(ValueError, match="lds.protocol"):
        lds.check(compose_cfg("experiment=digits_lds", "lds.protocol=cold"))
    with pytest.raises(ValueError, match="lds.variants"):
        lds.check(compose_cfg("experiment=digits_lds", "lds.variants=[cg,kfac]"))
    cfg = compose_cfg("experiment=mnist_lds")
    assert cfg.data.name == "mnist" and cfg.analysis.name == "lds"


def test_from_scratch_protocol_retrains_each_seed(tmp_path):
    """TRAK's protocol: fresh initialisation with one fixed seed; the noise-floor seed
    changes the initialisation, so it gets models of its own."""
    cfg = compose_cfg(
        *TINY,
        f"cache_dir={tmp_path / 'cache'}",
        "lds.protocol=scratch",
        "lds.num_subsets=3",
        "lds.modes=[fixed]",
        "lds.variants=[identity]",
    )
    result = lds.run(cfg, tmp_path / "run")
    assert result["protocol"]["retrained_this_run"] == 2 * 3 * 2  # seeds x subsets x stages
    floor = result["variants"]["fixed/noise_floor"]
    assert len(floor["per_test_point"]) == 2 and -1 <= floor["lds"] <= 1
    assert set(result["variants"]) == {"fixed/identity", "fixed/noise_floor"}


def test_calibrated_damping_on_its_own_subsets_with_intervals(tmp_path):
    cfg = compose_cfg(
        *TINY,
        f"cache_dir={tmp_path / 'cache'}",
        "lds.modes=[fixed]",
        "lds.variants=[cg,lissa,single_stage]",
        "pretrain.damping=auto",
        "finetune.damping=heuristic",
        "calibration.budget=3",
        "calibration.grid=[1.0,10.0]",
    )
    result = lds.run(cfg, tmp_path / "run")
    # 4 evaluated + 3 calibration subsets (calibration.seed, not lds.seed), pretraining + fixed finetuning each
    assert result["protocol"]["retrained_this_run"] == 2 * (4 + 3)
    v = result["variants"]
    cg = v["fixed/cg"]["damping"]
    assert cg["pretrain"]["rule"] == "auto" and cg["pretrain"]["value"] in (1.0, 10.0)
    assert (
        cg["pretrain"]["calibration"]["metric"] == "spearman" and len(cg["pretrain"]["calibration"]["agreement"]) == 2
    )
    assert cg["finetune"]["rule"] == "heuristic" and cg["finetune"]["value"] > 0
    # LiSSA approximates CG's damped inverse: it takes CG's calibrated damping instead of its own sweep
    assert v["fixed/lissa"]["damping"]["pretrain"] == {"rule": "auto (CG's choice)", "value": cg["pretrain"]["value"]}
    assert v["fixed/single_stage"]["damping"]["influence"]["rule"] == "auto"
    for name in ("cg", "lissa", "single_stage", "noise_floor"):
        row = v[f"fixed/{name}"]
        assert row["interval"]["low"] <= row["lds"] <= row["interval"]["high"], (name, row)
    assert "damping finetune" in lds.summary(result) and "pretrain" in lds.summary(result)
    assert "95% bootstrap" in lds.summary(result)
