"""The training recipe: every hyper-parameter a run records, its schedules, and what ran it.

One :class:`Recipe` serves every model of a lineup: the same seed gives the same data order and
the same augmentation draws (both derived from ``(seed, epoch)``), so members trained with one
recipe differ only in architecture. The recipe is recorded in every checkpoint and every exported
weight record; a resumed run, a half of a lineup and a final run are checked against it field by
field (:func:`recipe_differences`). The learning rate and the train size are pure functions of the
step and the epoch (:func:`lr_at`, :func:`train_size_at`), so a resumed run continues both exactly.
"""
from __future__ import annotations

import json
import math
import platform
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from cbam_viz.models.imagenette import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["Recipe", "recipe_differences", "json_differences", "train_size_at", "lr_at", "cpu_has_fast_bf16",
           "hardware_description"]


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters shared by every model of a lineup; recorded in the weights manifest."""

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


def lr_at(recipe: Recipe, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up, then cosine decay to zero, as a pure function of the step."""
    total = recipe.epochs * steps_per_epoch
    warm = max(1, int(recipe.warmup_epochs * steps_per_epoch))
    if step < warm:
        return recipe.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return recipe.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


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
