"""One optimisation step and the data order of an epoch: the whole per-step work of training.

Kept apart from the loop in :mod:`cbam_viz.training.train` so that a benchmark times exactly what
training runs (``benchmarks/bench_train.py``) and so that a run split over several processes
changes only who takes which share of :func:`epoch_order`, never the step itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cbam_viz.training.data import mix_batch, normalize, random_resized_crop_flip
from cbam_viz.training.recipe import Recipe

__all__ = ["epoch_order", "train_step"]


def epoch_order(recipe: Recipe, epoch: int, n: int) -> tuple[torch.Generator, torch.Tensor]:
    """The data order of one epoch and the generator its augmentation draws continue from.

    Both are a pure function of ``(seed, epoch)``, drawn on the CPU, so a resumed run, a run on a
    GPU and a run split over processes see the same batches with the same crops.
    """
    gen = torch.Generator().manual_seed(recipe.seed * 100_003 + epoch)
    return gen, torch.randperm(n, generator=gen)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor, *,
               recipe: Recipe, size: int, generator: torch.Generator,
               share: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a uint8 batch: crop + flip to ``size``, mix (if the recipe does),
    normalise, forward, backward.

    The whole per-step work of :func:`cbam_viz.training.train.run_epoch` (the learning rate is set by the caller), so that
    ``benchmarks/bench_train.py`` times exactly what training runs. Returns the loss and logits
    (under mixing, the train accuracy the caller counts is against each image's own label).

    ``share=(rank, world)``: ``images`` is this rank's part of the global batch (under torchrun,
    :mod:`cbam_viz.training.parallel`, ``model`` wrapped in DistributedDataParallel). Each image is
    cropped as on one process; a mixing draw (one ``lam`` and box) still serves the whole global
    batch, but the partners come from the rank's own part, the only images it holds.
    """
    x = random_resized_crop_flip(images.float().div_(255), size, generator=generator, scale=recipe.crop_scale,
                                 share=share)
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
