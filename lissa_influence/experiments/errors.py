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
from typing import Iterator

from ..solvers import SolverError

# library term -> config key, in one regex pass (a replacement is never replaced again)
_TERMS = [
    (r"\bpretrain_damping=", "pretrain.damping="),
    (r"\bfinetune_damping=", "finetune.damping="),
    (r"\bgauss_newton=True\b", "gauss_newton=true"),
    (r"\bpreconditioner='jacobi'", "solver.preconditioner=jacobi"),
    (r"\bmax_iter\b", "solver.max_iter"),
    (r"\bmax_params=", "solver.max_params="),
    (r"\btol=", "solver.tol="),
    (r"(?<=\braise )depth\b", "solver.depth"),
    (r"\bscale='auto'", "solver.scale=auto"),
    (r"(?<=\buse )scale\b|(?<=\blower )scale\b", "solver.scale"),
    (r"(?<=\bwith )scale=", "solver.scale="),
    (r"\bmode='fixed'", "mode=fixed"),
    (r"\bmode='updated'", "mode=updated"),
    (r"\bhessian_samples='all'", "{stage}hessian_samples=all"),
    (r"\bhessian_samples=", "{stage}hessian_samples="),
]
_PATTERN = re.compile("|".join(f"(?P<t{i}>{p})" for i, (p, _) in enumerate(_TERMS)))
_STAGE = re.compile(r"\b(pretrain|finetun)(?:ing|e)\b")


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
    """Solver errors raised and library warnings emitted inside, retold in config keys
    (the same exception type, chained to the original)."""
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as record:
            try:
                yield
            finally:
                caught = list(record)
    except SolverError as e:
        raise type(e)(in_config_terms(str(e))) from e
    finally:
        for w in caught:  # re-emitted outside the recording, through the caller's filters
            warnings.warn_explicit(in_config_terms(str(w.message)), w.category, w.filename, w.lineno)
