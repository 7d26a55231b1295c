"""One run per run folder: a lock file, and the checks that must come before anything is written.

A run folder (``hydra.run.dir``) is owned by one run at a time through an ``flock`` on
``<folder>/.lissa_influence.lock``, which names the owner (pid, host, start time). A
second run into the folder is refused while the owner lives; the operating system drops
the lock of a run that died, however it died. :class:`RunFolderGuard`, a Hydra
callback, takes the lock and checks the folder's results against the config in
``on_run_start``, before Hydra writes ``.hydra/`` into the folder, so that a refused run
leaves the folder exactly as it was; in a sweep into a given ``hydra.sweep.dir`` it does
the same for each job's folder (``on_job_start``, see the class).
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

from hydra.core.utils import JobReturn
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


_HOLD_BACK = "hydra.output_subdir=null"  # how the guard keeps Hydra from writing a sweep job's .hydra/ itself


class RunFolderGuard(Callback):
    """Before Hydra writes into a run folder given on the command line: take its lock and
    refuse results of another config (``ResultsMismatchError``), so the folder is left as
    it was. A timestamped folder (the default) is new; the job itself locks it.

    A single run is guarded in ``on_run_start``. A sweep's jobs get their folders only in
    the launcher, and Hydra writes a job's ``.hydra/`` before its first callback
    (``on_job_start``): for a sweep folder given on the command line the guard therefore
    holds Hydra's writing back (``hydra.output_subdir=null`` for the jobs), guards each job
    in ``on_job_start`` and then writes the job's ``.hydra/`` as Hydra would have.
    """

    def __init__(self) -> None:
        self.folder: Path | None = None
        self.sweep: DictConfig | None = None  # the multirun's config, while its jobs are guarded
        self.output_subdir: str | None = None  # where the guard writes each job's record instead of Hydra

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 owns the folder for all ranks
            return
        if _given(config.hydra.run):
            self._guard(config, Path(str(config.hydra.run.dir)))

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._release()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if int(os.environ.get("RANK", "0")) != 0 or not _given(config.hydra.sweep):
            return
        self.sweep = config
        self.output_subdir = config.hydra.output_subdir
        if self.output_subdir is not None:
            # Each job's config is composed from these overrides plus the job's own, in the
            # launcher; the guard's callbacks then run wherever the job runs (joblib, SLURM).
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.overrides.hydra.append(_HOLD_BACK)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.sweep is None:
            return  # a single run (guarded in on_run_start), or a sweep into a new timestamped folder
        folder = Path(str(config.hydra.runtime.output_dir))
        held_back = self.output_subdir is not None and config.hydra.output_subdir is None
        self._guard(config, folder, record=self.output_subdir if held_back else None)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if self.sweep is not None:
            self._release()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._tidy_sweep_record()
        self.sweep = None

    def _guard(self, config: DictConfig, folder: Path, record: str | None = None) -> None:
        """Lock ``folder`` and check its results; then write Hydra's record into ``folder/record``."""
        try:
            self.folder = acquire(folder)
            task = copy.deepcopy(config)
            with read_write(task), open_dict(task):
                del task["hydra"]
            check_results(task, folder)
            if record is not None:
                _write_record(task, config, folder, record)
        except Exception as e:
            self._release()
            self._tidy_sweep_record()
            # Hydra turns a callback's exception into a warning and goes on (to write .hydra/,
            # or to run the job): only leaving the process stops it
            where = f" (a job of the sweep into hydra.sweep.dir={self.sweep.hydra.sweep.dir})" if self.sweep else ""
            print(f"Error{where}: {type(e).__name__}: {e}", file=sys.stderr)
            raise SystemExit(1) from e

    def _release(self) -> None:
        if self.folder is not None:
            release(self.folder)
            self.folder = None

    def _tidy_sweep_record(self) -> None:
        """Take the hold-back override out of the sweep's config and its ``multirun.yaml``
        (written by Hydra's sweeper after ``on_multirun_start``): the record says what was asked."""
        if self.sweep is None or _HOLD_BACK not in self.sweep.hydra.overrides.hydra:
            return
        with read_write(self.sweep.hydra), open_dict(self.sweep.hydra):
            self.sweep.hydra.overrides.hydra.remove(_HOLD_BACK)
        record = Path(str(self.sweep.hydra.sweep.dir)) / "multirun.yaml"
        if record.is_file():
            record.write_text(OmegaConf.to_yaml(self.sweep))


def _given(section: DictConfig) -> bool:
    """Whether the folder (``dir``) of ``hydra.run`` or ``hydra.sweep`` was set to a fixed path."""
    raw = OmegaConf.to_container(section, resolve=False)
    return isinstance(raw, dict) and "${" not in str(raw.get("dir", "${"))


def _write_record(task: DictConfig, config: DictConfig, folder: Path, output_subdir: str) -> None:
    """A job's ``.hydra/`` as Hydra's run_job writes it (config.yaml, hydra.yaml, overrides.yaml),
    without the guard's hold-back override."""
    hydra_cfg = copy.deepcopy(OmegaConf.masked_copy(config, "hydra"))  # what Hydra saves: HydraConfig's copy
    with read_write(hydra_cfg.hydra), open_dict(hydra_cfg.hydra):
        hydra_cfg.hydra.output_subdir = output_subdir
        hydra_cfg.hydra.overrides.hydra.remove(_HOLD_BACK)
    out = folder / output_subdir
    out.mkdir(parents=True, exist_ok=True)
    records = {"config.yaml": task, "hydra.yaml": hydra_cfg, "overrides.yaml": config.hydra.overrides.task}
    for name, cfg in records.items():
        (out / name).write_text(OmegaConf.to_yaml(cfg), encoding="utf-8")


def check_results(cfg: Any, folder: Path) -> None:
    """Refuse a folder that holds scores of another configuration (before any work)."""
    from .. import results
    from . import config

    config.check(cfg)
    hashed = config.scored_config(cfg)
    results.ShardStore.check_folder(folder / "scores", results.config_hash(hashed), hashed)
