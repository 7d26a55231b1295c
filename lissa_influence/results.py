"""Resumable results: scores written in shards as they are computed.

Layout of a :class:`ShardStore` folder (``<run dir>/scores/``), plain numpy and JSON so
that no part of this package is needed to read it::

    manifest.json          config hash (and the hashed config), n, k, shard_size, dtype,
                           per-shard [start, stop) and shape, the list of complete shards
                           and their sha256 checksums
    shard_00000.npy        float64 [k, stop - start]: scores of examples [start, stop)
    shard_00001.npy        ...
    query_vectors.npy      the solved s [k, P] (a resumed run does not solve again)
    solve.json             the solver diagnostics of that solve

Every file is written to a temporary name and renamed, and a shard counts as complete
only once the manifest lists it, so a run killed at any point leaves a consistent folder;
a rerun of the same configuration computes only the missing shards, and those that fail
verification (checksum, shape, finite values), with a warning naming them. A folder
written under another configuration is refused (:class:`ResultsMismatchError`).

Reading without this package::

    m = json.load(open("scores/manifest.json"))
    scores = np.concatenate([np.load(f"scores/shard_{i:05d}.npy") for i in range(m["num_shards"])], axis=1)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from . import distributed
from .batching import as_dataset
from .estimator import InfluenceEstimator

log = logging.getLogger(__name__)

FORMAT = "lissa_influence.shards/1"
MANIFEST = "manifest.json"
QUERY_VECTORS = "query_vectors.npy"
SOLVE_INFO = "solve.json"


T = TypeVar("T")


class ResultsMismatchError(ValueError):
    """The results folder holds results of another configuration or shape."""


def config_hash(config: Mapping[str, Any]) -> str:
    """A stable hash of a (JSON-serialisable) configuration.

    Args:
        config: the configuration.

    Returns:
        A hex digest.
    """
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, Mapping):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for every differing leaf of two nested configs.

    Args:
        a: the old configuration.
        b: the new one.

    Returns:
        One line per differing key (dotted), sorted.
    """
    fa, fb = _flatten(a), _flatten(b)
    return [
        f"{k}: {fa.get(k, '<absent>')!r} -> {fb.get(k, '<absent>')!r}"
        for k in sorted(set(fa) | set(fb))
        if fa.get(k, "<absent>") != fb.get(k, "<absent>")
    ]


def _write_atomic(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save_npy(path: Path, array: np.ndarray) -> None:
    _write_atomic(path, lambda f: np.save(f, array))


def _save_json(path: Path, obj: Any) -> None:
    _write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2, default=str)), "w")


class ShardStore:
    """Scores ``[k, n]`` kept as shards of ``shard_size`` examples under ``root``.

    Opening an existing folder checks that it was written for the same ``config_hash``,
    ``n``, ``k`` and ``shard_size`` and raises :class:`ResultsMismatchError` otherwise
    (naming the differing keys when the manifest holds the config); a new folder gets a
    fresh manifest. Single-process file logic: under torch.distributed only rank 0
    opens a store (see :func:`resumable_scores`).

    Args:
        root: the folder.
        config_hash: the hash of the run's configuration.
        n: scored examples.
        k: queries.
        shard_size: examples per shard.
        config: the configuration, to name differing keys in a refusal.
        dtype: the scores' dtype.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        config_hash: str,
        n: int,
        k: int,
        shard_size: int,
        config: Mapping[str, Any] | None = None,
        dtype: str = "float64",
    ):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        if n < 1 or k < 1:
            raise ValueError(f"a score store needs n >= 1 examples and k >= 1 queries, got n={n}, k={k}")
        self.root = Path(root)
        self.config_hash, self.n, self.k, self.shard_size, self.dtype = config_hash, n, k, shard_size, dtype
        self.num_shards = -(-n // shard_size)
        existing = self.read_manifest(self.root)
        if existing is None:
            self.root.mkdir(parents=True, exist_ok=True)
            self.manifest: dict[str, Any] = {
                "format": FORMAT,
                "config_hash": config_hash,
                "config": dict(config) if config is not None else None,
                "n": n,
                "k": k,
                "shard_size": shard_size,
                "num_shards": self.num_shards,
                "dtype": dtype,
                "file_pattern": "shard_{index:05d}.npy",
                "shards": [
                    {"index": i, "file": self.shard_file(i).name, "start": lo, "stop": hi, "shape": [k, hi - lo]}
                    for i, (lo, hi) in enumerate(map(self.bounds, range(self.num_shards)))
                ],
                "complete": [],
                "query_vectors": None,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            self._save_manifest()
        else:
            self._check(existing, config)
            self.manifest = existing

    # -- manifest -------------------------------------------------------------------
    @staticmethod
    def read_manifest(root: str | os.PathLike[str]) -> dict[str, Any] | None:
        """The manifest of the store at ``root``.

        Args:
            root: the store's folder.

        Returns:
            The manifest, or None where there is none.
        """
        path = Path(root) / MANIFEST
        if not path.exists():
            return None
        try:
            manifest: dict[str, Any] = json.loads(path.read_text())
            return manifest
        except json.JSONDecodeError as e:
            raise ResultsMismatchError(f"{path} is not valid JSON ({e}); delete {Path(root)} to start afresh") from None

    @classmethod
    def check_folder(
        cls, root: str | os.PathLike[str], config_hash: str, config: Mapping[str, Any] | None = None
    ) -> bool:
        """Fail early (before any training) if ``root`` holds results of another config.

        Args:
            root: the store's folder.
            config_hash: the hash of this run's configuration.
            config: the configuration, to name the differing keys.

        Returns:
            True when there is something to resume.

        Raises:
            ResultsMismatchError: the folder was written for another configuration.
        """
        existing = cls.read_manifest(root)
        if existing is not None and existing.get("config_hash") != config_hash:
            raise ResultsMismatchError(cls._mismatch_message(Path(root), existing, config_hash, config))
        return existing is not None

    @staticmethod
    def _mismatch_message(
        root: Path, existing: Mapping[str, Any], config_hash: str, config: Mapping[str, Any] | None
    ) -> str:
        msg = (
            f"{root} holds scores of a different configuration (hash {existing.get('config_hash')}, this run "
            f"{config_hash})"
        )
        if config is not None and existing.get("config") is not None:
            diff = config_diff(existing["config"], config)
            if diff:
                msg += "; differing keys: " + "; ".join(diff[:10]) + (" ..." if len(diff) > 10 else "")
        return msg + (
            ". Results are never mixed across configurations: use a new output directory "
            f"(e.g. another hydra.run.dir) or delete {root} to recompute."
        )

    def _check(self, m: Mapping[str, Any], config: Mapping[str, Any] | None) -> None:
        if m.get("format") != FORMAT:
            raise ResultsMismatchError(
                f"{self.root / MANIFEST} has format {m.get('format')!r}, expected {FORMAT!r}; "
                f"delete {self.root} or use a new output directory"
            )
        if m.get("config_hash") != self.config_hash:
            raise ResultsMismatchError(self._mismatch_message(self.root, m, self.config_hash, config))
        for key in ("n", "k", "shard_size", "dtype"):  # getattr on own attributes, by key name: not contract probing
            if m.get(key) != getattr(self, key):
                raise ResultsMismatchError(
                    f"{self.root} was written with {key}={m.get(key)!r}, this run has {key}={getattr(self, key)!r} "
                    f"(same configuration hash{'; the data on disk changed?' if key in ('n', 'k') else ''}); "
                    f"use a new output directory or delete {self.root} to recompute."
                )

    def _save_manifest(self) -> None:
        self.manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        _save_json(self.root / MANIFEST, self.manifest)

    # -- shards -----------------------------------------------------------------------
    def bounds(self, i: int) -> tuple[int, int]:
        """The examples of shard ``i``.

        Args:
            i: the shard's index.

        Returns:
            ``(start, stop)``.
        """
        if not 0 <= i < self.num_shards:
            raise IndexError(f"shard {i} out of range 0..{self.num_shards - 1}")
        return i * self.shard_size, min((i + 1) * self.shard_size, self.n)

    def shard_file(self, i: int) -> Path:
        """The file of shard ``i``.

        Args:
            i: the shard's index.

        Returns:
            Its path.
        """
        return self.root / f"shard_{i:05d}.npy"

    @property
    def complete(self) -> list[int]:
        return sorted(self.manifest["complete"])

    def pending(self) -> list[int]:
        """Shards still to compute.

        Not listed as complete, or whose file fails :meth:`verify` (then dropped from the
        manifest, with a warning naming the file).

        Returns:
            Their indices, in order.
        """
        done = set()
        for i in self.manifest["complete"]:
            problem = self.verify(i)
            if problem is None:
                done.add(i)
            else:
                warnings.warn(f"score shard {self.shard_file(i)} {problem}; computing it again", stacklevel=2)
        if done != set(self.manifest["complete"]):
            self.manifest["complete"] = sorted(done)
            self._save_manifest()
        return [i for i in range(self.num_shards) if i not in done]

    def verify(self, i: int) -> str | None:
        """What is wrong with the file of shard ``i``, if anything.

        Args:
            i: the shard's index.

        Returns:
            None for a file that is there, whole (the checksum written with it), of the shape
            the manifest gives and finite; else what is wrong with it.
        """
        path = self.shard_file(i)
        if not path.is_file():
            return "is missing"
        expected = self.manifest.get("checksums", {}).get(str(i))
        if expected is not None and _sha256(path) != expected:
            return "does not match the checksum written with it (changed or damaged)"
        try:
            a = np.load(path)
        except (ValueError, OSError, EOFError) as e:
            return f"cannot be read ({type(e).__name__}: {e})"
        lo, hi = self.bounds(i)
        if a.shape != (self.k, hi - lo):
            return f"has shape {a.shape}, the manifest {(self.k, hi - lo)}"
        if not np.isfinite(a).all():
            return "holds NaN or inf"
        return None

    def write(self, i: int, scores: np.ndarray | torch.Tensor) -> None:
        """Write shard ``i`` (atomically, with its checksum) and mark it complete.

        Args:
            i: the shard's index.
            scores: ``[k, stop − start]``.
        """
        lo, hi = self.bounds(i)
        a = scores.detach().cpu().numpy() if torch.is_tensor(scores) else np.asarray(scores)
        a = np.ascontiguousarray(a, dtype=self.dtype)
        if a.shape != (self.k, hi - lo):
            raise ValueError(f"shard {i} must have shape {(self.k, hi - lo)}, got {a.shape}")
        _save_npy(self.shard_file(i), a)
        self.manifest.setdefault("checksums", {})[str(i)] = _sha256(self.shard_file(i))
        self.manifest["complete"] = sorted(set(self.manifest["complete"]) | {i})
        self._save_manifest()

    def read(self, i: int) -> np.ndarray:
        """The scores of shard ``i``.

        Args:
            i: the shard's index.

        Returns:
            ``[k, stop − start]``.
        """
        array: np.ndarray = np.load(self.shard_file(i))
        return array

    def assemble(self) -> np.ndarray:
        """All scores; every shard must be complete.

        Returns:
            ``[k, n]``.
        """
        missing = self.pending()
        if missing:
            raise RuntimeError(f"{self.root}: shards {missing[:10]} are not computed yet")
        return np.concatenate([self.read(i) for i in range(self.num_shards)], axis=1)

    # -- query vectors ------------------------------------------------------------------
    def save_query_vectors(self, s: np.ndarray | torch.Tensor, info: Mapping[str, Any] | None = None) -> None:
        """Keep the query vectors and their solve diagnostics with the store.

        Args:
            s: ``[k, P]``.
            info: the solve diagnostics.
        """
        a = s.detach().cpu().numpy() if torch.is_tensor(s) else np.asarray(s)
        _save_json(self.root / SOLVE_INFO, dict(info or {}))
        _save_npy(self.root / QUERY_VECTORS, np.ascontiguousarray(a))
        self.manifest["query_vectors"] = {
            "file": QUERY_VECTORS,
            "shape": list(a.shape),
            "dtype": str(a.dtype),
            "info": SOLVE_INFO,
        }
        self._save_manifest()

    def load_query_vectors(self) -> tuple[np.ndarray, dict[str, Any]] | None:
        """The saved query vectors and their solve diagnostics.

        Returns:
            ``(s, info)``, or None when not saved yet.
        """
        if not self.manifest.get("query_vectors") or not (self.root / QUERY_VECTORS).exists():
            return None
        info_path = self.root / SOLVE_INFO
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        return np.load(self.root / QUERY_VECTORS), info


def resumable_scores(
    estimator: InfluenceEstimator,
    test_data: Any,
    root: str | os.PathLike[str],
    config_hash: str,
    shard_size: int,
    mean: bool = False,
    data: Any = None,
    config: Mapping[str, Any] | None = None,
    on_shard: Callable[[int, int, int], None] | None = None,
    on_solved: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Query vectors and scores of a fitted estimator, kept in a :class:`ShardStore` at ``root``.

    Loads ``s`` from the store or solves (``estimator.query_vectors(test_data, mean)``)
    and saves it; then scores every shard not yet complete
    (``estimator.scores_from(s, data, start, stop)``) and writes it as soon as it is done.
    Under torch.distributed every rank must call it (the solves and the scoring are
    collective); only rank 0 touches the files.

    Args:
        estimator: a fitted :class:`~lissa_influence.MultiStageInfluence` or
            :class:`~lissa_influence.Influence`.
        test_data: the test examples.
        root: the store's folder.
        config_hash: the hash of the run's configuration (a store of another is refused).
        shard_size: examples per shard.
        mean: one query, the mean test loss.
        data: the examples to score (None: the estimator's ``scored_data``).
        config: the configuration, to name differing keys in a refusal.
        on_shard: called as ``on_shard(index, start, stop)`` after each shard is written.
        on_solved: called with the solve diagnostics after the solve (or its reload) and
            before any scoring, to refuse a solve that is not good enough.

    Returns:
        ``(s, scores [k, n], info)``, ``info`` holding the solve diagnostics and what was resumed.
    """
    if not estimator.is_fitted:
        raise RuntimeError("call fit(...) on the estimator before resumable_scores")
    n = len(as_dataset(data, "scored data")) if data is not None else len(estimator.scored_data)
    k = 1 if mean else len(as_dataset(test_data, "test data"))
    opened: dict[str, ShardStore] = {}

    def open_store() -> None:  # rank 0 only; a mismatch error reaches every rank
        opened["store"] = ShardStore(root, config_hash, n, k, shard_size, config)

    distributed.on_rank0(open_store)

    def on_store(fn: Callable[[ShardStore], T]) -> T:  # the files are rank 0's; the result every rank's
        return distributed.on_rank0(lambda: fn(opened["store"]))

    saved = on_store(lambda store: store.load_query_vectors())
    if saved is not None:
        s = estimator.as_query_vectors(saved[0])
        solve_info = saved[1]
        log.info("loaded the query vectors from %s (no solve)", root)
    else:
        s = estimator.query_vectors(test_data, mean)
        solve_info = dict(estimator.diagnostics)
        on_store(lambda store: store.save_query_vectors(s, solve_info))
    if on_solved is not None:
        on_solved(solve_info)

    pending = on_store(lambda store: store.pending())
    total_shards = -(-n // shard_size)
    if len(pending) < total_shards:
        log.info("resuming %s: %d of %d score shards already computed", root, total_shards - len(pending), total_shards)
    t0 = time.perf_counter()
    for i in pending:
        lo, hi = i * shard_size, min((i + 1) * shard_size, n)
        block = estimator.scores_from(s, data, lo, hi)
        on_store(lambda store: store.write(i, block.double()))  # noqa: B023 (called at once)
        if on_shard is not None:
            on_shard(i, lo, hi)
    scoring_time = time.perf_counter() - t0
    scores = on_store(lambda store: store.assemble())
    info = {
        "solve": solve_info,
        "resumed_solve": saved is not None,
        "shards_computed": len(pending),
        "shards_total": total_shards,
        "scoring_time": scoring_time,
    }
    return s, torch.from_numpy(scores), info
