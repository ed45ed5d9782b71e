"""The ``evaluate-cams`` report: its files, its Markdown table and figure, and queries over it.

Files (``out`` folder of :func:`write_report`): ``report.json`` (settings, results, per-image
values), ``report.md`` (the table), ``summary.png`` (paired differences with intervals) and
``cams.npz`` (every CAM at 112 px, uint8, so the app can draw an image's two CAMs without running
the models). Each is written atomically (:func:`cbam_viz.outputs.atomic_write`), ``report.json``
last: a reader never sees half a file.

:func:`load_report` reads one back (the app ships one in ``docs/explanation_quality``);
:func:`most_different_images` picks the images where the two models' CAMs differ most, for the
app's Explanation-quality tab (:mod:`cbam_viz.research.quality.view`).

``summary_figure`` is the one matplotlib figure of the project and stays here rather than in
:mod:`cbam_viz.render`: it is a chart of the report's numbers, written only into the report
folder, and matplotlib has no place in the app's request path that ``render`` serves.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from cbam_viz.faithfulness import resize_cam
from cbam_viz.outputs import atomic_write, atomic_write_text
from cbam_viz.research.quality.metrics import DEFAULT_THRESHOLDS, METRICS, PERCENT_METRICS, ROLES, cam_to_box

__all__ = [
    "CAM_STORE_SIZE", "REPORT_VERSION", "load_report", "load_report_cams", "markdown_report",
    "most_different_images", "record_cams", "spatial_gate_markdown", "summary_figure", "write_report",
]

REPORT_VERSION = 1
#: Side of the stored CAMs in ``cams.npz``.
CAM_STORE_SIZE = 112


def to_json_list(values, digits: int = 4) -> list:
    """Numbers -> a JSON list, rounded, with ``None`` for NaN or infinity (strict JSON has neither)."""
    return [None if not math.isfinite(v) else round(v, digits) for v in np.asarray(values, np.float64).tolist()]


def from_json_list(values) -> np.ndarray:
    """A JSON list of :func:`to_json_list` -> float64 array, ``None`` back to NaN."""
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


# ------------------------------------------------------------------------------------- writing


def write_report(report: dict, cams: Mapping[str, np.ndarray], out: str | os.PathLike) -> dict[str, Path]:
    """Write ``report.json``, ``report.md``, ``summary.png`` and ``cams.npz`` to ``out``, atomically.

    ``report.json`` goes last, so a reader that finds a new report also finds its CAMs.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md", "figure": out / "summary.png",
             "cams": out / "cams.npz"}
    public = {k: v for k, v in report.items() if not k.startswith("_")}  # "_dir", "_cams" of a loaded report
    arrays = {k.replace("/", "__"): v for k, v in cams.items()}
    atomic_write(paths["cams"], lambda f: np.savez_compressed(f, **arrays))
    figure = summary_figure(public)
    atomic_write(paths["figure"], lambda f: figure.savefig(f, format="png", dpi=120))
    atomic_write_text(paths["markdown"], markdown_report(public))
    atomic_write_text(paths["json"], json.dumps(public, indent=1, allow_nan=False))
    return paths


def _fmt(iv: dict, pct: bool) -> str:
    if iv["value"] is None:
        return "n/a"
    s = 100.0 if pct else 1.0
    d = 1 if pct else 3
    return f"{iv['value'] * s:.{d}f} [{iv['low'] * s:.{d}f}, {iv['high'] * s:.{d}f}]"


def _verdict(diff: dict, higher_is_better: bool, *, names: tuple[str, str] = ("CBAM", "baseline")) -> str:
    """Which side of a paired difference the interval supports (``names``: first minus second)."""
    if diff["value"] is None:
        return "n/a"
    if diff["low"] > 0 or diff["high"] < 0:
        better = (diff["low"] > 0) == higher_is_better
        return f"**{names[0] if better else names[1]} better**"
    return "no clear difference"


def markdown_report(report: dict) -> str:
    """The results table (and how to read it) as Markdown."""
    s = report["settings"]
    n_img = len(report["images"])
    models = report["models"]
    lines = [
        f"## CAM quality: {models['baseline']['name']} vs {models['cbam']['name']}",
        "",
        f"{n_img} boxed images from `{report['data']}`, CAMs of the true class at layer {s['layer']}. "
        f"Values: mean (or MaxBoxAcc) with a 95 % percentile-bootstrap interval ({s['n_boot']} resamples; "
        "MaxBoxAcc's threshold is chosen again in every resample, for each model); "
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
            pct = key in PERCENT_METRICS
            lines.append(f"| {method} | {info['label']} {arrow} | {r['diff']['n']} | {_fmt(r['baseline'], pct)} | "
                         f"{_fmt(r['cbam'], pct)} | {_fmt(r['diff'], pct)} | {_verdict(r['diff'], info['higher_is_better'])} |")
    lines += spatial_gate_markdown(report)
    t = report["timings"]
    per_method = ", ".join(f"{m} {v['wall_s']:.0f} s / {v['images']} img" for m, v in t["methods"].items())
    lines += ["", "Metrics: " + "; ".join(f"*{i['label']}*: {i['help']}" for i in report["metrics"].values()) + ".",
              "", f"Run time: {t['total_wall_s']:.0f} s wall, {t['total_cpu_s']:.0f} s CPU "
              f"({per_method}); "
              f"device {s['device']}, {s['torch_threads']} threads.", ""]
    return "\n".join(lines)


def spatial_gate_markdown(report: dict) -> list[str]:
    """The spatial-gate section of the report's Markdown (empty for reports without it)."""
    g = report.get("spatial_gates")
    if not g:
        return []
    from cbam_viz.research.quality.gates import CENTRE, LOCALIZATION_METRICS

    labels = [report["metrics"][m]["label"] for m in LOCALIZATION_METRICS]
    lines = ["", "### Does the spatial gate itself localize the object?", "",
             "Each CBAM block's spatial-attention map, upsampled and min-max scaled like a CAM, scored with "
             f"the same box metrics, beside a reference map that knows nothing of the image ({g['reference']}). "
             "Values in %, 95 % bootstrap intervals; **block − centre** paired over the same images.", "",
             "| map | " + " | ".join(labels) + " | " + " | ".join(f"{lab}: − centre" for lab in labels) + " |",
             "|---|" + "---|" * (2 * len(labels))]
    for name in [*g["blocks"], CENTRE]:
        cells = [_fmt(g["results"][name][m], True) for m in LOCALIZATION_METRICS]
        diffs = ([f"{_fmt(g['vs_centre'][name][m], True)} "
                  f"{_verdict(g['vs_centre'][name][m], True, names=('gate', 'centre'))}"
                  for m in LOCALIZATION_METRICS] if name in g["vs_centre"] else ["—"] * len(labels))
        lines.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(diffs) + " |")
    return lines


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
        scale = 100.0 if key in PERCENT_METRICS else 1.0
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


# ------------------------------------------------------------------------------------- reading


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


def record_cams(report: dict) -> dict[str, np.ndarray]:
    """:func:`load_report_cams`, read once per loaded report (kept in its ``"_cams"``)."""
    if "_cams" not in report:
        report["_cams"] = load_report_cams(report)
    return report["_cams"]


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
    base, cbam = from_json_list(rec["baseline"][key]), from_json_list(rec["cbam"][key])
    sign = 1.0 if METRICS[metric].higher_is_better else -1.0
    gain = sign * (cbam - base)  # > 0: CBAM better
    score = {"both": np.abs(gain), "cbam": gain, "baseline": -gain}[direction]
    score = np.where(np.isnan(score), -np.inf, score)
    out = []
    for row in np.argsort(-score, kind="stable")[:k]:
        if not np.isfinite(score[row]):
            continue
        img = report["images"][rec["index"][row]]
        boxes = {role: _cam_box(report, method, role, int(row)) for role in ROLES}
        out.append({
            "file": img["file"], "path": str(Path(report["data"]) / img["file"]), "class_name": img["class_name"],
            "target": img["target"], "method": method, "metric": metric, "baseline": float(base[row]),
            "cbam": float(cbam[row]), "diff": float(cbam[row] - base[row]), "boxes": img["boxes"], "size": img["size"],
            "baseline_box": boxes["baseline"], "cbam_box": boxes["cbam"], "row": int(row),
        })
    return out


def _cam_box(report: dict, method: str, role: str, row: int) -> list[float] | None:
    """Recompute a model's CAM box at its MaxBoxAcc threshold from the stored CAM (112 px, rescaled)."""
    cams = record_cams(report)
    key = f"{method}/{role}"
    if key not in cams:
        return None
    img = report["images"][report["per_image"][method]["index"][row]]
    w, h = img["size"]
    cam = resize_cam(cams[key][row].astype(np.float32) / 255.0, (h, w))
    lo, hi = float(cam.min()), float(cam.max())
    if hi - lo <= 1e-6:
        return None
    t = DEFAULT_THRESHOLDS[report["per_image"][method][role]["best_threshold_index"]]
    box = cam_to_box((cam - lo) / (hi - lo), float(t))
    return None if box is None else box.as_list()
