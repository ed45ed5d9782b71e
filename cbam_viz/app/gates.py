""""What the gates did": a gated member's channel gates as plot data, the click probe and the gate
ablation on the shown photo, for the member the page's gate dropdown chooses.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from cbam_viz import service
from cbam_viz.app.items import member_of
from cbam_viz.messages import UserFacingError, escape_markdown

__all__ = ["CHANNEL_COLUMNS", "PROBE_COLUMNS", "ABLATION_COLUMNS", "channel_frame", "probe_view", "ablation_view"]

#: Columns of the channel-attention plot's data.
CHANNEL_COLUMNS = ("block", "rank", "channel", "attention")
#: Columns of the click-probe plot's data.
PROBE_COLUMNS = ("block", "spatial attention")
#: Columns of the gate-ablation table (and plot).
ABLATION_COLUMNS = ("block", "gate", "prob_change", "cam_correlation")


def channel_frame(channel_attention) -> pd.DataFrame:
    """Every block's channel attention as plot data: one row per (block, rank, channel, value).

    Each block's channels are ranked from the most passed (rank 0) to the least, so that every
    block draws one readable curve (flat: the block gates its channels alike; steep: it picks a
    few); the channel's own index stays in the row, for the hover.
    """
    rows = []
    for block, values in channel_attention.items():
        v = np.asarray(values, dtype=np.float64)
        for rank, ch in enumerate(np.argsort(-v, kind="stable")):
            rows.append((block, rank, int(ch), round(float(v[ch]), 4)))
    return pd.DataFrame(rows, columns=list(CHANNEL_COLUMNS))


def _shown(result_id: str, items: list[dict] | None) -> dict | None:
    return next((it for it in items or [] if it.get("result_id") == result_id), None)


def _title(result_id: str, member: str | None, items: list[dict] | None) -> str:
    found = member_of(_shown(result_id, items) or {}, member)
    return found["title"] if found else (member or "the gated model")


def probe_view(result_id: str, index, member: str | None = None, items: list[dict] | None = None
               ) -> tuple[pd.DataFrame, str]:
    """A click on the photo at ``index = (x, y)``: every block's spatial attention there, of ``member``."""
    if not index or len(index) != 2:
        raise UserFacingError("Click a point of the photo.")
    found = member_of(_shown(result_id, items) or {}, member)
    if found is not None and not found.get("spatial"):
        raise UserFacingError(f"{found['title']} has no spatial gate; choose a model with spatial attention "
                              "(CBAM, BAM) for the click probe.")
    x, y = (float(v) for v in index)
    values = service.spatial_at(result_id, x, y, member=member or None)
    if not values:
        raise UserFacingError("This model has no spatial gate; choose one with spatial attention for the click probe.")
    frame = pd.DataFrame([(b, round(v, 4)) for b, v in values], columns=list(PROBE_COLUMNS))
    low, high = min(values, key=lambda bv: bv[1]), max(values, key=lambda bv: bv[1])
    who = escape_markdown(_title(result_id, member, items))
    text = (f"At pixel ({int(x)}, {int(y)}): {who}'s spatial gates pass {low[1]:.2f} ({low[0]}) to {high[1]:.2f} "
            f"({high[0]}) of the features there (1 = kept as is).")
    return frame, text


def ablation_view(result_id: str, member: str | None = None, items: list[dict] | None = None
                  ) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """"Is this attention used?": gate ablation of ``member`` on the shown photo (plot data, table, sentence)."""
    rows = service.ablate_result(result_id, member=member or None)
    table = pd.DataFrame([[r[k] for k in ABLATION_COLUMNS] for r in rows], columns=list(ABLATION_COLUMNS))
    plot = table.assign(ablation=[f"{r['block']} {r['gate']}" for r in rows])
    finite = [r for r in rows if r["prob_change"] is not None]
    if not finite:
        return plot, table, "No ablation changed anything measurable."
    worst = min(finite, key=lambda r: r["prob_change"])
    every = worst["block"] == "all"
    where = f"{worst['gate']} gate{'s' if every else ''} of {'every block' if every else worst['block']}"
    who = escape_markdown(_title(result_id, member, items))
    text = (f"Each row sets a gate to 1 (no attention) in one block, or in all blocks. The largest fall of "
            f"{who}'s top-1 probability: {worst['prob_change']:+.2f} with the {where} switched off. "
            "Near 0 everywhere: on this photo the attention is not used. (The CAM agreement column compares "
            "Grad-CAM of the predicted class, whatever method the page shows.)")
    return plot, table, text
