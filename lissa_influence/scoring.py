"""Per-example derivatives: test-loss gradients and ``sᵀ∇g(z)`` over a whole dataset.

After the solves, a score is the directional derivative of one example's loss along a
query vector ``s``. Two ways to get it for a batch of examples:

- ``"jvp"``: one forward-mode pass of the per-example losses along each ``s``
  (``torch.func.jvp``, ``vmap``-ed over the ``k`` query vectors); costs about ``k``
  forward passes and stores no per-example gradient.
- ``"grad"``: per-example gradients ``[B, P]`` (``vmap(grad)``) times the stacked
  ``S [k, P]``; one backward pass whatever ``k``, but ``B × P`` memory.

``"auto"`` uses ``jvp`` up to ``jvp_max_queries`` queries (see docs/benchmarks.md for
the measured cross-over) and ``grad`` beyond.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from .batching import Batch, SizedDataset, iter_batches
from .curvature import LossFn, load_forward_ad
from .params import ParamBlock, Params
from .progress import progress_bar

ScoringMethod = Literal["auto", "jvp", "grad"]


@dataclass(frozen=True)
class PerExample:
    """Per-example losses of ``model`` at ``params`` as a function of one block."""

    model: nn.Module
    loss_fn: LossFn
    params: Params
    block: ParamBlock

    def _loss_one(self, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(self.model, {**self.params, **self.block.unflatten(flat)}, (x[None],))
        return self.loss_fn(out, y[None])

    def losses(self, flat: torch.Tensor, batch: Batch) -> torch.Tensor:
        return vmap(self._loss_one, in_dims=(None, 0, 0))(flat, batch.x, batch.y)

    def gradients(self, batch: Batch) -> torch.Tensor:
        """``[B, P]``: the gradient of each example's loss."""
        theta = self.block.flatten(self.params)
        return vmap(grad(self._loss_one), in_dims=(None, 0, 0))(theta, batch.x, batch.y)

    def directional(
        self, batch: Batch, S: torch.Tensor, method: ScoringMethod = "auto", jvp_max_queries: int = 3
    ) -> torch.Tensor:
        """``[k, B]``: ``S[i]ᵀ ∇loss(example j)``."""
        if method == "auto":
            method = "jvp" if S.shape[0] <= jvp_max_queries else "grad"
        if method == "grad":
            return S @ self.gradients(batch).T
        if method != "jvp":
            raise ValueError(f"unknown scoring method {method!r}; use 'auto', 'jvp' or 'grad'")
        load_forward_ad()
        theta = self.block.flatten(self.params)
        along = lambda s: jvp(lambda f: self.losses(f, batch), (theta,), (s,))[1]  # noqa: E731
        return vmap(along)(S)


def loss_gradients(per_example: PerExample, data: SizedDataset, batch_size: int, mean: bool) -> torch.Tensor:
    """Gradients of the test losses ``[n_test, P]``, or ``[1, P]`` of their mean."""
    dtype, device = _dtype_device(per_example.params)
    rows = [per_example.gradients(b) for b in iter_batches(data, batch_size, dtype, device)]
    g = torch.cat(rows)
    if not torch.isfinite(g).all():
        bad = (~torch.isfinite(g).all(1)).nonzero().squeeze(1).tolist()
        raise FloatingPointError(
            f"test-loss gradients are NaN or inf for test points {bad[:10]}; check those inputs and the model"
        )
    return g.mean(0, keepdim=True) if mean else g


def score_dataset(
    per_example: PerExample,
    data: SizedDataset,
    S: torch.Tensor,
    batch_size: int = 256,
    method: ScoringMethod = "auto",
    jvp_max_queries: int = 3,
    start: int = 0,
    stop: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """``[k, n]``: ``S[i]ᵀ ∇loss(z_j)`` for every example ``z_j`` of ``data[start:stop]``,
    streamed in batches so memory does not grow with ``n``."""
    dtype, device = _dtype_device(per_example.params)
    S = S.to(dtype=dtype, device=device)
    stop = len(data) if stop is None else stop
    out = []
    bar = progress_bar(stop - start, "scoring", enabled=progress, unit="ex")
    for lo, b in zip(
        range(start, stop, batch_size), iter_batches(data, batch_size, dtype, device, start, stop), strict=True
    ):
        d = per_example.directional(b, S, method, jvp_max_queries).detach()
        if not torch.isfinite(d).all():
            bad = (~torch.isfinite(d).all(0)).nonzero().squeeze(1)
            raise FloatingPointError(
                f"scores are NaN or inf for examples {(bad + lo).tolist()[:10]}; "
                "check those inputs (NaN pixels?) and the model's parameters"
            )
        out.append(d)
        bar.update(len(b))
    bar.close()
    if not out:  # an empty range (e.g. a rank's share of fewer examples than ranks)
        return S.new_zeros(S.shape[0], 0)
    return torch.cat(out, dim=1)


def _dtype_device(params: Params) -> tuple[torch.dtype, torch.device]:
    t = next(iter(params.values()))
    return t.dtype, t.device
