"""What a training run reads: its training files (cached in memory or streamed), held-out files and
monitored split, and the batches of each step.

:func:`load_split` leaves the held-out share of every class out of training
(:func:`~cbam_viz.training.data.holdout_split`) and chooses the data path
(:func:`~cbam_viz.training.stream.choose_data_path`): the whole split decoded once into a uint8
tensor on the training device, or the file list alone, decoded per step by DataLoader workers.
:func:`step_batches` gives a run's steps their ``(images, labels)`` either way, the same tensors.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cbam_viz import distributed
from cbam_viz.distributed import DistContext
from cbam_viz.training import parallel
from cbam_viz.training.data import TensorDataset, decode_images, holdout_split, load_cached_split, scan_image_folder
from cbam_viz.training.recipe import Recipe
from cbam_viz.training.stream import DataPath, FileSplit, cached_batches, choose_data_path, streamed_batches

__all__ = ["TrainingSplit", "load_split", "load_split_on_ranks", "step_batches"]


@dataclass
class TrainingSplit:
    """What a run trains on (on its device) and what it monitors: the held-out files, else ``--val``."""

    train: TensorDataset | FileSplit
    images: torch.Tensor | None  # train.images on the training device; None when streamed from the files
    labels: torch.Tensor
    holdout_files: tuple[str, ...]
    monitor: TensorDataset | None
    monitor_name: str  # "holdout" or "val": the prefix of the monitored figures in the log
    path: DataPath | None = None  # how the training images are read, and why
    workers: int = 2  # DataLoader processes decoding a streamed split


def load_split(data_dir: str | os.PathLike, recipe: Recipe, *, cache_dir: str | os.PathLike | None = None,
               val_dir: str | os.PathLike | None = None, device: torch.device | str = "cpu",
               progress: bool = True, stream: bool | None = None, cache_budget: int | None = None,
               workers: int = 2, copies: int = 1, write_cache: bool = True,
               with_monitor: bool = True) -> TrainingSplit:
    """The training files (without the held-out share of every class) and what the run monitors.

    The held-out files are decoded at the monitoring size from their own files; without any,
    ``val_dir`` (if given) is monitored; the training cache moves to ``device`` whole.

    Args:
        stream, cache_budget, copies: see :func:`~cbam_viz.training.stream.choose_data_path`.
        workers: DataLoader processes decoding a streamed split.
        write_cache: False: read an existing decoded-split cache but never write one (ranks of a
            torchrun job other than 0).
        with_monitor: False: skip the monitored split (only rank 0 monitors).
    """
    scan = scan_image_folder(data_dir)
    path = choose_data_path(len(scan.files), recipe.cache_size, stream=stream, budget=cache_budget, copies=copies)
    if path.stream:
        full_ds: TensorDataset | FileSplit = FileSplit.from_scan(scan)
    else:
        full_ds = load_cached_split(data_dir, recipe.cache_size, cache_dir=cache_dir, progress=progress,
                                    write=write_cache)
    train_idx, hold_idx = holdout_split(full_ds, recipe.holdout)
    train_ds = full_ds.subset(train_idx) if len(hold_idx) else full_ds
    holdout_files = tuple(full_ds.files[i] for i in hold_idx.tolist())
    del full_ds
    monitor_ds, monitor_name = None, "val"  # evaluated every recipe.eval_every epochs: the held-out files, else --val
    if holdout_files:
        monitor_name = "holdout"
        if with_monitor:
            images = decode_images([Path(data_dir) / f for f in holdout_files], recipe.eval_size, progress=False)
            monitor_ds = TensorDataset(images, train_ds.labels.new_tensor(
                [train_ds.classes.index(f.split("/")[0]) for f in holdout_files]), train_ds.classes, holdout_files)
    elif val_dir and with_monitor:
        monitor_ds = load_cached_split(val_dir, recipe.eval_size, cache_dir=cache_dir, progress=progress,
                                       write=write_cache)
    images = None if path.stream else train_ds.images.to(device)
    return TrainingSplit(train_ds, images, train_ds.labels.to(device), holdout_files, monitor_ds, monitor_name,
                         path, workers)


def load_split_on_ranks(ctx: DistContext, data_dir: str | os.PathLike, recipe: Recipe, run_dir: Path,
                        **options) -> TrainingSplit:
    """:func:`load_split` on every rank of a torchrun job (or the one process): rank 0 first (it alone
    makes the run folder and writes the decoded-split cache), the others after it, reading that
    cache; rank 0 prints how the training images are read and why."""
    options.update(copies=parallel.local_world(ctx), write_cache=ctx.main, with_monitor=ctx.main)
    options["progress"] = options.get("progress", True) and ctx.main
    split = None
    if ctx.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        split = load_split(data_dir, recipe, **options)
        how = "streamed from the files" if split.path.stream else "decoded once into memory"
        print(f"training images: {how} ({split.path.reason})", flush=True)
    distributed.barrier()
    return split or load_split(data_dir, recipe, **options)


def step_batches(split: TrainingSplit, steps: Sequence[torch.Tensor], *, size: int,
                 device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Each step's uint8 images and labels: indexed from the cache, or decoded from the files at ``size``."""
    if split.images is not None:
        return cached_batches(split.images, split.labels, steps)
    return streamed_batches(split.train, size, steps, workers=split.workers, device=device)
