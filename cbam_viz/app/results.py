"""The Explain tab's results: one or several photos explained, one shown, member by member.

Each view returns named parts (:class:`ResultView`: a :class:`MemberPane` per member, a
:class:`GatePane` per gated member, the compare slider, ...); ``app.py`` maps the names onto its
components once. Failures raise :class:`~cbam_viz.messages.UserFacingError`.
"""
from __future__ import annotations

import dataclasses
import functools
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbam_viz import service
from cbam_viz.app.content import Choices, example_image
from cbam_viz.app.gates import channel_frame
from cbam_viz.app.items import gated_members, item_view, member_of, spatial_members
from cbam_viz.app.text import cached_timings_line, status_markdown
from cbam_viz.messages import UserFacingError

__all__ = ["MemberPane", "GatePane", "ResultView", "ExplainView", "upload_paths", "result_view", "explain_view",
           "show_item", "example_view", "compare_view", "downloads_view"]


@dataclass(frozen=True)
class MemberPane:
    """One member's column: its title, top-5, photo | CAM slider and faithfulness sentence."""

    name: str
    title: str
    labels: dict[str, float]
    slider: tuple[str, str] | None     # (photo, CAM overlay)
    faithfulness: str


@dataclass(frozen=True)
class GatePane:
    """What one gated member's gates did: every block's spatial map in one sheet, the channel gates."""

    name: str
    title: str
    sheet: str | None                  # None: a member with channel gates only (SE)
    channel: Any                       # DataFrame of channel_frame, or None without channel gates


@dataclass(frozen=True)
class ResultView:
    """Everything the page shows of one explained photo, by name."""

    result_id: str
    photo: str
    members: tuple[MemberPane, ...]    # display order
    gates: tuple[GatePane, ...]        # the gated members, display order
    compare_a: Choices                 # (title, name) of every member; hidden for a lineup of one
    compare_b: Choices
    compare: tuple[str, str] | None    # (CAM of a, CAM of b); None for a lineup of one
    gate_member: Choices               # which gated member the click probe and the ablation ask
    faithfulness_image: str | None
    faithfulness: str
    timings_line: str
    timings: str


@dataclass(frozen=True)
class ExplainView:
    items: list[dict]      # every image's item_view, for the picker
    picker: Choices        # "1. name", ... (shown when there are several)
    status: str            # notes and skipped files, markdown
    shown: ResultView      # the first image


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


def _member_choices(members: list[dict], value: str | None, *, visible: bool = True) -> Choices:
    choices = [(m["title"], m["name"]) for m in members]
    names = [m["name"] for m in members]
    return Choices(choices, value if value in names else (names[-1] if names else None), visible=visible)


def result_view(item: dict[str, Any]) -> ResultView:
    """The named parts of the page for one item (see :func:`cbam_viz.app.items.item_view`)."""
    photo, members = item["photo"], item["members"]
    several = len(members) > 1
    reference = item.get("reference") if member_of(item, item.get("reference")) else members[0]["name"]
    last = members[-1]["name"] if members[-1]["name"] != reference or not several else members[-2]["name"]
    gated = gated_members(item)
    probed = spatial_members(item) or gated
    return ResultView(
        result_id=item["result_id"], photo=photo,
        members=tuple(MemberPane(m["name"], m["title"], m["labels"], (photo, m["overlay"]) if m["overlay"] else None,
                                 m["faithfulness_md"]) for m in members),
        gates=tuple(GatePane(m["name"], m["title"], m["sheet"], channel_frame(m["channel"]) if m["channel"] else None)
                    for m in gated),
        compare_a=_member_choices(members, reference, visible=several),
        compare_b=_member_choices(members, last, visible=several),
        compare=compare_view(reference, last, item) if several else None,
        gate_member=_member_choices(gated, probed[-1]["name"] if probed else None, visible=bool(gated)),
        faithfulness_image=item["faithfulness"], faithfulness=item["faithfulness_md"],
        timings_line=item["timings_line"], timings=item["timings_md"],
    )


def _step(progress: Callable[..., object], fraction: float, text: str) -> None:
    progress(fraction, desc=text)


def explain_view(image, files, *, lineup_name=None, method="gradcam", target=None, layer=None, alpha=0.5,
                 max_images: int = 16, progress: Callable[..., object] | None = None) -> ExplainView:
    """The Explain button: one or several uploads -> every result, showing the first.

    Draws and writes only what the page shows (:data:`cbam_viz.service.PAGE_FILES`); the composite
    and the zip wait for the downloads button. ``progress(fraction, desc=...)`` (a ``gr.Progress``)
    gets one step per image when there are several or the method is a slow one.
    """
    sources, names = upload_paths(image, files)
    report = None
    if progress is not None and (len(sources) > 1 or service.is_slow_method(str(method))):
        report = functools.partial(_step, progress)
    batch = service.explain_files(sources, names=names, lineup_name=lineup_name, method=method, target=target,
                                  layer=layer, alpha=alpha, max_images=max_images, pictures=service.PAGE_PICTURES,
                                  write=service.PAGE_FILES, progress=report)
    ids = [r.result_id for r in batch.results]
    skipped = [list(f) for f in batch.failures]  # every image of the batch keeps saying what was skipped
    items = [{**item_view(r, ids), "skipped": skipped} for r in batch.results]
    labels = [f"{i + 1}. {it['name']}" for i, it in enumerate(items)]
    return ExplainView(items=items, picker=Choices(labels, labels[0], visible=len(items) > 1),
                       status=status_markdown(items[0]["warnings"], batch.failures), shown=result_view(items[0]))


def show_item(choice: str, items: list[dict]) -> tuple[str, ResultView]:
    """The image picker: ``(status, view)`` of another image of the last batch."""
    if not items or not choice:
        raise UserFacingError("Explain an image first.")
    index = int(choice.split(".", 1)[0]) - 1
    item = items[max(0, min(index, len(items) - 1))]
    return status_markdown(item["warnings"], item.get("skipped", [])), result_view(item)


def compare_view(a: str | None, b: str | None, item_or_id: dict | str | None, items: list[dict] | None = None
                 ) -> tuple[str, str]:
    """The compare slider: member ``a``'s CAM | member ``b``'s, on the shown photo.

    ``item_or_id`` is the shown item, or its result id looked up in ``items`` (the page's state).
    """
    item = item_or_id
    if not isinstance(item, dict):
        item = next((it for it in items or [] if it.get("result_id") == item_or_id), None) or _saved_item(item_or_id)
    first, second = member_of(item, a), member_of(item, b)
    if first is None or second is None or not first["overlay"] or not second["overlay"]:
        raise UserFacingError("Choose two models of the shown result to compare.")
    return first["overlay"], second["overlay"]


def _saved_item(result_id: str | None) -> dict[str, Any]:
    """The overlays of a written result the page holds no state of (a shared link), from its folder."""
    if not result_id:
        raise UserFacingError("Explain an image first.")
    saved = service.load_result(result_id)
    stems = service.member_stems(saved.members)
    overlays = {n: saved.folder / f"cam_{stems[n]}.jpg" for n in saved.members}
    return {"members": [{"name": n, "overlay": str(p) if p.is_file() else None} for n, p in overlays.items()]}


# An example answers at once after its first use: its view is kept, per example and controls (the
# same idea as Gradio's cache_examples="lazy", keyed by the controls too, with no file read at
# import). An entry whose files were cleaned up (request folders live an hour) is computed again.
_EXAMPLE_CACHE: OrderedDict[tuple, ExplainView] = OrderedDict()
_EXAMPLE_CACHE_SIZE = 32
_EXAMPLE_LOCK = threading.Lock()


def _files_of(item: dict) -> list[str]:
    return [item["photo"], *(m["overlay"] for m in item["members"] if m["overlay"])]


def example_view(index: int | None, *, lineup_name=None, method="gradcam", target=None, layer=None,
                 alpha=0.5) -> ExplainView:
    """A click on an example: its explanation with the current controls, from the cache after the first time."""
    path = example_image(index)
    if path is None:
        raise UserFacingError("Pick one of the examples.")
    key = (path, lineup_name, method, target, layer, float(alpha))
    with _EXAMPLE_LOCK:
        cached = _EXAMPLE_CACHE.get(key)
    if cached is not None and all(Path(p).is_file() for p in _files_of(cached.items[0])):
        with _EXAMPLE_LOCK:
            _EXAMPLE_CACHE.move_to_end(key)
        # The result is the first run's; its timings are not what this click cost.
        item = {**cached.items[0], "timings_line": cached_timings_line(cached.items[0]["timings_line"])}
        shown = dataclasses.replace(cached.shown, timings_line=item["timings_line"])
        return dataclasses.replace(cached, items=[item, *cached.items[1:]], shown=shown)
    view = explain_view(path, None, lineup_name=lineup_name, method=method, target=target, layer=layer,
                        alpha=alpha, max_images=1)
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
