"""Does the model need what its CAM highlights? Perturb the input there and watch the probability.

The CBAM paper (Woo et al., ECCV 2018, arXiv 1807.06521, Fig. 4) argues from Grad-CAM pictures
that ResNet-CBAM looks at the object. These scores need no boxes, so they apply to a user's own
image (the Explain tab) as well as to a dataset (:mod:`cbam_viz.research.quality`):

* :func:`remove_by_cam` -- delete the most (MoRF) or least (LeRF) relevant pixels, in the
  ROAD protocol (Rong et al., ICML 2022, arXiv 2202.00449) as pytorch-grad-cam's
  ``metrics.road`` runs it (see :func:`removal_mask` for why the pixel choice differs), with a
  choice of imputer: ``"blur"`` (fast), ``"mean"`` or ``"road"`` (pytorch-grad-cam's
  noisy-linear imputer: the paper's, but ~0.05-0.5 s per image on a CPU).
* :func:`perturbation_scores` -- the true-class probability after MoRF and LeRF removal at
  several fractions, in one batched forward (ROAD's combined score is ``(LeRF - MoRF) / 2``).
* :func:`confidence_drop` / :func:`lineup_confidence_drop` -- the target probability before and
  after removing the top 20 % of the CAM: one number per model for the image the app explained.

Every forward holds :func:`cbam_viz.engine.locks.model_lock` of its model: another thread's CAM hooks
may be attached to the same modules, and must not record these passes.

Conventions: a CAM is a float ``(H, W)`` array with values >= 0 (the engine scales it to
[0, 1]); :func:`check_cam` enforces them, for the box metrics of :mod:`cbam_viz.research.quality.metrics`
too.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from cbam_viz.engine.locks import model_lock
from cbam_viz.engine.preprocess import to_model_tensor

__all__ = [
    "IMPUTERS", "ConfidenceDrop", "blur_fill_image", "check_cam", "confidence_drop", "lineup_confidence_drop",
    "perturbation_scores", "remove_by_cam", "removal_mask", "resize_cam",
]


def check_cam(cam: np.ndarray) -> np.ndarray:
    """``cam`` as a float32 ``(H, W)`` array, after checking it is finite and >= 0.

    Raises:
        ValueError: not 2-D, NaN or infinite values, or negative values.
    """
    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim != 2:
        raise ValueError(f"a CAM must be a 2-D (H, W) array, got shape {cam.shape}")
    if not np.isfinite(cam).all():
        raise ValueError("CAM holds NaN or infinite values")
    if cam.size and cam.min() < 0:
        raise ValueError(f"CAM values must be >= 0 (got min {cam.min():.3g}); scale it to [0, 1] first")
    return cam


def resize_cam(cam: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A CAM resized (bilinear) to ``shape = (H, W)``; the overshoot below 0 is clipped away."""
    h, w = int(shape[0]), int(shape[1])
    return np.clip(cv2.resize(np.asarray(cam, np.float32), (w, h), interpolation=cv2.INTER_LINEAR), 0, None)


# ------------------------------------------------------------------------------------ imputers


def blur_fill_image(image: torch.Tensor) -> torch.Tensor:
    """The background the ``"blur"`` imputer fills removed pixels with (compute once per image).

    A heavy Gaussian blur of the whole ``(C, H, W)`` image, sigma ~ 1/16 of its shorter side and
    replicated borders: colours and coarse layout stay, the object's detail goes.
    """
    c, h, w = image.shape
    sigma = max(1.0, min(h, w) / 16)
    k = int(2 * round(3 * sigma) + 1)
    hwc = np.ascontiguousarray(image.detach().cpu().permute(1, 2, 0).numpy(), dtype=np.float32)
    blurred = cv2.GaussianBlur(hwc, (k, k), sigma, borderType=cv2.BORDER_REPLICATE)
    return torch.from_numpy(blurred.reshape(h, w, c)).permute(2, 0, 1).to(image.dtype)


def _mix(image: torch.Tensor, keep: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    return image * keep + fill * (1 - keep)


def _blur_fill(image: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return _mix(image, keep, blur_fill_image(image))


def _mean_fill(image: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    # In a normalised tensor 0 is the dataset mean colour.
    return image * keep


def _road_fill(image: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    return NoisyLinearImputer()(image, keep)


# Each imputer: (C, H, W) normalised image, (H, W) float keep-mask (1 keep, 0 remove) -> image.
IMPUTERS = {"blur": _blur_fill, "mean": _mean_fill, "road": _road_fill}


def _check_imputer(imputer: str) -> None:
    if imputer not in IMPUTERS:
        raise ValueError(f"unknown imputer {imputer!r}; choose one of {sorted(IMPUTERS)}")


# ------------------------------------------------------------------------------------- removal


def removal_mask(cam: np.ndarray, fraction: float, *, most_relevant: bool = True, seed: int = 0) -> np.ndarray:
    """Float ``(H, W)`` keep-mask (1 keep, 0 remove) removing exactly ``round(fraction * H * W)`` pixels.

    pytorch-grad-cam's ``RemoveMostRelevantFirst(percentile)`` thresholds at a percentile, which
    removes far more than asked when many pixels tie (Grad-CAM's ReLU often leaves half the map
    at exactly 0, so "remove the 20 % least relevant" would remove all of those zeros). Ranking
    the pixels with ties broken by a seeded random order removes exactly the share asked for, and
    a flat CAM removes a random set: MoRF and LeRF then agree and the ROAD score is 0 (chance).

    Raises:
        ValueError: a bad CAM, or ``fraction`` outside (0, 1).
    """
    cam = check_cam(cam)
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


def _keep_tensor(cam: np.ndarray, fraction: float, most_relevant: bool, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(removal_mask(cam, fraction, most_relevant=most_relevant)).to(dtype)


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

    Raises:
        ValueError: an unknown imputer, a bad CAM, or image and CAM of different sizes.
    """
    _check_imputer(imputer)
    cam = check_cam(cam)
    if tuple(image.shape[-2:]) != cam.shape:
        raise ValueError(f"image {tuple(image.shape[-2:])} and CAM {cam.shape} sizes differ")
    keep = _keep_tensor(cam, fraction, most_relevant, image.dtype)
    return IMPUTERS[imputer](image.detach().cpu(), keep).to(image.dtype)


def _target_probs(model: torch.nn.Module, batch: list[torch.Tensor], target: int) -> np.ndarray:
    """Softmax probability of ``target`` for each image of ``batch``: one forward, under the model's lock."""
    device = next(model.parameters()).device
    x = torch.stack(batch).to(device)
    with model_lock(model), torch.no_grad():
        logits = model(x)
    return torch.softmax(logits.float(), dim=1)[:, target].cpu().numpy()


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

    Raises:
        ValueError: an unknown imputer or a bad CAM.
    """
    _check_imputer(imputer)
    cam = check_cam(cam)
    image = image.detach().cpu()
    if imputer == "blur":
        background = blur_fill_image(image) if fill is None else fill

        def impute(keep):  # noqa: E306
            return _mix(image, keep, background)
    else:
        def impute(keep):  # noqa: E306
            return IMPUTERS[imputer](image, keep)
    batch = [] if p_original is not None else [image]
    for most in (True, False):
        for f in fractions:
            batch.append(impute(_keep_tensor(cam, f, most, image.dtype)))
    probs = _target_probs(model, batch, target)
    if p_original is None:
        p_original, probs = float(probs[0]), probs[1:]
    k = len(fractions)
    return {"p": float(p_original), "morf": probs[:k].astype(np.float32), "lerf": probs[k:].astype(np.float32)}


# ----------------------------------------------------------------------- the Explain tab's score


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

    Raises:
        ValueError: an unknown imputer, a bad CAM or ``fraction`` outside (0, 1).
    """
    cam = check_cam(cam)
    if cam.shape != tuple(image.shape[-2:]):
        cam = resize_cam(cam, image.shape[-2:])
    perturbed = remove_by_cam(image, cam, fraction, most_relevant=True, imputer=imputer)
    batch = [perturbed] if prob_before is not None else [image.detach().cpu(), perturbed]
    probs = _target_probs(model, batch, target)
    before = float(probs[0]) if prob_before is None else float(prob_before)
    return ConfidenceDrop(target, before, float(probs[-1]), fraction, imputer, perturbed)


def lineup_confidence_drop(image, explanation, lineup, *, fraction: float = 0.2, imputer: str = "blur"
                           ) -> dict[str, ConfidenceDrop]:
    """:func:`confidence_drop` for every member of a lineup on the image the app just explained.

    Each model is scored with its own CAM and its own explained class (``ModelExplanation.target``),
    on the input the app built for it (:func:`cbam_viz.engine.preprocess.to_model_tensor`).

    Args:
        image: the PIL image passed to :func:`cbam_viz.engine.explain.explain`.
        explanation: its :class:`cbam_viz.engine.explain.Explanation`.
        lineup: the :class:`cbam_viz.engine.lineup.Lineup` that produced it.
        fraction, imputer: as in :func:`confidence_drop`.

    Returns:
        member name -> its :class:`ConfidenceDrop`, in the lineup's order.
    """
    out = {}
    for loaded in lineup.members:
        me = explanation.models[loaded.name]
        x = to_model_tensor(image, loaded.input_size, loaded.mean, loaded.std)[0]
        # The explanation's forward already gave the probability before (when the target is in its top-k).
        known = next((p.prob for p in me.predictions if p.index == me.target), None)
        out[loaded.name] = confidence_drop(loaded.model, x, me.cam, me.target, fraction=fraction, imputer=imputer,
                                           prob_before=known)
    return out
