"""Cost of curvature products and inverse-HVP solves on the digits CNN.

Part 1 (products): for the digits CNN (build_model("digits", 4, seed), 1.5k parameters)
trained briefly on the digits pretraining set, time one loss gradient
(``Objective.gradient``), one Hessian-vector product (``CurvatureOperator``), one
Gauss-Newton product, and two alternative exact HVP formulations measured for
comparison (they are not library code):

- ``vjp(grad)``: reverse-over-reverse, the vector-Jacobian product of the gradient;
- ``retained``: the gradient graph of each chunk is built once
  (``autograd.grad(..., create_graph=True)``) and every product is only the second
  backward pass through it (``autograd.grad(g, θ, v, retain_graph=True)``).

over the Hessian sample, for float32 and float64 and several ``chunk_size`` values;
the ratio HVP / gradient is the issue's figure of merit (target ≤ 2.5). A FLOP model of
the network gives the ratio that the arithmetic alone implies.

Part 2 (stacks): time per vector of a stack of k vectors (CG with several right-hand
sides, Jacobi probes, the Explicit solver's basis blocks).

Part 3 (solvers): one right-hand side (the gradient of the mean test loss), damping
1e-2, float64: Explicit (dense, the reference), CG at several tolerances, LiSSA with
scale="auto" at several depths, Identity: wall time, products, relative error.

    python benchmarks/bench_curvature.py --out docs/figures
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
import warnings

import torch
from torch import nn
from torch.func import grad, vjp

from lissa_influence.batching import Batch, subsample_indices
from lissa_influence.curvature import CurvatureOperator, Objective, cross_entropy
from lissa_influence.experiments.data import DataConfig, load_two_stage
from lissa_influence.experiments.models import build_model
from lissa_influence.experiments.training import TrainConfig, pretrain
from lissa_influence.operators import LinearOperator
from lissa_influence.params import ParamBlock, make_block, named_params
from lissa_influence.solvers import CG, Explicit, Identity, LiSSA, SolverError

from _common import finish, interleaved, markdown, pyplot, save_figure, setup_threads, table

DTYPES = {"float32": torch.float32, "float64": torch.float64}


# --- alternative exact HVP formulations (measured, not library code) ----------------------
def hvp_vjp_of_grad(obj: Objective, block: ParamBlock, v: torch.Tensor) -> torch.Tensor:
    """Reverse-over-reverse: ``vjp`` of ``grad`` (= Hᵀv = Hv), chunk by chunk."""
    theta = obj.point(block)
    g = grad(lambda f, x, y: obj._loss((block,), (f,), x, y))
    total = None
    for c, w in obj._chunks(None):
        out = vjp(lambda f: g(f, c.x, c.y), theta)[1](v)[0]
        total = w * out if total is None else total + w * out
    return total.detach()


class RetainedGraphHVP(LinearOperator):
    """``v ↦ ∇²L v`` from one differentiable gradient graph per chunk, built once.

    Every product is then only the second backward pass (no forward, no first backward):
    ``autograd.grad(g, θ, v, retain_graph=True)``. Exact (the same double-backward as
    ``torch.autograd.functional.hvp``); the graphs stay in memory while the operator lives.
    ``stack="rows"`` multiplies a stack ``[k, P]`` row by row, ``"batched"`` with
    ``is_grads_batched=True`` (vmap over the second backward).
    """

    def __init__(self, obj: Objective, block: ParamBlock, damping: float = 0.0, stack: str = "rows"):
        self.damping, self.stack, self.parts = damping, stack, []
        self._shape, self._dtype, self._device = (block.numel, block.numel), obj.dtype, obj.device
        self.num_products = 0
        t0 = time.perf_counter()
        theta0 = obj.point(block).detach()
        with torch.enable_grad():
            for c, w in obj._chunks(None):
                theta = theta0.clone().requires_grad_(True)
                loss = obj._loss((block,), (theta,), c.x, c.y)
                (g,) = torch.autograd.grad(loss, theta, create_graph=True)
                self.parts.append((w, theta, g))
        self.setup_time = time.perf_counter() - t0

    def _one(self, v: torch.Tensor, batched: bool) -> torch.Tensor:
        total = None
        for w, theta, g in self.parts:
            (hv,) = torch.autograd.grad(g, theta, v, retain_graph=True, is_grads_batched=batched)
            total = w * hv if total is None else total + w * hv
        return total.detach()

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.num_products += 1 if v.dim() == 1 else v.shape[0]
        if v.dim() == 1:
            out = self._one(v, False)
        elif self.stack == "batched":
            out = self._one(v, True)
        else:
            out = torch.stack([self._one(row, False) for row in v])
        return out + self.damping * v

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self(V)


# --- FLOP model -------------------------------------------------------------------------------
def flop_model(model: nn.Module, x1: torch.Tensor) -> dict:
    """Multiply-adds per example of each Conv2d / Linear layer, and the cost of a gradient and
    of an HVP implied by them. A layer costs M for its forward product; the gradient adds M for
    dW and M for dX (not for the first layer, whose input is data). Forward-over-reverse (and
    reverse-over-reverse) HVP: every bilinear product a·b of forward and backward gets a tangent
    a'·b + a·b', so a layer costs 9M (first layer: 4M); with the gradient graph retained, a
    product is only the tangent/second-backward part, 6M (first layer 2M)."""
    layers: list[tuple[str, int]] = []

    def hook(name):
        def f(mod, inp, out):
            if isinstance(mod, nn.Conv2d):
                per_out = mod.in_channels // mod.groups * math.prod(mod.kernel_size)
                layers.append((name, out[0].numel() * per_out))
            else:
                layers.append((name, mod.in_features * mod.out_features))

        return f

    handles = [
        m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    with torch.no_grad():
        model(x1[:1])
    for h in handles:
        h.remove()
    fwd = sum(m for _, m in layers)
    grad_cost = sum((2 if i == 0 else 3) * m for i, (_, m) in enumerate(layers))
    hvp_cost = sum((4 if i == 0 else 9) * m for i, (_, m) in enumerate(layers))
    retained = sum((2 if i == 0 else 6) * m for i, (_, m) in enumerate(layers))
    return {
        "layers_mac": dict(layers),
        "forward_mac": fwd,
        "gradient_mac": grad_cost,
        "hvp_mac": hvp_cost,
        "retained_hvp_mac": retained,
        "hvp_over_grad": hvp_cost / grad_cost,
        "retained_over_grad": retained / grad_cost,
        "grad_over_forward": grad_cost / fwd,
    }


# --- setup ------------------------------------------------------------------------------------
def build(args) -> tuple[nn.Module, Batch, Batch | None, dict]:
    if args.arch == "digits":
        data = load_two_stage(DataConfig(name="digits", seed=args.seed))
        model0 = build_model("digits", len(data.pretrain_classes), args.seed)
        t0 = time.perf_counter()
        model, report = pretrain(model0, data, TrainConfig(steps=args.train_steps, lr=args.lr, seed=args.seed))
        info = {
            "train_seconds": time.perf_counter() - t0,
            "train_loss": report.loss,
            "train_grad_norm": report.grad_norm,
            "pretrain_examples": len(data.pretrain_train),
        }
        x, y = data.pretrain_train.tensors
        idx = subsample_indices(len(y), args.hessian_samples, args.seed)
        sample = Batch(x[idx], y[idx])
        tx, ty = data.pretrain_test.tensors
        test = Batch(tx, ty)
    else:  # synthetic inputs: timing only
        g = torch.Generator().manual_seed(args.seed)
        shape = {"mnist": (1, 28, 28), "cifar": (3, 32, 32)}[args.arch]
        model = build_model(args.arch, 4, args.seed)
        sample = Batch(
            torch.rand(args.hessian_samples, *shape, generator=g),
            torch.randint(0, 4, (args.hessian_samples,), generator=g),
        )
        test, info = None, {"synthetic_inputs": True}
    model.eval()
    info["hessian_samples"] = len(sample)
    info["parameters"] = sum(p.numel() for p in model.parameters())
    return model, sample, test, info


def cast(model: nn.Module, batch: Batch, dtype: torch.dtype) -> tuple[nn.Module, Batch]:
    return copy.deepcopy(model).to(dtype), Batch(batch.x.to(dtype), batch.y)


# --- part 1: products ---------------------------------------------------------------------------
def bench_products(args, model, sample) -> list[dict]:
    rows = []
    for dname in args.dtypes.split(","):
        m, batch = cast(model, sample, DTYPES[dname])
        params = named_params(m)
        block = make_block(params, lambda n: True)
        gen = torch.Generator().manual_seed(1)
        v = torch.randn(block.numel, generator=gen, dtype=torch.float64).to(DTYPES[dname])
        for chunk in [int(c) for c in args.chunks.split(",")]:
            obj = Objective(m, cross_entropy, params, batch, chunk)
            hop = CurvatureOperator(obj, block, 0.0)
            gop = CurvatureOperator(obj, block, 0.0, gauss_newton=True)
            retained = RetainedGraphHVP(obj, block)
            ref = hop(v)
            errs = {
                "vjp_of_grad": float((hvp_vjp_of_grad(obj, block, v) - ref).norm() / ref.norm()),
                "retained": float((retained(v) - ref).norm() / ref.norm()),
            }
            fns = {
                "forward": lambda: obj.value(),
                "gradient": lambda: obj.gradient(block),
                "hvp": lambda: hop(v),
                "ggn": lambda: gop(v),
            }
            if not args.no_alternatives:
                fns["hvp_vjp_of_grad"] = lambda: hvp_vjp_of_grad(obj, block, v)
                fns["hvp_retained"] = lambda: retained(v)  # noqa: F821 (timed below, before the del)
            t = interleaved(fns, args.repeats)
            med = {k: r["median"] for k, r in t.items()}
            row = {
                "dtype": dname,
                "chunk_size": chunk,
                "chunks": math.ceil(len(batch) / chunk),
                "seconds": med,
                "all_seconds": {k: r["all"] for k, r in t.items()},
                "retained_setup_seconds": retained.setup_time,
                "relative_difference_to_library_hvp": errs,
                # paired: the ratio within each round, then the median (robust to load drifting between rounds)
                "ratio_to_gradient": {
                    k: statistics.median(a / g for a, g in zip(t[k]["all"], t["gradient"]["all"], strict=True))
                    for k in t
                },
            }
            rows.append(row)
            print(f"  {dname} chunk={chunk}: " + " ".join(f"{k}={s * 1e3:.1f}ms" for k, s in med.items()), flush=True)
            del retained
    return rows


# --- part 2: stacks --------------------------------------------------------------------------------
def bench_stacks(args, model, sample) -> list[dict]:
    dtype = DTYPES[args.solver_dtype]
    m, batch = cast(model, sample, dtype)
    params = named_params(m)
    block = make_block(params, lambda n: True)
    obj = Objective(m, cross_entropy, params, batch, max(len(batch), 1))
    hop = CurvatureOperator(obj, block, 0.0)
    rows_op = RetainedGraphHVP(obj, block, stack="rows")
    batched_op = RetainedGraphHVP(obj, block, stack="batched")
    out = []
    for k in [int(s) for s in args.stack_sizes.split(",")]:
        V = torch.randn(k, block.numel, generator=torch.Generator().manual_seed(k), dtype=torch.float64).to(dtype)
        fns = {"library (vmap of jvp(grad))": lambda: hop(V), "retained, rows": lambda: rows_op(V)}
        if k > 1:
            fns["retained, is_grads_batched"] = lambda: batched_op(V)
        t = interleaved(fns, max(2, args.repeats // 2))
        row = {"k": k, "ms_per_vector": {n: r["median"] / k * 1e3 for n, r in t.items()}}
        out.append(row)
        print(f"  k={k}: " + " ".join(f"{n}={s:.1f}ms/vec" for n, s in row["ms_per_vector"].items()), flush=True)
    return out


# --- part 3: solvers -------------------------------------------------------------------------------
def bench_solvers(args, model, sample, test) -> dict:
    dtype = DTYPES[args.solver_dtype]
    m, batch = cast(model, sample, dtype)
    params = named_params(m)
    block = make_block(params, lambda n: True)
    obj = Objective(m, cross_entropy, params, batch, max(len(batch), 1))
    b = Objective(m, cross_entropy, params, Batch(test.x.to(dtype), test.y), 1024).gradient(block)
    lam = args.damping

    def op():
        return CurvatureOperator(obj, block, lam)

    runs: list[dict] = []

    def record(label, solver, operator, group):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            try:
                x, info = solver.solve(operator, b)
                err = None
            except SolverError as e:
                x, info, err = None, None, f"{type(e).__name__}: {e}"
            wall = time.perf_counter() - t0
        run = {
            "label": label,
            "group": group,
            "wall": wall,
            "x": x,
            "error": err,
            "warnings": [str(w.message)[:200] for w in caught],
        }
        if info is not None:
            run.update(
                products=info.num_products,
                iterations=info.iterations,
                converged=info.converged,
                history=info.residuals,
                extra={k: v for k, v in info.extra.items() if k != "relative_residuals"},
            )
        runs.append(run)
        print(f"  {label}: {wall:.2f}s" + (f", {info.num_products} products" if info else f" ({err})"), flush=True)
        return run

    ref = record("Explicit (dense, eigh)", Explicit(method="eigh", block_size=args.explicit_block), op(), "explicit")
    x_ref = ref["x"]
    for tol in [float(t) for t in args.cg_tols.split(",")]:
        record(f"CG tol={tol:g}", CG(tol=tol, max_iter=args.cg_max_iter, on_negative_curvature="warn"), op(), "cg")
    if not args.no_alternatives:
        tol = float(args.cg_tols.split(",")[len(args.cg_tols.split(",")) // 2])
        retained = RetainedGraphHVP(obj, block, lam)
        run = record(
            f"CG tol={tol:g}, retained-graph HVP (proposed)",
            CG(tol=tol, max_iter=args.cg_max_iter, on_negative_curvature="warn"),
            retained,
            "cg_retained",
        )
        run["wall"] += retained.setup_time  # the graph is part of the cost
    for depth in [int(d) for d in args.lissa_depths.split(",")]:
        record(f"LiSSA scale=auto depth={depth}", LiSSA(scale="auto", depth=depth, tol=0.0), op(), "lissa")
    record("Identity", Identity(), op(), "identity")

    norm = float(x_ref.norm())
    for r in runs:
        r["relative_error"] = None if r["x"] is None else float((r["x"] - x_ref).norm()) / norm
        r["residual"] = None if r["x"] is None else float((op()(r["x"]) - b).norm() / b.norm())
        r.pop("x")
    eig = ref.get("extra", {})
    return {
        "damping": lam,
        "dtype": args.solver_dtype,
        "rhs_norm": float(b.norm()),
        "min_eigenvalue_damped": eig.get("min_eigenvalue"),
        "max_eigenvalue_damped": eig.get("max_eigenvalue"),
        "runs": runs,
    }


# --- report --------------------------------------------------------------------------------------
def report(args, res) -> str:
    out = []
    s = res["setup"]
    out.append(
        f"{args.arch} CNN, {s['parameters']} parameters, Hessian sample {s['hessian_samples']} examples, "
        f"threads={res['env']['threads']}, {args.repeats} repeats (median, interleaved)"
    )
    fl = res["flops"]
    out.append(
        f"FLOP model: gradient = {fl['grad_over_forward']:.2f} x forward; HVP (forward-over-reverse) = "
        f"{fl['hvp_over_grad']:.2f} x gradient; retained-graph HVP = {fl['retained_over_grad']:.2f} x gradient"
    )
    out.append("ratios (x/grad) are medians of the per-round ratios")
    headers = ["dtype", "chunk", "fwd ms", "grad ms", "HVP ms", "HVP/grad", "GGN ms", "GGN/grad"]
    alt = not args.no_alternatives
    if alt:
        headers += ["vjp(grad) ms", "/grad", "retained ms", "/grad", "setup ms"]
    rows = []
    for r in res["products"]:
        sec, ra = r["seconds"], r["ratio_to_gradient"]
        row = [
            r["dtype"],
            r["chunk_size"],
            sec["forward"] * 1e3,
            sec["gradient"] * 1e3,
            sec["hvp"] * 1e3,
            ra["hvp"],
            sec["ggn"] * 1e3,
            ra["ggn"],
        ]
        if alt:
            row += [
                sec["hvp_vjp_of_grad"] * 1e3,
                ra["hvp_vjp_of_grad"],
                sec["hvp_retained"] * 1e3,
                ra["hvp_retained"],
                r["retained_setup_seconds"] * 1e3,
            ]
        rows.append(row)
    res["_tables"] = {"products": (headers, rows)}
    out.append(table(headers, rows, "\nProducts over the Hessian sample"))
    if res.get("stacks"):
        names = list(res["stacks"][-1]["ms_per_vector"])
        srows = [[r["k"]] + [r["ms_per_vector"].get(n) for n in names] for r in res["stacks"]]
        res["_tables"]["stacks"] = (["k"] + [f"{n} ms/vector" for n in names], srows)
        out.append(
            table(
                ["k"] + [f"{n} ms/vec" for n in names], srows, f"\nStacks of k vectors ({args.solver_dtype}, one chunk)"
            )
        )
    if res.get("solvers"):
        sv = res["solvers"]
        hdr = ["solver", "wall s", "HVPs", "iterations", "rel. error", "residual", "converged"]
        vrows = [
            [
                r["label"],
                r["wall"],
                r.get("products"),
                r.get("iterations"),
                r["relative_error"],
                r["residual"],
                r.get("converged") if not r["error"] else r["error"][:40],
            ]
            for r in sv["runs"]
        ]
        res["_tables"]["solvers"] = (hdr, vrows)
        out.append(
            table(
                hdr,
                vrows,
                f"\nSolvers, one right-hand side (test-loss gradient), damping {sv['damping']:g}, "
                f"{sv['dtype']}; eigenvalues of the damped Hessian in "
                f"[{sv['min_eigenvalue_damped']:.3g}, {sv['max_eigenvalue_damped']:.3g}]",
            )
        )
    return "\n".join(out)


def plots(args, res) -> list[str]:
    plt = pyplot()
    outdir = args.out
    written = []
    prods = res["products"]
    keys = [("gradient", "gradient"), ("hvp", "HVP (library)"), ("ggn", "GGN")]
    if not args.no_alternatives:
        keys += [("hvp_vjp_of_grad", "HVP vjp(grad)"), ("hvp_retained", "HVP retained graph")]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(keys)
    for j, (k, lab) in enumerate(keys):
        ax.bar([i + j * width for i in range(len(prods))], [r["seconds"][k] * 1e3 for r in prods], width, label=lab)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(prods))])
    ax.set_xticklabels([f"{r['dtype']}\nchunk {r['chunk_size']}" for r in prods], fontsize=8)
    ax.set_ylabel("ms per product (median)")
    ax.set_title(f"{args.arch} CNN, {res['setup']['hessian_samples']} examples, {res['env']['threads']} threads")
    ax.legend(fontsize=8)
    written.append(save_figure(fig, outdir, f"curvature_products_{args.arch}.png"))
    if res.get("solvers"):
        runs = res["solvers"]["runs"]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        for r in runs:
            if r["group"] in ("cg", "cg_retained") and r.get("history"):
                a1.semilogy(range(len(r["history"])), r["history"], label=r["label"])
            if r["group"] == "lissa" and r.get("history"):
                step = 10
                a1.semilogy(
                    [step * (i + 1) for i in range(len(r["history"]))],
                    r["history"],
                    "--",
                    label=r["label"] + " (rel. update)",
                )
        a1.set_xlabel("iteration (CG) / step (LiSSA)")
        a1.set_ylabel("relative residual / update")
        a1.legend(fontsize=7)
        for r in runs:
            if r["relative_error"] is not None and r["group"] != "explicit":
                a2.scatter(max(r["wall"], 1e-3), max(r["relative_error"], 1e-16))
                a2.annotate(
                    r["label"].replace("scale=auto ", "").replace("retained-graph HVP (proposed)", "retained"),
                    (max(r["wall"], 1e-3), max(r["relative_error"], 1e-16)),
                    fontsize=7,
                )
        ex = [r for r in runs if r["group"] == "explicit"][0]
        a2.axvline(ex["wall"], color="gray", ls=":", label=f"Explicit {ex['wall']:.1f}s")
        a2.set_xscale("log")
        a2.set_yscale("log")
        a2.set_xlabel("wall time, s")
        a2.set_ylabel("relative error vs Explicit")
        a2.legend(fontsize=7)
        fig.suptitle(f"Solvers, damping {res['solvers']['damping']:g}, {res['solvers']['dtype']}")
        written.append(save_figure(fig, outdir, f"curvature_solvers_{args.arch}.png"))
    return written


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (keep <= free cores)")
    ap.add_argument(
        "--arch",
        default="digits",
        choices=["digits", "mnist", "cifar"],
        help="digits: trained on the digits; mnist/cifar: untrained, synthetic inputs, no solver table",
    )
    ap.add_argument(
        "--hessian-samples",
        type=int,
        default=1000,
        help="size of the Hessian sample (digits has 576 pretraining examples)",
    )
    ap.add_argument("--train-steps", type=int, default=50, help="full-batch Adam steps of the brief pretraining")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--chunks", default="128,256,1000", help="Objective.chunk_size values")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--stack-sizes", default="1,8,32", help="k for the stacked-product table ('' skips it)")
    ap.add_argument("--no-alternatives", action="store_true", help="skip the vjp(grad) and retained-graph HVP variants")
    ap.add_argument("--skip-solvers", action="store_true")
    ap.add_argument("--solver-dtype", default="float64")
    ap.add_argument("--damping", type=float, default=1e-2)
    ap.add_argument("--cg-tols", default="1e-4,1e-6,1e-8")
    ap.add_argument("--cg-max-iter", type=int, default=1000)
    ap.add_argument("--lissa-depths", default="100,300")
    ap.add_argument(
        "--explicit-block", type=int, default=32, help="Explicit(block_size=...): basis vectors per stacked product"
    )
    ap.add_argument("--out", default=None, help="directory for curvature_<arch>.json and PNG plots")
    args = ap.parse_args(argv)

    env = setup_threads(args.threads)
    t_start = time.perf_counter()
    print(f"threads={env['threads']} (cpu_count={env['cpu_count']}, load={env['load_average']}), torch {env['torch']}")
    model, sample, test, setup = build(args)
    print(
        f"{args.arch} CNN: {setup['parameters']} parameters; Hessian sample {setup['hessian_samples']} examples"
        + (
            f" (all of the {setup['pretrain_examples']} digits pretraining examples)"
            if args.arch == "digits" and setup["hessian_samples"] < args.hessian_samples
            else ""
        )
        + (
            f"; pretrained {args.train_steps} Adam steps, loss {setup['train_loss']:.3g}"
            if args.arch == "digits"
            else ""
        )
    )
    res: dict = {"env": env, "config": vars(args), "setup": setup, "flops": flop_model(model, sample.x)}
    print("Products:")
    res["products"] = bench_products(args, model, sample)
    if args.stack_sizes:
        print("Stacks:")
        res["stacks"] = bench_stacks(args, model, sample)
    if not args.skip_solvers and args.arch == "digits":
        print("Solvers:")
        res["solvers"] = bench_solvers(args, model, sample, test)
    res["total_seconds"] = time.perf_counter() - t_start
    text = report(args, res)
    print("\n" + text)
    tables = res.pop("_tables")
    res["markdown"] = {k: markdown(*v) for k, v in tables.items()}
    return finish(res, args.out, f"curvature_{args.arch}.json", lambda: plots(args, res))


if __name__ == "__main__":
    main()
