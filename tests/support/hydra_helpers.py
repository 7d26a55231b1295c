"""Shared by the tests that compose the Hydra configs of conf/."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

from lissa_influence.experiments import config

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def compose_cfg(*overrides: str):
    config.register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path} is not a PNG"


# The main job on the embedded digits with tiny settings (the app tests, and a library test of
# the deflation subspaces the app saves).
TINY = [
    "pretrain.train.steps=20",
    "pretrain.train.polish_iters=0",
    "finetune.train.steps=20",
    "finetune.train.polish_iters=0",
    "test_points=2",
    "pretrain.hessian_samples=64",
    "finetune.hessian_samples=64",
    "solver.max_iter=20",
    "threads=1",
    "progress=false",
]
