"""Cost of scoring pretraining examples, and where the time of MultiStageInfluence goes.

Part 1 (scoring): on the digits pretraining set (576 examples) with the digits CNN,
the time of ``scoring.score_dataset`` (``PerExample.directional``) for ``k`` query
vectors ``S [k, P]``, with method ``"jvp"`` (forward-mode, ``vmap`` over the queries)
and ``"grad"`` (per-example gradients times ``S``), divided by the time of one plain
forward pass (``torch.no_grad``) of the model over the same examples in the same
batches. The issue's target: scoring for one query ≤ 3 forward passes. A sweep over k
finds where ``"grad"`` overtakes ``"jvp"`` (the library switches at
``jvp_max_queries``, default 8). ``--mnist`` repeats part 1 on the MNIST-architecture
CNN (56k parameters) with synthetic 28x28 inputs.

Part 2 (influence): ``MultiStageInfluence`` on digits models trained by
``training.train_two_stage`` (embedding fixed and updated; CG tol 1e-6, float32,
1000 Hessian samples): ``.diagnostics["time"]`` split into test gradients, finetune
solve, mixed product, pretrain solve and scoring, with the solver iterations.

    python benchmarks/bench_scoring.py --out docs/figures
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import tempfile
import time
import warnings

import torch
from torch.utils.data import TensorDataset

from lissa_influence import CG, MultiStageInfluence
from lissa_influence.batching import Batch, iter_batches
from lissa_influence.curvature import CurvatureOperator, Objective, cross_entropy
from lissa_influence.experiments.data import DataConfig, load_two_stage
from lissa_influence.experiments.models import ModelConfig, build_model
from lissa_influence.experiments.training import TrainConfig, train_two_stage
from lissa_influence.params import make_block, named_params
from lissa_influence.scoring import PerExample, loss_gradients, score_dataset

from _common import finish, interleaved, markdown, pyplot, save_figure, setup_threads, table
from bench_curvature import RetainedGraphHVP

CPU = torch.device("cpu")


# --- part 1 -------------------------------------------------------------------------------------
def forward_pass(model, data, batch_size):
    def run():
        with torch.no_grad():
            for b in iter_batches(data, batch_size, torch.float32, CPU):
                model(b.x)

    return run


def scorer(per_example, data, S, batch_size, method):
    return lambda: score_dataset(per_example, data, S, batch_size, method)


def bench_scoring(label, model, data, batch_size, ks, sweep, repeats, jvp_max_k=None) -> dict:
    model.eval()
    params = named_params(model)
    block = make_block(params, lambda n: True)
    pe = PerExample(model, cross_entropy, params, block)
    gen = torch.Generator().manual_seed(0)
    fwd = forward_pass(model, data, batch_size)
    results = {}
    for k in sorted(set(ks) | set(sweep)):
        S = torch.randn(k, block.numel, generator=gen)
        fns = {"forward": fwd, "grad": scorer(pe, data, S, batch_size, "grad")}
        if jvp_max_k is None or k <= jvp_max_k:
            fns["jvp"] = scorer(pe, data, S, batch_size, "jvp")
        t = interleaved(fns, repeats)
        med = {n: r["median"] for n, r in t.items()}
        # paired ratios: within each round, then the median (robust to load drifting between rounds)
        ratio = {
            n: statistics.median(a / f for a, f in zip(t[n]["all"], t["forward"]["all"], strict=True))
            for n in t
            if n != "forward"
        }
        results[k] = {"seconds": med, "ratio_to_forward": ratio}
        print(
            f"  {label} k={k}: forward {med['forward'] * 1e3:.1f}ms  "
            + "  ".join(f"{n} {med[n] * 1e3:.1f}ms ({ratio[n]:.1f}x)" for n in ("jvp", "grad") if n in med),
            flush=True,
        )
    # cross-over: first k of the sweep where grad is faster than jvp; and a linear fit t = a + b k
    both = [k for k in sorted(results) if "jvp" in results[k]["seconds"]]
    first = next((k for k in both if results[k]["seconds"]["grad"] < results[k]["seconds"]["jvp"]), None)
    fit = {}
    for n in ("jvp", "grad"):
        pts = [(k, results[k]["seconds"][n]) for k in both]
        if len(pts) >= 2:
            mk = sum(k for k, _ in pts) / len(pts)
            mt = sum(t for _, t in pts) / len(pts)
            b = sum((k - mk) * (t - mt) for k, t in pts) / max(sum((k - mk) ** 2 for k, _ in pts), 1e-12)
            fit[n] = (mt - b * mk, b)
    k_star = None
    if len(fit) == 2 and fit["jvp"][1] > fit["grad"][1]:
        k_star = (fit["grad"][0] - fit["jvp"][0]) / (fit["jvp"][1] - fit["grad"][1])
    return {
        "label": label,
        "examples": len(data),
        "parameters": block.numel,
        "batch_size": batch_size,
        "by_k": results,
        "first_k_grad_faster": first,
        "linear_fit_seconds": fit,
        "crossover_k_fit": k_star,
    }


# --- part 2 -------------------------------------------------------------------------------------
def bench_influence(args, data) -> dict:
    cache = args.cache_dir or tempfile.mkdtemp(prefix="bench_scoring_")
    tc = TrainConfig(steps=args.train_steps, lr=args.lr, seed=args.seed, polish_iters=args.polish_iters)
    out = {
        "train": {"steps": args.train_steps, "lr": args.lr, "polish_iters": args.polish_iters, "cache_dir": cache},
        "runs": [],
    }
    test = data.finetune_test
    n_each = min(args.queries, len(test))
    test_k = TensorDataset(*(t[:n_each] for t in test.tensors))
    for mode in args.modes.split(","):
        t0 = time.perf_counter()
        pre, ft, info = train_two_stage(
            data, ModelConfig(arch="digits", seed=args.seed), tc, tc, mode, args.alpha, cache
        )
        train_s = time.perf_counter() - t0
        print(
            f"  trained ({mode}) in {train_s:.1f}s: pretrain loss {info.pretrain_report.loss:.3g}, "
            f"finetune loss {info.finetune_report.loss:.3g}",
            flush=True,
        )
        for queries, label, mean in (
            (test, "mean test loss (1 query)", True),
            (test_k, f"{n_each} test points", False),
        ):
            msi = MultiStageInfluence(
                pre,
                ft,
                mode=mode,
                alpha=args.alpha,
                dtype=torch.float32,
                hessian_samples=args.hessian_samples,
                solver=CG(tol=args.cg_tol, max_iter=args.cg_max_iter, on_negative_curvature="warn"),
            )
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                t0 = time.perf_counter()
                msi.fit(data.pretrain_train, data.finetune_train)
                fit_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                error = None
                try:
                    scores = msi.scores(queries, mean=mean)
                    k = scores.shape[0]
                except Exception as e:  # report, keep going
                    error, k = f"{type(e).__name__}: {e}", None
                total = time.perf_counter() - t0
            d = msi.diagnostics
            run = {
                "mode": mode,
                "queries": label,
                "k": k,
                "fit_seconds": fit_s,
                "total_seconds": total,
                "error": error,
                "time": d.get("time", {}),
                "train_seconds": train_s,
                "pretrain_hessian_samples": len(msi.pre_objective.batch),
                "finetune_hessian_samples": len(msi.ft_objective.batch),
                "parameters": {"W": msi.W.numel, "U": msi.U.numel, "Theta": msi.Theta.numel},
                "warnings": sorted({str(w.message)[:160] for w in caught}),
            }
            for stage in ("finetune", "pretrain"):
                if stage in d:
                    run[stage] = {
                        k2: d[stage].get(k2)
                        for k2 in (
                            "iterations",
                            "num_products",
                            "converged",
                            "final_residual",
                            "negative_curvature_rows",
                        )
                    }
            out["runs"].append(run)
            tm = run["time"]
            print(
                f"  {mode:7s} {label}: total {total:.2f}s "
                + " ".join(f"{a}={b:.2f}s" for a, b in tm.items())
                + (f" ERROR {error}" if error else ""),
                flush=True,
            )
        if mode == "fixed":
            out["head_only_products"] = head_only_products(args, msi, ft, test)
    return out


def head_only_products(args, msi, ft, data_test) -> dict:
    """With the embedding fixed, a finetune product needs only the head: compare the
    library's finetune operator (whole network, Θ block) with the same product of the head
    alone on embedding features computed once."""
    op = msi.ft_operator
    batch = msi.ft_objective.batch
    with torch.no_grad():
        feats = torch.cat([ft.embedding(c.x) for c in batch.chunks(1024)])
    head = ft.head
    hp = named_params(head)
    hobj = Objective(head, cross_entropy, hp, Batch(feats, batch.y), msi.batch_size)
    hop = CurvatureOperator(hobj, make_block(hp, lambda n: True), op.damping)
    v = torch.randn(op.size, generator=torch.Generator().manual_seed(0))
    diff = float((hop(v) - op(v)).norm() / op(v).norm())
    t = interleaved({"network": lambda: op(v), "head": lambda: hop(v)}, args.repeats)
    res = {
        "network_ms": t["network"]["median"] * 1e3,
        "head_ms": t["head"]["median"] * 1e3,
        "speedup": t["network"]["median"] / t["head"]["median"],
        "relative_difference": diff,
    }
    print(
        f"  finetune product (fixed): whole network {res['network_ms']:.2f}ms, head on cached features "
        f"{res['head_ms']:.2f}ms ({res['speedup']:.1f}x), rel. difference {diff:.1e}",
        flush=True,
    )
    # The finetune solve itself with head-only retained-graph products (not library code), float32 and float64.
    g = loss_gradients(PerExample(ft, cross_entropy, msi.ft_params, msi.W + msi.Theta), data_test, msi.batch_size, True)
    b = g[:, msi.W.numel :]
    res["solves"] = []
    for dtype, max_iter in ((torch.float32, 1000), (torch.float64, 2000)):
        hd = {n: p.to(dtype) for n, p in hp.items()}
        obj = Objective(copy.deepcopy(head).to(dtype), cross_entropy, hd, Batch(feats.to(dtype), batch.y), len(batch))
        t0 = time.perf_counter()
        operator = RetainedGraphHVP(obj, make_block(hd, lambda n: True), float(op.damping))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, info = CG(tol=args.cg_tol, max_iter=max_iter).solve(operator, b.to(dtype))
        run = {
            "dtype": str(dtype).replace("torch.", ""),
            "max_iter": max_iter,
            "seconds": time.perf_counter() - t0,
            "iterations": info.iterations,
            "converged": info.converged,
            "final_residual": info.residuals[-1],
            "ms_per_product": (time.perf_counter() - t0) / max(info.num_products, 1) * 1e3,
        }
        res["solves"].append(run)
        print(
            f"  finetune solve, head only + retained graph, {run['dtype']}: {run['seconds']:.2f}s, {info.iterations} "
            "its, "
            f"residual {run['final_residual']:.1e}, converged {info.converged}",
            flush=True,
        )
    return res


# --- report -------------------------------------------------------------------------------------
def scoring_rows(sc, ks):
    rows = []
    for k in ks:
        r = sc["by_k"].get(k)
        if r is None:
            continue
        s, ra = r["seconds"], r["ratio_to_forward"]
        rows.append(
            [
                k,
                s["forward"] * 1e3,
                s.get("jvp", math.nan) * 1e3 if "jvp" in s else None,
                ra.get("jvp"),
                (ra["jvp"] / k) if "jvp" in ra else None,
                s["grad"] * 1e3,
                ra["grad"],
                ra["grad"] / k,
            ]
        )
    return ["k", "forward ms", "jvp ms", "jvp / fwd", "jvp / (k fwd)", "grad ms", "grad / fwd", "grad / (k fwd)"], rows


def report(args, res) -> str:
    out, tables = [], {}
    for key in ("digits", "mnist"):
        sc = res.get(f"scoring_{key}")
        if not sc:
            continue
        h, rows = scoring_rows(sc, sorted(sc["by_k"]))
        tables[f"scoring_{key}"] = (h, rows)
        out.append(
            table(
                h,
                rows,
                f"\nScoring {sc['examples']} examples ({sc['label']}, {sc['parameters']} parameters, "
                f"batch {sc['batch_size']}, threads={res['env']['threads']})",
            )
        )
        ks = sc["crossover_k_fit"]
        out.append(
            f"grad faster than jvp from k = {sc['first_k_grad_faster']} (sweep); linear-fit cross-over k* = "
            + (f"{ks:.2f}" if ks is not None else "-")
        )
    inf = res.get("influence")
    if inf:
        h = [
            "mode",
            "queries",
            "total s",
            "test grads s",
            "finetune solve s",
            "mixed product s",
            "pretrain solve s",
            "scoring s",
            "ft CG its",
            "pre CG its",
            "ft conv.",
            "pre conv.",
        ]
        rows = []
        for r in inf["runs"]:
            t = r["time"]
            rows.append(
                [
                    r["mode"],
                    r["queries"],
                    r["total_seconds"],
                    t.get("test_gradients"),
                    t.get("finetune_solve"),
                    t.get("mixed_product"),
                    t.get("pretrain_solve"),
                    t.get("scoring"),
                    r.get("finetune", {}).get("iterations"),
                    r.get("pretrain", {}).get("iterations"),
                    r.get("finetune", {}).get("converged"),
                    r.get("pretrain", {}).get("converged"),
                ]
            )
        tables["influence"] = (h, rows)
        out.append(
            table(
                h,
                rows,
                f"\nMultiStageInfluence on digits (CG tol {args.cg_tol:g}, max_iter {args.cg_max_iter}, float32, "
                f"hessian_samples {args.hessian_samples})",
            )
        )
        ho = inf.get("head_only_products")
        if ho:
            out.append(
                f"finetune product with the embedding fixed: whole network {ho['network_ms']:.2f} ms, head alone on "
                "cached "
                f"features {ho['head_ms']:.2f} ms ({ho['speedup']:.1f}x)"
            )
            for r in ho.get("solves", []):
                out.append(
                    f"finetune solve (fixed), head only + retained graph (proposed), {r['dtype']}: "
                    f"{r['seconds']:.2f} s, "
                    f"{r['iterations']} iterations ({r['ms_per_product']:.2f} ms/product), residual "
                    f"{r['final_residual']:.1e}, "
                    f"converged {r['converged']}"
                )
    res["_tables"] = tables
    return "\n".join(out)


def plots(args, res) -> list[str]:
    plt = pyplot()
    outdir = args.out
    written = []
    keys = [k for k in ("digits", "mnist") if res.get(f"scoring_{k}")]
    if keys:
        fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
        for ax, key in zip(axes[0], keys, strict=True):
            sc = res[f"scoring_{key}"]
            for n, mk in (("jvp", "o-"), ("grad", "s-")):
                pts = [
                    (k, r["ratio_to_forward"][n]) for k, r in sorted(sc["by_k"].items()) if n in r["ratio_to_forward"]
                ]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], mk, label=f'"{n}"')
            ax.axhline(3, color="gray", ls=":", label="target 3 (one query)")
            if sc["crossover_k_fit"]:
                ax.axvline(
                    sc["crossover_k_fit"],
                    color="red",
                    ls="--",
                    lw=0.8,
                    label=f"cross-over k*={sc['crossover_k_fit']:.1f}",
                )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("queries k")
            ax.set_ylabel("scoring time / forward time")
            ax.set_title(f"{sc['label']}: {sc['examples']} examples, {sc['parameters']} params", fontsize=9)
            ax.legend(fontsize=7)
        written.append(save_figure(fig, outdir, "scoring_vs_queries.png"))
    inf = res.get("influence")
    if inf and inf["runs"]:
        parts = ["test_gradients", "finetune_solve", "mixed_product", "pretrain_solve", "scoring"]
        runs = inf["runs"]
        fig, ax = plt.subplots(figsize=(8, 3.5))
        left = [0.0] * len(runs)
        for part in parts:
            vals = [r["time"].get(part, 0.0) for r in runs]
            ax.barh(range(len(runs)), vals, left=left, label=part)
            left = [a + b for a, b in zip(left, vals, strict=True)]
        ax.set_yticks(range(len(runs)))
        ax.set_yticklabels([f"{r['mode']}, {r['queries']}" for r in runs], fontsize=8)
        ax.set_xlabel("seconds")
        ax.set_title("MultiStageInfluence time split (digits, CG, float32)", fontsize=9)
        ax.legend(fontsize=7)
        written.append(save_figure(fig, outdir, "influence_time_split.png"))
    return written


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (keep <= free cores)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=256, help="scoring batch size (= forward batch size)")
    ap.add_argument("--ks", default="1,10,100", help="numbers of queries for the main table")
    ap.add_argument("--sweep", default="2,3,4,6,8,16,32", help="extra k for the jvp/grad cross-over")
    ap.add_argument(
        "--mnist", action="store_true", help="also score synthetic 28x28 inputs with the MNIST CNN (slower)"
    )
    ap.add_argument("--mnist-examples", type=int, default=2000)
    ap.add_argument("--mnist-ks", default="1,10,100")
    ap.add_argument("--mnist-sweep", default="2,4")
    ap.add_argument(
        "--mnist-jvp-max-k", type=int, default=10, help="skip jvp above this k on MNIST (memory: k x activations)"
    )
    ap.add_argument("--mnist-repeats", type=int, default=2)
    ap.add_argument("--skip-influence", action="store_true")
    ap.add_argument("--modes", default="fixed,updated")
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--cg-tol", type=float, default=1e-6)
    ap.add_argument("--cg-max-iter", type=int, default=200, help="the library's default")
    ap.add_argument("--hessian-samples", type=int, default=1000)
    ap.add_argument(
        "--queries", type=int, default=10, help="test points scored individually in the second influence run"
    )
    ap.add_argument("--train-steps", type=int, default=200, help="full-batch Adam steps per stage")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument(
        "--polish-iters", type=int, default=0, help="L-BFGS polish (the digits preset uses 1500 steps + 300)"
    )
    ap.add_argument("--cache-dir", default=None, help="train_two_stage cache (default: a fresh temporary directory)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="directory for scoring.json and PNG plots")
    args = ap.parse_args(argv)

    env = setup_threads(args.threads)
    t_start = time.perf_counter()
    print(f"threads={env['threads']} (cpu_count={env['cpu_count']}, load={env['load_average']}), torch {env['torch']}")
    res: dict = {"env": env, "config": vars(args)}
    data = load_two_stage(DataConfig(name="digits", seed=args.seed))
    ks = [int(k) for k in args.ks.split(",") if k]
    sweep = [int(k) for k in args.sweep.split(",") if k]

    # the scored model: the pretrained digits CNN of part 2 (trained here, cached)
    tmp = None
    if args.cache_dir is None:  # a fresh cache, removed at the end
        tmp = tempfile.TemporaryDirectory(prefix="bench_scoring_")
        args.cache_dir = tmp.name
    cache = args.cache_dir
    tc = TrainConfig(steps=args.train_steps, lr=args.lr, seed=args.seed, polish_iters=args.polish_iters)
    pre, _, _ = train_two_stage(data, ModelConfig(arch="digits", seed=args.seed), tc, tc, "fixed", args.alpha, cache)
    print("Scoring (digits):")
    res["scoring_digits"] = bench_scoring(
        "digits CNN", pre, data.pretrain_train, args.batch_size, ks, sweep, args.repeats
    )
    if args.mnist:
        g = torch.Generator().manual_seed(args.seed)
        n = args.mnist_examples
        ds = TensorDataset(torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 4, (n,), generator=g))
        print("Scoring (MNIST CNN, synthetic inputs):")
        res["scoring_mnist"] = bench_scoring(
            "MNIST CNN, synthetic",
            build_model("mnist", 4, args.seed),
            ds,
            args.batch_size,
            [int(k) for k in args.mnist_ks.split(",") if k],
            [int(k) for k in args.mnist_sweep.split(",") if k],
            args.mnist_repeats,
            args.mnist_jvp_max_k,
        )
    if not args.skip_influence:
        print("MultiStageInfluence:")
        res["influence"] = bench_influence(args, data)
    res["total_seconds"] = time.perf_counter() - t_start
    if tmp is not None:
        tmp.cleanup()
    text = report(args, res)
    print(text)
    tables = res.pop("_tables")
    res["markdown"] = {k: markdown(*v) for k, v in tables.items()}
    return finish(res, args.out, "scoring.json", lambda: plots(args, res))


if __name__ == "__main__":
    main()
