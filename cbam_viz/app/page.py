"""The page as it opens, and what depends on the chosen lineup: its members, classes, layers, card.

Never raises for a lineup that does not load: the page says it and keeps working.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from PIL import Image

from cbam_viz import service
from cbam_viz.app import content
from cbam_viz.app.quality import compared_members
from cbam_viz.app.content import Choices
from cbam_viz.app.text import lineup_markdown
from cbam_viz.engine.controls import AUTO_LAYER, AUTO_TARGET, DEFAULT_METHOD
from cbam_viz.messages import UserFacingError
from cbam_viz.service.model_card import model_card_markdown

__all__ = ["MAX_MEMBERS", "MemberSlot", "LineupView", "PageView", "lineup_view", "shows_another_lineup", "page_view",
           "lineup_choices"]

log = logging.getLogger(__name__)
#: Columns the page has for members (a lineup has 1 to 4).
MAX_MEMBERS = 4


@dataclass(frozen=True)
class MemberSlot:
    """A member column's heading before any photo is explained."""

    name: str
    title: str


@dataclass(frozen=True)
class LineupView:
    markdown: str                    # the "Loaded lineup" line and warnings, or the error
    targets: Choices | None          # None: leave the control as it is (the lineup did not load)
    layers: Choices | None
    card: str                        # the About tab's model card, or the error
    members: tuple[MemberSlot, ...] = ()   # empty: leave the columns as they are
    error: str | None = None


def lineup_choices() -> list[str]:
    """Every lineup a person can pick: shipped and their own (the default first)."""
    return list(service.lineup_names())


def lineup_view(lineup_name: str | None, *, target: str | None = None, layer: str | None = None) -> LineupView:
    """What depends on the chosen lineup; never raises (an unloadable lineup is said in the page).

    ``target`` and ``layer`` (the controls' current values) are kept where the lineup offers them,
    so a shared link reopens with its own controls and a lineup switch keeps what still applies;
    else auto.
    """
    try:
        lineup = service.get_lineup(lineup_name)
    except UserFacingError as err:
        return LineupView(f"> **Error:** {err}", None, None, f"> **Error:** {err}", error=str(err))
    info = service.describe_lineup(lineup)
    try:
        card = model_card_markdown(lineup)
    except Exception:  # noqa: BLE001  a malformed manifest record must not keep the page from loading
        log.exception("model card of lineup %r failed", lineup.name)
        card = "> The model card could not be drawn from this lineup's manifest records (see the server log)."
    return LineupView(lineup_markdown(info), Choices(info.targets, target if target in info.targets else AUTO_TARGET),
                      Choices(info.layer_choices, layer if layer in info.layer_choices else AUTO_LAYER), card,
                      members=tuple(MemberSlot(m.name, m.title) for m in info.members))


def shows_another_lineup(lineup_name: str | None, result_id: str | None, items: list[dict] | None) -> bool:
    """True when the shown result (``result_id``, found in the page's ``items``) is another lineup's: a
    person picking a lineup then sees its columns empty, not the last lineup's pictures under the new
    titles. A result the page holds no state of (a shared link being restored) is kept."""
    shown = next((it for it in items or [] if it.get("result_id") == result_id), None)
    return shown is not None and shown.get("lineup") != lineup_name


@dataclass(frozen=True)
class PageView:
    lineups: Choices
    examples: tuple[tuple[str, str], ...]
    quality_markdown: str
    quality_figure: Image.Image | None
    quality_methods: Choices
    quality_note: str
    lineup: LineupView = field(repr=False)
    method_note: str = ""
    quality_metrics: Choices = field(default_factory=lambda: Choices([], None))
    quality_directions: Choices = field(default_factory=lambda: Choices([], None))
    quality_members: Choices = field(default_factory=lambda: Choices([], None))  # set beside the reference
    quality_reading: str = ""   # the forest plot's two-line reading
    method: str = "gradcam"     # the CAM method the page shows (a shared link's, else as it opened)


def page_view(method: str | None = "gradcam", *, lineup_name: str | None = None, target: str | None = None,
              layer: str | None = None, result_id: str | None = None) -> PageView:
    """Everything the page loads once it is open (nothing of it is read at import).

    The controls' values as the page opened are kept where they still apply: the lineup if it is
    known, target and layer if that lineup offers them (:func:`lineup_view`). A shared link also
    brings its result's id: then the controls are those that made that result (read from its
    JSON), since the page only learns a dropdown's value when an event sends it.
    """
    method, lineup_name, target, layer = (_controls_of_result(result_id)
                                          or (method, lineup_name, target, layer))
    method = method or DEFAULT_METHOD
    lineups = lineup_choices()
    chosen = lineup_name if lineup_name in lineups else lineups[0]
    report, note = content.quality_report()
    # Imported here: torchvision's ~2 s stay out of the import (see content.quality_report).
    from cbam_viz.research.quality.view import DIRECTIONS, method_choices, metric_choices

    methods = method_choices(report) if report else ["gradcam"]
    metrics = metric_choices()
    compared = compared_members(report)
    return PageView(lineups=Choices(lineups, chosen), examples=content.examples(),
                    quality_markdown=content.quality_markdown(), quality_figure=content.quality_figure(),
                    quality_methods=Choices(methods, methods[0]), quality_note=note,
                    lineup=lineup_view(chosen, target=target, layer=layer),
                    method_note=content.method_note(method), method=method,
                    quality_metrics=Choices(metrics, "energy" if any(k == "energy" for _, k in metrics) else
                                            metrics[0][1]),
                    quality_directions=Choices(list(DIRECTIONS), next(iter(DIRECTIONS))),
                    quality_members=Choices(compared, compared[0] if compared else None),
                    quality_reading=content.quality_reading())


def _controls_of_result(result_id: str | None) -> tuple[str, str, str, str] | None:
    """(method, lineup, target, layer) as they made result ``result_id``; None for no or a gone result."""
    if not result_id:
        return None
    try:
        summary = service.load_result(result_id).summary
    except UserFacingError:
        return None
    request = summary.get("target_request")
    target = request["label"] if isinstance(request, dict) else AUTO_TARGET
    return summary.get("method"), summary.get("lineup"), target, summary.get("layer_request") or AUTO_LAYER
