"""Training on several processes: ``torchrun --nproc_per_node N -m cbam_viz train ...`` (issue 31).

Every rank builds the same seeded model, draws the same epoch order
(:func:`cbam_viz.training.step.epoch_order`) and takes its share of each global batch: rank ``k``
takes images ``k*B/N .. (k+1)*B/N - 1`` of it (:func:`rank_steps`), so a run is reproducible for a
given ``N`` and the global batch stays the recipe's ``batch_size``. The model is wrapped in
``DistributedDataParallel``, which averages the gradients over the ranks in the backward pass, so
after each step every rank holds the same weights; rank 0 alone writes checkpoints, logs and
exports (:mod:`cbam_viz.training.train`, the CLI).

What the numbers are: without SyncBatchNorm a rank's BatchNorm layers normalise over its own
``B/N`` images, so N processes compute exactly what one process computes when it splits each
global batch into N micro-batches of ``B/N`` and accumulates their gradients (the test checks
this), not what one process computes on whole batches of ``B``; the running statistics the
checkpoint keeps are rank 0's (DDP copies rank 0's buffers to every rank at each forward).
``sync_bn=True`` (GPUs, NCCL only: PyTorch's SyncBatchNorm has no CPU kernel) normalises over the
whole global batch, as one process on batches of ``B`` does, at the cost of one more
communication per BatchNorm layer per step. CPU ranks use gloo.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cbam_viz import distributed
from cbam_viz.distributed import DistContext

__all__ = ["join", "local_world", "check_batch", "check_sync_bn", "wrap_model", "rank_steps", "reduce_sums", "from_rank0"]


def join(device: torch.device, *, batch_size: int, sync_bn: bool = False) -> tuple[DistContext, torch.device]:
    """This process's place under torchrun (gloo for a CPU run, NCCL for a GPU run) and its device
    (``cuda:LOCAL_RANK`` on GPUs), the options checked against it; ``(one process, device)`` without torchrun.

    Raises:
        ValueError: a batch that does not split over the processes, ``sync_bn`` without GPUs, or a
            device other than the job's.
    """
    ctx = distributed.context(backend="nccl" if device.type == "cuda" else "gloo")
    check_batch(batch_size, ctx)
    check_sync_bn(sync_bn, ctx)
    if ctx.world == 1:
        return ctx, device
    if ctx.device.type != device.type:
        raise ValueError(f"training on {device.type} was asked for, but this torchrun job runs on "
                         f"{ctx.device.type} ({ctx.backend})")
    return ctx, ctx.device


def local_world(ctx: DistContext) -> int:
    """Processes of this job on this machine (torchrun's ``LOCAL_WORLD_SIZE``; 1 without torchrun)."""
    if ctx.world == 1:
        return 1
    value = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    return int(value) if value.isdigit() else ctx.world


def check_batch(batch_size: int, ctx: DistContext) -> None:
    """Refuse a global batch that does not split evenly over the ranks.

    Raises:
        ValueError: ``batch_size`` is not a multiple of the number of processes.
    """
    if batch_size % ctx.world:
        raise ValueError(f"--batch-size {batch_size} does not split over {ctx.world} processes: use a multiple of "
                         f"{ctx.world} (each process takes batch-size / {ctx.world} images of every step)")


def check_sync_bn(sync_bn: bool, ctx: DistContext) -> None:
    """Refuse SyncBatchNorm where it cannot run: on one process (nothing to sync) or on CPUs (gloo).

    Raises:
        ValueError: ``sync_bn`` asked for without several NCCL (GPU) processes.
    """
    if sync_bn and ctx.backend != "nccl":
        where = "one process" if ctx.world == 1 else "CPU processes (gloo)"
        raise ValueError(f"--sync-bn needs several GPU processes (torchrun with NCCL), not {where}: without it "
                         f"each process normalises over its own batch-size / N images")


def wrap_model(model: nn.Module, ctx: DistContext, *, sync_bn: bool = False) -> nn.Module:
    """``model`` in DistributedDataParallel under torchrun (its BatchNorms synchronised if asked);
    ``model`` itself on one process.

    SyncBatchNorm replaces the BatchNorm modules in place and keeps their parameter and buffer
    tensors, so an optimizer or weight average already bound to ``model`` stays bound.
    """
    if ctx.world == 1:
        return model
    if sync_bn:
        for name, child in list(model.named_children()):
            model.add_module(name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
    ids = [ctx.local_rank] if ctx.backend == "nccl" else None
    return DistributedDataParallel(model, device_ids=ids)


def rank_steps(order: torch.Tensor, batch_size: int, steps: int, ctx: DistContext) -> list[torch.Tensor]:
    """This rank's indices for each of an epoch's ``steps``: its contiguous share of every global batch."""
    part = batch_size // ctx.world
    return [order[i * batch_size + ctx.rank * part:i * batch_size + (ctx.rank + 1) * part] for i in range(steps)]


def reduce_sums(loss_sum: float, correct: int, seen: int, ctx: DistContext) -> tuple[float, int, int]:
    """An epoch's summed loss, hits and images over every rank (unchanged on one process)."""
    if ctx.world == 1:
        return loss_sum, correct, seen
    total = torch.tensor([loss_sum, float(correct), float(seen)], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(total)
    loss_sum, correct, seen = total.tolist()
    return loss_sum, int(correct), int(seen)


def from_rank0(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every rank (pickled; tensors come back on the device they left): ``obj`` itself
    on one process."""
    if ctx.world == 1:
        return obj
    box = [obj if ctx.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
