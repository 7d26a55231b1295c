"""Nothing lost, nothing silently wrong: each case of a hostile probe that used to end with
rc=0 and wrong numbers, or with an error nobody could act on, and what it does now."""

from __future__ import annotations

import math
import multiprocessing
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lissa_influence import CG, Explicit, Influence, LiSSA, MultiStageInfluence, SolverWarning
from lissa_influence.batching import Batch
from lissa_influence.curvature import CurvatureOperator, Objective
from lissa_influence.experiments import config, pipeline, rundir
from lissa_influence.params import make_block, named_params
from lissa_influence.results import ShardStore
from lissa_influence.solvers import DivergenceError, NotConvergedError

from conftest import TinyMLP
from hydra_helpers import compose_cfg
from test_app import TINY, cli


@pytest.fixture(scope="module")
def mlp_operator():
    torch.manual_seed(0)
    model = TinyMLP().double()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (200,), generator=g)
    params = named_params(model)
    objective = Objective(model, F.cross_entropy, params, Batch(x, y), chunk_size=64)
    return CurvatureOperator(objective, make_block(params, lambda n: True), damping=0.5, gauss_newton=True)


# 1. stochastic LiSSA hid its divergence ---------------------------------------------------------
def test_lissa_never_vouches_for_a_diverged_or_unmeasured_result(mlp_operator):
    b = torch.randn(2, mlp_operator.size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with pytest.raises(ValueError, match=r"safety=0.4.*use safety > 0.5"):
        LiSSA(safety=0.4)
    lam = LiSSA(power_iters=100)._top_eigenvalue(mlp_operator, mlp_operator.size, b)
    for batch_size in (None, 64):  # deterministic and stochastic: a scale below λ/2 diverges
        with pytest.raises(DivergenceError, match=r"converges only for scale > .*use scale ≥"):
            LiSSA(scale=lam / 3, depth=100, batch_size=batch_size).solve(mlp_operator, b)
    with pytest.warns(match="relative residual .* stochastic"):
        _, info = LiSSA(depth=50, batch_size=64).solve(mlp_operator, b)
    assert not info.converged and 0 < info.extra["relative_residual"] < 1
    for bad in (dict(depth=0), dict(scale=-1.0), dict(damping=float("nan")), dict(batch_size=0), dict(tol=-1.0)):
        with pytest.raises(ValueError):
            LiSSA(**bad)
    with pytest.raises(ValueError, match="max_iter"):
        CG(max_iter=0)


# 2. two runs into one run folder mixed their results ----------------------------------------------
def _take(folder, queue):
    try:
        rundir.acquire(folder)
        queue.put("taken")
    except rundir.RunFolderLockedError as e:
        queue.put(str(e))


def test_a_run_folder_is_owned_by_one_run(tmp_path):
    rundir.acquire(tmp_path)
    rundir.acquire(tmp_path)  # re-entrant in one process
    queue = multiprocessing.get_context("spawn").Queue()
    other = multiprocessing.get_context("spawn").Process(target=_take, args=(tmp_path, queue))
    other.start()
    other.join(60)
    message = queue.get(timeout=10)
    assert f"pid {os.getpid()}" in message and "hydra.run.dir" in message
    rundir.release(tmp_path)
    assert rundir.holder(tmp_path)["pid"] == os.getpid()  # still held once
    rundir.release(tmp_path)
    assert rundir.holder(tmp_path) is None
    died = "from lissa_influence.experiments import rundir; import os, sys; rundir.acquire(sys.argv[1]); os._exit(3)"
    assert subprocess.run([sys.executable, "-c", died, str(tmp_path)]).returncode == 3  # no release
    rundir.acquire(tmp_path)  # the dead run's lock went with it
    rundir.release(tmp_path)


# 3. resume trusted shard files ---------------------------------------------------------------------
def test_a_bad_shard_is_recomputed_never_used(tmp_path):
    store = ShardStore(tmp_path, "h", n=10, k=2, shard_size=4)
    for i in range(store.num_shards):
        lo, hi = store.bounds(i)
        store.write(i, np.full((2, hi - lo), float(i)))
    assert store.pending() == []
    flipped = bytearray(store.shard_file(0).read_bytes())
    flipped[-3] ^= 0xFF
    store.shard_file(0).write_bytes(bytes(flipped))
    store.shard_file(1).write_bytes(store.shard_file(2).read_bytes())  # another shard's file
    store.shard_file(2).write_bytes(store.shard_file(2).read_bytes()[:40])  # truncated
    reopened = ShardStore(tmp_path, "h", n=10, k=2, shard_size=4)
    with pytest.warns(UserWarning) as caught:
        assert reopened.pending() == [0, 1, 2]
    messages = " ".join(str(w.message) for w in caught)
    assert all(str(store.shard_file(i)) in messages for i in range(3)) and "checksum" in messages
    with pytest.raises(RuntimeError, match="not computed yet"):
        reopened.assemble()


# 4. a refused run overwrote the record of the run it refused ---------------------------------------
@pytest.mark.slow
def test_a_refused_run_leaves_the_folder_as_it_was(tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    first = cli([*TINY, "gauss_newton=true", f"cache_dir={cache}", f"hydra.run.dir={run_dir}"], tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    record = {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()}
    second = cli(
        [*TINY, "gauss_newton=true", f"cache_dir={cache}", f"hydra.run.dir={run_dir}", "pretrain.train.lr=0.02"],
        tmp_path,
    )
    assert second.returncode == 1 and "pretrain.train.lr: 0.01 -> 0.02" in second.stderr
    assert {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()} == record
    assert rundir.holder(run_dir) is None


# 5. CG handed back a diverged iterate ----------------------------------------------------------------
def test_cg_returns_its_best_iterate_when_its_residual_climbs():
    """A float32 operator with condition number 1e8 (a saturated softmax head at damping
    1e-8, in miniature): the residual climbs far above where it started. Row and block CG
    hand back their best iterate, say that the residual climbed, and the main job refuses
    a solve that made no progress."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64))
    a = (q * torch.logspace(-8, 0, 300, dtype=torch.float64)) @ q.T
    a = (a + a.T) / 2
    b = torch.randn(2, 300, generator=g)

    def true(z):
        return float(((b.double() - z.double() @ a.T).norm(dim=1) / b.norm(dim=1)).max())

    for block in (False, True):
        seen = []
        with pytest.warns(SolverWarning, match=r"climbed .* times above its best.*float32"):
            x, info = CG(max_iter=200, block=block).solve(a.float(), b, callback=lambda xk, n: seen.append(xk.clone()))  # noqa: B023
        assert info.extra["residual_growth"] > 10 and max(info.residuals) > 10
        assert true(x) <= min([1.0] + [true(z) for z in seen]) * 1.01  # the best of every iterate and of x = 0
        assert max(info.extra["relative_residuals"]) <= 1.0
    with pytest.raises(NotConvergedError, match="allow_unconverged=true"):
        pipeline.check_solves({"finetune": {"relative_residuals": [1.0, 0.2]}}, allow_unconverged=False)
    pipeline.check_solves({"finetune": {"relative_residuals": [63.8]}}, allow_unconverged=True)
    nan_operator = a.float().clone()
    nan_operator[0, 0] = float("nan")
    for block in (False, True):
        with pytest.raises(DivergenceError, match="NaN or inf"):
            CG(block=block).solve(nan_operator, b)
    with pytest.raises(DivergenceError, match="NaN or inf"):
        Explicit().solve(nan_operator.double(), b.double())


# 6. NaN damping was accepted -----------------------------------------------------------------------
def test_nan_or_negative_damping_is_refused_everywhere(mlp_operator):
    for value in ("nan", "inf", "-1"):
        with pytest.raises(ValueError, match="use a finite number >= 0, auto"):
            config.check(compose_cfg(f"pretrain.damping={value}"))
    model = TinyMLP().double()
    for bad in (math.nan, -1.0, math.inf):
        with pytest.raises(ValueError, match="pretrain_damping"):
            MultiStageInfluence(model, model, shared="embedding", pretrain_damping=bad)
        with pytest.raises(ValueError, match="damping"):
            Influence(model, damping=bad)
        with pytest.raises(ValueError, match="damping must be finite"):
            CurvatureOperator(mlp_operator.objective, mlp_operator.block, damping=bad)


# 7. shape and label errors came from deep inside torch ----------------------------------------------
def test_inputs_are_checked_where_they_enter():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (30,), generator=g)
    wide = torch.randn(30, 7, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"training data: the model cannot take its examples .*\(1, 7\)"):
        Influence(model, hessian_samples="all").fit((wide, y))
    inf = Influence(model, damping=1.0, hessian_samples="all").fit((x, y))
    with pytest.raises(ValueError, match="test data: the model cannot take its examples"):
        inf.scores((wide[:2], y[:2]))
    with pytest.raises(ValueError, match=r"labels \[7\] at examples \[0\] are outside the model's 4 classes"):
        inf.scores((x[:2], torch.tensor([7, 1])))
    with pytest.raises(ValueError, match="cross-entropy takes class indices"):
        Influence(model, hessian_samples="all").fit((x, y.double()))
    with pytest.raises(ValueError, match="ignore_index"):
        Influence(model, hessian_samples="all").fit((x, torch.where(y == 0, -100, y)))
    with pytest.raises(ValueError, match=r"hessian_samples must be a positive number or 'all', got 10.5"):
        Influence(model, hessian_samples=10.5).fit((x, y))
    with pytest.raises(ValueError, match="hessian_samples=10.5 must be a number >= 1"):
        config.check(compose_cfg("pretrain.hessian_samples=10.5"))


# and one thing that already worked: two runs sharing one weight cache ----------------------------
@pytest.mark.slow
def test_two_runs_share_one_weight_cache(tmp_path):
    cache = tmp_path / "cache"
    args = [
        [*TINY, "gauss_newton=true", f"cache_dir={cache}", f"hydra.run.dir={tmp_path / name}", f"seed={seed}"]
        for name, seed in (("a", 0), ("b", 1))
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "lissa_influence", *a],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for a in args
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    assert len(list(cache.glob("*.pt"))) == 2  # one pretraining, one finetuning: trained once, loaded once
