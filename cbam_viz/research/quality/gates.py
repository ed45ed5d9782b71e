"""Does a spatial gate itself localize the object? The CBAM paper's claim, measured on boxes.

CBAM's spatial gate (Woo et al., ECCV 2018, arXiv 1807.06521, Sec. 3) is a sigmoid map ``Ms`` per
residual block that says *where* the block lets features through; the paper reads it as the
network "focusing on the target object". BAM (arXiv 1807.06514) has one at each stage transition
(its joint gate averaged over channels, :mod:`cbam_viz.engine.attention`); SE has none. Every spatial
map of a member (per block, or per BAM module) is scored here with the same
localization metrics as the CAMs (pointing game, energy in box, MaxBoxAcc:
:mod:`cbam_viz.research.quality.metrics`), after the same post-processing the CAMs get (bilinear upsampling
to the image, min-max scaling: :func:`cbam_viz.engine.cam.normalize_cam`), against the true boxes.

A map that is bright in the middle scores well on photos of centred objects without knowing
anything about them, so every block is compared with a **centre Gaussian** (sigma a quarter of
each side) that any localizing map must beat: each block gets a bootstrap interval, and
``block - centre`` a paired one over the same images.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cbam_viz.engine.cam import normalize_cam
from cbam_viz.research.quality.boxes import Box
from cbam_viz.research.quality.metrics import DEFAULT_THRESHOLDS, box_hits_over_thresholds, energy_in_boxes, pointing_game
from cbam_viz.stats import bootstrap, max_box_acc_stat, mean_stat, paired_bootstrap, to_json_list

__all__ = ["CENTRE", "LOCALIZATION_METRICS", "centre_gaussian", "image_gate_scores", "score_map",
           "spatial_gate_scores", "summarize_gate_scores"]

#: Name of the reference map in the results.
CENTRE = "centre Gaussian"
#: The box metrics a map (CAM or gate) is scored with.
LOCALIZATION_METRICS = ("pointing", "energy", "maxboxacc")
#: Sigma of the centre Gaussian, as a share of each image side.
CENTRE_SIGMA = 0.25


def centre_gaussian(size: tuple[int, int], *, sigma: float = CENTRE_SIGMA) -> np.ndarray:
    """A ``(H, W)`` Gaussian bump in [0, 1] at the image centre, ``size = (W, H)``."""
    w, h = size
    ys = (np.arange(h, dtype=np.float32) + 0.5) / h - 0.5
    xs = (np.arange(w, dtype=np.float32) + 0.5) / w - 0.5
    return np.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * sigma ** 2)).astype(np.float32)


def score_map(heat: np.ndarray, boxes: Sequence[Box]) -> dict[str, Any]:
    """Pointing game, energy in box and the IoU-over-thresholds curve of one [0, 1] map."""
    return {"pointing": pointing_game(heat, boxes), "energy": energy_in_boxes(heat, boxes),
            "ious": box_hits_over_thresholds(heat, boxes, thresholds=DEFAULT_THRESHOLDS)}


def _stack(values: list[dict]) -> dict[str, np.ndarray]:
    return {"pointing": np.asarray([v["pointing"] for v in values], np.float64),
            "energy": np.asarray([v["energy"] for v in values], np.float64),
            "maxboxacc": np.stack([v["ious"] for v in values]).astype(np.float64)}


def image_gate_scores(maps: Mapping[str, np.ndarray], size: tuple[int, int], boxes: Sequence[Box]) -> dict[str, dict]:
    """One image's :func:`score_map` of every block's spatial map (in their order), then of the
    centre Gaussian (key :data:`CENTRE`): the per-image values a torchrun rank sends to rank 0."""
    out = {block: score_map(normalize_cam(m, size), boxes) for block, m in maps.items()}
    out[CENTRE] = score_map(centre_gaussian(size), boxes)
    return out


def spatial_gate_scores(
    gates: Sequence[Mapping[str, np.ndarray]],
    sizes: Sequence[tuple[int, int]],
    boxes: Sequence[Sequence[Box]],
    *,
    iou_threshold: float = 0.5,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Every block's spatial-gate map and the centre Gaussian, scored on the boxed images.

    Args:
        gates: per image, ``{block: (h, w) spatial attention}`` as the member produced it (block or BAM module).
        sizes: per image, ``(W, H)`` of the photo the boxes belong to.
        boxes: per image, its true boxes.

    Returns:
        :func:`summarize_gate_scores` of the images' :func:`image_gate_scores`.
    """
    if not gates:
        raise ValueError("no spatial-gate maps to score (a model without a spatial gate has none)")
    return summarize_gate_scores([image_gate_scores(m, size, bxs) for m, size, bxs in zip(gates, sizes, boxes)],
                                 iou_threshold=iou_threshold, n_boot=n_boot, seed=seed)


def summarize_gate_scores(per_image: Sequence[Mapping[str, dict]], *, iou_threshold: float = 0.5,
                          n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Bootstrap intervals of every block and the centre Gaussian over the images' :func:`image_gate_scores`.

    Returns:
        JSON-ready ``{"blocks", "reference", "results": {name: {metric: interval}},
        "vs_centre": {block: {metric: paired interval of block - centre}},
        "per_image": {name: {"pointing": [...], "energy": [...]}}}``.
    """
    blocks = [name for name in per_image[0] if name != CENTRE]
    stacked = {name: _stack([scores[name] for scores in per_image]) for name in (*blocks, CENTRE)}
    stats = {"pointing": mean_stat, "energy": mean_stat, "maxboxacc": max_box_acc_stat(iou_threshold)}

    def interval(name: str, metric: str) -> dict:
        return bootstrap(stacked[name][metric], stat=stats[metric], n_boot=n_boot, seed=seed).to_json()

    return {
        "blocks": blocks,
        "reference": f"{CENTRE}, sigma = {CENTRE_SIGMA:g} of each side",
        "results": {name: {m: interval(name, m) for m in LOCALIZATION_METRICS} for name in stacked},
        "vs_centre": {block: {m: paired_bootstrap(stacked[block][m], stacked[CENTRE][m], stat=stats[m],
                                                   n_boot=n_boot, seed=seed).to_json()
                              for m in LOCALIZATION_METRICS} for block in blocks},
        "per_image": {name: {"pointing": to_json_list(s["pointing"]), "energy": to_json_list(s["energy"])}
                      for name, s in stacked.items()},
    }
