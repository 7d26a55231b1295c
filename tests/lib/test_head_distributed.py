"""The exact head inverse under torch.distributed: each rank holds a shard of the finetune
Hessian sample, assembles its share of the Gauss-Newton matrix from the head's Jacobian,
and the shares are summed across ranks, so every rank factors the same matrix.

Two spawned processes on gloo (CPU), float64: the ranks' scores are identical, and equal
the single-process scores up to the rounding order of the sums (1e-10 allowed)."""

from __future__ import annotations

import multiprocessing
import os
import traceback
from pathlib import Path

import pytest
import torch

from lissa_influence import CG, MultiStageInfluence, distributed
from lissa_influence.objective import Objective

from conftest import TinyCNN, make_data, rel


def problem():
    """Untrained tiny CNNs (float64): pretraining 50, finetuning 41 (shards of 21 and 20), 3 test points."""
    torch.manual_seed(0)
    pre, ft = TinyCNN(3).double(), TinyCNN(2).double()
    ft.embedding.load_state_dict(pre.embedding.state_dict())
    data = make_data(50, (1, 6, 6), 3, seed=1), make_data(41, (1, 6, 6), 2, seed=2), make_data(3, (1, 6, 6), 2, seed=3)
    return pre, ft, data


def scores() -> dict[str, object]:
    pre, ft, (pre_data, ft_data, test) = problem()
    msi = MultiStageInfluence(
        pre,
        ft,
        mode="fixed",
        solver=CG(tol=1e-12, max_iter=500),
        gauss_newton=True,
        finetune_damping=1e-3,
        hessian_samples="all",
        batch_size=8,
    ).fit((pre_data.x, pre_data.y), (ft_data.x, ft_data.y))
    s = msi.query_vectors((test.x, test.y))
    info = msi.diagnostics["finetune"]
    return {
        "scores": msi.scores_from(s),
        "path": msi.finetune_path,
        "assembly": info["assembly"],
        "products": info["num_products"],
        "shard": len(msi.ft_operator.objective.batch),
    }


def _rank(rank: int, world: int, store: str, out: str, fail_on: int | None) -> None:
    torch.set_num_threads(1)
    try:
        torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        if rank == fail_on:  # this rank alone cannot form its Jacobian: every rank must take the other route

            def fail(*args: object, **kwargs: object) -> torch.Tensor:
                raise RuntimeError("no Jacobian here")

            Objective.gauss_newton_matrix = fail  # type: ignore[method-assign]
        result = scores()
        result["world"] = distributed.world_size()
        torch.save(result, Path(out) / f"rank{rank}.pt")
        torch.distributed.destroy_process_group()
    except BaseException:
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def run_ranks(tmp_path: Path, fail_on: int | None = None, world: int = 2) -> list[dict[str, object]]:
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_rank, args=(r, world, str(tmp_path / "store"), str(tmp_path), fail_on))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    for p in procs:
        if p.is_alive():
            p.kill()
    errors = [f.read_text() for f in sorted(tmp_path.glob("rank*.err"))]
    assert not errors and all(p.exitcode == 0 for p in procs), "\n".join(errors)[-4000:]
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def reference() -> dict[str, object]:
    for var in ("RANK", "WORLD_SIZE"):
        assert var not in os.environ
    return scores()


def test_two_ranks_sum_the_head_jacobian_and_give_the_single_process_scores(tmp_path, reference):
    assert reference["path"] == "head only, exact (float64)" and reference["assembly"] == "gauss-newton jacobian"
    r0, r1 = run_ranks(tmp_path)
    assert (r0["world"], r1["world"]) == (2, 2) and (r0["shard"], r1["shard"]) == (21, 20)
    for r in (r0, r1):
        assert r["path"] == "head only, exact (float64)"
        assert r["assembly"] == "gauss-newton jacobian", r["assembly"]  # not n products with basis vectors
        assert r["products"] == reference["products"]
        assert rel(r["scores"], reference["scores"]) <= 1e-10, rel(r["scores"], reference["scores"])
    assert torch.equal(r0["scores"], r1["scores"])  # one summed matrix: the same factor on every rank


def test_a_rank_that_cannot_form_its_jacobian_sends_every_rank_to_the_products(tmp_path, reference):
    r0, r1 = run_ranks(tmp_path, fail_on=1)  # no deadlock: the ranks agree before any sum
    for r in (r0, r1):
        assert r["assembly"] == "products with basis vectors"
        assert rel(r["scores"], reference["scores"]) <= 1e-10
    assert torch.equal(r0["scores"], r1["scores"])
