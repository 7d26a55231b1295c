"""The run-folder guard in a multirun: each job's folder is locked and checked before Hydra
writes its ``.hydra/``, as a single run's folder is (lissa_influence/experiments/rundir.py).

Nothing trains here: the old results are a manifest written by hand, and the accepted
sweep runs a task function that only looks at its folder."""

from __future__ import annotations

from pathlib import Path

import yaml

from lissa_influence.experiments import app, config, rundir
from lissa_influence.results import ShardStore, config_hash

from hydra_helpers import compose_cfg
from test_app import TINY, cli

OLD_RECORD = {"config.yaml": b"the record of the run that wrote these scores\n", "overrides.yaml": b"- seed=0\n"}


def _old_job(job: Path, cache: Path) -> dict[str, bytes]:
    """Job folder 0 of an earlier sweep: scores of a config with pretrain.train.lr=0.01, and its .hydra/."""
    scored = config.scored_config(compose_cfg(*TINY, "gauss_newton=true", f"cache_dir={cache}"))
    ShardStore(job / "scores", config_hash(scored), n=1, k=1, shard_size=1, config=scored)
    (job / ".hydra").mkdir(parents=True)
    for name, text in OLD_RECORD.items():
        (job / ".hydra" / name).write_bytes(text)
    return {p.name: p.read_bytes() for p in (job / ".hydra").iterdir()}


def test_a_reused_sweep_job_folder_is_refused_before_hydra_writes_into_it(tmp_path):
    sweep, cache = tmp_path / "sweep", tmp_path / "cache"
    job = sweep / "0"
    record = _old_job(job, cache)
    args = ["-m", *TINY, "gauss_newton=true", f"cache_dir={cache}", f"hydra.sweep.dir={sweep}"]

    other_config = cli([*args, "pretrain.train.lr=0.02"], tmp_path, timeout=120)
    assert other_config.returncode == 1
    assert "ResultsMismatchError" in other_config.stderr and "pretrain.train.lr: 0.01 -> 0.02" in other_config.stderr
    assert {p.name: p.read_bytes() for p in (job / ".hydra").iterdir()} == record
    assert rundir.holder(job) is None and not (job / "metrics.json").exists()

    rundir.acquire(job)  # a live run owns the folder: refused, whatever its config
    try:
        busy = cli(args, tmp_path, timeout=120)
    finally:
        rundir.release(job)
    assert busy.returncode == 1 and "is in use by another run" in busy.stderr
    assert {p.name: p.read_bytes() for p in (job / ".hydra").iterdir()} == record


# A job that only checks that it owns its folder and that Hydra's record is already there.
PEEK = f"""
import os, sys
from pathlib import Path
import hydra
from hydra.core.hydra_config import HydraConfig
from lissa_influence.experiments import app, rundir

@hydra.main(version_base="1.3", config_path={app._config_path()!r}, config_name="config")
def peek(cfg):
    out = Path(HydraConfig.get().runtime.output_dir)
    owner = rundir.holder(out)
    assert owner is not None and owner["pid"] == os.getpid(), owner
    assert (out / ".hydra" / "config.yaml").is_file()
    print("job", out.name, "owns its folder")

peek()
"""


def test_an_accepted_sweep_job_owns_its_folder_and_keeps_hydras_record(tmp_path):
    sweep = tmp_path / "sweep"
    proc = cli(["-m", "seed=3,4", f"hydra.sweep.dir={sweep}"], tmp_path, entry=PEEK, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("owns its folder") == 2
    for num, seed in (("0", 3), ("1", 4)):
        record = sweep / num / ".hydra"
        assert yaml.safe_load((record / "config.yaml").read_text())["seed"] == seed
        assert yaml.safe_load((record / "overrides.yaml").read_text()) == [f"seed={seed}"]
        hydra_cfg = yaml.safe_load((record / "hydra.yaml").read_text())["hydra"]
        # the record reads as Hydra's own: the guard's way of holding Hydra back leaves no trace
        assert hydra_cfg["output_subdir"] == ".hydra" and hydra_cfg["job"]["num"] == int(num)
        assert f"hydra.sweep.dir={sweep}" in hydra_cfg["overrides"]["hydra"]
        assert "hydra.output_subdir=null" not in hydra_cfg["overrides"]["hydra"]
        assert hydra_cfg["runtime"]["output_dir"] == str(sweep / num)
        assert rundir.holder(sweep / num) is None
    assert "hydra.output_subdir=null" not in (sweep / "multirun.yaml").read_text()
