"""A model measured on an in-memory split: the trainer's monitoring and the held-out choice.

:func:`evaluate_tensors` scores a model on a cached uint8 split (the trainer's monitoring every
``eval_every`` epochs, and :func:`cbam_viz.training.holdout.holdout_scores`); the numbers a user
should trust, those of the shipped files decoded as the app decodes them, come from
:mod:`cbam_viz.training.evaluate`. :func:`recalibrate_batchnorm` re-estimates BatchNorm statistics
at the test size (FixRes); measured, not used by the recipe.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from cbam_viz.training.data import TensorDataset, normalize, resize_batch

__all__ = ["evaluate_tensors", "recalibrate_batchnorm"]


@torch.no_grad()
def evaluate_tensors(model: nn.Module, ds: TensorDataset, *, size: int, mean, std, batch_size: int = 100,
                     bf16: bool = False, hflip: bool = False, progress: bool = False) -> dict[str, Any]:
    """Top-1/top-5 accuracy and the confusion matrix of ``model`` on an in-memory split.

    ``hflip``: average the softmax of each image and its mirror image (test-time augmentation).
    """
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
