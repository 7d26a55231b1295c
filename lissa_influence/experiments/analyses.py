"""The paper's analyses (sections 4.3 and 4.4, appendix C Figures B and C), as presets of the main job.

``lissa-influence experiment=digits_task_similarity`` (and the other ``conf/experiment``
presets that set ``analysis.name``) runs :func:`run` instead of the main job. Each
analysis trains the models it needs with :func:`pipeline.train` (cached in
``cache_dir``, so one pretrained model serves every finetuning variant), scores every
pretraining example with :func:`pipeline.build_influence`, and writes its figures and
``analysis.json`` into the run directory.

- ``task_similarity`` (section 4.3, Figure B): one pretrained model, finetuned on the
  pretraining task again (``analysis.same_task_classes``) and on other classes
  (``analysis.other_task_classes``). The paper: mean |I| 0.055 (same) vs 0.025 (other).
- ``finetune_size`` (section 4.4, Figure C): model C finetuned on
  ``analysis.base_subsample`` examples, model D on ``factor`` times the examples with
  ``factor`` times the finetuning steps (C's examples are a subset of D's: both are
  prefixes of one seeded permutation). The paper: 0.22 (C) vs 0.15 (D).
- ``influential_examples``: the most helpful and harmful pretraining images of
  ``test_points`` test points, and a retraining check: removing the ``analysis.remove``
  most harmful examples should lower that test loss (the most helpful: raise it);
  measured change vs the linear prediction ``Σ −I(z)/m``.

The query of the distribution analyses (decided here, docs/analyses.md): the mean test
loss over the finetuning task's whole test set, one score per pretraining example, is
what the histograms show and what ``mean_abs`` reports. Per-test-point scores for the
first ``test_points`` points of the seeded permutation are computed too
(``mean_abs_per_point``: mean |I| over points and examples; by linearity their row mean
is the score of the mean loss over those points).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.nn import functional as nnf

from ..progress import progress_bar
from . import config, pipeline, plots
from .models import embedding_state
from .retraining import retrain_settings
from .training import finetune, leave_out, pretrain

log = logging.getLogger(__name__)

ANALYSES = ("task_similarity", "finetune_size", "influential_examples")
HIST_CLIP = 0.01  # the histograms' x-axis spans the central 98% of the pooled scores (heavy tails)

# The paper's mean absolute influence (appendix C): Figure B (CIFAR-10, embedding fixed)
# and Figure C (MNIST, embedding updated).
PAPER = {
    "task_similarity": {"same_task": 0.055, "other_task": 0.025},
    "finetune_size": {"C": 0.22, "D": 0.15},
}


def variant(cfg: Any, changes: dict[str, Any]) -> Any:
    """A copy of ``cfg`` with dotted keys replaced (``{"data.finetune_subsample": 280}``)."""
    out = copy.deepcopy(cfg)
    for key, value in changes.items():
        OmegaConf.update(out, key, value, merge=False)
    return out


def stats(scores: torch.Tensor) -> dict[str, float]:
    a = scores.double().flatten()
    return {
        "mean_abs": float(a.abs().mean()),
        "median_abs": float(a.abs().median()),
        "std": float(a.std()),
        "min": float(a.min()),
        "max": float(a.max()),
        "fraction_harmful": float((a > 0).double().mean()),
    }


def _test_metrics(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    ref = next(model.parameters())
    with torch.no_grad():
        logits = model(x.to(ref))
        return {
            "test_loss": float(nnf.cross_entropy(logits, y.to(ref.device))),
            "test_accuracy": float((logits.argmax(1).cpu() == y).double().mean()),
        }


def score_setting(cfg: Any, label: str, out: Path) -> tuple[dict[str, Any], torch.Tensor]:
    """Train (or load) the models of ``cfg`` and score every pretraining example for the
    mean test loss of the whole finetuning test set (row 0) and for each of the first
    ``test_points`` test points (rows 1..). Saves the rows as ``scores_<label>.npy``."""
    data, pretrained, finetuned, info = pipeline.train(cfg)
    x_all, y_all = data.finetune_test.tensors
    idx = pipeline.test_indices(len(y_all), cfg.test_points, cfg.seed)
    msi = pipeline.build_influence(cfg, pretrained, finetuned, data)
    s_mean = msi.query_vectors((x_all, y_all), mean=True)
    diag_mean = dict(msi.diagnostics)
    s_each = msi.query_vectors((x_all[idx], y_all[idx]))
    diag_each = dict(msi.diagnostics)
    scores = msi.scores_from(torch.cat([s_mean, s_each]))
    np.save(out / f"scores_{label}.npy", scores.double().cpu().numpy())
    summary = {
        "pretrain_classes": list(data.pretrain_classes),
        "finetune_classes": list(data.finetune_classes),
        "num_pretrain": len(data.pretrain_train),
        "num_finetune": len(data.finetune_train),
        "num_finetune_test": len(y_all),
        "finetune_steps": cfg.finetune.train.steps,
        "training": {
            "pretrain": vars(info.pretrain_report),
            "finetune": vars(info.finetune_report),
            "pretrain_cached": info.pretrain_cached,
            "finetune_cached": info.finetune_cached,
        },
        **_test_metrics(finetuned, x_all, y_all),
        "mean_query": stats(scores[0]),
        "mean_abs": float(scores[0].abs().mean()),
        "test_indices": idx.tolist(),
        "mean_abs_per_point": float(scores[1:].abs().mean()),
        "per_point_mean_abs": scores[1:].abs().mean(1).tolist(),
        "median_per_point_mean_abs": float(
            np.median(scores[1:].abs().mean(1).double().cpu().numpy())
        ),  # robust to one hard point
        "solver": {"mean_query": diag_mean, "per_point": diag_each},
    }
    return summary, scores


def _class_label(classes: list[int]) -> str:
    return "classes " + ", ".join(str(c) for c in classes)


def plot_distributions(out: Path, scores: dict[str, np.ndarray], title: str) -> None:
    """``scores``: display name -> ``scores_<label>.npy`` rows (row 0: the mean query, the
    rest: per test point). Writes ``distributions.png`` and ``distributions_per_point.png``."""
    points = {name: rows[1:].ravel() for name, rows in scores.items()}
    n_points = len(next(iter(scores.values()))) - 1
    plots.histograms(
        out / "distributions.png",
        {name: rows[0] for name, rows in scores.items()},
        "influence I(z) on the mean test loss",
        title,
        clip=HIST_CLIP,
    )
    plots.histograms(
        out / "distributions_per_point.png",
        points,
        f"influence I(z) on each of {n_points} test points",
        title + " (per test point)",
        clip=HIST_CLIP,
        ylabel="(test point, pretraining example) pairs",
    )


def _distributions(cfg: Any, out: Path, settings: dict[str, Any], title: str, names: dict[str, str]) -> dict[str, Any]:
    """Score each named variant of ``cfg``; overlaid histograms of the mean-query scores
    and of the pooled per-point scores."""
    results, rows = {}, {}
    for label, variant_cfg in settings.items():
        log.info("%s: training and scoring", label)
        results[label], scores = score_setting(variant_cfg, label, out)
        rows[names[label]] = scores.double().cpu().numpy()
    plot_distributions(out, rows, title)
    for label in settings:
        results[label]["display_name"] = names[label]
    return results


def task_similarity(cfg: Any, out: Path) -> dict[str, Any]:
    a = cfg.analysis
    same = list(a.same_task_classes) if a.same_task_classes is not None else list(cfg.data.pretrain_classes)
    if a.other_task_classes is None:
        raise ValueError(
            "analysis=task_similarity needs analysis.other_task_classes (the finetuning task on other classes)"
        )
    other = list(a.other_task_classes)
    settings = {
        "same_task": variant(cfg, {"data.finetune_classes": same}),
        "other_task": variant(cfg, {"data.finetune_classes": other}),
    }
    names = {"same_task": f"same task ({_class_label(same)})", "other_task": f"other task ({_class_label(other)})"}
    results = _distributions(
        cfg, out, settings, f"{cfg.data.name}: finetuning-task similarity, embedding {cfg.mode}", names
    )
    return {
        "settings": results,
        "ratio_mean_abs": results["same_task"]["mean_abs"] / results["other_task"]["mean_abs"],
        "ratio_mean_abs_per_point": results["same_task"]["mean_abs_per_point"]
        / results["other_task"]["mean_abs_per_point"],
        "paper": {
            **PAPER["task_similarity"],
            "ratio": PAPER["task_similarity"]["same_task"] / PAPER["task_similarity"]["other_task"],
        },
    }


def finetune_size(cfg: Any, out: Path) -> dict[str, Any]:
    a = cfg.analysis
    base = a.base_subsample if a.base_subsample is not None else cfg.data.finetune_subsample
    if base is None:
        raise ValueError(
            "analysis=finetune_size needs analysis.base_subsample (or data.finetune_subsample): model C's finetuning "
            "examples"
        )
    if a.factor < 2:
        raise ValueError(f"analysis.factor={a.factor} must be >= 2 (model D has factor x model C's examples and steps)")
    steps = cfg.finetune.train.steps
    settings = {
        "C": variant(cfg, {"data.finetune_subsample": base}),
        "D": variant(cfg, {"data.finetune_subsample": base * a.factor, "finetune.train.steps": steps * a.factor}),
    }
    names = {
        "C": f"model C ({base} examples, {steps} steps)",
        "D": f"model D ({base * a.factor} examples, {steps * a.factor} steps)",
    }
    results = _distributions(cfg, out, settings, f"{cfg.data.name}: finetuning-set size, embedding {cfg.mode}", names)
    if results["D"]["num_finetune"] != base * a.factor:
        raise ValueError(
            f"model D needs {base * a.factor} finetuning examples but the task has only "
            f"{results['D']['num_finetune']}; lower analysis.base_subsample"
        )
    return {
        "settings": results,
        "ratio_mean_abs": results["C"]["mean_abs"] / results["D"]["mean_abs"],
        "ratio_mean_abs_per_point": results["C"]["mean_abs_per_point"] / results["D"]["mean_abs_per_point"],
        "paper": {**PAPER["finetune_size"], "ratio": PAPER["finetune_size"]["C"] / PAPER["finetune_size"]["D"]},
    }


def influential_examples(cfg: Any, out: Path) -> dict[str, Any]:
    data, pretrained, finetuned, info = pipeline.train(cfg)
    m = len(data.pretrain_train)
    k = cfg.analysis.remove
    if not 1 <= k < m:
        raise ValueError(f"analysis.remove={k} must be in 1..{m - 1}")
    idx = pipeline.test_indices(len(data.finetune_test), cfg.test_points, cfg.seed)
    x, y = (t[idx] for t in data.finetune_test.tensors)
    msi = pipeline.build_influence(cfg, pretrained, finetuned, data)
    scores = msi.scores_from(msi.query_vectors((x, y)))
    np.save(out / "scores.npy", scores.double().cpu().numpy())
    top = pipeline.top_examples(scores, cfg.top_k)
    plots.top_examples_grid(out / "top_examples.png", x, y, data, top, data.finetune_classes, data.pretrain_classes)

    pre_cfg, ft_cfg = retrain_settings(cfg)
    dtype = next(pretrained.parameters()).dtype

    def point_losses(removed: list[int] | None) -> np.ndarray:
        """Per-test-point losses after retraining both stages without ``removed``."""
        weights = None if removed is None else leave_out(m, removed, dtype=dtype)
        pre, _ = pretrain(pretrained, data, pre_cfg, weights=weights, progress=cfg.progress)
        ft, _ = finetune(finetuned, data, ft_cfg, cfg.mode, cfg.alpha, embedding_state(pre), progress=cfg.progress)
        ref = next(ft.parameters())
        with torch.no_grad():
            return nnf.cross_entropy(ft(x.to(ref)), y.to(ref.device), reduction="none").double().cpu().numpy()

    with torch.no_grad():
        ref = next(finetuned.parameters())
        trained_losses = (
            nnf.cross_entropy(finetuned(x.to(ref)), y.to(ref.device), reduction="none").double().cpu().numpy()
        )
    control = point_losses(None)
    points = []
    bar = progress_bar(2 * len(idx), "remove top examples", enabled=cfg.progress)
    for t in range(len(idx)):
        order = torch.argsort(scores[t])
        row: dict[str, Any] = {
            "test_index": int(idx[t]),
            "label": int(data.finetune_classes[int(y[t])]),
            "trained_loss": float(trained_losses[t]),
            "control_loss": float(control[t]),
        }
        for kind, top_k in (("harmful", order.flip(0)[:k]), ("helpful", order[:k])):
            chosen = top_k.tolist()
            retrained = float(point_losses(chosen)[t])
            row[kind] = {
                "removed": chosen,
                "scores": scores[t, chosen].tolist(),
                "retrained_loss": retrained,
                "actual_change": retrained - float(control[t]),
                "predicted_change": float(-scores[t, chosen].sum() / m),
            }
            bar.update()
        points.append(row)
    bar.close()
    plots.removal_bars(out / "removal.png", points, k)
    return {
        "num_pretrain": m,
        "removed_per_check": k,
        "retrain": {"pretrain": vars(pre_cfg), "finetune": vars(ft_cfg)},
        "training": {"pretrain": vars(info.pretrain_report), "finetune": vars(info.finetune_report)},
        "solver": dict(msi.diagnostics),
        "top_examples": top,
        "points": points,
        "harmful_removal_lowers_loss": [p["harmful"]["actual_change"] < 0 for p in points],
        "helpful_removal_raises_loss": [p["helpful"]["actual_change"] > 0 for p in points],
    }


RUNNERS: dict[str, Callable[[Any, Path], dict[str, Any]]] = {
    "task_similarity": task_similarity,
    "finetune_size": finetune_size,
    "influential_examples": influential_examples,
}


def run(cfg: Any, out_dir: str | Path) -> dict[str, Any]:
    """Run ``cfg.analysis.name``; writes its figures and ``analysis.json`` into ``out_dir``."""
    config.check(cfg)
    name = cfg.analysis.name
    if name not in RUNNERS:
        raise ValueError(f"analysis.name={name!r} is not one of {('none', 'lds', 'single_lds') + ANALYSES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    result = {"analysis": name, **RUNNERS[name](cfg, out)}
    result["config"] = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
    result["versions"] = pipeline.versions()
    (out / "analysis.json").write_text(json.dumps(result, indent=2, default=str))
    print(summary(result))
    return result


def summary(r: dict[str, Any]) -> str:
    name = r["analysis"]
    if name in PAPER:
        lines = [f"{name}: mean |I| (mean test loss of each task's test set; per test point in brackets)"]
        for label, s in r["settings"].items():
            paper = PAPER[name].get(label)
            lines.append(
                f"  {label}: {s['mean_abs']:.4g} [{s['mean_abs_per_point']:.4g}]  "
                f"(finetune classes {s['finetune_classes']}, {s['num_finetune']} examples, "
                f"{s['finetune_steps']} steps; test loss {s['test_loss']:.3g}; paper {paper})"
            )
        lines.append(
            f"  ratio {r['ratio_mean_abs']:.3g} [{r['ratio_mean_abs_per_point']:.3g}], paper {r['paper']['ratio']:.3g}"
        )
        return "\n".join(lines)
    lines = [f"influential_examples: removing the top {r['removed_per_check']} examples and retraining"]
    for p in r["points"]:
        h, g = p["harmful"], p["helpful"]
        lines.append(
            f"  test point {p['test_index']} (label {p['label']}, loss {p['control_loss']:.4g}): "
            f"harmful removed {h['actual_change']:+.4g} (predicted {h['predicted_change']:+.4g}), "
            f"helpful removed {g['actual_change']:+.4g} (predicted {g['predicted_change']:+.4g})"
        )
    return "\n".join(lines)
