"""Train a registered model on an ImageFolder dataset, fast on a small CPU, resumable.

One :class:`~cbam_viz.training.recipe.Recipe` serves every model: the same seed gives the same
data order and the same augmentation draws (both derived from ``(seed, epoch)``:
:func:`epoch_order`), so members of a lineup trained with one recipe differ only in architecture.

Speed on a 2-core CPU comes from: decoding the JPEGs once into a cached uint8 tensor
(:mod:`cbam_viz.training.data`), whole-batch augmentation in one ``grid_sample``, channels-last
memory format, bfloat16 autocast where the CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX;
see :func:`~cbam_viz.training.recipe.cpu_has_fast_bf16`) and progressive resizing (small images
early, full size at the end, as in fast.ai's Imagenette runs). On a CPU without those instructions
oneDNN emulates bfloat16 and a training step is over 10x *slower* than float32 (measured on an
AVX2-only AMD EPYC: 3.3 vs 41.9 img/s for resnet18_cbam at 96 px), so the CLI's default
``--bf16 auto`` asks the CPU first.

:func:`train` is a sequence of named steps: :func:`load_split` and :func:`start_run` (a fresh or a
resumed run), then per epoch :func:`run_epoch` (:func:`~cbam_viz.training.step.epoch_order` and
one :func:`~cbam_viz.training.step.train_step` per batch), :func:`monitor` (every ``eval_every``
epochs) and :func:`checkpoint`; writing the weights out is :mod:`cbam_viz.training.export`.
Every epoch ends with a checkpoint (``last.pt``, written atomically) and a JSON line in
``log.jsonl``; ``resume=True`` continues from the last finished epoch, bit for bit the same run
as an uninterrupted one on a CPU (on a GPU, cuDNN's fastest kernels are not deterministic, so two
runs, resumed or not, agree only to floating-point noise).
"""
from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from cbam_viz.models import create_model
from cbam_viz.outputs import atomic_write
from cbam_viz.training.data import TensorDataset, decode_images, holdout_split, load_cached_split
from cbam_viz.training.ema import WeightEMA
from cbam_viz.training.monitor import evaluate_tensors
from cbam_viz.training.recipe import (
    Recipe, cpu_has_fast_bf16, hardware_description, lr_at, recipe_differences, train_size_at,
)
from cbam_viz.training.step import epoch_order, train_step
from cbam_viz.models.weights import WeightRecord, load_record

__all__ = ["TrainResult", "TrainingSplit", "Run", "EpochStats", "train", "load_split", "start_run", "run_epoch",
           "monitor", "checkpoint"]

#: Steps between two progress-bar updates (each reads the running loss back from the device).
_POSTFIX_EVERY = 20


@dataclass
class TrainResult:
    """What a call of :func:`train` leaves: the model (and its weight average), the epochs it logged."""

    run_dir: Path
    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_time_s: float = 0.0
    ema_model: nn.Module | None = None  # the weight average, when the recipe keeps one
    holdout_files: tuple[str, ...] = ()  # training files held out of this run ("<class>/<file>")
    init: dict[str, Any] | None = None  # the record this run started from (see Recipe.init_from)


@dataclass
class TrainingSplit:
    """What a run trains on (on its device) and what it monitors: the held-out files, else ``--val``."""

    train: TensorDataset
    images: torch.Tensor  # train.images on the training device
    labels: torch.Tensor
    holdout_files: tuple[str, ...]
    monitor: TensorDataset | None
    monitor_name: str  # "holdout" or "val": the prefix of the monitored figures in the log


@dataclass
class Run:
    """The state a run carries from epoch to epoch, and into its checkpoint."""

    arch: str
    recipe: Recipe
    device: torch.device
    run_dir: Path
    model: nn.Module
    optimizer: torch.optim.Optimizer
    ema: WeightEMA | None
    start_epoch: int = 0
    wall: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    init: dict[str, Any] | None = None
    steps_this_call: int = 0
    hardware: str = ""  # what trains it, for every epoch's log line

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "last.pt"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "log.jsonl"

    def result(self, split: TrainingSplit, wall: float) -> TrainResult:
        ema_model = self.ema.model_copy(self.model) if self.ema is not None else None
        return TrainResult(self.run_dir, self.model, self.history, wall, ema_model, split.holdout_files, self.init)


@dataclass(frozen=True)
class EpochStats:
    """What one epoch measured: its train size, summed loss and hits, images and seconds."""

    size: int
    loss_sum: float
    correct: int
    seen: int
    seconds: float
    complete: bool  # False: ``max_steps`` stopped it before its last step


def train(
    arch: str,
    data_dir: str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    recipe: Recipe = Recipe(),
    resume: bool = False,
    cache_dir: str | os.PathLike | None = None,
    val_dir: str | os.PathLike | None = None,
    threads: int | None = None,
    max_steps: int | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    init_record: WeightRecord | None = None,
) -> TrainResult:
    """Train ``arch`` with ``recipe`` on ``data_dir`` (ImageFolder layout); checkpoint every epoch.

    Args:
        arch: a registered model name, e.g. ``"resnet18_cbam"``.
        data_dir: training folder (``<class>/<image>``).
        run_dir: where ``last.pt``, ``log.jsonl`` and ``model.safetensors`` go.
        recipe: hyper-parameters; on resume it must equal the saved one.
        resume: continue from ``run_dir/last.pt`` if it exists.
        cache_dir: where decoded splits are cached (decoding happens once per split and size).
        val_dir: optional validation folder, evaluated every ``recipe.eval_every`` epochs and last.
        threads: torch intra-op threads (default: all cores).
        max_steps: stop after this many optimizer steps in this call (for tests and smoke runs).
        device: ``"cpu"`` (default) or ``"cuda"``: on a GPU the uint8 training cache, the batched
            augmentation, the model, its optimizer and weight average all live on the device
            (bfloat16 autocast there too); the data order and augmentation draws are the same
            CPU-generated numbers, so only the hardware's arithmetic differs. Each epoch's log
            line says which device ran it.
        init_record: the record (in ``recipe.init_from``) whose weights this run starts from; its
            recipe, training and metrics travel into the checkpoint and the exported record, so
            the shipped file still says how the first stage was trained. Not needed to resume:
            the checkpoint holds the weights and the record.
    """
    if threads:
        torch.set_num_threads(threads)
    device = _training_device(device, recipe)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    split = load_split(data_dir, recipe, cache_dir=cache_dir, val_dir=val_dir, device=device, progress=progress)
    run = start_run(arch, recipe, run_dir, n_classes=len(split.train.classes), device=device, resume=resume,
                    init_record=init_record)
    for epoch in range(run.start_epoch, recipe.epochs):
        stats = run_epoch(run, split, epoch, max_steps=max_steps, progress=progress)
        if not stats.complete:  # a partial epoch is not checkpointed: a resumed run redoes it from its start
            return run.result(split, run.wall + stats.seconds)
        run.wall += stats.seconds
        entry = _epoch_entry(run, epoch, stats)
        monitor(run, split, entry, last=epoch == recipe.epochs - 1)
        entry["wall_time_s"] = run.wall
        _log(run, entry)
        checkpoint(run, split, epoch)
    run.model.eval()
    return run.result(split, run.wall)


def _training_device(device: str | torch.device | None, recipe: Recipe) -> torch.device:
    """The device asked for, refused where it is missing; a warning where bfloat16 would be emulated."""
    device = torch.device(device or "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"training on {device} was asked for, but CUDA is not available on this machine")
    if recipe.bf16 and device.type == "cpu" and not cpu_has_fast_bf16():
        warnings.warn("bfloat16 autocast on a CPU without AVX-512 BF16 or AMX is emulated and over 10x "
                      "slower than float32 here; train with bf16=False (CLI: --bf16 off or auto)", stacklevel=3)
    return device


def load_split(data_dir: str | os.PathLike, recipe: Recipe, *, cache_dir: str | os.PathLike | None = None,
               val_dir: str | os.PathLike | None = None, device: torch.device | str = "cpu",
               progress: bool = True) -> TrainingSplit:
    """The training files (without the held-out share of every class) and what the run monitors.

    The held-out files are decoded at the monitoring size from their own files; without any,
    ``val_dir`` (if given) is monitored; the training cache moves to ``device`` whole.
    """
    full_ds = load_cached_split(data_dir, recipe.cache_size, cache_dir=cache_dir, progress=progress)
    train_idx, hold_idx = holdout_split(full_ds, recipe.holdout)
    train_ds = full_ds.subset(train_idx) if len(hold_idx) else full_ds
    holdout_files = tuple(full_ds.files[i] for i in hold_idx.tolist())
    del full_ds
    monitor_ds, monitor_name = None, "val"  # evaluated every recipe.eval_every epochs: the held-out files, else --val
    if holdout_files:
        monitor_name = "holdout"
        images = decode_images([Path(data_dir) / f for f in holdout_files], recipe.eval_size, progress=False)
        monitor_ds = TensorDataset(images, train_ds.labels.new_tensor(
            [train_ds.classes.index(f.split("/")[0]) for f in holdout_files]), train_ds.classes, holdout_files)
    elif val_dir:
        monitor_ds = load_cached_split(val_dir, recipe.eval_size, cache_dir=cache_dir, progress=progress)
    return TrainingSplit(train_ds, train_ds.images.to(device), train_ds.labels.to(device), holdout_files,
                         monitor_ds, monitor_name)


def start_run(arch: str, recipe: Recipe, run_dir: str | os.PathLike, *, n_classes: int, device: torch.device,
              resume: bool = False, init_record: WeightRecord | None = None) -> Run:
    """A seeded model, its optimizer and weight average: fresh, from ``init_record``, or resumed.

    The global seed is set right before the model is built, so the same seed gives the same
    initial weights; a resumed run then takes every state from ``run_dir/last.pt``.
    """
    torch.manual_seed(recipe.seed)
    model = create_model(arch, num_classes=n_classes, zero_init_residual=recipe.zero_init_residual)
    model = model.to(device=device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(_param_groups(model, recipe.weight_decay), lr=recipe.lr,
                                momentum=recipe.momentum, nesterov=True)
    run = Run(arch, recipe, device, Path(run_dir), model, optimizer, None, hardware=hardware_description(device))
    resuming = resume and run.checkpoint_path.exists()
    if recipe.init_from and not resuming:  # a resumed run takes its weights (and this record) from last.pt
        if init_record is None:
            raise ValueError(f"the recipe starts from {recipe.init_from!r}: pass the record to start from")
        run.init = _load_init(model, arch, init_record, recipe.init_from)
    run.ema = WeightEMA(model, recipe.ema_decay) if recipe.ema_decay > 0 else None
    if resuming:
        _resume(run)
    model.train()
    return run


def _resume(run: Run) -> None:
    """Load ``last.pt`` into ``run``, refused when another recipe or architecture made it."""
    ckpt_path = run.checkpoint_path
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    saved = Recipe.from_json(ckpt["recipe"])
    if saved != run.recipe or ckpt["arch"] != run.arch:
        diffs = recipe_differences(saved, run.recipe)
        if ckpt["arch"] != run.arch:
            diffs.insert(0, f"arch: {ckpt['arch']!r} -> {run.arch!r}")
        raise ValueError(f"{ckpt_path} was made by another recipe or architecture ({'; '.join(diffs)}); "
                         f"use a new run folder or the same options")
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    if run.ema is not None:
        run.ema.load(ckpt["ema"], run.model)
    run.start_epoch, run.wall, run.history = ckpt["epoch"] + 1, ckpt["wall_time_s"], ckpt["history"]
    # The checkpoint is the record: a run killed between its log line and its checkpoint left a
    # line for an epoch that is trained again now, so the log restarts from the checkpoint's history.
    atomic_write(run.log_path, lambda f: f.write("".join(json.dumps(h) + "\n" for h in run.history).encode()))
    run.init = json.loads(ckpt["init"]) if "init" in ckpt else None
    print(f"resuming {run.arch} from epoch {run.start_epoch} ({run.wall / 60:.1f} min done)")


def run_epoch(run: Run, split: TrainingSplit, epoch: int, *, max_steps: int | None = None,
              progress: bool = False) -> EpochStats:
    """One epoch of :func:`train_step` over :func:`epoch_order`, the learning rate set per step.

    Per-step loss and hits stay on the device: reading them (.item()) every step would make a GPU
    wait for each step to finish. They are read for the progress bar every ``_POSTFIX_EVERY``
    steps and summed once at the end of the epoch, in the order a per-step float sum would add
    them (the logged figures stay the same to the last digit).
    """
    recipe, optimizer = run.recipe, run.optimizer
    size = train_size_at(recipe, epoch)
    steps_per_epoch = len(split.train) // recipe.batch_size
    gen, order = epoch_order(recipe, epoch, len(split.train))
    t0 = time.perf_counter()
    seen, complete = 0, True
    step_losses, step_hits, step_sizes = [], [], []
    bar = tqdm(range(steps_per_epoch), desc=f"{run.arch} ep {epoch + 1}/{recipe.epochs} {size}px",
               disable=not progress, dynamic_ncols=True)
    for i in bar:
        step = epoch * steps_per_epoch + i
        for group in optimizer.param_groups:
            group["lr"] = lr_at(recipe, step, steps_per_epoch)
        idx = order[i * recipe.batch_size:(i + 1) * recipe.batch_size].to(run.device)
        y = split.labels[idx]
        loss, logits = train_step(run.model, optimizer, split.images[idx], y, recipe=recipe, size=size, generator=gen)
        if run.ema is not None:
            run.ema.update(step)
        seen += len(y)
        step_losses.append(loss.detach())
        step_hits.append((logits.argmax(1) == y).sum())
        step_sizes.append(len(y))
        if progress and i % _POSTFIX_EVERY == 0:
            loss_sum, correct = _epoch_sums(step_losses, step_hits, step_sizes)
            elapsed = time.perf_counter() - t0
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", ips=f"{seen / elapsed:.0f}")
        run.steps_this_call += 1
        if max_steps is not None and run.steps_this_call >= max_steps:
            complete = i == steps_per_epoch - 1
            break
    bar.close()
    loss_sum, correct = _epoch_sums(step_losses, step_hits, step_sizes)
    return EpochStats(size, loss_sum, correct, seen, time.perf_counter() - t0, complete)


def _epoch_sums(losses: list[torch.Tensor], hits: list[torch.Tensor], sizes: list[int]) -> tuple[float, int]:
    """(sum of loss x batch size, correct predictions) over the steps so far: one device read."""
    if not losses:
        return 0.0, 0
    loss_values = torch.stack(losses).float().cpu().tolist()
    correct = int(torch.stack(hits).sum().cpu())
    return sum(value * n for value, n in zip(loss_values, sizes)), correct


def _epoch_entry(run: Run, epoch: int, stats: EpochStats) -> dict[str, Any]:
    """The epoch's log line, before monitoring adds its figures."""
    return {"epoch": epoch + 1, "size": stats.size, "train_loss": stats.loss_sum / stats.seen,
            "train_acc": stats.correct / stats.seen, "img_per_s": stats.seen / stats.seconds,
            "epoch_time_s": stats.seconds, "lr_end": run.optimizer.param_groups[0]["lr"], "device": run.hardware,
            "precision": "bf16" if run.recipe.bf16 else "fp32"}


def monitor(run: Run, split: TrainingSplit, entry: dict[str, Any], *, last: bool) -> None:
    """Score the model (and its weight average) on the monitored split every ``eval_every`` epochs
    and after the last; the figures go into ``entry``, the time into the run's wall time."""
    recipe = run.recipe
    if split.monitor is None or not (entry["epoch"] % recipe.eval_every == 0 or last):
        return
    t1 = time.perf_counter()
    name = split.monitor_name
    ev = evaluate_tensors(run.model, split.monitor, size=recipe.eval_size, mean=recipe.mean, std=recipe.std,
                          bf16=recipe.bf16)
    entry.update({f"{name}_top1": ev["top1"], f"{name}_top5": ev["top5"]})
    if run.ema is not None:
        ev = evaluate_tensors(run.ema.model_copy(run.model), split.monitor, size=recipe.eval_size, mean=recipe.mean,
                              std=recipe.std, bf16=recipe.bf16)
        entry[f"{name}_top1_ema"] = ev["top1"]
    entry["eval_time_s"] = time.perf_counter() - t1
    run.wall += entry["eval_time_s"]


def _log(run: Run, entry: dict[str, Any]) -> None:
    """Append the epoch to the history, ``log.jsonl`` and stdout."""
    run.history.append(entry)
    with open(run.log_path, "a") as f:
        f.write(json.dumps(entry) + "\n")
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in entry.items()}), flush=True)


def checkpoint(run: Run, split: TrainingSplit, epoch: int) -> None:
    """Write ``last.pt`` atomically: everything a resumed run needs to continue bit for bit."""
    state = {"arch": run.arch, "recipe": run.recipe.to_json(), "epoch": epoch, "wall_time_s": run.wall,
             "history": run.history, "classes": list(split.train.classes), "holdout_files": list(split.holdout_files),
             **({"init": json.dumps(run.init)} if run.init is not None else {}),
             "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
             **({"ema": run.ema.state} if run.ema is not None else {})}
    atomic_write(run.checkpoint_path, lambda f: torch.save(state, f))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _load_init(model: nn.Module, arch: str, record: WeightRecord, weights_dir: str | os.PathLike) -> dict[str, Any]:
    """Copy ``record``'s weights (sha256-checked) into ``model``; return what the manifest keeps of it."""
    if record.arch != arch:
        raise ValueError(f"cannot start {arch} from {record.name!r}: that record is a {record.arch}")
    model.load_state_dict(load_record(record, weights_dir).state_dict())  # copy_ casts and moves each tensor
    return {"name": record.name, "sha256": record.sha256, "input_size": record.input_size,
            "recipe": record.recipe, "training": record.training,
            "metrics": {k: v for k, v in record.metrics.items() if k in ("val_top1", "val_top5", "val_hflip_top1")}}
