"""Train a registered model on an ImageFolder dataset, fast on a small CPU, resumable.

One :class:`Recipe` serves every model: the same seed gives the same data order and the same
augmentation draws (both derived from ``(seed, epoch)``), so a baseline and its CBAM twin trained
with one recipe differ only in architecture.

Speed on a 2-core CPU comes from: decoding the JPEGs once into a cached uint8 tensor
(:mod:`cbam_viz.training.data`), whole-batch augmentation in one ``grid_sample``, channels-last memory
format, bfloat16 autocast where the CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX; see
:func:`cpu_has_fast_bf16`) and progressive resizing (small images early, full size at the end, as
in fast.ai's Imagenette runs). On a CPU without those instructions oneDNN emulates bfloat16 and
a training step is over 10x *slower* than float32 (measured on an AVX2-only AMD EPYC: 3.3 vs 41.9
img/s for resnet18_cbam at 96 px), so the CLI's default ``--bf16 auto`` asks the CPU first.

Every epoch ends with a checkpoint (``last.pt``, written atomically) and a JSON line in
``log.jsonl``; ``resume=True`` continues from the last finished epoch, bit for bit the same run
as an uninterrupted one on a CPU (on a GPU, cuDNN's fastest kernels are not deterministic, so two
runs, resumed or not, agree only to floating-point noise).
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cbam_viz.training.data import (
    IMAGENET_MEAN, IMAGENET_STD, IMAGENETTE_NAMES, TensorDataset, decode_images, holdout_split, load_cached_split,
    mix_batch, normalize, random_resized_crop_flip, resize_batch,
)
from cbam_viz.models import create_model
from cbam_viz.outputs import atomic_write
from cbam_viz.weights import WeightRecord, save_safetensors, update_manifest

__all__ = ["Recipe", "train", "evaluate_tensors", "train_size_at", "train_step", "cpu_has_fast_bf16", "recipe_differences",
           "json_differences", "recalibrate_batchnorm", "WeightEMA", "hardware_description", "TrainResult", "export"]


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters shared by both models of a pair; recorded in the weights manifest."""

    epochs: int = 100
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4  # on conv / linear weights only, not BN or biases
    label_smoothing: float = 0.1
    warmup_epochs: float = 2.0
    # Progressive resizing: (first epoch, train size) steps. Most epochs run small (cheap); the last
    # ten run at 176 px, ~1.1x under the test size the held-out split chose (192): the shipped pair's
    # schedule (the pair before it ended at 144 px: ((0, 96), (45, 112), (75, 128), (90, 144))).
    sizes: tuple[tuple[int, int], ...] = ((0, 96), (45, 112), (70, 128), (82, 144), (90, 176))
    cache_size: int = 176
    crop_scale: tuple[float, float] = (0.25, 1.0)
    # Mixing two training images per batch (data.mix_batch), alpha of the Beta draw; 0 = off.
    cutmix_alpha: float = 0.0
    mixup_alpha: float = 0.0
    # Monitoring size during training, ~1.1x above the last train size: random-resized crops magnify
    # objects, so a larger test image shows them at the size the network learned (Touvron et al.,
    # FixRes, 2019). The shipped size is chosen after training on the held-out split.
    eval_size: int = 192
    eval_every: int = 10
    # Share of every training class held out (by file name) to choose post-training options on.
    holdout: float = 0.08
    # Exponential moving average of the weights (0 = off); ~1/(1 - decay) steps of memory.
    ema_decay: float = 0.999
    # A weights folder whose records ``<arch>_<name>`` the run starts from instead of a random
    # initialisation (a second, fine-tuning stage); "" = from scratch.
    init_from: str = ""
    zero_init_residual: bool = True
    bf16: bool = True
    seed: int = 0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Recipe":
        tuples = {"sizes", "crop_scale", "mean", "std"}
        # Recipes recorded before a field existed ran without it: read them back as "off".
        kw: dict[str, Any] = {"holdout": 0.0, "ema_decay": 0.0}
        for k, v in data.items():
            if k == "sizes":
                v = tuple(tuple(s) for s in v)
            elif k in tuples:
                v = tuple(v)
            kw[k] = v
        return cls(**kw)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bfloat16 matrix products in hardware (AVX-512 BF16 or AMX-BF16).

    Only then is bfloat16 autocast a speed-up for training; elsewhere it is emulated and slow.
    """
    for probe_name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        probe = getattr(torch.cpu, probe_name, None)  # private, so looked up defensively
        if probe is not None and probe():
            return True
    return False


def hardware_description(device: torch.device | str = "cpu") -> str:
    """What trained an epoch, for the log and the manifest: the GPU's name, or the CPU model and threads."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {model}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}"


class WeightEMA:
    """Exponential moving average of a model's floating-point state: weights and BN statistics.

    Averaging the last few thousand steps' weights smooths the noise of small-batch SGD; whether it
    helps a given schedule is decided on the held-out split, not assumed. The average is updated
    in place with one fused ``lerp`` per step (a few ms for a ResNet-18 on a CPU), with the usual
    warm-up ``decay_t = min(decay, (1 + t) / (10 + t))`` so the first steps are not averaged with
    the random initialisation. Integer buffers (BN's batch counters) are copied.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._bind(model)

    def _bind(self, model: nn.Module) -> None:
        live = model.state_dict()
        self._float = [(self.state[k], v) for k, v in live.items() if v.dtype.is_floating_point]
        self._other = [(self.state[k], v) for k, v in live.items() if not v.dtype.is_floating_point]

    def load(self, state: dict[str, torch.Tensor], model: nn.Module) -> None:
        for k, v in state.items():
            self.state[k].copy_(v)
        self._bind(model)

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        ema, live = zip(*self._float)
        torch._foreach_lerp_(list(ema), list(live), 1.0 - decay)
        for dst, src in self._other:
            dst.copy_(src)

    def model_copy(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` holding the averaged state (in eval mode)."""
        import copy

        twin = copy.deepcopy(model)
        twin.load_state_dict(self.state)
        return twin.eval()


def recipe_differences(saved: Recipe, wanted: Recipe) -> list[str]:
    """``field: saved -> wanted`` for each field where two recipes differ (for resume errors)."""
    return json_differences(saved.to_json(), wanted.to_json())


def json_differences(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``key: a -> b`` for each key where two JSON-like mappings differ; nested keys as ``outer.inner``.

    One wording for every "what differs" error (a resumed recipe, a half's carried settings), so
    the user reads which option to put back the same way everywhere.
    """
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, Mapping) and isinstance(y, Mapping):
            out += json_differences(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}: {x!r} -> {y!r}")
    return out


def train_size_at(recipe: Recipe, epoch: int) -> int:
    size = recipe.sizes[0][1]
    for start, s in recipe.sizes:
        if epoch >= start:
            size = s
    return size


#: Steps between two progress-bar updates (each reads the running loss back from the device).
_POSTFIX_EVERY = 20


def _epoch_sums(losses: list[torch.Tensor], hits: list[torch.Tensor], sizes: list[int]) -> tuple[float, int]:
    """(sum of loss x batch size, correct predictions) over the steps so far: one device read."""
    if not losses:
        return 0.0, 0
    loss_values = torch.stack(losses).float().cpu().tolist()
    correct = int(torch.stack(hits).sum().cpu())
    return sum(value * n for value, n in zip(loss_values, sizes)), correct


def _lr_at(recipe: Recipe, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up, then cosine decay to zero, as a pure function of the step."""
    total = recipe.epochs * steps_per_epoch
    warm = max(1, int(recipe.warmup_epochs * steps_per_epoch))
    if step < warm:
        return recipe.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return recipe.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate_tensors(model: nn.Module, ds: TensorDataset, *, size: int, mean, std, batch_size: int = 100,
                     bf16: bool = False, hflip: bool = False, progress: bool = False) -> dict[str, Any]:
    """Top-1/top-5 accuracy and the confusion matrix of ``model`` on an in-memory split.

    ``hflip``: average the softmax of each image and its mirror image (test-time augmentation).
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    n_cls = len(ds.classes)
    confusion = torch.zeros((n_cls, n_cls), dtype=torch.int64)
    top5_hits = 0
    device = next(model.parameters()).device
    try:
        for i in tqdm(range(0, len(ds), batch_size), desc=f"eval {size}px", disable=not progress, leave=False):
            x = resize_batch(ds.images[i:i + batch_size].to(device).float().div_(255), size)
            x = normalize(x, mean, std).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(x).float()
                if hflip:  # log of the mean probability: argmax and top-k as for averaged softmax
                    probs = logits.softmax(1) + model(x.flip(3)).float().softmax(1)
                    logits = (probs / 2).log()
            logits = logits.cpu()
            y = ds.labels[i:i + batch_size]
            pred = logits.argmax(1)
            confusion += torch.bincount(y * n_cls + pred, minlength=n_cls * n_cls).view(n_cls, n_cls)
            k = min(5, n_cls)
            top5_hits += (logits.topk(k, 1).indices == y[:, None]).any(1).sum().item()
    finally:
        model.train(was_training)
    per_class = (confusion.diag().float() / confusion.sum(1).clamp(min=1).float()).tolist()
    return {
        "top1": confusion.diag().sum().item() / len(ds),
        "top5": top5_hits / len(ds),
        "per_class": dict(zip(ds.classes, per_class)),
        "confusion": confusion.tolist(),
        "n": len(ds),
        "size": size,
    }


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor, *,
               recipe: Recipe, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a uint8 batch: crop + flip to ``size``, mix (if the recipe does),
    normalise, forward, backward.

    The whole per-step work of :func:`train` (the learning rate is set by the caller), so that
    ``benchmarks/bench_train.py`` times exactly what training runs. Returns the loss and logits
    (under mixing, the train accuracy the caller counts is against each image's own label).
    """
    x = random_resized_crop_flip(images.float().div_(255), size, generator=generator, scale=recipe.crop_scale)
    x, partner, lam = mix_batch(x, generator=generator, cutmix_alpha=recipe.cutmix_alpha,
                                mixup_alpha=recipe.mixup_alpha)
    x = normalize(x, recipe.mean, recipe.std).contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=recipe.bf16):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=recipe.label_smoothing)
    if lam < 1.0:  # each image's partner label takes the rest of the weight
        loss = lam * loss + (1 - lam) * F.cross_entropy(logits.float(), labels[partner],
                                                          label_smoothing=recipe.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, logits


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, ds: TensorDataset, *, size: int, mean, std, images: int = 2048,
                          batch_size: int = 64, seed: int = 0) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics on un-augmented images at ``size`` px.

    Training ends on random-resized crops at a smaller size than the test images; FixRes (Touvron
    et al., 2019) notes the BN statistics then describe the wrong distribution. This recomputes
    them as an exact average over ``images`` training images (``momentum=None``), seen whole and
    stretched to ``size`` as at test time; weights are untouched. Each BN's momentum and the
    model's train/eval mode are restored. (Measured on the shipped Imagenette pair it moved top-1 by
    -0.13 and +0.43 points, so the recipe does not use it; see the README's model card.)
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    was_training = model.training
    device = next(model.parameters()).device  # the cache stays on the CPU; each batch goes to the model
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:images]
    try:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the batches below
        model.train()
        for i in range(0, len(idx), batch_size):
            x = resize_batch(ds.images[idx[i:i + batch_size]].to(device).float().div_(255), size)
            model(normalize(x, mean, std).contiguous(memory_format=torch.channels_last))
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        model.train(was_training)
    return model


@dataclass
class TrainResult:
    run_dir: Path
    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_time_s: float = 0.0
    ema_model: nn.Module | None = None  # the weight average, when the recipe keeps one
    holdout_files: tuple[str, ...] = ()  # training files held out of this run ("<class>/<file>")
    init: dict[str, Any] | None = None  # the record this run started from (see Recipe.init_from)


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
    init_record: "WeightRecord | None" = None,
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
    from tqdm.auto import tqdm

    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device or "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"training on {device} was asked for, but CUDA is not available on this machine")
    if recipe.bf16 and device.type == "cpu" and not cpu_has_fast_bf16():
        warnings.warn("bfloat16 autocast on a CPU without AVX-512 BF16 or AMX is emulated and over 10x "
                      "slower than float32 here; train with bf16=False (CLI: --bf16 off or auto)", stacklevel=2)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = run_dir / "last.pt", run_dir / "log.jsonl"

    full_ds = load_cached_split(data_dir, recipe.cache_size, cache_dir=cache_dir, progress=progress)
    train_idx, hold_idx = holdout_split(full_ds, recipe.holdout)
    train_ds = full_ds.subset(train_idx) if len(hold_idx) else full_ds
    holdout_files = tuple(full_ds.files[i] for i in hold_idx.tolist())
    del full_ds
    monitor_ds = None  # evaluated every recipe.eval_every epochs: the held-out files, else --val
    if holdout_files:
        monitor_name = "holdout"
        images = decode_images([Path(data_dir) / f for f in holdout_files], recipe.eval_size, progress=False)
        monitor_ds = TensorDataset(images, train_ds.labels.new_tensor(
            [train_ds.classes.index(f.split("/")[0]) for f in holdout_files]), train_ds.classes, holdout_files)
    elif val_dir:
        monitor_name = "val"
        monitor_ds = load_cached_split(val_dir, recipe.eval_size, cache_dir=cache_dir, progress=progress)
    n_cls = len(train_ds.classes)
    device_name = hardware_description(device)
    train_images, train_labels = train_ds.images.to(device), train_ds.labels.to(device)
    precision = "bf16" if recipe.bf16 else "fp32"

    torch.manual_seed(recipe.seed)
    model = create_model(arch, num_classes=n_cls, zero_init_residual=recipe.zero_init_residual)
    model = model.to(device=device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(_param_groups(model, recipe.weight_decay), lr=recipe.lr,
                                momentum=recipe.momentum, nesterov=True)
    resuming = resume and ckpt_path.exists()
    init = None
    if recipe.init_from and not resuming:  # a resumed run takes its weights (and this record) from last.pt
        if init_record is None:
            raise ValueError(f"the recipe starts from {recipe.init_from!r}: pass the record to start from")
        init = _load_init(model, arch, init_record, recipe.init_from)
    ema = WeightEMA(model, recipe.ema_decay) if recipe.ema_decay > 0 else None
    start_epoch, wall, history = 0, 0.0, []
    if resuming:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        saved = Recipe.from_json(ckpt["recipe"])
        if saved != recipe or ckpt["arch"] != arch:
            diffs = recipe_differences(saved, recipe)
            if ckpt["arch"] != arch:
                diffs.insert(0, f"arch: {ckpt['arch']!r} -> {arch!r}")
            raise ValueError(f"{ckpt_path} was made by another recipe or architecture ({'; '.join(diffs)}); "
                             f"use a new run folder or the same options")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ema is not None:
            ema.load(ckpt["ema"], model)
        start_epoch, wall, history = ckpt["epoch"] + 1, ckpt["wall_time_s"], ckpt["history"]
        # The checkpoint is the record: a run killed between its log line and its checkpoint left a
        # line for an epoch that is trained again now, so the log restarts from the checkpoint's history.
        atomic_write(log_path, lambda f: f.write("".join(json.dumps(h) + "\n" for h in history).encode()))
        init = json.loads(ckpt["init"]) if "init" in ckpt else None
        print(f"resuming {arch} from epoch {start_epoch} ({wall / 60:.1f} min done)")

    steps_per_epoch = len(train_ds) // recipe.batch_size
    mean, std = recipe.mean, recipe.std
    steps_this_call = 0
    model.train()
    for epoch in range(start_epoch, recipe.epochs):
        size = train_size_at(recipe, epoch)
        gen = torch.Generator().manual_seed(recipe.seed * 100_003 + epoch)
        order = torch.randperm(len(train_ds), generator=gen)
        t0 = time.perf_counter()
        seen = 0
        # Per-step loss and hits stay on the device: reading them (.item()) every step would make a
        # GPU wait for each step to finish. They are read for the progress bar every
        # _POSTFIX_EVERY steps and summed once at the end of the epoch, in the order a per-step
        # float sum would add them (the logged figures stay the same to the last digit).
        step_losses, step_hits, step_sizes = [], [], []
        bar = tqdm(range(steps_per_epoch), desc=f"{arch} ep {epoch + 1}/{recipe.epochs} {size}px",
                   disable=not progress, dynamic_ncols=True)
        for i in bar:
            step = epoch * steps_per_epoch + i
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(recipe, step, steps_per_epoch)
            idx = order[i * recipe.batch_size:(i + 1) * recipe.batch_size].to(device)
            y = train_labels[idx]
            loss, logits = train_step(model, optimizer, train_images[idx], y, recipe=recipe, size=size,
                                      generator=gen)
            if ema is not None:
                ema.update(step)
            seen += len(y)
            step_losses.append(loss.detach())
            step_hits.append((logits.argmax(1) == y).sum())
            step_sizes.append(len(y))
            if progress and i % _POSTFIX_EVERY == 0:
                loss_sum, correct = _epoch_sums(step_losses, step_hits, step_sizes)
                elapsed = time.perf_counter() - t0
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", ips=f"{seen / elapsed:.0f}")
            steps_this_call += 1
            if max_steps is not None and steps_this_call >= max_steps:
                break
        bar.close()
        loss_sum, correct = _epoch_sums(step_losses, step_hits, step_sizes)
        epoch_time = time.perf_counter() - t0
        if max_steps is not None and steps_this_call >= max_steps and i < steps_per_epoch - 1:
            # A partial epoch is not checkpointed: a resumed run redoes it from its start.
            return TrainResult(run_dir, model, history, wall + epoch_time,
                               ema.model_copy(model) if ema is not None else None, holdout_files, init)
        wall += epoch_time
        entry = {"epoch": epoch + 1, "size": size, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                 "img_per_s": seen / epoch_time, "epoch_time_s": epoch_time, "lr_end": optimizer.param_groups[0]["lr"],
                 "device": device_name, "precision": precision}
        last = epoch == recipe.epochs - 1
        if monitor_ds is not None and ((epoch + 1) % recipe.eval_every == 0 or last):
            t1 = time.perf_counter()
            ev = evaluate_tensors(model, monitor_ds, size=recipe.eval_size, mean=mean, std=std, bf16=recipe.bf16)
            entry.update({f"{monitor_name}_top1": ev["top1"], f"{monitor_name}_top5": ev["top5"]})
            if ema is not None:
                ev = evaluate_tensors(ema.model_copy(model), monitor_ds, size=recipe.eval_size, mean=mean, std=std,
                                      bf16=recipe.bf16)
                entry[f"{monitor_name}_top1_ema"] = ev["top1"]
            entry["eval_time_s"] = time.perf_counter() - t1
            wall += entry["eval_time_s"]
        entry["wall_time_s"] = wall
        history.append(entry)
        with open(log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in entry.items()}), flush=True)
        atomic_write(ckpt_path, lambda f: torch.save({"arch": arch, "recipe": recipe.to_json(), "epoch": epoch, "wall_time_s": wall,
                      "history": history, "classes": list(train_ds.classes), "holdout_files": list(holdout_files),
                      **({"init": json.dumps(init)} if init is not None else {}),
                      "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      **({"ema": ema.state} if ema is not None else {})}, f))
    model.eval()
    return TrainResult(run_dir, model, history, wall, ema.model_copy(model) if ema is not None else None,
                       holdout_files, init)


def _load_init(model: nn.Module, arch: str, record: "WeightRecord", weights_dir: str | os.PathLike) -> dict[str, Any]:
    """Copy ``record``'s weights (sha256-checked) into ``model``; return what the manifest keeps of it."""
    from cbam_viz.weights import load_record

    if record.arch != arch:
        raise ValueError(f"cannot start {arch} from {record.name!r}: that record is a {record.arch}")
    model.load_state_dict(load_record(record, weights_dir).state_dict())  # copy_ casts and moves each tensor
    return {"name": record.name, "sha256": record.sha256, "input_size": record.input_size,
            "recipe": record.recipe, "training": record.training,
            "metrics": {k: v for k, v in record.metrics.items() if k in ("val_top1", "val_top5", "val_hflip_top1")}}


def export(result: TrainResult, *, arch: str, recipe: Recipe, classes: list[str], weights_dir: str | os.PathLike,
           name: str, class_names: dict[str, str] | None = None, weights: str = "raw", input_size: int | None = None,
           selection: dict[str, Any] | None = None, training_extra: dict[str, Any] | None = None) -> WeightRecord:
    """Write the trained model as ``<weights_dir>/<name>.safetensors`` and record it in the manifest.

    Args:
        weights: ``"raw"`` (the last SGD iterate) or ``"ema"`` (the run's weight average).
        input_size: the size the app runs the model at (default: the recipe's ``eval_size``);
            normally the one :func:`cbam_viz.training.holdout.choose_for_pair` chose on the held-out files.
        selection: that choice and the held-out scores behind it, recorded under ``training``.
        training_extra: more fields for ``training`` (e.g. what marks a half, see
            :mod:`cbam_viz.training.export`).
    """
    names = {**IMAGENETTE_NAMES, **(class_names or {})}
    source = result.ema_model if weights == "ema" else result.model
    if source is None:
        raise ValueError(f"this run kept no {weights!r} weights (recipe ema_decay = {recipe.ema_decay})")
    model = source.to(memory_format=torch.contiguous_format)
    file = f"{name}.safetensors"
    digest = save_safetensors(model, Path(weights_dir) / file)
    hist = result.history
    hardware = sorted({h["device"] for h in hist if "device" in h})
    precision = sorted({h["precision"] for h in hist if "precision" in h})
    training = {"wall_time_s": round(result.wall_time_s, 1),
                "img_per_s_last_epoch": round(hist[-1]["img_per_s"], 1) if hist else None,
                "epochs": len(hist), "threads": torch.get_num_threads(), "torch": torch.__version__,
                "hardware": hardware, "precision": precision, "weights": weights,
                "holdout_images": len(result.holdout_files)}
    if selection is not None:
        training["selection"] = selection
    if result.init is not None:
        training["init"] = result.init
    training.update(training_extra or {})
    record = WeightRecord(
        name=name, file=file, arch=arch, sha256=digest,
        num_params=sum(p.numel() for p in model.parameters()),
        classes=[{"id": c, "name": names.get(c, c)} for c in classes],
        mean=list(recipe.mean), std=list(recipe.std), input_size=input_size or recipe.eval_size,
        recipe=recipe.to_json(), training=training,
        metrics={k: hist[-1][k] for k in ("val_top1", "val_top5") if hist and k in hist[-1]},
    )
    update_manifest(weights_dir, record=record)
    return record
