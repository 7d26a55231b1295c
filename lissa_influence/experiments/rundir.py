"""One run per run folder: a lock file, and the checks that must come before anything is written.

A run folder (``hydra.run.dir``) is owned by one run at a time through an ``flock`` on
``<folder>/.lissa_influence.lock``, which names the owner (pid, host, start time). A
second run into the folder is refused while the owner lives; the operating system drops
the lock of a run that died, however it died. :class:`RunFolderGuard`, a Hydra
callback, takes the lock and checks the folder's results against the config in
``on_run_start``, before Hydra writes ``.hydra/`` into the folder, so that a refused run
leaves the folder exactly as it was.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

try:  # POSIX; elsewhere a run folder is not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

LOCK = ".lissa_influence.lock"
_held: dict[Path, tuple[int, int]] = {}  # folders this process holds: (file descriptor, holders)


class RunFolderLockedError(RuntimeError):
    """Another live run owns the run folder."""


def acquire(folder: str | os.PathLike[str]) -> Path:
    """Take the lock of ``folder`` (created if missing) for this process; re-entrant.

    An ``flock`` on ``<folder>/.lissa_influence.lock``: the operating system drops it when
    its process ends, however it ends, so a lock left by a dead run is no lock. The file
    says who holds it (pid, host, start time) and is removed on release.
    """
    root = Path(folder).resolve()
    if root in _held:
        fd, holders = _held[root]
        _held[root] = (fd, holders + 1)
        return root
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:  # type: ignore[redundant-expr,unused-ignore]
            break  # type: ignore[unreachable,unused-ignore]
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                owner = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                owner = {}
            os.close(fd)
            raise RunFolderLockedError(
                f"{root} is in use by another run (pid {owner.get('pid', '?')} on {owner.get('host', '?')}, since "
                f"{owner.get('started', '?')}); two runs in one folder would mix their results. Wait for it, or use "
                "another folder (hydra.run.dir=...)"
            ) from None
        try:  # the file we locked may have been removed by its last owner meanwhile: then lock the new one
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(me).encode())
    _held[root] = (fd, 1)
    return root


def release(folder: str | os.PathLike[str]) -> None:
    root = Path(folder).resolve()
    if root not in _held:
        return
    fd, holders = _held[root]
    if holders > 1:
        _held[root] = (fd, holders - 1)
        return
    del _held[root]
    (root / LOCK).unlink(missing_ok=True)  # while still locked: a newcomer then locks a new file
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def holder(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Who holds the lock of ``folder`` (its pid, host, start), or None when nobody does."""
    path = Path(folder) / LOCK
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDWR)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return dict(json.loads(path.read_text() or "{}"))
            fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunFolderGuard(Callback):
    """Before Hydra writes into a run folder given on the command line: take its lock and
    refuse results of another config (``ResultsMismatchError``), so the folder is left as
    it was. A timestamped folder (the default) is new; the job itself locks it."""

    def __init__(self) -> None:
        self.folder: Path | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 owns the folder for all ranks
            return
        raw = OmegaConf.to_container(config.hydra.run, resolve=False)
        if not isinstance(raw, dict) or "${" in str(raw.get("dir", "${")):
            return
        folder = Path(str(config.hydra.run.dir))
        try:
            self.folder = acquire(folder)
            task = copy.deepcopy(config)
            with read_write(task), open_dict(task):
                del task["hydra"]
            check_results(task, folder)
        except Exception as e:
            if self.folder is not None:
                release(folder)
                self.folder = None
            # Hydra turns a callback's exception into a warning and goes on to write .hydra/:
            # only leaving the process stops it before that
            print(f"Error: {type(e).__name__}: {e}", file=sys.stderr)
            raise SystemExit(1) from e

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.folder is not None:
            release(self.folder)
            self.folder = None


def check_results(cfg: Any, folder: Path) -> None:
    """Refuse a folder that holds scores of another configuration (before any work)."""
    from .. import results
    from . import config

    config.check(cfg)
    hashed = config.scored_config(cfg)
    results.ShardStore.check_folder(folder / "scores", results.config_hash(hashed), hashed)
