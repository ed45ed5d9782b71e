"""Everything the web app (``app.py``) shows, computed without Gradio: one call per event.

``app.py`` holds the layout and the wiring only; each of its event functions calls one function
here and hands the result to Gradio. The data the page needs (pair names, examples, the
Explanation-quality report and text) is loaded lazily, on the first page load, and cached: importing
the app reads no file.

Results are plain Python: strings (markdown), paths, PIL images, pandas DataFrames (the plots'
data), lists, and :class:`Choices` for a dropdown's new choices (``app.py`` turns them into
``gr.update``). Failures raise
:class:`~cbam_viz.messages.UserFacingError` (or another exception that
:func:`~cbam_viz.messages.format_error` turns into one sentence).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from cbam_viz import service
from cbam_viz.controls import AUTO_LAYER, AUTO_TARGET, DEFAULT_METHOD
from cbam_viz.messages import UserFacingError, classes_sentence, escape_markdown
from cbam_viz.model_card import choice_sentence, model_card_markdown
from cbam_viz.outputs import atomic_write_bytes
from cbam_viz.pair import pair_names
from cbam_viz.resources import SHIPPED_ROOT

__all__ = [
    "QUALITY_DOC", "QUALITY_FIGURE", "QUALITY_PLACEHOLDER", "Choices", "PairView", "PageView", "ExplainView",
    "quality_report", "quality_markdown", "quality_figure", "examples", "pair_markdown", "model_card_markdown",
    "timings_markdown", "timings_line", "status_markdown", "faithfulness_markdown", "channel_overview",
    "channel_frame", "upload_paths", "item_view", "page_view", "pair_view", "explain_view", "show_item",
    "example_view", "downloads_view", "probe_view", "ablation_view", "sanity_failures", "method_note",
    "QualityExtras", "quality_extras", "api_explain", "api_info", "quality_differences", "example_image",
    "SANITY_REPORT", "SANITY_ENV", "CHANNEL_PROFILES", "CHANNEL_PROFILES_ENV", "CHANNEL_COLUMNS", "PROBE_COLUMNS",
    "ABLATION_COLUMNS", "choice_sentence",
]

log = logging.getLogger(__name__)
ROOT = SHIPPED_ROOT  # the checkout, else the installed package's copies (cbam_viz.resources)
QUALITY_DOC = ROOT / "docs" / "explanation_quality.md"
QUALITY_FIGURE = ROOT / "docs" / "explanation_quality" / "summary.png"
QUALITY_PLACEHOLDER = "Explanation quality: not measured yet."
#: Where example pictures are copied for the page: Gradio serves files from the temp folder.
EXAMPLES_DIR = Path(tempfile.gettempdir()) / "cbam_viz_app_examples"
#: The model-randomisation report (``python -m cbam_viz sanity-check``); a method that failed it is flagged.
SANITY_REPORT = ROOT / "docs" / "sanity" / "sanity.json"
SANITY_ENV = "CBAM_VIZ_SANITY_REPORT"
#: The channel-profiles folder (``python -m cbam_viz channel-profiles``) shown in the quality tab.
CHANNEL_PROFILES = ROOT / "docs" / "channel_profiles"
CHANNEL_PROFILES_ENV = "CBAM_VIZ_CHANNEL_PROFILES"


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
                copy, data = EXAMPLES_DIR / path.name, path.read_bytes()
                if not copy.is_file() or copy.read_bytes() != data:  # a copy left by an older version: replaced
                    atomic_write_bytes(copy, data)
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


def timings_markdown(timings, per_model: dict[str, dict[str, float]]) -> str:
    rows = ["| step | seconds |", "|---|---:|"]
    rows += [f"| {k.replace('_', ' ')} | {v:.3f} |" for k, v in timings.items()]
    for role, t in per_model.items():
        rows += [f"| {role}: {k.replace('_', ' ')} | {v:.3f} |" for k, v in t.items()]
    return "\n".join(rows)


def timings_line(timings) -> str:
    """One line: the request's total, the models' share and the drawing's (pictures and files)."""
    model = sum(timings.get(k, 0.0) for k in ("wait_for_model", "explain", "faithfulness"))
    drawing = timings.get("render", 0.0) + timings.get("write_files", 0.0)
    total = timings.get("total", 0.0) + timings.get("write_files", 0.0)
    return f"**Took {total:.2f} s**: models {model:.2f} s, drawing and files {drawing:.2f} s."


def status_markdown(warnings, failures) -> str:
    lines = [f"> **Note:** {w}" for w in warnings]
    lines += [f"> **Skipped {escape_markdown(name)}:** {escape_markdown(reason)}" for name, reason in failures]
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


#: Columns of the channel-attention plot's data.
CHANNEL_COLUMNS = ("block", "rank", "channel", "attention")
#: Columns of the click-probe plot's data.
PROBE_COLUMNS = ("block", "spatial attention")
#: Columns of the gate-ablation table (and plot).
ABLATION_COLUMNS = ("block", "gate", "prob_change", "cam_correlation")


def channel_frame(channel_attention) -> Any:
    """Every CBAM block's channel attention as plot data: one row per (block, rank, channel, value).

    Each block's channels are ranked from the most passed (rank 0) to the least, so that every
    block draws one readable curve (flat: the block gates its channels alike; steep: it picks a
    few); the channel's own index stays in the row, for the hover.
    """
    import numpy as np
    import pandas as pd

    rows = []
    for block, values in channel_attention.items():
        v = np.asarray(values, dtype=np.float64)
        for rank, ch in enumerate(np.argsort(-v, kind="stable")):
            rows.append((block, rank, int(ch), round(float(v[ch]), 4)))
    return pd.DataFrame(rows, columns=list(CHANNEL_COLUMNS))


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


def item_view(r: service.ImageResult, batch_ids: list[str]) -> dict[str, Any]:
    """One image's result as the serialisable dict the page keeps (in a ``gr.State``, server-side)."""
    a = r.analysis
    per_model = {role: getattr(a.explanation, role).timings for role in ("baseline", "cbam")}
    return {
        "name": a.name, "result_id": r.result_id, "batch": batch_ids,
        "labels": {"baseline": a.labels("baseline"), "cbam": a.labels("cbam")},
        "photo": str(r.photo), "overlays": {k: str(v) for k, v in r.overlays.items()},
        "sheet": str(r.spatial_sheet) if r.spatial_sheet else None,
        "channel": {block: [round(float(x), 4) for x in values]
                    for block, values in a.explanation.cbam.channel_attention.items()},
        "faithfulness": str(r.faithfulness) if r.faithfulness else None,
        "faithfulness_md": faithfulness_markdown(a.summary.get("faithfulness")),
        "timings_line": timings_line(a.timings), "timings_md": timings_markdown(a.timings, per_model),
        "warnings": list(a.warnings),
    }


def _components(item: dict) -> tuple:
    """The values of the components showing one image (in the order ``app.py`` lists them):
    the result's own values, then the on-demand outputs (downloads, probe, ablation) emptied."""
    photo, base, cbam = item["photo"], item["overlays"]["baseline"], item["overlays"]["cbam"]
    return (
        item["labels"]["baseline"], (photo, base), item["labels"]["cbam"], (photo, cbam), (base, cbam),
        item["faithfulness"], item["faithfulness_md"], item["sheet"], photo, channel_frame(item["channel"]),
        item["timings_line"], item["timings_md"], item["result_id"],
        None, None, "", None, None, "",
    )


# Where _components puts item["timings_line"]: a cached example swaps only that value and keeps
# the rest (the channel plot's frame is not rebuilt).
_TIMINGS_LINE_AT = 10


@dataclass(frozen=True)
class ExplainView:
    items: list[dict]      # every image's item_view, for the picker
    picker: Choices        # "1. name", ... (shown when there are several)
    status: str            # notes and skipped files, markdown
    shown: tuple           # the first image's component values


def explain_view(image, files, *, pair_name=None, method="gradcam", target=None, layer=None, alpha=0.5,
                 max_images: int = 16, progress: Callable[..., object] | None = None) -> ExplainView:
    """The Explain button: one or several uploads -> every result, showing the first.

    Draws and writes only what the page shows (:data:`cbam_viz.service.PAGE_FILES`); the composite
    and the zip wait for the downloads button. ``progress(fraction, desc=...)`` (a ``gr.Progress``)
    gets one step per image when there are several or the method is a slow one.
    """
    sources, names = upload_paths(image, files)
    report = None
    if progress is not None and (len(sources) > 1 or service.is_slow_method(str(method))):
        def report(fraction: float, text: str) -> None:
            progress(fraction, desc=text)
    batch = service.explain_files(sources, names=names, pair_name=pair_name, method=method, target=target,
                                  layer=layer, alpha=alpha, max_images=max_images, pictures=service.PAGE_PICTURES,
                                  write=service.PAGE_FILES, progress=report)
    ids = [r.result_id for r in batch.results]
    skipped = [list(f) for f in batch.failures]  # every image of the batch keeps saying what was skipped
    items = [{**item_view(r, ids), "skipped": skipped} for r in batch.results]
    labels = [f"{i + 1}. {it['name']}" for i, it in enumerate(items)]
    return ExplainView(items=items, picker=Choices(labels, labels[0], visible=len(items) > 1),
                       status=status_markdown(items[0]["warnings"], batch.failures), shown=_components(items[0]))


def show_item(choice: str, items: list[dict]) -> tuple:
    """The image picker: ``(status, *component values)`` of another image of the last batch."""
    if not items or not choice:
        raise UserFacingError("Explain an image first.")
    index = int(choice.split(".", 1)[0]) - 1
    item = items[max(0, min(index, len(items) - 1))]
    return (status_markdown(item["warnings"], item.get("skipped", [])), *_components(item))


# An example answers at once after its first use: its view is kept, per example and controls (the
# same idea as Gradio's cache_examples="lazy", keyed by the controls too, with no file read at
# import). An entry whose files were cleaned up (request folders live an hour) is computed again.
_EXAMPLE_CACHE: OrderedDict[tuple, ExplainView] = OrderedDict()
_EXAMPLE_CACHE_SIZE = 32
_EXAMPLE_LOCK = threading.Lock()


def example_view(index: int | None, *, pair_name=None, method="gradcam", target=None, layer=None,
                 alpha=0.5) -> ExplainView:
    """A click on an example: its explanation with the current controls, from the cache after the first time."""
    path = example_image(index)
    if path is None:
        raise UserFacingError("Pick one of the examples.")
    key = (path, pair_name, method, target, layer, float(alpha))
    with _EXAMPLE_LOCK:
        cached = _EXAMPLE_CACHE.get(key)
    if cached is not None and all(Path(p).is_file() for p in (cached.items[0]["photo"],
                                                              *cached.items[0]["overlays"].values())):
        with _EXAMPLE_LOCK:
            _EXAMPLE_CACHE.move_to_end(key)
        # The result is the first run's; its timings are not what this click cost.
        first = cached.items[0]["timings_line"].replace("**", "").replace("Took", "the first run took", 1)
        item = {**cached.items[0], "timings_line": f"**Answered from the example cache** ({first.rstrip('.')})."}
        shown = (*cached.shown[:_TIMINGS_LINE_AT], item["timings_line"], *cached.shown[_TIMINGS_LINE_AT + 1:])
        return dataclasses.replace(cached, items=[item, *cached.items[1:]], shown=shown)
    view = explain_view(path, None, pair_name=pair_name, method=method, target=target, layer=layer, alpha=alpha,
                        max_images=1)
    with _EXAMPLE_LOCK:
        _EXAMPLE_CACHE[key] = view
        while len(_EXAMPLE_CACHE) > _EXAMPLE_CACHE_SIZE:
            _EXAMPLE_CACHE.popitem(last=False)
    return view


def _batch_of(result_id: str, items: list[dict] | None) -> list[str]:
    for item in items or []:
        if item.get("result_id") == result_id:
            return list(item.get("batch") or [result_id])
    return [result_id]  # a deep link: the page's state is gone, the shown result is not


def downloads_view(result_id: str, items: list[dict] | None = None) -> list[str]:
    """The downloads button: the shown image's composite PNG, JSON and npz (+ the zip of a batch),
    built now from the files the request wrote."""
    files = service.build_downloads([result_id])
    batch = _batch_of(result_id, items)
    if len(batch) > 1:
        files.append(service.build_downloads(batch)[-1])
    return [str(f) for f in files]


def probe_view(result_id: str, index) -> tuple[Any, str]:
    """A click on the photo at ``index = (x, y)``: every CBAM block's spatial attention there."""
    import pandas as pd

    if not index or len(index) != 2:
        raise UserFacingError("Click a point of the photo.")
    x, y = (float(v) for v in index)
    values = service.spatial_at(result_id, x, y)
    frame = pd.DataFrame([(b, round(v, 4)) for b, v in values], columns=list(PROBE_COLUMNS))
    low, high = min(values, key=lambda bv: bv[1]), max(values, key=lambda bv: bv[1])
    text = (f"At pixel ({int(x)}, {int(y)}): the spatial gates pass {low[1]:.2f} ({low[0]}) to {high[1]:.2f} "
            f"({high[0]}) of the features there (1 = kept as is).")
    return frame, text


def ablation_view(result_id: str) -> tuple[Any, Any, str]:
    """"Is this attention used?": gate ablation on the shown photo (plot data, table, one sentence)."""
    import pandas as pd

    rows = service.ablate_result(result_id)
    table = pd.DataFrame([[r[k] for k in ABLATION_COLUMNS] for r in rows], columns=list(ABLATION_COLUMNS))
    plot = table.assign(ablation=[f"{r['block']} {r['gate']}" for r in rows])
    finite = [r for r in rows if r["prob_change"] is not None]
    if not finite:
        return plot, table, "No ablation changed anything measurable."
    worst = min(finite, key=lambda r: r["prob_change"])
    every = worst["block"] == "all"
    where = f"{worst['gate']} gate{'s' if every else ''} of {'every block' if every else worst['block']}"
    text = (f"Each row sets a gate to 1 (no attention) in one block, or in all blocks. The largest fall of the "
            f"CBAM model's top-1 probability: {worst['prob_change']:+.2f} with the {where} switched off. "
            "Near 0 everywhere: on this photo the attention is not used. (The CAM agreement column compares "
            "Grad-CAM of the predicted class, whatever method the page shows.)")
    return plot, table, text


# ----------------------------------------------------------------- sanity-check flags

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
    for role, m in models.items():
        for method, result in (m.get("methods") or {}).items():
            if result.get("passes") is False:
                out.setdefault(method, []).append("CBAM" if role == "cbam" else role)
    return out


def method_note(method: str | None) -> str:
    """A warning under the method dropdown when the chosen method failed the sanity check, else ""."""
    failed = sanity_failures().get(str(method or "").strip().lower())
    if not failed:
        return ""
    return (f"> **Sanity check failed** for `{method}` ({' and '.join(failed)} model): its maps barely change "
            "when the model's weights are randomised (Adebayo et al., 2018), so they may show the image more "
            "than what the model learnt.")


# ------------------------------------------------------------------------------ pair and page

@dataclass(frozen=True)
class PairView:
    markdown: str               # the "Loaded pair" line and warnings, or the error
    targets: Choices | None     # None: leave the control as it is (the pair did not load)
    layers: Choices | None
    card: str                   # the About tab's model card, or the error
    error: str | None = None


def pair_view(pair_name: str | None, *, target: str | None = None, layer: str | None = None) -> PairView:
    """What depends on the chosen pair; never raises (an unloadable pair is said in the page).

    ``target`` and ``layer`` (the controls' current values) are kept where the pair offers them, so a
    shared link reopens with its own controls and a pair switch keeps what still applies; else auto.
    """
    try:
        pair = service.get_pair(pair_name)
    except UserFacingError as err:
        return PairView(f"> **Error:** {err}", None, None, f"> **Error:** {err}", error=str(err))
    info = service.describe_pair(pair)
    try:
        card = model_card_markdown(pair)
    except Exception:  # noqa: BLE001  a malformed manifest record must not keep the page from loading
        log.exception("model card of pair %r failed", pair.name)
        card = "> The model card could not be drawn from this pair's manifest records (see the server log)."
    return PairView(pair_markdown(info), Choices(info.targets, target if target in info.targets else AUTO_TARGET),
                    Choices(info.layer_choices, layer if layer in info.layer_choices else AUTO_LAYER), card)


@dataclass(frozen=True)
class PageView:
    pairs: Choices
    examples: tuple[tuple[str, str], ...]
    quality_markdown: str
    quality_figure: Image.Image | None
    quality_methods: Choices
    quality_note: str
    pair: PairView = field(repr=False)
    method_note: str = ""
    quality_metrics: Choices = field(default_factory=lambda: Choices([], None))
    quality_directions: Choices = field(default_factory=lambda: Choices([], None))
    method: str = "gradcam"     # the CAM method the page shows (a shared link's, else as it opened)


def page_view(method: str | None = "gradcam", *, pair_name: str | None = None, target: str | None = None,
              layer: str | None = None, result_id: str | None = None) -> PageView:
    """Everything the page loads once it is open (nothing of it is read at import).

    The controls' values as the page opened are kept where they still apply: the pair if the manifest
    has it, target and layer if that pair offers them (:func:`pair_view`). A shared link also brings
    its result's id: then the controls are those that made that result (read from its JSON), since
    the page only learns a dropdown's value when an event sends it.
    """
    method, pair_name, target, layer = _controls_of_result(result_id) or (method, pair_name, target, layer)
    method = method or DEFAULT_METHOD
    pairs = pair_names()
    chosen = pair_name if pair_name in pairs else pairs[0]
    report, note = quality_report()
    from cbam_viz.quality.view import DIRECTIONS, method_choices, metric_choices

    methods = method_choices(report) if report else ["gradcam"]
    metrics = metric_choices()
    return PageView(pairs=Choices(pairs, chosen), examples=examples(), quality_markdown=quality_markdown(),
                    quality_figure=quality_figure(), quality_methods=Choices(methods, methods[0]),
                    quality_note=note, pair=pair_view(chosen, target=target, layer=layer),
                    method_note=method_note(method), method=method,
                    quality_metrics=Choices(metrics, "energy" if any(k == "energy" for _, k in metrics) else
                                            metrics[0][1]),
                    quality_directions=Choices(list(DIRECTIONS), next(iter(DIRECTIONS))))


def _controls_of_result(result_id: str | None) -> tuple[str, str, str, str] | None:
    """(method, pair, target, layer) as they made result ``result_id``; None for no or a gone result."""
    if not result_id:
        return None
    try:
        summary = service.load_result(result_id).summary
    except UserFacingError:
        return None
    request = summary.get("target_request")
    target = request["label"] if isinstance(request, dict) else AUTO_TARGET
    return summary.get("method"), summary.get("pair"), target, summary.get("layer_request") or AUTO_LAYER


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
                                  layer=layer, alpha=alpha, max_images=1, pictures=service.API_PICTURES,
                                  write=service.API_FILES)
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
    if not metric or not method:  # the tab opened before the page load filled its controls
        return [], ""
    return _differing_images(metric, method, DIRECTIONS.get(direction, "both"), int(k or 6))


@dataclass(frozen=True)
class QualityExtras:
    """The research sections of the Explanation-quality tab."""

    spatial_gates: str          # the report's spatial-gate localization section, or a one-line note
    profiles_image: Image.Image | None
    profiles_rows: Any          # DataFrame of channel_profiles.similarity_rows, or None
    profiles_note: str


@functools.cache
def quality_extras() -> QualityExtras:
    """Spatial-gate localization (from the quality report) and the channel profiles (from their folder)."""
    from cbam_viz.quality.report import spatial_gate_markdown

    report, _ = quality_report()
    lines = spatial_gate_markdown(report) if report else []
    gates = "\n".join(lines) if lines else (
        "*Does the spatial gate itself localize the object? Not in this report yet: re-run "
        "`python -m cbam_viz evaluate-cams` to measure it.*")
    folder = Path(os.environ.get(CHANNEL_PROFILES_ENV) or CHANNEL_PROFILES)
    command = "`python -m cbam_viz channel-profiles --data DIR --out docs/channel_profiles`"
    if not (folder / "profiles.npz").is_file() and not (folder.is_file() and folder.suffix == ".npz"):
        return QualityExtras(gates, None, None, f"*No channel profiles in `{folder}`: make them with {command}.*")
    try:
        import pandas as pd

        from cbam_viz.channel_profiles import load_profiles, profiles_image, similarity_rows

        profiles = load_profiles(folder)
        rows = pd.DataFrame(similarity_rows(profiles))
        image = profiles_image(profiles)
    except Exception as err:  # noqa: BLE001  a broken folder: said in one line, the tab still works
        return QualityExtras(gates, None, None, f"*The channel profiles in `{folder}` could not be read "
                                                f"({type(err).__name__}); make them again with {command}.*")
    note = ("**Channel attention per class** (SE-Net's figure): the mean channel gate of each class, per block. "
            "*r*: mean correlation between two classes' profiles (1 = every class gated alike); *η²*: share "
            "of the gate's variance explained by the class (0 = class-agnostic).")
    return QualityExtras(gates, image, rows, note)
