"""``evaluate-cams``: do an attention model's CAMs localize the object better than the plain ResNet's?

The CBAM paper (arXiv 1807.06521, Sec. 4.3, Fig. 4) shows Grad-CAM on ResNet-CBAM covering the
target object better than on the plain ResNet (and ResNet + SE), on a handful of pictures. This
module measures it: for every boxed image of an ImageFolder directory and each CAM method, every
member of a lineup explains the *true* class through the app's own engine
(:func:`cbam_viz.engine.explain.explain`, so the numbers describe exactly what the app shows), and
each CAM is scored:

* pointing game, energy in box, MaxBoxAcc (IoU >= 0.5, best threshold over the set), from
  :mod:`cbam_viz.research.quality.metrics`;
* faithfulness without boxes (:mod:`cbam_viz.engine.faithfulness`): the true-class probability after
  removing the CAM's top (MoRF) or bottom (LeRF) 20 % and 50 % of pixels, blur-imputed, and
  ROAD's combined score ``(LeRF - MoRF) / 2``;
* and, beside the CAMs, every spatial-gate map of every member that has one (CBAM's blocks, BAM's
  modules) with the same box metrics, against a centre-Gaussian reference map
  (:mod:`cbam_viz.research.quality.gates`).

Each statistic gets a 95 % bootstrap interval, and each member's difference from the lineup's
reference (``member - reference``) a *paired* bootstrap interval over images (:mod:`cbam_viz.stats`): an interval that excludes 0 is a difference
the images support, one that straddles 0 is not. :func:`cbam_viz.research.quality.report.write_report`
writes the result.

The steps, one function each: :func:`_load_boxed_images` (the images, their boxes and true
classes), :func:`_run_method` (CAMs over the images, batched, and :func:`_score_cam` per image),
:func:`_per_image_record` (per-image values, JSON-ready), :func:`summarize` (bootstrap), and
:func:`evaluate_cams` tying them into the report.

Cost on a 2-core CPU: gradient methods (Grad-CAM, Grad-CAM++, LayerCAM) need one forward and a
partial backward per image and member; Score-CAM needs one forward per channel of ``layer4``
(512 for a resnet18), ~500x more, so it is not a default method and
``method_limits={"scorecam": n}`` runs it on an evenly spread subset of ``n`` images.
"""
from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from cbam_viz.engine.attention import attention_gates, record_attention
from cbam_viz.engine.cam import list_methods
from cbam_viz.engine.controls import check_method
from cbam_viz.engine.explain import ModelExplanation, explain
from cbam_viz.engine.faithfulness import blur_fill_image, perturbation_scores, resize_cam
from cbam_viz.engine.lineup import Lineup, load_lineup
from cbam_viz.engine.preprocess import to_model_batch
from cbam_viz.research.quality.boxed_images import BoxedImages, check_classes, load_boxed_images
from cbam_viz.research.quality.boxes import Box
from cbam_viz.research.quality.gates import spatial_gate_scores
from cbam_viz.research.quality.metrics import (
    DEFAULT_THRESHOLDS, METRICS, box_hits_over_thresholds, energy_in_boxes, max_box_acc, pointing_game,
)
from cbam_viz.research.quality.report import CAM_STORE_SIZE, REPORT_VERSION
from cbam_viz.stats import (
    bootstrap, from_json_list, max_box_acc_stat, mean_stat, paired_bootstrap, to_json_list,
)
from cbam_viz.training.evaluate import spread_indices

__all__ = ["DEFAULT_FRACTIONS", "DEFAULT_METHODS", "evaluate_cams", "summarize"]

DEFAULT_METHODS = ("gradcam", "gradcam++", "layercam")
DEFAULT_FRACTIONS = (0.2, 0.5)


def _quantize(cam: np.ndarray) -> np.ndarray:
    small = cv2.resize(cam.astype(np.float32), (CAM_STORE_SIZE, CAM_STORE_SIZE), interpolation=cv2.INTER_AREA)
    return np.clip(np.rint(small * 255), 0, 255).astype(np.uint8)


def _check_settings(methods: Sequence[str], fractions: Sequence[float]) -> tuple[list[str], tuple[float, ...]]:
    if not methods:
        raise ValueError(f"no CAM method given; choose from {', '.join(list_methods())}")
    methods = list(dict.fromkeys(check_method(m) for m in methods))  # the app's own validator
    fractions = tuple(float(f) for f in fractions)
    if not fractions or not all(0 < f < 1 for f in fractions):
        raise ValueError(f"fractions must lie in (0, 1), got {fractions}")
    return methods, fractions


def _score_cam(
    me: ModelExplanation, boxes: Sequence[Box], model: torch.nn.Module, x: torch.Tensor, *,
    fractions: tuple[float, ...], imputer: str, fill: torch.Tensor | None,
) -> dict[str, Any]:
    """Every per-image value of one model's CAM: localization on the image, faithfulness on ``x``."""
    cam = me.cam
    cam_in = cam if cam.shape == tuple(x.shape[-2:]) else resize_cam(cam, x.shape[-2:])
    p0 = next(p.prob for p in me.predictions if p.index == me.target)
    s = perturbation_scores(model, x, cam_in, me.target, fractions=fractions, imputer=imputer, p_original=p0,
                            fill=fill)
    return {"pointing": pointing_game(cam, boxes), "energy": energy_in_boxes(cam, boxes),
            "ious": box_hits_over_thresholds(cam, boxes, thresholds=DEFAULT_THRESHOLDS),
            "p": s["p"], "morf": s["morf"], "lerf": s["lerf"], "top1": me.predictions[0].index}


def _run_method(
    method: str, imgs: BoxedImages, index: np.ndarray, lineup: Lineup, *, layer: str | None, batch_size: int,
    fractions: tuple[float, ...], imputer: str, fills: dict[tuple, torch.Tensor], bar,
) -> tuple[dict[str, list[dict]], dict[str, np.ndarray]]:
    """Every member's CAMs of the true class on the images ``index``, scored.

    Returns:
        ``({member: [values of each image]}, {member: (len(index), 112, 112) uint8 CAMs})``.
        ``fills`` caches the blur background per (image, model preprocessing) across methods.
    """
    values: dict[str, list[dict]] = {name: [] for name in lineup.names}
    store = {name: np.zeros((len(index), CAM_STORE_SIZE, CAM_STORE_SIZE), np.uint8) for name in lineup.names}
    num_classes = len(lineup.reference_model.classes)
    for start in range(0, len(index), batch_size):
        chunk = index[start:start + batch_size]
        photos = [imgs.images[i] for i in chunk]
        exps = explain(photos, lineup, method=method, target=[imgs.targets[i] for i in chunk], layer=layer,
                       topk=num_classes)
        for member in lineup.members:
            batch = to_model_batch(photos, member.input_size, member.mean, member.std)
            for j, (i, exp) in enumerate(zip(chunk, exps)):
                me, x = exp.models[member.name], batch[j]
                fkey = (int(i), member.input_size, tuple(member.mean), tuple(member.std))
                if imputer == "blur" and fkey not in fills:
                    fills[fkey] = blur_fill_image(x)
                values[member.name].append(_score_cam(me, imgs.boxes[imgs.keys[i]], member.model, x,
                                                      fractions=fractions, imputer=imputer, fill=fills.get(fkey)))
                store[member.name][start + j] = _quantize(me.cam)
        bar.update(len(chunk))
    return values, store


def _spatial_gate_maps(imgs: BoxedImages, member, *, batch_size: int) -> list[dict[str, np.ndarray]]:
    """Every spatial-gate map of ``member`` for each image (``[]`` for a member without one): plain forwards.

    The gates do not depend on the CAM method or the target class, so they are recorded once.
    """
    out: list[dict[str, np.ndarray]] = []
    for start in range(0, len(imgs.images), batch_size):
        x = to_model_batch(imgs.images[start:start + batch_size], member.input_size, member.mean, member.std)
        with member.lock, torch.no_grad(), record_attention(member.model) as maps:
            member.model(x.to(member.device))
        spatial = {owner: g["spatial"] for owner, g in maps.items() if "spatial" in g}
        if not spatial:
            return []
        out += [{owner: m[j].float().cpu().numpy() for owner, m in spatial.items()} for j in range(len(x))]
    return out


def _per_member_record(values: list[dict], iou_threshold: float) -> dict[str, Any]:
    """One member's per-image values -> its part of ``per_image[method]`` (rounded), incl. its best threshold."""
    # Kept to 3 decimals rounded *down*, and MaxBoxAcc's threshold is picked on what is kept: a
    # stored IoU clears the IoU threshold exactly when the measured one did (0.4996 rounded to
    # nearest would become a hit at 0.5), so the report's table and this choice agree.
    ious = np.floor(np.stack([d["ious"] for d in values]).astype(np.float64) * 1000) / 1000
    _, best = max_box_acc(ious, iou_threshold=iou_threshold)
    morf, lerf = np.stack([d["morf"] for d in values]), np.stack([d["lerf"] for d in values])
    p = np.asarray([d["p"] for d in values], np.float32)
    return {
        "pointing": to_json_list([d["pointing"] for d in values]),
        "energy": to_json_list([d["energy"] for d in values]),
        "box_iou": to_json_list(ious[:, best]),  # at the threshold MaxBoxAcc picked for this model
        "best_threshold_index": best,
        "ious": [to_json_list(row, 3) for row in ious],
        "p": to_json_list(p),
        "morf": [to_json_list(row) for row in morf],
        "lerf": [to_json_list(row) for row in lerf],
        "road": to_json_list(((lerf - morf) / 2).mean(axis=1)),
        "morf_drop": to_json_list((p[:, None] - morf).mean(axis=1)),
        "lerf_drop": to_json_list((p[:, None] - lerf).mean(axis=1)),
        "top1": [int(d["top1"]) for d in values],
    }


def _per_image_record(index: np.ndarray, values: Mapping[str, list[dict]], iou_threshold: float) -> dict:
    """Per-image values of every member -> the report's ``per_image[method]``: ``{"index", "models"}``."""
    return {"index": index.tolist(),
            "models": {name: _per_member_record(v, iou_threshold) for name, v in values.items()}}


def _metric_values(method_rec: dict, member: str, metric: str) -> np.ndarray:
    rec = method_rec["models"][member]
    if metric == "maxboxacc":
        return np.array([from_json_list(row) for row in rec["ious"]], np.float64)
    return from_json_list(rec[metric])


def summarize(method_rec: dict, *, reference: str, iou_threshold: float, n_boot: int, seed: int) -> dict:
    """One method's ``per_image`` record -> ``{metric: {"models": {member: interval}, "diff": {member: interval}}}``.

    Each member's value gets a bootstrap interval over images; each member other than
    ``reference`` gets ``member - reference`` as a paired one (``diff`` is empty for a lineup of
    one). MaxBoxAcc resamples whole threshold curves, so its interval includes the threshold's choice.
    """
    members = list(method_rec["models"])
    out = {}
    for metric in METRICS:
        stat = max_box_acc_stat(iou_threshold) if metric == "maxboxacc" else mean_stat
        vals = {name: _metric_values(method_rec, name, metric) for name in members}
        out[metric] = {
            "models": {name: bootstrap(v, stat=stat, n_boot=n_boot, seed=seed).to_json() for name, v in vals.items()},
            "diff": {name: paired_bootstrap(vals[name], vals[reference], stat=stat, n_boot=n_boot,
                                            seed=seed).to_json()
                     for name in members if name != reference},
        }
    return out


def _run_methods(imgs: BoxedImages, lineup: Lineup, methods: list[str], *, method_limits: Mapping[str, int],
                 iou_threshold: float, progress: bool, **run_kw) -> tuple[dict, dict, dict]:
    """Every method over the images: ``(per_image, cams, timings)``."""
    n = len(imgs.keys)
    per_image: dict[str, Any] = {}
    cams: dict[str, np.ndarray] = {}
    timings: dict[str, dict[str, float]] = {}
    fills: dict[tuple, torch.Tensor] = {}  # blur background per (image, preprocessing): the same for every CAM
    total = sum(len(spread_indices(n, method_limits.get(m))) for m in methods)
    with tqdm(total=total, desc="evaluate-cams", unit="img", disable=not progress) as bar:
        for method in methods:
            t0, c0 = time.perf_counter(), time.process_time()
            index = spread_indices(n, method_limits.get(method))
            bar.set_postfix_str(method)
            values, store = _run_method(method, imgs, index, lineup, fills=fills, bar=bar, **run_kw)
            per_image[method] = _per_image_record(index, values, iou_threshold)
            cams.update({f"{method}/{name}": cam for name, cam in store.items()})
            timings[method] = {"wall_s": round(time.perf_counter() - t0, 2),
                               "cpu_s": round(time.process_time() - c0, 2), "images": len(index)}
    return per_image, cams, timings


def _spatial_gates(imgs: BoxedImages, lineup: Lineup, *, batch_size: int, **score_kw) -> dict[str, Any]:
    """``{member: spatial_gate_scores(...)}`` for every member with spatial maps (CBAM, BAM), in order."""
    out = {}
    for member in lineup.members:
        gates = _spatial_gate_maps(imgs, member, batch_size=batch_size)
        if gates and gates[0]:
            out[member.name] = spatial_gate_scores(gates, [im.size for im in imgs.images],
                                                   [imgs.boxes[k] for k in imgs.keys], **score_kw)
    return out


def member_gates(model: torch.nn.Module) -> list[str]:
    """The gates a model has, as the page names them: ``"channel"`` (CBAM, SE, BAM's joint gate) and
    ``"spatial"`` (CBAM, BAM's joint gate); ``[]`` for a plain ResNet."""
    kinds = {kind for _, kind, _ in attention_gates(model)}
    return [g for g in ("channel", "spatial") if g in kinds or "joint" in kinds]


def _member_entry(member) -> dict[str, Any]:
    gates = member_gates(member.model)
    return {"name": member.name, "arch": member.arch, "trained": bool(member.trained), "gates": gates}


def _settings(lineup: Lineup, methods, layer, fractions, imputer, iou_threshold, n_boot, seed, max_images,
              method_limits) -> dict[str, Any]:
    thresholds = DEFAULT_THRESHOLDS
    return {
        "methods": methods, "layer": layer or "default (last block of layer4)", "target": "true class",
        "iou_threshold": iou_threshold, "cam_thresholds": [float(thresholds[0]), float(thresholds[-1]), len(thresholds)],
        "fractions": list(fractions), "imputer": imputer, "n_boot": n_boot, "ci_level": 0.95, "seed": seed,
        "max_images": max_images, "method_limits": method_limits, "torch_threads": torch.get_num_threads(),
        "device": str(lineup.reference_model.device),
    }


def _report(data, boxes, lineup: Lineup, imgs: BoxedImages, *, settings: dict) -> dict[str, Any]:
    """The report's header: what was run, on which models and images (results are added after)."""
    ref = lineup.reference_model
    return {
        "version": REPORT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": str(Path(data).resolve()), "boxes": str(Path(boxes).resolve()),
        "lineup": lineup.name, "reference": lineup.reference, "members": lineup.names,
        "models": {m.name: _member_entry(m) for m in lineup.members},
        "settings": settings,
        "metrics": {k: {"label": m.label, "higher_is_better": m.higher_is_better, "help": m.help}
                    for k, m in METRICS.items()},
        "images": [{"file": k, "class_id": folder, "class_name": ref.classes[t], "target": t,
                    "size": list(im.size), "boxes": [b.as_list() for b in imgs.boxes[k]]}
                   for k, folder, t, im in zip(imgs.keys, imgs.folders, imgs.targets, imgs.images)],
    }


def evaluate_cams(
    data: str | os.PathLike,
    boxes: str | os.PathLike,
    *,
    lineup: Lineup | None = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    layer: str | None = None,
    batch_size: int = 8,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    imputer: str = "blur",
    iou_threshold: float = 0.5,
    n_boot: int = 2000,
    seed: int = 0,
    max_images: int | None = None,
    method_limits: Mapping[str, int] | None = None,
    allow_missing: bool = False,
    progress: bool = True,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Score every member's CAMs of the true class on every boxed image of ``data``.

    Args:
        data: ImageFolder-layout folder (``data/<class id>/<file>``); class folders are matched to
            the members' class ids (WordNet ids), else to their readable names.
        boxes: box CSV (see :mod:`cbam_viz.research.quality.boxes`); only images with boxes are evaluated.
        lineup: a :class:`cbam_viz.engine.lineup.Lineup` (1 to 4 members, the same classes); None loads the
            default one (:func:`cbam_viz.engine.lineup.load_lineup`).
        methods: CAM methods (:func:`cbam_viz.engine.cam.list_methods`).
        layer: CAM layer; None for the engine's default (last block of ``layer4``).
        batch_size: images per :func:`~cbam_viz.engine.explain.explain` call.
        fractions: shares of pixels removed for the faithfulness scores.
        imputer: ``"blur"``, ``"mean"`` or ``"road"`` (see :mod:`cbam_viz.engine.faithfulness`).
        iou_threshold: IoU for a correct box (MaxBoxAcc).
        n_boot, seed: bootstrap resamples and seed (intervals are reproducible).
        max_images: evaluate only this many boxed images, spread evenly (smoke runs).
        method_limits: per-method image caps, e.g. ``{"scorecam": 16}``.
        allow_missing: skip CSV rows whose image is not in ``data`` instead of failing.
        progress: show a progress bar.

    Returns:
        ``(report, cams)``: the JSON-ready report (see :func:`cbam_viz.research.quality.report.write_report`)
        and ``{"<method>/<member>": (n, 112, 112) uint8}`` CAMs for
        :func:`cbam_viz.research.quality.view.render_record`.

    Raises:
        FileNotFoundError: ``data`` or ``boxes`` missing.
        BoxFileError: a malformed CSV, boxes outside their image, or (unless ``allow_missing``)
            boxes for images that are not in ``data``.
        ValueError: class folders that match no model class, members with different classes, an
            unknown method.
    """
    t_start, cpu_start = time.perf_counter(), time.process_time()
    methods, fractions = _check_settings(methods, fractions)
    method_limits = dict(method_limits or {})
    lineup = load_lineup() if lineup is None else lineup
    check_classes(lineup)
    imgs = load_boxed_images(data, boxes, lineup, max_images=max_images, allow_missing=allow_missing)
    per_image, cams, timings = _run_methods(
        imgs, lineup, methods, method_limits=method_limits, iou_threshold=iou_threshold, progress=progress,
        layer=layer, batch_size=batch_size, fractions=fractions, imputer=imputer)
    results = {m: summarize(per_image[m], reference=lineup.reference, iou_threshold=iou_threshold, n_boot=n_boot,
                            seed=seed) for m in methods}
    t0 = time.perf_counter()
    spatial = _spatial_gates(imgs, lineup, batch_size=batch_size, iou_threshold=iou_threshold, n_boot=n_boot,
                             seed=seed)
    report = _report(data, boxes, lineup, imgs, settings=_settings(
        lineup, methods, layer, fractions, imputer, iou_threshold, n_boot, seed, max_images, method_limits))
    report.update(results=results, per_image=per_image, spatial_gates=spatial,
                  timings={"methods": timings, "spatial_gates_wall_s": round(time.perf_counter() - t0, 2),
                           "total_wall_s": round(time.perf_counter() - t_start, 2),
                           "total_cpu_s": round(time.process_time() - cpu_start, 2)},
                  missing_images=imgs.missing)
    return report, cams
