"""Everything the web app (``app.py``) shows, computed without Gradio: one call per event.

``app.py`` holds the layout and the wiring only; each of its event functions calls one function
here and hands the result to Gradio. The data the page needs (pair names, examples, the
Explanation-quality report and text) is loaded lazily, on the first page load, and cached: importing
the app reads no file.

Results are plain Python: strings (markdown), paths, PIL images, lists, and :class:`Choices` for
a dropdown's new choices (``app.py`` turns them into ``gr.update``). Failures raise
:class:`~cbam_viz.messages.UserFacingError` (or another exception that
:func:`~cbam_viz.messages.format_error` turns into one sentence).
"""
from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from cbam_viz import service
from cbam_viz.controls import AUTO_LAYER, AUTO_TARGET
from cbam_viz.messages import UserFacingError, classes_sentence
from cbam_viz.outputs import atomic_write_bytes
from cbam_viz.pair import pair_names

__all__ = [
    "QUALITY_DOC", "QUALITY_FIGURE", "QUALITY_PLACEHOLDER", "Choices", "PairView", "PageView", "ExplainView",
    "quality_report", "quality_markdown", "quality_figure", "examples", "pair_markdown", "model_card_markdown",
    "timings_markdown", "status_markdown", "faithfulness_markdown", "channel_overview", "upload_paths",
    "item_view", "page_view", "pair_view", "explain_view", "show_item", "api_explain", "api_info",
    "quality_differences", "example_image",
]

ROOT = Path(__file__).resolve().parent.parent
QUALITY_DOC = ROOT / "docs" / "explanation_quality.md"
QUALITY_FIGURE = ROOT / "docs" / "explanation_quality" / "summary.png"
QUALITY_PLACEHOLDER = "Explanation quality: not measured yet."
#: Where example pictures are copied for the page: Gradio serves files from the temp folder.
EXAMPLES_DIR = Path(tempfile.gettempdir()) / "cbam_viz_app_examples"


@dataclass(frozen=True)
class Choices:
    """A dropdown's (or picker's) new choices and value."""

    choices: list
    value: Any
    visible: bool = True


# ------------------------------------------------------------------------ page data, lazily

@functools.cache
def quality_report() -> tuple[dict | None, str]:
    """The Explanation-quality report and a note (``(None, reason)`` without one); read once."""
    from cbam_viz.quality.view import load_app_report

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
    """The report's summary figure (paired differences), or None when it is not there."""
    try:
        with Image.open(QUALITY_FIGURE) as im:
            return im.convert("RGB")
    except OSError:
        return None


@functools.cache
def examples() -> tuple[tuple[str, str], ...]:
    """``(path, caption)`` of every example picture, copied under the temp folder on first use.

    Gradio serves files a running app hands out only from the temp folder or the working
    directory; the packaged examples live in site-packages, so they are copied.
    """
    from cbam_viz.examples import list_examples

    out = []
    for e in list_examples():
        path = Path(e.path)
        if not path.resolve().is_relative_to(Path(tempfile.gettempdir()).resolve()):
            try:
                EXAMPLES_DIR.mkdir(parents=True, exist_ok=True)
                copy = EXAMPLES_DIR / path.name
                if not copy.is_file():
                    atomic_write_bytes(copy, path.read_bytes())
                path = copy
            except OSError:
                continue  # a read-only temp folder: do without this example
        out.append((str(path), e.caption))
    return tuple(out)


# ------------------------------------------------------------------------------- markdown

def pair_markdown(info: service.PairInfo) -> str:
    lines = [f"**Loaded pair:** `{info.name}` ({info.baseline_name} vs {info.cbam_name}, on {info.device}). "
             f"{classes_sentence(info.classes)}."]
    lines += [f"\n> **Warning:** {w}" for w in info.warnings]
    return "\n".join(lines)


def model_card_markdown(pair) -> str:
    """A model card for the pair from its manifest records: architecture, data, recipe, metrics."""
    lines = [f"### Pair `{pair.name}`", ""]
    for role, m in (("Baseline", pair.baseline), ("CBAM", pair.cbam)):
        lines.append(f"#### {role}: `{m.name}` ({m.arch})")
        if not m.trained or m.record is None:
            lines += ["", "Untrained: random weights, for trying the app only. Its numbers mean nothing.", ""]
            continue
        rec = m.record
        lines += [
            "",
            f"- Parameters: {rec.num_params:,}",
            f"- Classes ({rec.num_classes}): {', '.join(rec.class_names)}",
            f"- Input: {rec.input_size}x{rec.input_size}, mean {list(rec.mean)}, std {list(rec.std)}",
            f"- Weights file: `{rec.file}` (sha256 `{rec.sha256[:12]}...`)",
        ]
        for title, values in (("Recipe", rec.recipe), ("Training", rec.training)):
            if values:
                lines.append(f"- {title}: " + ", ".join(f"{k}={v}" for k, v in values.items()
                                                         if not isinstance(v, (dict, list))))
        metrics = _flat_metrics(rec.metrics)
        if metrics:
            lines += ["", "| metric | value |", "|---|---|"]
            lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics]
        else:
            lines.append("- Metrics: not measured yet")
        lines.append("")
    return "\n".join(lines)


def _flat_metrics(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in (metrics or {}).items():
        if isinstance(v, dict):
            out += _flat_metrics(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float, str, bool)):
            out.append((f"{prefix}{k}", v))
    return out


def timings_markdown(timings, per_model: dict[str, dict[str, float]]) -> str:
    rows = ["| step | seconds |", "|---|---:|"]
    rows += [f"| {k.replace('_', ' ')} | {v:.3f} |" for k, v in timings.items()]
    for role, t in per_model.items():
        rows += [f"| {role}: {k.replace('_', ' ')} | {v:.3f} |" for k, v in t.items()]
    return "\n".join(rows)


def status_markdown(warnings, failures) -> str:
    lines = [f"> **Note:** {w}" for w in warnings]
    lines += [f"> **Skipped {name}:** {reason}" for name, reason in failures]
    return "\n\n".join(lines)


def faithfulness_markdown(summary: dict[str, Any] | None) -> str:
    """A few plain sentences comparing the two models' confidence drops (for the app)."""
    if not summary:
        return ""
    b, c = summary["baseline"], summary["cbam"]
    frac = f"{summary['fraction']:.0%}"

    def change(d: dict) -> str:
        if d["drop"] >= 0:
            return f"from {d['prob_before']:.2f} to {d['prob_after']:.2f} (drop {d['relative_drop']:.0%})"
        return f"from {d['prob_before']:.2f} to {d['prob_after']:.2f} (it rose)"

    lines = [f"**Faithfulness, without boxes:** blurring away the top {frac} of its own CAM takes the "
             f"baseline's probability {change(b)} and CBAM's {change(c)}."]
    gap = c["relative_drop"] - b["relative_drop"]
    if abs(gap) < 0.05:
        lines.append("On this photo the two CAMs are about equally faithful.")
    else:
        better = "CBAM's" if gap > 0 else "the baseline's"
        lines.append(f"On this photo {better} CAM points more at what its model relies on. "
                     "One photo proves little: see the Explanation-quality tab for the measured averages.")
    return " ".join(lines)


def channel_overview(gallery: list[tuple[str, str]]) -> str | None:
    """The one picture stacking every block's channel attention (the per-block strips repeat it)."""
    for path, caption in gallery:
        if caption == service.CHANNEL_OVERVIEW_CAPTION:
            return path
    return gallery[0][0] if gallery else None


# --------------------------------------------------------------------------- Explain tab

def upload_paths(*values) -> tuple[list[str], list[str | None]]:
    """Paths and original names of raw upload payloads (events run with ``preprocess=False``).

    The app decodes uploads itself (:func:`cbam_viz.service.open_image`) so a broken file gets its
    one-sentence message instead of Gradio's preprocessing error. Gradio still checks that every
    path lies in its upload folder before the function runs.
    """
    paths, names = [], []
    for value in values:
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict) and item.get("path"):
                paths.append(item["path"])
                names.append(item.get("orig_name"))
            elif isinstance(item, str) and item:
                paths.append(item)
                names.append(None)
    return paths, names


def item_view(r: service.ImageResult, archive: Path | None) -> dict[str, Any]:
    """One image's result as the serialisable dict the page keeps (in a ``gr.State``)."""
    a = r.analysis
    files = [str(r.files[k]) for k in ("png", "json", "npz")] + ([str(archive)] if archive is not None else [])
    per_model = {role: getattr(a.explanation, role).timings for role in ("baseline", "cbam")}
    return {
        "name": a.name,
        "labels": {"baseline": a.labels("baseline"), "cbam": a.labels("cbam")},
        "overlays": {k: str(v) for k, v in r.overlays.items()},
        "spatial": r.spatial_gallery, "channel": channel_overview(r.channel_gallery),
        "faithfulness": str(r.faithfulness) if r.faithfulness else None,
        "faithfulness_md": faithfulness_markdown(a.summary.get("faithfulness")),
        "timings_md": timings_markdown(a.timings, per_model), "files": files,
        "warnings": list(a.warnings),
    }


def _components(item: dict) -> tuple:
    """The values of the components showing one image (in the order ``app.py`` lists them)."""
    return (
        item["labels"]["baseline"], item["overlays"]["baseline"],
        item["labels"]["cbam"], item["overlays"]["cbam"],
        item["faithfulness"], item["faithfulness_md"],
        item["spatial"], item["channel"], item["timings_md"], item["files"],
    )


@dataclass(frozen=True)
class ExplainView:
    items: list[dict]      # every image's item_view, for the picker
    picker: Choices        # "1. name", ... (shown when there are several)
    status: str            # notes and skipped files, markdown
    shown: tuple           # the first image's component values


def explain_view(image, files, *, pair_name=None, method="gradcam", target=None, layer=None, alpha=0.5,
                 max_images: int = 16) -> ExplainView:
    """The Explain button: one or several uploads -> every result, showing the first."""
    sources, names = upload_paths(image, files)
    batch = service.explain_files(sources, names=names, pair_name=pair_name, method=method, target=target,
                                  layer=layer, alpha=alpha, max_images=max_images)
    items = [item_view(r, batch.archive) for r in batch.results]
    labels = [f"{i + 1}. {it['name']}" for i, it in enumerate(items)]
    return ExplainView(items=items, picker=Choices(labels, labels[0], visible=len(items) > 1),
                       status=status_markdown(items[0]["warnings"], batch.failures), shown=_components(items[0]))


def show_item(choice: str, items: list[dict]) -> tuple:
    """The image picker: ``(status, *component values)`` of another image of the last batch."""
    if not items or not choice:
        raise UserFacingError("Explain an image first.")
    index = int(choice.split(".", 1)[0]) - 1
    item = items[max(0, min(index, len(items) - 1))]
    return (status_markdown(item["warnings"], []), *_components(item))


# ------------------------------------------------------------------------------ pair and page

@dataclass(frozen=True)
class PairView:
    markdown: str               # the "Loaded pair" line and warnings, or the error
    targets: Choices | None     # None: leave the control as it is (the pair did not load)
    layers: Choices | None
    card: str                   # the About tab's model card, or the error
    error: str | None = None


def pair_view(pair_name: str | None) -> PairView:
    """What depends on the chosen pair; never raises (an unloadable pair is said in the page)."""
    try:
        pair = service.get_pair(pair_name)
    except UserFacingError as err:
        return PairView(f"> **Error:** {err}", None, None, f"> **Error:** {err}", error=str(err))
    info = service.describe_pair(pair)
    return PairView(pair_markdown(info), Choices(info.targets, AUTO_TARGET), Choices(info.layer_choices, AUTO_LAYER),
                    model_card_markdown(pair))


@dataclass(frozen=True)
class PageView:
    pairs: Choices
    examples: tuple[tuple[str, str], ...]
    quality_markdown: str
    quality_figure: Image.Image | None
    quality_methods: Choices
    quality_note: str
    pair: PairView = field(repr=False)


def page_view() -> PageView:
    """Everything the page loads once it is open (nothing of it is read at import)."""
    pairs = pair_names()
    report, note = quality_report()
    from cbam_viz.quality.view import method_choices

    methods = method_choices(report) if report else ["gradcam"]
    return PageView(pairs=Choices(pairs, pairs[0]), examples=examples(), quality_markdown=quality_markdown(),
                    quality_figure=quality_figure(), quality_methods=Choices(methods, methods[0]),
                    quality_note=note, pair=pair_view(pairs[0]))


def example_image(index: int | None) -> str | None:
    """The path of example ``index`` (what a click on the examples puts into the photo input)."""
    shown = examples()
    return shown[index][0] if index is not None and 0 <= index < len(shown) else None


# ---------------------------------------------------------------------------------------- API

def api_explain(image, method="gradcam", target=AUTO_TARGET, layer=AUTO_LAYER, alpha=0.5, pair_name=None) -> tuple:
    """``/explain``: one image -> (summary JSON, baseline CAM, CBAM CAM, composite, attention, files)."""
    sources, names = upload_paths(image)
    if not sources:
        raise UserFacingError("Please send an image file.")
    batch = service.explain_files(sources[:1], names=names[:1], pair_name=pair_name, method=method, target=target,
                                  layer=layer, alpha=alpha, max_images=1)
    r = batch.results[0]
    return (r.analysis.summary, str(r.overlays["baseline"]), str(r.overlays["cbam"]), str(r.files["png"]),
            r.spatial_gallery + r.channel_gallery, [str(r.files[k]) for k in ("json", "npz")])


def api_info(pair_name: str | None = None) -> dict[str, Any]:
    """``/info``: the pair's classes, layer choices, CAM methods and warnings."""
    from cbam_viz.controls import list_methods

    info = service.describe_pair(service.get_pair(pair_name))
    return {
        "pair": info.name, "pairs": pair_names(), "baseline": info.baseline_name, "cbam": info.cbam_name,
        "trained": info.baseline_trained and info.cbam_trained, "classes": list(info.classes),
        "targets": info.targets, "layers": info.layer_choices, "methods": list_methods(),
        "warnings": list(info.warnings),
    }


# ----------------------------------------------------------------------- Explanation quality

@functools.lru_cache(maxsize=8)
def _differing_images(metric: str, method: str, direction: str, k: int):
    # The report never changes while the app runs: the same choice gives the same pictures.
    from cbam_viz.quality.view import differing_images

    return differing_images(quality_report()[0], metric, method, direction, k)


def quality_differences(metric: str, method: str, direction: str, k: float) -> tuple[list, str]:
    """The Explanation-quality tab: the images where the two CAMs score most differently, and a note."""
    from cbam_viz.quality.view import DIRECTIONS

    report, note = quality_report()
    if report is None:
        return [], note
    return _differing_images(metric, method, DIRECTIONS.get(direction, "both"), int(k))
