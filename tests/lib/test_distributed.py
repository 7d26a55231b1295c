"""Scale-out: torch.distributed on 2 CPU ranks (gloo, under torchrun), resumable sharded
results, and the Hydra launcher configs.

The multi-process runs use tests/support/scale_worker.py (tiny float64 CNNs; one thread per
process). Distributed sums differ from single-process ones only in rounding order, so
float64 scores agree to ~1e-15; the tests allow 1e-10.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import lissa_influence
from lissa_influence import distributed, results
from lissa_influence.batching import Batch
from lissa_influence.curvature import CurvatureOperator, Objective, cross_entropy
from lissa_influence.experiments import app, pipeline
from lissa_influence.params import make_block, named_params, prefix_matcher
from lissa_influence.results import ResultsMismatchError, ShardStore

import scale_worker
from conftest import make_data

HERE = Path(__file__).resolve().parents[1] / "support"  # scale_worker.py
REPO = HERE.parents[1]


def env() -> dict[str, str]:
    """Subprocesses import the same lissa_influence as the tests, with one thread each."""
    e = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1")
    root = str(Path(lissa_influence.__file__).resolve().parents[1])
    e["PYTHONPATH"] = os.pathsep.join(p for p in (root, e.get("PYTHONPATH")) if p)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(var, None)
    return e


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float(a.norm())


# --------------------------------------------------------------------------- helpers, no process group
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shard_range_splits_in_order(world):
    for n in range(0, 12):
        ranges = [distributed.shard_range(n, r, world) for r in range(world)]
        assert [i for lo, hi in ranges for i in range(lo, hi)] == list(range(n))
        sizes = [hi - lo for lo, hi in ranges]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        distributed.shard_range(5, 2, 2)


def test_helpers_are_the_identity_in_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.init_from_env() and not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    t = torch.arange(6.0).reshape(2, 3)
    assert distributed.all_reduce_sum(t) is t and distributed.all_gather_cat(t) is t and distributed.broadcast_(t) is t
    assert distributed.on_rank0(lambda: 7) == 7 and distributed.broadcast_object("x") == "x"
    with distributed.rank0_first():
        pass


def test_sharded_objectives_sum_to_the_whole_sample(mlp64):
    """What each rank computes (its shard, weighted over the whole sample), summed by hand,
    is the single-process product; also for LiSSA minibatches and an empty shard."""
    params = named_params(mlp64)
    W, U = make_block(params, prefix_matcher("embedding")), make_block(params, prefix_matcher("head"))
    block = W + U
    batch = make_data(23, (5,), 3, seed=4)
    full = Objective(mlp64, cross_entropy, params, batch, chunk_size=4)
    bounds = [distributed.shard_range(23, r, 3) for r in range(3)] + [(23, 23)]  # a 4th, empty shard
    shards = [
        Objective(
            mlp64,
            cross_entropy,
            params,
            Batch(batch.x[lo:hi], batch.y[lo:hi]),
            chunk_size=4,
            sample_size=23,
            sample_offset=lo,
        )
        for lo, hi in bounds
    ]
    v = torch.randn(2, block.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    products = {
        "hvp": lambda o: o.hvp(block, v),
        "ggn": lambda o: o.ggn_vp(block, v[0]),
        "mixed": lambda o: o.mixed_vp(W, U, v[:, W.numel :]),
        "gradient": lambda o: o.gradient(block),
        "value": lambda o: o.value(),
    }
    for name, f in products.items():
        torch.testing.assert_close(sum(f(o) for o in shards), f(full), rtol=1e-12, atol=1e-14, msg=name)
    assert shards[-1].hvp(block, v).abs().max() == 0 and shards[-1].mixed_vp(W, U, v[:, W.numel :]).shape == (
        2,
        W.numel,
    )

    ops = [CurvatureOperator(o, block) for o in [full, *shards]]
    draws = [op.minibatch(5, torch.Generator().manual_seed(3)) for op in ops]  # same generator state on every "rank"
    torch.testing.assert_close(sum(d(v) for d in draws[1:]), draws[0](v), rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- two ranks under torchrun
@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """Weight cache of the tiny digits runs (the torchrun job trains, later runs load)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def torchrun(tmp_path_factory, cache):
    """``torchrun --standalone --nproc_per_node=2 scale_worker.py distributed OUT``; the
    single-process reference is computed meanwhile. Returns (OUT, reference)."""
    out = tmp_path_factory.mktemp("torchrun")
    (out / "cache").symlink_to(cache, target_is_directory=True)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(HERE / "scale_worker.py"),
            "distributed",
            str(out),
        ],
        env=env(),
        cwd=out,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = scale_worker.cases()
        log, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log[-5000:]
    return out, reference


def test_two_ranks_give_the_single_process_scores(torchrun):
    out, reference = torchrun
    r0, r1 = (torch.load(out / f"rank{r}.pt") for r in (0, 1))
    assert r0["rank_of_world"].tolist() == [0, 2] and r1["rank_of_world"].tolist() == [1, 2]
    # each rank held its contiguous shard of the same 37-example Hessian sample
    assert r0["hessian_shard"].tolist() == [19, 0, 37] and r1["hessian_shard"].tolist() == [18, 19, 37]
    names = sorted(reference)
    assert {"fixed_cg/scores", "updated_lissa/scores", "single_cg/scores", "single_one_sample/scores"} <= set(names)
    assert {"fixed_ekfac/scores", "updated_cg_ekfac/scores", "single_nystrom_retained/scores"} <= set(names)
    for key in names:
        assert torch.equal(r0[key], r1[key]), f"{key}: the ranks disagree"  # identical solver iterates
        assert r0[key].shape == reference[key].shape, key
        assert rel(r0[key], reference[key]) <= 1e-10, (key, rel(r0[key], reference[key]))

    # rank 0 wrote the score store, in dataset order
    m = json.loads((out / "store" / "manifest.json").read_text())
    assert m["complete"] == list(range(m["num_shards"])) and m["n"] == 50 and m["k"] == 3
    on_disk = np.concatenate([np.load(out / "store" / f"shard_{i:05d}.npy") for i in range(m["num_shards"])], axis=1)
    assert rel(torch.from_numpy(on_disk), reference["fixed_cg/scores"]) <= 1e-10


def test_main_job_under_torchrun_then_resumed_in_one_process(torchrun, cache):
    """pipeline.run under torchrun: only rank 0 writes. Rerunning the same config into the
    same folder in one process loads s and recomputes only the missing shards (which
    agree with the distributed ones); another config there is refused before training."""
    out, _ = torchrun
    run = out / "run"
    assert [torch.load(out / f"run_rank{r}.pt")["world_size"] for r in (0, 1)] == [2, 2]
    assert not (out / "run_rank1").exists()  # rank 1 was given its own folder and wrote nothing
    assert sorted(p.name for p in run.iterdir()) == [
        "metrics.json",
        "query_vectors.npy",
        "scores",
        "scores.npy",
        "top_examples.png",
    ]
    distributed_scores = np.load(run / "scores.npy")
    assert json.loads((run / "metrics.json").read_text())["influence"]["world_size"] == 2

    manifest = json.loads((run / "scores" / "manifest.json").read_text())
    assert manifest["num_shards"] == 6 and manifest["complete"] == list(range(6))
    manifest["complete"] = [0, 1]  # as if killed after two shards
    (run / "scores" / "manifest.json").write_text(json.dumps(manifest))
    (run / "scores" / "shard_00003.npy").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = pipeline.run(scale_worker.compose_run(f"cache_dir={cache}"), run)
    assert metrics["training"]["pretrain_cached"] and metrics["training"]["finetune_cached"]
    assert metrics["influence"]["resumed"] == {"solve": True, "shards_computed": 4, "shards_total": 6}
    assert metrics["influence"]["world_size"] == 1
    resumed = np.load(run / "scores.npy")
    np.testing.assert_array_equal(resumed[:, :200], distributed_scores[:, :200])  # loaded, not recomputed
    np.testing.assert_allclose(resumed, distributed_scores, rtol=1e-5, atol=1e-5 * np.abs(distributed_scores).max())

    trained = sorted(p.name for p in cache.iterdir())
    with pytest.raises(ResultsMismatchError, match=r"different configuration.*seed: 0 -> 1.*new output directory"):
        pipeline.run(scale_worker.compose_run(f"cache_dir={cache}", "seed=1"), run)
    assert sorted(p.name for p in cache.iterdir()) == trained  # refused before any training


def test_other_ranks_keep_no_hydra_files(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(sys, "argv", ["lissa-influence", "-m", "seed=0,1", "hydra/job_logging=stdout"])
    app._quiet_other_ranks()
    assert sys.argv == [
        "lissa-influence",
        "-m",
        "hydra.output_subdir=null",
        "hydra/hydra_logging=disabled",
        "seed=0,1",
        "hydra/job_logging=stdout",
    ]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(sys, "argv", ["lissa-influence", "seed=1"])
    app._quiet_other_ranks()
    assert sys.argv == ["lissa-influence", "seed=1"]


# --------------------------------------------------------------------------- resumable results
def test_killed_scoring_resumes_to_the_uninterrupted_scores(tmp_path, capsys):
    """SIGKILL a scoring run (25 shards of 2 examples, slowed down) once a few shards are
    written; the rerun loads s, computes only the remaining shards, and the assembled
    scores equal an uninterrupted run bit for bit."""
    root = tmp_path / "scores"
    cmd = [sys.executable, str(HERE / "scale_worker.py"), "resume", str(root), "0.3"]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            manifest = ShardStore.read_manifest(root) if (root / "manifest.json").exists() else None
            done = manifest["complete"] if manifest else []
            if len(done) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"finished before it could be killed:\n{proc.stdout.read()[-3000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = len(ShardStore.read_manifest(root)["complete"])
    assert 3 <= killed_at < 25 and (root / "query_vectors.npy").exists()

    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scale_worker.run_resume(root, 0.0)  # the rerun (in this process: same code, one thread)
        info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert info == {"resumed_solve": True, "shards_computed": 25 - killed_at, "shards_total": 25}
        est = scale_worker.estimators()["fixed_cg"]
        test = scale_worker.problem()[3]["test"]
        _, expected, fresh = results.resumable_scores(
            est, (test.x, test.y), tmp_path / "uninterrupted", "resume-test", 2
        )
    assert fresh["shards_computed"] == 25 and not fresh["resumed_solve"]
    m = json.loads((root / "manifest.json").read_text())
    on_disk = np.concatenate([np.load(root / s["file"]) for s in m["shards"]], axis=1)  # numpy and json only
    np.testing.assert_array_equal(on_disk, expected.numpy())


def test_shard_store_refuses_another_config_and_checks_shapes(tmp_path):
    root = tmp_path / "scores"
    store = ShardStore(root, "aaaa", n=10, k=2, shard_size=4, config={"seed": 0, "solver": {"name": "cg"}})
    assert store.num_shards == 3 and store.pending() == [0, 1, 2] and store.bounds(2) == (8, 10)
    store.write(1, np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"shard 2 must have shape \(2, 2\)"):
        store.write(2, np.ones((2, 4)))
    reopened = ShardStore(root, "aaaa", n=10, k=2, shard_size=4)
    assert reopened.pending() == [0, 2] and reopened.complete == [1]
    with pytest.raises(RuntimeError, match=r"shards \[0, 2\] are not computed"):
        reopened.assemble()

    with pytest.raises(
        ResultsMismatchError,
        match=r"different configuration.*solver\.name: 'cg' -> 'lissa'.*"
        r"use a new output directory .* or delete",
    ):
        ShardStore(root, "bbbb", n=10, k=2, shard_size=4, config={"seed": 0, "solver": {"name": "lissa"}})
    with pytest.raises(ResultsMismatchError, match="different configuration"):
        ShardStore.check_folder(root, "bbbb")
    assert ShardStore.check_folder(root, "aaaa") and not ShardStore.check_folder(tmp_path / "new", "bbbb")
    with pytest.raises(ResultsMismatchError, match="written with shard_size=4, this run has shard_size=5"):
        ShardStore(root, "aaaa", n=10, k=2, shard_size=5)

    for i in (0, 2):
        reopened.write(i, np.full((2, reopened.bounds(i)[1] - reopened.bounds(i)[0]), float(i)))
    reopened.save_query_vectors(np.eye(2, 3), {"pretrain": {"iterations": 3}})
    final = ShardStore(root, "aaaa", n=10, k=2, shard_size=4)
    assert final.pending() == [] and final.assemble().shape == (2, 10)
    s, info = final.load_query_vectors()
    np.testing.assert_array_equal(s, np.eye(2, 3))
    assert info == {"pretrain": {"iterations": 3}}


# --------------------------------------------------------------------------- Hydra launchers
def test_launcher_configs_compose():
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="hydra-joblib-launcher is not installed")
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher is not installed")
    from hydra import compose, initialize_config_dir

    from lissa_influence.experiments import config

    config.register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        joblib = compose(config_name="config", overrides=["hydra/launcher=parallel"], return_hydra_config=True)
        slurm = compose(
            config_name="config",
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
    assert joblib.hydra.launcher._target_.endswith("JoblibLauncher") and joblib.hydra.launcher.n_jobs == 2
    assert slurm.hydra.launcher._target_.endswith("SlurmLauncher") and slurm.hydra.launcher.partition == "gpu"
    assert slurm.hydra.launcher.tasks_per_node == 1 and slurm.hydra.launcher.timeout_min > 0


@pytest.mark.slow  # a few fresh interpreters: ~1 min on a busy 2-core machine
def test_joblib_launcher_runs_a_two_job_sweep(tmp_path, cache):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="hydra-joblib-launcher is not installed")
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lissa_influence",
            "-m",
            "hydra/launcher=parallel",
            *scale_worker.TINY_RUN,
            f"cache_dir={cache}",
            "solver=identity",
            "query=each,mean",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Joblib.Parallel" in proc.stdout + proc.stderr
    queries = sorted(json.loads((sweep / j / "metrics.json").read_text())["config"]["query"] for j in ("0", "1"))
    assert queries == ["each", "mean"]
    assert len((sweep / "summary.csv").read_text().strip().splitlines()) == 3  # header + 2 jobs
