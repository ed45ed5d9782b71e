"""How well a class activation map (CAM) points at the object: metrics on arrays.

The CBAM paper (Woo et al., ECCV 2018, arXiv 1807.06521, Fig. 4) shows Grad-CAM on ResNet-CBAM
covering the target object better than on the plain ResNet. These functions turn that claim into
numbers on boxed images; :mod:`cbam_viz.evaluate_cams` runs them over a dataset.

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

Faithfulness (no boxes; does the model need what the CAM highlights?):

* :func:`remove_by_cam` -- delete the most (MoRF) or least (LeRF) relevant pixels, in the
  ROAD protocol (Rong et al., ICML 2022, arXiv 2202.00449) as pytorch-grad-cam's
  ``metrics.road`` runs it (see :func:`removal_mask` for why the pixel choice differs), with a
  choice of imputer: ``"blur"`` (fast), ``"mean"`` or ``"road"`` (pytorch-grad-cam's
  noisy-linear imputer: the paper's, but ~0.05-0.5 s per image on a CPU).
* :func:`confidence_drop` -- the target probability before and after removing the top 20 % of
  the CAM: one number per model for a user's own image, which has no boxes.

Conventions: a CAM is a float ``(H, W)`` array with values >= 0 (the engine scales it to
[0, 1]). A flat CAM (e.g. all zeros, which Grad-CAM gives when every channel weight is
negative) carries no location; it scores chance level: pointing game and energy equal the
boxes' share of the image. Metrics that need boxes return ``nan`` for an empty box list.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from cbam_viz.boxes import Box, boxes_mask

__all__ = [
    "pointing_game", "energy_in_boxes", "cam_to_box", "box_iou", "box_hits_over_thresholds",
    "max_box_acc", "DEFAULT_THRESHOLDS", "IMPUTERS", "removal_mask", "remove_by_cam", "blur_fill_image",
    "perturbation_scores",
    "confidence_drop", "ConfidenceDrop", "pair_confidence_drop",
]

# wsolevaluation's cam_curve_interval 0.01: thresholds 0.00, 0.01, ..., 0.99.
DEFAULT_THRESHOLDS = np.round(np.arange(0.0, 1.0, 0.01), 2)
_FLAT = 1e-6


def _check_cam(cam: np.ndarray) -> np.ndarray:
    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim != 2:
        raise ValueError(f"a CAM must be a 2-D (H, W) array, got shape {cam.shape}")
    if not np.isfinite(cam).all():
        raise ValueError("CAM holds NaN or infinite values")
    if cam.size and cam.min() < 0:
        raise ValueError(f"CAM values must be >= 0 (got min {cam.min():.3g}); scale it to [0, 1] first")
    return cam


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
    cam = _check_cam(cam)
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
    cam = _check_cam(cam)
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
    cam = _check_cam(cam)
    mask = (cam >= threshold).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return None
    i = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h = (int(stats[i, k]) for k in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT))
    return Box(float(x), float(y), float(x + w), float(y + h))


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes with exclusive ``xmax``/``ymax`` (0 if disjoint)."""
    iw = min(a.xmax, b.xmax) - max(a.xmin, b.xmin)
    ih = min(a.ymax, b.ymax) - max(a.ymin, b.ymin)
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return float(inter / (a.area + b.area - inter))


def box_hits_over_thresholds(
    cam: np.ndarray, boxes: Sequence[Box], *, thresholds: np.ndarray = DEFAULT_THRESHOLDS
) -> np.ndarray:
    """Best IoU with any true box of the CAM box at each threshold: ``(len(thresholds),)`` float32.

    ``iou >= 0.5`` at a threshold is a correct localization at that threshold; :func:`max_box_acc`
    picks the threshold over a whole dataset, as wsolevaluation does. An empty thresholded map
    gives IoU 0; without boxes the result is all ``nan``.
    """
    cam = _check_cam(cam)
    out = np.full(len(thresholds), np.nan if not boxes else 0.0, dtype=np.float32)
    if not boxes:
        return out
    # wsolevaluation min-max normalises the CAM before thresholding; the engine's CAMs already
    # span [0, 1], but a CAM from elsewhere may not.
    lo, hi = float(cam.min()), float(cam.max())
    norm = (cam - lo) / (hi - lo) if hi - lo > _FLAT else np.zeros_like(cam)
    for i, t in enumerate(thresholds):
        pred = cam_to_box(norm, float(t))
        if pred is not None:
            out[i] = max(box_iou(pred, b) for b in boxes)
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


# ---------------------------------------------------------------------------------------------
# Faithfulness: perturb the model input where the CAM is high (or low) and watch the probability.

def _blur_fill(image: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    # A heavy Gaussian blur of the whole image fills the removed pixels: colours and coarse
    # layout stay, the object's detail goes. sigma ~ 1/16 of the image side.
    c, h, w = image.shape
    sigma = max(1.0, min(h, w) / 16)
    k = int(2 * round(3 * sigma) + 1)
    x = torch.arange(k, dtype=image.dtype) - k // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    pad = k // 2
    img = image.unsqueeze(0)
    img = F.pad(img, (pad, pad, 0, 0), mode="replicate")
    img = F.conv2d(img, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    img = F.pad(img, (0, 0, pad, pad), mode="replicate")
    img = F.conv2d(img, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)[0]
    return image * keep + img * (1 - keep)


def _mean_fill(image: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    # In a normalised tensor 0 is the dataset mean colour.
    return image * keep


def _road_fill(image: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    return NoisyLinearImputer()(image, keep)


# Each imputer: (C, H, W) normalised image, (H, W) float keep-mask (1 keep, 0 remove) -> image.
IMPUTERS = {"blur": _blur_fill, "mean": _mean_fill, "road": _road_fill}


def removal_mask(cam: np.ndarray, fraction: float, *, most_relevant: bool = True, seed: int = 0) -> np.ndarray:
    """Float ``(H, W)`` keep-mask (1 keep, 0 remove) removing exactly ``round(fraction * H * W)`` pixels.

    pytorch-grad-cam's ``RemoveMostRelevantFirst(percentile)`` thresholds at a percentile, which
    removes far more than asked when many pixels tie (Grad-CAM's ReLU often leaves half the map
    at exactly 0, so "remove the 20 % least relevant" would remove all of those zeros). Ranking
    the pixels with ties broken by a seeded random order removes exactly the share asked for, and
    a flat CAM removes a random set: MoRF and LeRF then agree and the ROAD score is 0 (chance).
    """
    cam = _check_cam(cam)
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    n = cam.size
    k = int(round(fraction * n))
    tiebreak = np.random.default_rng(seed).random(n)
    order = np.lexsort((tiebreak, cam.ravel()))  # ascending CAM
    drop = order[n - k:] if most_relevant else order[:k]
    keep = np.ones(n, dtype=np.float32)
    keep[drop] = 0.0
    return keep.reshape(cam.shape)


def remove_by_cam(
    image: torch.Tensor, cam: np.ndarray, fraction: float, *, most_relevant: bool = True, imputer: str = "blur"
) -> torch.Tensor:
    """Remove the ``fraction`` of pixels with the highest (MoRF) or lowest (LeRF) CAM and impute them.

    Args:
        image: normalised ``(C, H, W)`` model input.
        cam: ``(H, W)`` CAM at the same size.
        fraction: share of pixels to remove, in (0, 1).
        most_relevant: remove the top of the CAM (MoRF) or its bottom (LeRF).
        imputer: a key of :data:`IMPUTERS`; ``"road"`` is pytorch-grad-cam's ROAD imputer.
    """
    if imputer not in IMPUTERS:
        raise ValueError(f"unknown imputer {imputer!r}; choose one of {sorted(IMPUTERS)}")
    cam = _check_cam(cam)
    if tuple(image.shape[-2:]) != cam.shape:
        raise ValueError(f"image {tuple(image.shape[-2:])} and CAM {cam.shape} sizes differ")
    keep = torch.from_numpy(removal_mask(cam, fraction, most_relevant=most_relevant)).to(image.dtype)
    return IMPUTERS[imputer](image.detach().cpu(), keep).to(image.dtype)


def blur_fill_image(image: torch.Tensor) -> torch.Tensor:
    """The background the ``"blur"`` imputer fills removed pixels with (compute once per image)."""
    return _blur_fill(image, torch.zeros(image.shape[-2:], dtype=image.dtype))


@torch.no_grad()
def perturbation_scores(
    model: torch.nn.Module,
    image: torch.Tensor,
    cam: np.ndarray,
    target: int,
    *,
    fractions: Sequence[float] = (0.2, 0.5),
    imputer: str = "blur",
    p_original: float | None = None,
    fill: torch.Tensor | None = None,
) -> dict[str, np.ndarray | float]:
    """Target-class probability after MoRF and LeRF removal at each fraction, in one forward.

    Args:
        model, image, cam, target: as in :func:`confidence_drop` (``cam`` at the input's size).
        fractions: shares of pixels removed.
        imputer: a key of :data:`IMPUTERS`.
        p_original: the unperturbed probability, if already known (saves one image's forward).
        fill: for ``"blur"``, :func:`blur_fill_image` of ``image`` precomputed (the same for
            every CAM of the image).

    Returns:
        ``{"p": p_original, "morf": (len(fractions),), "lerf": (len(fractions),)}``. From these,
        ROAD's combined score is ``mean((lerf - morf) / 2)``: high when removing what the CAM
        highlights hurts and removing what it ignores does not.
    """
    cam = _check_cam(cam)
    image = image.detach().cpu()
    if fill is not None and imputer == "blur":
        def impute(keep):  # noqa: E306
            return image * keep + fill * (1 - keep)
    else:
        if imputer not in IMPUTERS:
            raise ValueError(f"unknown imputer {imputer!r}; choose one of {sorted(IMPUTERS)}")

        def impute(keep):  # noqa: E306
            return IMPUTERS[imputer](image, keep)
    batch = [] if p_original is not None else [image]
    for most in (True, False):
        for f in fractions:
            batch.append(impute(torch.from_numpy(removal_mask(cam, f, most_relevant=most)).to(image.dtype)))
    device = next(model.parameters()).device
    probs = torch.softmax(model(torch.stack(batch).to(device)).float(), dim=1)[:, target].cpu().numpy()
    if p_original is None:
        p_original, probs = float(probs[0]), probs[1:]
    k = len(fractions)
    return {"p": float(p_original), "morf": probs[:k].astype(np.float32), "lerf": probs[k:].astype(np.float32)}


@dataclass(frozen=True)
class ConfidenceDrop:
    """Target probability before/after removing the CAM's top region (one model, one image)."""

    target: int
    prob_before: float
    prob_after: float
    fraction: float
    imputer: str
    perturbed: torch.Tensor  # the normalised input the model saw after removal, (C, H, W)

    @property
    def drop(self) -> float:
        """Absolute drop in probability; larger means the CAM found what the model uses."""
        return self.prob_before - self.prob_after

    @property
    def relative_drop(self) -> float:
        """Drop as a share of the original probability (0 if the probability was 0)."""
        return self.drop / self.prob_before if self.prob_before > 0 else 0.0


@torch.no_grad()
def confidence_drop(
    model: torch.nn.Module,
    image: torch.Tensor,
    cam: np.ndarray,
    target: int,
    *,
    fraction: float = 0.2,
    imputer: str = "blur",
    prob_before: float | None = None,
) -> ConfidenceDrop:
    """The target probability before and after removing the top ``fraction`` of the CAM.

    For a user's own image, which has no boxes: if the CAM marks what the model relies on,
    blurring that region away should lower the probability. Compare both models on the same
    image with their own CAMs; a CAM at another size is resized (bilinear) to the input.

    Args:
        model: an eval-mode classifier.
        image: normalised ``(C, H, W)`` model input (the tensor the model classifies).
        cam: ``(H, W)`` CAM, values >= 0.
        target: class index whose probability is watched.
        fraction: share of pixels removed (0.2: the top 20 %).
        imputer: ``"blur"``, ``"mean"`` or ``"road"``.
        prob_before: the target's probability on ``image`` if already known (e.g. from the
            explanation's own forward): then only the perturbed image is classified.
    """
    cam = _check_cam(cam)
    h, w = image.shape[-2:]
    if cam.shape != (h, w):
        cam = cv2.resize(cam, (w, h), interpolation=cv2.INTER_LINEAR)
        cam = np.clip(cam, 0, None)
    perturbed = remove_by_cam(image, cam, fraction, most_relevant=True, imputer=imputer)
    device = next(model.parameters()).device
    batch = [perturbed] if prob_before is not None else [image.detach().cpu(), perturbed]
    probs = torch.softmax(model(torch.stack(batch).to(device)).float(), dim=1)[:, target]
    before = float(probs[0]) if prob_before is None else float(prob_before)
    return ConfidenceDrop(target, before, float(probs[-1]), fraction, imputer, perturbed)


def pair_confidence_drop(image, explanation, pair, *, fraction: float = 0.2, imputer: str = "blur") -> dict[str, ConfidenceDrop]:
    """:func:`confidence_drop` for both models of a pair on the image the app just explained.

    Each model is scored with its own CAM and its own explained class (``ModelExplanation.target``),
    on the input the app built for it (:func:`cbam_viz.preprocess.to_model_tensor`).

    Args:
        image: the PIL image passed to :func:`cbam_viz.explain.explain`.
        explanation: its :class:`cbam_viz.explain.Explanation`.
        pair: the :class:`cbam_viz.pair.ModelPair` that produced it.
        fraction, imputer: as in :func:`confidence_drop`.

    Returns:
        ``{"baseline": ConfidenceDrop, "cbam": ConfidenceDrop}``.
    """
    from cbam_viz.preprocess import to_model_tensor

    out = {}
    for role in ("baseline", "cbam"):
        loaded, me = getattr(pair, role), getattr(explanation, role)
        x = to_model_tensor(image, loaded.input_size, loaded.mean, loaded.std)[0]
        # The explanation's forward already gave the probability before (when the target is in its top-k).
        known = next((p.prob for p in me.predictions if p.index == me.target), None)
        out[role] = confidence_drop(loaded.model, x, np.asarray(me.cam, np.float32), me.target,
                                    fraction=fraction, imputer=imputer, prob_before=known)
    return out
