"""Fixtures shared by the tests, and the helper modules of tests/support/ on the import path.

The tests mirror the package: tests/lib/ holds one file per library module, tests/app/ the
tests of lissa_influence.experiments, tests/e2e/ the long end-to-end model runs, and
tests/support/ the dense references, fixtures and workers they share. Test files import
the helpers by module name (``from conftest import TinyCNN``, ``import dense``,
``import twostage``, ``import hydra_helpers``), from any of those folders.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

SUPPORT = Path(__file__).resolve().parent / "support"
if str(SUPPORT) not in sys.path:
    sys.path.insert(0, str(SUPPORT))

from helpers import TinyCNN, TinyMLP, dense_hessian, make_data, rel, train_full_batch  # noqa: E402

__all__ = ["SUPPORT", "TinyCNN", "TinyMLP", "dense_hessian", "make_data", "rel", "train_full_batch"]


@pytest.fixture
def cnn64():
    torch.manual_seed(0)
    return TinyCNN().double()


@pytest.fixture
def mlp64():
    torch.manual_seed(1)
    return TinyMLP().double()
