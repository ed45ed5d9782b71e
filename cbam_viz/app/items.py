"""One explained image as the page keeps it: a plain, serialisable dict (in a ``gr.State``).

An item holds what the page shows of a result, member by member and in display order: each
member's title, top-5, CAM overlay file, faithfulness, and, for a gated member, its spatial
sheet and channel-gate values. The views (:mod:`cbam_viz.app.results`) turn an item into the
named parts of the page; the picker and the compare slider read items back without the service.
"""
from __future__ import annotations

from typing import Any

from cbam_viz.app.text import faithfulness_markdown, member_faithfulness_markdown, timings_line, timings_markdown

__all__ = ["item_view", "member_of", "gated_members", "spatial_members", "member_titles"]


def member_titles(summary: dict[str, Any]) -> dict[str, str]:
    """Member name -> its title ("ResNet-18 + CBAM"), in display order, from a result's JSON."""
    return {n: summary["models"][n].get("title") or n for n in summary["members"]}


def _parts(result) -> dict[str, Any]:
    """Members (display order), their explanations, titles, spatial sheets, the reference and the
    faithfulness document of a :class:`cbam_viz.service.ImageResult`."""
    a = result.analysis
    summary = a.summary
    names = list(summary["members"])
    return {"names": names, "models": dict(a.explanation.models),
            "titles": member_titles(summary),
            "sheets": dict(result.spatial_sheets), "reference": summary.get("reference") or names[0],
            "faithfulness": summary.get("faithfulness") or None, "labels": a.labels}


def _member(parts: dict[str, Any], result, name: str) -> dict[str, Any]:
    model, title = parts["models"][name], parts["titles"][name]
    sheet = parts["sheets"].get(name)
    overlay = result.overlays.get(name)
    return {
        "name": name, "title": title, "labels": parts["labels"](name),
        "overlay": str(overlay) if overlay else None,
        "gated": bool(model.channel_attention or model.spatial_attention),
        "spatial": bool(model.spatial_attention),
        "sheet": str(sheet) if sheet else None,
        "channel": {block: [round(float(x), 4) for x in values] for block, values in model.channel_attention.items()},
        "faithfulness_md": member_faithfulness_markdown(parts["faithfulness"], name, title),
    }


def item_view(result, batch_ids: list[str]) -> dict[str, Any]:
    """One image's result (a :class:`cbam_viz.service.ImageResult`) as the dict the page keeps."""
    a = result.analysis
    parts = _parts(result)
    members = [_member(parts, result, n) for n in parts["names"]]
    titles = parts["titles"]
    per_model = {titles[n]: parts["models"][n].timings for n in parts["names"]}
    return {
        "name": a.name, "result_id": result.result_id, "batch": batch_ids,
        "lineup": a.summary.get("lineup"), "reference": parts["reference"],
        "photo": str(result.photo), "members": members,
        "faithfulness": str(result.faithfulness) if result.faithfulness else None,
        "faithfulness_md": faithfulness_markdown(parts["faithfulness"], titles, parts["reference"]),
        "timings_line": timings_line(a.timings), "timings_md": timings_markdown(a.timings, per_model),
        "warnings": list(a.warnings),
    }


def member_of(item: dict[str, Any], name: str | None) -> dict[str, Any] | None:
    """The member called ``name`` of an item (None when it has none such)."""
    return next((m for m in item.get("members", []) if m["name"] == name), None)


def gated_members(item: dict[str, Any]) -> list[dict[str, Any]]:
    """The members whose explanation has any attention (CBAM, SE, BAM...), in display order."""
    return [m for m in item.get("members", []) if m.get("gated")]


def spatial_members(item: dict[str, Any]) -> list[dict[str, Any]]:
    """The members with spatial attention maps (what the click probe reads)."""
    return [m for m in item.get("members", []) if m.get("spatial")]
