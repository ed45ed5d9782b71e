"""The boxed images ``evaluate-cams`` reads: an ImageFolder split and its box CSV, matched to a lineup's classes.

:func:`load_boxed_images` keeps the images that have boxes (sorted by class folder, then file;
``max_images`` spread evenly), checks every box fits its image, and finds each image's true class
among the members' classes (WordNet ids first, then readable names); :func:`check_classes` makes
sure every member has the same classes, so one target serves them all.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from cbam_viz.engine.lineup import Lineup
from cbam_viz.research.quality.boxes import Box, BoxFileError, check_boxes_fit, read_boxes
from cbam_viz.training.data import load_rgb, scan_image_folder
from cbam_viz.training.evaluate import spread_indices

__all__ = ["BoxedImages", "check_classes", "load_boxed_images"]


@dataclass(frozen=True)
class BoxedImages:
    """The images a run evaluates, in order (sorted by class folder, then file)."""

    keys: list[str]                         # "<class folder>/<file>", the box CSV's keys
    folders: list[str]                      # each image's class folder
    targets: list[int]                      # each image's true class index (every member has the same classes)
    images: list[Image.Image]
    boxes: Mapping[str, tuple[Box, ...]]
    missing: list[str]                      # CSV images not in the folder (allow_missing)


def _class_index(folder: str, model) -> int | None:
    if folder in model.class_ids:
        return list(model.class_ids).index(folder)
    if folder in model.classes:
        return list(model.classes).index(folder)
    return None


def check_classes(lineup: Lineup) -> None:
    ref = lineup.reference_model
    other = next((m for m in lineup.members if tuple(m.class_ids) != tuple(ref.class_ids)), None)
    if other is not None:
        raise ValueError(f"the lineup's members have different classes: {other.name} vs {ref.name}")


def load_boxed_images(data, boxes, lineup: Lineup, *, max_images: int | None, allow_missing: bool) -> BoxedImages:
    """The boxed images of ``data``, their boxes (checked to fit) and their true class in the lineup."""
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
    ref = lineup.reference_model
    targets = [_class_index(folder, ref) for folder in folders]
    unmatched = {folder for folder, t in zip(folders, targets) if t is None}
    if unmatched:
        raise ValueError(f"class folder(s) {sorted(unmatched)} match no class of {ref.name} "
                         f"(ids {', '.join(ref.class_ids[:5])}...; names {', '.join(ref.classes[:5])}...)")
    images = [load_rgb(Path(data) / k) for k in keys]
    check_boxes_fit(table, {k: im.size for k, im in zip(keys, images)})
    return BoxedImages(keys, folders, targets, images, table, missing)
