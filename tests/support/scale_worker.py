"""Worker processes of tests/lib/test_distributed.py (run as scripts, not collected by pytest).

python -m torch.distributed.run --standalone --nproc_per_node=2 tests/support/scale_worker.py distributed OUT
    every rank computes the influence scores of :func:`cases` and saves them to
    OUT/rank<r>.pt; the store case writes OUT/store (rank 0 only); then the main job
    (pipeline.run, tiny digits settings, weights cached in OUT/cache) into OUT/run
python tests/support/scale_worker.py resume ROOT DELAY
    resumable scoring into ROOT, sleeping DELAY seconds per shard (so that the test
    can kill it part-way); prints one JSON line with what was resumed
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers.py; lissa_influence from PYTHONPATH

from helpers import TinyCNN, make_data  # noqa: E402

from lissa_influence import CG, EKFAC, Influence, LiSSA, MultiStageInfluence, distributed, results  # noqa: E402

from hydra_helpers import TINY  # noqa: E402

SHARD_SIZE = 7
REPO = Path(__file__).resolve().parents[2]
# The main job on the embedded digits with tiny settings, as the app tests run it
TINY_RUN = [*TINY, "gauss_newton=true", "shard_size=100"]


def compose_run(*overrides: str):
    from hydra import compose, initialize_config_dir

    from lissa_influence.experiments import config

    config.register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=[*TINY_RUN, *overrides])


def problem():
    """Untrained tiny CNNs (float64) and data: pretraining 50, finetuning 40, 3 test points."""
    torch.manual_seed(0)
    pre, ft = TinyCNN(3).double(), TinyCNN(2).double()
    ft.embedding.load_state_dict(pre.embedding.state_dict())
    ft_updated = TinyCNN(2).double()
    ft_updated.load_state_dict(ft.state_dict())
    with torch.no_grad():  # finetuning moved the embedding a little
        for p in ft_updated.embedding.parameters():
            p.add_(0.05 * torch.randn_like(p))
    data = {
        "pre": make_data(50, (1, 6, 6), 3, seed=1),
        "ft": make_data(40, (1, 6, 6), 2, seed=2),
        "test": make_data(3, (1, 6, 6), 2, seed=3),
    }
    return pre, ft, ft_updated, data


def estimators():
    """Fitted estimators covering the products and solvers: HVP + mixed block (fixed, CG),
    GGN with LiSSA minibatches and a power-iteration scale (updated), single stage with a
    Jacobi-preconditioned CG, and a one-example Hessian sample (an empty shard on rank 1);
    the fast curvature: EK-FAC in place of both solves (fixed: the head-only exact finetune
    solve), EK-FAC-preconditioned CG (updated), Nyström-preconditioned CG on retained-graph
    products (single stage)."""
    pre, ft, ft_updated, d = problem()
    P, F = (d["pre"].x, d["pre"].y), (d["ft"].x, d["ft"].y)
    common = dict(hessian_samples=37, finetune_hessian_samples=29, batch_size=8)
    return {
        "fixed_cg": MultiStageInfluence(
            pre,
            ft,
            mode="fixed",
            solver=CG(tol=1e-12, max_iter=500),
            pretrain_damping=1.0,
            finetune_damping=1.0,
            **common,
        ).fit(P, F),
        "updated_lissa": MultiStageInfluence(
            pre,
            ft_updated,
            mode="updated",
            alpha=0.05,
            gauss_newton=True,
            solver=LiSSA(batch_size=5, depth=15, repeats=2, scale="auto", power_iters=10),
            pretrain_damping=0.1,
            finetune_damping=0.1,
            **common,
        ).fit(P, F),
        "single_cg": Influence(
            pre,
            solver=CG(tol=1e-12, max_iter=500, preconditioner="jacobi"),
            gauss_newton=True,
            damping=0.1,
            hessian_samples=37,
            batch_size=8,
        ).fit(P),
        "fixed_ekfac": MultiStageInfluence(
            pre, ft, mode="fixed", solver=EKFAC(), gauss_newton=True, pretrain_damping=0.1, **common
        ).fit(P, F),
        "updated_cg_ekfac": MultiStageInfluence(
            pre,
            ft_updated,
            mode="updated",
            alpha=0.05,
            gauss_newton=True,
            solver=CG(tol=1e-12, max_iter=500, preconditioner="ekfac"),
            pretrain_damping=0.1,
            finetune_damping=0.1,
            **common,
        ).fit(P, F),
        "single_nystrom_retained": Influence(
            pre,
            solver=CG(tol=1e-12, max_iter=500, preconditioner="nystrom", rank=10),
            damping=1.0,
            hessian_samples=37,
            batch_size=8,
            hvp_mode="retained",
        ).fit(P),
        "single_one_sample": Influence(
            pre, solver=CG(tol=1e-12, max_iter=500), gauss_newton=True, damping=0.1, hessian_samples=1, batch_size=8
        ).fit(P),
    }


def cases(store: Path | None = None) -> dict[str, torch.Tensor]:
    """Query vectors, all scores and the scores of examples 5..22, per estimator; with
    ``store``, the first estimator goes through :func:`results.resumable_scores` there."""
    d = problem()[3]
    test = (d["test"].x, d["test"].y)
    out = {}
    for name, est in estimators().items():
        if store is not None and name == "fixed_cg":
            s, scores, _ = results.resumable_scores(est, test, store, "h", SHARD_SIZE)
        else:
            s = est.query_vectors(test)
            scores = est.scores_from(s)
        out[name + "/s"], out[name + "/scores"] = s, scores
        out[name + "/partial"] = est.scores_from(s, None, 5, 23)
    return out


def run_distributed(out: Path) -> None:
    assert distributed.init_from_env(), "expected to run under torchrun with WORLD_SIZE > 1"
    assert "gloo" in torch.distributed.get_backend()  # "cpu:gloo,cuda:nccl" on a CUDA machine
    r = distributed.rank()
    res = cases(out / "store")
    est = estimators()["fixed_cg"]
    res["rank_of_world"] = torch.tensor([r, distributed.world_size()])
    res["hessian_shard"] = torch.tensor(
        [len(est.pre_objective.batch), est.pre_objective.sample_offset, est.pre_objective.total]
    )
    torch.save(res, out / f"rank{r}.pt")

    import warnings

    from lissa_influence.experiments import pipeline

    warnings.simplefilter("ignore")  # 20 CG iterations do not converge; expected here
    metrics = pipeline.run(compose_run(f"cache_dir={out / 'cache'}"), out / ("run" if r == 0 else f"run_rank{r}"))
    torch.save(
        {"mean_abs_score": metrics["influence"]["mean_abs_score"], "world_size": metrics["influence"]["world_size"]},
        out / f"run_rank{r}.pt",
    )
    torch.distributed.destroy_process_group()


def run_resume(root: Path, delay: float) -> None:
    est = estimators()["fixed_cg"]
    d = problem()[3]
    if delay > 0:
        plain = est.scores_from

        def slow(*args, **kwargs):
            time.sleep(delay)
            return plain(*args, **kwargs)

        est.scores_from = slow
    _, _, info = results.resumable_scores(
        est,
        (d["test"].x, d["test"].y),
        root,
        "resume-test",
        2,
        on_shard=lambda i, lo, hi: print(f"shard {i}", flush=True),
    )
    print(json.dumps({k: info[k] for k in ("resumed_solve", "shards_computed", "shards_total")}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "distributed":
        run_distributed(Path(sys.argv[2]))
    elif sys.argv[1] == "resume":
        run_resume(Path(sys.argv[2]), float(sys.argv[3]))
    else:
        raise SystemExit(f"unknown command {sys.argv[1]!r}")
    os._exit(0)  # skip interpreter teardown (slow with torch on a loaded machine)
