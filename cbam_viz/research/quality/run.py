"""``evaluate-cams``: are ResNet-CBAM's CAMs better than the baseline's, on boxed images?

The CBAM paper (arXiv 1807.06521, Sec. 4.3, Fig. 4) shows Grad-CAM on ResNet-CBAM covering the
target object better than on the plain ResNet, on a handful of pictures. This module measures it:
for every boxed image of an ImageFolder directory and each CAM method, both models of a pair
explain the *true* class through the app's own engine (:func:`cbam_viz.explain.explain`, so the
numbers describe exactly what the app shows), and each CAM is scored:

* pointing game, energy in box, MaxBoxAcc (IoU >= 0.5, best threshold over the set), from
  :mod:`cbam_viz.research.quality.metrics`;
* faithfulness without boxes (:mod:`cbam_viz.faithfulness`): the true-class probability after
  removing the CAM's top (MoRF) or bottom (LeRF) 20 % and 50 % of pixels, blur-imputed, and
  ROAD's combined score ``(LeRF - MoRF) / 2``;
* and, beside the CAMs, every CBAM block's spatial-gate map with the same box metrics, against a
  centre-Gaussian reference map (:mod:`cbam_viz.research.quality.gates`).

Each statistic gets a 95 % bootstrap interval, and ``CBAM - baseline`` a *paired* bootstrap
interval over images (:mod:`cbam_viz.research.quality.stats`): an interval that excludes 0 is a difference
the images support, one that straddles 0 is not. :func:`cbam_viz.research.quality.report.write_report`
writes the result.

The steps, one function each: :func:`_load_boxed_images` (the images, their boxes and true
classes), :func:`_run_method` (CAMs over the images, batched, and :func:`_score_cam` per image),
:func:`_per_image_record` (per-image values, JSON-ready), :func:`summarize` (bootstrap), and
:func:`evaluate_cams` tying them into the report.

Cost on a 2-core CPU: gradient methods (Grad-CAM, Grad-CAM++, LayerCAM) need one forward and a
partial backward per image and model; Score-CAM needs one forward per channel of ``layer4``
(512 for a resnet18), ~500x more, so it is not a default method and
``method_limits={"scorecam": n}`` runs it on an evenly spread subset of ``n`` images.
"""
from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from cbam_viz.cam import list_methods
from cbam_viz.controls import check_method
from cbam_viz.training.data import load_rgb, scan_image_folder
from cbam_viz.training.evaluate import spread_indices
from cbam_viz.explain import ModelExplanation, explain
from cbam_viz.faithfulness import blur_fill_image, perturbation_scores, resize_cam
from cbam_viz.preprocess import to_model_batch
from cbam_viz.research.quality.boxes import Box, BoxFileError, check_boxes_fit, read_boxes
from cbam_viz.research.quality.gates import spatial_gate_scores
from cbam_viz.research.quality.metrics import (
    DEFAULT_THRESHOLDS, METRICS, ROLES, box_hits_over_thresholds, energy_in_boxes, max_box_acc, pointing_game,
)
from cbam_viz.research.quality.report import CAM_STORE_SIZE, REPORT_VERSION, from_json_list, to_json_list
from cbam_viz.research.quality.stats import bootstrap, max_box_acc_stat, mean_stat, paired_bootstrap

__all__ = ["DEFAULT_FRACTIONS", "DEFAULT_METHODS", "evaluate_cams", "summarize"]

DEFAULT_METHODS = ("gradcam", "gradcam++", "layercam")
DEFAULT_FRACTIONS = (0.2, 0.5)


@dataclass(frozen=True)
class _BoxedImages:
    """The images a run evaluates, in order (sorted by class folder, then file)."""

    keys: list[str]                         # "<class folder>/<file>", the box CSV's keys
    folders: list[str]                      # each image's class folder
    targets: list[int]                      # each image's true class index in the pair
    images: list[Image.Image]
    boxes: Mapping[str, tuple[Box, ...]]
    missing: list[str]                      # CSV images not in the folder (allow_missing)


def _class_index(folder: str, model) -> int | None:
    if folder in model.class_ids:
        return list(model.class_ids).index(folder)
    if folder in model.classes:
        return list(model.classes).index(folder)
    return None


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


def _load_boxed_images(data, boxes, pair, *, max_images: int | None, allow_missing: bool) -> _BoxedImages:
    """The boxed images of ``data``, their boxes (checked to fit) and their true class in ``pair``."""
    table = read_boxes(boxes)
    scan = scan_image_folder(data)
    in_folder = set(scan.files)
    missing = [k for k in table if k not in in_folder]
    if missing and not allow_missing:
        raise BoxFileError(f"{len(missing)} image(s) of {boxes} are not in {data}, e.g. {', '.join(missing[:3])} "
                           "(pass allow_missing / --allow-missing to skip them)")
    keys = [f for f in scan.files if f in table]
    if not keys:
        raise BoxFileError(f"no image of {data} has a box in {boxes}")
    keys = [keys[i] for i in spread_indices(len(keys), max_images)]
    folder_of = dict(zip(scan.files, scan.labels))
    folders = [scan.classes[folder_of[k]] for k in keys]
    targets = [_class_index(folder, pair.cbam) for folder in folders]
    unmatched = {folder for folder, t in zip(folders, targets) if t is None}
    if unmatched:
        raise ValueError(f"class folder(s) {sorted(unmatched)} match no class of {pair.cbam.name} "
                         f"(ids {', '.join(pair.cbam.class_ids[:5])}...; names {', '.join(pair.cbam.classes[:5])}...)")
    images = [load_rgb(Path(data) / k) for k in keys]
    check_boxes_fit(table, {k: im.size for k, im in zip(keys, images)})
    return _BoxedImages(keys, folders, targets, images, table, missing)


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
    method: str, imgs: _BoxedImages, index: np.ndarray, pair, *, layer: str | None, batch_size: int,
    fractions: tuple[float, ...], imputer: str, fills: dict[tuple, torch.Tensor], bar,
) -> tuple[dict[str, list[dict]], dict[str, np.ndarray]]:
    """Both models' CAMs of the true class on the images ``index``, scored.

    Returns:
        ``({role: [values of each image]}, {role: (len(index), 112, 112) uint8 CAMs})``.
        ``fills`` caches the blur background per (image, model preprocessing) across methods.
    """
    values: dict[str, list[dict]] = {r: [] for r in ROLES}
    store = {r: np.zeros((len(index), CAM_STORE_SIZE, CAM_STORE_SIZE), np.uint8) for r in ROLES}
    num_classes = len(pair.cbam.classes)
    for start in range(0, len(index), batch_size):
        chunk = index[start:start + batch_size]
        photos = [imgs.images[i] for i in chunk]
        exps = explain(photos, pair, method=method, target=[imgs.targets[i] for i in chunk], layer=layer,
                       topk=num_classes)
        for role in ROLES:
            loaded = getattr(pair, role)
            batch = to_model_batch(photos, loaded.input_size, loaded.mean, loaded.std)
            for j, (i, exp) in enumerate(zip(chunk, exps)):
                me, x = getattr(exp, role), batch[j]
                fkey = (int(i), loaded.input_size, loaded.mean, loaded.std)
                if imputer == "blur" and fkey not in fills:
                    fills[fkey] = blur_fill_image(x)
                values[role].append(_score_cam(me, imgs.boxes[imgs.keys[i]], loaded.model, x, fractions=fractions,
                                               imputer=imputer, fill=fills.get(fkey)))
                store[role][start + j] = _quantize(me.cam)
        bar.update(len(chunk))
    return values, store


def _spatial_gate_maps(imgs: _BoxedImages, model, *, batch_size: int) -> list[dict[str, np.ndarray]]:
    """Every CBAM block's spatial attention for each image: one plain forward of the CBAM model.

    The gates do not depend on the CAM method or the target class, so they are recorded once.
    """
    from cbam_viz.attention import record_attention
    from cbam_viz.pair import model_lock

    out: list[dict[str, np.ndarray]] = []
    for start in range(0, len(imgs.images), batch_size):
        x = to_model_batch(imgs.images[start:start + batch_size], model.input_size, model.mean, model.std)
        with model_lock(model.model), torch.no_grad(), record_attention(model.model) as maps:
            model.model(x.to(model.device))
        out += [{block: g["spatial"][j].float().cpu().numpy() for block, g in maps.items()} for j in range(len(x))]
    return out


def _per_image_record(index: np.ndarray, values: Mapping[str, list[dict]], iou_threshold: float) -> dict:
    """Per-image values -> the report's ``per_image[method]`` (rounded), incl. each model's best threshold."""
    out: dict[str, Any] = {"index": index.tolist()}
    for role in ROLES:
        v = values[role]
        # Kept to 3 decimals rounded *down*, and MaxBoxAcc's threshold is picked on what is kept: a
        # stored IoU clears the IoU threshold exactly when the measured one did (0.4996 rounded to
        # nearest would become a hit at 0.5), so the report's table and this choice agree.
        ious = np.floor(np.stack([d["ious"] for d in v]).astype(np.float64) * 1000) / 1000
        _, best = max_box_acc(ious, iou_threshold=iou_threshold)
        morf, lerf = np.stack([d["morf"] for d in v]), np.stack([d["lerf"] for d in v])
        p = np.asarray([d["p"] for d in v], np.float32)
        out[role] = {
            "pointing": to_json_list([d["pointing"] for d in v]),
            "energy": to_json_list([d["energy"] for d in v]),
            "box_iou": to_json_list(ious[:, best]),  # at the threshold MaxBoxAcc picked for this model
            "best_threshold_index": best,
            "ious": [to_json_list(row, 3) for row in ious],
            "p": to_json_list(p),
            "morf": [to_json_list(row) for row in morf],
            "lerf": [to_json_list(row) for row in lerf],
            "road": to_json_list(((lerf - morf) / 2).mean(axis=1)),
            "morf_drop": to_json_list((p[:, None] - morf).mean(axis=1)),
            "lerf_drop": to_json_list((p[:, None] - lerf).mean(axis=1)),
            "top1": [int(d["top1"]) for d in v],
        }
    return out


def _metric_values(method_rec: dict, role: str, metric: str) -> np.ndarray:
    if metric == "maxboxacc":
        return np.array([from_json_list(row) for row in method_rec[role]["ious"]], np.float64)
    return from_json_list(method_rec[role][metric])


def summarize(method_rec: dict, *, iou_threshold: float, n_boot: int, seed: int) -> dict:
    """One method's ``per_image`` record -> ``{metric: {"baseline", "cbam", "diff"}}`` intervals (JSON).

    Each model's value gets a bootstrap interval over images, ``cbam - baseline`` a paired one;
    MaxBoxAcc resamples whole threshold curves, so its interval includes the threshold's choice.
    """
    out = {}
    for metric in METRICS:
        stat = max_box_acc_stat(iou_threshold) if metric == "maxboxacc" else mean_stat
        vals = {r: _metric_values(method_rec, r, metric) for r in ROLES}
        out[metric] = {
            "baseline": bootstrap(vals["baseline"], stat=stat, n_boot=n_boot, seed=seed).to_json(),
            "cbam": bootstrap(vals["cbam"], stat=stat, n_boot=n_boot, seed=seed).to_json(),
            "diff": paired_bootstrap(vals["cbam"], vals["baseline"], stat=stat, n_boot=n_boot, seed=seed).to_json(),
        }
    return out


def evaluate_cams(
    data: str | os.PathLike,
    boxes: str | os.PathLike,
    *,
    pair=None,
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
    """Score both models' CAMs of the true class on every boxed image of ``data``.

    Args:
        data: ImageFolder-layout folder (``data/<class id>/<file>``); class folders are matched to
            the models' class ids (WordNet ids), else to their readable names.
        boxes: box CSV (see :mod:`cbam_viz.research.quality.boxes`); only images with boxes are evaluated.
        pair: a :class:`cbam_viz.pair.ModelPair`; None loads the default pair (``load_pair()``).
        methods: CAM methods (:func:`cbam_viz.explain.list_methods`).
        layer: CAM layer; None for the engine's default (last block of ``layer4``).
        batch_size: images per :func:`~cbam_viz.explain.explain` call.
        fractions: shares of pixels removed for the faithfulness scores.
        imputer: ``"blur"``, ``"mean"`` or ``"road"`` (see :mod:`cbam_viz.faithfulness`).
        iou_threshold: IoU for a correct box (MaxBoxAcc).
        n_boot, seed: bootstrap resamples and seed (intervals are reproducible).
        max_images: evaluate only this many boxed images, spread evenly (smoke runs).
        method_limits: per-method image caps, e.g. ``{"scorecam": 16}``.
        allow_missing: skip CSV rows whose image is not in ``data`` instead of failing.
        progress: show a progress bar.

    Returns:
        ``(report, cams)``: the JSON-ready report (see :func:`cbam_viz.research.quality.report.write_report`)
        and ``{"<method>/<role>": (n, 112, 112) uint8}`` CAMs for
        :func:`cbam_viz.research.quality.view.render_record`.

    Raises:
        FileNotFoundError: ``data`` or ``boxes`` missing.
        BoxFileError: a malformed CSV, boxes outside their image, or (unless ``allow_missing``)
            boxes for images that are not in ``data``.
        ValueError: class folders that match no model class, models with different classes, an
            unknown method.
    """
    t_start, cpu_start = time.perf_counter(), time.process_time()
    methods, fractions = _check_settings(methods, fractions)
    method_limits = dict(method_limits or {})
    if pair is None:
        from cbam_viz.pair import load_pair

        pair = load_pair()
    if pair.baseline.class_ids != pair.cbam.class_ids:
        raise ValueError(f"the pair's models have different classes: {pair.baseline.name} vs {pair.cbam.name}")
    imgs = _load_boxed_images(data, boxes, pair, max_images=max_images, allow_missing=allow_missing)
    n = len(imgs.keys)

    per_image: dict[str, Any] = {}
    cams: dict[str, np.ndarray] = {}
    timings: dict[str, dict[str, float]] = {}
    fills: dict[tuple, torch.Tensor] = {}  # blur background per (image, preprocessing): the same for every CAM
    total = sum(len(spread_indices(n, method_limits.get(m))) for m in methods)
    bar = tqdm(total=total, desc="evaluate-cams", unit="img", disable=not progress)
    for method in methods:
        t0, c0 = time.perf_counter(), time.process_time()
        index = spread_indices(n, method_limits.get(method))
        bar.set_postfix_str(method)
        values, store = _run_method(method, imgs, index, pair, layer=layer, batch_size=batch_size,
                                    fractions=fractions, imputer=imputer, fills=fills, bar=bar)
        per_image[method] = _per_image_record(index, values, iou_threshold)
        for role in ROLES:
            cams[f"{method}/{role}"] = store[role]
        timings[method] = {"wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(time.process_time() - c0, 2),
                           "images": len(index)}
    bar.close()

    results = {m: summarize(per_image[m], iou_threshold=iou_threshold, n_boot=n_boot, seed=seed) for m in methods}
    t0 = time.perf_counter()
    gates = _spatial_gate_maps(imgs, pair.cbam, batch_size=batch_size)
    spatial = (spatial_gate_scores(gates, [im.size for im in imgs.images], [imgs.boxes[k] for k in imgs.keys],
                                   iou_threshold=iou_threshold, n_boot=n_boot, seed=seed)
               if gates and gates[0] else None)
    gates_wall_s = round(time.perf_counter() - t0, 2)
    thresholds = DEFAULT_THRESHOLDS
    report = {
        "version": REPORT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": str(Path(data).resolve()),
        "boxes": str(Path(boxes).resolve()),
        "pair": pair.name,
        "models": {r: {"name": getattr(pair, r).name, "arch": getattr(pair, r).arch,
                       "trained": bool(getattr(pair, r).trained)} for r in ROLES},
        "settings": {
            "methods": methods, "layer": layer or "default (last block of layer4)", "target": "true class",
            "iou_threshold": iou_threshold, "cam_thresholds": [float(thresholds[0]), float(thresholds[-1]), len(thresholds)],
            "fractions": list(fractions), "imputer": imputer, "n_boot": n_boot, "ci_level": 0.95, "seed": seed,
            "max_images": max_images, "method_limits": method_limits, "torch_threads": torch.get_num_threads(),
            "device": str(pair.cbam.device),
        },
        "metrics": {k: {"label": m.label, "higher_is_better": m.higher_is_better, "help": m.help} for k, m in METRICS.items()},
        "images": [{"file": k, "class_id": folder, "class_name": pair.cbam.classes[t], "target": t,
                    "size": list(im.size), "boxes": [b.as_list() for b in imgs.boxes[k]]}
                   for k, folder, t, im in zip(imgs.keys, imgs.folders, imgs.targets, imgs.images)],
        "results": results,
        "per_image": per_image,
        "timings": {"methods": timings, "spatial_gates_wall_s": gates_wall_s,
                    "total_wall_s": round(time.perf_counter() - t_start, 2),
                    "total_cpu_s": round(time.process_time() - cpu_start, 2)},
        "missing_images": imgs.missing,
    }
    if spatial is not None:
        report["spatial_gates"] = spatial
    return report, cams
