"""One call from images to everything the app shows: predictions, CAMs and what every attention gate did.

:func:`explain` runs each member of a :class:`~cbam_viz.engine.lineup.Lineup` once over the whole batch
(one forward, plus one backward to the CAM layer for gradient methods, see :mod:`cbam_viz.engine.cam`)
and returns frozen :class:`Explanation` objects holding plain numpy arrays, ready for
:mod:`cbam_viz.render`. CBAM: Woo et al., ECCV 2018, arXiv 1807.06521.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from cbam_viz.engine import ood
from cbam_viz.engine.cam import compute_cams, list_methods
from cbam_viz.engine.controls import Controls, check_layer, check_method, check_target
from cbam_viz.engine.lineup import Lineup
from cbam_viz.engine.loading import LoadedModel
from cbam_viz.engine.preprocess import is_display_rgb, to_model_batch, to_rgb

__all__ = ["Prediction", "ModelExplanation", "Explanation", "explain", "explain_checked", "explain_model",
           "list_methods"]

Target = int | str | None


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    prob: float


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no single truth value
class ModelExplanation:
    model_name: str
    predictions: tuple[Prediction, ...]       # top-k, sorted by prob
    target: int
    target_label: str                         # class the CAM explains
    cam: np.ndarray                           # float32 (H, W) in [0, 1] at the image's own size
    channel_attention: dict[str, np.ndarray]  # "layer1.0" -> (C,) float32   (empty without gates)
    spatial_attention: dict[str, np.ndarray]  # "layer1.0" -> (h, w) float32 in [0,1] (feature-map size)
    timings: dict[str, float]                 # seconds: "forward_backward", "cam", ...
    # {"method", "score", "threshold", "flagged"} from the same forward (cbam_viz.engine.ood.assess)
    out_of_distribution: dict | None = None

    @property
    def top1(self) -> Prediction:
        return self.predictions[0]


@dataclass(frozen=True, eq=False)
class Explanation:
    """One image explained by every member of a lineup; ``models`` in the lineup's order."""

    image_size: tuple[int, int]  # (W, H) of the input image
    method: str
    layer: str
    reference: str                      # the member the others are compared with
    models: dict[str, ModelExplanation]  # member (record) name -> its explanation

    @property
    def reference_model(self) -> ModelExplanation:
        return self.models[self.reference]


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.float32)
    a.setflags(write=False)
    return a


def explain_model(
    images: Image.Image | Sequence[Image.Image],
    loaded: LoadedModel,
    *,
    method: str = "gradcam",
    target: Target | Sequence[Target] = None,
    layer: str | None = None,
    topk: int = 5,
) -> list[ModelExplanation]:
    """:func:`explain` for a single model, outside any lineup.

    Arguments as in :func:`explain`; returns one :class:`ModelExplanation` per image.
    """
    t0 = time.perf_counter()
    method = check_method(method)
    rgb = _as_rgb_list(images)
    layer_name = check_layer(layer, loaded.model)
    targets = _per_image_targets(target, len(rgb), loaded)
    _check_topk(topk)
    batch = to_model_batch(rgb, loaded.input_size, loaded.mean, loaded.std)
    t_pre = time.perf_counter() - t0
    return _explain_batch(rgb, batch, loaded, method=method, targets=targets, layer=layer_name, topk=int(topk),
                          preprocess_s=t_pre)


def explain(
    images: Image.Image | Sequence[Image.Image],
    lineup: Lineup,
    *,
    method: str = "gradcam",
    target: Target | Sequence[Target] = None,
    layer: str | None = None,
    topk: int = 5,
) -> list[Explanation]:
    """Explain each image with every member of ``lineup``, one batched pass per member.

    Every check (method, a layer every member has, each member's target) is made before any pass;
    members sharing the preprocessing share one batch. Each member's pass holds that model's lock
    (:func:`cbam_viz.engine.locks.model_lock`): its hooks must see only its own forward, even when
    another lineup shares the model.

    Args:
        images: a PIL image or a list of them, any mode and size (see :func:`cbam_viz.engine.preprocess.to_rgb`).
        lineup: from :func:`cbam_viz.engine.lineup.load_lineup`.
        method: one of :func:`list_methods`.
        target: None for each model's own predicted class, a class index, a class name or id
            (see :func:`cbam_viz.engine.controls.check_target`), or one of those per image (a list as
            long as ``images``).
        layer: dotted module name of the CAM layer (one every member has); default the last
            block of ``layer4`` (``"layer4.1"`` for resnet18).
        topk: how many predictions to return per model (at most the number of classes).

    Returns:
        One :class:`Explanation` per image, in order; CAMs at each image's own size.

    Raises:
        ValueError: unknown method, layer or class, a target out of range (the checks of
            :mod:`cbam_viz.engine.controls`, raised as :class:`~cbam_viz.messages.UserFacingError`), an
            invalid image (:class:`cbam_viz.engine.preprocess.ImageError`).
    """
    t0 = time.perf_counter()
    method = check_method(method)
    rgb = _as_rgb_list(images)
    layer_name = check_layer(layer, *(m.model for m in lineup.members))
    targets = {m.name: _per_image_targets(target, len(rgb), m) for m in lineup.members}
    _check_topk(topk)
    t_common = time.perf_counter() - t0
    return _explain_members(rgb, lineup, method=method, layer=layer_name, topk=topk, targets=targets,
                            t_common=t_common)


def explain_checked(images: Sequence[Image.Image], lineup: Lineup, controls: Controls, *, topk: int = 5
                    ) -> list[Explanation]:
    """:func:`explain` with controls already checked once (:func:`cbam_viz.engine.controls.check_controls`):
    nothing is checked or resolved again; each member explains ``controls.targets[member]``."""
    rgb = _as_rgb_list(images)
    return _explain_members(rgb, lineup, method=controls.method, layer=controls.layer, topk=topk,
                            targets={m.name: [controls.targets.get(m.name)] * len(rgb) for m in lineup.members},
                            t_common=0.0)


def _explain_members(rgb, lineup: Lineup, *, method, layer, topk, targets, t_common) -> list[Explanation]:
    batches: dict[tuple, torch.Tensor] = {}
    results = {}
    for m in lineup.members:
        t1 = time.perf_counter()
        key = (m.input_size, tuple(m.mean), tuple(m.std))
        if key not in batches:
            batches[key] = to_model_batch(rgb, m.input_size, m.mean, m.std)
        results[m.name] = _explain_batch(rgb, batches[key], m, method=method, targets=targets[m.name],
                                         layer=layer, topk=int(topk),
                                         preprocess_s=t_common + time.perf_counter() - t1)
    return [Explanation(image_size=im.size, method=method, layer=layer, reference=lineup.reference,
                        models={name: per_image[i] for name, per_image in results.items()})
            for i, im in enumerate(rgb)]


def _check_topk(topk) -> None:
    if not isinstance(topk, (int, np.integer)) or isinstance(topk, bool) or topk < 1:
        raise ValueError(f"topk must be a positive integer, got {topk!r}")


def _as_rgb_list(images) -> list[Image.Image]:
    if isinstance(images, Image.Image):
        images = [images]
    images = list(images)
    if not images:
        raise ValueError("no images to explain")
    for im in images:
        if not isinstance(im, Image.Image):
            raise TypeError(f"expected PIL images, got {type(im).__name__}")
    # EXIF orientation, first frame, alpha...: the CAM must match the picture a person sees.
    return [im if is_display_rgb(im) else to_rgb(im) for im in images]


def _per_image_targets(target, n: int, m: LoadedModel) -> list[int | None]:
    if isinstance(target, (list, tuple)):
        if len(target) != n:
            raise ValueError(f"{len(target)} targets given for {n} images")
        return [check_target(t, m.classes, m.class_ids) for t in target]
    return [check_target(target, m.classes, m.class_ids)] * n


def _explain_batch(rgb, batch, m: LoadedModel, *, method, targets, layer, topk, preprocess_s) -> list[ModelExplanation]:
    # The model's one lock, around all of its work (compute_cams re-enters it); the pooled
    # features of the same forward feed the out-of-distribution score (no extra pass).
    with m.lock, ood.penultimate_features(m.model) as features:
        result = compute_cams(m.model, batch, method=method, layer=layer, targets=targets,
                              sizes=[im.size for im in rgb])
    ood_results = ood.assess(m.ood, features, result.logits)
    probs = torch.softmax(result.logits, dim=1)
    k = min(topk, probs.shape[1])
    top_p, top_i = probs.topk(k, dim=1)
    labels = m.classes
    out = []
    for i in range(len(rgb)):
        preds = tuple(
            Prediction(index=int(c), label=labels[int(c)] if int(c) < len(labels) else str(int(c)), prob=float(p))
            for p, c in zip(top_p[i].tolist(), top_i[i].tolist())
        )
        channel = {blk: _readonly(maps["channel"][i].numpy()) for blk, maps in result.attention.items() if "channel" in maps}
        spatial = {blk: _readonly(maps["spatial"][i].numpy()) for blk, maps in result.attention.items() if "spatial" in maps}
        t = result.targets[i]
        timings = dict(result.timings)
        timings["preprocess"] = preprocess_s
        out.append(ModelExplanation(
            model_name=m.name,
            predictions=preds,
            target=t,
            target_label=labels[t] if t < len(labels) else str(t),
            cam=_readonly(result.cams[i]),
            channel_attention=channel,
            spatial_attention=spatial,
            timings=timings,
            out_of_distribution=ood_results[i],
        ))
    return out
