"""``evaluate-cams``: are ResNet-CBAM's CAMs better than the baseline's, on boxed images?

The CBAM paper (arXiv 1807.06521, Sec. 4.3, Fig. 4) shows Grad-CAM on ResNet-CBAM covering the
target object better than on the plain ResNet, on a handful of pictures. This module measures it:
for every boxed image of an ImageFolder directory and each CAM method, both models of a pair
explain the *true* class through the app's own engine (:func:`cbam_viz.explain.explain`, so the
numbers describe exactly what the app shows), and :mod:`cbam_viz.localization` scores each CAM:

* pointing game, energy in box, MaxBoxAcc (IoU >= 0.5, best threshold over the set);
* faithfulness without boxes: the true-class probability after removing the CAM's top (MoRF) or
  bottom (LeRF) 20 % and 50 % of pixels, blur-imputed, and ROAD's combined score
  ``(LeRF - MoRF) / 2``.

Each statistic gets a 95 % bootstrap interval, and ``CBAM - baseline`` a *paired* bootstrap
interval over images (:mod:`cbam_viz.stats`): an interval that excludes 0 is a difference the
images support, one that straddles 0 is not.

Outputs (``out`` folder): ``report.json`` (settings, results, per-image values), ``report.md``
(the table), ``summary.png`` (paired differences with intervals) and ``cams.npz`` (every CAM at
112 px, uint8, so the app can draw an image's two CAMs without running the models).

Cost on a 2-core CPU: gradient methods (Grad-CAM, Grad-CAM++, LayerCAM) need one forward and a
partial backward per image and model; Score-CAM needs one forward per channel of ``layer4``
(512 for a resnet18), ~500x more, so it is not a default method and
``method_limits={"scorecam": n}`` runs it on an evenly spread subset of ``n`` images.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from cbam_viz.boxes import Box, BoxFileError, check_boxes_fit, read_boxes
from cbam_viz.stats import Interval, bootstrap, max_box_acc_stat, mean_stat, paired_bootstrap

__all__ = [
    "DEFAULT_METHODS", "DEFAULT_FRACTIONS", "METRICS", "MetricInfo", "REPORT_VERSION", "evaluate_cams",
    "write_report", "load_report", "load_report_cams", "markdown_report", "summary_figure",
    "most_different_images", "render_comparison", "render_record", "record_image", "confidence_drop_figure",
]

REPORT_VERSION = 1
DEFAULT_METHODS = ("gradcam", "gradcam++", "layercam")
DEFAULT_FRACTIONS = (0.2, 0.5)
CAM_STORE_SIZE = 112
ROLES = ("baseline", "cbam")


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


# ------------------------------------------------------------------------------------ the run


def _class_index(folder: str, model) -> int | None:
    if folder in model.class_ids:
        return list(model.class_ids).index(folder)
    if folder in model.classes:
        return list(model.classes).index(folder)
    return None


def _subset(n: int, k: int | None) -> np.ndarray:
    """``k`` indices spread evenly over ``range(n)`` (the images are sorted by class)."""
    if k is None or k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max(k, 1)).round().astype(int))


def _quantize(cam: np.ndarray) -> np.ndarray:
    import cv2

    small = cv2.resize(cam.astype(np.float32), (CAM_STORE_SIZE, CAM_STORE_SIZE), interpolation=cv2.INTER_AREA)
    return np.clip(np.rint(small * 255), 0, 255).astype(np.uint8)


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
        boxes: box CSV (see :mod:`cbam_viz.boxes`); only images with boxes are evaluated.
        pair: a :class:`cbam_viz.pair.ModelPair`; None loads the default pair (``load_pair()``).
        methods: CAM methods (:func:`cbam_viz.explain.list_methods`).
        layer: CAM layer; None for the engine's default (last block of ``layer4``).
        batch_size: images per :func:`~cbam_viz.explain.explain` call.
        fractions: shares of pixels removed for the faithfulness scores.
        imputer: ``"blur"``, ``"mean"`` or ``"road"`` (see :mod:`cbam_viz.localization`).
        iou_threshold: IoU for a correct box (MaxBoxAcc).
        n_boot, seed: bootstrap resamples and seed (intervals are reproducible).
        max_images: evaluate only this many boxed images, spread evenly (smoke runs).
        method_limits: per-method image caps, e.g. ``{"scorecam": 16}``.
        allow_missing: skip CSV rows whose image is not in ``data`` instead of failing.
        progress: show a progress bar.

    Returns:
        ``(report, cams)``: the JSON-ready report (see :func:`write_report`) and
        ``{"<method>/<role>": (n, 112, 112) uint8}`` CAMs for :func:`render_record`.

    Raises:
        FileNotFoundError: ``data`` or ``boxes`` missing.
        BoxFileError: a malformed CSV, boxes outside their image, or (unless ``allow_missing``)
            boxes for images that are not in ``data``.
        ValueError: class folders that match no model class, models with different classes, an
            unknown method.
    """
    import torch
    from tqdm.auto import tqdm

    from cbam_viz.cam import list_methods
    from cbam_viz.data import load_rgb, scan_image_folder
    from cbam_viz.explain import explain
    from cbam_viz.localization import (
        DEFAULT_THRESHOLDS, blur_fill_image, box_hits_over_thresholds, energy_in_boxes, perturbation_scores,
        pointing_game,
    )
    from cbam_viz.preprocess import to_model_batch

    t_start, cpu_start = time.perf_counter(), time.process_time()
    methods = list(dict.fromkeys(m.strip().lower() for m in methods))
    unknown = [m for m in methods if m not in list_methods()]
    if unknown or not methods:
        raise ValueError(f"unknown CAM method(s) {unknown or methods}; choose from {', '.join(list_methods())}")
    fractions = tuple(float(f) for f in fractions)
    if not fractions or not all(0 < f < 1 for f in fractions):
        raise ValueError(f"fractions must lie in (0, 1), got {fractions}")
    method_limits = dict(method_limits or {})
    if pair is None:
        from cbam_viz.pair import load_pair

        pair = load_pair()
    if tuple(pair.baseline.class_ids) != tuple(pair.cbam.class_ids):
        raise ValueError(f"the pair's models have different classes: {pair.baseline.name} vs {pair.cbam.name}")

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
    keys = [keys[i] for i in _subset(len(keys), max_images)]
    folder_of = dict(zip(scan.files, scan.labels))
    targets, unmatched = [], set()
    for k in keys:
        folder = scan.classes[folder_of[k]]
        idx = _class_index(folder, pair.cbam)
        if idx is None:
            unmatched.add(folder)
        targets.append(idx)
    if unmatched:
        raise ValueError(f"class folder(s) {sorted(unmatched)} match no class of {pair.cbam.name} "
                         f"(ids {', '.join(pair.cbam.class_ids[:5])}...; names {', '.join(pair.cbam.classes[:5])}...)")

    images = [load_rgb(Path(data) / k) for k in keys]
    check_boxes_fit(table, {k: im.size for k, im in zip(keys, images)})
    n = len(keys)
    thresholds = DEFAULT_THRESHOLDS
    num_classes = len(pair.cbam.classes)

    per_image: dict[str, Any] = {}
    cams: dict[str, np.ndarray] = {}
    timings: dict[str, dict[str, float]] = {}
    fills: dict[tuple, Any] = {}  # blur background per (image, preprocessing): the same for every CAM
    total = sum(len(_subset(n, method_limits.get(m))) for m in methods)
    bar = tqdm(total=total, desc="evaluate-cams", unit="img", disable=not progress)
    for method in methods:
        t0, c0 = time.perf_counter(), time.process_time()
        idx = _subset(n, method_limits.get(method))
        bar.set_postfix_str(method)
        rec = {"index": idx.tolist(), **{r: {"pointing": [], "energy": [], "ious": [], "p": [], "morf": [], "lerf": [],
                                              "top1": []} for r in ROLES}}
        store = {r: np.zeros((len(idx), CAM_STORE_SIZE, CAM_STORE_SIZE), np.uint8) for r in ROLES}
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            exps = explain([images[i] for i in chunk], pair, method=method, target=[targets[i] for i in chunk],
                           layer=layer, topk=num_classes)
            for role in ROLES:
                loaded = getattr(pair, role)
                batch = to_model_batch([images[i] for i in chunk], loaded.input_size, loaded.mean, loaded.std)
                for j, (i, exp) in enumerate(zip(chunk, exps)):
                    me = getattr(exp, role)
                    cam, bxs = np.asarray(me.cam, np.float32), table[keys[i]]
                    r = rec[role]
                    r["pointing"].append(pointing_game(cam, bxs))
                    r["energy"].append(energy_in_boxes(cam, bxs))
                    r["ious"].append(box_hits_over_thresholds(cam, bxs, thresholds=thresholds))
                    p0 = next(p.prob for p in me.predictions if p.index == me.target)
                    r["top1"].append(me.predictions[0].index)
                    x = batch[j]
                    cam_in = cam if cam.shape == tuple(x.shape[-2:]) else _resize(cam, x.shape[-2:])
                    fkey = (int(i), loaded.input_size, loaded.mean, loaded.std)
                    if imputer == "blur" and fkey not in fills:
                        fills[fkey] = blur_fill_image(x)
                    s = perturbation_scores(loaded.model, x, cam_in, me.target, fractions=fractions,
                                            imputer=imputer, p_original=p0, fill=fills.get(fkey))
                    r["p"].append(s["p"])
                    r["morf"].append(s["morf"])
                    r["lerf"].append(s["lerf"])
                    store[role][start + j] = _quantize(cam)
            bar.update(len(chunk))
        per_image[method] = _finish_method(rec, iou_threshold)
        for role in ROLES:
            cams[f"{method}/{role}"] = store[role]
        timings[method] = {"wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(time.process_time() - c0, 2),
                           "images": len(idx)}
    bar.close()

    results = {m: _summarize(per_image[m], iou_threshold=iou_threshold, n_boot=n_boot, seed=seed) for m in methods}
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
        "images": [{"file": k, "class_id": scan.classes[folder_of[k]], "class_name": pair.cbam.classes[t],
                    "target": t, "size": list(im.size), "boxes": [b.as_list() for b in table[k]]}
                   for k, t, im in zip(keys, targets, images)],
        "results": results,
        "per_image": per_image,
        "timings": {"methods": timings, "total_wall_s": round(time.perf_counter() - t_start, 2),
                    "total_cpu_s": round(time.process_time() - cpu_start, 2)},
        "missing_images": missing,
    }
    return report, cams


def _resize(cam: np.ndarray, shape) -> np.ndarray:
    import cv2

    h, w = int(shape[0]), int(shape[1])
    return np.clip(cv2.resize(cam, (w, h), interpolation=cv2.INTER_LINEAR), 0, None)


def _finish_method(rec: dict, iou_threshold: float) -> dict:
    """Per-image lists -> JSON-ready per-image metrics (rounded), incl. each model's best threshold."""
    out: dict[str, Any] = {"index": rec["index"]}
    for role in ROLES:
        r = rec[role]
        ious = np.stack(r["ious"]).astype(np.float32)
        acc = (ious >= iou_threshold).mean(axis=0)
        best = int(np.argmax(acc))
        morf, lerf, p = np.stack(r["morf"]), np.stack(r["lerf"]), np.asarray(r["p"], np.float32)
        out[role] = {
            "pointing": _round(r["pointing"]),
            "energy": _round(r["energy"]),
            "box_iou": _round(ious[:, best]),  # at the threshold MaxBoxAcc picked for this model
            "best_threshold_index": best,
            "ious": [_round(row, 3) for row in ious],
            "p": _round(p),
            "morf": [_round(row) for row in morf],
            "lerf": [_round(row) for row in lerf],
            "road": _round(((lerf - morf) / 2).mean(axis=1)),
            "morf_drop": _round((p[:, None] - morf).mean(axis=1)),
            "lerf_drop": _round((p[:, None] - lerf).mean(axis=1)),
            "top1": [int(v) for v in r["top1"]],
        }
    return out


def _round(values, digits: int = 4) -> list:
    return [None if v is None or not math.isfinite(float(v)) else round(float(v), digits) for v in np.asarray(values, np.float64)]


def _arr(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _metric_values(method_rec: dict, role: str, metric: str) -> np.ndarray:
    if metric == "maxboxacc":
        return np.array([[np.nan if v is None else v for v in row] for row in method_rec[role]["ious"]], np.float64)
    return _arr(method_rec[role][metric])


def _summarize(method_rec: dict, *, iou_threshold: float, n_boot: int, seed: int) -> dict:
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


# ---------------------------------------------------------------------------------- outputs


def _fmt(iv: dict, pct: bool) -> str:
    if iv["value"] is None:
        return "n/a"
    s = 100.0 if pct else 1.0
    d = 1 if pct else 3
    return f"{iv['value'] * s:.{d}f} [{iv['low'] * s:.{d}f}, {iv['high'] * s:.{d}f}]"


def _verdict(diff: dict, higher_is_better: bool) -> str:
    if diff["value"] is None:
        return "n/a"
    if diff["low"] > 0 or diff["high"] < 0:
        better = (diff["low"] > 0) == higher_is_better
        return "**CBAM better**" if better else "**baseline better**"
    return "no clear difference"


_PCT = {"pointing", "energy", "maxboxacc"}


def markdown_report(report: dict) -> str:
    """The results table (and how to read it) as Markdown."""
    s = report["settings"]
    n_img = len(report["images"])
    models = report["models"]
    lines = [
        f"## CAM quality: {models['baseline']['name']} vs {models['cbam']['name']}",
        "",
        f"{n_img} boxed images from `{report['data']}`, CAMs of the true class at layer {s['layer']}. "
        f"Values: mean (or MaxBoxAcc) with a 95 % bootstrap interval ({s['n_boot']} resamples); "
        "**CBAM − baseline** with a paired bootstrap interval over the same images. "
        "Pointing game, energy and MaxBoxAcc in %; probabilities as fractions. "
        f"Faithfulness: true-class probability after {s['imputer']}-imputing the CAM's top (MoRF) or "
        f"bottom (LeRF) {', '.join(f'{f:.0%}' for f in s['fractions'])} of pixels.",
        "",
    ]
    if not (models["baseline"]["trained"] and models["cbam"]["trained"]):
        lines += ["> **Untrained models**: these numbers describe random networks, not the trained pair.", ""]
    lines += ["| method | metric | n | baseline | CBAM | CBAM − baseline | verdict |",
              "|---|---|---:|---|---|---|---|"]
    for method, res in report["results"].items():
        for key, info in report["metrics"].items():
            r = res[key]
            arrow = "↑" if info["higher_is_better"] else "↓"
            pct = key in _PCT
            lines.append(f"| {method} | {info['label']} {arrow} | {r['diff']['n']} | {_fmt(r['baseline'], pct)} | "
                         f"{_fmt(r['cbam'], pct)} | {_fmt(r['diff'], pct)} | {_verdict(r['diff'], info['higher_is_better'])} |")
    t = report["timings"]
    per_method = ", ".join(f"{m} {v['wall_s']:.0f} s / {v['images']} img" for m, v in t["methods"].items())
    lines += ["", "Metrics: " + "; ".join(f"*{i['label']}*: {i['help']}" for i in report["metrics"].values()) + ".",
              "", f"Run time: {t['total_wall_s']:.0f} s wall, {t['total_cpu_s']:.0f} s CPU "
              f"({per_method}); "
              f"device {s['device']}, {s['torch_threads']} threads.", ""]
    return "\n".join(lines)


def summary_figure(report: dict):
    """A matplotlib Figure: per metric, CBAM − baseline with its 95 % interval for each method."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state touched

    metrics = list(report["metrics"])
    methods = list(report["results"])
    ncols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig = Figure(figsize=(3.6 * ncols, nrows * (0.45 * len(methods) + 1.3) + 0.4), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    for ax, key in zip(axes, metrics):
        info = report["metrics"][key]
        scale = 100.0 if key in _PCT else 1.0
        for y, method in enumerate(methods):
            d = report["results"][method][key]["diff"]
            if d["value"] is None:
                continue
            good = (d["low"] > 0) == info["higher_is_better"] if (d["low"] > 0 or d["high"] < 0) else None
            color = {True: "tab:green", False: "tab:red", None: "tab:gray"}[good]
            ax.errorbar(d["value"] * scale, y, xerr=[[(d["value"] - d["low"]) * scale], [(d["high"] - d["value"]) * scale]],
                        fmt="o", color=color, capsize=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(f"{info['label']} {'↑' if info['higher_is_better'] else '↓'}", fontsize=9)
        ax.set_xlabel("CBAM − baseline" + (" (points)" if scale == 100 else ""), fontsize=8)
        ax.tick_params(labelsize=8)
    axes[0].set_yticks(range(len(methods)), methods)
    axes[0].set_ylim(len(methods) - 0.5, -0.5)  # first method on top (axes share y)
    fig.suptitle(f"Paired differences, 95 % bootstrap intervals, {len(report['images'])} images "
                 "(green: CBAM better, red: baseline better, grey: no clear difference)", fontsize=9)
    return fig


def write_report(report: dict, cams: Mapping[str, np.ndarray], out: str | os.PathLike) -> dict[str, Path]:
    """Write ``report.json``, ``report.md``, ``summary.png`` and ``cams.npz`` to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md", "figure": out / "summary.png",
             "cams": out / "cams.npz"}
    tmp = paths["json"].with_suffix(".json.tmp")
    public = {k: v for k, v in report.items() if not k.startswith("_")}  # "_dir", "_cams" of a loaded report
    tmp.write_text(json.dumps(public, indent=1, allow_nan=False))
    os.replace(tmp, paths["json"])
    paths["markdown"].write_text(markdown_report(public))
    summary_figure(public).savefig(paths["figure"], dpi=120)
    np.savez_compressed(paths["cams"], **{k.replace("/", "__"): v for k, v in cams.items()})
    return paths


# ------------------------------------------------------------------------- the app's side


def load_report(path: str | os.PathLike) -> dict:
    """Read a report written by :func:`write_report` (``path``: its folder or ``report.json``).

    The returned dict has ``"_dir"`` set to the report's folder (for :func:`load_report_cams`).

    Raises:
        FileNotFoundError: no report there.
        ValueError: not a report, or one of an unsupported version.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"no CAM-quality report at {path} (run: python -m cbam_viz evaluate-cams ...)")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(report, dict) or "results" not in report or "per_image" not in report:
        raise ValueError(f"{path} is not an evaluate-cams report")
    if report.get("version") != REPORT_VERSION:
        raise ValueError(f"{path} has report version {report.get('version')}; this code reads version {REPORT_VERSION}")
    report["_dir"] = str(path.parent)
    return report


def load_report_cams(report: dict) -> dict[str, np.ndarray]:
    """The stored CAMs, ``{"<method>/<role>": (n_method_images, 112, 112) uint8}``; {} if absent."""
    p = Path(report.get("_dir", ".")) / "cams.npz"
    if not p.is_file():
        return {}
    with np.load(p) as z:
        return {k.replace("__", "/"): z[k] for k in z.files}


def most_different_images(
    report: dict, metric: str, k: int = 8, *, method: str | None = None, direction: str = "both"
) -> list[dict]:
    """The ``k`` images where the two models' CAMs score most differently on ``metric``.

    Args:
        report: from :func:`load_report`.
        metric: a per-image metric: ``pointing``, ``energy``, ``maxboxacc`` (the IoU of each
            model's CAM box at its MaxBoxAcc threshold), ``road``, ``morf_drop``, ``lerf_drop``.
        k: how many records.
        method: a method of the report; None for its first.
        direction: ``"both"`` (largest ``|cbam - baseline|``), ``"cbam"`` (CBAM better first) or
            ``"baseline"`` (baseline better first); "better" follows the metric's direction.

    Returns:
        Records sorted by difference: ``{"file", "path", "class_name", "target", "method", "metric",
        "baseline", "cbam", "diff", "boxes", "size", "baseline_box", "cbam_box", "row"}``; ``row`` indexes the
        method's stored CAMs (:func:`load_report_cams`), ``*_box`` is the CAM box at the model's
        MaxBoxAcc threshold (or None).

    Raises:
        ValueError: unknown metric, method or direction.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    methods = list(report["per_image"])
    method = method or methods[0]
    if method not in report["per_image"]:
        raise ValueError(f"method {method!r} is not in this report ({', '.join(methods)})")
    if direction not in ("both", "cbam", "baseline"):
        raise ValueError(f"direction must be 'both', 'cbam' or 'baseline', got {direction!r}")
    rec = report["per_image"][method]
    key = "box_iou" if metric == "maxboxacc" else metric
    base, cbam = _arr(rec["baseline"][key]), _arr(rec["cbam"][key])
    sign = 1.0 if METRICS[metric].higher_is_better else -1.0
    gain = sign * (cbam - base)  # > 0: CBAM better
    score = {"both": np.abs(gain), "cbam": gain, "baseline": -gain}[direction]
    score = np.where(np.isnan(score), -np.inf, score)
    order = np.argsort(-score, kind="stable")[:k]
    thresholds = np.round(np.arange(0.0, 1.0, 0.01), 2)
    out = []
    for row in order:
        if not np.isfinite(score[row]):
            continue
        img = report["images"][rec["index"][row]]
        boxes = {}
        for role in ROLES:
            boxes[role] = _cam_box_of(report, method, role, int(row), thresholds)
        out.append({
            "file": img["file"], "path": str(Path(report["data"]) / img["file"]), "class_name": img["class_name"],
            "target": img["target"], "method": method, "metric": metric, "baseline": float(base[row]),
            "cbam": float(cbam[row]), "diff": float(cbam[row] - base[row]), "boxes": img["boxes"], "size": img["size"],
            "baseline_box": boxes["baseline"], "cbam_box": boxes["cbam"], "row": int(row),
        })
    return out


def _cam_box_of(report: dict, method: str, role: str, row: int, thresholds: np.ndarray) -> list[float] | None:
    """Recompute a model's CAM box at its MaxBoxAcc threshold from the stored CAM (112 px, rescaled)."""
    cams = _cams_cache(report)
    key = f"{method}/{role}"
    if key not in cams:
        return None
    from cbam_viz.localization import cam_to_box

    img = report["images"][report["per_image"][method]["index"][row]]
    w, h = img["size"]
    cam = _resize(cams[key][row].astype(np.float32) / 255.0, (h, w))
    lo, hi = float(cam.min()), float(cam.max())
    if hi - lo <= 1e-6:
        return None
    t = thresholds[report["per_image"][method][role]["best_threshold_index"]]
    box = cam_to_box((cam - lo) / (hi - lo), float(t))
    return None if box is None else box.as_list()


def _cams_cache(report: dict) -> dict[str, np.ndarray]:
    if "_cams" not in report:
        report["_cams"] = load_report_cams(report)
    return report["_cams"]


def record_image(record: dict):
    """The RGB image of a :func:`most_different_images` record."""
    from cbam_viz.data import load_rgb

    return load_rgb(record["path"])


def render_comparison(
    image,
    baseline_cam: np.ndarray,
    cbam_cam: np.ndarray,
    boxes: Sequence[Sequence[float]] | Sequence[Box],
    *,
    cam_boxes: tuple[Sequence[float] | None, Sequence[float] | None] = (None, None),
    titles: tuple[str, str, str] = ("image + boxes", "baseline", "CBAM"),
    alpha: float = 0.5,
):
    """Image with its true boxes, then each model's CAM over it: one PIL image, three panels.

    Pure (no I/O). True boxes are drawn in green, a CAM's own box (e.g. at its MaxBoxAcc
    threshold) in white. CAMs in [0, 1] at any size (resized to the image).
    """
    from PIL import Image, ImageDraw, ImageFont

    from cbam_viz.render import overlay

    image = image.convert("RGB")
    w, h = image.size
    gt = [b.as_list() if isinstance(b, Box) else list(b) for b in boxes]
    panels = [image.copy(), overlay(image, np.clip(baseline_cam, 0, 1), alpha=alpha),
              overlay(image, np.clip(cbam_cam, 0, 1), alpha=alpha)]
    for i, panel in enumerate(panels):
        draw = ImageDraw.Draw(panel)
        for b in gt:
            draw.rectangle([b[0], b[1], b[2] - 1, b[3] - 1], outline=(0, 255, 0), width=2)
        own = cam_boxes[i - 1] if i > 0 else None
        if own is not None:
            draw.rectangle([own[0], own[1], own[2] - 1, own[3] - 1], outline=(255, 255, 255), width=2)
    pad, title_h = 6, 18
    canvas = Image.new("RGB", (3 * w + 4 * pad, h + title_h + 2 * pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, (panel, title) in enumerate(zip(panels, titles)):
        x = pad + i * (w + pad)
        draw.text((x, pad), title, fill=(0, 0, 0), font=font)
        canvas.paste(panel, (x, pad + title_h))
    return canvas


def per_image_text(metric: str, value: float) -> str:
    """``"Energy in box 61%"``: one image's value of ``metric``, labelled and formatted.

    Per image, MaxBoxAcc is the IoU of the CAM's box at the set's best threshold, so it is
    labelled "box IoU".
    """
    label = "box IoU" if metric == "maxboxacc" else METRICS[metric].label
    return f"{label} {value:.0%}" if metric in _PCT else f"{label} {value:.3f}"


def render_record(report: dict, record: dict, *, alpha: float = 0.5, image=None):
    """:func:`render_comparison` for a :func:`most_different_images` record, from the stored CAMs.

    ``image``: the photo to draw on; default: read it from ``record["path"]``.
    """
    cams = _cams_cache(report)
    key = f"{record['method']}/"
    if key + "baseline" not in cams:
        raise FileNotFoundError(f"no stored CAMs (cams.npz) next to the report in {report.get('_dir')}")
    titles = ("image + true boxes",
              f"baseline {per_image_text(record['metric'], record['baseline'])}",
              f"CBAM {per_image_text(record['metric'], record['cbam'])}")
    cam_b = cams[key + "baseline"][record["row"]].astype(np.float32) / 255.0
    cam_c = cams[key + "cbam"][record["row"]].astype(np.float32) / 255.0
    return render_comparison(record_image(record) if image is None else image, cam_b, cam_c, record["boxes"],
                             cam_boxes=(record["baseline_box"], record["cbam_box"]), titles=titles, alpha=alpha)


def confidence_drop_figure(drops: Mapping[str, Any], pair, *, labels: Mapping[str, str] | None = None):
    """The main tab's faithfulness panel: each model's input with its top CAM region blurred away,
    and its probability before -> after. Pure (PIL only).

    Args:
        drops: ``{"baseline": ConfidenceDrop, "cbam": ConfidenceDrop}`` from
            :func:`cbam_viz.localization.pair_confidence_drop`.
        pair: the pair (for each model's mean/std, to show the perturbed input, and class names).
        labels: optional panel titles per role.
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    tiles = []
    for role in ROLES:
        d, loaded = drops[role], getattr(pair, role)
        x = d.perturbed.detach().cpu().float().numpy()
        rgb = x * np.asarray(loaded.std, np.float32)[:, None, None] + np.asarray(loaded.mean, np.float32)[:, None, None]
        tile = Image.fromarray(np.clip(np.rint(rgb.transpose(1, 2, 0) * 255), 0, 255).astype(np.uint8), "RGB")
        cls = loaded.classes[d.target] if d.target < len(loaded.classes) else str(d.target)
        title = (labels or {}).get(role, "baseline" if role == "baseline" else "CBAM")
        text = [f"{title}: top {d.fraction:.0%} of its CAM {'blurred' if d.imputer == 'blur' else 'removed'}",
                f"p({cls}) {d.prob_before:.2f} -> {d.prob_after:.2f}",
                f"drop {d.relative_drop:.0%} of its confidence"]
        tiles.append((tile, text))
    # Wide enough for the longest line in the default bitmap font (~6 px per character).
    side = max(max(t.width for t, _ in tiles), 6 * max(len(line) for _, text in tiles for line in text) + 8)
    pad, line_h = 6, 14
    text_h = 3 * line_h
    top = 24  # blank band: image viewers (Gradio's label badge) often cover an image's top-left corner
    canvas = Image.new("RGB", (len(tiles) * (side + pad) + pad, top + side + text_h + 3 * pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (tile, text) in enumerate(tiles):
        x0 = pad + i * (side + pad)
        for j, t in enumerate(text):
            draw.text((x0, top + pad + j * line_h), t, fill=(0, 0, 0), font=font)
        canvas.paste(tile.resize((side, side)), (x0, top + 2 * pad + text_h))
    return canvas
