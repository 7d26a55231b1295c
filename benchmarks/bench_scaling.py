"""How the cost of MultiStageInfluence grows with N, the Hessian sample and the parameters.

``MultiStageInfluence(mode="fixed", scoring="jvp", batch_size=256)`` with
``.fit(pretrain, finetune)`` then ``.scores(test, mean=True)`` (one query), timed per
stage from ``diagnostics["time"]``, along three axes:

- N, the number of pretraining examples scored (Hessian sample 1000, width 1);
- ``hessian_samples`` of both stages (N = 4000, width 1);
- the number of parameters: MNIST-shaped CNNs with the channel widths of Table A's MNIST
  CNN scaled by 0.5 / 1 / 2 (about 15k / 56k / 215k parameters). Width 1 is
  ``build_model("mnist", 4, seed)``; the other widths are benchmark-only models built here.

The finetuned model is the pretrained embedding plus a new 6-class head
(``finetune_model_from``), so W is identical (fixed mode). Models are untrained and the
inputs synthetic (28x28 uniform pixels, random labels): only the cost is measured. The
pretraining set is lazy, each example generated from its index on access, so memory does
not hold the data; the bytes it would take materialised are reported separately.

The work per solve is fixed: ``CG(tol=0, max_iter=5)`` on the Gauss-Newton matrix (PSD,
so no negative-curvature stop) with damping 1e-2 in both stages. A solve's cost is
(iterations) x (one product over the Hessian sample); real runs need tens to hundreds of
iterations, which multiplies the solve columns and leaves scoring unchanged.

Every configuration runs in a fresh subprocess so that its peak RSS (``ru_maxrss``) is its
own; the baseline is the RSS after imports, model construction and a tiny warm-up run
(the first ``torch.func`` calls of a process cost seconds of one-off setup).

    python benchmarks/bench_scaling.py --threads 1 --out docs/figures
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from lissa_influence import CG, MultiStageInfluence, SolverWarning
from lissa_influence.batching import iter_batches
from lissa_influence.experiments.models import TwoStageNet, build_model, count_params, finetune_model_from

from _common import finish, markdown, pyplot, save_figure, setup_threads, table

STAGES = ["test_gradients", "finetune_solve", "mixed_product", "pretrain_solve", "scoring"]
SHAPE = (1, 28, 28)
PRE_CLASSES, FT_CLASSES = 4, 6


class LazySynthetic(Dataset):
    """Example i = (uniform 28x28 image, random label) drawn from a generator seeded with
    (seed, i): deterministic, random access, and nothing stored."""

    def __init__(self, n: int, classes: int, seed: int):
        self.n, self.classes, self.seed = n, classes, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        return torch.rand(SHAPE, generator=g), torch.randint(self.classes, (), generator=g)

    def materialised_bytes(self) -> int:
        return self.n * (4 * 28 * 28 + 8)  # float32 image + int64 label


def _seeded(seed: int, make):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def build_models(width: float, seed: int) -> tuple[TwoStageNet, TwoStageNet]:
    """(pretrained, finetuned) sharing the embedding; width 1 is the library's MNIST CNN."""
    if width == 1:
        pre = build_model("mnist", PRE_CLASSES, seed, "float32")
        return pre, finetune_model_from(pre, FT_CLASSES, seed + 1)
    c1, c2 = max(1, round(32 * width)), max(1, round(64 * width))
    emb = _seeded(
        seed,
        lambda: nn.Sequential(
            nn.Conv2d(1, c1, 5),
            nn.Tanh(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(c1, c2, 5),
            nn.Tanh(),
            nn.MaxPool2d(2, 2),
            nn.Flatten(),
        ),
    )
    head = lambda k: nn.Sequential(nn.Linear(16 * c2, k))  # noqa: E731
    arch = f"mnist_width{width:g}"
    pre = TwoStageNet(emb, _seeded(seed, lambda: head(PRE_CLASSES)), arch, SHAPE)
    ft = TwoStageNet(copy.deepcopy(emb), _seeded(seed + 1, lambda: head(FT_CLASSES)), arch, SHAPE)
    return pre, ft


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


# --- worker: one configuration in its own process -------------------------------------------
def worker(cfg: dict) -> None:
    setup_threads(cfg["threads"])
    warnings.simplefilter("ignore", SolverWarning)  # tol=0: "not converged" is the point
    pre, ft = build_models(cfg["width"], cfg["seed"])
    pretrain = LazySynthetic(cfg["n"], PRE_CLASSES, cfg["seed"] + 10)
    finetune = LazySynthetic(cfg["finetune_size"], FT_CLASSES, cfg["seed"] + 20)
    test = LazySynthetic(cfg["test_size"], FT_CLASSES, cfg["seed"] + 30)

    def make(hessian_samples: int, max_iter: int) -> MultiStageInfluence:
        solver = CG(tol=0.0, max_iter=max_iter, on_not_converged="warn")
        return MultiStageInfluence(
            pre,
            ft,
            mode="fixed",
            solver=solver,
            gauss_newton=True,
            pretrain_damping=1e-2,
            finetune_damping=1e-2,
            hessian_samples=hessian_samples,
            batch_size=256,
            scoring="jvp",
        )

    # A tiny run first: the first torch.func calls of a process pay seconds of one-off setup
    # that would otherwise land in whichever stage runs first (test gradients).
    t0 = time.perf_counter()
    make(16, 1).fit(LazySynthetic(16, PRE_CLASSES, 99), LazySynthetic(16, FT_CLASSES, 98)).scores(
        LazySynthetic(4, FT_CLASSES, 97), mean=True
    )
    t_warmup = time.perf_counter() - t0
    baseline = _rss_kib()
    msi = make(cfg["hessian_samples"], cfg["max_iter"])
    t0 = time.perf_counter()
    msi.fit(pretrain, finetune)
    t_fit = time.perf_counter() - t0
    scores = msi.scores(test, mean=True)
    total = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    t1 = time.perf_counter()  # generating the lazy examples alone (part of "scoring")
    for _ in iter_batches(pretrain, 256, torch.float32, torch.device("cpu")):
        pass
    out = {
        **cfg,
        "params": count_params(pre),
        "theta_params": msi.Theta.numel,
        "warmup": t_warmup,
        "fit": t_fit,
        "total": total,
        **{k: msi.diagnostics["time"][k] for k in STAGES},
        "data_generation": time.perf_counter() - t1,
        "products": {s: msi.diagnostics[s]["num_products"] for s in ("finetune", "pretrain")},
        "scores_shape": list(scores.shape),
        "baseline_rss_mib": baseline / 1024,
        "peak_rss_mib": peak / 1024,
        "peak_minus_baseline_mib": (peak - baseline) / 1024,
        "data_mib": pretrain.materialised_bytes() / 2**20,
    }
    print("RESULT " + json.dumps(out), flush=True)


def run_once(cfg: dict) -> dict:
    p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        raise RuntimeError(f"worker {cfg} failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def aggregate(runs: list[dict]) -> dict:
    """Medians over the repeats of every timed number and of the memory; the raw runs kept."""
    res = dict(runs[0])
    for k in [
        "warmup",
        "fit",
        "total",
        "data_generation",
        *STAGES,
        "baseline_rss_mib",
        "peak_rss_mib",
        "peak_minus_baseline_mib",
    ]:
        res[k] = statistics.median(r[k] for r in runs)
    res["repeats"] = {k: [r[k] for r in runs] for k in ["total", "scoring", "pretrain_solve", "peak_rss_mib"]}
    return res


# --- report ------------------------------------------------------------------------------------
def slope(xs, ys) -> float:
    """Least-squares slope of log y against log x."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


HEADERS = [
    "N",
    "hess. samples",
    "width",
    "params",
    "fit s",
    "test grad s",
    "ft solve s",
    "mixed s",
    "pre solve s",
    "scoring s",
    "total s",
    "us/example scored",
    "peak MiB",
    "peak-base MiB",
    "data MiB",
]


def row(r: dict) -> list:
    return [
        r["n"],
        r["hessian_samples"],
        r["width"],
        r["params"],
        r["fit"],
        *[r[k] for k in STAGES],
        r["total"],
        r["scoring"] / r["n"] * 1e6,
        r["peak_rss_mib"],
        r["peak_minus_baseline_mib"],
        r["data_mib"],
    ]


def plots(args, axes: dict, fits: dict) -> str:
    plt = pyplot()
    fig, ((a1, a2), (a3, a4)) = plt.subplots(2, 2, figsize=(11, 8))
    rn = axes["n"]
    ns = [r["n"] for r in rn]
    for key, lab, m in [("total", "total", "o-"), ("scoring", "scoring", "s-")]:
        a1.loglog(ns, [r[key] for r in rn], m, label=f"{lab} (slope {slope(ns, [r[key] for r in rn]):.2f})")
    ref = rn[0]["scoring"]
    a1.loglog(ns, [ref * n / ns[0] for n in ns], "k:", label="slope 1")
    a1.set(
        xlabel="pretraining examples scored N", ylabel="seconds", title=f"vs N (hessian samples {args.base_hessian})"
    )
    rh = axes["hessian_samples"]
    hs = [r["hessian_samples"] for r in rh]
    for key, m in [("total", "o-"), ("pretrain_solve", "s-"), ("finetune_solve", "^-"), ("scoring", "v-")]:
        ys = [r[key] for r in rh]
        a2.loglog(hs, ys, m, label=f"{key} (slope {slope(hs, ys):.2f})")
    a2.loglog(hs, [rh[0]["pretrain_solve"] * h / hs[0] for h in hs], "k:", label="slope 1")
    a2.set(xlabel="hessian_samples (both stages)", ylabel="seconds", title=f"vs Hessian sample (N={args.base_n})")
    rp = axes["width"]
    ps = [r["params"] for r in rp]
    for key, m in [("total", "o-"), ("pretrain_solve", "s-"), ("scoring", "v-")]:
        ys = [r[key] for r in rp]
        a3.loglog(ps, ys, m, label=f"{key} (slope {slope(ps, ys):.2f})")
    for r in rp:
        a3.annotate(f"width {r['width']:g}", (r["params"], r["total"]), fontsize=7)
    a3.xaxis.set_minor_formatter(plt.NullFormatter())  # minor labels overlap on a 15k..215k axis
    a3.set(xlabel="parameters (pretrained model)", ylabel="seconds", title=f"vs parameters (N={args.base_n})")
    a4.plot(ns, [r["peak_rss_mib"] for r in rn], "o-", label="peak RSS")
    a4.plot(ns, [r["peak_minus_baseline_mib"] for r in rn], "s-", label="peak - baseline")
    a4.plot(ns, [r["data_mib"] for r in rn], "k:", label="pretraining data if materialised")
    a4.set_xscale("log")
    a4.set_ylim(bottom=0)
    a4.set(xlabel="pretraining examples scored N", ylabel="MiB", title="memory vs N (lazy data)")
    for a in (a1, a2, a3, a4):
        a.legend(fontsize=7)
        a.grid(True, which="both", alpha=0.3)
    fig.suptitle(
        f"MultiStageInfluence cost, MNIST-shaped CNN, CG {args.max_iter} iterations (GGN), {args.threads} thread(s)"
    )
    return save_figure(fig, args.out, "scaling_loglog.png")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (keep <= free cores)")
    ap.add_argument("--ns", default="1000,4000,16000", help="N axis (pretraining examples scored)")
    ap.add_argument("--hessian", default="250,500,1000,2000", help="hessian_samples axis (both stages)")
    ap.add_argument("--widths", default="0.5,1,2", help="channel-width multipliers (parameter axis)")
    ap.add_argument("--base-n", type=int, default=4000, help="N on the other axes")
    ap.add_argument("--base-hessian", type=int, default=1000, help="hessian_samples on the other axes")
    ap.add_argument("--max-iter", type=int, default=5, help="CG iterations per solve (tol=0: always all of them)")
    ap.add_argument(
        "--finetune-size", type=int, default=2000, help="finetuning examples (>= the largest hessian_samples)"
    )
    ap.add_argument("--test-size", type=int, default=100, help="test examples (their mean loss is the one query)")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per configuration, round-robin (median)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument("--out", default=None, help="directory for scaling.json and scaling_loglog.png")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    if args.quick:
        args.ns, args.hessian, args.widths, args.base_n, args.base_hessian = "200,400,800", "50,100", "0.5,1", 400, 100
        args.max_iter, args.finetune_size, args.test_size, args.repeats = 2, 200, 20, 1

    env = setup_threads(args.threads)
    t_start = time.perf_counter()
    print(f"threads={env['threads']} (cpu_count={env['cpu_count']}, load={env['load_average']}), torch {env['torch']}")
    grid = {
        "n": [(int(n), args.base_hessian, 1.0) for n in args.ns.split(",")],
        "hessian_samples": [(args.base_n, int(h), 1.0) for h in args.hessian.split(",")],
        "width": [(args.base_n, args.base_hessian, float(w)) for w in args.widths.split(",")],
    }
    keys = list(dict.fromkeys(k for ks in grid.values() for k in ks))  # a configuration on several axes runs once
    raw: dict[tuple, list[dict]] = {k: [] for k in keys}
    for rep in range(args.repeats):  # round-robin, so load drifting over the run hits every configuration alike
        for key in keys:
            cfg = {
                "n": key[0],
                "hessian_samples": key[1],
                "width": key[2],
                "threads": args.threads,
                "seed": args.seed,
                "max_iter": args.max_iter,
                "finetune_size": max(args.finetune_size, key[1]),
                "test_size": args.test_size,
            }
            r = run_once(cfg)
            raw[key].append(r)
            print(
                f"  [{rep + 1}/{args.repeats}] N={key[0]} hs={key[1]} width={key[2]:g}: {r['params']} params, total "
                f"{r['total']:.1f}s (scoring {r['scoring']:.1f}s), peak {r['peak_rss_mib']:.0f} MiB",
                flush=True,
            )
    done = {k: aggregate(v) for k, v in raw.items()}
    axes = {a: [done[k] for k in ks] for a, ks in grid.items()}
    fits = {
        "total_vs_n": slope([r["n"] for r in axes["n"]], [r["total"] for r in axes["n"]]),
        "scoring_vs_n": slope([r["n"] for r in axes["n"]], [r["scoring"] for r in axes["n"]]),
        "total_vs_hessian": slope(
            [r["hessian_samples"] for r in axes["hessian_samples"]], [r["total"] for r in axes["hessian_samples"]]
        ),
        "solves_vs_hessian": slope(
            [r["hessian_samples"] for r in axes["hessian_samples"]],
            [r["pretrain_solve"] + r["finetune_solve"] for r in axes["hessian_samples"]],
        ),
        "total_vs_params": slope([r["params"] for r in axes["width"]], [r["total"] for r in axes["width"]]),
        "pretrain_solve_vs_params": slope(
            [r["params"] for r in axes["width"]], [r["pretrain_solve"] for r in axes["width"]]
        ),
        "scoring_vs_params": slope([r["params"] for r in axes["width"]], [r["scoring"] for r in axes["width"]]),
    }
    per_n, fixed = np.polyfit([r["n"] for r in axes["n"]], [r["total"] for r in axes["n"]], 1)
    fits["total_vs_n_affine"] = {"intercept_s": float(fixed), "per_example_us": float(per_n) * 1e6}
    titles = {
        "n": f"vs N (hessian_samples {args.base_hessian}, width 1)",
        "hessian_samples": f"vs hessian_samples (N {args.base_n}, width 1)",
        "width": f"vs parameters (N {args.base_n}, hessian_samples {args.base_hessian})",
    }
    print(
        f"\nCG tol=0, max_iter={args.max_iter} per solve (GGN, damping 1e-2): solve cost = iterations x one product "
        f"over the Hessian sample, fixed here; test set {args.test_size}, one query (mean test loss); seconds; "
        f"'us/example scored' = scoring / N; memory = ru_maxrss of a fresh process per configuration; "
        f"medians of {args.repeats} round-robin repeats"
    )
    res: dict = {
        "env": {**env, "load_average_end": list(os.getloadavg())},
        "config": vars(args),
        "runs": list(done.values()),
        "axes": {a: [list(k) for k in ks] for a, ks in grid.items()},
        "slopes": fits,
        "markdown": {},
    }
    for a, rs in axes.items():
        rows = [row(r) for r in rs]
        print("\n" + table(HEADERS, rows, titles[a]))
        res["markdown"][a] = markdown(HEADERS, rows)
    print("\nlog-log slopes: " + ", ".join(f"{k} {v:.2f}" for k, v in fits.items() if isinstance(v, float)))
    print(f"affine fit over N: total = {fixed:.1f} s + {per_n * 1e6:.0f} us x N")
    res["total_seconds"] = time.perf_counter() - t_start
    return finish(res, args.out, "scaling.json", lambda: plots(args, axes, fits))


if __name__ == "__main__":
    main()
