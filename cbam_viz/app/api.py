"""The two public endpoints: ``/explain`` (one photo, every member of a lineup) and ``/info``.

Both are the app's API for ``gradio_client`` and MCP; what they return is plain JSON and file paths.
"""
from __future__ import annotations

from typing import Any

from cbam_viz import service
from cbam_viz.app.items import member_titles
from cbam_viz.app.page import lineup_choices
from cbam_viz.app.results import upload_paths
from cbam_viz.engine.controls import AUTO_LAYER, AUTO_TARGET, list_methods
from cbam_viz.messages import UserFacingError

__all__ = ["api_explain", "api_info"]


def _attention_gallery(result, titles: dict[str, str]) -> list[tuple[str, str]]:
    """Each gated member's spatial sheet and channel overview, captioned with its title."""
    gallery = []
    for name, title in titles.items():
        sheet = result.spatial_sheets.get(name)
        if sheet:
            gallery.append((str(sheet), f"{title}: spatial attention of every block"))
        overview = result.channel_overviews.get(name)
        if overview:
            gallery.append((str(overview), f"{title}: channel attention of every block"))
    return gallery


def api_explain(image, method="gradcam", target=AUTO_TARGET, layer=AUTO_LAYER, alpha=0.5,
                lineup_name=None) -> tuple:
    """``/explain``: one image -> (summary JSON, CAM overlays, attention pictures, files).

    The composite picture is not drawn here (it is the slowest picture and most callers do not
    fetch it): ``/downloads`` builds it from the summary's ``result_id``.

    The overlays are one per member in display order, captioned ``"title (name)"``; the files the
    JSON (the summary again) and the npz of every raw map (keys ``MEMBER/cam``, ``MEMBER/spatial/BLOCK``...).
    """
    sources, names = upload_paths(image)
    if not sources:
        raise UserFacingError("Please send an image file.")
    batch = service.explain_files(sources[:1], names=names[:1], lineup_name=lineup_name, method=method,
                                  target=target, layer=layer, alpha=alpha, max_images=1,
                                  pictures=service.API_PICTURES, write=service.API_FILES)
    r = batch.results[0]
    summary = {**r.analysis.summary, "result_id": r.result_id}  # /downloads builds the composite from it
    titles = member_titles(summary)
    overlays = [(str(r.overlays[n]), f"{titles[n]} ({n})") for n in titles if n in r.overlays]
    return summary, overlays, _attention_gallery(r, titles), [str(r.files[k]) for k in ("json", "npz")]


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
