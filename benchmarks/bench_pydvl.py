"""Optional side-by-side of ``Influence`` with pyDVL's ``CgInfluence`` / ``LissaInfluence``.

Same model (the digits CNN, float64, trained with full-batch Adam + L-BFGS and an L2
weight decay equal to the damping λ, as conf/preset/digits.yaml), same data (Hessian
over all 576 pretraining examples, one batch in both libraries), same λ (pyDVL's
``regularization``), the same test points; every training example is scored. The
reference is ``Explicit(method="eigh")`` (dense damped Hessian, direct solve).

Sign: pyDVL's ``influences`` documents ⟨H⁻¹∇ℓ_test, ∇ℓ(z)⟩; our I(z) (docs/math.md) is minus that.
The script checks it (rel. distance of the raw pyDVL scores to +S* and to −S*) and flips.

CG mapping. Ours stops a row when ‖r‖ ≤ tol·‖b‖ (x0 = 0). pyDVL (x0 = b) stops when
‖r‖ < max(rtol²·y, atol²): in block mode (``solve_simultaneously=True``) y = ‖b_i‖, so
``rtol = √tol, atol = 0`` is the same criterion; in the default one-at-a-time mode y is the
norm of a *column* of the right-hand-side stack, so ``rtol = tol`` taken literally means
an absolute ‖r‖ ≲ tol² (that variant runs once, on --literal-points test points, as
"literal"; its default maxiter is 10 × parameters per right-hand side). ``precompute_grad`` is
stored but unused by pyDVL 0.10.0. Both run block CG (one Krylov space for all right-hand
sides); ``CG(block=False)`` (one CG per row) with --one-per-query.

Preconditioned and approximate rows. Ours: ``CG(preconditioner="nystrom", rank=r)`` for each
--nystrom-ranks, ``CG(preconditioner="ekfac")``, the best plain/preconditioned CG again with
``hvp_mode="retained"`` (--retained), and the approximate ``EKFAC()`` / ``EKFAC(kind="kfac")``.
pyDVL: ``CgInfluence(..., preconditioner=NystroemPreconditioner(rank=r))`` at the same ranks and
tolerance; in 0.10.0 ``Preconditioner.fit`` returns None, so CgInfluence silently runs without
it (the sketch is paid for and dropped); a subclass whose ``fit`` returns ``self`` gives the
"fit fixed" row. ``ArnoldiInfluence(rank=r)`` (--arnoldi-ranks) and ``EkfacInfluence`` (Linear
layers only: on this CNN it raises, and the script reports why). "Equal accuracy": among the
CG rows whose relative error against the reference is at most --equal-error, the fastest per
query of each library; the script prints their ratio. Per-query seconds are wall seconds over
the test points, fits (sketches, Kronecker factors, Arnoldi) included.

LiSSA mapping. Both run h ← b + (1 − d)·h − (H + λI)h / s, result h / s:
ours ``LiSSA(scale=s, damping=d, depth=D, tol=0)`` on the λ-damped operator ≡ pyDVL
``LissaInfluence(regularization=λ, scale=s, dampen=d, maxiter=D, rtol=0)`` with a
DataLoader whose batch is the whole set (pyDVL draws one shuffled batch per step; with
batch = all examples the recursion is deterministic, as ours with ``batch_size=None``).
tol = rtol = 0 switch early stopping off so both take exactly D steps (pyDVL's rtol is
an element-wise max |Δh/h|, ours a norm ratio, so they cannot be matched otherwise).
d = 0 and s = 1.2 × λ_max(H + λI) (from the reference's eigh; pyDVL's default is 10).

    /work/venv_dvl/bin/python benchmarks/bench_pydvl.py --threads 1 --out docs/figures
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lissa_influence import Influence
from lissa_influence import relative_error as rel
from lissa_influence.experiments.data import DataConfig, load_two_stage
from lissa_influence.experiments.models import build_model
from lissa_influence.experiments.training import TrainConfig, pretrain
from lissa_influence.scoring import PerExample, loss_gradients
from lissa_influence.solvers import CG, EKFAC, Explicit, LiSSA, SolverWarning

from _common import interleaved, markdown, pyplot, save_figure, setup_threads, table, write_json


def rowwise(a: torch.Tensor, b: torch.Tensor, rank: bool) -> float:
    """Mean over test points (rows) of the Pearson (or Spearman: Pearson of ranks) correlation."""
    if rank:
        a, b = a.argsort(1).argsort(1).double(), b.argsort(1).argsort(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean())


def count_products(model, counter: list) -> None:
    """Count Hessian-vector products (rows) inside a fitted pyDVL CgInfluence."""
    for block in model.block_mapper.composable_block_dict.values():
        op = block.op.operator
        apply = op.apply

        def counted(t, apply=apply):
            counter[0] += 1 if t.dim() == 1 else t.shape[0]
            return apply(t)

        op.apply = counted


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (keep <= free cores)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-points", type=int, default=8, help="pretraining test examples queried (seeded choice)")
    ap.add_argument("--damping", type=float, default=1e-2, help="λ in both, and the training weight decay")
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--polish-iters", type=int, default=500)
    ap.add_argument("--cg-tol", type=float, default=1e-6)
    ap.add_argument("--cg-max-iter", type=int, default=1000)
    ap.add_argument("--lissa-depth", type=int, default=50, help="kept low: each step is one product per test point")
    ap.add_argument("--lissa-safety", type=float, default=1.2, help="scale = safety × λ_max of the damped Hessian")
    ap.add_argument(
        "--explicit-block", type=int, default=64, help="Explicit(block_size=...): basis vectors per stacked product"
    )
    ap.add_argument(
        "--literal-points", type=int, default=2, help="test points for pyDVL's default CG mode with rtol=tol (0 skips)"
    )
    ap.add_argument(
        "--literal-max-iter", type=int, default=500, help="its maxiter (pyDVL's default is 10 × parameters)"
    )
    ap.add_argument(
        "--nystrom-ranks",
        default="32",
        help="comma-separated Nyström sketch ranks, run in both libraries (the first is the one --retained uses)",
    )
    ap.add_argument(
        "--retained",
        choices=["none", "plain", "nystrom", "ekfac"],
        default="plain",
        help="which of our CG rows to repeat with hvp_mode='retained'",
    )
    ap.add_argument(
        "--arnoldi-ranks", default="64", help="comma-separated ranks of pyDVL's ArnoldiInfluence (none: '')"
    )
    ap.add_argument(
        "--arnoldi-woodbury",
        action="store_true",
        help="pyDVL Arnoldi use_woodbury=True ((VΣVᵀ + λI)⁻¹ exactly; default: the low-rank part only, its default)",
    )
    ap.add_argument(
        "--no-fix-pydvl-fit",
        dest="fix_pydvl_fit",
        action="store_false",
        help="skip the row with pyDVL's Nyström preconditioner made effective (its fit() returns None in 0.10.0)",
    )
    ap.add_argument("--one-per-query", action="store_true", help="also time CG(block=False) (slow)")
    ap.add_argument(
        "--equal-error",
        type=float,
        default=1e-5,
        help="exact methods: rel. error vs Explicit at most this to count as 'equal accuracy' in the speed ratio",
    )
    ap.add_argument("--out", default=None, help="directory for pydvl.json and pydvl_scatter.png")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # pyDVL's deprecation chatter on import
    try:
        import pydvl
        from pydvl.influence import InfluenceMode
        from pydvl.influence.torch import ArnoldiInfluence, CgInfluence, EkfacInfluence, LissaInfluence
        from pydvl.influence.torch.operator import HessianOperator
        from pydvl.influence.torch.preconditioner import NystroemPreconditioner
    except ImportError as e:  # plain `pip install pydvl` lacks dask/distributed, which pydvl.influence imports
        print(f"pyDVL is not installed ({e}); skipping the side-by-side. pip install 'pydvl[influence]' to run it.")
        return 0
    warnings.filterwarnings("ignore", category=SolverWarning)  # LiSSA at tol=0 "did not converge" by design
    logging.getLogger("pydvl").setLevel(logging.ERROR)  # its LiSSA logs the same at WARNING

    env = setup_threads(args.threads)
    env["pydvl"] = pydvl.__version__
    t_start = time.perf_counter()
    print(
        f"threads={env['threads']} (cpu_count={env['cpu_count']}, load={env['load_average']}), torch {env['torch']}, "
        f"pyDVL {pydvl.__version__}"
    )
    data = load_two_stage(DataConfig(name="digits", seed=args.seed))
    lam = args.damping
    cfg = TrainConfig(steps=args.train_steps, lr=1e-2, seed=args.seed, polish_iters=args.polish_iters, weight_decay=lam)
    model, report = pretrain(build_model("digits", len(data.pretrain_classes), args.seed, torch.float64), data, cfg)
    model.eval()
    x, y = data.pretrain_train.tensors
    x = x.double()
    tx, ty = data.pretrain_test.tensors
    pick = torch.randperm(len(ty), generator=torch.Generator().manual_seed(args.seed))[: args.test_points]
    tx, ty = tx[pick].double(), ty[pick]
    train, test, m = TensorDataset(x, y), TensorDataset(tx, ty), len(y)
    loader = DataLoader(train, batch_size=m)  # one batch: pyDVL averages chunk means unweighted
    P = sum(p.numel() for p in model.parameters())
    print(
        f"digits CNN {P} parameters, {m} training examples, {len(ty)} test points; trained {report.seconds:.0f}s, "
        f"loss {report.loss:.4g}, grad norm {report.grad_norm:.2e}"
    )

    def ours(solver, **kw):
        return Influence(model, solver=solver, damping=lam, hessian_samples=m, batch_size=m, seed=args.seed, **kw)

    t0 = time.perf_counter()
    ref_est = ours(Explicit(method="eigh", block_size=args.explicit_block)).fit(train)
    s_ref = ref_est.query_vectors(test)
    S_ref = ref_est.scores_from(s_ref)
    ex = ref_est.diagnostics["solve"]
    t_ref = time.perf_counter() - t0
    lmin, lmax = ex["min_eigenvalue"], ex["max_eigenvalue"]
    scale = args.lissa_safety * lmax
    op = ref_est.operator  # (H + λI), ours; used for residuals and the same-operator check
    b = loss_gradients(PerExample(model, ref_est.loss, ref_est.params, ref_est.block), test, m, False)
    v = torch.randn(P, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    hv_dvl = HessianOperator(model, F.cross_entropy, loader).apply(v) + lam * v
    same_op = rel(hv_dvl, op(v[None])[0])
    print(
        f"Explicit reference {t_ref:.0f}s; damped Hessian eigenvalues [{lmin:.3g}, {lmax:.3g}]; "
        f"LiSSA scale {scale:.3g}; pyDVL vs our (H+λI)v rel. diff {same_op:.1e}"
    )

    res: dict = {}  # name -> (scores in our sign, query vectors, products, converged, raw pyDVL scores)
    failed: dict[str, str] = {}  # name -> why it could not run

    def run_ours(name, solver, **kw):
        def f():
            est = ours(solver, **kw).fit(train)
            s = est.query_vectors(test)
            d = est.diagnostics["solve"]
            res[name] = (est.scores_from(s), s, d["num_products"], d["converged"] if solver.name == "cg" else None)

        return f

    def run_dvl(name, make, kind="cg", n=None, extra_products=0):
        """kind: "cg" (count the solve's products), "lissa" (depth × points), or "approx" (not counted)."""
        n = len(ty) if n is None else n

        def f():
            if name in failed:
                return
            try:
                inf = make().fit(loader)
            except Exception as e:  # noqa: BLE001 (a method that cannot run on this model: reported, not timed)
                failed[name] = f"{type(e).__name__}: {e}"
                print(f"{name} does not run: {failed[name]}")
                return
            counter = [0]
            if kind == "cg":
                count_products(inf, counter)
            with warnings.catch_warnings(record=True) as caught:  # CG warns once per unconverged solve
                warnings.simplefilter("always", UserWarning)
                s = inf.influence_factors(tx[:n], ty[:n])
            raw = inf.influences_from_factors(s, x, y, mode=InfluenceMode.Up)
            capped = sum("max number of iterations" in str(w.message) for w in caught)
            prods = {"cg": counter[0] + extra_products, "lissa": args.lissa_depth * n}.get(kind)
            res[name] = (-raw, s, prods, not capped if kind == "cg" else None, raw)

        return f

    def cg_dvl(pc=None):
        return lambda: CgInfluence(
            model,
            F.cross_entropy,
            regularization=lam,
            rtol=cg_tol**0.5,
            atol=0.0,
            maxiter=args.cg_max_iter,
            solve_simultaneously=True,
            preconditioner=pc() if pc is not None else None,
        )

    cg_tol = args.cg_tol
    ranks = [int(r) for r in args.nystrom_ranks.split(",") if r.strip()]
    a_ranks = [int(r) for r in args.arnoldi_ranks.split(",") if r.strip()]

    def cg(**kw):
        return CG(tol=cg_tol, max_iter=args.cg_max_iter, **kw)

    fns = {"CG ours": run_ours("CG ours", cg())}  # block CG, the default
    if args.one_per_query:
        fns["CG ours, one per query"] = run_ours("CG ours, one per query", cg(block=False))
    for r in ranks:
        fns[f"CG+Nyström {r} ours"] = run_ours(f"CG+Nyström {r} ours", cg(preconditioner="nystrom", rank=r))
    fns["CG+EK-FAC ours"] = run_ours("CG+EK-FAC ours", cg(preconditioner="ekfac"))
    if args.retained != "none":
        kw = {
            "plain": {},
            "nystrom": {"preconditioner": "nystrom", "rank": ranks[0]},
            "ekfac": {"preconditioner": "ekfac"},
        }
        label = {"plain": "CG", "nystrom": f"CG+Nyström {ranks[0]}", "ekfac": "CG+EK-FAC"}[args.retained]
        fns[f"{label} ours, retained"] = run_ours(
            f"{label} ours, retained", cg(**kw[args.retained]), hvp_mode="retained"
        )
    fns["CG pyDVL"] = run_dvl("CG pyDVL", cg_dvl())

    class FittedNystroem(NystroemPreconditioner):
        """pyDVL 0.10.0's ``Preconditioner.fit`` returns ``_fit(...)``, which is None for its Nyström (and
        Jacobi) preconditioner, so ``CgInfluence`` builds its CgOperator with ``preconditioner=None``: the
        sketch is paid for and dropped. This subclass only returns ``self`` from ``fit``."""

        def fit(self, operator, regularization=None):
            super().fit(operator, regularization)
            return self

    for r in ranks:  # the sketch's r products happen in fit(), outside the counted solve: added
        fns[f"CG+Nyström {r} pyDVL"] = run_dvl(
            f"CG+Nyström {r} pyDVL", cg_dvl(lambda r=r: NystroemPreconditioner(rank=r)), extra_products=r
        )
        if args.fix_pydvl_fit:
            name = f"CG+Nyström {r} pyDVL, fit fixed"
            fns[name] = run_dvl(name, cg_dvl(lambda r=r: FittedNystroem(rank=r)), extra_products=r)
    fns["LiSSA ours"] = run_ours("LiSSA ours", LiSSA(scale=scale, damping=0.0, depth=args.lissa_depth, tol=0.0))
    fns["LiSSA pyDVL"] = run_dvl(
        "LiSSA pyDVL",
        lambda: LissaInfluence(
            model, F.cross_entropy, regularization=lam, maxiter=args.lissa_depth, dampen=0.0, scale=scale, rtol=0.0
        ),
        kind="lissa",
    )
    fns["EK-FAC ours"] = run_ours("EK-FAC ours", EKFAC())
    fns["K-FAC ours"] = run_ours("K-FAC ours", EKFAC(kind="kfac"))
    fns["EK-FAC pyDVL"] = run_dvl(
        "EK-FAC pyDVL", lambda: EkfacInfluence(model, update_diagonal=True, hessian_regularization=lam), kind="approx"
    )
    for r in a_ranks:
        fns[f"Arnoldi {r} pyDVL"] = run_dvl(
            f"Arnoldi {r} pyDVL",
            lambda r=r: ArnoldiInfluence(
                model, F.cross_entropy, regularization=lam, rank=r, use_woodbury=args.arnoldi_woodbury
            ),
            kind="approx",
        )
    print(f"timing {list(fns)}, {args.repeats} interleaved repeats ...")
    timed = interleaved(fns, args.repeats, warmup=0)
    times = {k: v["median"] for k, v in timed.items() if k not in failed}
    if args.literal_points:  # slow (one right-hand side at a time, to ‖r‖ ≲ tol²): one run, first test points only
        print(f"CG pyDVL literal (default mode, rtol={cg_tol:g}), {args.literal_points} test point(s), one run ...")
        t0 = time.perf_counter()
        run_dvl(
            "CG pyDVL literal",
            lambda: CgInfluence(model, F.cross_entropy, regularization=lam, rtol=cg_tol, maxiter=args.literal_max_iter),
            n=args.literal_points,
        )()
        times["CG pyDVL literal"] = time.perf_counter() - t0

    raw = res["CG pyDVL"][4]
    sign = {
        "raw_vs_plus_ref": rel(raw, S_ref),
        "raw_vs_minus_ref": rel(-raw, S_ref),
        "raw_pearson": rowwise(raw, S_ref, False),
    }
    print(
        f"sign check: raw pyDVL CG scores vs +S* rel. {sign['raw_vs_plus_ref']:.3g}, vs −S* rel. "
        f"{sign['raw_vs_minus_ref']:.2e}, "
        f"Pearson(raw, S*) {sign['raw_pearson']:.4f}"
    )

    def base_of(name: str) -> str:
        """The row a method is compared with: same solver in ours; approximate ones with our EK-FAC."""
        mine = name.split(", fit fixed")[0].replace("pyDVL", "ours")
        if "pyDVL" in name and mine in res:
            return mine
        if name.startswith("CG"):
            return "CG ours"
        return "LiSSA ours" if name.startswith("LiSSA") else "EK-FAC ours"

    headers = [
        "method",
        "wall s",
        "s / query",
        "time / base",
        "HVPs",
        "converged",
        "residual",
        "rel. err",
        "Pearson",
        "Spearman",
        "base",
        "vs base rel.",
    ]
    rows = [["Explicit (reference)", t_ref, t_ref / len(ty), None, P, True, None, 0.0, 1.0, 1.0, None, None]]
    runs = []
    for name in res:
        if name in failed:
            continue
        S, s, prods, conv = res[name][:4]
        n = len(S)  # the literal run covers only the first test points: compare those rows
        base = base_of(name)
        mine, ours_S, ref = name == base, res[base][0][:n], S_ref[:n]
        resid = float(((op(s) - b[:n]).norm(dim=1) / b[:n].norm(dim=1)).max())
        r = {
            "method": name,
            "wall_s": times[name],
            "per_query_s": times[name] / n,
            "ratio": None if mine or n < len(ty) else times[name] / times[base],
            "products": prods,
            "converged": conv,
            "residual": resid,
            "rel_error": rel(S, ref),
            "pearson": rowwise(S, ref, False),
            "spearman": rowwise(S, ref, True),
            "base": None if mine else base,
            "vs_base_rel": None if mine else rel(S, ours_S),
            "test_points": n,
            "all_s": timed[name]["all"] if name in timed else [times[name]],
        }
        runs.append(r)
        rows.append([name + (f" ({n} pts, 1 run)" if n < len(ty) else "")] + list(r.values())[1:-2])
    exact = [r for r in runs if r["method"].startswith("CG") and r["test_points"] == len(ty)]
    exact = [r for r in exact if r["rel_error"] <= args.equal_error]
    best = {
        who: min((r for r in exact if who in r["method"]), key=lambda r: r["per_query_s"], default=None)
        for who in ("ours", "pyDVL")
    }
    speed = None
    if best["ours"] and best["pyDVL"]:
        speed = {
            "equal_error": args.equal_error,
            "ours": best["ours"]["method"],
            "ours_per_query_s": best["ours"]["per_query_s"],
            "ours_rel_error": best["ours"]["rel_error"],
            "pydvl": best["pyDVL"]["method"],
            "pydvl_per_query_s": best["pyDVL"]["per_query_s"],
            "pydvl_rel_error": best["pyDVL"]["rel_error"],
            "ratio": best["pyDVL"]["per_query_s"] / best["ours"]["per_query_s"],
        }
    title = (
        f"\npyDVL {pydvl.__version__} vs lissa_influence: digits CNN, {P} params, float64, λ={lam:g}, Hessian over "
        f"{m} examples, "
        f"{len(ty)} test points x {m} scored; CG tol {cg_tol:g}, LiSSA depth {args.lissa_depth} scale {scale:.3g}; "
        f"median of {args.repeats}, {env['threads']} thread(s); s / query = wall s / test points (fits included)"
    )
    print(table(headers, rows, title))
    print(
        "residual: worst ‖(H+λI)x − b‖/‖b‖ of the query vectors; rel. err / Pearson / Spearman vs Explicit; "
        "HVPs: single-vector products (LiSSA: depth × test points; Nyström: with the sketch's r; EK-FAC: "
        "the residual check), '-' where pyDVL's are not counted"
    )
    for name, why in failed.items():
        print(f"{name}: did not run: {why}")
    if speed:
        print(
            f"equal accuracy (rel. err <= {args.equal_error:g}): best ours {speed['ours']} "
            f"{speed['ours_per_query_s']:.3g} s/query (rel. err {speed['ours_rel_error']:.2g}), best pyDVL "
            f"{speed['pydvl']} {speed['pydvl_per_query_s']:.3g} s/query (rel. err {speed['pydvl_rel_error']:.2g}): "
            f"ours {speed['ratio']:.2f}x faster"
        )
    out = {
        "env": env,
        "config": vars(args),
        "load_average_end": list(os.getloadavg()),
        "setup": {
            "parameters": P,
            "train_examples": m,
            "test_indices": pick.tolist(),
            "train_report": report.__dict__,
            "eigenvalues_damped": [lmin, lmax],
            "lissa_scale": scale,
            "explicit_seconds": t_ref,
            "hvp_rel_diff_pydvl_vs_ours": same_op,
        },
        "sign_check": sign,
        "runs": runs,
        "failed": failed,
        "speed_at_equal_accuracy": speed,
        "markdown": markdown(headers, rows),
        "total_seconds": time.perf_counter() - t_start,
    }
    if args.out:
        plt = pyplot()
        pairs = [(k, base_of(k)) for k in res if "pyDVL" in k and k not in failed]
        cols = min(4, len(pairs))
        nrows = -(-len(pairs) // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 4 * nrows), squeeze=False)
        for ax in axes.flat[len(pairs) :]:
            ax.axis("off")
        for ax, (k, base) in zip(axes.flat, pairs, strict=False):
            a, d = res[base][0][: len(res[k][0])].flatten(), res[k][0].flatten()
            ax.scatter(a, d, s=4, alpha=0.5)
            lo, hi = float(min(a.min(), d.min())), float(max(a.max(), d.max()))
            ax.plot([lo, hi], [lo, hi], "k:", lw=0.8)
            ax.set_xlabel(f"{base} I(z)")
            ax.set_ylabel(f"{k} (sign flipped)")
            ax.set_title(f"{k}: rel. diff {rel(d, a):.1e}", fontsize=9)
        out["plots"] = [save_figure(fig, args.out, "pydvl_scatter.png")]
        print(f"wrote {write_json(args.out, 'pydvl.json', out)} and {out['plots'][0]}")
    print(f"total {out['total_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
