"""The app's Explanation-quality tab: the images where the two models' CAMs differ most.

The measured table comes from ``python -m cbam_viz evaluate-cams`` (``report.json`` plus the
CAMs it stored in ``cams.npz``, both under ``docs/explanation_quality``). Averages hide what a
difference looks like, so the tab lets a person pick a metric and see the photos behind it: the
true boxes, both CAMs and each CAM's own box.

The photos are dataset images and never ship with the project. They are looked up where the
report found them, then under ``$CBAM_VIZ_DATA`` (an ImageFolder split such as
``imagenette2/val``); when they are absent (a Space, a container) the CAMs and boxes are drawn
on a grey canvas of the photo's size, which still shows where each model looked.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from cbam_viz.evaluate_cams import METRICS, load_report, most_different_images, per_image_text, render_record

__all__ = ["DEFAULT_REPORT_DIR", "DIRECTIONS", "load_app_report", "metric_choices", "method_choices",
           "find_photo", "differing_images"]

DEFAULT_REPORT_DIR = Path(__file__).resolve().parent.parent / "docs" / "explanation_quality"
#: Radio label -> ``direction`` of :func:`cbam_viz.evaluate_cams.most_different_images`.
DIRECTIONS = {"largest difference either way": "both", "CBAM better": "cbam", "baseline better": "baseline"}
PLACEHOLDER_GREY = (150, 150, 150)


def load_app_report(path: str | os.PathLike | None = None) -> tuple[dict | None, str]:
    """The report the tab shows (``$CBAM_VIZ_QUALITY_REPORT``, else the shipped one) and a note.

    Never raises: a missing or unreadable report gives ``(None, reason)`` and the tab says so.
    """
    path = Path(path or os.environ.get("CBAM_VIZ_QUALITY_REPORT") or DEFAULT_REPORT_DIR)
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
    return list(report["per_image"])


def find_photo(record: dict, data_dir: str | os.PathLike | None = None) -> Path | None:
    """Where the record's photo is on this machine, if anywhere (see the module docstring)."""
    candidates = [Path(record["path"])]
    for root in (data_dir, os.environ.get("CBAM_VIZ_DATA")):
        if root:
            candidates.append(Path(root) / record["file"])
    return next((p for p in candidates if p.is_file()), None)


def _placeholder(size: tuple[int, int]) -> Image.Image:
    image = Image.new("RGB", tuple(int(v) for v in size), PLACEHOLDER_GREY)
    ImageDraw.Draw(image).text((4, 4), "photo not shipped", fill=(235, 235, 235))
    return image


def differing_images(
    report: dict,
    metric: str,
    method: str | None = None,
    direction: str = "both",
    k: int = 6,
    *,
    data_dir: str | os.PathLike | None = None,
    alpha: float = 0.5,
) -> tuple[list[tuple[Image.Image, str]], str]:
    """The ``k`` most different images for ``metric`` as (picture, caption), plus a note.

    Each picture has three panels: the photo with its true boxes (green), then the baseline's
    and CBAM's CAM with the CAM's own box at its MaxBoxAcc threshold (white).

    Raises:
        ValueError: unknown metric, method or direction (from :func:`most_different_images`).
    """
    records = most_different_images(report, metric, k=max(1, int(k)), method=method, direction=direction)
    info = METRICS[metric]
    out: list[tuple[Image.Image, str]] = []
    missing = 0
    resized = 0
    for r in records:
        photo_path = find_photo(r, data_dir)
        size = tuple(int(v) for v in r["size"])
        if photo_path is None:
            missing += 1
            photo: Any = _placeholder(size)
        else:
            with Image.open(photo_path) as im:
                photo = im.convert("RGB")
            if photo.size != size:
                # Boxes and CAMs are in the evaluated image's pixels (e.g. a 320 px copy of the set).
                resized += 1
                photo = photo.resize(size, Image.BILINEAR)
        picture = render_record(report, r, alpha=alpha, image=photo)
        caption = (f"{Path(r['file']).name} ({r['class_name']}): baseline "
                   f"{per_image_text(metric, r['baseline'])}, CBAM {per_image_text(metric, r['cbam'])}")
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
