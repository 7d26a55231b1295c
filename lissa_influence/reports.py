"""The diagnostics of an estimator's solves: merged across query chunks, timed."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["check_rows", "merged_reports", "timed"]


def check_rows(what: str, t: torch.Tensor, size: int) -> None:
    """Refuse a stack that is not ``[k, size]``.

    Args:
        what: the stack, in the error.
        t: the stack.
        size: the length of each row.
    """
    if t.dim() != 2 or t.shape[1] != size:
        raise ValueError(f"{what} must be [k, {size}] (one row per query), got shape {tuple(t.shape)}")


def merged_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The diagnostics of several chunks of queries as one.

    Each solve's products, iterations and seconds summed, converged only if every chunk
    did, the worst final residual; the timings summed; each chunk's own reports under ``"chunks"``.

    Args:
        reports: the chunks' diagnostics, in order.

    Returns:
        The merged diagnostics.
    """
    out = dict(reports[-1])
    for stage, last in reports[-1].items():
        if not (isinstance(last, dict) and "num_products" in last):
            continue
        infos = [r[stage] for r in reports if stage in r]
        merged = dict(last)
        for key in ("num_products", "iterations", "wall_time"):
            merged[key] = sum(i[key] for i in infos)
        merged["converged"] = all(i["converged"] for i in infos)
        finals = [i["final_residual"] for i in infos if i.get("final_residual") is not None]
        merged["final_residual"] = max(finals) if finals else None
        out[stage] = merged
    times: dict[str, float] = {}
    for r in reports:
        for key, seconds in r.get("time", {}).items():
            times[key] = times.get(key, 0.0) + seconds
    out["time"] = times
    out["chunks"] = [{k: v for k, v in r.items() if k not in ("damping", "chunks")} for r in reports]
    return out


@contextlib.contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Add the seconds the ``with`` block takes to ``timings[key]``.

    Args:
        timings: seconds by name.
        key: the name.
    """
    t0 = time.perf_counter()
    yield
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
