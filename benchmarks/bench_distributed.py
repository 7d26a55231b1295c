"""Speed-up of scoring (and of one Hessian-vector product) on 2 ranks over 1, CPU/gloo.

Launches itself under ``torchrun --standalone --nproc_per_node=N`` for each N of
``--ranks`` (default 1,2); every worker builds the same ``MultiStageInfluence`` (an
untrained CNN of ``--arch`` on synthetic inputs, embedding fixed, GGN), and times with
``torch.distributed`` barriers around each repeat:

- ``scoring``: ``msi.scores_from(s)`` over ``--examples`` pretraining examples for
  ``--queries`` query vectors (each rank scores its share; the blocks are all-gathered);
- ``product``: one stacked GGN-vector product of the pretraining operator over the
  ``--hessian-samples`` Hessian sample (each rank its shard; all-reduced).

N = 1 runs the plain single-process code (no process group). Each rank uses
``--threads`` threads (default 1), so N ranks use N cores. On a shared 2-core machine
the numbers are noisy: other jobs take cores unpredictably, and 2 ranks need both
cores free to approach 2x. Compare the speed-up within one run, not across runs.

    python benchmarks/bench_distributed.py --out docs/figures
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import ROOT, setup_threads, table, write_json


def worker(args) -> None:
    from lissa_influence import CG, MultiStageInfluence, distributed
    from lissa_influence.experiments.models import build_model, finetune_model_from

    setup_threads(args.threads)
    distributed.init_from_env()
    shape = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar": (3, 32, 32)}[args.arch]
    g = torch.Generator().manual_seed(0)
    pre_x, pre_y = torch.randn(args.examples, *shape, generator=g), torch.randint(0, 4, (args.examples,), generator=g)
    ft_x, ft_y = torch.randn(200, *shape, generator=g), torch.randint(0, 2, (200,), generator=g)
    pre = build_model(args.arch, 4, seed=0)
    ft = finetune_model_from(pre, 2, seed=1)
    msi = MultiStageInfluence(
        pre,
        ft,
        solver=CG(max_iter=5),
        gauss_newton=True,
        hessian_samples=args.hessian_samples,
        batch_size=args.batch_size,
    ).fit((pre_x, pre_y), (ft_x, ft_y))
    s = torch.randn(args.queries, msi.pre_block.numel, generator=g)
    v = torch.randn(args.queries, msi.pre_block.numel, generator=g)

    def timed(fn) -> list[float]:
        fn()  # warm-up (first functorch calls are slow)
        out = []
        for _ in range(args.repeats):
            distributed.barrier()
            t0 = time.perf_counter()
            fn()
            distributed.barrier()
            out.append(time.perf_counter() - t0)
        return out

    res = {
        "world_size": distributed.world_size(),
        "scoring": timed(lambda: msi.scores_from(s)),
        "product": timed(lambda: msi.pre_operator(v)),
        "params": msi.pre_block.numel,
    }
    if distributed.is_main():
        Path(args.worker).write_text(json.dumps(res))


def launch(args, ranks: int, result: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={ranks}",
        __file__,
        "--worker",
        str(result),
        "--arch",
        args.arch,
        "--examples",
        str(args.examples),
        "--queries",
        str(args.queries),
        "--hessian-samples",
        str(args.hessian_samples),
        "--batch-size",
        str(args.batch_size),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{ranks} rank(s) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="1,2", help="comma-separated numbers of processes")
    ap.add_argument("--arch", default="mnist", choices=["digits", "mnist", "cifar"])
    ap.add_argument("--examples", type=int, default=1000, help="pretraining examples scored")
    ap.add_argument("--queries", type=int, default=4, help="query vectors k")
    ap.add_argument("--hessian-samples", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--out", default=None, help="write distributed.json into this folder")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return {}

    env_info = setup_threads(args.threads)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(r) for r in args.ranks.split(",") if r]:
            runs[n] = launch(args, n, Path(tmp) / f"ranks{n}.json")
    base = {k: statistics.median(runs[min(runs)][k]) for k in ("scoring", "product")}
    rows = []
    for n, r in runs.items():
        med = {k: statistics.median(r[k]) for k in ("scoring", "product")}
        rows.append(
            [n, med["scoring"], base["scoring"] / med["scoring"], med["product"], base["product"] / med["product"]]
        )
    print(
        table(
            ["ranks", "scoring s", "speed-up", "product s", "speed-up"],
            rows,
            title=f"{args.arch} CNN ({runs[min(runs)]['params']} params), {args.examples} examples x {args.queries} "
            f"queries, Hessian sample {args.hessian_samples}, {args.threads} thread(s) per rank, "
            f"median of {args.repeats}",
        )
    )
    print(
        f"load average {env_info['load_average']} on {env_info['cpu_count']} cores: on a shared machine the "
        "speed-up is noisy (other jobs compete for the cores); 2 ranks need 2 free cores to approach 2x."
    )
    payload = {
        "env": env_info,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "worker")},
        "runs": {str(n): r for n, r in runs.items()},
        "speedup": {str(n): {"scoring": row[2], "product": row[4]} for n, row in zip(runs, rows, strict=True)},
    }
    target = write_json(args.out, "distributed.json", payload)
    if target:
        print(f"wrote {target}")
    return payload


if __name__ == "__main__":
    main()
