"""One run per run folder: a lock file, and the checks that must come before anything is written.

A run folder (``hydra.run.dir``) is owned by one run at a time through
``<folder>/.lissa_influence.lock``, created atomically and holding the owner's pid, host
and start time. A second run into the folder is refused while the owner lives; a lock
whose owner died (same host, pid gone) is taken over. :class:`RunFolderGuard`, a Hydra
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

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

LOCK = ".lissa_influence.lock"
_held: dict[Path, int] = {}  # folders this process holds, with how many holders


class RunFolderLockedError(RuntimeError):
    """Another live run owns the run folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def acquire(folder: str | os.PathLike[str]) -> Path:
    """Take the lock of ``folder`` (created if missing) for this process; re-entrant."""
    root = Path(folder).resolve()
    if root in _held:
        _held[root] += 1
        return root
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text())
            except (OSError, ValueError):  # half-written by a starting owner, or just removed
                time.sleep(0.05)
                continue
            stale = owner.get("host") == me["host"] and not _alive(int(owner.get("pid", -1)))
            if not stale:
                raise RunFolderLockedError(
                    f"{root} is in use by another run (pid {owner.get('pid')} on {owner.get('host')}, since "
                    f"{owner.get('started')}); two runs in one folder would mix their results. Wait for it, use "
                    f"another folder (hydra.run.dir=...), or delete {path} if that run is gone"
                ) from None
            path.unlink(missing_ok=True)  # its owner died: take it over
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        _held[root] = 1
        return root
    raise RunFolderLockedError(f"could not take the lock {path}; try again")


def release(folder: str | os.PathLike[str]) -> None:
    root = Path(folder).resolve()
    if root not in _held:
        return
    _held[root] -= 1
    if _held[root] == 0:
        del _held[root]
        (root / LOCK).unlink(missing_ok=True)


class RunFolderGuard(Callback):
    """Before Hydra writes into a run folder given on the command line: take its lock and
    refuse results of another config (``ResultsMismatchError``), so the folder is left as
    it was. A timestamped folder (the default) is new; the job itself locks it."""

    def __init__(self) -> None:
        self.folder: Path | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
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
    from . import config, pipeline

    config.check(cfg)
    hashed = pipeline.scored_config(cfg)
    results.ShardStore.check_folder(folder / "scores", results.config_hash(hashed), hashed)
