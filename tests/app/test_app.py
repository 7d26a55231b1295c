"""End-to-end tests of the main job: Hydra configs, the pipeline, the CLI, sweeps, packaging.

Everything runs on the embedded 8x8 digits with tiny settings (20 Adam steps per stage,
64-example Hessian samples, 20 solver iterations), so each test takes seconds. Tiny
training leaves the Hessian indefinite, hence ``gauss_newton=true`` where CG runs.

In-process tests compose the config with Hydra's compose API and call
``pipeline.run``; CLI tests run ``python -m lissa_influence`` in a subprocess (importing
the same ``lissa_influence`` as this process, from a checkout or an installed wheel).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra import compose

import lissa_influence
from lissa_influence.experiments import calibration, config, pipeline
from lissa_influence.experiments.data import DatasetNotFoundError

from hydra_helpers import CONF, REPO, TINY, assert_png, compose_cfg

# Leave-one-out with a few Adam steps of retraining (the digits preset retrains with L-BFGS).
TINY_VALIDATE = [
    "validate.enabled=true",
    "validate.num_examples=4",
    "validate.pretrain_steps=5",
    "validate.finetune_steps=5",
    "validate.polish_iters=0",
]

# 20 CG iterations do not converge; the warning says so, and is expected here.
pytestmark = pytest.mark.filterwarnings("ignore::lissa_influence.SolverWarning")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One weight cache for the in-process runs: the tiny models train once per setting."""
    return tmp_path_factory.mktemp("cache")


def tiny(cache: Path, *extra: str):
    return compose_cfg(*TINY, f"cache_dir={cache}", *extra)


def cli(
    args: list[str], cwd: Path, entry: str = "-m lissa_influence", timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run the app in a fresh interpreter that imports the same ``lissa_influence`` as the tests."""
    env = dict(os.environ)
    package_root = str(Path(lissa_influence.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env["HYDRA_FULL_ERROR"] = "0"
    prefix = entry.split(" ", 1) if entry.startswith("-m ") else ["-c", entry]
    return subprocess.run(
        [sys.executable, *prefix, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def assert_outputs(out: Path, n_queries: int) -> dict:
    """Every file of a run: scores, query vectors, metrics.json, top_examples.png."""
    metrics = json.loads((out / "metrics.json").read_text())
    scores = np.load(out / "scores.npy")
    n_pretrain = metrics["data"]["sizes"]["pretrain_train"]
    assert scores.shape == (n_queries, n_pretrain)
    assert np.isfinite(scores).all() and np.abs(scores).max() > 0
    s = np.load(out / "query_vectors.npy")
    assert s.shape[0] == n_queries and np.isfinite(s).all()
    # metrics.json: config, versions, solver diagnostics, training reports, top examples
    assert metrics["config"]["solver"]["name"] and metrics["config"]["test_points"] == 2
    assert {"lissa_influence", "torch", "hydra", "python"} <= set(metrics["versions"])
    inf = metrics["influence"]
    for stage in ("finetune", "pretrain"):
        assert {"solver", "converged", "iterations", "num_products"} <= set(inf[stage])
    assert inf["num_pretrain"] == n_pretrain and inf["num_queries"] == n_queries
    assert {"finetune_solve", "pretrain_solve", "scoring"} <= set(inf["time"])
    for stage in ("pretrain", "finetune"):
        report = metrics["training"][stage]
        assert np.isfinite(report["loss"]) and np.isfinite(report["grad_norm"]) and report["steps"] == 20
    assert isinstance(metrics["training"]["pretrain_cached"], bool)
    assert len(metrics["top_examples"]) == n_queries
    return metrics


# --- in-process runs (compose API) ----------------------------------------------------
def test_fixed_mode_solves_the_head_exactly_and_reuses_kronecker_factors(cache, tmp_path):
    exact = pipeline.run(tiny(cache, "gauss_newton=true"), tmp_path / "exact")["influence"]
    assert exact["finetune"]["solver"] == "exact" and exact["finetune"]["path"] == "head only, exact (float64)"
    assert exact["finetune"]["final_residual"] < 1e-10
    # solver=ekfac replaces both inverses (as the identity ablation does); its factors are saved ...
    first = pipeline.run(tiny(cache, "solver=ekfac"), tmp_path / "a")["influence"]
    assert first["finetune"]["solver"] == first["pretrain"]["solver"] == "ekfac"
    assert first["factors"] == {"loaded": [], "saved": ["pretrain_ekfac", "finetune_ekfac"]}
    assert (tmp_path / "a" / "factors" / "pretrain_ekfac.pt").is_file()
    # ... and a later run with other test points scores them without refitting: the same query vectors
    second = pipeline.run(tiny(cache, "solver=ekfac", "test_points=3"), tmp_path / "b")["influence"]
    assert second["factors"]["loaded"] == ["pretrain_ekfac", "finetune_ekfac"]
    s_a, s_b = np.load(tmp_path / "a" / "query_vectors.npy"), np.load(tmp_path / "b" / "query_vectors.npy")
    assert np.allclose(s_b[:2], s_a, rtol=1e-6, atol=0)


@pytest.mark.slow
def test_main_job_writes_every_output(cache, tmp_path, capsys):
    metrics = pipeline.run(tiny(cache, "gauss_newton=true"), tmp_path)
    on_disk = assert_outputs(tmp_path, 2)
    assert on_disk["influence"]["mean_abs_score"] == pytest.approx(metrics["influence"]["mean_abs_score"])
    assert on_disk["config"]["gauss_newton"] is True and on_disk["config"]["data"]["name"] == "digits"
    assert_png(tmp_path / "top_examples.png")
    assert not (tmp_path / "loo.json").exists()  # validation is off by default
    printed = capsys.readouterr().out
    assert "multi-stage influence (fixed, solver=cg): 2 queries x" in printed
    assert "finetune solve:" in printed and "pretrain solve:" in printed and "query 1: most helpful" in printed


@pytest.mark.slow
def test_same_config_and_seed_give_identical_scores_and_reuse_the_cache(tmp_path):
    cache_a, cache_b = tmp_path / "cache_a", tmp_path / "cache_b"
    first = pipeline.run(tiny(cache_a, "gauss_newton=true"), tmp_path / "first")
    second = pipeline.run(tiny(cache_a, "gauss_newton=true"), tmp_path / "second")
    fresh = pipeline.run(tiny(cache_b, "gauss_newton=true"), tmp_path / "fresh")  # trains again, same seed
    assert not first["training"]["pretrain_cached"] and not first["training"]["finetune_cached"]
    assert second["training"]["pretrain_cached"] and second["training"]["finetune_cached"]
    assert not fresh["training"]["pretrain_cached"]
    assert len(list(cache_a.glob("*.pt"))) == 2  # one file per stage
    scores = [np.load(tmp_path / d / "scores.npy") for d in ("first", "second", "fresh")]
    np.testing.assert_array_equal(scores[0], scores[1])
    np.testing.assert_array_equal(scores[0], scores[2])
    assert second["training"]["pretrain"] == first["training"]["pretrain"]  # the cached report comes back too


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, check",
    [
        (["mode=updated", "gauss_newton=true"], lambda m: m["config"]["mode"] == "updated"),
        (
            ["solver=lissa", "solver.depth=30", "gauss_newton=true"],
            lambda m: m["influence"]["pretrain"]["solver"] == "lissa" and m["influence"]["pretrain"]["scale"] > 0,
        ),
        (["solver=identity"], lambda m: m["influence"]["pretrain"]["num_products"] == 0),
        (
            ["solver=explicit", "gauss_newton=true", "pretrain.hessian_samples=16", "finetune.hessian_samples=16"],
            lambda m: m["influence"]["pretrain"]["solver"] == "explicit" and m["influence"]["pretrain"]["converged"],
        ),
        (["query=mean", "gauss_newton=true"], lambda m: m["influence"]["num_queries"] == 1),
        (
            ["solver.preconditioner=nystrom", "solver.rank=8", "hvp=retained", "gauss_newton=true"],
            lambda m: (
                m["influence"]["pretrain"]["preconditioner"] == "nystrom"
                and m["influence"]["pretrain"]["preconditioner_products"] == 8
            ),
        ),
        (
            ["mode=updated", "solver=kfac", "solver.fisher=empirical"],
            lambda m: (
                m["influence"]["finetune"]["solver"] == "ekfac"
                and m["influence"]["pretrain"]["kind"] == "kfac"
                and m["influence"]["pretrain"]["fisher"] == "empirical"
            ),
        ),
    ],
    ids=[
        "mode=updated",
        "solver=lissa",
        "solver=identity",
        "solver=explicit",
        "query=mean",
        "nystrom+retained",
        "updated+kfac",
    ],
)
def test_config_variants_run(cache, tmp_path, overrides, check):
    metrics = pipeline.run(tiny(cache, *overrides), tmp_path)
    n_queries = 1 if "query=mean" in overrides else 2
    scores = np.load(tmp_path / "scores.npy")
    assert scores.shape == (n_queries, metrics["influence"]["num_pretrain"]) and np.isfinite(scores).all()
    assert check(metrics), metrics["influence"]
    if n_queries == 2:
        assert_png(tmp_path / "top_examples.png")


@pytest.mark.slow
def test_leave_one_out_validation(cache, tmp_path, capsys):
    metrics = pipeline.run(tiny(cache, "gauss_newton=true", *TINY_VALIDATE), tmp_path)
    v = metrics["validation"]
    assert v["num_examples"] == 4 and np.isfinite(v["pearson"]) and np.isfinite(v["spearman"])
    loo = json.loads((tmp_path / "loo.json").read_text())
    assert len(loo["examples"]) == 4 and loo["pearson"] == pytest.approx(v["pearson"])
    assert all(np.isfinite([e["predicted"], e["actual"]]).all() for e in loo["examples"])
    assert loo["retrain"]["pretrain"]["steps"] == 5 and loo["retrain"]["finetune"]["polish_iters"] == 0
    assert_png(tmp_path / "loo_scatter.png")
    assert json.loads((tmp_path / "metrics.json").read_text())["validation"]["spearman"] == pytest.approx(v["spearman"])
    assert re.search(r"leave-one-out \(.*\): Pearson", capsys.readouterr().out)


def test_missing_mnist_fails_before_training(tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("training must not start when the data is missing")

    monkeypatch.setattr(pipeline, "train_two_stage", no_training)
    root = tmp_path / "empty"
    root.mkdir()
    cfg = compose_cfg("data=mnist", f"data.root={root}", f"cache_dir={tmp_path / 'cache'}", "threads=1")
    assert cfg.data.download is False and cfg.model.arch == "mnist"
    with pytest.raises(DatasetNotFoundError, match="MNIST files not found") as err:
        pipeline.run(cfg, tmp_path / "out")
    assert "data.download=true" in str(err.value) and str(root) in str(err.value)
    assert list(root.iterdir()) == []  # nothing downloaded or created
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "experiment, expected",
    [
        (
            "mnist_fixed",
            {
                "data.name": "mnist",
                "model.arch": "mnist",
                "mode": "fixed",
                "validate.enabled": True,
                "pretrain.train.batch_size": 512,
                "finetune.train.batch_size": 512,
                "pretrain.damping": 1e-2,
                "finetune.damping": 1e-8,
                "pretrain.hessian_samples": 1000,
                "validate.pretrain_steps": 100,
                "validate.finetune_steps": 100,
                "model.dtype": "float32",
            },
        ),
        (
            "cifar_fixed",
            {
                "data.name": "cifar10",
                "model.arch": "cifar",
                "mode": "fixed",
                "validate.enabled": False,
                "pretrain.train.batch_size": 128,
                "finetune.train.batch_size": 128,
                "pretrain.damping": 1e-8,
                "finetune.damping": 1e-6,
                "data.pretrain_classes": [2, 6],
                "validate.pretrain_steps": 6000,
                "validate.finetune_steps": 3000,
            },
        ),
        ("cifar_updated", {"model.arch": "cifar", "mode": "updated", "alpha": 0.01, "validate.finetune_steps": 1000}),
        (
            "digits_updated",
            {
                "data.name": "digits",
                "model.arch": "digits",
                "mode": "updated",
                "model.dtype": "float64",
                "pretrain.damping": 1e-2,
                "pretrain.train.weight_decay": 1e-2,
            },
        ),
    ],
)
def test_experiments_compose_with_their_presets(experiment, expected):
    cfg = compose_cfg(f"experiment={experiment}")
    config.check(cfg)
    for key, value in expected.items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        assert (list(node) if isinstance(value, list) else node) == value, key


def test_default_config_composes():
    cfg = compose_cfg()
    config.check(cfg)
    assert (cfg.data.name, cfg.model.arch, cfg.solver.name, cfg.mode, cfg.query) == (
        "digits",
        "digits",
        "cg",
        "fixed",
        "each",
    )
    assert config.build_solver(cfg.solver).max_iter == 1000  # the digits preset raises CG's cap
    assert compose_cfg("data=mnist").model.arch == "mnist"  # model and preset follow data
    assert compose_cfg("data=mnist", "model=digits").model.arch == "digits"  # unless chosen
    assert (cfg.pretrain.hessian_samples, cfg.finetune.hessian_samples) == ("all", "all")  # the digits preset
    config.check(compose_cfg("pretrain.hessian_samples=500", "finetune.hessian_samples=all"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["mode=frozen"], "mode='frozen' is not one of"),
        (["query=all"], "query='all' is not one of"),
        (["solver.name=newton"], "solver.name='newton' is not one of"),
        (["pretrain.damping=-1"], "pretrain.damping=-1: use a finite number >= 0, auto"),
        (["finetune.damping=autoo"], "finetune.damping='autoo': use a finite number >= 0, auto"),
        (["pretrain.damping=auto", "calibration.grid=[0,1e-2]"], "calibration.grid=[0.0, 0.01]: give at least 2"),
        (["pretrain.damping=auto", "calibration.grid=[1e-2]"], "give at least 2 dampings"),
        (["pretrain.damping=auto", "calibration.budget=0"], "calibration.budget=0: the calibration needs at least 3"),
        (
            [
                "finetune.damping=auto",
                "validate.pretrain_steps=0",
                "validate.finetune_steps=0",
                "validate.polish_iters=0",
            ],
            "finetune.damping=auto calibrates against retraining, but validate.pretrain_steps",
        ),
        (["calibration.heuristic_fraction=0"], "calibration.heuristic_fraction=0.0 must be finite and > 0"),
        (["validate.seeds=0"], "validate.seeds=0 must be >= 1"),
        (["validate.baselines=[identiti]"], "validate.baselines has ['identiti']"),
        (["mode=updated", "alpha=0"], "mode=updated needs alpha > 0"),
        (["solver=lissa", "solver.scale=big"], "solver.scale='big'"),
        (["pretrain.hessian_samples=0"], "pretrain.hessian_samples=0 must be a number >= 1 or 'all'"),
        (["finetune.hessian_samples=most"], "finetune.hessian_samples='most' must be a number >= 1 or 'all'"),
        (["device=tpu"], "device='tpu' is not one of auto, cpu, cuda, cuda:N"),
        (["device=cudax"], "device='cudax' is not one of auto, cpu, cuda, cuda:N"),
    ],
)
def test_check_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        config.check(compose_cfg(*overrides))


def _doc_value(v) -> str:
    """A default as docs/configuration.md writes it (YAML spelling)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_doc_value(x) for x in v) + "]"
    return str(v)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_configuration_doc_matches_the_schema():
    """docs/configuration.md lists every key of RunSchema with its schema default."""
    from omegaconf import OmegaConf

    doc = REPO / "docs" / "configuration.md"
    if not doc.is_file():
        pytest.skip("needs the source tree")
    reference = doc.read_text().split("## Reference", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([\w.]+)` \| [^|]*(?:\\\|[^|]*)* \| `([^`]*)` \|", reference, flags=re.M)
    documented = dict(rows)
    assert len(documented) == len(rows), "a key is listed twice"
    schema = _flat(OmegaConf.to_container(OmegaConf.structured(config.RunSchema)))
    assert sorted(documented) == sorted(schema), set(schema) ^ set(documented)
    wrong = {k: (documented[k], _doc_value(v)) for k, v in schema.items() if documented[k] != _doc_value(v)}
    assert not wrong, f"documented default != schema default: {wrong}"


# --- the command line -----------------------------------------------------------------


@pytest.mark.slow
def test_cli_main_job(tmp_path):
    run_dir = tmp_path / "run"
    proc = cli([*TINY, "gauss_newton=true", f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_outputs(run_dir, 2)
    assert_png(run_dir / "top_examples.png")
    saved = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert saved["test_points"] == 2 and saved["gauss_newton"] is True and saved["solver"]["max_iter"] == 20
    assert "gauss_newton=true" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert proc.stdout.count("multi-stage influence (fixed, solver=cg): 2 queries x") == 1
    assert not (tmp_path / "outputs").exists()  # hydra.run.dir was honoured


@pytest.mark.slow
def test_cli_first_run_is_quiet_and_shows_progress(tmp_path):
    """``lissa-influence`` with the defaults, as a newcomer runs it (stdout and stderr in one
    log): training shows progress, no warning, and the summary starts its own line."""
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(Path(lissa_influence.__file__).resolve().parents[1]))
    proc = subprocess.run(
        [sys.executable, "-m", "lissa_influence", f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "Warning" not in proc.stdout, proc.stdout[-3000:]
    assert re.search(r"^multi-stage influence \(fixed, solver=cg\): 8 queries x 576", proc.stdout, re.M)
    assert re.search(r"pretrain: 100%.*300/300.*loss=", proc.stdout) and "finetune (fixed) L-BFGS polish" in proc.stdout
    assert (run_dir / "scores.npy").is_file()


@pytest.mark.slow
def test_cli_validate_entry_point(tmp_path):
    run_dir = tmp_path / "run"
    args = [
        *TINY,
        "gauss_newton=true",
        *TINY_VALIDATE[1:],
        f"cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={run_dir}",
    ]
    proc = cli(args, tmp_path, entry="from lissa_influence.experiments.app import validate_main; validate_main()")
    assert proc.returncode == 0, proc.stderr[-3000:]
    loo = json.loads((run_dir / "loo.json").read_text())
    assert loo["num_examples"] == 4 and np.isfinite(loo["pearson"]) and np.isfinite(loo["spearman"])
    assert_png(run_dir / "loo_scatter.png")
    assert yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())["validate"]["enabled"] is True
    assert re.search(r"leave-one-out \(.*\): Pearson", proc.stdout)


@pytest.mark.slow
def test_cli_multirun_writes_a_summary(tmp_path):
    sweep = tmp_path / "sweep"
    proc = cli(
        [
            "-m",
            "solver=cg,identity",
            *TINY,
            "gauss_newton=true",
            f"cache_dir={tmp_path / 'cache'}",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert len(jobs) == 2
    for job in jobs:
        assert (job / "scores.npy").is_file() and (job / ".hydra" / "config.yaml").is_file()
    with open(sweep / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and [r["solver"] for r in rows] == ["cg", "identity"]
    assert all(float(r["mean_abs_score"]) > 0 for r in rows)
    assert "solver=identity" in rows[1]["overrides"]
    assert proc.stdout.count("sweep summary") == 1 and "mean_abs_score" in proc.stdout


@pytest.mark.parametrize(
    "override, expected",
    [
        ("pretrain.dampin=1", ["pretrain.dampin", "Key 'dampin' not in 'StageSchema'"]),
        ("test_points=abc", ["test_points", "could not be converted to Integer"]),
        ("mode=frozen", ["mode='frozen' is not one of ('fixed', 'updated')"]),
    ],
)
def test_cli_bad_config_fails_at_start(tmp_path, override, expected):
    run_dir, cache_dir = tmp_path / "run", tmp_path / "cache"
    proc = cli([override, f"cache_dir={cache_dir}", f"hydra.run.dir={run_dir}"], tmp_path, timeout=120)
    assert proc.returncode != 0
    for text in expected:
        assert text in proc.stderr, proc.stderr[-2000:]
    assert not (run_dir / "metrics.json").exists() and not cache_dir.exists()  # nothing trained


# --- packaging ------------------------------------------------------------------------


def _yaml_files() -> list[str]:
    return sorted(p.relative_to(CONF).as_posix() for p in CONF.rglob("*.yaml"))


def test_wheel_ships_the_configs(tmp_path):
    """A non-editable install carries conf/ as the package lissa_influence.experiments.conf."""
    if not (REPO / "pyproject.toml").is_file():
        pytest.skip("needs the source tree")
    # --no-build-isolation (no network): the backend must be importable here; setuptools
    # >= 70.1 builds wheels itself, older ones need the wheel package.
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools in this environment")
    try:
        from setuptools.command import bdist_wheel  # noqa: F401
    except ImportError:
        pytest.importorskip("wheel", reason="building a wheel offline needs setuptools>=70.1 or wheel")
    src = tmp_path / "src"  # a copy, so the build leaves no build/ or *.egg-info in the checkout
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    src.mkdir()
    for item in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / item, src / item)
    for folder in ("lissa_influence", "conf"):
        shutil.copytree(REPO / folder, src / folder, ignore=ignore)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(src),
            "-w",
            str(tmp_path / "dist"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("lissa_influence-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = _yaml_files()
    assert "config.yaml" in expected and len(expected) >= 15
    missing = [f for f in expected if f"lissa_influence/experiments/conf/{f}" not in names]
    assert not missing, f"the wheel lacks {missing}"
    assert "lissa_influence/experiments/app.py" in names
    assert "lissa_influence/solvers/cg.py" in names


def test_no_config_file_is_git_ignored():
    """A .gitignore pattern such as ``data/`` once hid conf/data/ from every commit."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout")
    files = [str(CONF / f) for f in _yaml_files()]
    proc = subprocess.run(["git", "check-ignore", *files], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1 and not proc.stdout.strip(), f"git ignores {proc.stdout.split()}"


def test_installed_package_finds_its_configs():
    """In a non-editable install (CI), the app reads pkg://lissa_influence.experiments.conf and every file is there."""
    from lissa_influence.experiments import app

    path = app._config_path()
    if not path.startswith("pkg://"):
        assert Path(path) == CONF  # a checkout reads the repository's conf/
        pytest.skip("running from a source checkout, not an installed package")
    from importlib.resources import files

    from hydra import initialize_config_module

    conf = files("lissa_influence.experiments.conf")
    installed = sorted(str(p) for p in _walk_yaml(conf))
    assert installed == _yaml_files()
    config.register()
    with initialize_config_module(config_module="lissa_influence.experiments.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=mnist_fixed"])
    assert cfg.model.arch == "mnist" and cfg.pretrain.train.batch_size == 512


def _walk_yaml(node, prefix: str = ""):
    for child in node.iterdir():
        if child.is_dir():
            yield from _walk_yaml(child, f"{prefix}{child.name}/")
        elif child.name.endswith(".yaml"):
            yield f"{prefix}{child.name}"


def test_device_setting_resolves_or_says_why_not():
    assert config.resolve_device("cpu").type == "cpu"
    assert config.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device.*device=cpu or device=auto"):
            config.resolve_device("cuda")


@pytest.mark.slow
def test_calibrated_damping_in_the_main_job(cache, tmp_path, capsys):
    overrides = [
        *TINY_VALIDATE,
        "pretrain.damping=auto",
        "finetune.damping=heuristic",
        "calibration.budget=3",
        "calibration.grid=[1.0,10.0]",
    ]
    metrics = pipeline.run(tiny(cache, *overrides), tmp_path / "first")
    damping = metrics["damping"]
    assert damping["pretrain"]["rule"] == "auto" and damping["pretrain"]["value"] in (1.0, 10.0)
    assert damping["pretrain"]["calibration"]["grid"] == [1.0, 10.0]
    assert damping["finetune"]["rule"] == "heuristic" and damping["finetune"]["value"] > 0
    assert_png(tmp_path / "first" / "calibration.png")
    assert "damping: finetune" in capsys.readouterr().out
    # the calibration's removals are never among the validated ones
    calibrated = set(calibration.removals(metrics["data"]["sizes"]["pretrain_train"], 3, 1))
    assert not calibrated & {e["index"] for e in metrics["validation"]["examples"]}
    # a second run with the same settings takes the choice from the cache: no grid is solved again
    assert len(list((cache / "calibration").iterdir())) >= 1
    again = pipeline.run(tiny(cache, *overrides), tmp_path / "second")
    assert again["damping"] == damping
    np.testing.assert_array_equal(
        np.load(tmp_path / "first" / "scores.npy"), np.load(tmp_path / "second" / "scores.npy")
    )
