"""The library's errors and warnings retold in config keys.

The library speaks its own keywords (``pretrain_damping=``, ``gauss_newton=True``,
``max_iter``); a user of the Hydra app sets config keys (``pretrain.damping=``,
``gauss_newton=true``, ``solver.max_iter``). :func:`in_config_terms` rewrites a
message, and :func:`config_terms` does it for every solver error raised and every
library warning emitted inside it.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..solvers import SolverError, SolverWarning
from ..solvers.base import reworded

# library term -> config key, in one regex pass; a term already preceded by a dot or a
# word character ("solver.tol=", "polish_tol=") is left alone, so retelling is idempotent
_TERMS = [
    (r"pretrain_damping=", "pretrain.damping="),
    (r"finetune_damping=", "finetune.damping="),
    (r"gauss_newton=True\b", "gauss_newton=true"),
    (r"preconditioner='jacobi'", "solver.preconditioner=jacobi"),
    (r"head_only=True\b", "head_only=true"),
    (r"exact_finetune=True\b", "exact_finetune=true"),
    (r"max_iter\b", "solver.max_iter"),
    (r"max_params=", "solver.max_params="),
    (r"tol=", "solver.tol="),
    (r"(?<=\braise )depth\b", "solver.depth"),
    (r"scale='auto'", "solver.scale=auto"),
    (r"(?<=\buse )scale\b|(?<=\blower )scale\b", "solver.scale"),
    (r"(?<=\bwith )scale=", "solver.scale="),
    (r"batch_size=", "solver.batch_size="),
    (r"(?<=\bRaise )batch_size\b|(?<=\bor )batch_size\b", "solver.batch_size"),
    (r"(?<=\(or )repeats\b", "solver.repeats"),
    (r"(?<=\braise )safety\b", "solver.safety"),
    (r"mode='fixed'", "mode=fixed"),
    (r"mode='updated'", "mode=updated"),
    (r"hessian_samples='all'", "{stage}hessian_samples=all"),
    (r"hessian_samples=", "{stage}hessian_samples="),
]
_PATTERN = re.compile("|".join(f"(?P<t{i}>(?<![.\\w]){p})" for i, (p, _) in enumerate(_TERMS)))
_STAGE = re.compile(r"\b(pretrain|finetun)(?:ing|e)\b")
_PACKAGE = str(Path(__file__).resolve().parents[1])


def in_config_terms(message: str) -> str:
    """``message`` with the library's keywords replaced by the app's config keys."""
    found = _STAGE.search(message)  # "hessian_samples=1000 exceeds the 576 pretraining examples"
    stage = {"pretrain": "pretrain.", "finetun": "finetune."}[found.group(1)] if found else ""

    def replace(m: re.Match[str]) -> str:
        assert m.lastgroup is not None
        return _TERMS[int(m.lastgroup[1:])][1].format(stage=stage)

    return _PATTERN.sub(replace, message)


@contextlib.contextmanager
def config_terms() -> Iterator[None]:
    """Inside: a solver error is re-raised in config keys (chained to the original), and a
    warning of the library (a ``SolverWarning``, or one attributed to a file of this
    package) is shown in config keys when it is shown, not later."""
    original = warnings.showwarning

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: Any = None,
        line: str | None = None,
    ) -> None:
        if issubclass(category, SolverWarning) or str(Path(filename).resolve()).startswith(_PACKAGE):
            message = category(in_config_terms(str(message)))
        original(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    except SolverError as e:
        raise reworded(e, in_config_terms(str(e))) from e
    finally:
        warnings.showwarning = original
