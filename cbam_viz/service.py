"""What the app and the ``explain`` command call: explain + render + downloads, errors -> messages.

CBAM (Woo et al., ECCV 2018, arXiv 1807.06521) refines every residual block's features with a
channel gate and then a spatial gate. This module runs one photo (or many) through a baseline
ResNet and its CBAM twin (:mod:`cbam_viz.pair`), explains both with a CAM method
(:mod:`cbam_viz.explain`), renders the pictures (:mod:`cbam_viz.render`) and writes the downloads:

* ``composite.png``: the side-by-side picture;
* ``explanation.json``: predictions, CAM targets, warnings, timings and metadata;
* ``maps.npz``: the raw arrays (both CAMs, every CBAM block's channel and spatial attention).

It imports no Gradio: the web app (``app.py``) and the CLI are thin layers over it. Every error a
person can cause or fix becomes a :class:`UserFacingError` whose message is one plain sentence.

Concurrency: the pair is loaded once per process (lazily, on first use) and shared. CAM methods
and the attention recorder put hooks on the shared modules, so two explanations on the same
model at once would see each other's activations; :func:`analyse` therefore holds a per-pair lock
around the model work only. Decoding, rendering and file writing run outside it, and each
request writes into its own fresh folder, so users never see each other's files.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "UserFacingError", "PairInfo", "Analysis", "ImageResult", "BatchResult",
    "AUTO_TARGET", "AUTO_LAYER", "UNSURE_PROB", "UNSURE_MARGIN", "DISPLAY_MAX_SIDE", "OUTPUT_ROOT",
    "get_pair", "pair_names", "describe_pair", "block_names", "list_methods",
    "open_image", "analyse", "save", "explain_files", "format_error", "model_card_markdown",
    "cleanup_outputs", "IMAGE_SUFFIXES", "warm_up", "check_controls", "collect_images", "prepare_output_dir",
    "safe_stem", "unique_stem", "npz_arrays", "classes_sentence", "new_request_dir",
    "FAITHFULNESS_FRACTION", "CHANNEL_OVERVIEW_CAPTION", "faithfulness_summary", "faithfulness_markdown",
]

log = logging.getLogger(__name__)

#: Value of the target control meaning "explain the class each model predicts".
AUTO_TARGET = "auto (predicted class)"
#: Value of the layer control meaning "the last residual block" (what Grad-CAM usually uses).
AUTO_LAYER = "auto (last block)"
#: A top-1 probability below this flags the prediction as unsure.
UNSURE_PROB = 0.5
#: A gap between the first and second probability below this flags it as unsure too.
UNSURE_MARGIN = 0.15
#: Longest side of the picture we explain and render. The models see a 224-ish square anyway
#: (:func:`cbam_viz.preprocess.to_model_tensor`); a 40-megapixel overlay would only cost time.
DISPLAY_MAX_SIDE = 1024
#: Where per-request folders go. Under the system temp folder, which Gradio may serve from.
OUTPUT_ROOT = Path(tempfile.gettempdir()) / "cbam_viz"
#: Request folders older than this (seconds) are removed when a new request starts.
OUTPUT_MAX_AGE_S = 3600.0
#: Caption of the channel-attention picture that stacks every block's strip.
CHANNEL_OVERVIEW_CAPTION = "every block's channel attention"
#: Share of the image blurred away (the top of each model's CAM) for the per-image faithfulness.
FAITHFULNESS_FRACTION = 0.2
#: File suffixes treated as images when a folder is given.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})


class UserFacingError(Exception):
    """A failure a person can understand; ``str(err)`` is one plain sentence, no traceback."""


# --------------------------------------------------------------------------------------------
# The pair: loaded once, lazily; one lock per pair around the model work.

_PAIRS: dict[str | None, Any] = {}
_PAIR_LOCKS: dict[str, threading.Lock] = {}
_LOAD_LOCK = threading.Lock()


def pair_names() -> list[str]:
    """The manifest's pairs (default first), then ``"untrained"``: the seeded random-weights pair.

    The untrained pair is always offered: it runs without any weights file, and comparing it with
    a trained pair shows what training taught the attention gates.
    """
    from cbam_viz.pair import UNTRAINED_PAIR, list_pairs

    try:
        names = list(list_pairs())
    except Exception as err:  # noqa: BLE001  a broken manifest must not stop the app from starting
        log.warning("cannot list pairs: %s", err)
        names = []
    return [n for n in names if n != UNTRAINED_PAIR] + [UNTRAINED_PAIR]


def get_pair(name: str | None = None):
    """The :class:`cbam_viz.pair.ModelPair` called ``name`` (None: the default), loaded once.

    Raises:
        UserFacingError: unknown pair, missing or corrupted weights file.
    """
    key = name or None
    pair = _PAIRS.get(key)
    if pair is not None:
        return pair
    with _LOAD_LOCK:
        pair = _PAIRS.get(key)
        if pair is None:
            from cbam_viz.pair import load_pair

            try:
                pair = load_pair(key)
            except KeyError as err:
                known = ", ".join(pair_names()) or "none"
                raise UserFacingError(f"There is no model pair called {name!r} (known pairs: {known}).") from err
            except Exception as err:  # noqa: BLE001  checksum, missing file, strict-load mismatch
                log.exception("loading pair %r failed", name)
                raise UserFacingError(f"The model pair could not be loaded: {_first_sentence(err)}") from err
            _PAIRS[key] = pair
            _PAIRS.setdefault(pair.name, pair)
            _PAIR_LOCKS.setdefault(pair.name, threading.Lock())
    return pair


def _lock_for(pair) -> threading.Lock:
    with _LOAD_LOCK:
        return _PAIR_LOCKS.setdefault(pair.name, threading.Lock())


def warm_up(pair_name: str | None = None) -> float:
    """Load the pair and run one small explanation, so the first person does not wait.

    The first explanation in a process pays for lazy imports (pytorch-grad-cam pulls in scipy and
    scikit-learn: several seconds on a small CPU) and first-call allocations. Returns the seconds
    it took; failures are logged, never raised (the app must start anyway).
    """
    t = time.perf_counter()
    try:
        image = Image.new("RGB", (64, 64), (128, 128, 128))
        analyse(image, pair_name=pair_name, name="warm-up")
    except Exception:  # noqa: BLE001
        log.exception("warm-up failed (the app still serves)")
    return time.perf_counter() - t


def list_methods() -> list[str]:
    """Every CAM method :func:`cbam_viz.explain.explain` accepts."""
    from cbam_viz.explain import list_methods as _list

    return list(_list())


_BLOCK_RE = re.compile(r"^layer\d+\.\d+$")


def block_names(model) -> list[str]:
    """Dotted names of every residual block (``layer1.0`` ... ``layer4.1``), in forward order."""
    return [n for n, _ in model.named_modules() if _BLOCK_RE.match(n)]


@dataclass(frozen=True)
class PairInfo:
    """What the UI shows about a pair before any image is explained."""

    name: str
    classes: tuple[str, ...]
    layers: tuple[str, ...]
    default_layer: str
    baseline_name: str
    cbam_name: str
    baseline_trained: bool
    cbam_trained: bool
    device: str
    warnings: tuple[str, ...]

    @property
    def targets(self) -> list[str]:
        """Choices of the target control: auto, then every class."""
        return [AUTO_TARGET, *self.classes]

    @property
    def layer_choices(self) -> list[str]:
        """Choices of the layer control: auto (the last block), then every block."""
        return [AUTO_LAYER, *self.layers]


def _untrained_warning(role: str, model) -> str:
    return (f"The {role} model ({model.name}) is untrained: no weights were found, so its predictions, "
            "heatmaps and attention maps are random; train and export a pair with "
            "`python -m cbam_viz train --data DIR --export weights`.")


def describe_pair(pair) -> PairInfo:
    """Classes, layer choices and plain warnings (e.g. untrained models) of a loaded pair."""
    layers = tuple(block_names(pair.cbam.model))
    warnings = []
    if not pair.baseline.trained:
        warnings.append(_untrained_warning("baseline", pair.baseline))
    if not pair.cbam.trained:
        warnings.append(_untrained_warning("CBAM", pair.cbam))
    if tuple(pair.baseline.classes) != tuple(pair.cbam.classes):
        warnings.append("The two models of this pair were trained on different class lists; "
                        "their predictions cannot be compared directly.")
    return PairInfo(
        name=pair.name, classes=tuple(pair.cbam.classes), layers=layers,
        default_layer=layers[-1] if layers else "", baseline_name=pair.baseline.name,
        cbam_name=pair.cbam.name, baseline_trained=bool(pair.baseline.trained),
        cbam_trained=bool(pair.cbam.trained), device=str(pair.cbam.device), warnings=tuple(warnings),
    )


def classes_sentence(classes: Sequence[str]) -> str:
    return f"The models only know these {len(classes)} classes: {', '.join(classes)}"


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
        if rec.recipe:
            recipe = ", ".join(f"{k}={v}" for k, v in rec.recipe.items() if not isinstance(v, (dict, list)))
            lines.append(f"- Recipe: {recipe}")
        if rec.training:
            training = ", ".join(f"{k}={v}" for k, v in rec.training.items() if not isinstance(v, (dict, list)))
            lines.append(f"- Training: {training}")
        metrics = _flat_metrics(rec.metrics)
        if metrics:
            lines += ["", "| metric | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt_metric(v)} |" for k, v in metrics]
        else:
            lines.append("- Metrics: not measured yet")
        lines.append("")
    return "\n".join(lines)


def _flat_metrics(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in (metrics or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _flat_metrics(v, key + ".")
        elif isinstance(v, (int, float, str, bool)):
            out.append((key, v))
    return out


def _fmt_metric(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# --------------------------------------------------------------------------------------------
# Errors -> one sentence.

def _first_sentence(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    if len(text) > limit:
        text = text[: limit - 3].rstrip() + "..."
    return text if text.endswith((".", "!", "?")) else text + "."


def format_error(err: BaseException) -> str:
    """One sentence for any exception raised while explaining; unexpected ones are logged."""
    from cbam_viz.preprocess import ImageError

    if isinstance(err, (UserFacingError, ImageError)):
        return _first_sentence(err)
    if isinstance(err, MemoryError):
        return "The server ran out of memory on this image; try a smaller image or fewer at once."
    if isinstance(err, (ValueError, KeyError)):
        # explain() raises these for a wrong method, target or layer, with a precise message.
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        return _first_sentence(msg if isinstance(msg, BaseException) else Exception(str(msg)))
    if isinstance(err, OSError) and err.errno is not None:
        return f"A file could not be read or written: {_first_sentence(err)}"
    log.error("unexpected error while explaining", exc_info=err)
    return (f"Something went wrong while explaining this image ({type(err).__name__}); "
            "the details are in the server log.")


# --------------------------------------------------------------------------------------------
# One image: open, explain, render (in memory).

def open_image(source: str | os.PathLike | bytes | Image.Image, *, display_name: str | None = None) -> Image.Image:
    """Any upload -> an RGB image whose longest side is at most :data:`DISPLAY_MAX_SIDE`.

    Messages name the file ``display_name`` (default: its file name), never its server path.

    Raises:
        UserFacingError: not an image, damaged, empty or too large (see :mod:`cbam_viz.preprocess`).
    """
    from cbam_viz.preprocess import ImageError, open_image as _open, to_rgb

    try:
        image = to_rgb(source) if isinstance(source, Image.Image) else _open(source)
    except ImageError as err:
        message = _first_sentence(err)
        if isinstance(source, (str, os.PathLike)):
            # Name the upload, not the server's temp path it was stored under.
            message = message.replace(os.fspath(source), display_name or Path(os.fspath(source)).name)
        raise UserFacingError(message) from None
    if max(image.size) > DISPLAY_MAX_SIDE:
        image = image.copy()
        image.thumbnail((DISPLAY_MAX_SIDE, DISPLAY_MAX_SIDE), Image.LANCZOS)
    return image


@dataclass(frozen=True)
class Analysis:
    """One image explained and rendered, in memory (nothing written yet)."""

    name: str                                  # the source's file name, for captions and files
    image: Image.Image                         # the RGB picture that was explained
    original_size: tuple[int, int]            # (W, H) before downscaling for display
    explanation: Any                           # cbam_viz.explain.Explanation
    pair_name: str
    alpha: float
    overlays: dict[str, Image.Image]           # "baseline" / "cbam" -> CAM overlay
    spatial_gallery: list[tuple[Image.Image, str]]   # every CBAM block's spatial attention
    channel_gallery: list[tuple[Image.Image, str]]   # every CBAM block's channel attention
    composite: Image.Image
    warnings: tuple[str, ...]
    timings: dict[str, float]                  # seconds per step
    summary: dict[str, Any] = field(repr=False)  # the JSON document
    faithfulness: dict[str, Any] | None = None  # "baseline" / "cbam" -> localization.ConfidenceDrop
    faithfulness_image: Image.Image | None = None

    def labels(self, role: str) -> dict[str, float]:
        """``{label: probability}`` of one model's top-k (what a ``gr.Label`` shows)."""
        return {p.label: float(p.prob) for p in getattr(self.explanation, role).predictions}


def _resolve_controls(info: PairInfo, method: str, target: str | int | None, layer: str | None,
                      alpha: float) -> tuple[str, str | int | None, str, float]:
    methods = list_methods()
    method = (method or "gradcam").strip().lower()
    if method not in methods:
        raise UserFacingError(f"Unknown CAM method {method!r}; choose one of: {', '.join(methods)}.")
    if target is None or (isinstance(target, str) and target.strip().lower() in ("", "auto", AUTO_TARGET)):
        target = None
    elif isinstance(target, int) and not isinstance(target, bool):
        if not 0 <= target < len(info.classes):
            raise UserFacingError(f"Target class index {target} is out of range: the models know "
                                  f"{len(info.classes)} classes (0 to {len(info.classes) - 1}).")
    elif str(target).strip() not in info.classes and str(target).strip().isdigit():
        return _resolve_controls(info, method, int(str(target).strip()), layer, alpha)
    else:
        target = str(target).strip()
        if target not in info.classes:
            raise UserFacingError(f"Unknown target class {target!r}. {classes_sentence(info.classes)}.")
    layer = (layer or "").strip()
    if layer.lower() in ("", "auto", AUTO_LAYER):
        layer = info.default_layer
    if layer not in info.layers:
        raise UserFacingError(f"Unknown layer {layer!r}; choose a block among: {', '.join(info.layers)}.")
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise UserFacingError(f"The overlay opacity must be a number between 0 and 1, not {alpha!r}.") from None
    if not 0.0 <= alpha <= 1.0:
        raise UserFacingError(f"The overlay opacity must be between 0 and 1, not {alpha}.")
    return method, target, layer, alpha


def _prediction_warnings(explanation, info: PairInfo, *, unsure_prob: float, unsure_margin: float) -> list[str]:
    out = []
    unsure = []
    for role, title in (("baseline", "baseline"), ("cbam", "CBAM")):
        preds = getattr(explanation, role).predictions
        if not preds:
            continue
        top = preds[0]
        second = preds[1].prob if len(preds) > 1 else 0.0
        if top.prob < unsure_prob:
            unsure.append(f"the {title} model gives its top class {top.label!r} only {top.prob:.0%}")
        elif top.prob - second < unsure_margin:
            unsure.append(f"the {title} model hesitates between {top.label!r} ({top.prob:.0%}) "
                          f"and {preds[1].label!r} ({second:.0%})")
    if unsure:
        out.append("Unsure prediction: " + "; ".join(unsure) + ". "
                   + classes_sentence(info.classes) + "; this photo may show none of them.")
    b, c = explanation.baseline.predictions, explanation.cbam.predictions
    if b and c and b[0].label != c[0].label:
        out.append(f"The two models disagree: baseline says {b[0].label!r}, CBAM says {c[0].label!r}.")
    return out


def analyse(
    source: str | os.PathLike | bytes | Image.Image,
    *,
    pair=None,
    pair_name: str | None = None,
    method: str = "gradcam",
    target: str | int | None = None,
    layer: str | None = None,
    alpha: float = 0.5,
    name: str | None = None,
    unsure_prob: float = UNSURE_PROB,
    unsure_margin: float = UNSURE_MARGIN,
    faithfulness: bool = True,
) -> Analysis:
    """Explain one image with both models and render every picture, in memory.

    Args:
        source: a path, the file's bytes or a PIL image.
        pair: a loaded :class:`cbam_viz.pair.ModelPair`; default: :func:`get_pair` (``pair_name``).
        method: a name from :func:`list_methods`.
        target: None or :data:`AUTO_TARGET` (each model's predicted class), a class name or index.
        layer: the block the CAM looks at (a name from :func:`block_names`); default: the last.
        alpha: heatmap opacity in the overlays, 0 to 1.
        name: shown in captions and written in the JSON; default: the file's name.
        faithfulness: also measure each model's confidence drop when the top
            :data:`FAITHFULNESS_FRACTION` of its own CAM is blurred away (two more forwards): a
            user's photo has no boxes, so this is how the app tells which CAM found what the
            model actually uses.

    Raises:
        UserFacingError: for every failure, with a one-sentence message.
    """
    try:
        return _analyse(source, pair=pair, pair_name=pair_name, method=method, target=target, layer=layer,
                        alpha=alpha, name=name, unsure_prob=unsure_prob, unsure_margin=unsure_margin,
                        faithfulness=faithfulness)
    except UserFacingError:
        raise
    except Exception as err:  # noqa: BLE001  every failure reaches the person as one sentence
        raise UserFacingError(format_error(err)) from err


def _analyse(source, *, pair, pair_name, method, target, layer, alpha, name, unsure_prob, unsure_margin,
             faithfulness) -> Analysis:
    # (``cbam_viz.explain`` the module is shadowed by the re-exported function of the same name.)
    from cbam_viz import render
    from cbam_viz.explain import explain as explain_images

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if pair is None:
        pair = get_pair(pair_name)
    timings["load_pair"] = time.perf_counter() - t0
    info = describe_pair(pair)
    method, target, layer, alpha = _resolve_controls(info, method, target, layer, alpha)
    if name is None:
        name = Path(os.fspath(source)).name if isinstance(source, (str, os.PathLike)) else "image"

    t = time.perf_counter()
    if isinstance(source, Image.Image):
        original_size = source.size
    image = open_image(source, display_name=name)
    if not isinstance(source, Image.Image):
        original_size = _original_size(source, image)
    timings["open_image"] = time.perf_counter() - t

    t = time.perf_counter()
    with _lock_for(pair):
        timings["wait_for_model"] = time.perf_counter() - t
        t = time.perf_counter()
        (explanation,) = explain_images([image], pair, method=method, target=target, layer=layer)
        timings["explain"] = time.perf_counter() - t
        drops = None
        if faithfulness:
            # Under the lock too: a forward while another thread's hooks sit on the model would
            # feed that thread's recorder.
            from cbam_viz.localization import pair_confidence_drop

            t = time.perf_counter()
            drops = pair_confidence_drop(image, explanation, pair, fraction=FAITHFULNESS_FRACTION)
            timings["faithfulness"] = time.perf_counter() - t

    t = time.perf_counter()
    overlays = {
        "baseline": render.overlay(image, explanation.baseline.cam, alpha=alpha),
        "cbam": render.overlay(image, explanation.cbam.cam, alpha=alpha),
    }
    spatial = list(render.attention_gallery(image, explanation.cbam, alpha=alpha))
    channel = [(render.channel_attention_image(v, title=f"{block} channel"), f"{block} channel ({v.size} channels)")
               for block, v in explanation.cbam.channel_attention.items()]
    summary_strip = getattr(render, "channel_attention_summary", None)
    overview = summary_strip(explanation.cbam) if summary_strip is not None else None
    if overview is not None:
        channel.insert(0, (overview, CHANNEL_OVERVIEW_CAPTION))
    composite = render.composite(image, explanation, alpha=alpha)
    faithfulness_image = None
    if drops is not None:
        from cbam_viz.evaluate_cams import confidence_drop_figure

        faithfulness_image = confidence_drop_figure(drops, pair)
    timings["render"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    warnings = [*info.warnings, *_prediction_warnings(explanation, info, unsure_prob=unsure_prob,
                                                      unsure_margin=unsure_margin)]
    summary = _summary(name=name, image=image, original_size=original_size, explanation=explanation,
                       pair=pair, info=info, alpha=alpha, warnings=warnings, timings=timings)
    if drops is not None:
        summary["faithfulness"] = faithfulness_summary(drops)
    return Analysis(name=name, image=image, original_size=original_size, explanation=explanation,
                    pair_name=pair.name, alpha=alpha, overlays=overlays, spatial_gallery=spatial,
                    channel_gallery=channel, composite=composite, warnings=tuple(warnings),
                    timings=timings, summary=summary, faithfulness=drops, faithfulness_image=faithfulness_image)


_REMOVED = {"blur": "blurred away", "mean": "replaced by the mean colour", "road": "removed (ROAD imputation)"}


def faithfulness_summary(drops: dict[str, Any]) -> dict[str, Any]:
    """The JSON form of :func:`cbam_viz.localization.pair_confidence_drop`'s result."""
    any_drop = next(iter(drops.values()))
    out: dict[str, Any] = {"fraction": any_drop.fraction, "imputer": any_drop.imputer,
                           "meaning": "probability of the explained class before and after the top "
                                      f"{any_drop.fraction:.0%} of the model's own CAM is "
                                      f"{_REMOVED.get(any_drop.imputer, 'removed')}; "
                                      "a larger drop means the CAM marks what the model relies on"}
    for role, d in drops.items():
        out[role] = {"target": int(d.target), "prob_before": float(d.prob_before), "prob_after": float(d.prob_after),
                     "drop": float(d.drop), "relative_drop": float(d.relative_drop)}
    return out


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


def _original_size(source, image: Image.Image) -> tuple[int, int]:
    # The decoded size before our display downscale; cheap: PIL reads only the header.
    if max(image.size) < DISPLAY_MAX_SIDE:
        return image.size
    try:
        src = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        with Image.open(src) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1) if hasattr(im, "getexif") else 1
            return (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    except Exception:  # noqa: BLE001  informative only
        return image.size


def _model_summary(m, loaded) -> dict[str, Any]:
    return {
        "name": loaded.name,
        "arch": loaded.arch,
        "trained": bool(loaded.trained),
        "predictions": [{"index": int(p.index), "label": p.label, "prob": float(p.prob)} for p in m.predictions],
        "target": {"index": int(m.target), "label": m.target_label},
        "timings": {k: float(v) for k, v in m.timings.items()},
        "attention_blocks": list(m.spatial_attention),
    }


def _summary(*, name, image, original_size, explanation, pair, info, alpha, warnings, timings) -> dict[str, Any]:
    import torch

    from cbam_viz import __name__ as pkg

    try:
        from importlib.metadata import version

        pkg_version = version("cbam-viz")
    except Exception:  # noqa: BLE001  running from a checkout that is not installed
        pkg_version = "0.1.0"
    return {
        "image": {"name": name, "original_size": list(original_size), "analysed_size": list(image.size)},
        "pair": pair.name,
        "method": explanation.method,
        "layer": explanation.layer,
        "alpha": alpha,
        "models": {
            "baseline": _model_summary(explanation.baseline, pair.baseline),
            "cbam": _model_summary(explanation.cbam, pair.cbam),
        },
        "warnings": list(warnings),
        "timings": {k: float(v) for k, v in timings.items()},
        "metadata": {
            "package": pkg, "version": pkg_version, "torch": torch.__version__,
            "device": info.device, "classes": list(info.classes),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "paper": "https://arxiv.org/abs/1807.06521",
        },
    }


# --------------------------------------------------------------------------------------------
# Files: written atomically (temp file in the same folder + os.replace).

def _atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> Path:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _save_png(image: Image.Image, path: Path) -> Path:
    return _atomic_write(path, lambda f: image.save(f, format="PNG"))


def npz_arrays(explanation, image: Image.Image | None = None) -> dict[str, np.ndarray]:
    """The raw maps by key: ``baseline/cam``, ``cbam/cam``, ``cbam/channel/<block>``, ``cbam/spatial/<block>``."""
    arrays: dict[str, np.ndarray] = {}
    if image is not None:
        arrays["image"] = np.asarray(image, dtype=np.uint8)
    for role in ("baseline", "cbam"):
        m = getattr(explanation, role)
        arrays[f"{role}/cam"] = np.asarray(m.cam, dtype=np.float32)
        for block, v in m.channel_attention.items():
            arrays[f"{role}/channel/{block}"] = np.asarray(v, dtype=np.float32)
        for block, v in m.spatial_attention.items():
            arrays[f"{role}/spatial/{block}"] = np.asarray(v, dtype=np.float32)
    return arrays


def save(analysis: Analysis, out_dir: str | os.PathLike, *, stem: str | None = None,
         formats: Iterable[str] = ("png", "json", "npz")) -> dict[str, Path]:
    """Write the composite PNG, the JSON and/or the npz of one analysis; return their paths.

    Raises:
        OSError: the folder cannot be written (permissions, disk full...).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or safe_stem(analysis.name)
    formats = set(formats)
    paths: dict[str, Path] = {}
    if "png" in formats:
        paths["png"] = _save_png(analysis.composite, out_dir / f"{stem}.png")
    if "json" in formats:
        doc = json.dumps(analysis.summary, indent=2).encode() + b"\n"
        paths["json"] = _atomic_write(out_dir / f"{stem}.json", lambda f: f.write(doc))
    if "npz" in formats:
        arrays = npz_arrays(analysis.explanation, analysis.image)
        paths["npz"] = _atomic_write(out_dir / f"{stem}.npz", lambda f: np.savez_compressed(f, **arrays))
    return paths


def safe_stem(name: str) -> str:
    """A file-name stem safe on every OS, from an upload's name."""
    stem = Path(name).stem if name else "image"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "image"
    return stem[:80]


def check_controls(pair, *, method: str = "gradcam", target: str | int | None = None, layer: str | None = None,
                   alpha: float = 0.5) -> None:
    """Fail early, before any image, on a wrong method, target, layer or opacity.

    Raises:
        UserFacingError: naming the wrong value and the valid choices.
    """
    _resolve_controls(describe_pair(pair), method, target, layer, alpha)


def collect_images(inputs: Iterable[str | os.PathLike]) -> tuple[list[Path], list[str]]:
    """Files as given plus image files found (recursively, sorted) in folders; and the missing paths.

    A file given explicitly is kept whatever its suffix (it fails later with a clear reason if it
    is not an image); in folders only :data:`IMAGE_SUFFIXES` count.
    """
    found: list[Path] = []
    missing: list[str] = []
    seen: set[Path] = set()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            candidates = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                                and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.is_file():
            candidates = [path]
        else:
            missing.append(str(item))
            continue
        for p in candidates:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                found.append(p)
    return found, missing


def prepare_output_dir(path: str | os.PathLike) -> Path:
    """Create the output folder and prove it is writable (and not full) before any work.

    Raises:
        UserFacingError: it is a file, cannot be created, is read-only or the disk is full.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserFacingError(f"The output path {path} is a file, not a folder.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".cbam_viz_write_test.{uuid.uuid4().hex[:8]}"
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * 65536)  # a small real write: a full disk fails here, not after an hour
                f.flush()
                os.fsync(f.fileno())
        finally:
            probe.unlink(missing_ok=True)
    except OSError as err:
        import errno

        reason = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                  errno.EROFS: "the file system is read-only", errno.ENOSPC: "the disk is full",
                  errno.EDQUOT: "the disk quota is exceeded"}.get(err.errno, err.strerror or str(err))
        raise UserFacingError(f"Cannot write to the output folder {path}: {reason}.") from None
    return path


# --------------------------------------------------------------------------------------------
# Several images, for the app: one fresh folder per request.

@dataclass(frozen=True)
class ImageResult:
    """One explained image with every picture written to its request folder (for the UI)."""

    analysis: Analysis
    overlays: dict[str, Path]                  # "baseline" / "cbam"
    spatial_gallery: list[tuple[str, str]]     # (file path, caption)
    channel_gallery: list[tuple[str, str]]
    files: dict[str, Path]                     # "png" / "json" / "npz"
    faithfulness: Path | None = None           # the confidence-drop picture

    @property
    def name(self) -> str:
        return self.analysis.name


@dataclass(frozen=True)
class BatchResult:
    results: list[ImageResult]
    failures: list[tuple[str, str]]            # (file name, one-sentence reason)
    out_dir: Path
    archive: Path | None                       # zip of every file when more than one image


def new_request_dir(root: str | os.PathLike | None = None) -> Path:
    """A fresh, private folder for one request's files (old ones are cleaned up first)."""
    root = Path(root) if root is not None else OUTPUT_ROOT
    root.mkdir(parents=True, exist_ok=True)
    cleanup_outputs(root)
    return Path(tempfile.mkdtemp(prefix="req-", dir=root))


def cleanup_outputs(root: str | os.PathLike | None = None, *, max_age_s: float = OUTPUT_MAX_AGE_S) -> int:
    """Remove request folders older than ``max_age_s``; return how many were removed."""
    root = Path(root) if root is not None else OUTPUT_ROOT
    now = time.time()
    removed = 0
    try:
        entries = list(root.glob("req-*"))
    except OSError:
        return 0
    for d in entries:
        try:
            if d.is_dir() and now - d.stat().st_mtime > max_age_s:
                shutil.rmtree(d, ignore_errors=True)
                removed += 1
        except OSError:
            continue
    return removed


def _write_gallery(items: list[tuple[Image.Image, str]], folder: Path, prefix: str) -> list[tuple[str, str]]:
    out = []
    for i, (im, caption) in enumerate(items):
        out.append((str(_save_png(im, folder / f"{prefix}_{i:02d}.png")), caption))
    return out


def explain_files(
    sources: Sequence[str | os.PathLike],
    *,
    pair_name: str | None = None,
    method: str = "gradcam",
    target: str | int | None = None,
    layer: str | None = None,
    alpha: float = 0.5,
    names: Sequence[str | None] | None = None,
    out_root: str | os.PathLike | None = None,
    max_images: int = 16,
) -> BatchResult:
    """Explain each file and write every picture and download into one fresh request folder.

    A file that fails is listed in ``failures`` with its reason; the others go on. When every file
    fails (or a control is wrong), :class:`UserFacingError` is raised instead.

    Args:
        sources: image file paths.
        names: what to call each file in captions, messages and download names (e.g. the name
            it was uploaded under); default: each path's file name.
    """
    if names is None:
        names = [None] * len(sources)
    if len(names) != len(sources):
        raise ValueError(f"{len(names)} names for {len(sources)} sources")
    pairs = [(s, n) for s, n in zip(sources, names) if s]
    sources = [s for s, _ in pairs]
    names = [n for _, n in pairs]
    if not sources:
        raise UserFacingError("Please upload an image first (or pick an example).")
    if len(sources) > max_images:
        raise UserFacingError(f"Please upload at most {max_images} images at once (got {len(sources)}).")
    pair = get_pair(pair_name)
    info = describe_pair(pair)
    _resolve_controls(info, method, target, layer, alpha)  # a wrong control fails once, up front
    out_dir = new_request_dir(out_root)
    results: list[ImageResult] = []
    failures: list[tuple[str, str]] = []
    used: set[str] = set()
    for i, (source, name) in enumerate(zip(sources, names)):
        display = name or Path(os.fspath(source)).name
        try:
            analysis = analyse(source, pair=pair, method=method, target=target, layer=layer, alpha=alpha,
                               name=display)
            stem = unique_stem(safe_stem(display), used)
            folder = out_dir / f"{i:02d}_{stem}"
            folder.mkdir()
            t = time.perf_counter()
            files = save(analysis, folder, stem=stem)
            overlays = {role: _save_png(im, folder / f"cam_{role}.png") for role, im in analysis.overlays.items()}
            spatial = _write_gallery(analysis.spatial_gallery, folder, "spatial")
            channel = _write_gallery(analysis.channel_gallery, folder, "channel")
            faithful = (_save_png(analysis.faithfulness_image, folder / "faithfulness.png")
                        if analysis.faithfulness_image is not None else None)
            analysis.timings["write_files"] = time.perf_counter() - t
            results.append(ImageResult(analysis=analysis, overlays=overlays, spatial_gallery=spatial,
                                       channel_gallery=channel, files=files, faithfulness=faithful))
        except UserFacingError as err:
            failures.append((display, str(err)))
        except OSError as err:
            raise UserFacingError(f"The server could not write its output files: {_first_sentence(err)}") from err
    if not results:
        if len(failures) == 1:
            raise UserFacingError(failures[0][1])
        raise UserFacingError("None of the images could be explained: "
                              + "; ".join(f"{n}: {m.rstrip('.')}" for n, m in failures) + ".")
    archive = _zip_all(results, out_dir) if len(results) > 1 else None
    return BatchResult(results=results, failures=failures, out_dir=out_dir, archive=archive)


def unique_stem(stem: str, used: set[str]) -> str:
    """``stem``, or ``stem_2``, ``stem_3``... if already in ``used`` (which it is added to)."""
    candidate, k = stem, 1
    while candidate in used:
        k += 1
        candidate = f"{stem}_{k}"
    used.add(candidate)
    return candidate


def _zip_all(results: list[ImageResult], out_dir: Path) -> Path:
    def write(f):
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for r in results:
                for path in r.files.values():
                    z.write(path, arcname=path.name)
    return _atomic_write(out_dir / "cbam_viz_results.zip", write)
