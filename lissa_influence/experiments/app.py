"""Hydra entry points: ``lissa-influence`` (the main job), ``lissa-influence-validate`` and
``lissa-influence-accuracy`` (solver accuracy against the explicit solve)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from . import config, errors, pipeline

config.register()


def _config_path() -> str:
    # A source checkout (or editable install) reads the repository's conf/; an installed
    # wheel carries the same files as the package lissa_influence.experiments.conf.
    repo_conf = Path(__file__).resolve().parents[2] / "conf"
    return str(repo_conf) if (repo_conf / "config.yaml").is_file() else "pkg://lissa_influence.experiments.conf"


@hydra.main(version_base="1.3", config_path=_config_path(), config_name="config")
def _main(cfg: DictConfig) -> float | None:
    with errors.config_terms():  # the library's messages in this app's config keys
        if cfg.analysis.name == "lds":  # the linear datamodeling score (docs/validation.md)
            from . import lds

            lds.run(cfg, HydraConfig.get().runtime.output_dir)
            return None
        if cfg.analysis.name == "single_lds":  # dattri's MNIST-10 benchmark, single stage (docs/benchmarks.md)
            from . import single_lds

            single_lds.run(cfg, HydraConfig.get().runtime.output_dir)
            return None
        if cfg.analysis.name == "gpt2":  # the worked Hugging Face example (docs/usage.md; the hf extra)
            from . import gpt2

            gpt2.run(cfg, HydraConfig.get().runtime.output_dir)
            return None
        if cfg.analysis.name != "none":  # the paper's analyses (docs/analyses.md)
            from . import analyses

            analyses.run(cfg, HydraConfig.get().runtime.output_dir)
            return None
        metrics = pipeline.run(cfg, HydraConfig.get().runtime.output_dir)
    return metrics["influence"]["mean_abs_score"]


@hydra.main(version_base="1.3", config_path=_config_path(), config_name="accuracy")
def _accuracy(cfg: DictConfig) -> float | None:
    from . import accuracy

    hc = HydraConfig.get()
    overrides = [o for o in hc.overrides.task if not o.startswith("hydra")]
    with errors.config_terms():
        row = accuracy.run(cfg, hc.runtime.output_dir, overrides)["row"]
    return row.get("query_error")


def _quiet_other_ranks() -> None:
    """Under torchrun only rank 0 keeps Hydra's ``.hydra/`` files and logs (every rank runs
    the job; only rank 0 writes outputs, see docs/scaling.md)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or int(os.environ.get("RANK", "0")) == 0:
        return
    args = sys.argv[1:]
    extra = [
        o
        for o in ("hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled")
        if not any(a.startswith(o.split("=")[0] + "=") for a in args)
    ]
    at = next((i for i, a in enumerate(args) if "=" in a and not a.startswith("-")), len(args))
    sys.argv[1 + at : 1 + at] = extra


def main() -> None:
    _quiet_other_ranks()
    _main()


def accuracy_main() -> None:
    """``lissa-influence-accuracy``: one solver configuration against the explicit solve
    (lissa_influence/experiments/accuracy.py; conf/accuracy.yaml)."""
    _accuracy()


def validate_main() -> None:
    """The main job with leave-one-out validation switched on."""
    # Inserted just before the user's first override: Hydra's parser takes the overrides as
    # one run of positional arguments (``-m a=1,2`` must not become ``v=true -m a=1,2``),
    # and an explicit ``validate.enabled=false`` later on the line still wins.
    args = sys.argv[1:]
    at = next((i for i, a in enumerate(args) if "=" in a and not a.startswith("-")), len(args))
    sys.argv.insert(1 + at, "validate.enabled=true")
    _quiet_other_ranks()
    _main()
