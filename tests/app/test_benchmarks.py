"""The benchmark entry points start (their numbers are in docs/benchmarks.md, not asserted here)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from lissa_influence.experiments import config

from hydra_helpers import CONF, REPO

BENCH = REPO / "benchmarks"


def test_pydvl_comparison_skips_with_a_notice_without_pydvl():
    if importlib.util.find_spec("pydvl") is not None:
        pytest.skip("pyDVL is installed here; the skip path is for machines without it")
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_pydvl.py"), "--threads", "1"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pyDVL is not installed" in proc.stdout + proc.stderr and "pip install" in proc.stdout + proc.stderr


def test_solver_accuracy_suite_script_parses_and_its_overrides_compose():
    script = BENCH / "solver_accuracy.sh"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    sweeps = [line.split()[2:] for line in script.read_text().splitlines() if line.strip().startswith("run ")]
    assert len(sweeps) >= 10
    config.register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for overrides in sweeps:  # every value of every swept key, the others at their first value
            first = [o.split(",")[0] for o in overrides]
            for i, o in enumerate(overrides):
                for value in o.split("=", 1)[1].split(","):
                    chosen = first[:i] + [f"{o.split('=', 1)[0]}={value}"] + first[i + 1 :]
                    cfg = compose(config_name="accuracy", overrides=chosen)
                    config.check(cfg)
                    config.build_solver(cfg.solver)


def test_models_benchmark_runs_and_reports_the_mode_it_used(tmp_path):
    cmd = [
        sys.executable,
        str(BENCH / "bench_models.py"),
        "--models",
        "mlp_mse,digits_cnn",
        "--examples",
        "8",
        "--repeats",
        "1",
        "--cg-iters",
        "2",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["model"]: r for r in json.loads((tmp_path / "models_cpu.json").read_text())["rows"]}
    assert rows["mlp_mse"]["ad_used"] == "retained" and "unsupported" in rows["mlp_mse"]["forward_mode"]
    assert rows["digits_cnn"]["hvp_forward_s"] > 0 and rows["digits_cnn"]["hvp_retained_s"] > 0
    assert rows["digits_cnn"]["retained_graph_mib"] > 0


def test_single_lds_fit_point_benchmark_runs_and_writes_its_table(tmp_path):
    cmd = [
        sys.executable,
        str(BENCH / "single_lds_fit_point.py"),
        "--arch",
        "lr",
        "--epochs",
        "1",
        "2",
        "--subsets",
        "3",
        "--test-points",
        "5",
        "--threads",
        "1",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = json.loads((tmp_path / "single_lds_fit_point_lr.json").read_text())
    assert [r["epochs"] for r in saved["rows"]] == [1, 2] and saved["best"] in (1, 2)
    assert all(-1 <= r["lds"]["estimate"] <= 1 for r in saved["rows"])
    assert "best fit point" in proc.stdout
