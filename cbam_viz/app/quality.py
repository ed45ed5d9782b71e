"""The Explanation-quality tab's queries: the images where two CAMs score most differently, the
spatial-gate localization section and the channel profiles (SE-Net's figure per class and block).

The quality package pulls torchvision in (~2 s of the cold start that the first request does
not need), so it is imported where a function first needs it, as :func:`content.quality_report`.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from cbam_viz.app.content import ROOT, quality_report

__all__ = ["CHANNEL_PROFILES", "CHANNEL_PROFILES_ENV", "QualityExtras", "compared_members", "quality_differences",
           "quality_extras"]

#: The channel-profiles folder (``python -m cbam_viz channel-profiles``) shown in the quality tab.
CHANNEL_PROFILES = ROOT / "docs" / "channel_profiles"
CHANNEL_PROFILES_ENV = "CBAM_VIZ_CHANNEL_PROFILES"


@functools.lru_cache(maxsize=8)
def _differing_images(metric: str, method: str, direction: str, k: int, member: str | None):
    # The report never changes while the app runs: the same choice gives the same pictures.
    from cbam_viz.research.quality.view import differing_images  # torchvision: see the module docstring

    return differing_images(quality_report()[0], metric, method, direction, k, member=member)


def compared_members(report: dict | None) -> list[str]:
    """The members the tab can set beside the reference (every other member; the reference itself in
    a lineup of one), the last first: the default of :func:`quality_differences`."""
    if not report:
        return []
    others = [m for m in report["members"] if m != report["reference"]] or [report["reference"]]
    return others[::-1]


def quality_differences(metric: str, method: str, direction: str, k: float,
                        member: str | None = None) -> tuple[list, str]:
    """The Explanation-quality tab: the images where the reference's and ``member``'s CAMs (default:
    the last member) score most differently, and a note."""
    from cbam_viz.research.quality.view import DIRECTIONS  # torchvision: see the module docstring

    report, note = quality_report()
    if report is None:
        return [], note
    if not metric or not method:  # the tab opened before the page load filled its controls
        return [], ""
    return _differing_images(metric, method, DIRECTIONS.get(direction, "both"), int(k or 6), member or None)


@dataclass(frozen=True)
class QualityExtras:
    """The research sections of the Explanation-quality tab."""

    spatial_gates: str          # the report's spatial-gate localization section, or a one-line note
    profiles_images: list[tuple[Image.Image, str]] | None  # one (figure, member name) per gated member, in order
    profiles_rows: Any          # DataFrame: a "member" column, then channel_profiles.similarity_rows; or None
    profiles_note: str


_PROFILES_NOTE = ("**Channel attention per class** (SE-Net's figure): the mean channel gate of each class, per "
                  "block. *r*: mean correlation between two classes' profiles (1 = every class gated alike); *η²*: "
                  "share of the gate's variance explained by the class (0 = class-agnostic).")


@functools.cache
def quality_extras() -> QualityExtras:
    """Spatial-gate localization (from the quality report) and the channel profiles (from their folder)."""
    # torchvision (research.quality, research.channel_profiles): see the module docstring.
    from cbam_viz.research.channel_profiles import profiles_image, similarity_rows
    from cbam_viz.research.profile_files import load_lineup_profiles
    from cbam_viz.research.quality.report import spatial_gate_markdown

    report, _ = quality_report()
    lines = spatial_gate_markdown(report) if report else []
    gates = "\n".join(lines) if lines else (
        "*Does the spatial gate itself localize the object? Not in this report yet: re-run "
        "`python -m cbam_viz evaluate-cams` to measure it.*")
    folder = Path(os.environ.get(CHANNEL_PROFILES_ENV) or CHANNEL_PROFILES)
    command = "`python -m cbam_viz channel-profiles --data DIR --out docs/channel_profiles`"
    if not (folder.is_file() and folder.suffix == ".npz") and not any(
            (folder / f).is_file() for f in ("profiles.npz", "channel_profiles.json")):  # one model's or a lineup's
        return QualityExtras(gates, None, None, f"*No channel profiles in `{folder}`: make them with {command}.*")
    try:  # every gated member of the lineup (SE, BAM, CBAM), not only the last: they are compared
        by_member = load_lineup_profiles(folder)  # a lineup's folder, or one model's folder or .npz
        rows = pd.DataFrame([{"member": name, **row} for name, profiles in by_member.items()
                             for row in similarity_rows(profiles)])
        images = [(profiles_image(profiles), name) for name, profiles in by_member.items()]
    except Exception as err:  # noqa: BLE001  a broken folder: said in one line, the tab still works
        return QualityExtras(gates, None, None, f"*The channel profiles in `{folder}` could not be read "
                                                f"({type(err).__name__}); make them again with {command}.*")
    return QualityExtras(gates, images, rows, _PROFILES_NOTE)
