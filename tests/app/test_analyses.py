"""The paper's analyses as presets of the main job (lissa_influence/experiments/analyses.py).

Each digits preset runs in-process with tiny settings (a few Adam steps, 32-example
Hessian samples, 10 solver iterations, Gauss-Newton curvature so that CG never meets
negative curvature) and must write its figures and an ``analysis.json`` of finite
numbers; one runs through the CLI to prove the dispatch. The MNIST and CIFAR presets
are only composed (no dataset files here): they must pick the paper's classes and sizes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lissa_influence
from lissa_influence.experiments import analyses
from lissa_influence.experiments.data import DataConfig, load_two_stage

from hydra_helpers import assert_png, compose_cfg

TINY = [
    "pretrain.train.steps=10",
    "pretrain.train.polish_iters=0",
    "finetune.train.steps=10",
    "finetune.train.polish_iters=0",
    "test_points=1",
    "pretrain.hessian_samples=32",
    "finetune.hessian_samples=32",
    "solver.max_iter=10",
    "gauss_newton=true",
    "threads=1",
    "progress=false",
    "top_k=2",
]

pytestmark = pytest.mark.filterwarnings("ignore::lissa_influence.SolverWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def finite_numbers(node) -> list[float]:
    """Every float in a JSON tree (the config excluded)."""
    if isinstance(node, dict):
        return [v for k, x in node.items() if k not in ("config", "versions") for v in finite_numbers(x)]
    if isinstance(node, list):
        return [v for x in node for v in finite_numbers(x)]
    return [node] if isinstance(node, float) else []


def check_outputs(out: Path, result: dict, pngs: list[str]) -> dict:
    for name in pngs:
        assert_png(out / name)
    written = json.loads((out / "analysis.json").read_text())
    numbers = finite_numbers(written)
    assert numbers and all(math.isfinite(v) for v in numbers)
    assert written["analysis"] == result["analysis"]
    return written


def test_task_similarity_preset(cache, tmp_path):
    cfg = compose_cfg("experiment=digits_task_similarity", *TINY, f"cache_dir={cache}")
    result = analyses.run(cfg, tmp_path)
    written = check_outputs(tmp_path, result, ["distributions.png", "distributions_per_point.png"])
    same, other = written["settings"]["same_task"], written["settings"]["other_task"]
    assert same["finetune_classes"] == same["pretrain_classes"] == [0, 1, 2, 3]
    assert other["finetune_classes"] == [4, 7]
    m = same["num_pretrain"]
    for label in ("same_task", "other_task"):
        scores = np.load(tmp_path / f"scores_{label}.npy")
        assert scores.shape == (2, m) and np.isfinite(scores).all()  # mean query + one test point
        assert math.isclose(written["settings"][label]["mean_abs"], np.abs(scores[0]).mean(), rel_tol=1e-9)
    assert written["ratio_mean_abs"] == pytest.approx(same["mean_abs"] / other["mean_abs"])
    assert written["paper"] == {"same_task": 0.055, "other_task": 0.025, "ratio": pytest.approx(2.2)}


def test_finetune_size_preset(cache, tmp_path):
    cfg = compose_cfg("experiment=digits_finetune_size", *TINY, f"cache_dir={cache}")
    result = analyses.run(cfg, tmp_path)
    written = check_outputs(tmp_path, result, ["distributions.png", "distributions_per_point.png"])
    c, d = written["settings"]["C"], written["settings"]["D"]
    assert (c["num_finetune"], d["num_finetune"]) == (280, 840)
    assert (c["finetune_steps"], d["finetune_steps"]) == (10, 30)
    assert written["config"]["mode"] == "updated"
    assert c["test_indices"] == d["test_indices"]  # the same test points for both models


def test_influential_examples_preset(cache, tmp_path):
    cfg = compose_cfg(
        "experiment=digits_influential_examples",
        *TINY,
        f"cache_dir={cache}",
        "analysis.remove=2",
        "validate.pretrain_steps=3",
        "validate.finetune_steps=3",
        "validate.polish_iters=0",
    )
    result = analyses.run(cfg, tmp_path)
    written = check_outputs(tmp_path, result, ["top_examples.png", "removal.png"])
    (point,) = written["points"]
    scores = np.load(tmp_path / "scores.npy")
    m = scores.shape[1]
    for kind, sign in (("harmful", 1), ("helpful", -1)):
        removed = point[kind]["removed"]
        assert len(removed) == 2
        # the removed examples are the two largest (harmful) / smallest (helpful) scores
        assert set(removed) == set(np.argsort(-sign * scores[0])[:2].tolist())
        assert point[kind]["predicted_change"] == pytest.approx(-scores[0, removed].sum() / m)
    assert point["harmful"]["predicted_change"] < 0 < point["helpful"]["predicted_change"]


def test_cli_dispatches_to_the_analysis(cache, tmp_path):
    env = dict(os.environ)
    package_root = str(Path(lissa_influence.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lissa_influence",
            "experiment=digits_influential_examples",
            *TINY,
            f"cache_dir={cache}",
            f"hydra.run.dir={out}",
            "analysis.remove=1",
            "validate.pretrain_steps=1",
            "validate.finetune_steps=1",
            "validate.polish_iters=0",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "influential_examples: removing the top 1 examples" in proc.stdout
    assert (out / "analysis.json").is_file() and not (out / "metrics.json").exists()


def test_paper_presets_compose():
    cifar = compose_cfg("experiment=cifar_task_similarity")
    assert cifar.data.name == "cifar10" and cifar.model.arch == "cifar" and cifar.mode == "fixed"
    assert list(cifar.data.pretrain_classes) == list(cifar.analysis.same_task_classes) == [2, 6]  # bird, frog
    assert list(cifar.analysis.other_task_classes) == [1, 4]  # automobile, deer
    assert cifar.data.finetune_subsample == 5000 and cifar.pretrain.damping == 1e-8 and cifar.finetune.damping == 1e-6

    mnist = compose_cfg("experiment=mnist_finetune_size")
    assert mnist.data.name == "mnist" and mnist.model.arch == "mnist"
    assert mnist.mode == "updated" and mnist.alpha == 0.01
    assert list(mnist.data.finetune_classes) == [4, 5, 6, 7, 8, 9]
    assert mnist.analysis.base_subsample == 5000 and mnist.analysis.factor == 3
    d = analyses.variant(
        mnist, {"data.finetune_subsample": 15000, "finetune.train.steps": 3 * mnist.finetune.train.steps}
    )
    assert d.data.finetune_subsample == 15000 and d.finetune.train.steps == 9000
    assert mnist.data.finetune_subsample == 5000  # variant() copies

    assert compose_cfg().analysis.name == "none"  # the main job by default
    for name in (
        "digits_task_similarity",
        "digits_finetune_size",
        "digits_influential_examples",
        "mnist_influential_examples",
    ):
        assert compose_cfg(f"experiment={name}").analysis.name in analyses.ANALYSES


def test_unknown_or_incomplete_analysis_fails(tmp_path):
    with pytest.raises(ValueError, match="analysis.name"):
        analyses.run(compose_cfg("analysis.name=bogus"), tmp_path)
    with pytest.raises(ValueError, match="other_task_classes"):
        analyses.run(compose_cfg("analysis.name=task_similarity", "threads=1"), tmp_path)


def test_same_task_digits_split_is_the_pretraining_split():
    """Same-task finetuning must not test on pretraining examples (the digits hold out per stage)."""
    same = load_two_stage(
        DataConfig(pretrain_classes=(0, 1, 2, 3), finetune_classes=(0, 1, 2, 3), finetune_subsample=None)
    )
    for a, b in (("pretrain_train", "finetune_train"), ("pretrain_test", "finetune_test")):
        assert all(torch.equal(s, t) for s, t in zip(getattr(same, a).tensors, getattr(same, b).tensors, strict=True))
    partial = load_two_stage(
        DataConfig(pretrain_classes=(0, 1, 2, 3), finetune_classes=(3, 5), finetune_subsample=None)
    )
    pre = {tuple(r.flatten().tolist()) for r in partial.pretrain_train.tensors[0]}
    assert not any(tuple(r.flatten().tolist()) in pre for r in partial.finetune_test.tensors[0])
    assert set(partial.finetune_train.tensors[1].tolist()) == {0, 1}
