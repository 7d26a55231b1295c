"""torch.distributed helpers: the influence chain on several processes (``torchrun``).

What is split across ranks, and how (see docs/scaling.md):

- the Hessian sample: every rank draws the same seeded subsample, keeps the contiguous
  slice :func:`shard_range` gives it, and every product (HVP, GGN, mixed, gradient) is
  the sum of the ranks' weighted partial sums (:func:`all_reduce_sum`), each chunk
  weighted by its size over the *whole* sample. Every rank so sees the same reduced
  products and the solvers, run on every rank, take identical iterates;
- scoring: each rank scores a contiguous slice of the examples and the ``[k, n_rank]``
  blocks are gathered in dataset order (:func:`all_gather_cat`) on every rank.

Without an initialised process group of more than one rank every helper is the
identity (or ``rank 0 of 1``), so single-process code paths and numbers are unchanged.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def is_distributed() -> bool:
    """Whether an initialised process group with more than one rank runs.

    Returns:
        True under ``torchrun`` with several ranks.
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank.

    Returns:
        0 without a process group.
    """
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of ranks.

    Returns:
        1 without a process group.
    """
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Whether this is rank 0 (or a single process): the rank that writes files and prints.

    Returns:
        True on rank 0.
    """
    return rank() == 0


def default_backend() -> str:
    """The process group's backend for this machine.

    ``gloo`` on a CPU-only machine; with CUDA, NCCL for CUDA tensors and gloo for CPU
    tensors (a combined backend, so the CPU pipeline and GPU models both work).

    Returns:
        The backend string.
    """
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def init_from_env(backend: str | None = None, timeout_s: float | None = None) -> bool:
    """Join the process group described by the launcher's environment.

    ``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
    ``MASTER_PORT``. A no-op, returning False, when ``WORLD_SIZE`` is unset or 1; a no-op
    when the group is already initialised (e.g. by the caller, or by an earlier job of a
    Hydra multirun). With CUDA each rank uses the GPU ``LOCAL_RANK``. A SLURM job started
    by submitit (hydra-submitit-launcher) with several tasks and no ``WORLD_SIZE`` gets
    these variables from ``submitit.helpers.TorchDistributedEnvironment``.

    Args:
        backend: the backend (None: :func:`default_backend`).
        timeout_s: the collectives' timeout in seconds (None: torch's default).

    Returns:
        :func:`is_distributed`.
    """
    if dist.is_available() and dist.is_initialized():
        return is_distributed()
    if (
        "WORLD_SIZE" not in os.environ
        and os.environ.get("SUBMITIT_EXECUTOR") == "slurm"
        and int(os.environ.get("SLURM_NTASKS", "1")) > 1
    ):
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = backend or default_backend()
    if "nccl" in backend and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    kwargs: dict[str, Any] = {}
    if timeout_s is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend=backend, **kwargs)
    return is_distributed()


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous share of ``n`` items.

    Sizes differ by at most one (the first ``n % world`` ranks take one more); ranks in
    order cover ``0..n`` exactly, so concatenating their results restores the original order.

    Args:
        n: the number of items.
        rank: the rank.
        world: the number of ranks.

    Returns:
        ``(start, stop)``.

    Example:
        >>> [shard_range(5, r, 2) for r in range(2)]
        [(0, 3), (3, 5)]
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over all ranks (a new tensor; ``t`` is left alone).

    Every rank gets the same bits: the collectives reduce once and then distribute the result.

    Args:
        t: this rank's tensor.

    Returns:
        The sum (a copy of ``t`` in one process).
    """
    if not is_distributed():
        return t
    out = t.detach().contiguous().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``t`` in place with rank ``src``'s copy.

    Args:
        t: the tensor.
        src: the rank whose copy wins.

    Returns:
        ``t``, for chaining.
    """
    if is_distributed():
        if t.is_contiguous():
            dist.broadcast(t, src)
        else:
            buf = t.contiguous()
            dist.broadcast(buf, src)
            t.copy_(buf)
    return t


def broadcast_module(module: torch.nn.Module, src: int = 0) -> torch.nn.Module:
    """Every parameter and buffer of ``module`` set to rank ``src``'s values.

    Args:
        module: the module.
        src: the rank whose values win.

    Returns:
        ``module``.
    """
    if is_distributed():
        with torch.no_grad():
            for t in module.state_dict().values():
                broadcast_(t, src)
    return module


def all_gather_cat(local: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Every rank's ``local`` concatenated along ``dim`` in rank order, on every rank.

    Sizes along ``dim`` may differ between ranks (blocks are padded for the collective);
    the other dimensions must agree.

    Args:
        local: this rank's block.
        dim: the dimension to concatenate along.

    Returns:
        The concatenation.
    """
    if not is_distributed():
        return local
    world = world_size()
    dim = dim % local.dim()
    size = torch.tensor([local.shape[dim]], dtype=torch.long, device=local.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes_ = [int(s) for s in sizes]
    longest = max(sizes_)
    pad_shape = list(local.shape)
    pad_shape[dim] = longest - local.shape[dim]
    padded = torch.cat([local, local.new_zeros(pad_shape)], dim=dim).contiguous()
    blocks = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(blocks, padded)
    return torch.cat([b.narrow(dim, 0, s) for b, s in zip(blocks, sizes_, strict=True)], dim=dim)


def barrier() -> None:
    """Wait until every rank gets here (nothing in one process)."""
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s (picklable) ``obj`` on every rank.

    Args:
        obj: this rank's object.
        src: the rank whose object wins.

    Returns:
        Rank ``src``'s object.
    """
    if not is_distributed():
        return obj
    box: list[Any] = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_rank0(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and return its result on every rank.

    An exception on rank 0 is raised on every rank (so that no rank waits forever in a
    later collective). Use it for file-system work (reading a manifest, checking a results folder).

    Args:
        fn: the work.

    Returns:
        ``fn()``'s result, on every rank.
    """
    if not is_distributed():
        return fn()
    payload: Any = None
    error: BaseException | None = None
    if rank() == 0:
        try:
            payload = ("ok", fn())
        except Exception as e:  # noqa: BLE001 - forwarded to every rank, re-raised below
            error = e
            try:
                pickle.dumps(e)
                payload = ("error", e)
            except Exception:  # noqa: BLE001
                payload = ("error", RuntimeError(f"on rank 0: {type(e).__name__}: {e}"))
    status, value = broadcast_object(payload)
    if status == "error":
        if error is not None:
            raise error
        raise value
    return value


@contextlib.contextmanager
def rank0_first() -> Iterator[None]:
    """Rank 0 runs the block first, the other ranks after it.

    For downloads and training into the shared weight cache: the other ranks read what
    rank 0 wrote. Single process: just the block.
    """
    if is_distributed() and rank() != 0:
        dist.barrier()
    try:
        yield
    finally:
        if is_distributed() and rank() == 0:
            dist.barrier()
