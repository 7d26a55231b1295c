"""Hydra callback that collects a multirun's jobs into one summary table."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

COLUMNS = [
    "job",
    "overrides",
    "mode",
    "solver",
    "pretrain_damping",
    "finetune_damping",
    "hessian_samples",
    "finetune_iterations",
    "pretrain_iterations",
    "converged",
    "mean_abs_score",
    "seconds",
    "pearson",
    "spearman",
]


def row(job_dir: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    cfg, inf = metrics["config"], metrics["influence"]
    val = metrics.get("validation", {})
    overrides = job_dir / ".hydra" / "overrides.yaml"
    return {
        "job": job_dir.name,
        "overrides": " ".join(o.strip("- \n") for o in overrides.read_text().splitlines())
        if overrides.exists()
        else "",
        "mode": cfg["mode"],
        "solver": cfg["solver"]["name"],
        "pretrain_damping": cfg["pretrain"]["damping"],
        "finetune_damping": cfg["finetune"]["damping"],
        "hessian_samples": cfg["pretrain"]["hessian_samples"],
        "finetune_iterations": inf.get("finetune", {}).get("iterations"),
        "pretrain_iterations": inf.get("pretrain", {}).get("iterations"),
        "converged": all(inf.get(s, {}).get("converged", True) for s in ("finetune", "pretrain")),
        "mean_abs_score": inf["mean_abs_score"],
        "seconds": round(sum(inf["time"].values()), 3),
        "pearson": val.get("pearson"),
        "spearman": val.get("spearman"),
    }


def _job_order(path: Path) -> tuple:
    """Job folders are named by job number: 2 before 10 (other names after, by name)."""
    name = path.parent.name
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def summarise(sweep_dir: Path) -> list[dict[str, Any]]:
    """Rows of every finished job under ``sweep_dir``; written to ``summary.csv`` there."""
    rows = [row(p.parent, json.loads(p.read_text())) for p in sorted(sweep_dir.glob("*/metrics.json"), key=_job_order)]
    if rows:
        with open(sweep_dir / "summary.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    return rows


TABLE = [
    "job",
    "overrides",
    "converged",
    "finetune_iterations",
    "pretrain_iterations",
    "mean_abs_score",
    "seconds",
    "pearson",
]


def format_table(rows: list[dict[str, Any]], cols: list[str] = TABLE, max_width: int = 80) -> str:
    """A plain-text table of ``rows`` (missing values as ``-``, cells cut at ``max_width``)."""

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else "-" if v is None else str(v)[:max_width]

    text = [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in text)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(t, widths, strict=True)) for t in text]
    return "\n".join(lines)


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = summarise(sweep_dir)
        if rows:
            table = format_table(rows)
            print(f"sweep summary ({sweep_dir / 'summary.csv'}):\n{table}")
