"""What a finished lineup ships with, chosen on the held-out part of the training folder, never on val.

The recipe leaves two questions for after training: ship the raw weights or their moving average
(EMA), and at which square input size to run them (random-resized crops magnify objects, so the
best test size sits above the last train size: Touvron et al., FixRes, 2019). Both are answered
on the files :func:`cbam_viz.training.data.holdout_split` kept out of training, so the validation split
stays untouched until the final, reported measurement.

One answer serves every member: the (weights, size) with the highest *mean* held-out top-1 of the
models trained together, so all ship with the same preprocessing and only the architecture
differs, and no model is tuned more than another. Horizontal-flip averaging is measured and reported beside
it, never chosen: the app would have to apply it to every request.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from cbam_viz.training.data import TensorDataset, decode_images, scan_image_folder
from cbam_viz.training.monitor import evaluate_tensors

__all__ = ["CANDIDATE_SIZES", "holdout_scores", "choose_for_lineup"]

#: Square test sizes tried (the last train size of the default recipe is 176 px).
CANDIDATE_SIZES = (144, 160, 176, 192, 208, 224)
#: Order in which tied candidates are preferred: raw weights, then the smaller size.
WEIGHT_KINDS = ("raw", "ema")


def holdout_scores(models: Mapping[str, torch.nn.Module], data_dir: str | os.PathLike, files: Sequence[str], *,
                   mean, std, sizes: Sequence[int] = CANDIDATE_SIZES, batch_size: int = 100) -> dict[str, Any]:
    """Top-1 of each model (``{"raw": m, "ema": m}``) on the held-out ``files`` at each size.

    Images are decoded from the files at each size exactly as the app and ``evaluate`` decode
    them (:func:`cbam_viz.training.data.decode_images`), and run in float32.

    Returns:
        ``{"n": N, "scores": {kind: {size: {"top1": a, "top1_hflip": b}}}}`` (sizes as strings, for JSON).
    """
    if not files:
        raise ValueError("this run held no files out (recipe holdout = 0): nothing to choose on")
    classes = scan_image_folder(data_dir).classes
    labels = torch.tensor([classes.index(f.split("/")[0]) for f in files], dtype=torch.int64)
    paths = [Path(data_dir) / f for f in files]
    scores: dict[str, dict[str, dict[str, float]]] = {kind: {} for kind in models}
    for size in sizes:
        ds = TensorDataset(decode_images(paths, size, progress=False), labels, classes, tuple(files))
        for kind, model in models.items():
            model = model.float().eval()
            row = {}
            for hflip in (False, True):
                ev = evaluate_tensors(model, ds, size=size, mean=mean, std=std, batch_size=batch_size, hflip=hflip)
                row["top1_hflip" if hflip else "top1"] = ev["top1"]
            scores[kind][str(size)] = row
    return {"n": len(files), "scores": scores}


def choose_for_lineup(per_model: Mapping[str, Mapping[str, Any]], *, kinds: Sequence[str] = WEIGHT_KINDS) -> dict[str, Any]:
    """The (weights, input size) with the best mean held-out top-1 over the models trained together.

    Args:
        per_model: model name -> :func:`holdout_scores` result.
        kinds: the weight kinds that compete, in the order ties prefer them.

    Returns:
        ``{"weights": kind, "input_size": S, "mean_holdout_top1": a, "holdout_top1": {model: a},
        "rule": "..."}``.
    """
    kinds = [k for k in kinds if all(k in r["scores"] for r in per_model.values())]
    sizes = sorted({int(s) for r in per_model.values() for k in kinds for s in r["scores"][k]})
    best, best_mean = None, -1.0
    for kind in kinds:
        for size in sizes:
            values = [r["scores"][kind].get(str(size), {}).get("top1") for r in per_model.values()]
            if any(v is None for v in values):
                continue
            mean = sum(values) / len(values)
            if mean > best_mean + 1e-12:  # strictly better: ties keep the earlier (raw, smaller) one
                best, best_mean = (kind, size), mean
    if best is None:
        raise ValueError("no (weights, size) candidate was scored for every model")
    kind, size = best
    return {"weights": kind, "input_size": size, "mean_holdout_top1": best_mean,
            "holdout_top1": {name: r["scores"][kind][str(size)]["top1"] for name, r in per_model.items()},
            "rule": "highest mean held-out top-1 of the models trained together, without test-time flips; "
                    f"ties: {' before '.join(k.replace('ema', 'EMA') for k in kinds)}, then the smaller size"}
