"""What the app and the ``explain`` command call: explain + render + downloads, errors -> messages.

CBAM (Woo et al., ECCV 2018, arXiv 1807.06521) refines every residual block's features with a
channel gate and then a spatial gate. This module runs one photo (or many) through a baseline
ResNet and its CBAM twin (:mod:`cbam_viz.pair`), explains both with a CAM method
(:mod:`cbam_viz.explain`), measures how much each model needs what its CAM marks
(:mod:`cbam_viz.faithfulness`), renders the pictures (:mod:`cbam_viz.render`) and writes the
downloads (:mod:`cbam_viz.outputs`):

* ``composite.png``: the side-by-side picture;
* ``explanation.json``: predictions, CAM targets, warnings, timings and metadata;
* ``maps.npz``: the raw arrays (both CAMs, every CBAM block's channel and spatial attention).

A request draws and writes only what its caller shows (``pictures=`` and ``write=`` of
:func:`explain_files`): the page a few JPEGs and builds the composite when a person asks for
the downloads (:func:`build_downloads`, from the JSON and npz every request writes), the
``/explain`` API what it returns. Photo-like pictures are JPEG, charts PNG at a low zlib level;
request folders are temporary, so their files skip ``fsync`` (:func:`cbam_viz.outputs.atomic_write`).

It imports no Gradio. Every error a person can cause or fix becomes a
:class:`~cbam_viz.messages.UserFacingError` whose message is one plain sentence.

Concurrency: models come from :mod:`cbam_viz.pair`'s cache (loaded once, shared by every
request and by every pair naming the same record). CAM methods and the attention recorder put
hooks on the shared modules, so every forward holds its model's one lock
(:func:`cbam_viz.pair.model_lock`); :func:`analyse` holds both models' locks around the model
work only. Decoding, rendering and file writing run outside them, and each request writes into
its own fresh folder, so users never see each other's files.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any

from PIL import Image

from cbam_viz import ood, outputs, render, zerogpu
from cbam_viz.controls import AUTO_LAYER, AUTO_TARGET, block_names, check_controls, is_auto
from cbam_viz.explain import Explanation, ModelExplanation, Prediction, explain
from cbam_viz.faithfulness import pair_confidence_drop
from cbam_viz.messages import UserFacingError, classes_sentence, first_sentence, format_error
from cbam_viz.pair import load_pair, models_locked, pair_names, pair_unavailable_reason

__all__ = [
    "PairInfo", "Analysis", "ImageResult", "BatchResult", "UNSURE_PROB", "UNSURE_MARGIN", "DISPLAY_MAX_SIDE",
    "FAITHFULNESS_FRACTION", "CHANNEL_OVERVIEW_CAPTION", "IMAGE_SUFFIXES", "get_pair", "describe_pair",
    "warm_up", "open_image", "analyse", "save", "explain_files", "collect_images", "faithfulness_summary",
    "PICTURES", "ALL_PICTURES", "PAGE_PICTURES", "API_PICTURES", "ALL_FILES", "PAGE_FILES", "API_FILES",
    "SavedResult", "load_result", "build_downloads", "spatial_at", "ablate_result", "is_slow_method",
]

log = logging.getLogger(__name__)

#: A top-1 probability below this flags the prediction as unsure.
UNSURE_PROB = 0.5
#: A gap between the first and second probability below this flags it as unsure too.
UNSURE_MARGIN = 0.15
#: Longest side of the picture we explain and render. The models see a 224-ish square anyway
#: (:func:`cbam_viz.preprocess.to_model_tensor`); a 40-megapixel overlay would only cost time.
DISPLAY_MAX_SIDE = 1024
#: Caption of the channel-attention picture that stacks every block's strip.
CHANNEL_OVERVIEW_CAPTION = "every block's channel attention"
#: Share of the image blurred away (the top of each model's CAM) for the per-image faithfulness.
FAITHFULNESS_FRACTION = 0.2
#: Every picture :func:`analyse` can draw:
#: ``overlays`` both CAM overlays; ``spatial`` one overlay per CBAM block; ``spatial_sheet`` all of
#: them in one picture; ``channel`` one bar strip per block; ``channel_overview`` every strip in one
#: picture; ``composite`` the side-by-side figure; ``faithfulness`` the confidence-drop panel.
PICTURES = ("overlays", "spatial", "spatial_sheet", "channel", "channel_overview", "composite", "faithfulness")
#: What the library and the CLI draw by default (every picture but the page's sheet).
ALL_PICTURES = frozenset(PICTURES) - {"spatial_sheet"}
#: What the Explain button shows (the channel attention is an interactive plot of the arrays).
PAGE_PICTURES = frozenset({"overlays", "spatial_sheet", "faithfulness"})
#: What ``/explain`` returns: both overlays, every block's spatial overlay, the channel overview, the composite.
API_PICTURES = frozenset({"overlays", "spatial", "channel_overview", "composite"})
#: What a request can write into its folder: ``photo`` the analysed photo, ``pictures`` every
#: picture drawn, ``composite`` the composite PNG, ``json`` and ``npz`` the downloads.
ALL_FILES = frozenset({"photo", "pictures", "composite", "json", "npz"})
#: The page: the composite waits for the downloads button (:func:`build_downloads`).
PAGE_FILES = frozenset({"photo", "pictures", "json", "npz"})
#: ``/explain``: everything it returns, as files.
API_FILES = frozenset({"pictures", "composite", "json", "npz"})
#: File suffixes treated as images when a folder is given.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})


# --------------------------------------------------------------------------------------- pairs

def get_pair(name: str | None = None):
    """The :class:`cbam_viz.pair.ModelPair` called ``name`` (None: the first of :func:`pair_names`).

    Its models come from :mod:`cbam_viz.pair`'s cache: loaded once, not per request.

    Raises:
        UserFacingError: unknown pair, missing or corrupted weights file.
    """
    name = name or pair_names()[0]
    reason = pair_unavailable_reason(name)
    if reason:  # a file this machine lacks: expected, said as it is, not logged as a failure
        raise UserFacingError(reason)
    try:
        return load_pair(name)
    except KeyError as err:
        known = ", ".join(pair_names())
        raise UserFacingError(f"There is no model pair called {name!r} (known pairs: {known}).") from err
    except Exception as err:  # noqa: BLE001  checksum, missing file, strict-load mismatch
        log.exception("loading pair %r failed", name)
        raise UserFacingError(f"The model pair could not be loaded: {first_sentence(err)}") from err


def warm_up(pair_name: str | None = None) -> float:
    """Load the pair and run one small explanation, so the first person does not wait.

    The first explanation in a process pays for lazy imports (pytorch-grad-cam pulls in scipy and
    scikit-learn: several seconds on a small CPU) and first-call allocations. Returns the seconds
    it took; failures are logged, never raised (the app must start anyway).
    """
    t = time.perf_counter()
    try:
        analyse(Image.new("RGB", (64, 64), (128, 128, 128)), pair_name=pair_name, name="warm-up")
    except UserFacingError as err:  # already said once (get_pair logs a failed load with its traceback)
        log.warning("warm-up skipped: %s", err)
    except Exception:  # noqa: BLE001
        log.exception("warm-up failed (the app still serves)")
    return time.perf_counter() - t


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
    warnings = [_untrained_warning(role, m) for role, m in (("baseline", pair.baseline), ("CBAM", pair.cbam))
                if not m.trained]
    if tuple(pair.baseline.classes) != tuple(pair.cbam.classes):
        warnings.append("The two models of this pair were trained on different class lists; "
                        "their predictions cannot be compared directly.")
    return PairInfo(
        name=pair.name, classes=tuple(pair.cbam.classes), layers=layers,
        default_layer=layers[-1] if layers else "", baseline_name=pair.baseline.name,
        cbam_name=pair.cbam.name, baseline_trained=bool(pair.baseline.trained),
        cbam_trained=bool(pair.cbam.trained), device=str(pair.cbam.device), warnings=tuple(warnings),
    )


# ------------------------------------------------------------------ one image, in memory

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
        message = first_sentence(err)
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
    """One image explained and rendered, in memory (nothing written yet). Never changed once built:
    :meth:`with_timing` returns a new one, whose :attr:`summary` has the new timing too."""

    name: str                                  # the source's file name, for captions and files
    image: Image.Image                         # the RGB picture that was explained
    original_size: tuple[int, int]            # (W, H) before downscaling for display
    explanation: Any                           # cbam_viz.explain.Explanation
    pair_name: str
    alpha: float
    # The pictures (see PICTURES); one not asked for is empty / None.
    overlays: dict[str, Image.Image]           # "baseline" / "cbam" -> CAM overlay
    spatial_gallery: list[tuple[Image.Image, str]]   # every CBAM block's spatial attention
    channel_gallery: list[tuple[Image.Image, str]]   # every CBAM block's channel attention (overview first)
    composite: Image.Image | None
    warnings: tuple[str, ...]
    timings: Mapping[str, float]               # seconds per step, read-only
    summary: dict[str, Any] = field(repr=False)  # the JSON document; its "timings" are `timings`
    faithfulness: dict[str, Any] | None = None  # "baseline" / "cbam" -> faithfulness.ConfidenceDrop
    faithfulness_image: Image.Image | None = None
    spatial_sheet: Image.Image | None = None   # every block's spatial attention in one picture

    def labels(self, role: str) -> dict[str, float]:
        """``{label: probability}`` of one model's top-k (what a ``gr.Label`` shows)."""
        return {p.label: float(p.prob) for p in getattr(self.explanation, role).predictions}

    def with_timing(self, step: str, seconds: float) -> Analysis:
        """This analysis with one more timing, in :attr:`timings` and in the JSON alike."""
        timings = MappingProxyType({**self.timings, step: float(seconds)})
        return dataclasses.replace(self, timings=timings, summary={**self.summary, "timings": dict(timings)})


def _prediction_warnings(explanation, info: PairInfo, *, unsure_prob: float, unsure_margin: float) -> list[str]:
    trained = {"baseline": info.baseline_trained, "CBAM": info.cbam_trained}  # untrained: already warned
    out = ood.warning({t: getattr(explanation, r).out_of_distribution for r, t in (("baseline", "baseline"),
                       ("cbam", "CBAM")) if trained[t]}, classes_sentence(info.classes))
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
    pictures: Iterable[str] = ALL_PICTURES,
) -> Analysis:
    """Explain one image with both models and render its pictures, in memory.

    Args:
        source: a path, the file's bytes or a PIL image.
        pair: a loaded :class:`cbam_viz.pair.ModelPair`; default: :func:`get_pair` (``pair_name``).
        method, target, layer, alpha: the controls, as :mod:`cbam_viz.controls` accepts them
            (target: None or auto, a class name, WordNet id or index; layer: a block name).
        name: shown in captions and written in the JSON; default: the file's name.
        faithfulness: also measure each model's confidence drop when the top
            :data:`FAITHFULNESS_FRACTION` of its own CAM is blurred away (two more forwards): a
            user's photo has no boxes, so this is how the app tells which CAM found what the
            model actually uses.
        pictures: which pictures to draw (names of :data:`PICTURES`; default :data:`ALL_PICTURES`).

    Raises:
        UserFacingError: for every failure, with a one-sentence message.
        ValueError: an unknown picture name (a programming error, not a person's).
    """
    pictures = frozenset(pictures)
    if unknown := pictures - set(PICTURES):
        raise ValueError(f"unknown pictures {sorted(unknown)}; choose from {', '.join(PICTURES)}")
    try:
        return _analyse(source, pair=pair, pair_name=pair_name, method=method, target=target, layer=layer,
                        alpha=alpha, name=name, unsure_prob=unsure_prob, unsure_margin=unsure_margin,
                        faithfulness=faithfulness, pictures=pictures)
    except UserFacingError:
        raise
    except Exception as err:  # noqa: BLE001  every failure reaches the person as one sentence
        raise UserFacingError(format_error(err)) from err


@zerogpu.gpu
def _model_work(image: Image.Image, pair, *, method: str, target, layer: str | None,
                faithfulness: bool) -> tuple[Explanation, dict | None, dict[str, float]]:
    """Every forward of one request, on each model's one lock: the explanation, then the faithfulness.

    The function of a request that needs the accelerator: on a Hugging Face ZeroGPU Space it
    runs with a GPU attached (:func:`cbam_viz.zerogpu.gpu`), a plain call elsewhere. ``pair``: the
    name of a pair :func:`get_pair` serves, or a caller's own :class:`~cbam_viz.pair.ModelPair`. On a
    ZeroGPU Space the arguments are pickled into a GPU worker process: models passed there would
    arrive as CPU copies, while a name makes the worker take the models of its own (forked) cache,
    which ``spaces`` has placed on the GPU. It returns numpy arrays and CPU tensors only, which
    can leave a GPU worker process.
    """
    if isinstance(pair, str):
        pair = get_pair(pair)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    # The explanation and its faithfulness forwards back to back on each model's one lock (which
    # explain and faithfulness take again inside: it is re-entrant).
    with models_locked(pair.baseline.model, pair.cbam.model):
        timings["wait_for_model"] = time.perf_counter() - t
        t = time.perf_counter()
        (explanation,) = explain([image], pair, method=method, target=target, layer=layer)
        timings["explain"] = time.perf_counter() - t
        drops = None
        if faithfulness:
            t = time.perf_counter()
            drops = pair_confidence_drop(image, explanation, pair, fraction=FAITHFULNESS_FRACTION)
            drops = {role: dataclasses.replace(d, perturbed=d.perturbed.detach().cpu()) for role, d in drops.items()}
            timings["faithfulness"] = time.perf_counter() - t
    return explanation, drops, timings


def _draw(image: Image.Image, explanation, drops, pair, *, alpha: float, pictures: frozenset[str]) -> dict[str, Any]:
    """The pictures asked for, as the :class:`Analysis` fields that hold them."""
    cbam = explanation.cbam
    out: dict[str, Any] = {
        "overlays": ({role: render.overlay(image, getattr(explanation, role).cam, alpha=alpha)
                      for role in ("baseline", "cbam")} if "overlays" in pictures else {}),
        "spatial_gallery": list(render.attention_gallery(image, cbam, alpha=alpha)) if "spatial" in pictures else [],
        "spatial_sheet": render.attention_sheet(image, cbam, alpha=alpha) if "spatial_sheet" in pictures else None,
        "composite": render.composite(image, explanation, alpha=alpha) if "composite" in pictures else None,
        "faithfulness_image": (render.confidence_drop_figure(drops, pair)
                               if drops is not None and "faithfulness" in pictures else None),
    }
    channel = ([(render.channel_attention_image(v, title=f"{block} channel"), f"{block} channel ({v.size} channels)")
                for block, v in cbam.channel_attention.items()] if "channel" in pictures else [])
    overview = render.channel_attention_summary(cbam) if "channel_overview" in pictures else None
    if overview is not None:
        channel.insert(0, (overview, CHANNEL_OVERVIEW_CAPTION))
    out["channel_gallery"] = channel
    return out


def _analyse(source, *, pair, pair_name, method, target, layer, alpha, name, unsure_prob, unsure_margin,
             faithfulness, pictures) -> Analysis:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    served = pair is None  # a pair get_pair serves goes to a GPU worker by name (see _model_work)
    if served:
        pair = get_pair(pair_name)
    timings["load_pair"] = time.perf_counter() - t0
    info = describe_pair(pair)
    controls = check_controls(pair, method=method, target=target, layer=layer, alpha=alpha)
    if name is None:
        name = Path(os.fspath(source)).name if isinstance(source, (str, os.PathLike)) else "image"

    t = time.perf_counter()
    image = open_image(source, display_name=name)
    original_size = source.size if isinstance(source, Image.Image) else _original_size(source, image)
    timings["open_image"] = time.perf_counter() - t

    explanation, drops, model_timings = _model_work(image, pair.name if served else pair, method=controls.method,
                                                    target=controls.target, layer=controls.layer,
                                                    faithfulness=faithfulness)
    timings.update(model_timings)

    t = time.perf_counter()
    alpha = controls.alpha
    drawn = _draw(image, explanation, drops, pair, alpha=alpha, pictures=pictures)
    timings["render"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    warnings = [*info.warnings, *_prediction_warnings(explanation, info, unsure_prob=unsure_prob,
                                                      unsure_margin=unsure_margin)]
    summary = _summary(name=name, image=image, original_size=original_size, explanation=explanation,
                       pair=pair, info=info, alpha=alpha, warnings=warnings, timings=timings)
    # What was asked for (auto: each model explains its own prediction), so a shared link can reopen
    # the page with the controls that made this result.
    asked = controls.cbam_target
    summary["target_request"] = None if asked is None else {"index": asked, "label": pair.cbam.classes[asked]}
    summary["layer_request"] = None if is_auto(layer, AUTO_LAYER) else controls.layer  # None: the last block
    if drops is not None:
        summary["faithfulness"] = faithfulness_summary(drops)
    return Analysis(name=name, image=image, original_size=original_size, explanation=explanation,
                    pair_name=pair.name, alpha=alpha, warnings=tuple(warnings), timings=MappingProxyType(timings),
                    summary=summary, faithfulness=drops, **drawn)


_REMOVED = {"blur": "blurred away", "mean": "replaced by the mean colour", "road": "removed (ROAD imputation)"}


def faithfulness_summary(drops: dict[str, Any]) -> dict[str, Any]:
    """The JSON form of :func:`cbam_viz.faithfulness.pair_confidence_drop`'s result."""
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


def _original_size(source, image: Image.Image) -> tuple[int, int]:
    # The decoded size before our display downscale; cheap: PIL reads only the header.
    if max(image.size) < DISPLAY_MAX_SIDE:
        return image.size
    try:
        src = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        with Image.open(src) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
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
        "out_of_distribution": m.out_of_distribution,  # cbam_viz.ood.assess: score, threshold, flagged
    }


def _summary(*, name, image, original_size, explanation, pair, info, alpha, warnings, timings) -> dict[str, Any]:
    import torch

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
            "package": "cbam_viz", "version": pkg_version, "torch": torch.__version__,
            "device": info.device, "classes": list(info.classes),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "paper": "https://arxiv.org/abs/1807.06521",
        },
    }


# ---------------------------------------------------------------------------- files

def save(analysis: Analysis, out_dir: str | os.PathLike, *, stem: str | None = None,
         formats: Iterable[str] = ("png", "json", "npz")) -> dict[str, Path]:
    """Write the composite PNG, the JSON and/or the npz of one analysis (atomically); return their paths.

    The composite is drawn here if the analysis did not draw it. These are files a person keeps:
    written durably (``fsync``), the PNG and the npz compressed.

    Raises:
        OSError: the folder cannot be written (permissions, disk full...).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or outputs.safe_stem(analysis.name)
    formats = set(formats)
    paths: dict[str, Path] = {}
    if "png" in formats:
        paths["png"] = outputs.write_png(_composite(analysis), out_dir / f"{stem}.png")
    if "json" in formats:
        paths["json"] = outputs.write_json(analysis.summary, out_dir / f"{stem}.json")
    if "npz" in formats:
        paths["npz"] = outputs.write_npz(outputs.npz_arrays(analysis.explanation, analysis.image),
                                         out_dir / f"{stem}.npz")
    return paths


def _composite(analysis: Analysis) -> Image.Image:
    if analysis.composite is not None:
        return analysis.composite
    return render.composite(analysis.image, analysis.explanation, alpha=analysis.alpha)


def collect_images(inputs: Iterable[str | os.PathLike]) -> tuple[list[Path], list[str]]:
    """Files as given plus image files found (recursively, sorted) in folders; and the missing paths.

    A file given explicitly is kept whatever its suffix (it fails later with a clear reason if it
    is not an image); in folders only :data:`IMAGE_SUFFIXES` count, hidden files and folders not.
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
            if (key := p.resolve()) not in seen:
                seen.add(key)
                found.append(p)
    return found, missing


@dataclass(frozen=True)
class ImageResult:
    """One explained image with its pictures written to its own folder of the request (for the UI).

    What is there depends on the request's ``write=`` (see :func:`explain_files`): a picture that
    was not drawn or written is absent (an empty dict or list, None).
    """

    analysis: Analysis                         # its JSON (``files["json"]``) is ``analysis.summary``
    overlays: dict[str, Path]                  # "baseline" / "cbam"
    spatial_gallery: list[tuple[str, str]]     # (file path, caption)
    channel_gallery: list[tuple[str, str]]
    files: dict[str, Path]                     # "png" (the composite) / "json" / "npz", as written
    faithfulness: Path | None = None           # the confidence-drop picture
    photo: Path | None = None                  # the analysed photo (what the overlays are drawn on)
    spatial_sheet: Path | None = None          # every block's spatial attention in one picture
    result_id: str = ""                        # names the folder: see cbam_viz.outputs.result_dir

    @property
    def name(self) -> str:
        return self.analysis.name


@dataclass(frozen=True)
class BatchResult:
    results: list[ImageResult]
    failures: list[tuple[str, str]]            # (file name, one-sentence reason)
    out_dir: Path
    archive: Path | None                       # zip of every file when more than one image (if written)


# Request folders are temporary (removed after OUTPUT_MAX_AGE_S): atomic, not durable.
def _jpeg(image: Image.Image, path: Path) -> Path:
    return outputs.write_jpeg(image, path, durable=False)


def _png(image: Image.Image, path: Path) -> Path:
    return outputs.write_png(image, path, compress_level=outputs.PNG_FAST, durable=False)


def _write_result(analysis: Analysis, folder: Path, stem: str, write: frozenset[str]) -> ImageResult:
    """The files ``write`` asks for; the JSON last, so that it holds the ``write_files`` time.

    Photo-like pictures (the photo, overlays, attention tiles) are JPEG; charts and figures with
    text (channel strips, the faithfulness panel, the composite) PNG at a low zlib level.
    """
    t = time.perf_counter()
    files: dict[str, Path] = {}
    overlays: dict[str, Path] = {}
    spatial: list[tuple[str, str]] = []
    channel: list[tuple[str, str]] = []
    faithful = photo = sheet = None
    if "photo" in write:
        photo = _jpeg(analysis.image, folder / "photo.jpg")
    if "pictures" in write:
        overlays = {role: _jpeg(im, folder / f"cam_{role}.jpg") for role, im in analysis.overlays.items()}
        spatial = [(str(_jpeg(im, folder / f"spatial_{i:02d}.jpg")), caption)
                   for i, (im, caption) in enumerate(analysis.spatial_gallery)]
        channel = [(str(_png(im, folder / f"channel_{i:02d}.png")), caption)
                   for i, (im, caption) in enumerate(analysis.channel_gallery)]
        if analysis.spatial_sheet is not None:
            sheet = _jpeg(analysis.spatial_sheet, folder / "spatial_sheet.jpg")
        if analysis.faithfulness_image is not None:
            faithful = _png(analysis.faithfulness_image, folder / "faithfulness.png")
    if "composite" in write:
        files["png"] = _png(_composite(analysis), folder / f"{stem}.png")
    if "npz" in write:
        # Uncompressed: ~1 ms instead of ~80 ms; np.load reads it the same. build_downloads reads it.
        files["npz"] = outputs.write_npz(outputs.npz_arrays(analysis.explanation, analysis.image),
                                         folder / f"{stem}.npz", compress=False, durable=False)
    analysis = analysis.with_timing("write_files", time.perf_counter() - t)
    if "json" in write:
        files["json"] = outputs.write_json(analysis.summary, folder / f"{stem}.json", durable=False)
    files = {k: files[k] for k in ("png", "json", "npz") if k in files}
    return ImageResult(analysis=analysis, overlays=overlays, spatial_gallery=spatial, channel_gallery=channel,
                       files=files, faithfulness=faithful, photo=photo, spatial_sheet=sheet,
                       result_id=f"{folder.parent.name}/{folder.name}")


def is_slow_method(method: str) -> bool:
    """True for the CAM methods that run many passes (Score-CAM, Ablation-CAM, ...): worth a progress bar."""
    from cbam_viz.cam import method_kind

    try:
        return method_kind(method) == "library"
    except ValueError:
        return False


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
    pictures: Iterable[str] = ALL_PICTURES,
    write: Iterable[str] = ALL_FILES,
    progress: Callable[[float, str], object] | None = None,
) -> BatchResult:
    """Explain each file and write its pictures and downloads into one fresh request folder.

    A file that fails is listed in ``failures`` with its reason; the others go on. When every file
    fails (or a control is wrong), :class:`UserFacingError` is raised instead.

    Args:
        sources: image file paths.
        names: what to call each file in captions, messages and download names (e.g. the name
            it was uploaded under); default: each path's file name.
        out_root: where the request folder is made (default :data:`cbam_viz.outputs.OUTPUT_ROOT`).
        pictures: what to draw (:data:`PICTURES`; the page: :data:`PAGE_PICTURES`, ``/explain``:
            :data:`API_PICTURES`).
        write: what to write (:data:`ALL_FILES`; the page: :data:`PAGE_FILES`, ``/explain``:
            :data:`API_FILES`). The zip of a batch is written when the composite is.
        progress: called as ``progress(fraction_done, description)`` before each image's steps
            (e.g. a ``gr.Progress``); its errors are not caught.
    """
    if names is None:
        names = [None] * len(sources)
    if len(names) != len(sources):
        raise ValueError(f"{len(names)} names for {len(sources)} sources")
    pictures, write = frozenset(pictures), frozenset(write)
    if unknown := write - ALL_FILES:
        raise ValueError(f"unknown files {sorted(unknown)}; choose from {', '.join(sorted(ALL_FILES))}")
    given = [(s, n) for s, n in zip(sources, names) if s]
    if not given:
        raise UserFacingError("Please upload an image first (or pick an example).")
    if len(given) > max_images:
        raise UserFacingError(f"Please upload at most {max_images} images at once (got {len(given)}).")
    pair = get_pair(pair_name)
    controls = check_controls(pair, method=method, target=target, layer=layer, alpha=alpha)  # fails once, up front
    out_dir = outputs.new_request_dir(out_root)
    results: list[ImageResult] = []
    failures: list[tuple[str, str]] = []
    used: set[str] = set()
    n = len(given)
    for i, (source, name) in enumerate(given):
        display = name or Path(os.fspath(source)).name
        if progress is not None:
            what = f"{controls.method}, both models" + (" (many passes)" if is_slow_method(controls.method) else "")
            progress(i / n, f"image {i + 1} of {n}: {display}: {what}")
        try:
            # The pair by name and the controls as asked (auto stays auto in the result's JSON).
            analysis = analyse(source, pair_name=pair.name, method=controls.method, target=target, layer=layer,
                               alpha=controls.alpha, name=display, pictures=pictures)
            if progress is not None:
                progress((i + 0.9) / n, f"image {i + 1} of {n}: {display}: writing the pictures")
            stem = outputs.unique_stem(outputs.safe_stem(display), used)
            folder = out_dir / f"{i:02d}_{stem}"
            folder.mkdir()
            results.append(_write_result(analysis, folder, stem, write))
        except UserFacingError as err:
            failures.append((display, str(err)))
        except OSError as err:
            raise UserFacingError(f"The server could not write its output files: {first_sentence(err)}") from err
    if not results:
        if len(failures) == 1:
            raise UserFacingError(failures[0][1])
        raise UserFacingError("None of the images could be explained: "
                              + "; ".join(f"{n}: {m.rstrip('.')}" for n, m in failures) + ".")
    archive = None
    if len(results) > 1 and "composite" in write:
        archive = outputs.write_zip((p for r in results for p in r.files.values()), out_dir / "cbam_viz_results.zip",
                                    durable=False)
    return BatchResult(results=results, failures=failures, out_dir=out_dir, archive=archive)


# ------------------------------------------------------------ a written result, read back

@dataclass(frozen=True)
class SavedResult:
    """One image's result as its folder holds it: the JSON document and the raw arrays of the npz."""

    result_id: str
    folder: Path
    stem: str
    summary: dict[str, Any]
    json_path: Path
    npz_path: Path

    def arrays(self, prefix: str = "") -> dict[str, Any]:
        """The npz's arrays whose key starts with ``prefix`` (``"cbam/spatial/"``; "" for all)."""
        import numpy as np

        with np.load(self.npz_path) as z:
            return {k: z[k] for k in z.files if k.startswith(prefix)}

    @property
    def image(self) -> Image.Image:
        """The analysed RGB photo (what the CAMs and attention maps were computed on)."""
        return Image.fromarray(self.arrays("image")["image"], "RGB")

    def explanation(self) -> Explanation:
        """The :class:`~cbam_viz.explain.Explanation` again, from the JSON and the npz (for drawing)."""
        arrays = self.arrays()

        def model(role: str) -> ModelExplanation:
            m = self.summary["models"][role]
            return ModelExplanation(
                model_name=m["name"], predictions=tuple(Prediction(**p) for p in m["predictions"]),
                target=int(m["target"]["index"]), target_label=m["target"]["label"], cam=arrays[f"{role}/cam"],
                channel_attention={k.rsplit("/", 1)[1]: v for k, v in arrays.items()
                                   if k.startswith(f"{role}/channel/")},
                spatial_attention={k.rsplit("/", 1)[1]: v for k, v in arrays.items()
                                   if k.startswith(f"{role}/spatial/")},
                timings=dict(m["timings"]))

        size = self.summary["image"]["analysed_size"]
        return Explanation(image_size=(int(size[0]), int(size[1])), method=self.summary["method"],
                           layer=self.summary["layer"], baseline=model("baseline"), cbam=model("cbam"))


def load_result(result_id: str, *, root: str | os.PathLike | None = None) -> SavedResult:
    """The result :func:`explain_files` wrote under ``result_id`` (:attr:`ImageResult.result_id`).

    Raises:
        UserFacingError: a malformed id, results that are gone, or a folder without its JSON and npz.
    """
    folder = outputs.result_dir(result_id, root)
    stem = folder.name.split("_", 1)[1]  # "00_<stem>" (three digits from the 101st image)
    json_path, npz_path = folder / f"{stem}.json", folder / f"{stem}.npz"
    try:
        summary = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserFacingError("These results are incomplete on the server; press Explain again.") from err
    if not npz_path.is_file():
        raise UserFacingError("These results are incomplete on the server; press Explain again.")
    return SavedResult(result_id=result_id, folder=folder, stem=stem, summary=summary, json_path=json_path,
                       npz_path=npz_path)


def build_downloads(result_ids: Sequence[str], *, root: str | os.PathLike | None = None) -> list[Path]:
    """The downloads of written results, built on demand: per image the composite PNG, its JSON and
    npz, and for several images one zip of them all (built once; a second call returns the files).

    Raises:
        UserFacingError: no results, or results that are gone.
    """
    if not result_ids:
        raise UserFacingError("Explain an image first.")
    saved = [load_result(r, root=root) for r in result_ids]
    files: list[Path] = []
    for s in saved:
        png = s.folder / f"{s.stem}.png"
        if not png.is_file():
            composite = render.composite(s.image, s.explanation(), alpha=float(s.summary.get("alpha", 0.5)))
            outputs.write_png(composite, png, durable=False)
        files += [png, s.json_path, s.npz_path]
    if len(saved) > 1:
        archive = saved[0].folder.parent / "cbam_viz_results.zip"
        if not archive.is_file():
            outputs.write_zip(files, archive, durable=False)
        files.append(archive)
    return files


def spatial_at(result_id: str, x: float, y: float, *, root: str | os.PathLike | None = None
               ) -> list[tuple[str, float]]:
    """Every CBAM block's spatial-attention value at pixel ``(x, y)`` of the analysed photo.

    Each block's map covers the whole photo (the model sees it resized), so the point falls in cell
    ``(floor(y * h / H), floor(x * w / W))`` of an ``h x w`` map; that cell's gate value is returned.

    Returns:
        ``[(block, value)]`` in forward order.

    Raises:
        UserFacingError: a point outside the photo, or results that are gone.
    """
    saved = load_result(result_id, root=root)
    width, height = saved.summary["image"]["analysed_size"]
    if not (0 <= x < width and 0 <= y < height):
        raise UserFacingError(f"Click inside the photo ({width}x{height} pixels).")
    out = []
    for key, m in saved.arrays("cbam/spatial/").items():
        h, w = m.shape
        out.append((key.rsplit("/", 1)[1], float(m[min(h - 1, int(y * h / height)), min(w - 1, int(x * w / width))])))
    return out


def ablate_result(result_id: str, *, constant: str = "one", root: str | os.PathLike | None = None
                  ) -> list[dict[str, Any]]:
    """Is this attention used? Gate ablation of the CBAM model on a written result's photo.

    Each block's channel gate, spatial gate or both set to ``constant`` (and all blocks at once):
    the change of the top-1 probability and the CAM's correlation with the intact model's, from
    :func:`cbam_viz.research.gate_ablation.ablate_image` (about 25 forwards; it holds the model's lock).

    Raises:
        UserFacingError: results that are gone, or a pair that no longer loads.
    """
    saved = load_result(result_id, root=root)
    pair = get_pair(saved.summary["pair"])
    try:
        return _ablation_work(pair.name, saved.image, constant=constant, layer=saved.summary.get("layer"))
    except UserFacingError:
        raise
    except Exception as err:  # noqa: BLE001  one sentence for the person
        raise UserFacingError(format_error(err)) from err


@zerogpu.gpu
def _ablation_work(pair, image: Image.Image, *, constant: str, layer: str | None) -> list[dict[str, Any]]:
    """The ablation's forwards, with a GPU attached on a ZeroGPU Space, as :func:`_model_work`."""
    from cbam_viz.research.gate_ablation import ablate_image

    if isinstance(pair, str):
        pair = get_pair(pair)
    return ablate_image(pair.cbam, image, constant=constant, layer=layer)
