"""Real models on any device: one gradient, one HVP (forward- and reverse-mode), one CG
solve and scoring, for the batch and loss shapes users bring.

Models (random init, float32):

- ``mlp_mse``: a small MLP with ``F.mse_loss`` (torch has no forward-mode second
  derivative of it: ``ad_mode="auto"`` falls back to reverse-over-reverse);
- ``digits_cnn`` and ``mnist_cnn``: the paper's digits and MNIST CNNs with cross-entropy;
- ``resnet18``: torchvision's ResNet-18 (11.2M parameters, BatchNorm in eval mode) on
  32x32 images;
- ``transformer``: a one-layer ``nn.TransformerEncoder`` language model on dict batches
  with padding.

For each: seconds of one gradient, one HVP in forward-over-reverse mode (where torch
supports it) and in reverse-over-reverse mode, both as a ratio to the gradient, a CG solve
of ``--cg-iters`` iterations through ``Influence`` (``ad_mode="auto"``), and scoring
``--examples`` examples. Timings are interleaved medians (``_common.interleaved``).

    python benchmarks/bench_models.py                       # CPU, or CUDA when present
    python benchmarks/bench_models.py --device cuda --out docs/figures
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from lissa_influence import CG, Influence, SolverWarning
from lissa_influence.batching import Batch
from lissa_influence.curvature import Objective
from lissa_influence.estimator import eval_mode
from lissa_influence.experiments.models import build_model
from lissa_influence.params import make_block, named_params

from _common import interleaved, setup_threads, table, write_json


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cases(n: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    out = {}
    mlp = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 8))
    out["mlp_mse"] = (mlp, F.mse_loss, None, Batch(torch.randn(n, 32, generator=g), torch.randn(n, 8, generator=g)))
    cnn = build_model("digits", 4, seed=0)
    out["digits_cnn"] = (
        cnn,
        F.cross_entropy,
        None,
        Batch(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)),
    )
    mnist = build_model("mnist", 6, seed=0)
    out["mnist_cnn"] = (
        mnist,
        F.cross_entropy,
        None,
        Batch(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 6, (n,), generator=g)),
    )
    try:
        import torchvision

        resnet = torchvision.models.resnet18(num_classes=10)
        out["resnet18"] = (
            resnet,
            F.cross_entropy,
            None,
            Batch(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)),
        )
    except ImportError:
        pass
    vocab, length = 100, 16
    embed = nn.Embedding(vocab, 32)
    layer = nn.TransformerEncoderLayer(32, nhead=4, dim_feedforward=64, dropout=0.1, batch_first=True)
    lm = nn.ModuleDict(
        {
            "embed": embed,
            "encoder": nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
            "head": nn.Linear(32, vocab),
        }
    )

    def lm_forward(model, batch):
        h = model["embed"](batch["input_ids"])
        return model["head"](model["encoder"](h, src_key_padding_mask=batch["attention_mask"] == 0))

    def lm_loss(logits, batch):
        return F.cross_entropy(logits.transpose(1, 2), batch["labels"], ignore_index=-100)

    ids = torch.randint(1, vocab, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[:, length // 2 :] = (torch.rand(n, 1, generator=g) < 0.5).long()  # half the sequences padded
    labels = torch.where(mask.bool(), ids.roll(-1, 1), torch.full_like(ids, -100))
    out["transformer"] = (lm, lm_loss, lm_forward, Batch({"input_ids": ids, "attention_mask": mask, "labels": labels}))
    return {k: (m.to(device).eval(), loss, fwd, b.map(lambda t: t.to(device))) for k, (m, loss, fwd, b) in out.items()}


def bench(name: str, model, loss, forward, batch: Batch, args, device: torch.device) -> dict:
    params = named_params(model)
    block = make_block(params, lambda n: True)
    v = torch.randn(block.numel, generator=torch.Generator().manual_seed(1)).to(device)
    objectives = {
        m: Objective(model, loss, params, batch, args.chunk, forward=forward, ad_mode=m)
        for m in ("forward", "reverse", "auto")
    }
    objectives["retained"] = Objective(
        model, loss, params, batch, args.chunk, forward=forward, hvp_mode="retained", graph_budget=2**40
    )
    V2 = torch.stack([v, v.roll(1)])  # a stack of two, as block CG multiplies two queries
    fns = {
        "gradient": lambda: objectives["reverse"].gradient(block),
        "hvp_reverse": lambda: objectives["reverse"].hvp(block, v),
        "hvp_retained": lambda: objectives["retained"].hvp(block, v),
        "hvp_stack2": lambda: objectives["auto"].hvp(block, V2),
    }
    row = {"model": name, "params": block.numel, "examples": len(batch), "device": str(device)}
    if forward is None:  # raw torch.func on the parameter dict, one chunk: the library's overhead is above this
        x, y = batch.x, batch.y
        p = {n: t.detach() for n, t in params.items()}
        tangent = block.unflatten(v)

        def raw_grad(q):
            return torch.func.grad(lambda r: loss(torch.func.functional_call(model, r, (x,)), y))(q)

        def raw_hvp():
            return torch.func.jvp(raw_grad, (p,), (tangent,))[1]

        try:
            with eval_mode(model):
                raw_hvp()
            fns["raw_gradient"] = lambda: raw_grad(p)
            fns["raw_hvp_forward"] = raw_hvp
        except (RuntimeError, NotImplementedError):  # no forward-mode derivative (MSE): nothing to compare
            pass
    with eval_mode(model):
        t0 = time.perf_counter()
        objectives["retained"].hvp(block, v)  # builds and keeps the gradient graphs
        _sync(device)
        row["retained_build_s"] = time.perf_counter() - t0
        row["retained_graph_mib"] = objectives["retained"].graph_bytes / 2**20
        try:
            objectives["forward"].hvp(block, v)
            fns["hvp_forward"] = lambda: objectives["forward"].hvp(block, v)
        except (RuntimeError, NotImplementedError) as e:
            row["forward_mode"] = f"unsupported: {str(e).splitlines()[0][:80]}"

        def timed(f):
            def run():
                f()
                _sync(device)

            return run

        t = interleaved({k: timed(f) for k, f in fns.items()}, args.repeats)
    for k, r in t.items():
        row[f"{k}_s"] = r["median"]
    row["hvp_forward_over_gradient"] = row.get("hvp_forward_s", float("nan")) / row["gradient_s"]
    row["hvp_reverse_over_gradient"] = row["hvp_reverse_s"] / row["gradient_s"]
    row["hvp_retained_over_gradient"] = row["hvp_retained_s"] / row["gradient_s"]
    row["stack2_per_vector_over_gradient"] = row["hvp_stack2_s"] / 2 / row["gradient_s"]
    if "raw_gradient_s" in row:
        row["raw_hvp_forward_over_raw_gradient"] = row["raw_hvp_forward_s"] / row["raw_gradient_s"]
        row["hvp_forward_over_raw"] = row.get("hvp_forward_s", float("nan")) / row["raw_hvp_forward_s"]
    # a solve and scoring through the estimator, as a user runs them
    if batch.pair:
        data = TensorDataset(batch.x.cpu(), batch.y.cpu())
    else:  # a dict batch: a list of dict items
        data = [{k: t[i].cpu() for k, t in batch.x.items()} for i in range(len(batch))]
    inf = Influence(
        model,
        loss=loss,
        forward=forward,
        damping=1.0,
        hessian_samples="all",
        batch_size=args.chunk,
        solver=CG(tol=1e-30, max_iter=args.cg_iters, on_not_converged="warn", on_negative_curvature="warn"),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)  # a fixed number of iterations, not convergence
        inf.fit(data)
        test = data[:2] if isinstance(data, list) else TensorDataset(*(t[:2] for t in data.tensors))
        _sync(device)
        t0 = time.perf_counter()
        s = inf.query_vectors(test)
        _sync(device)
        row["cg_solve_s"] = time.perf_counter() - t0
        row["cg_products"] = inf.diagnostics["solve"]["num_products"]
        # per product of the solve (stacked products of 2 queries, CG's vector algebra, the test gradients)
        row["cg_product_over_gradient"] = row["cg_solve_s"] / row["cg_products"] / row["gradient_s"]
        # the solve's HVPs: retained graphs (the default) or the functional mode that ran
        row["ad_used"] = inf.operator.objective.ad_used or "retained"
        t0 = time.perf_counter()
        inf.scores_from(s)
        _sync(device)
        row["scoring_s"] = time.perf_counter() - t0
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--cg-iters", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="mlp_mse,digits_cnn,mnist_cnn,resnet18,transformer")
    ap.add_argument("--out", help="folder for models_<device>.json")
    args = ap.parse_args()
    env = setup_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but this machine has no CUDA device")
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    t0 = time.perf_counter()
    rows = []
    for name, case in cases(args.examples, device).items():
        if name in args.models.split(","):
            rows.append(bench(name, *case, args, device))
            print(f"  {name}: done", flush=True)
    cols = [
        "model",
        "params",
        "gradient_s",
        "hvp_forward_s",
        "hvp_reverse_s",
        "hvp_retained_s",
        "hvp_forward_over_gradient",
        "hvp_reverse_over_gradient",
        "hvp_retained_over_gradient",
        "stack2_per_vector_over_gradient",
        "retained_build_s",
        "retained_graph_mib",
        "raw_hvp_forward_over_raw_gradient",
        "hvp_forward_over_raw",
        "ad_used",
        "cg_product_over_gradient",
        "cg_solve_s",
        "scoring_s",
    ]
    print(
        table(
            cols,
            [[r.get(c) for c in cols] for r in rows],
            title=f"\n{args.examples} examples, chunk {args.chunk}, {device}, float32, {env['threads']} threads",
        )
    )
    res = {"env": env, "args": vars(args), "rows": rows, "total_seconds": time.perf_counter() - t0}
    write_json(args.out, f"models_{device.type}.json", res)
    print(f"total {res['total_seconds']:.0f}s")


if __name__ == "__main__":
    main()
