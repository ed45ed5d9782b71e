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

The steps: :func:`cbam_viz.research.quality.boxed_images.load_boxed_images` (the images, their
boxes and true classes), :mod:`cbam_viz.research.quality.passes` (CAMs and spatial-gate maps over
the images, batched, scored per image; under ``torchrun`` each rank takes an even share and rank 0
gathers every image's values), :func:`_per_image_record` (per-image values, JSON-ready),
:func:`summarize` (bootstrap), and :func:`evaluate_cams` tying them into the report.

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

import numpy as np
import torch

from cbam_viz import distributed
from cbam_viz.engine.attention import attention_gates
from cbam_viz.engine.cam import list_methods
from cbam_viz.engine.controls import check_method
from cbam_viz.engine.lineup import Lineup, load_lineup
from cbam_viz.research.quality.boxed_images import BoxedImages, check_classes, load_boxed_images
from cbam_viz.research.quality.metrics import DEFAULT_THRESHOLDS, METRICS, max_box_acc
from cbam_viz.research.quality.passes import run_methods, spatial_gates
from cbam_viz.research.quality.report import REPORT_VERSION
from cbam_viz.stats import (
    bootstrap, from_json_list, max_box_acc_stat, mean_stat, paired_bootstrap, to_json_list,
)

__all__ = ["DEFAULT_FRACTIONS", "DEFAULT_METHODS", "between_members", "evaluate_cams", "summarize"]

DEFAULT_METHODS = ("gradcam", "gradcam++", "layercam")
DEFAULT_FRACTIONS = (0.2, 0.5)


def _check_settings(methods: Sequence[str], fractions: Sequence[float]) -> tuple[list[str], tuple[float, ...]]:
    if not methods:
        raise ValueError(f"no CAM method given; choose from {', '.join(list_methods())}")
    methods = list(dict.fromkeys(check_method(m) for m in methods))  # the app's own validator
    fractions = tuple(float(f) for f in fractions)
    if not fractions or not all(0 < f < 1 for f in fractions):
        raise ValueError(f"fractions must lie in (0, 1), got {fractions}")
    return methods, fractions


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
        stat = _statistic(metric, iou_threshold)
        out[metric] = {
            "models": {name: bootstrap(_metric_values(method_rec, name, metric), stat=stat, n_boot=n_boot,
                                       seed=seed).to_json() for name in members},
            "diff": {name: _paired(method_rec, name, reference, metric, iou_threshold, n_boot, seed)
                     for name in members if name != reference},
        }
    return out


def _statistic(metric: str, iou_threshold: float):
    return max_box_acc_stat(iou_threshold) if metric == "maxboxacc" else mean_stat


def _paired(method_rec: dict, member: str, against: str, metric: str, iou_threshold: float, n_boot: int,
            seed: int) -> dict:
    """``member - against`` on one metric, a paired bootstrap over the same images (JSON-ready)."""
    return paired_bootstrap(_metric_values(method_rec, member, metric), _metric_values(method_rec, against, metric),
                            stat=_statistic(metric, iou_threshold), n_boot=n_boot, seed=seed).to_json()


def between_members(per_image: Mapping[str, dict], pairs: Sequence[tuple[str, str]], *, iou_threshold: float,
                    n_boot: int, seed: int) -> list[dict[str, Any]]:
    """``member - against`` for each pair, per method and metric, paired over the same images.

    The reference answers "what does attention add to the plain network"; a family lineup has a
    second question, CBAM against SE: does the spatial gate make the CAMs better than channel
    attention alone? The per-image values are already there, so no model runs again.
    """
    out = []
    for member, against in pairs:
        results = {}
        for method, rec in per_image.items():
            results[method] = {metric: _paired(rec, member, against, metric, iou_threshold, n_boot, seed)
                               for metric in METRICS}
        out.append({"member": member, "against": against, "results": results})
    return out


def _check_pairs(lineup: Lineup, pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    for name in (n for pair in pairs for n in pair):
        if name not in lineup.names:
            raise ValueError(f"--compare names {name!r}, which is not a member of {lineup.name!r} "
                             f"({', '.join(lineup.names)})")
    return list(pairs)


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
    compare: Sequence[tuple[str, str]] = (),
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
        iou_threshold, n_boot, seed: IoU for a correct box (MaxBoxAcc); bootstrap resamples and seed.
        max_images, method_limits: evaluate only this many boxed images, spread evenly (smoke runs), in
            all or per method (``{"scorecam": 16}``).
        allow_missing: skip CSV rows whose image is not in ``data`` instead of failing.
        compare: ``(member, against)`` pairs also compared with each other (:func:`between_members`).
        progress: show a progress bar.

    Returns:
        ``(report, cams)``: the JSON-ready report (:func:`~cbam_viz.research.quality.report.write_report`) and
        ``{"<method>/<member>": (n, 112, 112) uint8}`` CAMs. Under torchrun rank 0 gets the one-process
        report (every image's values gathered in order, the same seed), the other ranks ``(None, None)``.

    Raises:
        FileNotFoundError: ``data`` or ``boxes`` missing.
        BoxFileError: a malformed CSV, boxes outside their image, or (unless ``allow_missing``)
            boxes for images that are not in ``data``.
        ValueError: class folders that match no model class, members with different classes, an
            unknown method, a ``compare`` name that is not a member.
    """
    t_start, cpu_start = time.perf_counter(), time.process_time()
    methods, fractions = _check_settings(methods, fractions)
    method_limits = dict(method_limits or {})
    lineup = load_lineup() if lineup is None else lineup
    check_classes(lineup)
    compare = _check_pairs(lineup, compare)
    ctx = distributed.context()
    imgs = load_boxed_images(data, boxes, lineup, max_images=max_images, allow_missing=allow_missing)
    ran = run_methods(imgs, lineup, methods, method_limits=method_limits, progress=progress, ctx=ctx, layer=layer,
                      batch_size=batch_size, fractions=fractions, imputer=imputer)
    t0 = time.perf_counter()
    spatial = spatial_gates(imgs, lineup, batch_size=batch_size, ctx=ctx, iou_threshold=iou_threshold,
                            n_boot=n_boot, seed=seed)
    if ran is None:  # a torchrun rank other than 0: rank 0 has every image's values
        return None, None
    values, cams, timings, index = ran
    per_image = {m: _per_image_record(index[m], values[m], iou_threshold) for m in methods}
    results = {m: summarize(per_image[m], reference=lineup.reference, iou_threshold=iou_threshold, n_boot=n_boot,
                            seed=seed) for m in methods}
    report = _report(data, boxes, lineup, imgs, settings=_settings(
        lineup, methods, layer, fractions, imputer, iou_threshold, n_boot, seed, max_images, method_limits))
    report.update(results=results, per_image=per_image, spatial_gates=spatial,
                  comparisons=between_members(per_image, compare, iou_threshold=iou_threshold, n_boot=n_boot,
                                              seed=seed),
                  timings={"methods": timings, "spatial_gates_wall_s": round(time.perf_counter() - t0, 2),
                           "total_wall_s": round(time.perf_counter() - t_start, 2),
                           "total_cpu_s": round(time.process_time() - cpu_start, 2)},
                  missing_images=imgs.missing)
    return report, cams
