"""The two public endpoints: ``/explain`` (one photo, every member of a lineup) and ``/info``.

Both are the app's API for ``gradio_client`` and MCP; what they return is plain JSON (``/explain``'s
pictures inside it as data URIs, so one answer is the whole round trip).
"""
from __future__ import annotations

from typing import Any

from cbam_viz import outputs, service
from cbam_viz.app.items import member_titles
from cbam_viz.app.page import lineup_choices
from cbam_viz.app.results import upload_paths
from cbam_viz.engine.controls import AUTO_LAYER, AUTO_TARGET, list_methods
from cbam_viz.messages import UserFacingError

__all__ = ["api_explain", "api_info", "explain_pictures"]


#: How each picture of ``/explain`` is encoded: photo-like ones as JPEG, the channel chart as PNG.
_FORMATS = {"cam_overlay": "jpeg", "spatial_sheet": "jpeg", "channel_overview": "png"}


def explain_pictures(analysis, titles: dict[str, str]) -> dict[str, dict[str, str]]:
    """Each member's pictures as data URIs, in display order: ``{name: {"caption", "cam_overlay",
    "spatial_sheet", "channel_overview"}}``; a picture its model has no gate for is absent."""
    drawn = {"cam_overlay": analysis.overlays, "spatial_sheet": analysis.spatial_sheets,
             "channel_overview": analysis.channel_overviews}
    out: dict[str, dict[str, str]] = {}
    for name, title in titles.items():
        out[name] = {"caption": f"{title} ({name})"}
        for kind, fmt in _FORMATS.items():
            if (image := drawn[kind].get(name)) is not None:
                out[name][kind] = outputs.data_uri(image, fmt)
    return out


def api_explain(image, method="gradcam", target=AUTO_TARGET, layer=AUTO_LAYER, alpha=0.5,
                lineup_name=None, pictures=True) -> tuple[dict[str, Any], dict[str, dict[str, str]]]:
    """``/explain``: one image -> (summary JSON, every member's pictures as data URIs).

    One answer holds everything: the pictures (see :func:`explain_pictures`) travel inside it, not as
    files Gradio copies into its cache and the caller fetches one request each. The composite, the
    JSON file and the npz of every raw map (keys ``MEMBER/cam``, ``MEMBER/spatial/BLOCK``...) are
    built on demand by ``/downloads`` from the summary's ``result_id``. ``pictures=False``: the
    summary alone (nothing drawn; an MCP client's context need not hold base64 text).
    """
    sources, names = upload_paths(image)
    if not sources:
        raise UserFacingError("Please send an image file.")
    drawn = service.API_PICTURES if _wanted(pictures) else frozenset()
    batch = service.explain_files(sources[:1], names=names[:1], lineup_name=lineup_name, method=method,
                                  target=target, layer=layer, alpha=alpha, max_images=1,
                                  pictures=drawn, write=service.API_FILES)
    r = batch.results[0]
    summary = {**r.analysis.summary, "result_id": r.result_id}  # /downloads builds the files from it
    return summary, (explain_pictures(r.analysis, member_titles(summary)) if drawn else {})


def _wanted(value) -> bool:
    """The ``pictures`` flag as an API caller may send it (a bool, or a string from a form or an MCP client)."""
    if isinstance(value, str):
        return value.strip().lower() not in ("false", "0", "no", "off", "")
    return value is None or bool(value)


def api_info(lineup_name: str | None = None) -> dict[str, Any]:
    """``/info``: the lineup's members, classes, layer choices, CAM methods and warnings; every lineup."""
    info = service.describe_lineup(service.get_lineup(lineup_name))
    members = [{"name": m.name, "arch": m.arch, "title": m.title, "trained": bool(m.trained),
                "gates": list(m.gates)} for m in info.members]
    return {
        "lineup": info.name, "lineups": lineup_choices(), "reference": info.reference, "members": members,
        "trained": all(m["trained"] for m in members), "classes": list(info.classes), "targets": info.targets,
        "layers": info.layer_choices, "methods": list_methods(), "warnings": list(info.warnings),
    }
