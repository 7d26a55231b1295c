"""Shared helpers of the benchmark scripts: thread setup, interleaved timing, output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/bench_X.py` without installing
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def setup_threads(threads: int) -> dict[str, Any]:
    """Pin torch's intra-op threads. On a shared machine more threads than free cores
    makes every product many times slower, so scripts take ``--threads`` and report it."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (e.g. imported twice)
        pass
    return {
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, dict[str, float]]:
    """Time each function ``repeats`` times in round-robin order (so background load hits
    all of them alike) after ``warmup`` untimed calls; median and min in seconds."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: {"median": statistics.median(v), "min": min(v), "all": v} for k, v in times.items()}


def table(headers: list[str], rows: list[list[Any]], title: str | None = None) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    if title:
        lines.append(title)
    lines.append("  ".join(c.rjust(w) for c, w in zip(cells[0], widths, strict=True)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells[1:]]
    return "\n".join(lines)


def markdown(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _fmt(c: Any) -> str:
    if isinstance(c, float):
        if c == 0:
            return "0"
        if abs(c) >= 100:
            return f"{c:.0f}"
        if abs(c) >= 0.01:
            return f"{c:.3g}" if abs(c) < 10 else f"{c:.1f}"
        return f"{c:.2e}"
    return "-" if c is None else str(c)


def write_json(out: str | None, name: str, payload: dict) -> Path | None:
    if not out:
        return None
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    target = path / name
    target.write_text(json.dumps(payload, indent=2, default=_json_default))
    return target


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, torch.dtype):
        return str(o)
    return str(o)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, outdir, name: str) -> str:
    """Lay out, write ``outdir/name`` (created if missing) as a PNG, close ``fig``; the path."""
    from pathlib import Path

    path = Path(outdir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return str(path)


def finish(res: dict, out: str | None, name: str, draw: Callable[[], Any]) -> dict:
    """End of a benchmark script: with ``out``, draw the figures (``draw()`` returns their
    path or paths) and write ``res`` as ``out/name``; print the total time."""
    if out:
        figures = draw()
        res["plots"] = [figures] if isinstance(figures, str) else list(figures)
        print(f"\nwrote {write_json(out, name, res)} and {', '.join(res['plots'])}")
    print(f"total {res['total_seconds']:.0f}s")
    return res
