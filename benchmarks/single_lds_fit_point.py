"""The fit point of the single-stage LDS: the LDS of influence taken after 1..50 epochs of training.

dattri's MLP recipe (50 epochs of SGD with momentum, no weight decay) drives the training
loss towards 0, where the influence of most examples vanishes and the Hessian is that of
a memorised set. This script measures, on the *calibration* subsets of
``experiment=mnist5k_single_lds`` (``calibration.seed`` = 1, never the evaluated ones), the
LDS of EK-FAC influence taken at the model after each number of epochs, one seed each;
``single_lds.fit_epochs`` of the presets is chosen from its output (docs/benchmarks.md).

    python benchmarks/single_lds_fit_point.py --arch mlp --damping 1e-3 --out docs/figures
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lissa_influence import Influence, confidence
from lissa_influence.experiments import mnist10
from lissa_influence.experiments.lds import subsets
from lissa_influence.experiments.single_lds import ModelCache, Task, retrained_losses, summed_scores
from lissa_influence.solvers import EKFAC

from _common import setup_threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="mlp", choices=mnist10.ARCHS)
    ap.add_argument("--damping", type=float, default=1e-3)
    ap.add_argument("--epochs", type=int, nargs="+", default=[1, 2, 3, 5, 10, 20, 50])
    ap.add_argument("--subsets", type=int, default=20, help="calibration subsets (calibration.seed 1)")
    ap.add_argument("--test-points", type=int, default=100)
    ap.add_argument("--cache-dir", default="~/.cache/lissa_influence")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    setup_threads(args.threads)
    t_start = time.perf_counter()
    task = Task(args.arch, mnist10.RECIPES[args.arch], mnist10.split())
    cache = ModelCache(task, Path(args.cache_dir).expanduser() / "single_lds")
    m = len(task.split.x_train)
    # the calibration subsets of the presets (calibration.seed = 1): the same draws and seeds
    kept = subsets(m, args.subsets, 0.5, 1)
    actual = retrained_losses(cache, kept, 1 * 100_000 + 1000, "calibration subsets", True)[:, : args.test_points]
    test = (task.split.x_test[: args.test_points], task.split.y_test[: args.test_points])
    rows = []
    for epochs in args.epochs:
        net = cache.model(None, seed=0, epochs=epochs)
        inf = Influence(net, solver=EKFAC(), damping=args.damping, hessian_samples="all", dtype=torch.float64)
        scores = inf.fit(task.split.train).scores(test).numpy()
        interval = confidence.lds_interval(summed_scores(scores, kept), actual)
        train_loss = float(mnist10.test_losses(net, *task.split.train).mean())
        rows.append({"epochs": epochs, "lds": interval.as_dict(), "train_loss": train_loss})
        print(f"{args.arch} epochs {epochs:>3}: LDS {interval}  (training loss {train_loss:.4f})", flush=True)
    best = max(rows, key=lambda r: r["lds"]["estimate"])
    print(f"best fit point: {best['epochs']} epochs ({(time.perf_counter() - t_start) / 60:.1f} min)")
    if args.out:
        path = Path(args.out) / f"single_lds_fit_point_{args.arch}.json"
        path.write_text(json.dumps({"args": vars(args), "rows": rows, "best": best["epochs"]}, indent=2))


if __name__ == "__main__":
    main()
