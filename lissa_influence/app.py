"""Hydra entry points: ``lissa-influence`` (the main job) and ``lissa-influence-validate``."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from . import config, pipeline

config.register()


def _config_path() -> str:
    # A source checkout (or editable install) reads the repository's conf/; an installed
    # wheel carries the same files as the package lissa_influence.conf.
    repo_conf = Path(__file__).resolve().parent.parent / "conf"
    return str(repo_conf) if (repo_conf / "config.yaml").is_file() else "pkg://lissa_influence.conf"


@hydra.main(version_base="1.3", config_path=_config_path(), config_name="config")
def _main(cfg: DictConfig) -> float:
    metrics = pipeline.run(cfg, HydraConfig.get().runtime.output_dir)
    return metrics["influence"]["mean_abs_score"]


def main() -> None:
    _main()


def validate_main() -> None:
    """The main job with leave-one-out validation switched on."""
    sys.argv.insert(1, "validate.enabled=true")
    _main()
