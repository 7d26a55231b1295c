"""The benchmark entry points start (their numbers are in docs/benchmarks.md, not asserted here)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from hydra_helpers import REPO

BENCH = REPO / "benchmarks"


def test_pydvl_comparison_skips_with_a_notice_without_pydvl():
    if importlib.util.find_spec("pydvl") is not None:
        pytest.skip("pyDVL is installed here; the skip path is for machines without it")
    proc = subprocess.run([sys.executable, str(BENCH / "bench_pydvl.py"), "--threads", "1"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pyDVL is not installed" in proc.stdout + proc.stderr and "pip install" in proc.stdout + proc.stderr


def test_solver_accuracy_suite_script_parses():
    proc = subprocess.run(["bash", "-n", str(BENCH / "solver_accuracy.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
