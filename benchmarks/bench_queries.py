"""Many queries against the same two operators: fresh block CG, deflated (recycled) CG,
the low-rank solver and EK-FAC, chunk by chunk; pyDVL's best CG on the single-stage problem
in the same process; the per-call setup of a ResNet-18 apart from its per-product cost.

    python benchmarks/bench_queries.py --threads 2 --out docs/figures
    python benchmarks/bench_queries.py --settings digits:fixed --queries 20   # a quick look

Workload (docs/benchmarks.md, "Many queries"): ``--queries`` test points of the finetuning
task scored in chunks of ``--chunk`` (each method chunk by chunk, round-robin, so that
background load hits all alike), for each ``--settings`` entry
``data:mode`` (the main job's models, trained or loaded from ``--cache-dir``). Per method:
products per query (both stages), seconds per query, and the worst relative error of the
query vectors ``s`` against the explicit solve (``Explicit(method="eigh")`` on both stages).
All CG variants run at the same true-residual tolerance ``--tol``. The figure plots the
cumulative products against the queries scored.

pyDVL (``--pydvl``, needs ``pip install "pydvl[influence]==0.10.*" "numpy<2"``): the
single-stage influence of the digits model's pretraining examples, ``CgInfluence`` with
``solve_simultaneously=True`` (block CG, its fastest exact mode in bench_pydvl.py) at the
criterion matching ours, chunk by chunk, against our fresh and deflated block CG.

ResNet-18 (``--resnet``): a torchvision ResNet-18 on 64 random 32×32 images, one query
per call and ``CG(tol=0, max_iter=10)`` at damping 10 (an untrained net: a row meeting
negative curvature stops); the first and second ``query_vectors`` calls,
the per-product cost, and the setup of each call (its time less its products), all in
units of one gradient of the 64-image loss.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Any

import torch
from torch.utils.data import Subset, TensorDataset

from lissa_influence import CG, EKFAC, Explicit, Influence, LowRank, SolverWarning

from _common import ROOT, finish, markdown, setup_threads, table


def methods(tol: float, deflate: list[int], rank: int) -> dict[str, Any]:
    out: dict[str, Any] = {"block CG": lambda: CG(tol=tol, max_iter=3000)}
    for m in deflate:
        out[f"deflated CG ({m})"] = lambda m=m: CG(tol=tol, max_iter=3000, deflate=m)
    out[f"low rank ({rank})"] = lambda: LowRank(rank=rank)
    out["EK-FAC"] = lambda: EKFAC()
    return out


def multistage(args: argparse.Namespace, data_name: str, mode: str) -> dict[str, Any]:
    from hydra import compose, initialize_config_dir

    from lissa_influence.experiments import config, pipeline

    config.register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(
            "config", overrides=[f"data={data_name}", f"mode={mode}", f"cache_dir={args.cache_dir}", "progress=false"]
        )
    data, pre, ft, _ = pipeline.train(cfg)
    idx = pipeline.test_indices(len(data.finetune_test), args.queries, cfg.seed).tolist()
    test = Subset(data.finetune_test, idx)

    def build(solver: Any):
        """The main job's estimator with ``solver`` for both stages (fixed mode: the exact head
        unless the solver is an approximation, which replaces both inverses)."""
        return pipeline.build_influence(cfg, pre, ft, data, solver=solver)

    t0 = time.perf_counter()
    ref = build(Explicit(method="eigh", max_params=20_000))
    s_ref = ref.query_vectors(test)
    t_ref = time.perf_counter() - t0
    sizes = {"pretrain": ref.pre_operator.size, "finetune": ref.ft_operator.size}
    print(f"{data_name} {mode}: operators {sizes}, explicit reference {t_ref:.0f}s")
    # every method chunk by chunk, round-robin: background load hits them alike (their own
    # operators keep what a solver recycles from chunk to chunk)
    estimators = {name: build(make()) for name, make in methods(args.tol, args.deflate, args.rank).items()}
    k = args.chunk
    chunks = [Subset(test, list(range(i, min(i + k, len(idx))))) for i in range(0, len(idx), k)]
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in estimators}
    seconds = {n: 0.0 for n in estimators}
    per_chunk: dict[str, list[int]] = {n: [] for n in estimators}
    converged = dict.fromkeys(estimators, True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)
        for chunk in chunks:
            for name, msi in estimators.items():
                t0 = time.perf_counter()
                parts[name].append(msi.query_vectors(chunk))
                seconds[name] += time.perf_counter() - t0
                d = msi.diagnostics
                per_chunk[name].append(sum(d[st]["num_products"] for st in ("finetune", "pretrain")))
                converged[name] &= all(d[st]["converged"] for st in ("finetune", "pretrain"))
    rows = []
    for name in estimators:
        s = torch.cat(parts[name])
        err = float((torch.linalg.vector_norm(s - s_ref, dim=1) / torch.linalg.vector_norm(s_ref, dim=1)).max())
        p = per_chunk[name]
        rows.append(
            {
                "method": name,
                "products_per_query": sum(p) / len(idx),
                "products_per_query_after_first": sum(p[1:]) / max(1, len(idx) - k),
                "first_chunk_per_query": p[0] / k,
                "seconds_per_query": seconds[name] / len(idx),
                "max_error": err,
                "converged": converged[name],
                "products_by_chunk": p,
            }
        )
    print(
        table(
            ["method", "prod/q", "after 1st", "s/q", "max err"],
            [
                [
                    r["method"],
                    r["products_per_query"],
                    r["products_per_query_after_first"],
                    r["seconds_per_query"],
                    r["max_error"],
                ]
                for r in rows
            ],
        )
    )
    return {"data": data_name, "mode": mode, "sizes": sizes, "reference_seconds": t_ref, "rows": rows}


def pydvl_side_by_side(args: argparse.Namespace) -> dict[str, Any]:
    """Single-stage influence of the digits pretraining examples: pyDVL block CG against ours."""
    try:
        from pydvl.influence.torch import CgInfluence
    except ImportError as e:
        print(f"pyDVL is not installed ({e}); skipping. pip install 'pydvl[influence]==0.10.*' 'numpy<2'")
        return {"skipped": str(e)}
    from torch.nn import functional as F
    from torch.utils.data import DataLoader

    from lissa_influence.experiments.data import DataConfig, load_two_stage
    from lissa_influence.experiments.models import build_model
    from lissa_influence.experiments.training import TrainConfig, pretrain

    data = load_two_stage(DataConfig(name="digits", seed=0))
    lam = 1e-2
    model, _ = pretrain(
        build_model("digits", len(data.pretrain_classes), 0, torch.float64),
        data,
        TrainConfig(steps=300, lr=1e-2, seed=0, polish_iters=1000, weight_decay=lam),
    )
    model.eval()
    x, y = data.pretrain_train.tensors
    x = x.double()
    tx, ty = data.pretrain_test.tensors
    pick = torch.randperm(len(ty), generator=torch.Generator().manual_seed(0))[: args.queries]
    tx, ty = tx[pick].double(), ty[pick]
    train, m = TensorDataset(x, y), len(y)
    k = args.chunk
    out: dict[str, Any] = {}

    def ours(solver):
        return Influence(model, solver=solver, damping=lam, hessian_samples=m, batch_size=m).fit(train)

    ref = ours(Explicit(method="eigh")).query_vectors(TensorDataset(tx, ty))
    runs: dict[str, Any] = {
        "ours block CG": ours(CG(tol=args.tol, max_iter=3000)),
        f"ours deflated CG ({args.deflate[-1]})": ours(CG(tol=args.tol, max_iter=3000, deflate=args.deflate[-1])),
        "pyDVL CgInfluence (block)": CgInfluence(
            model,
            F.cross_entropy,
            regularization=lam,
            rtol=args.tol**0.5,
            atol=0.0,
            maxiter=3000,
            solve_simultaneously=True,
        ).fit(DataLoader(train, batch_size=m)),
    }
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in runs}
    secs = dict.fromkeys(runs, 0.0)
    prods: dict[str, int | None] = {n: (None if n.startswith("pyDVL") else 0) for n in runs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(0, len(ty), k):  # chunk by chunk, round-robin
            for name, est in runs.items():
                t0 = time.perf_counter()
                if name.startswith("pyDVL"):
                    parts[name].append(est.influence_factors(tx[i : i + k], ty[i : i + k]))
                else:
                    parts[name].append(est.query_vectors(TensorDataset(tx[i : i + k], ty[i : i + k])))
                    prods[name] += est.diagnostics["solve"]["num_products"]
                secs[name] += time.perf_counter() - t0
    results = {n: (torch.cat(parts[n]), secs[n], prods[n]) for n in runs}
    for name, (s, sec, prods) in results.items():
        err = float((torch.linalg.vector_norm(s - ref, dim=1) / torch.linalg.vector_norm(ref, dim=1)).max())
        out[name] = {
            "seconds_per_query": sec / len(ty),
            "products_per_query": None if prods is None else prods / len(ty),
            "max_error": err,
        }
    dvl = out["pyDVL CgInfluence (block)"]["seconds_per_query"]
    for row in out.values():
        row["speedup_vs_pydvl"] = dvl / row["seconds_per_query"]
    print(
        table(
            ["method", "s/query", "products/query", "max err", "× pyDVL"],
            [
                [n, r["seconds_per_query"], r["products_per_query"], r["max_error"], r["speedup_vs_pydvl"]]
                for n, r in out.items()
            ],
        )
    )
    return out


def resnet_setup(args: argparse.Namespace) -> dict[str, Any]:
    """First and second ``query_vectors`` calls of a ResNet-18, in gradients of its 64-image loss."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    xt, yt = torch.randn(1, 3, 32, 32), torch.randint(0, 10, (1,))
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        torch.autograd.grad(loss, params)

    gradient()
    grad_s = statistics.median(_timed(gradient) for _ in range(3))
    inf = Influence(
        model,
        solver=CG(tol=0, max_iter=10, on_negative_curvature="warn"),  # an untrained net: a row may stop early
        damping=10.0,
        hessian_samples=64,
        batch_size=64,
        gauss_newton=False,
    ).fit((x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)
        first = _timed(lambda: inf.query_vectors((xt, yt)))
        products = inf.diagnostics["solve"]["num_products"]
        second = _timed(lambda: inf.query_vectors((xt, yt)))
    v = torch.randn(1, inf.operator.size)
    product_s = statistics.median(_timed(lambda: inf.operator.matmat(v)) for _ in range(5))
    inf.release()
    released = not inf.operator.objective.keeps_graphs(inf.operator.block)
    res = {
        "gradient_seconds": grad_s,
        "product_gradients": product_s / grad_s,
        "first_call_gradients": first / grad_s,
        "second_call_gradients": second / grad_s,
        "products_per_call": products,
        "first_call_setup_gradients": (first - products * product_s) / grad_s,
        "second_call_setup_gradients": (second - products * product_s) / grad_s,
        "graphs_released": released,
    }
    print(table(list(res), [list(res.values())], "ResNet-18, 64 images 32×32 (in gradients of the 64-image loss)"))
    return res


def _timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--settings", default="digits:fixed,digits:updated", help="data:mode entries")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--chunk", type=int, default=10)
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--deflate", default="64,256", help="deflation subspace sizes")
    ap.add_argument("--rank", type=int, default=64, help="LowRank's rank")
    ap.add_argument("--cache-dir", default="~/.cache/lissa_influence")
    ap.add_argument("--pydvl", action="store_true")
    ap.add_argument("--resnet", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.deflate = [int(d) for d in args.deflate.split(",") if d.strip()]
    env = setup_threads(args.threads)
    t_start = time.perf_counter()
    res: dict[str, Any] = {"env": env, "args": {k: v for k, v in vars(args).items()}, "settings": []}
    for entry in [e for e in args.settings.split(",") if e.strip()]:
        data_name, mode = entry.split(":")
        res["settings"].append(multistage(args, data_name, mode))
    for key, wanted, part in (("pydvl", args.pydvl, pydvl_side_by_side), ("resnet18", args.resnet, resnet_setup)):
        if wanted:
            try:  # one part failing keeps the others' numbers
                res[key] = part(args)
            except Exception as e:  # noqa: BLE001
                res[key] = {"failed": f"{type(e).__name__}: {e}"}
                print(f"{key} failed: {res[key]['failed']}")
    for s in res["settings"]:
        print(f"\n{s['data']} {s['mode']}")
        print(
            markdown(
                ["method", "products / query", "after the first chunk", "first chunk", "s / query", "max error"],
                [
                    [
                        r["method"],
                        r["products_per_query"],
                        r["products_per_query_after_first"],
                        r["first_chunk_per_query"],
                        r["seconds_per_query"],
                        r["max_error"],
                    ]
                    for r in s["rows"]
                ],
            )
        )

    res["total_seconds"] = time.perf_counter() - t_start

    def draw():
        from _common import pyplot, save_figure

        plt = pyplot()
        fig, axes = plt.subplots(1, len(res["settings"]), figsize=(5 * len(res["settings"]), 3.6), squeeze=False)
        for ax, s in zip(axes[0], res["settings"], strict=True):
            for r in s["rows"]:
                cum, total = [0], 0
                for p in r["products_by_chunk"]:
                    total += p
                    cum.append(total)
                ax.plot([i * args.chunk for i in range(len(cum))], cum, marker=".", label=r["method"])
            ax.set(title=f"{s['data']}, embedding {s['mode']}", xlabel="queries scored", ylabel="cumulative products")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        return save_figure(fig, args.out, "queries.png")

    finish(res, args.out, "queries.json", draw)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
