"""The solver-accuracy benchmark: its metrics, its exact reference, and its Hydra jobs.

The jobs run on the embedded digits with tiny training (20 Adam steps) and damping 1
in both stages, so that the damped Hessians are positive definite (checked through the
reference's spectrum) and CG must reach the dense solution.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from lissa_influence import CG, LiSSA
from lissa_influence.experiments import accuracy
from lissa_influence.experiments.accuracy import DenseInverse, full_products
from lissa_influence.metrics import ErrorTrace, relative_error, score_agreement
from lissa_influence.operators import DenseOperator

from hydra_helpers import assert_png, compose_cfg
from test_app import TINY, cli

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # hessian_samples above tiny set sizes etc.

DAMPED = ["pretrain.damping=1.0", "finetune.damping=1.0", "query=mean"]


def test_score_agreement_on_known_rankings():
    ref = torch.tensor([[5.0, -4.0, 3.0, 0.1, -0.2, 0.05]], dtype=torch.float64)
    same = score_agreement(ref * 2, ref, top_k=3)  # a rescaling keeps every ranking
    assert same["pearson"] == pytest.approx(1.0) and same["spearman"] == pytest.approx(1.0)
    assert same["top3_overlap"] == 1.0 and same["scores_error"] == pytest.approx(1.0)
    flipped = score_agreement(-ref, ref, top_k=3)  # same |I|: same top examples, opposite order
    assert flipped["spearman"] == pytest.approx(-1.0) and flipped["top3_overlap"] == 1.0
    swapped = ref.clone()
    swapped[0, [2, 3]] = swapped[0, [3, 2]]  # the third largest |I| leaves the top 3
    assert score_agreement(swapped, ref, top_k=3)["top3_overlap"] == pytest.approx(2 / 3)
    assert relative_error(ref, ref) == 0.0


def test_dense_inverse_solves_and_reports_the_spectrum():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g, dtype=torch.float64)
    a = m @ m.T + 0.5 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(3, 6, generator=g, dtype=torch.float64)
    inv = DenseInverse.of(a)
    assert relative_error(inv.solve(b), torch.linalg.solve(a, b.T).T) <= 1e-12
    evals = torch.linalg.eigvalsh(a)
    assert inv.spectrum()["condition"] == pytest.approx(float(evals[-1] / evals[0]))
    assert DenseInverse.of(-a).spectrum()["condition"] == float("inf")


def test_error_trace_and_stochastic_product_cost():
    target = torch.ones(2, 4, dtype=torch.float64)
    trace = ErrorTrace({"a": target}, rows=2, offsets={"a": 10.0})
    trace(torch.zeros(2, 4, dtype=torch.float64), 4)
    assert trace.points["a"] == [[12.0, 1.0]]

    class Op(DenseOperator):  # a Hessian sample of 200 examples that can draw minibatches
        sample_size = 200

        def minibatch(self, *_):
            return self

    lissa = LiSSA(scale="auto", batch_size=50, power_iters=50)
    op = Op(torch.eye(4, dtype=torch.float64))
    # the auto scale's power iterations run on minibatches too, so every product of the recursion is one
    assert full_products(lissa, op, 50 + 400) == (50 + 400) * 0.25
    assert full_products(lissa, op, 451, minibatch=450) == 450 * 0.25 + 1  # plus the full residual check
    assert full_products(CG(), op, 30) == 30.0


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("accuracy_cache")


def job(cache, tmp_path, name: str, *overrides: str) -> dict:
    cfg = compose_cfg(*TINY, *DAMPED, f"cache_dir={cache}", *overrides)
    return accuracy.run(cfg, tmp_path / name, overrides=[f"job={name}"])


def test_jobs_measure_solvers_against_the_dense_solve(cache, tmp_path, capsys):
    exact = job(cache, tmp_path, "explicit", "solver=explicit")
    row = exact["row"]
    assert row["status"] == "ok"
    assert row["finetune_min_eigenvalue"] > 0 and row["pretrain_min_eigenvalue"] > 0  # the premise of this test
    assert max(row["finetune_error"], row["pretrain_error"], row["query_error"], row["scores_error"]) <= 1e-9
    assert row["hvps"] == row["finetune_params"] + row["pretrain_params"]

    cg = job(cache, tmp_path, "cg", "solver=cg", "solver.tol=1e-10", "solver.max_iter=1000")
    row = cg["row"]
    assert row["status"] == "ok" and row["finetune_converged"] and row["pretrain_converged"]
    assert row["query_error"] <= 1e-6 and row["spearman"] >= 0.9999 and row["top10_overlap"] == 1.0
    # one product per iteration, and one per solve for the true residual that decides convergence
    assert row["hvps"] == row["finetune_iterations"] + row["pretrain_iterations"] + 2
    for name, curve in cg["curves"].items():  # the traced error falls to the final error
        pts = np.array(curve)
        assert np.all(np.diff(pts[:, 0]) > 0), name
        assert pts[-1, 1] == pytest.approx(row[f"{name}_error"], rel=1e-6) and pts[0, 1] > 1e3 * pts[-1, 1]
    assert cg["curves"]["query"][0][0] > row["finetune_hvps"]  # end to end: after the finetune solve's products

    # 3 iterations and the true residual at max_iter, per stage
    capped = job(cache, tmp_path, "cg_capped", "solver=cg", "solver.tol=0", "solver.max_iter=3")["row"]
    assert capped["hvps"] == 8 and capped["query_error"] > 10 * row["query_error"]
    assert any("did not reach" in w for w in capped["finetune_warnings"])

    ident = job(cache, tmp_path, "identity", "solver=identity")["row"]
    assert ident["hvps"] == 0 and ident["query_error"] > 0.1

    # a LiSSA scale far below the top eigenvalue diverges: a row with the reason, not a crash
    bad = job(cache, tmp_path, "lissa_bad", "solver=lissa", "solver.scale=0.01", "solver.depth=100")["row"]
    assert bad["status"].startswith("DivergenceError") and "query_error" not in bad

    # the cached reference is reused: the same exact scores, no second dense build
    assert exact["row"]["reference_seconds"] == ident["reference_seconds"]

    rows = accuracy.summarise(tmp_path)
    assert [r["label"] for r in rows] == [f"job={n}" for n in ("cg", "cg_capped", "explicit", "identity", "lissa_bad")]
    with open(tmp_path / "solver_accuracy.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 5 and float(table[0]["query_error"]) <= 1e-6 and table[4]["query_error"] == ""
    for name in ("error_vs_hvps", "error_vs_hvps_cg", "error_vs_hvps_lissa"):  # all jobs, then per solver
        assert_png(tmp_path / f"{name}.png")
    assert not (tmp_path / "error_vs_hvps_identity.png").exists()
    assert "solver" in json.loads((tmp_path / "cg" / "accuracy.json").read_text())["config"]


@pytest.mark.slow
def test_cli_multirun_collects_rows(cache, tmp_path):
    sweep = tmp_path / "sweep"  # the shared cache holds the trained models and the reference
    proc = cli(
        [
            "-m",
            "solver=cg,identity",
            *TINY,
            *DAMPED,
            "solver.tol=1e-8",
            f"cache_dir={cache}",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
        entry="from lissa_influence.experiments.app import accuracy_main; accuracy_main()",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(sweep / "solver_accuracy.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == ["solver=cg", "solver=identity"]
    assert float(rows[0]["query_error"]) < 1e-5 < float(rows[1]["query_error"])
    assert_png(sweep / "error_vs_hvps.png")
    assert proc.stdout.count("solver accuracy (") == 1 and not (sweep / "summary.csv").exists()
