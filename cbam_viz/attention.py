"""Record every CBAM gate's attention map during a forward pass, by module name.

CBAM (Woo et al., ECCV 2018, arXiv 1807.06521) gates each residual branch twice: a channel gate
``Mc`` of shape ``(B, C, 1, 1)`` and a spatial gate ``Ms`` of shape ``(B, 1, H, W)``. In
:mod:`cbam_viz.models.cbam` each gate is a named submodule (``layer3.1.cbam.channel``,
``layer3.1.cbam.spatial``) that *returns* its attention map, so a forward hook on it captures the
attention exactly as the network used it, with no second computation.

The hooks live only inside :func:`record_attention`; they are removed in ``finally`` whatever
happens, so after any call the model carries zero hooks.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["record_attention", "cbam_gates", "AttentionMaps"]

# block name ("layer3.1") -> {"channel": (B, C) tensor, "spatial": (B, h, w) tensor}
AttentionMaps = dict[str, dict[str, torch.Tensor]]

_CHANNEL_SUFFIX = ".cbam.channel"
_SPATIAL_SUFFIX = ".cbam.spatial"


def cbam_gates(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """Every CBAM gate of ``model`` as ``(block_name, kind, module)``, in forward order.

    ``kind`` is ``"channel"`` or ``"spatial"``; a baseline model has none.
    """
    gates = []
    for name, module in model.named_modules():
        if name.endswith(_CHANNEL_SUFFIX):
            gates.append((name[: -len(_CHANNEL_SUFFIX)], "channel", module))
        elif name.endswith(_SPATIAL_SUFFIX):
            gates.append((name[: -len(_SPATIAL_SUFFIX)], "spatial", module))
    return gates


@contextlib.contextmanager
def record_attention(model: nn.Module) -> Iterator[AttentionMaps]:
    """Capture every CBAM gate output of the forward passes run inside the block.

    The yielded dict fills in as the model runs: ``maps["layer3.1"]["channel"]`` is a detached
    ``(B, C)`` tensor and ``maps["layer3.1"]["spatial"]`` a detached ``(B, h, w)`` tensor (values in
    [0, 1], the sigmoid outputs). A gate that runs several times keeps its last output.

    Not thread-safe on one model by itself: hooks are per module, so two threads recording the
    same model at once would see each other's passes. :mod:`cbam_viz.cam` serialises per model.

    Example::

        with record_attention(model) as maps:
            logits = model(x)
        maps["layer4.1"]["spatial"].shape  # (B, 7, 7)
    """
    maps: AttentionMaps = {}
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def make_hook(block: str, kind: str):
        def hook(module: nn.Module, args, output: torch.Tensor) -> None:
            out = output.detach()
            # channel: (B, C, 1, 1) -> (B, C); spatial: (B, 1, h, w) -> (B, h, w)
            out = out.flatten(1) if kind == "channel" else out[:, 0]
            maps.setdefault(block, {})[kind] = out

        return hook

    try:
        for block, kind, module in cbam_gates(model):
            handles.append(module.register_forward_hook(make_hook(block, kind)))
        yield maps
    finally:
        # RemovableHandle.remove() is itself idempotent; clearing the list makes ours so too.
        while handles:
            handles.pop().remove()
