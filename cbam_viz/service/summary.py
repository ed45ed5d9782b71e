"""The JSON document of one explained photo: ``explanation.json``, ``/explain``'s JSON and the CLI's JSON.

One schema for all three, keyed by member name (a member's record name)::

    {"image": {...}, "lineup": NAME, "reference": MEMBER, "members": [MEMBER, ...], "method", "layer",
     "alpha", "models": {MEMBER: {"name", "arch", "title", "trained", "gates", "predictions", "target",
     "timings", "attention_blocks", "out_of_distribution"}}, "faithfulness": {..., "models": {MEMBER: ...}},
     "warnings", "timings", "target_request", "layer_request", "metadata"}
"""
from __future__ import annotations

from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch

__all__ = ["summary", "model_summary", "faithfulness_summary", "package_version"]

_REMOVED = {"blur": "blurred away", "mean": "replaced by the mean colour", "road": "removed (ROAD imputation)"}


def package_version() -> str:
    try:
        return version("cbam-viz")
    except PackageNotFoundError:  # running from a checkout that is not installed
        return "0.1.0"


def model_summary(m, member) -> dict[str, Any]:
    """One member's entry: ``m`` its :class:`~cbam_viz.engine.explain.ModelExplanation`, ``member`` its
    :class:`~cbam_viz.service.access.MemberInfo`."""
    return {
        "name": member.name,
        "arch": member.arch,
        "title": member.title,
        "trained": member.trained,
        "gates": list(member.gates),
        "predictions": [{"index": int(p.index), "label": p.label, "prob": float(p.prob)} for p in m.predictions],
        "target": {"index": int(m.target), "label": m.target_label},
        "timings": {k: float(v) for k, v in m.timings.items()},
        "attention_blocks": list(dict.fromkeys([*m.channel_attention, *m.spatial_attention])),
        "out_of_distribution": m.out_of_distribution,  # cbam_viz.engine.ood.assess: score, threshold, flagged
    }


def faithfulness_summary(drops: dict[str, Any]) -> dict[str, Any]:
    """The JSON form of :func:`cbam_viz.engine.faithfulness.lineup_confidence_drop`'s result."""
    any_drop = next(iter(drops.values()))
    return {"fraction": any_drop.fraction, "imputer": any_drop.imputer,
            "meaning": "probability of the explained class before and after the top "
                       f"{any_drop.fraction:.0%} of the model's own CAM is "
                       f"{_REMOVED.get(any_drop.imputer, 'removed')}; "
                       "a larger drop means the CAM marks what the model relies on",
            "models": {name: {"target": int(d.target), "prob_before": float(d.prob_before),
                              "prob_after": float(d.prob_after), "drop": float(d.drop),
                              "relative_drop": float(d.relative_drop)} for name, d in drops.items()}}


def summary(*, name, image, original_size, explanation, info, controls, warnings, timings,
            drops=None) -> dict[str, Any]:
    """The whole document (see the module docstring); ``info`` is the lineup's
    :class:`~cbam_viz.service.access.LineupInfo`, ``controls`` the request's checked controls."""
    doc = {
        "image": {"name": name, "original_size": list(original_size), "analysed_size": list(image.size)},
        "lineup": info.name,
        "reference": info.reference,
        "members": info.names,
        "method": explanation.method,
        "layer": explanation.layer,
        "alpha": controls.alpha,
        "models": {n: model_summary(m, info.member(n)) for n, m in explanation.models.items()},
        "warnings": list(warnings),
        "timings": {k: float(v) for k, v in timings.items()},
        # What was asked for (auto: each model explains its own prediction), so a shared link can
        # reopen the page with the controls that made this result.
        "target_request": (None if controls.target_index is None
                           else {"index": controls.target_index, "label": controls.target_label}),
        "layer_request": None if controls.layer_auto else controls.layer,  # None: the last block
        "metadata": {
            "package": "cbam_viz", "version": package_version(), "torch": torch.__version__,
            "device": info.device, "classes": list(info.classes),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "paper": "https://arxiv.org/abs/1807.06521",
        },
    }
    if drops is not None:
        doc["faithfulness"] = faithfulness_summary(drops)
    return doc
