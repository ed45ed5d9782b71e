"""The ``evaluate-cams`` report: its files, its Markdown table, and queries over it.

Files (``out`` folder of :func:`write_report`): ``report.json`` (settings, results, per-image
values), ``report.md`` (the table), ``summary.png`` (the forest plot of every member's paired
difference from the reference, :mod:`cbam_viz.research.quality.forest`) and ``cams.npz`` (every CAM
at 112 px, uint8, keyed ``<method>/<member>``, so the app can draw an image's CAMs without running
the models). Each is written atomically (:func:`cbam_viz.outputs.atomic_write`), ``report.json``
last: a reader never sees half a file.

:func:`load_report` reads one back (the app ships one in ``docs/explanation_quality``). It reads
both formats: version 2 (a lineup: ``members``, ``reference``, per-member results) and version 1
(a pair: ``baseline`` and ``cbam`` roles), which it turns into version 2 in memory, the baseline
as the reference; nothing is rewritten on disk. :func:`most_different_images` picks the images
where two members' CAMs differ most, for the app's Explanation-quality tab
(:mod:`cbam_viz.research.quality.view`).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from cbam_viz.engine.faithfulness import resize_cam
from cbam_viz.outputs import atomic_write, atomic_write_text
from cbam_viz.research.quality.forest import forest_figure, verdict
from cbam_viz.research.quality.gates import CENTRE, LOCALIZATION_METRICS
from cbam_viz.research.quality.metrics import DEFAULT_THRESHOLDS, METRICS, PERCENT_METRICS, cam_to_box
from cbam_viz.stats import from_json_list

__all__ = [
    "CAM_STORE_SIZE", "REPORT_VERSION", "compared_member", "load_report", "load_report_cams", "markdown_report",
    "most_different_images", "record_cams", "between_markdown", "spatial_gate_markdown", "upgrade_report", "write_report",
]

REPORT_VERSION = 2
#: Side of the stored CAMs in ``cams.npz``.
CAM_STORE_SIZE = 112
_V1_ROLES = ("baseline", "cbam")


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
    figure = forest_figure(public)
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


def _verdict_text(diff: dict, higher_is_better: bool, names: tuple[str, str]) -> str:
    side = verdict(diff, higher_is_better)
    return {None: "n/a", 0: "no clear difference", 1: f"**{names[0]} better**", -1: f"**{names[1]} better**"}[side]


def _intro(report: dict) -> list[str]:
    s = report["settings"]
    ref = report["reference"]
    compared = ("**member − reference** with a paired bootstrap interval over the same images; "
                if len(report["members"]) > 1 else "")
    return [
        f"## CAM quality: {', '.join(report['members'])} (reference {ref})",
        "",
        f"{len(report['images'])} boxed images from `{report['data']}`, CAMs of the true class at layer "
        f"{s['layer']}. Values: mean (or MaxBoxAcc) with a 95 % percentile-bootstrap interval ({s['n_boot']} "
        "resamples; MaxBoxAcc's threshold is chosen again in every resample, for each model); "
        f"{compared}Pointing game, energy and MaxBoxAcc in %; probabilities as fractions. "
        f"Faithfulness: true-class probability after {s['imputer']}-imputing the CAM's top (MoRF) or "
        f"bottom (LeRF) {', '.join(f'{f:.0%}' for f in s['fractions'])} of pixels.",
        "",
    ]


def markdown_report(report: dict) -> str:
    """The results table (and how to read it) as Markdown: one row per method, metric and member."""
    ref = report["reference"]
    lines = _intro(report)
    if not all(m["trained"] for m in report["models"].values()):
        lines += ["> **Untrained models**: these numbers describe random networks, not trained ones.", ""]
    lines += ["| method | metric | model | n | value | − reference | verdict |", "|---|---|---|---:|---|---|---|"]
    for method, res in report["results"].items():
        for key, info in report["metrics"].items():
            r = res[key]
            pct = key in PERCENT_METRICS
            label = f"{info['label']} {'↑' if info['higher_is_better'] else '↓'}"
            for name in report["members"]:
                d = r["diff"].get(name)
                cells = ("—", "reference") if d is None else \
                    (_fmt(d, pct), _verdict_text(d, info["higher_is_better"], (name, ref)))
                lines.append(f"| {method} | {label} | {name} | {r['models'][name]['n']} | "
                             f"{_fmt(r['models'][name], pct)} | {cells[0]} | {cells[1]} |")
    lines += between_markdown(report)
    lines += spatial_gate_markdown(report)
    t, s = report["timings"], report["settings"]
    per_method = ", ".join(f"{m} {v['wall_s']:.0f} s / {v['images']} img" for m, v in t["methods"].items())
    lines += ["", "Metrics: " + "; ".join(f"*{i['label']}*: {i['help']}" for i in report["metrics"].values()) + ".",
              "", f"Run time: {t['total_wall_s']:.0f} s wall, {t['total_cpu_s']:.0f} s CPU ({per_method}); "
              f"device {s['device']}, {s['torch_threads']} threads.", ""]
    return "\n".join(lines)


def between_markdown(report: dict) -> list[str]:
    """The ``--compare`` pairs' section of the report's Markdown (or [] when none was asked for)."""
    pairs = report.get("comparisons") or []
    if not pairs:
        return []
    lines = ["", "### Between members", "",
             "**member − other**, paired over the same images, for the pairs asked for with `--compare`.", "",
             "| method | metric | member − other | difference | verdict |", "|---|---|---|---|---|"]
    for pair in pairs:
        names = (pair["member"], pair["against"])
        for method, res in pair["results"].items():
            for key, info in report["metrics"].items():
                d, pct = res[key], key in PERCENT_METRICS
                lines.append(f"| {method} | {info['label']} {'↑' if info['higher_is_better'] else '↓'} | "
                             f"{names[0]} − {names[1]} | {_fmt(d, pct)} | "
                             f"{_verdict_text(d, info['higher_is_better'], names)} |")
    return lines


def spatial_gate_markdown(report: dict) -> list[str]:
    """The spatial-gate section of the report's Markdown, a table per member with spatial maps (or [])."""
    by_member = report.get("spatial_gates") or {}
    if not by_member:
        return []
    labels = [report["metrics"][m]["label"] for m in LOCALIZATION_METRICS]
    first = next(iter(by_member.values()))
    lines = ["", "### Does the spatial gate itself localize the object?", "",
             "Each spatial-attention map (a CBAM block's, a BAM module's joint gate averaged over channels), "
             "upsampled and min-max scaled like a CAM, scored with the same box metrics, beside a reference map "
             f"that knows nothing of the image ({first['reference']}). Values in %, 95 % bootstrap intervals; "
             "**map − centre** paired over the same images."]
    for member, g in by_member.items():
        lines += ["", f"#### {member}", "",
                  "| map | " + " | ".join(labels) + " | " + " | ".join(f"{lab}: − centre" for lab in labels) + " |",
                  "|---|" + "---|" * (2 * len(labels))]
        for name in [*g["blocks"], CENTRE]:
            cells = [_fmt(g["results"][name][m], True) for m in LOCALIZATION_METRICS]
            diffs = ([f"{_fmt(g['vs_centre'][name][m], True)} "
                      f"{_verdict_text(g['vs_centre'][name][m], True, ('gate', 'centre'))}"
                      for m in LOCALIZATION_METRICS] if name in g["vs_centre"] else ["—"] * len(labels))
            lines.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(diffs) + " |")
    return lines


# ------------------------------------------------------------------------------------- reading


def upgrade_report(report: dict) -> dict:
    """A version-1 (pair) report as version 2, in place: the roles become members named by their
    records, the baseline the reference. A version-2 report is returned as it is."""
    if report.get("version") != 1:
        return report
    names = {role: report["models"][role]["name"] for role in _V1_ROLES}
    ref, other = names["baseline"], names["cbam"]
    report["lineup"] = report.pop("pair", "")
    report["reference"], report["members"] = ref, [ref, other]
    report["models"] = {names[r]: {**report["models"][r], "gates": [] if r == "baseline" else ["channel", "spatial"]}
                        for r in _V1_ROLES}
    for res in report["results"].values():
        for metric, r in list(res.items()):
            res[metric] = {"models": {ref: r["baseline"], other: r["cbam"]}, "diff": {other: r["diff"]}}
    for method, rec in report["per_image"].items():
        report["per_image"][method] = {"index": rec["index"], "models": {names[r]: rec[r] for r in _V1_ROLES}}
    report["spatial_gates"] = {other: report["spatial_gates"]} if report.get("spatial_gates") else {}
    report["_cam_keys"] = {names[r]: r for r in _V1_ROLES}  # cams.npz of version 1 keys CAMs by role
    report["version"] = REPORT_VERSION
    return report


def load_report(path: str | os.PathLike) -> dict:
    """Read a report written by :func:`write_report` (``path``: its folder or ``report.json``), either version.

    The returned dict is in the current version (:func:`upgrade_report`) and has ``"_dir"`` set
    to the report's folder (for :func:`load_report_cams`).

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
    if report.get("version") not in (1, REPORT_VERSION):
        raise ValueError(f"{path} has report version {report.get('version')}; this code reads versions 1 and "
                         f"{REPORT_VERSION}")
    report = upgrade_report(report)
    report["_dir"] = str(path.parent)
    return report


def load_report_cams(report: dict) -> dict[str, np.ndarray]:
    """The stored CAMs, ``{"<method>/<member>": (n_method_images, 112, 112) uint8}``; {} if absent."""
    p = Path(report.get("_dir", ".")) / "cams.npz"
    if not p.is_file():
        return {}
    member_of = {role: name for name, role in report.get("_cam_keys", {}).items()}
    out = {}
    with np.load(p) as z:
        for key in z.files:
            method, _, who = key.rpartition("__")
            out[f"{method}/{member_of.get(who, who)}"] = z[key]
    return out


def record_cams(report: dict) -> dict[str, np.ndarray]:
    """:func:`load_report_cams`, read once per loaded report (kept in its ``"_cams"``)."""
    if "_cams" not in report:
        report["_cams"] = load_report_cams(report)
    return report["_cams"]


def compared_member(report: dict, member: str | None = None) -> str:
    """The member compared with the reference: ``member`` if given, else the last one (the reference
    itself in a lineup of one).

    Raises:
        ValueError: ``member`` is not in the report.
    """
    members = report["members"]
    if member is None:
        return members[-1]
    if member not in members:
        raise ValueError(f"{member!r} is not a model of this report ({', '.join(members)})")
    return member


def most_different_images(
    report: dict, metric: str, k: int = 8, *, method: str | None = None, direction: str = "both",
    member: str | None = None,
) -> list[dict]:
    """The ``k`` images where ``member``'s and the reference's CAMs score most differently on ``metric``.

    Args:
        report: from :func:`load_report`.
        metric: a per-image metric: ``pointing``, ``energy``, ``maxboxacc`` (the IoU of each
            model's CAM box at its MaxBoxAcc threshold), ``road``, ``morf_drop``, ``lerf_drop``.
        k: how many records.
        method: a method of the report; None for its first.
        direction: ``"both"`` (largest ``|member - reference|``), ``"member"`` (the member better
            first) or ``"reference"`` (the reference better first); "better" follows the metric's direction.
        member: the member compared (:func:`compared_member`: default the last).

    Returns:
        Records sorted by difference: ``{"file", "path", "class_name", "target", "method", "metric",
        "reference", "member", "values" {name: value}, "diff", "boxes", "size", "cam_boxes" {name: box},
        "row"}``; ``row`` indexes the method's stored CAMs (:func:`load_report_cams`), a CAM box is
        the one at the model's MaxBoxAcc threshold (or None).

    Raises:
        ValueError: unknown metric, method, direction or member.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    methods = list(report["per_image"])
    method = method or methods[0]
    if method not in report["per_image"]:
        raise ValueError(f"method {method!r} is not in this report ({', '.join(methods)})")
    if direction not in ("both", "member", "reference"):
        raise ValueError(f"direction must be 'both', 'member' or 'reference', got {direction!r}")
    ref, member = report["reference"], compared_member(report, member)
    rec = report["per_image"][method]
    key = "box_iou" if metric == "maxboxacc" else metric
    base, other = from_json_list(rec["models"][ref][key]), from_json_list(rec["models"][member][key])
    sign = 1.0 if METRICS[metric].higher_is_better else -1.0
    gain = sign * (other - base)  # > 0: the member better
    score = {"both": np.abs(gain), "member": gain, "reference": -gain}[direction]
    score = np.where(np.isnan(score), -np.inf, score)
    out = []
    for row in np.argsort(-score, kind="stable")[:k]:
        if not np.isfinite(score[row]):
            continue
        img = report["images"][rec["index"][row]]
        out.append({
            "file": img["file"], "path": str(Path(report["data"]) / img["file"]), "class_name": img["class_name"],
            "target": img["target"], "method": method, "metric": metric, "reference": ref, "member": member,
            "values": {ref: float(base[row]), member: float(other[row])}, "diff": float(other[row] - base[row]),
            "boxes": img["boxes"], "size": img["size"], "row": int(row),
            "cam_boxes": {name: _cam_box(report, method, name, int(row)) for name in dict.fromkeys((ref, member))},
        })
    return out


def _cam_box(report: dict, method: str, member: str, row: int) -> list[float] | None:
    """Recompute a model's CAM box at its MaxBoxAcc threshold from the stored CAM (112 px, rescaled)."""
    cams = record_cams(report)
    key = f"{method}/{member}"
    if key not in cams:
        return None
    img = report["images"][report["per_image"][method]["index"][row]]
    w, h = img["size"]
    cam = resize_cam(cams[key][row].astype(np.float32) / 255.0, (h, w))
    lo, hi = float(cam.min()), float(cam.max())
    if hi - lo <= 1e-6:
        return None
    t = DEFAULT_THRESHOLDS[report["per_image"][method]["models"][member]["best_threshold_index"]]
    box = cam_to_box((cam - lo) / (hi - lo), float(t))
    return None if box is None else box.as_list()
