"""A tiny two-stage problem solved to machine precision (float64, Newton's method).

One-hidden-layer tanh embedding, softmax heads, L2 weight decay equal to the damping
of the influence code, so that the damped Hessians there are the true Hessians of the
regularised objectives here. Used to check influence against actual retraining.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, hessian

from lissa_influence.batching import Batch
from lissa_influence.curvature import cross_entropy
from lissa_influence.params import ParamBlock, make_block, named_params, prefix_matcher


class Net(nn.Module):
    def __init__(self, d_in: int, hidden: int, classes: int):
        super().__init__()
        self.embedding = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.embedding(x))


def newton(objective, theta: torch.Tensor, tol: float = 1e-12, max_iter: int = 100) -> torch.Tensor:
    """Minimise a smooth objective of a flat vector by Newton's method with backtracking;
    the Hessian is shifted to positive definite where it is not (far from the optimum)."""
    theta = theta.clone()
    for _ in range(max_iter):
        g = grad(objective)(theta)
        if g.norm() <= tol:
            return theta
        H = hessian(objective)(theta)
        evals = torch.linalg.eigvalsh(H)
        shift = max(0.0, 1e-8 - float(evals[0]))
        step = torch.linalg.solve(H + shift * torch.eye(len(theta), dtype=theta.dtype), g)
        f0, t = objective(theta), 1.0
        # near the optimum the decrease is below the objective's float resolution and the line
        # search would only shrink the step: take the full Newton step there (quadratic convergence)
        while g.norm() > 1e-6 and objective(theta - t * step) > f0 - 1e-4 * t * (g @ step) and t > 1e-10:
            t *= 0.5
        theta = theta - t * step
    raise AssertionError(f"Newton did not converge: gradient norm {float(grad(objective)(theta).norm()):.3g}")


@dataclass
class TwoStage:
    pre_data: Batch
    ft_data: Batch
    test: Batch
    lam_pre: float
    lam_ft: float
    alpha: float
    mode: str
    pre: Net
    ft: Net

    @classmethod
    def build(cls, mode: str, seed: int = 0, lam_pre: float = 1e-2, lam_ft: float = 1e-2, alpha: float = 0.05):
        g = torch.Generator().manual_seed(seed)
        d, h = 4, 3
        teacher = torch.randn(d, 3, generator=g, dtype=torch.float64)
        x_pre = torch.randn(40, d, generator=g, dtype=torch.float64)
        y_pre = (x_pre @ teacher + 0.8 * torch.randn(40, 3, generator=g, dtype=torch.float64)).argmax(1)
        x_ft = torch.randn(30, d, generator=g, dtype=torch.float64)
        y_ft = (
            x_ft[:, :2] @ torch.tensor([[1.0, -1.0], [0.5, 1.0]], dtype=torch.float64)
            + 0.8 * torch.randn(30, 2, generator=g, dtype=torch.float64)
        ).argmax(1)
        x_te = torch.randn(3, d, generator=g, dtype=torch.float64)
        y_te = torch.tensor([0, 1, 1])
        torch.manual_seed(seed)
        pre, ft = Net(d, h, 3).double(), Net(d, h, 2).double()
        self = cls(Batch(x_pre, y_pre), Batch(x_ft, y_ft), Batch(x_te, y_te), lam_pre, lam_ft, alpha, mode, pre, ft)
        self.W = make_block(named_params(pre), prefix_matcher("embedding"))
        self.U = make_block(named_params(pre), prefix_matcher("head"))
        self.T = make_block(named_params(ft), prefix_matcher("head"))
        wu = self.retrain_pretrain((self.W + self.U).flatten(named_params(pre)), None, 0.0)
        self._load(pre, self.W + self.U, wu)
        w_star = wu[: self.W.numel]
        self._load(ft, self.W, w_star)
        wt = self.retrain_finetune(w_star, (self.W + self.T).flatten(named_params(ft)))
        self._load(ft, self.W + self.T, wt)
        self.wu, self.wt = wu, wt
        return self

    @staticmethod
    def _load(model: nn.Module, block: ParamBlock, flat: torch.Tensor) -> None:
        with torch.no_grad():
            for n, p in block.unflatten(flat).items():
                model.get_parameter(n).copy_(p)

    def pre_objective(self, z: int | None, eps: float):
        block, data = self.W + self.U, self.pre_data

        def G(flat):
            loss = cross_entropy(functional_call(self.pre, block.unflatten(flat), (data.x,)), data.y)
            if z is not None:
                loss = loss + eps * cross_entropy(
                    functional_call(self.pre, block.unflatten(flat), (data.x[z : z + 1],)), data.y[z : z + 1]
                )
            return loss + 0.5 * self.lam_pre * flat @ flat

        return G

    def retrain_pretrain(self, start, z, eps):
        return newton(self.pre_objective(z, eps), start)

    def retrain_finetune(self, w_star: torch.Tensor, start_wt: torch.Tensor) -> torch.Tensor:
        nW = self.W.numel
        if self.mode == "fixed":

            def F(theta):
                p = {**self.W.unflatten(w_star), **self.T.unflatten(theta)}
                return (
                    cross_entropy(functional_call(self.ft, p, (self.ft_data.x,)), self.ft_data.y)
                    + 0.5 * self.lam_ft * theta @ theta
                )

            return torch.cat([w_star, newton(F, start_wt[nW:])])

        block = self.W + self.T

        def F(flat):
            loss = cross_entropy(functional_call(self.ft, block.unflatten(flat), (self.ft_data.x,)), self.ft_data.y)
            w = flat[:nW]
            return loss + self.alpha * (w - w_star) @ (w - w_star) + 0.5 * self.lam_ft * flat @ flat

        return newton(F, start_wt)

    def test_loss_after_upweighting(self, z: int, eps: float, query: int) -> float:
        wu = self.retrain_pretrain(self.wu, z, eps)
        wt = self.retrain_finetune(wu[: self.W.numel], self.wt)
        p = (self.W + self.T).unflatten(wt)
        t = self.test
        return float(cross_entropy(functional_call(self.ft, p, (t.x[query : query + 1],)), t.y[query : query + 1]))
