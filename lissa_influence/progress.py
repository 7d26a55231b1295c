"""Progress bars (tqdm) that leave a clean console behind."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm


def progress_bar(total: int | None = None, desc: str = "", enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr, or a silent stand-in when ``enabled`` is False.

    On a terminal (or in a notebook) a bar is erased when it closes, so nested and
    finished bars leave a clean console (the job prints its own summary). Where stderr is a
    file or a pipe the erasing carriage returns would leave a half line in front of
    whatever is printed next, so there every bar ends its own line instead, and redraws
    at most every 10 seconds.

    Args:
        total: the count the bar runs to.
        desc: its label.
        enabled: show it.
        **kwargs: more tqdm settings.

    Returns:
        The bar.
    """
    live = sys.stderr.isatty() or "ipykernel" in sys.modules
    kwargs.setdefault("mininterval", 0.1 if live else 10.0)  # a log file gets a line every 10 s, not 10 a second
    return tqdm(total=total, desc=desc, disable=not enabled, leave=not live, file=sys.stderr, **kwargs)
