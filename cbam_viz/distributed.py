"""Several processes on one job: ``torchrun --nproc_per_node N -m cbam_viz ...`` (issue 31).

torchrun starts N copies of the command and tells each its place through the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``). :func:`context` reads
it once and joins the process group: NCCL where the process has a GPU, gloo on CPUs. Without
torchrun (``WORLD_SIZE`` unset or 1) everything here is the identity and nothing is initialised,
so the single-process commands are unchanged.

Dataset commands split the work by :func:`shard` (every ``world``-th item from the rank's own
index: even shards whatever the order) and put it back together with :func:`gather_ordered`, so
rank 0 holds exactly the list one process would have built, in the same order, and writes the
same report; the other ranks write nothing (:func:`is_main`).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["DistContext", "context", "is_main", "shard", "gather_ordered", "gather_everywhere", "barrier",
           "shutdown", "leave"]

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job: rank ``rank`` of ``world`` (``backend`` None: one process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """This rank's GPU under NCCL (``cuda:LOCAL_RANK``), else the CPU."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")


_context: DistContext | None = None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    try:
        return int(value) if value else default
    except ValueError as err:
        raise ValueError(f"${name} must be an integer (torchrun sets it), got {value!r}") from err


def context(*, backend: str | None = None) -> DistContext:
    """This process's :class:`DistContext`, joining the process group on the first call under torchrun.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default NCCL when CUDA is available, else gloo.
    """
    global _context
    if _context is not None:
        return _context
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        _context = DistContext()
        return _context
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    _context = DistContext(rank=rank, world=world, local_rank=local_rank, backend=backend)
    return _context


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one process that writes files and prints."""
    return context().main


def shard(items: Sequence[T], ctx: DistContext | None = None) -> list[tuple[int, T]]:
    """This rank's share of ``items`` as ``(index, item)``: items ``rank, rank + world, ...``.

    Interleaved rather than in blocks, so ranks get the same number of items give or take one
    and the same mix of classes when ``items`` is sorted by class.
    """
    ctx = ctx or context()
    return [(i, items[i]) for i in range(ctx.rank, len(items), ctx.world)]


def gather_ordered(pairs: Sequence[tuple[int, Any]], ctx: DistContext | None = None) -> list[Any] | None:
    """Every rank's ``(index, value)`` pairs, merged by index on rank 0 (None on the other ranks).

    On one process it returns the values in index order. The values travel as pickles
    (``all_gather_object``): keep them small (numbers, short arrays), not models or images.
    """
    ctx = ctx or context()
    if ctx.world == 1:
        return [v for _, v in sorted(pairs, key=lambda p: p[0])]
    everyone: list[Any] = [None] * ctx.world
    dist.all_gather_object(everyone, list(pairs))
    if not ctx.main:
        return None
    merged = sorted((p for part in everyone for p in part), key=lambda p: p[0])
    indices = [i for i, _ in merged]
    if len(set(indices)) != len(indices):
        raise RuntimeError("two ranks returned the same item; were they given different inputs?")
    return [v for _, v in merged]


def gather_everywhere(pairs: Sequence[tuple[int, Any]], ctx: DistContext | None = None) -> list[Any]:
    """:func:`gather_ordered`'s merged list on *every* rank, for a value each rank needs to go on
    (e.g. ``ablate-gates --constant mean``: the gate means of all images, before any rank ablates)."""
    ctx = ctx or context()
    if ctx.world == 1:
        return [v for _, v in sorted(pairs, key=lambda p: p[0])]
    everyone: list[Any] = [None] * ctx.world
    dist.all_gather_object(everyone, list(pairs))
    return [v for _, v in sorted((p for part in everyone for p in part), key=lambda p: p[0])]


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    if context().world > 1:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (end of a torchrun command); safe to call in one process."""
    global _context
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _context = None


def leave() -> None:
    """End a command that succeeded on this rank: wait for every rank that joined the job, then leave it.

    A rank that exits while another still talks to it can take the job down (gloo aborts the
    survivor), so every command ends here (:func:`cbam_viz.cli.main`); nothing happens in a process
    that never joined a group.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    shutdown()


def map_sharded(fn: Callable[[T], Any], items: Sequence[T], ctx: DistContext | None = None) -> list[Any] | None:
    """``[fn(x) for x in items]`` split over the ranks; the full list on rank 0, None elsewhere."""
    ctx = ctx or context()
    return gather_ordered([(i, fn(x)) for i, x in shard(items, ctx)], ctx)
