"""PNG figures: example grids, leave-one-out scatter plots, score histograms."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on the machines this runs on
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def _image(x: torch.Tensor) -> np.ndarray:
    a = x.detach().float().cpu()
    a = (a - a.min()) / (a.max() - a.min()).clamp_min(1e-12)
    return a[0].numpy() if a.shape[0] == 1 else a.permute(1, 2, 0).numpy()


def top_examples_grid(
    path: Path,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    data,
    top: list[dict],
    ft_classes: Sequence[int],
    pre_classes: Sequence[int],
) -> None:
    """One row per test point: the test image, then its most helpful and most harmful
    pretraining examples with their scores ``I(z)``."""
    k = len(top[0]["helpful"])
    rows, cols = len(top), 1 + 2 * k
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.5 * rows), squeeze=False)
    x_pre, y_pre = data.pretrain_train.tensors
    for r, t in enumerate(top):
        axes[r, 0].imshow(_image(x_test[r]), cmap="gray")
        axes[r, 0].set_title(f"test: {ft_classes[int(y_test[r])]}", fontsize=7)
        for c, (i, s) in enumerate(
            zip(t["helpful"] + t["harmful"], t["helpful_scores"] + t["harmful_scores"], strict=True)
        ):
            ax = axes[r, 1 + c]
            ax.imshow(_image(x_pre[i]), cmap="gray")
            kind = "helps" if c < k else "harms"
            ax.set_title(
                f"{kind} {pre_classes[int(y_pre[i])]}\n{s:.3g}", fontsize=6, color="tab:green" if c < k else "tab:red"
            )
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("most helpful (green, I<0) and most harmful (red, I>0) pretraining examples", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def loo_scatter(
    path: Path,
    predicted: np.ndarray,
    actual: np.ndarray,
    stats_text: str,
    title: str,
    errors: np.ndarray | None = None,
) -> None:
    """Leave-one-out (the paper's Figure A): true test-loss change on removal vs the predicted
    ``−I(z)/m``; ``errors``: the standard error of each actual change over retraining seeds."""
    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    if errors is not None:
        ax.errorbar(predicted, actual, yerr=errors, fmt="none", ecolor="0.6", lw=0.8)
    ax.scatter(predicted, actual, s=14, alpha=0.8)
    lo, hi = float(min(predicted.min(), actual.min())), float(max(predicted.max(), actual.max()))
    ax.plot([lo, hi], [lo, hi], color="gray", lw=0.8, ls="--")
    ax.set_xlabel("predicted loss change  −I(z)/m")
    ax.set_ylabel("actual loss change (leave one out)")
    ax.set_title(f"{title}\n{stats_text}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def histograms(
    path: Path,
    series: dict[str, np.ndarray],
    xlabel: str,
    title: str,
    clip: float | None = None,
    ylabel: str = "pretraining examples",
) -> None:
    """Overlaid histograms of score distributions (the paper's Figures B and C).

    ``clip``: show only the central ``1 - 2 clip`` of the pooled values (heavy tails
    otherwise squeeze every bar into one bin); the legend counts what lies outside.
    The mean |I| in the legend is always over all values.
    """
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    pooled = np.concatenate([np.ravel(v) for v in series.values()])
    lo, hi = np.quantile(pooled, [clip, 1 - clip]) if clip else (pooled.min(), pooled.max())
    # One set of bin edges for every series, so the bars compare; one filled outline per
    # series (not a patch per bin: far faster to draw).
    edges = np.linspace(lo, hi, 61) if hi > lo else 60
    for name, values in series.items():
        values = np.ravel(values)
        label = f"{name}\nmean |I| = {np.abs(values).mean():.3g}"
        outside = int(((values < lo) | (values > hi)).sum()) if clip else 0
        if outside:
            label += f" ({outside} of {values.size} outside the axis)"
        ax.hist(values[(values >= lo) & (values <= hi)], bins=edges, alpha=0.5, histtype="stepfilled", label=label)  # type: ignore[arg-type]  # an array of edges is fine
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def removal_bars(path: Path, points: list[dict], k: int) -> None:
    """Per test point (one panel each, own scale): the measured test-loss change after
    removing the ``k`` most harmful and the ``k`` most helpful pretraining examples and
    retraining, beside the linear prediction ``Σ −I(z)/m`` (harmful removal should lower
    the loss, helpful raise it)."""
    fig, axes = plt.subplots(1, len(points), figsize=(2.4 * len(points) + 0.6, 3.2), squeeze=False)
    bars = [
        ("harmful", "predicted_change", "harmful\npredicted", "tab:red", 0.4),
        ("harmful", "actual_change", "harmful\nmeasured", "tab:red", 0.95),
        ("helpful", "predicted_change", "helpful\npredicted", "tab:green", 0.4),
        ("helpful", "actual_change", "helpful\nmeasured", "tab:green", 0.95),
    ]
    for ax, p in zip(axes[0], points, strict=True):
        for j, (kind, key, _, color, alpha) in enumerate(bars):
            ax.bar(j, p[kind][key], 0.8, color=color, alpha=alpha)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xticks(range(len(bars)))
        ax.set_xticklabels([b[2] for b in bars], fontsize=6)
        ax.tick_params(axis="y", labelsize=6)
        ax.set_title(f"test point {p['test_index']} (label {p['label']})\nloss {p['control_loss']:.3g}", fontsize=7)
    axes[0, 0].set_ylabel("test-loss change after retraining", fontsize=7)
    fig.suptitle(
        f"removing the top {k} harmful / helpful pretraining examples (light: predicted Σ −I(z)/m)", fontsize=8
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def error_vs_hvps(path: Path, payloads: list[dict]) -> None:
    """Solver accuracy (lissa_influence.experiments.accuracy): relative error against the explicit solve
    versus Hessian-vector products per right-hand side, one line per job (its per-iteration
    trace, or its final point), for the finetune solve, the pretrain solve and the final
    query vectors; and the Spearman correlation of the scores versus total products.
    Identity (no products) is a dashed horizontal line."""
    panels = [
        ("finetune", "finetune_error", "finetune_hvps", "finetune solve"),
        ("pretrain", "pretrain_error", "pretrain_hvps", "pretrain solve (same right-hand side)"),
        ("query", "query_error", "hvps", "final query vectors s (end to end)"),
    ]
    fig, grid = plt.subplots(2, 2, figsize=(12, 9.5))
    axes = grid.ravel()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    with_points: set[int] = set()
    for j, p in enumerate(payloads):
        row, curves = p["row"], p.get("curves", {})
        color, style = colors[j % len(colors)], styles[(j // len(colors)) % len(styles)]
        # "solver=cg solver.tol=1e-06" -> "cg tol=1e-06": the legend holds many jobs
        label = " ".join(t.removeprefix("solver=").removeprefix("solver.") for t in row["label"].split())
        label += "" if row.get("status", "ok") == "ok" else " (failed)"
        for panel, (ax, (curve, err_key, hvp_key, _)) in enumerate(zip(axes, panels, strict=False)):  # 4 axes, 3 panels
            err, hvps = row.get(err_key), row.get(hvp_key)
            if err is None:
                continue
            if not hvps:  # identity: no products
                ax.axhline(max(err, 1e-16), color=color, ls="--", lw=1)
                continue
            pts = np.asarray(curves.get(curve) or [[hvps, err]], dtype=float)
            pts = pts[pts[:, 0] > 0]
            if len(pts):
                with_points.add(panel)
            ax.plot(
                pts[:, 0],
                np.maximum(pts[:, 1], 1e-16),
                ls=style,
                color=color,
                lw=1.2,
                marker="o" if len(pts) == 1 else None,
                ms=4,
            )
        if row.get("spearman") is not None:
            if row.get("hvps"):
                axes[3].plot([row["hvps"]], [row["spearman"]], "o", color=color, ms=5)
                with_points.add(3)
            else:
                axes[3].axhline(row["spearman"], color=color, ls="--", lw=1)
        axes[3].plot([], [], ls=style, color=color, label=label)  # one legend entry per job
    for ax, (_, _, _, title) in zip(axes, panels, strict=False):
        ax.set(xlabel="Hessian-vector products per right-hand side", ylabel="relative error vs explicit", title=title)
    axes[3].set(
        xlabel="Hessian-vector products per right-hand side, both solves",
        ylabel="Spearman of the scores vs explicit",
        title="score ranking",
    )
    for i, ax in enumerate(axes):
        if i in with_points:  # log axes need positive data; a failed solve leaves its panel empty
            ax.set_xscale("log")
            if i < 3:
                ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "no solve with products finished", ha="center", va="center", transform=ax.transAxes)
        ax.grid(True, which="both", alpha=0.3)
    longest = max(len(t) for t in axes[3].get_legend_handles_labels()[1])
    ncol = max(1, min(3, len(payloads), 150 // max(longest, 1)))
    fig.legend(*axes[3].get_legend_handles_labels(), loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, min(0.4, 0.018 * math.ceil(len(payloads) / ncol) + 0.01), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def calibration_curves(path: Path, curves: dict[str, dict], title: str) -> None:
    """Agreement with retraining against damping (log scale), one line per calibrated stage,
    the chosen damping marked."""
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    for stage, c in curves.items():
        grid, agreement = np.asarray(c["grid"], dtype=float), np.asarray(c["agreement"], dtype=float)
        (line,) = ax.semilogx(grid, agreement, "o-", label=f"{stage} (chosen {c['chosen']:.3g})")
        ax.axvline(c["chosen"], color=line.get_color(), ls=":", lw=0.8)
        failed = ~np.isfinite(agreement)  # the solve failed there (e.g. negative curvature): no agreement
        if failed.any():
            ax.plot(
                grid[failed],
                np.full(failed.sum(), -0.05),
                "x",
                color=line.get_color(),
                ms=7,
                label=f"{stage}: solve failed",
            )
    metric = next(iter(curves.values()))["metric"]
    ax.set_xlabel("damping")
    ax.set_ylabel(f"agreement with retraining ({metric})")
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def interval_bar(ax, row: int, value: float, interval: dict | None, color: str, alpha: float, label: str) -> None:
    """One horizontal bar of an LDS figure with its bootstrap interval and ``label`` beside it.
    A percentile interval need not contain the estimate: the error bar is clipped there."""
    err = None if interval is None else [[max(0.0, value - interval["low"])], [max(0.0, interval["high"] - value)]]
    ax.barh(row, value, color=color, alpha=alpha, xerr=err, ecolor="k", capsize=3)
    ax.text(max(value, 0) + 0.02, row + 0.25, label, fontsize=8)
