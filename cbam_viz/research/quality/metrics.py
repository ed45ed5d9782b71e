"""How well a class activation map (CAM) points at the object: metrics on arrays, and their catalogue.

The CBAM paper (Woo et al., ECCV 2018, arXiv 1807.06521, Fig. 4) shows Grad-CAM on ResNet-CBAM
covering the target object better than on the plain ResNet. These functions turn that claim into
numbers on boxed images; :mod:`cbam_viz.research.quality.run` runs them over a dataset.

Localization (needs boxes of the true class; all arrays at the image's own size):

* :func:`pointing_game` -- does the CAM's maximum fall inside a box (Zhang et al., "Top-down
  neural attention by excitation backprop", ECCV 2016)?
* :func:`energy_in_boxes` -- the share of the CAM's mass inside the boxes (the "energy-based
  pointing game" of Score-CAM, Wang et al., CVPRW 2020).
* :func:`box_hits_over_thresholds` -- the CAM thresholded at many levels, each turned into the
  bounding box of its largest connected component, compared with the true boxes by IoU; the
  dataset statistic MaxBoxAcc (Choe et al., "Evaluating weakly supervised object localization
  methods right", CVPR 2020, clovaai/wsolevaluation) is the best threshold's accuracy,
  :func:`max_box_acc`.

The faithfulness scores (no boxes) are in :mod:`cbam_viz.engine.faithfulness`; :data:`METRICS` names
and explains every metric a report holds, of both kinds.

Conventions: a CAM is a float ``(H, W)`` array with values >= 0 (the engine scales it to
[0, 1]). A flat CAM (e.g. all zeros, which Grad-CAM gives when every channel weight is
negative) carries no location; it scores chance level: pointing game and energy equal the
boxes' share of the image. Metrics that need boxes return ``nan`` for an empty box list.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from cbam_viz.engine.faithfulness import check_cam
from cbam_viz.research.quality.boxes import Box, boxes_mask

__all__ = [
    "DEFAULT_THRESHOLDS", "METRICS", "PERCENT_METRICS", "MetricInfo", "box_hits_over_thresholds",
    "box_iou", "cam_to_box", "energy_in_boxes", "max_box_acc", "per_image_text", "pointing_game",
]

# wsolevaluation's cam_curve_interval 0.01: thresholds 0.00, 0.01, ..., 0.99.
DEFAULT_THRESHOLDS = np.round(np.arange(0.0, 1.0, 0.01), 2)
_FLAT = 1e-6

@dataclass(frozen=True)
class MetricInfo:
    key: str
    label: str
    higher_is_better: bool
    help: str


METRICS: dict[str, MetricInfo] = {m.key: m for m in (
    MetricInfo("pointing", "Pointing game", True, "share of images whose CAM maximum lies in a true box"),
    MetricInfo("energy", "Energy in box", True, "share of the CAM's mass inside the true boxes"),
    MetricInfo("maxboxacc", "MaxBoxAcc", True,
               "share of images whose CAM box (largest component, best threshold over the set) has IoU >= 0.5"),
    MetricInfo("road", "ROAD score", True,
               "(p after removing the least relevant - p after removing the most relevant) / 2, mean over fractions"),
    MetricInfo("morf_drop", "Drop, top removed", True,
               "true-class probability lost when the CAM's top pixels are blurred away (mean over fractions)"),
    MetricInfo("lerf_drop", "Drop, bottom removed", False,
               "true-class probability lost when the CAM's bottom pixels are blurred away (mean over fractions)"),
)}

#: Metrics that are shares of images or of mass: shown in %, probabilities as fractions.
PERCENT_METRICS = frozenset({"pointing", "energy", "maxboxacc"})


def per_image_text(metric: str, value: float) -> str:
    """``"Energy in box 61%"``: one image's value of ``metric``, labelled and formatted.

    Per image, MaxBoxAcc is the IoU of the CAM's box at the set's best threshold, so it is
    labelled "box IoU".
    """
    label = "box IoU" if metric == "maxboxacc" else METRICS[metric].label
    return f"{label} {value:.0%}" if metric in PERCENT_METRICS else f"{label} {value:.3f}"


def pointing_game(cam: np.ndarray, boxes: Sequence[Box], *, tolerance: float = 0.0) -> float:
    """1.0 if the CAM's maximum lies inside a box, 0.0 if not, ``nan`` without boxes.

    Ties (several pixels at the maximum, up to 1e-6) count as a random pick among them: the
    score is the share of tied maxima inside a box, so a flat CAM scores the boxes' area share
    (chance), never a free hit.

    Args:
        cam: ``(H, W)`` map, values >= 0.
        boxes: boxes of the target class in the CAM's pixel coordinates.
        tolerance: grow each box by this many pixels on every side (Zhang et al. use 15 px at
            the original image size; 0 is the strict game).
    """
    cam = check_cam(cam)
    if not boxes:
        return float("nan")
    grown = [Box(b.xmin - tolerance, b.ymin - tolerance, b.xmax + tolerance, b.ymax + tolerance) for b in boxes]
    inside = boxes_mask(grown, cam.shape)
    peak = cam >= cam.max() - _FLAT
    return float(inside[peak].mean())


def energy_in_boxes(cam: np.ndarray, boxes: Sequence[Box]) -> float:
    """Share of the CAM's total mass inside the union of the boxes, in [0, 1]; ``nan`` without boxes.

    A flat (or all-zero) CAM scores the boxes' area share.
    """
    cam = check_cam(cam)
    if not boxes:
        return float("nan")
    inside = boxes_mask(boxes, cam.shape)
    total = float(cam.sum(dtype=np.float64))
    if cam.max() - cam.min() <= _FLAT or total <= 0:
        return float(inside.mean())
    return float(cam[inside].sum(dtype=np.float64) / total)


def cam_to_box(cam: np.ndarray, threshold: float) -> Box | None:
    """Bounding box of the largest 8-connected component of ``cam >= threshold``; None if empty.

    wsolevaluation takes the largest contour (``cv2.findContours``) of the thresholded map; the
    largest connected component by pixel count is the same region except for rare shapes where
    contour area and pixel count disagree. The box is in pixel edges: ``xmax`` exclusive.
    """
    cam = check_cam(cam)
    return _largest_component_box(cam, threshold)


def _largest_component_box(cam: np.ndarray, threshold: float) -> Box | None:
    n, _, stats, _ = cv2.connectedComponentsWithStats((cam >= threshold).astype(np.uint8), connectivity=8)
    if n <= 1:
        return None
    i = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h = (int(stats[i, k]) for k in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT))
    return Box(float(x), float(y), float(x + w), float(y + h))


def _tv_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torchvision's pairwise IoU, imported on first use (torchvision costs the app's cold start ~2 s)."""
    from torchvision.ops import box_iou

    return box_iou(a, b)


def _box_tensor(boxes: Sequence[Box]) -> torch.Tensor:
    return torch.tensor([b.as_list() for b in boxes], dtype=torch.float64).reshape(-1, 4)


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (0 if disjoint).

    :func:`torchvision.ops.box_iou` measures areas as ``(xmax - xmin) * (ymax - ymin)``: boxes in
    pixel edges with exclusive ``xmax``/``ymax``, the convention of :mod:`cbam_viz.research.quality.boxes`
    (boxes that touch share no pixel and score 0).
    """
    return float(_tv_box_iou(_box_tensor([a]), _box_tensor([b]))[0, 0])


def box_hits_over_thresholds(
    cam: np.ndarray, boxes: Sequence[Box], *, thresholds: np.ndarray = DEFAULT_THRESHOLDS
) -> np.ndarray:
    """Best IoU with any true box of the CAM box at each threshold: ``(len(thresholds),)`` float32.

    ``iou >= 0.5`` at a threshold is a correct localization at that threshold; :func:`max_box_acc`
    picks the threshold over a whole dataset, as wsolevaluation does. An empty thresholded map
    gives IoU 0; without boxes the result is all ``nan``.
    """
    cam = check_cam(cam)
    if not boxes:
        return np.full(len(thresholds), np.nan, dtype=np.float32)
    # wsolevaluation min-max normalises the CAM before thresholding; the engine's CAMs already
    # span [0, 1], but a CAM from elsewhere may not.
    lo, hi = float(cam.min()), float(cam.max())
    norm = (cam - lo) / (hi - lo) if hi - lo > _FLAT else np.zeros_like(cam)
    out = np.zeros(len(thresholds), dtype=np.float32)
    found = [(i, box) for i, t in enumerate(thresholds) if (box := _largest_component_box(norm, float(t))) is not None]
    if found:
        rows, preds = zip(*found)
        out[list(rows)] = _tv_box_iou(_box_tensor(preds), _box_tensor(boxes)).max(dim=1).values.numpy()
    return out


def max_box_acc(ious: np.ndarray, *, iou_threshold: float = 0.5) -> tuple[float, int]:
    """MaxBoxAcc of a set of images: ``(best accuracy, index of the best threshold)``.

    Args:
        ious: ``(n_images, n_thresholds)`` from :func:`box_hits_over_thresholds`; rows with
            ``nan`` (no boxes) are dropped.
        iou_threshold: a box is correct at IoU >= this (0.5 in MaxBoxAcc; MaxBoxAccV2 averages
            0.3, 0.5 and 0.7).
    """
    ious = np.asarray(ious, dtype=np.float32)
    ious = ious[~np.isnan(ious).any(axis=1)]
    if not len(ious):
        return float("nan"), -1
    acc = (ious >= iou_threshold).mean(axis=0)
    best = int(np.argmax(acc))
    return float(acc[best]), best
