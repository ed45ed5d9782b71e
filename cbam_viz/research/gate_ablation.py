"""Gate ablation: does a model actually *use* the attention of its gates?

CBAM (Woo et al., ECCV 2018, arXiv 1807.06521) multiplies each residual branch by a channel gate
``Mc(x)`` of shape ``(B, C, 1, 1)`` and then a spatial gate ``Ms(x')`` of shape ``(B, 1, H, W)``;
SE (Hu et al., arXiv 1709.01507) has the channel gate only; BAM (Park et al., arXiv 1807.06514)
one joint gate ``M`` of shape ``(B, C, H, W)`` at each stage transition, applied as ``x * (1 + M)``.
A gate map can look meaningful and still not matter: later layers may have learnt to compensate.
The direct test is to take the gate away and watch the output. Here a gate is replaced by a
constant, either

* ``"one"``: the gate is switched off: the value that makes its module the identity (1 for a
  CBAM or SE gate, ``x * 1``: the plain ResNet block; 0 for BAM's joint gate, ``x * (1 + 0)``), or
* ``"mean"``: the gate's dataset mean (a per-channel vector for a channel gate and for BAM's
  joint gate, one scalar for a spatial gate), i.e. "mean ablation": the network keeps the gate's
  average scaling and loses only its input-dependent part, which separates *using the attention*
  from *relying on the average rescaling* a gate also applies.

Gates are found by module name and type (:func:`cbam_viz.engine.attention.attention_gates`), so
every member of the attention family ablates the same way: ``gate="channel"`` / ``"spatial"`` /
``"both"`` of a CBAM block, ``"channel"`` of an SE block, ``"both"`` (the joint gate) of a BAM
module. The replacement is a forward hook on the gate submodule returning the constant,
shape-matched, so the rest of the forward is untouched code. The hooks live only inside
:func:`ablate_gates`, which holds the model's one lock (:func:`cbam_viz.engine.locks.model_lock`)
for its whole duration: a concurrent request on the same model waits and then runs the intact model.

Measured per image (:func:`ablation_effects`, :func:`ablate_image`): the change in the
probability of the intact model's top-1 class, and the Pearson correlation between the intact and
the ablated Grad-CAM of that class, per (block, gate). Over a dataset: :mod:`cbam_viz.research.ablation_report`.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from cbam_viz.engine.attention import attention_gates
from cbam_viz.engine.cam import compute_cams
from cbam_viz.engine.loading import LoadedModel
from cbam_viz.engine.locks import model_lock
from cbam_viz.engine.preprocess import to_model_batch
from cbam_viz.outputs import json_float, write_npz
from cbam_viz.stats import pearson

__all__ = [
    "GATE_KINDS", "ALL_BLOCKS", "CONSTANTS", "GateMeans", "ablatable_gates", "gated_blocks", "ablation_grid",
    "ablate_gates", "gate_means", "gate_sums", "means_from_sums", "save_gate_means", "load_gate_means", "ablation_effects", "ablate_image",
]

#: What an ablation replaces: the channel gate, the spatial gate, or both (BAM: its joint gate).
GATE_KINDS = ("channel", "spatial", "both")
#: Block name meaning "every gated block of the model at once".
ALL_BLOCKS = "all"
#: Replacement values: ``"one"`` (gate off) or ``"mean"`` (the gate's dataset mean).
CONSTANTS = ("one", "mean")
#: The gate modules an ablation replaces (``attention_gates`` kinds) and the value that switches each off.
_OFF = {"channel": 1.0, "spatial": 1.0, "joint": 0.0}
#: Which gate modules each choice of ``gate`` replaces.
_TOUCHES = {"channel": ("channel",), "spatial": ("spatial",), "both": ("channel", "spatial", "joint")}

# block -> {"channel": (C,) tensor, "spatial": () tensor, "joint": (C,) tensor}: the kinds it has
GateMeans = dict[str, dict[str, torch.Tensor]]


# ----------------------------------------------------------------------------------- ablation


def ablatable_gates(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """``(block, kind, module)`` of every gate an ablation can replace, in forward order: CBAM's
    ``"channel"`` and ``"spatial"``, SE's ``"channel"``, BAM's ``"joint"`` (not its two branch logits)."""
    return [g for g in attention_gates(model) if g[1] in _OFF]


def gated_blocks(model: nn.Module) -> list[str]:
    """Names of the blocks (or BAM modules) holding a gate (``"layer1.0"``, ``"bam1"``...), in forward order."""
    return list(dict.fromkeys(block for block, _, _ in ablatable_gates(model)))


def _kinds_of(model: nn.Module) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for block, kind, _ in ablatable_gates(model):
        out.setdefault(block, set()).add(kind)
    return out


def _applies(kinds: set[str], gate: str) -> bool:
    """Whether ``gate`` names something a block with ``kinds`` has ("both" of an SE block is its channel row)."""
    if gate == "both":
        return "joint" in kinds or {"channel", "spatial"} <= kinds
    return gate in kinds


def ablation_grid(model: nn.Module, *, gates: Sequence[str] = GATE_KINDS,
                  include_all: bool = True) -> list[tuple[str, str]]:
    """Every ``(block, gate)`` ablation the model has: each block x ``gates`` it has, then
    :data:`ALL_BLOCKS` x each of ``gates`` some block has."""
    kinds = _kinds_of(model)
    rows = [(block, gate) for block, k in kinds.items() for gate in gates if _applies(k, gate)]
    if include_all:
        rows += [(ALL_BLOCKS, gate) for gate in gates if any(_applies(k, gate) for k in kinds.values())]
    return rows


def _check_ablation(model: nn.Module, blocks: str | Sequence[str], gate: str, constant: str,
                    means: GateMeans | None) -> list[tuple[str, str]]:
    """The ``(block, kind)`` gates an ablation replaces; exact errors for wrong names or a missing mean."""
    kinds = _kinds_of(model)
    if not kinds:
        raise ValueError(f"{type(model).__name__} has no attention gate to ablate (a plain ResNet?)")
    if gate not in GATE_KINDS:
        raise ValueError(f"unknown gate {gate!r}; choose one of: {', '.join(GATE_KINDS)}")
    if constant not in CONSTANTS:
        raise ValueError(f"unknown constant {constant!r}; choose one of: {', '.join(CONSTANTS)}")
    names = list(kinds) if blocks == ALL_BLOCKS else [blocks] if isinstance(blocks, str) else list(blocks)
    unknown = [b for b in names if b not in kinds]
    if unknown:
        raise ValueError(f"no gated block {unknown}; the model's blocks are: {', '.join(kinds)} (or {ALL_BLOCKS!r})")
    chosen = [(b, k) for b in names for k in _TOUCHES[gate] if k in kinds[b]]
    if not chosen:
        has = sorted(set().union(*(kinds[b] for b in names)))
        raise ValueError(f"{', '.join(names)} has no {gate} gate; it has: {', '.join(has)}")
    if constant == "mean":
        missing = [f"{b}.{k}" for b, k in chosen if k not in (means or {}).get(b, {})]
        if missing:
            raise ValueError(f"constant='mean' needs the dataset means of {', '.join(missing)} (see gate_means)")
    return chosen


def _constant_hook(kind: str, value: torch.Tensor | None):
    """A forward hook replacing a gate's output by ``value`` (None: the gate's off value), broadcast to its shape."""

    def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        if value is None:
            return torch.full_like(output, _OFF[kind])
        v = value.to(device=output.device, dtype=output.dtype)
        # channel / joint: (C,) -> (1, C, 1, 1); spatial: a scalar. A new tensor, never a view of `value`.
        return (v if v.ndim == 0 else v.view(1, -1, 1, 1)).expand_as(output).clone()

    return hook


@contextlib.contextmanager
def ablate_gates(
    model: nn.Module,
    *,
    blocks: str | Sequence[str] = ALL_BLOCKS,
    gate: str = "both",
    constant: str = "one",
    means: GateMeans | None = None,
) -> Iterator[nn.Module]:
    """Run the ``with`` block with the chosen gates replaced by a constant.

    The model's lock is held throughout (other threads' passes wait, then see the intact model),
    and the hooks are removed in ``finally``, also when the block raises.

    Args:
        model: a gated model (CBAM, SE or BAM; gates found by :func:`ablatable_gates`).
        blocks: a block name (``"layer3.1"``, ``"bam2"``), several, or :data:`ALL_BLOCKS`.
        gate: ``"channel"``, ``"spatial"`` or ``"both"`` (every gate of the block; BAM's joint gate).
        constant: ``"one"`` (gate off) or ``"mean"`` (needs ``means``, from :func:`gate_means`).
        means: per-block dataset means of the gates.

    Raises:
        ValueError: unknown block, gate or constant; a block without that gate; a mean missing; a
            model without gates.

    Example::

        with ablate_gates(model, blocks="layer4.1", gate="spatial"):
            logits = model(x)
    """
    chosen = set(_check_ablation(model, blocks, gate, constant, means))
    handles: list[torch.utils.hooks.RemovableHandle] = []
    with model_lock(model):
        try:
            for block, kind, module in ablatable_gates(model):
                if (block, kind) in chosen:
                    value = means[block][kind] if constant == "mean" else None
                    handles.append(module.register_forward_hook(_constant_hook(kind, value)))
            yield model
        finally:
            while handles:
                handles.pop().remove()


def gate_means(model: nn.Module, batches) -> GateMeans:
    """Dataset mean of every gate: the constants of a ``constant="mean"`` ablation.

    Args:
        model: a gated model (eval mode).
        batches: an iterable of normalised ``(B, 3, S, S)`` tensors, or of ``(x, labels)`` pairs
            as :func:`cbam_viz.training.evaluate.image_batches` yields.

    Returns:
        ``{block: {"channel": (C,), "spatial": (), "joint": (C,)}}`` (the kinds the block has),
        float32: a channel gate averaged over images, a spatial gate over images and positions,
        BAM's joint gate per channel over images and positions.
    """
    return means_from_sums(*gate_sums(model, batches))


def gate_sums(model: nn.Module, batches) -> tuple[dict[tuple[str, str], torch.Tensor], int]:
    """The sums behind :func:`gate_means` (float64, per ``(block, kind)``) and the number of images:
    what one torchrun rank adds up over its share of the images (``{}``, 0 for no image)."""
    gates = ablatable_gates(model)
    sums: dict[tuple[str, str], torch.Tensor] = {}
    handles = []

    def make_hook(key: tuple[str, str]):
        def hook(module, args, output):
            out = output.detach().cpu().double()  # float64 on the CPU: MPS has no float64
            part = out.mean((1, 2, 3)).sum() if key[1] == "spatial" else out.mean((2, 3)).sum(0)
            sums[key] = sums.get(key, 0.0) + part
        return hook

    n = 0
    with model_lock(model):
        try:
            handles = [m.register_forward_hook(make_hook((b, k))) for b, k, m in gates]
            for batch in batches:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                with torch.no_grad():
                    model(x.to(_device(model)))
                n += x.shape[0]
        finally:
            for h in handles:
                h.remove()
    return sums, n


def means_from_sums(sums: dict[tuple[str, str], torch.Tensor], n: int) -> GateMeans:
    """:func:`gate_sums` (of one process, or added up over the ranks) -> :func:`gate_means`' result."""
    if n == 0:
        raise ValueError("no images to average the gates over")
    out: GateMeans = {}
    for (block, kind), v in sums.items():
        out.setdefault(block, {})[kind] = (v / n).float()
    return out


def save_gate_means(means: GateMeans, path: str | os.PathLike) -> Path:
    """Write :func:`gate_means` as ``.npz`` (keys ``<block>/<kind>``), atomically."""
    return write_npz({f"{b}/{k}": v.numpy() for b, g in means.items() for k, v in g.items()}, path)


def load_gate_means(path: str | os.PathLike) -> GateMeans:
    """Read a file of :func:`save_gate_means` (e.g. a ``gate_means_<member>.npz`` of ``ablate-gates --constant mean``)."""
    out: GateMeans = {}
    with np.load(path) as data:
        for key in data.files:
            block, _, kind = key.rpartition("/")
            out.setdefault(block, {})[kind] = torch.from_numpy(data[key].astype(np.float32))
    return out


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# --------------------------------------------------------------------------------- per image


def ablation_effects(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    ablations: Sequence[tuple[str, str]] | None = None,
    constant: str = "one",
    means: GateMeans | None = None,
    layer: str | None = None,
    method: str = "gradcam",
) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """Per image of a batch, what each ablation does to the prediction and to the CAM.

    The intact model's top-1 class of each image is the reference: its probability and its CAM
    (``method`` at ``layer``, default the last block of ``layer4``) are compared with the ablated
    model's, for the *same* class, so a changed explanation is not confused with a changed target.

    Args:
        model: a gated model (eval mode).
        inputs: normalised ``(B, 3, S, S)`` batch.
        ablations: ``(block, gate)`` pairs; default :func:`ablation_grid`.
        constant, means: see :func:`ablate_gates`.
        layer, method: the CAM compared (:func:`cbam_viz.engine.cam.compute_cams`).

    Returns:
        ``{(block, gate): {"prob_change": (B,), "cam_correlation": (B,)}}`` (float64; see
        :func:`pearson` for flat maps), plus the key
        ``("intact", "")`` with ``"class"`` (B,) and ``"prob"`` (B,) of the intact model.
    """
    ablations = ablation_grid(model) if ablations is None else list(ablations)
    with model_lock(model):
        intact = compute_cams(model, inputs, method=method, layer=layer)
        targets = intact.targets
        index = torch.tensor(targets).view(-1, 1)
        p0 = intact.logits.softmax(1).gather(1, index)[:, 0].double().numpy()
        out: dict[tuple[str, str], dict[str, np.ndarray]] = {
            ("intact", ""): {"class": np.asarray(targets), "prob": p0}}
        for block, gate in ablations:
            with ablate_gates(model, blocks=block, gate=gate, constant=constant, means=means):
                res = compute_cams(model, inputs, method=method, layer=layer, targets=targets)
            p = res.logits.softmax(1).gather(1, index)[:, 0].double().numpy()
            corr = np.array([pearson(a, b) for a, b in zip(intact.cams, res.cams)])
            out[(block, gate)] = {"prob_change": p - p0, "cam_correlation": corr}
    return out


def ablate_image(
    loaded: LoadedModel,
    image: Image.Image,
    *,
    constant: str = "one",
    means: GateMeans | None = None,
    gates: Sequence[str] = GATE_KINDS,
    include_all: bool = True,
    layer: str | None = None,
) -> list[dict[str, Any]]:
    """One call for the app: ablate every (block, gate) of ``loaded``'s model on one picture.

    Args:
        loaded: a gated member of a lineup (CBAM, SE or BAM).
        image: an RGB picture, preprocessed as the app does (its input size, mean and std).
        constant, means: see :func:`ablate_gates` (means: :func:`load_gate_means` of a dataset run).
        gates, include_all: which rows (see :func:`ablation_grid`).
        layer: CAM layer (default: last block of ``layer4``).

    Returns:
        Table rows ``{"block", "gate", "prob_change", "cam_correlation"}`` (floats), in forward
        order, the all-blocks rows last. Draw them with
        :func:`cbam_viz.research.ablation_report.ablation_chart`, or hand them to ``gr.BarPlot``.
    """
    x = to_model_batch([image], loaded.input_size, loaded.mean, loaded.std)
    grid = ablation_grid(loaded.model, gates=gates, include_all=include_all)
    effects = ablation_effects(loaded.model, x, ablations=grid, constant=constant, means=means, layer=layer)
    return [{"block": block, "gate": gate, "prob_change": json_float(effects[(block, gate)]["prob_change"][0]),
             "cam_correlation": json_float(effects[(block, gate)]["cam_correlation"][0])}
            for block, gate in grid]
