"""Record every attention gate's map during a forward pass, by module name (CBAM, SE, BAM).

CBAM (Woo et al., ECCV 2018, arXiv 1807.06521) gates each residual branch twice: a channel gate
``Mc`` of shape ``(B, C, 1, 1)`` and a spatial gate ``Ms`` of shape ``(B, 1, H, W)``. In
:mod:`cbam_viz.models.cbam` each gate is a named submodule (``layer3.1.cbam.channel``,
``layer3.1.cbam.spatial``) that *returns* its attention map, so a forward hook on it captures the
attention exactly as the network used it, with no second computation.

The family's other gates are recorded the same way (:func:`attention_gates`): an SE block's
``layer3.1.se.gate`` gives the block a ``"channel"`` map only (SE has no spatial gate); a BAM module
(``bam1``..``bam3``, at the stage transitions) gives its two branches as they are joined
(``"channel_branch"`` ``(B, C)`` and ``"spatial_branch"`` ``(B, h, w)``, logits before the sigmoid)
and its joint gate ``sigmoid(Mc + Ms)`` of shape ``(B, C, h, w)``, summarised as ``"channel"`` (its
mean over positions) and ``"spatial"`` (its mean over channels), the two pictures CBAM's gates give.

The hooks live only inside :func:`record_attention`; they are removed in ``finally`` whatever
happens, so after any call the model carries zero hooks.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from cbam_viz.models.bam import BAMChannel, BAMGate, BAMSpatial
from cbam_viz.models.se import SEGate

__all__ = ["record_attention", "cbam_gates", "attention_gates", "AttentionMaps"]

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


_BY_TYPE = ((SEGate, ".se.gate", "channel"), (BAMChannel, ".channel", "channel_branch"),
            (BAMSpatial, ".spatial", "spatial_branch"), (BAMGate, ".gate", "joint"))


def attention_gates(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """Every attention gate of ``model`` (CBAM, SE, BAM) as ``(owner, kind, module)``, in forward order.

    ``owner`` is the block (``"layer3.1"``) or the BAM module (``"bam2"``) the gate belongs to;
    ``kind`` is ``"channel"`` / ``"spatial"`` (CBAM), ``"channel"`` (SE) or ``"channel_branch"`` /
    ``"spatial_branch"`` / ``"joint"`` (BAM). A plain ResNet has none.
    """
    gates = cbam_gates(model)
    cbam_modules = {id(m) for _, _, m in gates}
    for name, module in model.named_modules():
        if id(module) in cbam_modules:
            continue
        for cls, suffix, kind in _BY_TYPE:
            if isinstance(module, cls) and name.endswith(suffix):
                gates.append((name[: -len(suffix)], kind, module))
    order = {id(m): i for i, m in enumerate(model.modules())}
    return sorted(gates, key=lambda g: order[id(g[2])])


def _store(maps: AttentionMaps, owner: str, kind: str, output: torch.Tensor) -> None:
    out = output.detach()
    entry = maps.setdefault(owner, {})
    if kind == "joint":  # BAM's (B, C, h, w) gate: the two pictures a channel and a spatial gate give
        entry["channel"] = out.mean(dim=(2, 3))
        entry["spatial"] = out.mean(dim=1)
    elif kind in ("channel", "channel_branch"):  # (B, C, 1, 1) -> (B, C)
        entry[kind] = out.flatten(1)
    else:  # spatial maps (B, 1, h, w) -> (B, h, w)
        entry[kind] = out[:, 0]


@contextlib.contextmanager
def record_attention(model: nn.Module) -> Iterator[AttentionMaps]:
    """Capture every attention gate output (CBAM, SE, BAM) of the forward passes run inside the block.

    The yielded dict fills in as the model runs: ``maps["layer3.1"]["channel"]`` is a detached
    ``(B, C)`` tensor and ``maps["layer3.1"]["spatial"]`` a detached ``(B, h, w)`` tensor (values in
    [0, 1], the sigmoid outputs). A gate that runs several times keeps its last output.

    Not thread-safe on one model by itself: hooks are per module, so two threads recording the
    same model at once would see each other's passes. :mod:`cbam_viz.engine.cam` serialises per model.

    Example::

        with record_attention(model) as maps:
            logits = model(x)
        maps["layer4.1"]["spatial"].shape  # (B, 7, 7)
    """
    maps: AttentionMaps = {}
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def make_hook(block: str, kind: str):
        def hook(module: nn.Module, args, output: torch.Tensor) -> None:
            _store(maps, block, kind, output)

        return hook

    try:
        for block, kind, module in attention_gates(model):
            handles.append(module.register_forward_hook(make_hook(block, kind)))
        yield maps
    finally:
        # RemovableHandle.remove() is itself idempotent; clearing the list makes ours so too.
        while handles:
            handles.pop().remove()
