"""The app's Explanation-quality tab: the images where a member's and the reference's CAMs differ most.

The measured table comes from ``python -m cbam_viz evaluate-cams`` (``report.json`` plus the
CAMs it stored in ``cams.npz``, both under ``docs/explanation_quality``). Averages hide what a
difference looks like, so the tab lets a person pick a metric and see the photos behind it: the
true boxes, both CAMs and each CAM's own box (drawn by :func:`cbam_viz.figures.render_comparison`).

The photos are dataset images and never ship with the project. They are looked up where the
report found them, then under ``$CBAM_VIZ_DATA`` (an ImageFolder split such as
``imagenette2/val``); when they are absent (a Space, a container) the CAMs and boxes are drawn
on a grey canvas of the photo's size, which still shows where each model looked.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from cbam_viz.training.data import load_rgb
from cbam_viz.research.quality.metrics import METRICS, per_image_text
from cbam_viz.research.quality.report import load_report, most_different_images, record_cams
from cbam_viz.figures import PLACEHOLDER_GREY, photo_placeholder, render_comparison
from cbam_viz.resources import SHIPPED_ROOT

__all__ = [
    "DEFAULT_REPORT_DIR", "DIRECTIONS", "PLACEHOLDER_GREY", "REPORT_ENV", "DATA_ENV", "differing_images",
    "find_photo", "load_app_report", "method_choices", "metric_choices", "record_image", "render_record",
]

DEFAULT_REPORT_DIR = SHIPPED_ROOT / "docs" / "explanation_quality"
#: The report the tab shows instead of the shipped one.
REPORT_ENV = "CBAM_VIZ_QUALITY_REPORT"
#: Where the evaluated photos are on this machine, if not where the report found them.
DATA_ENV = "CBAM_VIZ_DATA"
#: Radio label -> ``direction`` of :func:`cbam_viz.research.quality.report.most_different_images`.
DIRECTIONS = {"largest difference either way": "both", "the compared model better": "member",
              "the reference better": "reference"}


def load_app_report(path: str | os.PathLike | None = None) -> tuple[dict | None, str]:
    """The report the tab shows (``$CBAM_VIZ_QUALITY_REPORT``, else the shipped one) and a note.

    Never raises: a missing or unreadable report gives ``(None, reason)`` and the tab says so.
    """
    path = Path(path or os.environ.get(REPORT_ENV) or DEFAULT_REPORT_DIR)
    try:
        report = load_report(path)
    except (OSError, ValueError) as err:
        return None, f"No per-image results to show: {err}"
    if not (Path(report["_dir"]) / "cams.npz").is_file():
        return None, f"No per-image CAMs to show: {Path(report['_dir']) / 'cams.npz'} is missing."
    return report, ""


def metric_choices() -> list[tuple[str, str]]:
    """``(label, key)`` pairs for a dropdown, in the report's order."""
    return [(f"{m.label} ({'higher' if m.higher_is_better else 'lower'} is better)", key)
            for key, m in METRICS.items()]


def method_choices(report: dict) -> list[str]:
    """The report's CAM methods, in its order."""
    return list(report["per_image"])


def find_photo(record: dict, data_dir: str | os.PathLike | None = None) -> Path | None:
    """Where the record's photo is on this machine, if anywhere (see the module docstring)."""
    candidates = [Path(record["path"])]
    for root in (data_dir, os.environ.get(DATA_ENV)):
        if root:
            candidates.append(Path(root) / record["file"])
    return next((p for p in candidates if p.is_file()), None)


def record_image(record: dict) -> Image.Image:
    """The RGB image of a :func:`~cbam_viz.research.quality.report.most_different_images` record."""
    return load_rgb(record["path"])


def render_record(report: dict, record: dict, *, alpha: float = 0.5, image: Image.Image | None = None) -> Image.Image:
    """:func:`cbam_viz.figures.render_comparison` for a :func:`~cbam_viz.research.quality.report.most_different_images`
    record, from the stored CAMs: the photo, the reference's CAM, the compared member's CAM.

    ``image``: the photo to draw on; default: read it from ``record["path"]``.

    Raises:
        FileNotFoundError: the report has no stored CAMs (``cams.npz``).
    """
    cams = record_cams(report)
    ref, member = record["reference"], record["member"]
    key = f"{record['method']}/"
    if key + ref not in cams or key + member not in cams:
        raise FileNotFoundError(f"no stored CAMs (cams.npz) next to the report in {report.get('_dir')}")
    titles = ("image + true boxes", *(f"{name} {per_image_text(record['metric'], record['values'][name])}"
                                      for name in (ref, member)))
    cam_r = cams[key + ref][record["row"]].astype(np.float32) / 255.0
    cam_m = cams[key + member][record["row"]].astype(np.float32) / 255.0
    return render_comparison(record_image(record) if image is None else image, cam_r, cam_m, record["boxes"],
                             cam_boxes=(record["cam_boxes"][ref], record["cam_boxes"][member]), titles=titles,
                             alpha=alpha)


def differing_images(
    report: dict,
    metric: str,
    method: str | None = None,
    direction: str = "both",
    k: int = 6,
    *,
    member: str | None = None,
    data_dir: str | os.PathLike | None = None,
    alpha: float = 0.5,
) -> tuple[list[tuple[Image.Image, str]], str]:
    """The ``k`` most different images for ``metric`` as (picture, caption), plus a note.

    Each picture has three panels: the photo with its true boxes (green), then the reference's
    and ``member``'s CAM (default: the last member) with the CAM's own box at its MaxBoxAcc
    threshold (white).

    Raises:
        ValueError: unknown metric, method, direction or member (from :func:`most_different_images`).
    """
    records = most_different_images(report, metric, k=max(1, int(k)), method=method, direction=direction,
                                    member=member)
    info = METRICS[metric]
    out: list[tuple[Image.Image, str]] = []
    missing = 0
    resized = 0
    for r in records:
        photo_path = find_photo(r, data_dir)
        size = tuple(int(v) for v in r["size"])
        if photo_path is None:
            missing += 1
            photo = photo_placeholder(size)
        else:
            photo = load_rgb(photo_path)
            if photo.size != size:
                # Boxes and CAMs are in the evaluated image's pixels (e.g. a 320 px copy of the set).
                resized += 1
                photo = photo.resize(size, Image.BILINEAR)
        picture = render_record(report, r, alpha=alpha, image=photo)
        caption = f"{Path(r['file']).name} ({r['class_name']}): " + ", ".join(
            f"{name} {per_image_text(metric, value)}" for name, value in r["values"].items())
        out.append((picture, caption))
    notes = []
    if not out:
        notes.append(f"No image has a {info.label} value for {method or 'this method'}.")
    if missing:
        notes.append(f"{missing} of {len(out)} photos are not on this machine (dataset images do not ship "
                     "with cbam-viz), so their CAMs are drawn on grey; set CBAM_VIZ_DATA to the folder "
                     "that was evaluated to see them.")
    if resized:
        notes.append(f"{resized} photos had another size than the evaluated images and were resized to it.")
    return out, " ".join(notes)
