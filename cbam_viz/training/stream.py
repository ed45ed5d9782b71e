"""Training batches decoded from the files per step: the data path for splits that do not fit in memory.

The trainer's usual path decodes a split once into one uint8 tensor (:mod:`cbam_viz.training.data`):
fast, but ImageNet's 1.28 million training images at 144 px would take ~80 GB, once per process.
The streamed path keeps only the file list and the labels in memory; DataLoader worker processes
decode each step's files with the very function that fills the cache (:func:`decode_one`), so a
batch streamed from disk is the same uint8 tensor the cache would have given, and
:func:`cbam_viz.training.step.train_step` augments it with the same draws: a run's numbers do not
depend on the data path, only its speed does.

:func:`choose_data_path` picks the path: streamed when asked (``--stream``) or when the cache's
estimated size (files x size x size x 3 bytes, times the processes on this machine, each of which
holds its own copy) is over the memory budget (``--cache-budget``; default half of this machine's
memory), and says why.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from cbam_viz.training.data import ImageFolderScan, decode_one

__all__ = ["FileSplit", "DataPath", "parse_bytes", "format_bytes", "default_budget", "choose_data_path",
           "cached_batches", "streamed_batches"]

_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}


def parse_bytes(text: str) -> int:
    """``"8G"``, ``"512M"``, ``"1.5T"`` or a plain number of bytes, as an integer number of bytes.

    Raises:
        ValueError: anything else (one sentence naming the accepted forms).
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", str(text))
    if not match:
        raise ValueError(f"a memory size is a number with an optional unit K, M, G or T (e.g. 8G), got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def format_bytes(n: float) -> str:
    """``n`` bytes in the largest unit that keeps the number >= 1 (binary units: 1 G = 1024 M)."""
    for unit in ("T", "G", "M", "K"):
        if n >= _UNITS[unit]:
            return f"{n / _UNITS[unit]:.1f} {unit}B"
    return f"{int(n)} B"


def default_budget() -> int:
    """Half of this machine's physical memory: room for the model, the optimizer and the OS."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


@dataclass(frozen=True)
class DataPath:
    """How a run reads its training images, and why (printed when the run starts)."""

    stream: bool
    reason: str


def choose_data_path(n_files: int, size: int, *, stream: bool | None = None, budget: int | None = None,
                     copies: int = 1) -> DataPath:
    """Cache the decoded split in memory, or stream it from the files.

    Args:
        n_files: images in the training folder.
        size: the cache's square side (``recipe.cache_size``).
        stream: True or False forces the path (``--stream`` / ``--no-stream``); None chooses by size.
        budget: bytes the caches may take together (default :func:`default_budget`).
        copies: processes on this machine, each holding its own cache (torchrun's ``LOCAL_WORLD_SIZE``).
    """
    if stream is not None:
        return DataPath(stream, "--stream" if stream else "--no-stream")
    budget = default_budget() if budget is None else budget
    need = n_files * size * size * 3 * copies
    sum_text = (f"{n_files} files x {size} x {size} x 3 bytes{f' x {copies} processes' if copies > 1 else ''}"
                f" = {format_bytes(need)}")
    if need > budget:
        return DataPath(True, f"{sum_text}, over the {format_bytes(budget)} memory budget (--cache-budget)")
    return DataPath(False, f"{sum_text}, within the {format_bytes(budget)} memory budget (--cache-budget)")


@dataclass
class FileSplit:
    """A split kept as files: the streamed path's stand-in for :class:`~cbam_viz.training.data.TensorDataset`
    (the same ``labels``, ``classes``, ``files``, ``len`` and ``subset``; no ``images``)."""

    root: Path
    labels: torch.Tensor
    classes: tuple[str, ...]
    files: tuple[str, ...]

    @classmethod
    def from_scan(cls, scan: ImageFolderScan) -> "FileSplit":
        return cls(scan.root, torch.tensor(scan.labels, dtype=torch.int64), scan.classes, scan.files)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> "FileSplit":
        return FileSplit(self.root, self.labels[indices], self.classes, tuple(self.files[i] for i in indices.tolist()))


class _DecodedFiles(Dataset):
    """Item ``i``: file ``i`` decoded to a ``(3, size, size)`` uint8 tensor, as the cache holds it."""

    def __init__(self, split: FileSplit, size: int) -> None:
        self.split, self.size = split, size

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> torch.Tensor:
        return decode_one(self.split.root / self.split.files[i], self.size)


def _stack(items: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(items)


def cached_batches(images: torch.Tensor, labels: torch.Tensor,
                   steps: Sequence[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, labels)`` of each step's indices from the in-memory split (on its device)."""
    for idx in steps:
        idx = idx.to(images.device)
        yield images[idx], labels[idx]


def streamed_batches(split: FileSplit, size: int, steps: Sequence[torch.Tensor], *, workers: int = 2,
                     device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, labels)`` of each step's indices, decoded from the files by ``workers`` processes.

    The workers decode a few steps ahead of the training step (``prefetch_factor``); with
    ``workers=0`` the training process decodes each batch itself. A run stopped early (``max_steps``)
    simply drops the generator, which ends the workers.
    """
    device = torch.device(device)
    loader = DataLoader(_DecodedFiles(split, size), batch_sampler=[idx.tolist() for idx in steps],
                        num_workers=workers, collate_fn=_stack, pin_memory=device.type == "cuda",
                        prefetch_factor=2 if workers else None)
    for idx, images in zip(steps, loader):
        yield images.to(device, non_blocking=True), split.labels[idx].to(device)
