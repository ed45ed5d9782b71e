"""One photo through a lineup, in memory: explain every member, measure faithfulness, draw what is asked.

CBAM (Woo et al., ECCV 2018, arXiv 1807.06521) refines every residual block's features with a
channel gate and then a spatial gate; SE-Net has the channel gate only, BAM gates at the stage
transitions. :func:`analyse` runs one photo through every member of a lineup
(:mod:`cbam_viz.engine.explain`), measures how much each model needs what its CAM marks
(:mod:`cbam_viz.engine.faithfulness`) and draws the pictures asked for (:mod:`cbam_viz.render`,
:mod:`cbam_viz.figures`). Nothing is written here (:mod:`cbam_viz.service.files` does that).

Concurrency: CAM methods and the attention recorder put hooks on the shared modules, so every
forward holds its model's one lock (:mod:`cbam_viz.engine.locks`); :func:`analyse` holds every
member's lock around the model work only. Decoding and drawing run outside them.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from PIL import Image

from cbam_viz import figures, render, zerogpu
from cbam_viz.engine import ood
from cbam_viz.engine.controls import Controls, check_controls
from cbam_viz.engine.explain import Explanation, explain_checked
from cbam_viz.engine.faithfulness import lineup_confidence_drop
from cbam_viz.engine.locks import models_locked
from cbam_viz.engine.preprocess import ImageError, open_image as _open, to_rgb
from cbam_viz.messages import UserFacingError, classes_sentence, first_sentence, format_error
from cbam_viz.service import access
from cbam_viz.service.summary import summary as summary_document

__all__ = [
    "Analysis", "UNSURE_PROB", "UNSURE_MARGIN", "DISPLAY_MAX_SIDE", "FAITHFULNESS_FRACTION", "PICTURES",
    "ALL_PICTURES", "PAGE_PICTURES", "API_PICTURES", "open_image", "analyse", "analyse_checked", "warm_up",
]

log = logging.getLogger(__name__)

#: A top-1 probability below this flags the prediction as unsure.
UNSURE_PROB = 0.5
#: A gap between the first and second probability below this flags it as unsure too.
UNSURE_MARGIN = 0.15
#: Longest side of the picture we explain and render. The models see a 224-ish square anyway
#: (:func:`cbam_viz.engine.preprocess.to_model_tensor`); a 40-megapixel overlay would only cost time.
DISPLAY_MAX_SIDE = 1024
#: Share of the image blurred away (the top of each model's CAM) for the per-image faithfulness.
FAITHFULNESS_FRACTION = 0.2
#: Every picture :func:`analyse` can draw: ``overlays`` one CAM overlay per member; ``spatial_sheet``
#: every spatial gate of a gated member in one picture; ``channel_overview`` every channel gate of
#: a gated member as one strip picture; ``composite`` the side-by-side figure; ``faithfulness`` the
#: confidence-drop panel.
PICTURES = ("overlays", "spatial_sheet", "channel_overview", "composite", "faithfulness")
#: What the library and the CLI draw by default.
ALL_PICTURES = frozenset(PICTURES)
#: What the Explain button shows (the channel attention is an interactive plot of the arrays).
PAGE_PICTURES = frozenset({"overlays", "spatial_sheet", "faithfulness"})
#: What ``/explain`` returns: the overlays, the gated members' sheets and channel overviews.
API_PICTURES = frozenset({"overlays", "spatial_sheet", "channel_overview"})


def open_image(source: str | os.PathLike | bytes | Image.Image, *, display_name: str | None = None) -> Image.Image:
    """Any upload -> an RGB image whose longest side is at most :data:`DISPLAY_MAX_SIDE`.

    Messages name the file ``display_name`` (default: its file name), never its server path.

    Raises:
        UserFacingError: not an image, damaged, empty or too large (see :mod:`cbam_viz.engine.preprocess`).
    """
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
    explanation: Explanation
    lineup_name: str
    alpha: float
    # The pictures (see PICTURES), by member name; one not asked for is empty / None.
    overlays: dict[str, Image.Image]           # every member's CAM overlay
    spatial_sheets: dict[str, Image.Image]     # gated members with spatial maps: every gate in one picture
    channel_overviews: dict[str, Image.Image]  # gated members with channel gates: every strip in one picture
    composite: Image.Image | None
    warnings: tuple[str, ...]
    timings: Mapping[str, float]               # seconds per step, read-only
    summary: dict[str, Any] = field(repr=False)  # the JSON document; its "timings" are `timings`
    faithfulness: dict[str, Any] | None = None  # member -> faithfulness.ConfidenceDrop
    faithfulness_image: Image.Image | None = None

    def labels(self, member: str) -> dict[str, float]:
        """``{label: probability}`` of one member's top-k (what a ``gr.Label`` shows)."""
        return {p.label: float(p.prob) for p in self.explanation.models[member].predictions}

    def with_timing(self, step: str, seconds: float) -> Analysis:
        """This analysis with one more timing, in :attr:`timings` and in the JSON alike."""
        timings = MappingProxyType({**self.timings, step: float(seconds)})
        return dataclasses.replace(self, timings=timings, summary={**self.summary, "timings": dict(timings)})


def warm_up(lineup_name: str | None = None) -> float:
    """Load the lineup and run one small explanation, so the first person does not wait.

    The first explanation in a process pays for lazy imports (pytorch-grad-cam pulls in scipy and
    scikit-learn: several seconds on a small CPU) and first-call allocations. Returns the seconds
    it took; failures are logged, never raised (the app must start anyway).
    """
    t = time.perf_counter()
    try:
        analyse(Image.new("RGB", (64, 64), (128, 128, 128)), lineup_name=lineup_name, name="warm-up")
    except UserFacingError as err:  # already said once (get_lineup logs a failed load with its traceback)
        log.warning("warm-up skipped: %s", err)
    except Exception:  # noqa: BLE001
        log.exception("warm-up failed (the app still serves)")
    return time.perf_counter() - t


def _prediction_warnings(explanation: Explanation, info, *, unsure_prob: float, unsure_margin: float) -> list[str]:
    titles = {m.name: f"{m.title} ({m.name})" if len(set(x.title for x in info.members)) < len(info.members)
              else m.title for m in info.members}
    trained = [m.name for m in info.members if m.trained]  # untrained: already warned
    out = ood.warning({titles[n]: explanation.models[n].out_of_distribution for n in trained},
                      classes_sentence(info.classes))
    unsure = []
    for name, m in explanation.models.items():
        preds = m.predictions
        if not preds:
            continue
        top, second = preds[0], (preds[1].prob if len(preds) > 1 else 0.0)
        if top.prob < unsure_prob:
            unsure.append(f"{titles[name]} gives its top class {top.label!r} only {top.prob:.0%}")
        elif top.prob - second < unsure_margin:
            unsure.append(f"{titles[name]} hesitates between {top.label!r} ({top.prob:.0%}) "
                          f"and {preds[1].label!r} ({second:.0%})")
    if unsure:
        out.append("Unsure prediction: " + "; ".join(unsure) + ". "
                   + classes_sentence(info.classes) + "; this photo may show none of them.")
    tops = {name: m.predictions[0].label for name, m in explanation.models.items() if m.predictions}
    if len(set(tops.values())) > 1:
        out.append("The models disagree: " + ", ".join(f"{titles[n]} says {label!r}" for n, label in tops.items())
                   + ".")
    return out


def analyse(source: str | os.PathLike | bytes | Image.Image, *, lineup=None, lineup_name: str | None = None,
            method: str = "gradcam", target: str | int | None = None, layer: str | None = None, alpha: float = 0.5,
            name: str | None = None, faithfulness: bool = True, pictures: Iterable[str] = ALL_PICTURES,
            unsure_prob: float = UNSURE_PROB, unsure_margin: float = UNSURE_MARGIN) -> Analysis:
    """Explain one image with every member of a lineup and draw its pictures, in memory.

    Args:
        source: a path, the file's bytes or a PIL image.
        lineup: a loaded :class:`~cbam_viz.engine.lineup.Lineup`; default: :func:`access.get_lineup`
            (``lineup_name``).
        method, target, layer, alpha: the controls, as :mod:`cbam_viz.engine.controls` accepts them
            (target: None or auto, a class name, WordNet id or index; layer: a block name).
        name: shown in captions and written in the JSON; default: the file's name.
        faithfulness: also measure each model's confidence drop when the top
            :data:`FAITHFULNESS_FRACTION` of its own CAM is blurred away (one more forward each): a
            user's photo has no boxes, so this is how the app tells which CAM found what the
            model actually uses.
        pictures: which pictures to draw (names of :data:`PICTURES`; default :data:`ALL_PICTURES`).
        unsure_prob, unsure_margin: when a top-1 is flagged as unsure (:data:`UNSURE_PROB`, :data:`UNSURE_MARGIN`).

    Raises:
        UserFacingError: for every failure, with a one-sentence message.
        ValueError: an unknown picture name (a programming error, not a person's).
    """
    try:
        served = lineup is None  # a lineup get_lineup serves goes to a GPU worker by name (see _model_work)
        lineup = access.get_lineup(lineup_name) if served else lineup
        controls = check_controls(lineup, method=method, target=target, layer=layer, alpha=alpha)
    except UserFacingError:
        raise
    except Exception as err:  # noqa: BLE001  every failure reaches the person as one sentence
        raise UserFacingError(format_error(err)) from err
    return analyse_checked(source, lineup, controls, served=served, name=name, faithfulness=faithfulness,
                           pictures=pictures, unsure_prob=unsure_prob, unsure_margin=unsure_margin)


def analyse_checked(source, lineup, controls: Controls, *, served: bool = False, name: str | None = None,
                    faithfulness: bool = True, pictures: Iterable[str] = ALL_PICTURES,
                    unsure_prob: float = UNSURE_PROB, unsure_margin: float = UNSURE_MARGIN) -> Analysis:
    """:func:`analyse` with the lineup loaded and the controls checked once, by the caller (a batch checks
    them once for all its photos). ``served``: the lineup came from :func:`access.get_lineup`, so a
    ZeroGPU worker may take it by name. Errors as in :func:`analyse`."""
    pictures = frozenset(pictures)
    if unknown := pictures - set(PICTURES):
        raise ValueError(f"unknown pictures {sorted(unknown)}; choose from {', '.join(PICTURES)}")
    try:
        return _analyse(source, lineup, controls, served=served, name=name, faithfulness=faithfulness,
                        pictures=pictures, unsure=(unsure_prob, unsure_margin))
    except UserFacingError:
        raise
    except Exception as err:  # noqa: BLE001  every failure reaches the person as one sentence
        raise UserFacingError(format_error(err)) from err


@zerogpu.gpu
def _model_work(image: Image.Image, lineup, controls: Controls, *, faithfulness: bool
                ) -> tuple[Explanation, dict | None, dict[str, float]]:
    """Every forward of one request, on each model's one lock: the explanation, then the faithfulness.

    The function of a request that needs the accelerator: on a Hugging Face ZeroGPU Space it
    runs with a GPU attached (:func:`cbam_viz.zerogpu.gpu`), a plain call elsewhere. ``lineup``: the
    name of a lineup :func:`access.get_lineup` serves, or a caller's own lineup. On a ZeroGPU Space
    the arguments are pickled into a GPU worker process: models passed there would arrive as CPU
    copies, while a name makes the worker take the models of its own (forked) cache, which
    ``spaces`` has placed on the GPU. It returns numpy arrays and CPU tensors only.
    """
    if isinstance(lineup, str):
        lineup = access.get_lineup(lineup)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    # The explanation and its faithfulness forwards back to back on each model's one lock (which
    # explain and faithfulness take again inside: it is re-entrant).
    with models_locked(*(m.model for m in lineup.members)):
        timings["wait_for_model"] = time.perf_counter() - t
        t = time.perf_counter()
        (explanation,) = explain_checked([image], lineup, controls)
        timings["explain"] = time.perf_counter() - t
        drops = None
        if faithfulness:
            t = time.perf_counter()
            drops = lineup_confidence_drop(image, explanation, lineup, fraction=FAITHFULNESS_FRACTION)
            drops = {n: dataclasses.replace(d, perturbed=d.perturbed.detach().cpu()) for n, d in drops.items()}
            timings["faithfulness"] = time.perf_counter() - t
    return explanation, drops, timings


def _draw(image: Image.Image, explanation: Explanation, drops, lineup, *, alpha: float,
          pictures: frozenset[str]) -> dict[str, Any]:
    """The pictures asked for, as the :class:`Analysis` fields that hold them."""
    models = explanation.models
    return {
        "overlays": ({n: render.overlay(image, m.cam, alpha=alpha) for n, m in models.items()}
                     if "overlays" in pictures else {}),
        "spatial_sheets": ({n: render.attention_sheet(image, m, alpha=alpha) for n, m in models.items()
                            if m.spatial_attention} if "spatial_sheet" in pictures else {}),
        "channel_overviews": ({n: render.channel_attention_summary(m) for n, m in models.items()
                               if m.channel_attention} if "channel_overview" in pictures else {}),
        "composite": figures.composite(image, explanation, alpha=alpha) if "composite" in pictures else None,
        "faithfulness_image": (figures.confidence_drop_figure(drops, lineup)
                               if drops is not None and "faithfulness" in pictures else None),
    }


def _analyse(source, lineup, controls: Controls, *, served, name, faithfulness, pictures, unsure) -> Analysis:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    info = access.describe_lineup(lineup)
    if name is None:
        name = Path(os.fspath(source)).name if isinstance(source, (str, os.PathLike)) else "image"
    t = time.perf_counter()
    image = open_image(source, display_name=name)
    original_size = source.size if isinstance(source, Image.Image) else _original_size(source, image)
    timings["open_image"] = time.perf_counter() - t

    explanation, drops, model_timings = _model_work(image, lineup.name if served else lineup, controls,
                                                    faithfulness=faithfulness)
    timings.update(model_timings)
    t = time.perf_counter()
    drawn = _draw(image, explanation, drops, lineup, alpha=controls.alpha, pictures=pictures)
    timings["render"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    warnings = [*info.warnings, *_prediction_warnings(explanation, info, unsure_prob=unsure[0],
                                                      unsure_margin=unsure[1])]
    doc = summary_document(name=name, image=image, original_size=original_size, explanation=explanation,
                           info=info, controls=controls, warnings=warnings, timings=timings, drops=drops)
    return Analysis(name=name, image=image, original_size=original_size, explanation=explanation,
                    lineup_name=lineup.name, alpha=controls.alpha, warnings=tuple(warnings),
                    timings=MappingProxyType(timings), summary=doc, faithfulness=drops, **drawn)


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
