"""What the page loads once it is open, read lazily and cached: importing the app reads no file.

The Explanation-quality report and its text, the example pictures (copied where Gradio serves
them), the model-randomisation (sanity) report whose failed CAM methods are flagged.
"""
from __future__ import annotations

import functools
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from cbam_viz.app import examples as example_pictures
from cbam_viz.outputs import atomic_write_bytes
from cbam_viz.resources import SHIPPED_ROOT

__all__ = ["Choices", "QUALITY_DOC", "QUALITY_FIGURE", "QUALITY_PLACEHOLDER", "EXAMPLES_DIR", "SANITY_REPORT",
           "SANITY_ENV", "quality_report", "quality_markdown", "quality_figure", "quality_reading", "examples",
           "example_image", "sanity_failures", "method_note"]

ROOT = SHIPPED_ROOT  # the checkout, else the installed package's copies (cbam_viz.resources)
QUALITY_DOC = ROOT / "docs" / "explanation_quality.md"
QUALITY_FIGURE = ROOT / "docs" / "explanation_quality" / "summary.png"
QUALITY_PLACEHOLDER = "Explanation quality: not measured yet."
#: Where example pictures are copied for the page: Gradio serves files from the temp folder.
EXAMPLES_DIR = Path(tempfile.gettempdir()) / "cbam_viz_app_examples"
#: The model-randomisation report (``python -m cbam_viz sanity-check``); a method that failed it is flagged.
SANITY_REPORT = ROOT / "docs" / "sanity" / "sanity.json"
SANITY_ENV = "CBAM_VIZ_SANITY_REPORT"


@dataclass(frozen=True)
class Choices:
    """A dropdown's (or picker's) new choices and value; ``app.py`` turns it into ``gr.update``.

    A choice is a value or a ``(label, value)`` pair (e.g. a member's title and its name).
    """

    choices: list
    value: Any
    visible: bool = True


@functools.cache
def quality_report() -> tuple[dict | None, str]:
    """The Explanation-quality report and a note (``(None, reason)`` without one); read once."""
    # Imported here: the quality package pulls torchvision in (~2 s of the cold start, which the
    # first request does not need; tests/test_app.py checks it stays out of the import).
    from cbam_viz.research.quality.view import load_app_report

    return load_app_report()


@functools.cache
def quality_markdown() -> str:
    """docs/explanation_quality.md without its image lines (the tab shows the figure itself)."""
    try:
        text = QUALITY_DOC.read_text(encoding="utf-8")
    except OSError:
        return QUALITY_PLACEHOLDER
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("!["))


@functools.cache
def quality_figure() -> Image.Image | None:
    """The tab's one picture: the forest plot of the report (each member - the reference), else its
    stored ``summary.png``, else None."""
    from cbam_viz.research.quality.forest import forest_plot  # matplotlib: with the report, see quality_report

    report, _ = quality_report()
    if report is not None:
        return forest_plot(report)
    try:
        with Image.open(QUALITY_FIGURE) as im:
            return im.convert("RGB")
    except OSError:
        return None


@functools.cache
def quality_reading() -> str:
    """The forest plot's two-line plain reading (:func:`cbam_viz.research.quality.forest.reading`), or ""."""
    from cbam_viz.research.quality.forest import reading  # matplotlib: with the report, see quality_report

    report, _ = quality_report()
    return reading(report).replace("\n", "  \n") if report is not None else ""


@functools.cache
def examples() -> tuple[tuple[str, str], ...]:
    """``(path, caption)`` of every example picture, copied under the temp folder on first use.

    Gradio serves files a running app hands out only from the temp folder or the working
    directory; the packaged examples live in site-packages, so they are copied.
    """
    out = []
    for e in example_pictures.list_examples():
        path = Path(e.path)
        if not path.resolve().is_relative_to(Path(tempfile.gettempdir()).resolve()):
            try:
                EXAMPLES_DIR.mkdir(parents=True, exist_ok=True)
                copy, data = EXAMPLES_DIR / path.name, path.read_bytes()
                if not copy.is_file() or copy.read_bytes() != data:  # a copy left by an older version: replaced
                    atomic_write_bytes(copy, data)
                path = copy
            except OSError:
                continue  # a read-only temp folder: do without this example
        out.append((str(path), e.caption))
    return tuple(out)


def example_image(index: int | None) -> str | None:
    """The path of example ``index`` (what a click on the examples puts into the photo input)."""
    shown = examples()
    return shown[index][0] if index is not None and 0 <= index < len(shown) else None


def _model_title(name: str, model: dict[str, Any]) -> str:
    """How the sanity report names a model: its title, else its record name (old reports: a role)."""
    if model.get("title"):
        return str(model["title"])
    return {"cbam": "CBAM", "baseline": "baseline"}.get(name, name)


@functools.cache
def sanity_failures() -> dict[str, list[str]]:
    """``{method: [models whose CAM failed]}`` from the model-randomisation report, if there is one.

    ``$CBAM_VIZ_SANITY_REPORT`` (a ``sanity.json`` or its folder) overrides ``docs/sanity/sanity.json``;
    no report (or an unreadable one) flags nothing.
    """
    path = Path(os.environ.get(SANITY_ENV) or SANITY_REPORT)
    if path.is_dir():
        path = path / "sanity.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        models = report["models"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    out: dict[str, list[str]] = {}
    for name, m in models.items():
        for method, result in (m.get("methods") or {}).items():
            if result.get("passes") is False:
                out.setdefault(method, []).append(_model_title(name, m))
    return out


def method_note(method: str | None) -> str:
    """A warning under the method dropdown when the chosen method failed the sanity check, else ""."""
    failed = sanity_failures().get(str(method or "").strip().lower())
    if not failed:
        return ""
    return (f"> **Sanity check failed** for `{method}` ({' and '.join(failed)} model): its maps barely change "
            "when the model's weights are randomised (Adebayo et al., 2018), so they may show the image more "
            "than what the model learnt.")
