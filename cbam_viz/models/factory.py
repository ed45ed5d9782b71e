"""``create_model(name, weights=FILE)``: a registered architecture with a checkpoint of any known layout loaded.

Its own module because it sits above both the registry and the foreign-checkpoint readers
(:mod:`cbam_viz.models.checkpoints`), which build models through the registry themselves.
"""
from __future__ import annotations

import os

from torch import nn

from cbam_viz.models._registry import build_model
from cbam_viz.models.checkpoints import load_checkpoint_into

__all__ = ["create_model"]


def create_model(name: str, *, weights: str | os.PathLike | None = None, **kwargs) -> nn.Module:
    """Build a registered architecture, optionally loading a checkpoint file into it.

    Args:
        name: a name from :func:`cbam_viz.models.list_models`.
        weights: path of a checkpoint in any layout :func:`cbam_viz.models.checkpoints.load_checkpoint_into` reads.
        **kwargs: builder options, e.g. ``num_classes=10`` or ``cbam_config=SIMPLIFIED``.

    Raises:
        KeyError: unknown name (the message lists the known ones).
    """
    model = build_model(name, **kwargs)
    if weights is not None:
        load_checkpoint_into(model, weights)
    return model
