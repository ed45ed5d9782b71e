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
Under ``torchrun`` the ranks share every batch through DistributedDataParallel
(:mod:`cbam_viz.training.parallel`) and rank 0 alone writes; a split too large for memory is
streamed from its files (:mod:`cbam_viz.training.stream`).
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

from cbam_viz.distributed import DistContext
from cbam_viz.models import create_model
from cbam_viz.outputs import atomic_write
from cbam_viz.training import parallel
from cbam_viz.training.ema import WeightEMA
from cbam_viz.training.monitor import evaluate_tensors
from cbam_viz.training.recipe import (
    Recipe, cpu_has_fast_bf16, hardware_description, lr_at, recipe_differences, train_size_at,
)
from cbam_viz.training.split import TrainingSplit, load_split, load_split_on_ranks, step_batches
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
    ctx: DistContext = field(default_factory=DistContext)  # this process's place under torchrun
    net: nn.Module | None = None  # what the steps call: the model in DistributedDataParallel, else the model
    sync_bn: bool = False

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
    stream: bool | None = None,
    cache_budget: int | None = None,
    workers: int = 2,
    sync_bn: bool = False,
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
        stream: read the training images from their files each step (True), from a decoded
            in-memory cache (False), or choose by the cache's size against ``cache_budget`` (None):
            :func:`~cbam_viz.training.stream.choose_data_path`; the numbers are the same either way.
        cache_budget: bytes the decoded caches may take on this machine (default: half its memory).
        workers: DataLoader processes decoding a streamed split.
        sync_bn: under torchrun on GPUs, normalise BatchNorm over the global batch
            (:mod:`cbam_viz.training.parallel` says what either choice computes).
    """
    if threads:
        torch.set_num_threads(threads)
    ctx, device = parallel.join(_training_device(device, recipe), batch_size=recipe.batch_size, sync_bn=sync_bn)
    run_dir = Path(run_dir)
    split = load_split_on_ranks(ctx, data_dir, recipe, run_dir, cache_dir=cache_dir, val_dir=val_dir, device=device,
                                progress=progress, stream=stream, cache_budget=cache_budget, workers=workers)
    run = start_run(arch, recipe, run_dir, n_classes=len(split.train.classes), device=device, resume=resume,
                    init_record=init_record, ctx=ctx, sync_bn=sync_bn)
    for epoch in range(run.start_epoch, recipe.epochs):
        stats = run_epoch(run, split, epoch, max_steps=max_steps, progress=progress and ctx.main)
        if not stats.complete:  # a partial epoch is not checkpointed: a resumed run redoes it from its start
            return run.result(split, run.wall + stats.seconds)
        run.wall += stats.seconds
        if ctx.main:  # under torchrun rank 0 alone monitors, logs and checkpoints
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


def start_run(arch: str, recipe: Recipe, run_dir: str | os.PathLike, *, n_classes: int, device: torch.device,
              resume: bool = False, init_record: WeightRecord | None = None, ctx: DistContext | None = None,
              sync_bn: bool = False) -> Run:
    """A seeded model, its optimizer and weight average: fresh, from ``init_record``, or resumed.

    The global seed is set right before the model is built, so the same seed gives the same
    initial weights; a resumed run then takes every state from ``run_dir/last.pt``. Under torchrun
    (``ctx``) the model is wrapped for DistributedDataParallel and only rank 0 keeps the weight
    average (it alone checkpoints and exports).
    """
    torch.manual_seed(recipe.seed)
    model = create_model(arch, num_classes=n_classes, zero_init_residual=recipe.zero_init_residual)
    model = model.to(device=device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(_param_groups(model, recipe.weight_decay), lr=recipe.lr,
                                momentum=recipe.momentum, nesterov=True)
    run = Run(arch, recipe, device, Path(run_dir), model, optimizer, None, hardware=hardware_description(device),
              ctx=ctx or DistContext(), sync_bn=sync_bn)
    ckpt = _read_checkpoint(run) if resume else None
    resuming = ckpt is not None
    if recipe.init_from and not resuming:  # a resumed run takes its weights (and this record) from last.pt
        if init_record is None:
            raise ValueError(f"the recipe starts from {recipe.init_from!r}: pass the record to start from")
        run.init = _load_init(model, arch, init_record, recipe.init_from)
    run.ema = WeightEMA(model, recipe.ema_decay) if recipe.ema_decay > 0 else None
    if resuming:
        _resume(run, ckpt)
    if not run.ctx.main:
        run.ema = None
    run.net = parallel.wrap_model(model, run.ctx, sync_bn=sync_bn)
    model.train()
    return run


def _read_checkpoint(run: Run) -> dict[str, Any] | None:
    """``last.pt`` (None where there is none), read by rank 0 and sent to every rank: the others need
    not see rank 0's disk (a job over several machines without a shared folder)."""
    path = run.checkpoint_path
    ckpt = torch.load(path, map_location="cpu", weights_only=True) if run.ctx.main and path.exists() else None
    return parallel.from_rank0(ckpt, run.ctx)


def _resume(run: Run, ckpt: dict[str, Any]) -> None:
    """Load the checkpoint ``ckpt`` into ``run``, refused when another recipe, architecture or number
    of processes made it."""
    ckpt_path = run.checkpoint_path
    saved = Recipe.from_json(ckpt["recipe"])
    if saved != run.recipe or ckpt["arch"] != run.arch:
        diffs = recipe_differences(saved, run.recipe)
        if ckpt["arch"] != run.arch:
            diffs.insert(0, f"arch: {ckpt['arch']!r} -> {run.arch!r}")
        raise ValueError(f"{ckpt_path} was made by another recipe or architecture ({'; '.join(diffs)}); "
                         f"use a new run folder or the same options")
    saved_way, this_way = _processes(ckpt.get("world", 1), ckpt.get("sync_bn", False)), _processes(run.ctx.world,
                                                                                                  run.sync_bn)
    if saved_way != this_way:
        raise ValueError(f"{ckpt_path} was trained on {saved_way} and this run has {this_way}: resume it the same way "
                         f"(each process's share of a batch depends on it), or use a new run folder")
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    if run.ema is not None:
        run.ema.load(ckpt["ema"], run.model)
    run.start_epoch, run.wall, run.history = ckpt["epoch"] + 1, ckpt["wall_time_s"], ckpt["history"]
    # The checkpoint is the record: a run killed between its log line and its checkpoint left a
    # line for an epoch that is trained again now, so the log restarts from the checkpoint's history.
    run.init = json.loads(ckpt["init"]) if "init" in ckpt else None
    if run.ctx.main:
        atomic_write(run.log_path, lambda f: f.write("".join(json.dumps(h) + "\n" for h in run.history).encode()))
        print(f"resuming {run.arch} from epoch {run.start_epoch} ({run.wall / 60:.1f} min done)")


def _processes(world: int, sync_bn: bool) -> str:
    """``"1 process"``, ``"2 processes"``, ``"2 processes with --sync-bn"``: how a run was split."""
    return f"{world} process{'es' if world > 1 else ''}{' with --sync-bn' if sync_bn else ''}"


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
    steps = parallel.rank_steps(order, recipe.batch_size, steps_per_epoch, run.ctx)  # all of each batch on 1 process
    batches = step_batches(split, steps, size=recipe.cache_size, device=run.device)
    share = (run.ctx.rank, run.ctx.world)
    t0 = time.perf_counter()
    seen, complete = 0, True
    step_losses, step_hits, step_sizes = [], [], []
    bar = tqdm(range(steps_per_epoch), desc=f"{run.arch} ep {epoch + 1}/{recipe.epochs} {size}px",
               disable=not progress, dynamic_ncols=True)
    for i, (images, y) in zip(bar, batches):
        step = epoch * steps_per_epoch + i
        for group in optimizer.param_groups:
            group["lr"] = lr_at(recipe, step, steps_per_epoch)
        loss, logits = train_step(run.net or run.model, optimizer, images, y, recipe=recipe, size=size, generator=gen,
                                  share=share)
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
    loss_sum, correct, seen = parallel.reduce_sums(*_epoch_sums(step_losses, step_hits, step_sizes), seen, run.ctx)
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
            "precision": "bf16" if run.recipe.bf16 else "fp32",
            **({"processes": run.ctx.world, "sync_bn": run.sync_bn} if run.ctx.world > 1 else {})}


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
             "world": run.ctx.world, "sync_bn": run.sync_bn,
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
