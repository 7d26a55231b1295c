"""The examples in the library's docstrings run as written (the modules whose examples are cheap)."""

import doctest
import importlib

import pytest

MODULES = ["lissa_influence.task", "lissa_influence.operators", "lissa_influence.params"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result
