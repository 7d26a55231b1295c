"""K-FAC / EK-FAC fit time and agreement: ``lissa_influence.fit_kronecker`` against
curvlinops-for-pytorch's ``KFACLinearOperator`` / ``EKFACLinearOperator``.

Same network (2 conv + 2 linear layers, MNIST-shaped 1x28x28 inputs, 10 classes, about
20k parameters), same 256 random examples, float32, mean cross-entropy, type-2 Fisher
(the exact Gauss-Newton factors, 10 backward passes per batch in both), "expand" for the
convolutions, weight and bias as one Kronecker block in both
(``separate_weight_and_bias=False``). The fit is timed from nothing to the first product
(curvlinops computes its factors lazily at the first product); both take the data in
batches of ``--batch``. The agreement is the relative difference of the two operators'
products with the same random vectors (float64 norms).

    python benchmarks/bench_kfac.py --threads 1
"""

from __future__ import annotations

import argparse
import importlib.util

import torch
from torch import nn

from lissa_influence.batching import Batch
from lissa_influence.curvature import Objective, cross_entropy
from lissa_influence.kfac import fit_kronecker
from lissa_influence.params import make_block, named_params

from _common import interleaved, setup_threads, table


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 8, 5), nn.Conv2d(8, 16, 5)
        self.fc1, self.fc2 = nn.Linear(16 * 4 * 4, 64), nn.Linear(64, 10)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(torch.relu(self.conv1(x)))
        h = self.pool(torch.relu(self.conv2(h)))
        return self.fc2(torch.relu(self.fc1(h.flatten(1))))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    env = setup_threads(args.threads)
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(args.examples, 1, 28, 28)
    y = torch.randint(0, 10, (args.examples,))
    params = named_params(model)
    block = make_block(params, lambda n: True)
    objective = Objective(model, cross_entropy, params, Batch(x, y), chunk_size=args.batch)
    V = torch.randn(4, block.numel)
    print(f"{block.numel} parameters, {args.examples} examples, batch {args.batch}, {env['threads']} threads")

    have_curvlinops = importlib.util.find_spec("curvlinops") is not None
    if not have_curvlinops:
        print("curvlinops is not installed (pip install curvlinops-for-pytorch): timing ours only")
    data = [(x[i : i + args.batch], y[i : i + args.batch]) for i in range(0, args.examples, args.batch)]
    rows = []
    for kind in ("kfac", "ekfac"):
        products: dict[str, torch.Tensor] = {}
        fitted = {}

        def ours(kind: str = kind) -> None:
            fitted["ours"] = fit_kronecker(objective, block, kind=kind, fisher="type-2")
            products["ours"] = fitted["ours"].matmat(V)

        def theirs(kind: str = kind) -> None:
            from curvlinops import EKFACLinearOperator, KFACLinearOperator

            cls = KFACLinearOperator if kind == "kfac" else EKFACLinearOperator
            op = cls(
                model,
                nn.CrossEntropyLoss(),
                list(model.parameters()),
                data,
                check_deterministic=False,
                fisher_type="type-2",
                separate_weight_and_bias=False,
                num_data=args.examples,
                num_per_example_loss_terms=1,
            )
            products["curvlinops"] = (op @ V.T).T

        fns = {"ours": ours, "curvlinops": theirs} if have_curvlinops else {"ours": ours}
        times = interleaved(fns, repeats=args.repeats, warmup=0)  # round-robin: background load hits both
        diff = rel(products["ours"], products["curvlinops"]) if have_curvlinops else None
        rows.append(
            [
                kind,
                times["ours"]["min"],
                times["curvlinops"]["min"] if have_curvlinops else None,
                fitted["ours"].fit_passes,
                diff,
            ]
        )
    headers = ["kind", "ours fit s", "curvlinops fit s", "ours passes", "rel. diff of products"]
    print(table(headers, rows, title="type-2 factors, fit to first product (best of repeats)"))


if __name__ == "__main__":
    main()
