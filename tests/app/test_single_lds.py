"""dattri's MNIST-10 single-stage LDS (lissa_influence/experiments/mnist10.py, single_lds.py):
the task's split, networks and recipe, the LDS's sign, and the preset
``experiment=mnist5k_single_lds`` run on a few subsets (outputs, calibrated damping,
the cache reused by a second run, dattri beside ours where it is installed)."""

from __future__ import annotations

import csv
import importlib.util
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from lissa_influence import confidence
from lissa_influence.experiments import mnist10, peers, single_lds

from hydra_helpers import assert_png, compose_cfg

pytestmark = pytest.mark.filterwarnings("ignore::lissa_influence.SolverWarning", "ignore::UserWarning")

TINY = [
    "experiment=mnist5k_single_lds",
    "single_lds.train_size=300",
    "single_lds.test_size=40",
    "single_lds.num_subsets=6",
    "test_points=8",
    "calibration.budget=3",
    "calibration.grid=[0.01,0.1,1.0]",
    "threads=1",
    "progress=false",
    "single_lds.peers=[]",
]


def test_split_is_seeded_stratified_and_disjoint():
    s = mnist10.split(900, 100, seed=3)
    again = mnist10.split(900, 100, seed=3)
    assert torch.equal(s.x_train, again.x_train) and torch.equal(s.y_test, again.y_test)
    assert s.x_train.shape == (900, 1, 28, 28) and s.x_test.shape == (100, 1, 28, 28)
    assert torch.bincount(s.y_test, minlength=10).tolist() == [10] * 10  # 500 of each digit in the 5,000
    train_rows = {r.numpy().tobytes() for r in s.x_train.flatten(1)}
    assert not any(r.numpy().tobytes() in train_rows for r in s.x_test.flatten(1))
    assert abs(float(s.x_train.mean()) - 0.0) < 0.2  # normalised with MNIST's mean and std
    with pytest.raises(ValueError, match="at most"):
        mnist10.split(4900, 500)


def test_networks_have_dattris_sizes_and_training_is_seeded():
    assert sum(p.numel() for p in mnist10.build("lr", 0).parameters()) == 7_850
    assert sum(p.numel() for p in mnist10.build("mlp", 0).parameters()) == 109_386
    s = mnist10.split(200, 20)
    recipe = replace(mnist10.RECIPES["mlp"], epochs=2)
    a, b = (mnist10.train("mlp", *s.train, recipe, seed=1) for _ in range(2))
    c = mnist10.train("mlp", *s.train, recipe, seed=2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))
    assert not a.training  # scored in eval mode: dropout off
    with pytest.raises(ValueError, match="single_lds.arch"):
        mnist10.build("resnet", 0)


def test_summed_scores_rise_with_the_loss_when_examples_are_harmful():
    # one test point whose loss grows with the number of kept harmful examples (score +1)
    gen = np.random.default_rng(0)
    kept = [torch.tensor(sorted(gen.choice(10, 5, replace=False))) for _ in range(8)]
    scores = np.array([[1.0] * 3 + [0.0] * 7])
    loss = np.array([[float(k[k < 3].numel())] for k in kept]) + 1e-3 * np.arange(8)[:, None]
    predicted = single_lds.summed_scores(scores, kept)
    assert confidence.lds_interval(predicted, loss).estimate > 0.9
    assert confidence.lds_interval(-predicted, loss).estimate < -0.9


def test_peer_names_are_checked():
    peers.check("trak_10")
    for bad in ("trak", "trak_0", "if_newton"):
        with pytest.raises(ValueError, match="single_lds.peers"):
            peers.check(bad)


@pytest.mark.slow
def test_preset_runs_on_a_few_subsets_and_reuses_its_cache(tmp_path):
    cache = tmp_path / "cache"
    want_peers = importlib.util.find_spec("dattri") is not None
    extra = ["single_lds.peers=[if_cg,trak_2]"] if want_peers else []
    cfg = compose_cfg(*TINY, f"cache_dir={cache}", "single_lds.ensemble=2", "single_lds.fit_epochs=3", *extra)
    result = single_lds.run(cfg, tmp_path / "run")
    out = tmp_path / "run"
    assert_png(out / "lds.png")
    saved = json.loads((out / "lds.json").read_text())
    v = saved["variants"]
    assert {"noise_floor", "cg@0.1", "cg@auto", "ekfac@0.1", "ekfac@auto"} <= set(v)
    for key in ("cg@0.1", "cg@auto", "ekfac@auto"):
        lo, hi = v[key]["interval"]["low"], v[key]["interval"]["high"]
        assert -1 <= lo <= hi <= 1 and v[key]["ensemble"] == 2
        assert len(v[key]["per_test_point"]) == 8
    # the logistic regression's influence predicts its retrained losses (a sign error gives < 0)
    assert v["cg@0.1"]["lds"] > 0.3
    assert v["cg@auto"]["damping_rule"]["influence"]["rule"] == "auto"
    assert v["cg@auto"]["damping"] in (0.01, 0.1, 1.0)
    # the LDS recomputed from the table's own definition: Spearman per test point, averaged
    assert np.isclose(v["cg@0.1"]["lds"], np.nanmean([p for p in v["cg@0.1"]["per_test_point"] if p is not None]))
    with (out / "lds.csv").open() as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert float(rows["cg@0.1"]["lds"]) == pytest.approx(v["cg@0.1"]["lds"], abs=1e-4)
    p = saved["protocol"]
    assert (p["num_train"], p["kept_per_subset"], p["fit_epochs"]) == (300, 150, 3)
    # 6 subsets + 6 noise-floor retrainings + 3 calibration subsets + 2 ensemble models (+ TRAK's 2)
    assert p["trained_this_run"] == 6 + 6 + 3 + 2 + (2 if want_peers else 0)
    if want_peers:
        assert v["dattri:if_cg"]["library"] == "dattri" and v["dattri:if_cg"]["lds"] is not None
        assert v["dattri:trak_2"]["lds"] is not None
    # a rerun trains nothing and gives the same numbers
    again = single_lds.run(cfg, tmp_path / "again")
    assert again["protocol"]["trained_this_run"] == 0
    assert again["variants"]["cg@0.1"]["lds"] == result["variants"]["cg@0.1"]["lds"]


def test_mlp_preset_composes_on_the_lr_preset():
    cfg = compose_cfg("experiment=mnist5k_single_lds_mlp")
    c = cfg.single_lds
    assert (c.arch, c.fit_epochs, c.num_subsets, c.train_size, cfg.test_points) == ("mlp", 5, 100, 4500, 100)
    assert cfg.analysis.name == "single_lds" and list(c.dampings) == [1e-3, "auto"]


def test_bad_settings_fail_before_training(tmp_path):
    for override, match in [
        ("single_lds.arch=cnn", "single_lds.arch"),
        ("single_lds.methods=[newton]", "single_lds.methods"),
        ("single_lds.dampings=[-1]", "single_lds.dampings"),
        ("single_lds.peers=[trak]", "single_lds.peers"),
        ("calibration.seed=0", "calibration.seed"),
        ("test_points=900", "test_points"),
        ("single_lds.ensemble=0", "single_lds.ensemble"),
    ]:
        cfg = compose_cfg(*TINY, f"cache_dir={tmp_path}", override)
        with pytest.raises(ValueError, match=match):
            single_lds.run(cfg, tmp_path / "run")
    assert not any(tmp_path.rglob("*.pt"))
