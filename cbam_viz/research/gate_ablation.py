"""Gate ablation: does ResNet-CBAM actually *use* the attention of a CBAM gate?

CBAM (Woo et al., ECCV 2018, arXiv 1807.06521) multiplies each residual branch by a channel gate
``Mc(x)`` of shape ``(B, C, 1, 1)`` and then a spatial gate ``Ms(x')`` of shape ``(B, 1, H, W)``.
A gate map can look meaningful and still not matter: later layers may have learnt to compensate.
The direct test is to take the gate away and watch the output. Here a gate is replaced by a
constant, either

* ``"one"``: the gate is switched off (``x * 1``: the plain ResNet block), or
* ``"mean"``: the gate's dataset mean (a per-channel vector for a channel gate, one scalar for a
  spatial gate), i.e. "mean ablation": the network keeps the gate's average scaling and loses
  only its input-dependent part, which separates *using the attention* from *relying on the
  average rescaling* a gate also applies.

The replacement is a forward hook on the gate submodule (``layer3.1.cbam.channel``) returning the
constant, shape-matched, so the rest of the forward is untouched code. The hooks live only inside
:func:`ablate_gates`, which holds the model's one lock (:func:`cbam_viz.pair.model_lock`) for its
whole duration: a concurrent request on the same model waits and then runs the intact model.

Measured per image (:func:`ablate_image`): the change in the probability of the intact model's
top-1 class, and the Pearson correlation between the intact and the ablated Grad-CAM of that
class, per (block, gate). Measured per dataset (:func:`ablate_dataset`, ``python -m cbam_viz
ablate-gates``): top-1 accuracy of every ablation and its drop from the intact model, with a
paired bootstrap 95 % interval over the same images (:func:`cbam_viz.research.quality.stats.paired_bootstrap`).
Images are read and labelled as ``evaluate`` reads them (:func:`cbam_viz.training.evaluate.labelled_images`,
:func:`cbam_viz.training.evaluate.image_batches`).
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from cbam_viz.attention import cbam_gates, record_attention
from cbam_viz.training.evaluate import image_batches, labelled_images
from cbam_viz.outputs import json_float
from cbam_viz.pair import LoadedModel, model_lock
from cbam_viz.research.quality.stats import pearson

__all__ = [
    "GATE_KINDS", "ALL_BLOCKS", "CONSTANTS", "GateMeans", "cbam_blocks", "ablation_grid", "ablate_gates",
    "gate_means", "save_gate_means", "load_gate_means", "ablation_effects", "ablate_image", "ablation_chart",
    "ablate_dataset", "markdown_report", "write_report",
]

#: What an ablation replaces: one of the two gates of a block, or both.
GATE_KINDS = ("channel", "spatial", "both")
#: Block name meaning "every CBAM block of the model at once".
ALL_BLOCKS = "all"
#: Replacement values: ``"one"`` (gate off) or ``"mean"`` (the gate's dataset mean).
CONSTANTS = ("one", "mean")

# block -> {"channel": (C,) tensor, "spatial": () tensor}
GateMeans = dict[str, dict[str, torch.Tensor]]


# ----------------------------------------------------------------------------------- ablation


def cbam_blocks(model: nn.Module) -> list[str]:
    """Names of the blocks holding a CBAM module (``"layer1.0"``...), in forward order."""
    return list(dict.fromkeys(block for block, _, _ in cbam_gates(model)))


def ablation_grid(model: nn.Module, *, gates: Sequence[str] = GATE_KINDS,
                  include_all: bool = True) -> list[tuple[str, str]]:
    """Every ``(block, gate)`` ablation: each block x ``gates``, then :data:`ALL_BLOCKS` x ``gates``."""
    blocks = cbam_blocks(model) + ([ALL_BLOCKS] if include_all else [])
    return [(block, gate) for block in blocks for gate in gates]


def _check_ablation(model: nn.Module, blocks: str | Sequence[str], gate: str, constant: str,
                    means: GateMeans | None) -> list[str]:
    """The block names an ablation touches; exact errors for wrong names or a missing mean."""
    known = cbam_blocks(model)
    if not known:
        raise ValueError(f"{type(model).__name__} has no CBAM gate to ablate (a baseline model?)")
    if gate not in GATE_KINDS:
        raise ValueError(f"unknown gate {gate!r}; choose one of: {', '.join(GATE_KINDS)}")
    if constant not in CONSTANTS:
        raise ValueError(f"unknown constant {constant!r}; choose one of: {', '.join(CONSTANTS)}")
    names = known if blocks == ALL_BLOCKS else [blocks] if isinstance(blocks, str) else list(blocks)
    unknown = [b for b in names if b not in known]
    if unknown:
        raise ValueError(f"no CBAM block {unknown}; the model's blocks are: {', '.join(known)} (or {ALL_BLOCKS!r})")
    if constant == "mean":
        kinds = ("channel", "spatial") if gate == "both" else (gate,)
        missing = [f"{b}.{k}" for b in names for k in kinds if k not in (means or {}).get(b, {})]
        if missing:
            raise ValueError(f"constant='mean' needs the dataset means of {', '.join(missing)} (see gate_means)")
    return names


def _constant_hook(kind: str, value: torch.Tensor | None):
    """A forward hook replacing a gate's output by ``value`` (None: ones), broadcast to its shape."""

    def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        if value is None:
            return torch.ones_like(output)
        v = value.to(device=output.device, dtype=output.dtype)
        # channel: (C,) -> (1, C, 1, 1); spatial: a scalar. A new tensor, never a view of `value`.
        return (v.view(1, -1, 1, 1) if kind == "channel" else v).expand_as(output).clone()

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
    """Run the ``with`` block with the chosen CBAM gates replaced by a constant.

    The model's lock is held throughout (other threads' passes wait, then see the intact model),
    and the hooks are removed in ``finally``, also when the block raises.

    Args:
        model: a CBAM model (its gates are found by name, :func:`cbam_viz.attention.cbam_gates`).
        blocks: a block name (``"layer3.1"``), several, or :data:`ALL_BLOCKS`.
        gate: ``"channel"``, ``"spatial"`` or ``"both"``.
        constant: ``"one"`` (gate off) or ``"mean"`` (needs ``means``, from :func:`gate_means`).
        means: per-block dataset means of the gates.

    Raises:
        ValueError: unknown block, gate or constant; a mean missing; a model without CBAM gates.

    Example::

        with ablate_gates(model, blocks="layer4.1", gate="spatial"):
            logits = model(x)
    """
    names = set(_check_ablation(model, blocks, gate, constant, means))
    kinds = {"channel", "spatial"} if gate == "both" else {gate}
    handles: list[torch.utils.hooks.RemovableHandle] = []
    with model_lock(model):
        try:
            for block, kind, module in cbam_gates(model):
                if block in names and kind in kinds:
                    value = means[block][kind] if constant == "mean" else None
                    handles.append(module.register_forward_hook(_constant_hook(kind, value)))
            yield model
        finally:
            while handles:
                handles.pop().remove()


def gate_means(model: nn.Module, batches) -> GateMeans:
    """Dataset mean of every CBAM gate: the constants of a ``constant="mean"`` ablation.

    Args:
        model: a CBAM model (eval mode).
        batches: an iterable of normalised ``(B, 3, S, S)`` tensors, or of ``(x, labels)`` pairs
            as :func:`image_batches` yields.

    Returns:
        ``{block: {"channel": (C,) float32, "spatial": () float32}}``: the channel gate averaged
        over images, the spatial gate over images and positions.
    """
    sums: dict[str, dict[str, torch.Tensor]] = {}
    n = 0
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        with model_lock(model), torch.no_grad(), record_attention(model) as maps:
            model(x.to(_device(model)))
        for block, gate in maps.items():
            acc = sums.setdefault(block, {"channel": 0.0, "spatial": 0.0})
            # float64 on the CPU: MPS has no float64
            acc["channel"] = acc["channel"] + gate["channel"].cpu().double().sum(0)
            acc["spatial"] = acc["spatial"] + gate["spatial"].cpu().double().mean((1, 2)).sum()
        n += x.shape[0]
    if n == 0:
        raise ValueError("no images to average the gates over")
    return {block: {kind: (v / n).float() for kind, v in acc.items()} for block, acc in sums.items()}


def save_gate_means(means: GateMeans, path: str | os.PathLike) -> Path:
    """Write :func:`gate_means` as ``.npz`` (keys ``<block>/channel``, ``<block>/spatial``), atomically."""
    from cbam_viz.outputs import write_npz

    return write_npz({f"{b}/{k}": v.numpy() for b, g in means.items() for k, v in g.items()}, path)


def load_gate_means(path: str | os.PathLike) -> GateMeans:
    """Read a file of :func:`save_gate_means` (e.g. the ``gate_means.npz`` of ``ablate-gates --constant mean``)."""
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
        model: a CBAM model (eval mode).
        inputs: normalised ``(B, 3, S, S)`` batch.
        ablations: ``(block, gate)`` pairs; default :func:`ablation_grid`.
        constant, means: see :func:`ablate_gates`.
        layer, method: the CAM compared (:func:`cbam_viz.cam.compute_cams`).

    Returns:
        ``{(block, gate): {"prob_change": (B,), "cam_correlation": (B,)}}`` (float64; see
        :func:`pearson` for flat maps), plus the key
        ``("intact", "")`` with ``"class"`` (B,) and ``"prob"`` (B,) of the intact model.
    """
    from cbam_viz.cam import compute_cams

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
        loaded: the CBAM member of a pair (``pair.cbam``).
        image: an RGB picture, preprocessed as the app does (its input size, mean and std).
        constant, means: see :func:`ablate_gates` (means: :func:`load_gate_means` of a dataset run).
        gates, include_all: which rows (see :func:`ablation_grid`).
        layer: CAM layer (default: last block of ``layer4``).

    Returns:
        Table rows ``{"block", "gate", "prob_change", "cam_correlation"}`` (floats), in forward order, the all-blocks rows last. Draw
        them with :func:`ablation_chart`, or hand them to ``gr.BarPlot`` as they are.
    """
    from cbam_viz.preprocess import to_model_batch

    x = to_model_batch([image], loaded.input_size, loaded.mean, loaded.std)
    grid = ablation_grid(loaded.model, gates=gates, include_all=include_all)
    effects = ablation_effects(loaded.model, x, ablations=grid, constant=constant, means=means, layer=layer)
    return [{"block": block, "gate": gate, "prob_change": json_float(effects[(block, gate)]["prob_change"][0]),
             "cam_correlation": json_float(effects[(block, gate)]["cam_correlation"][0])}
            for block, gate in grid]


# ------------------------------------------------------------------------------------ chart

_GATE_COLOURS = {"channel": (31, 119, 180), "spatial": (255, 127, 14), "both": (44, 160, 44)}
_ROW_H, _LABEL_W, _PANEL_W, _PAD = 14, 120, 220, 8


def ablation_chart(rows: Sequence[Mapping[str, Any]], *, title: str = "") -> Image.Image:
    """Two bar panels (change in top-1 probability; CAM correlation with the intact model) as a PIL image.

    Pure PIL, no matplotlib: the app can show it directly. Both axes span [-1, 1]; bars are
    coloured by gate (channel blue, spatial orange, both green); an undefined value has no bar.
    """
    font = ImageFont.load_default()
    top = _PAD + (2 if title else 1) * _ROW_H
    height = top + _ROW_H * len(rows) + _PAD + _ROW_H
    width = _LABEL_W + 2 * (_PANEL_W + _PAD) + _PAD
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((_PAD, _PAD), title, fill="black", font=font)
    for p, (key, label) in enumerate((("prob_change", "top-1 probability change"),
                                      ("cam_correlation", "CAM correlation"))):
        x0 = _LABEL_W + _PAD + p * (_PANEL_W + _PAD)
        mid = x0 + _PANEL_W // 2
        draw.text((x0, top - _ROW_H), label, fill="black", font=font)
        for i, row in enumerate(rows):
            y = top + i * _ROW_H
            if p == 0:
                draw.text((_PAD, y), f"{row['block']} {row['gate']}", fill="black", font=font)
            v = row.get(key)
            if v is None or not math.isfinite(v):
                continue
            end = mid + int(round(max(-1.0, min(1.0, v)) * _PANEL_W / 2))
            draw.rectangle([min(mid, end), y + 2, max(mid, end), y + _ROW_H - 3],
                           fill=_GATE_COLOURS.get(row["gate"], (128, 128, 128)))
        y_axis = top + _ROW_H * len(rows)
        draw.line([mid, top, mid, y_axis], fill="black")
        draw.line([x0, y_axis, x0 + _PANEL_W, y_axis], fill="gray")
        for v, left in ((-1, x0), (0, mid - 3), (1, x0 + _PANEL_W - 6)):  # inside the panel: no overlap
            draw.text((left, y_axis + 2), str(v), fill="gray", font=font)
    return img


# ----------------------------------------------------------------------------------- dataset


def ablate_dataset(
    loaded: LoadedModel,
    data_dir: str | os.PathLike,
    *,
    constant: str = "one",
    means: GateMeans | None = None,
    gates: Sequence[str] = GATE_KINDS,
    max_images: int | None = None,
    batch_size: int = 32,
    workers: int = 2,
    n_boot: int = 2000,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict[str, Any], GateMeans | None]:
    """Top-1 accuracy of ``loaded``'s model with each gate ablation, on an ImageFolder split.

    Every ablation sees the same images as the intact model, so its accuracy drop
    ``top1(intact) - top1(ablated)`` gets a paired bootstrap 95 % interval over images. The mean
    change in the intact top-1 class's probability is reported too: it moves long before the
    accuracy does.

    With ``constant="mean"`` and no ``means``, the gate means are computed first, in one extra
    intact pass over the same images (mean ablation on the evaluated split itself).

    Returns:
        ``(report, means)``: the JSON-ready report (``rows``: one per ablation, see
        :func:`markdown_report`) and the means used (None for ``constant="one"``).

    Raises:
        cbam_viz.training.evaluate.ClassMismatchError: the class folders are not the model's classes.
    """
    from tqdm.auto import tqdm

    from cbam_viz.research.quality.stats import paired_bootstrap

    t0 = time.perf_counter()
    model = loaded.model
    _check_ablation(model, ALL_BLOCKS, "both", "one", None)  # a baseline model fails here, before any work
    images = labelled_images(loaded.class_ids, data_dir, model_name=loaded.name, max_images=max_images)
    grid = ablation_grid(model, gates=gates)
    if constant == "mean" and means is None:
        means = gate_means(model, image_batches(images, loaded, batch_size=batch_size, workers=workers,
                                                progress=progress, desc="gate means"))
    correct = {key: [] for key in [("intact", ""), *grid]}
    prob_change = {key: [] for key in grid}
    with tqdm(total=len(images.files), desc=f"ablate {loaded.name}", unit="img", disable=not progress) as bar:
        for x, y in image_batches(images, loaded, batch_size=batch_size, workers=workers, progress=False):
            y = y.to(x.device)  # labels come on the CPU; a model on a GPU gets x there
            with model_lock(model), torch.no_grad():
                p0 = model(x).softmax(1)
                top = p0.argmax(1, keepdim=True)
                correct[("intact", "")] += (top[:, 0] == y).tolist()
                for block, gate in grid:
                    with ablate_gates(model, blocks=block, gate=gate, constant=constant, means=means):
                        p = model(x).softmax(1)
                    correct[(block, gate)] += (p.argmax(1) == y).tolist()
                    prob_change[(block, gate)] += (p.gather(1, top) - p0.gather(1, top))[:, 0].tolist()
            bar.update(len(y))
    base = np.asarray(correct[("intact", "")], np.float64)
    rows = []
    for block, gate in grid:
        ablated = np.asarray(correct[(block, gate)], np.float64)
        drop = paired_bootstrap(base, ablated, n_boot=n_boot, seed=seed)
        rows.append({"block": block, "gate": gate, "top1": json_float(ablated.mean()), "drop": drop.to_json(),
                     "mean_prob_change": json_float(np.mean(prob_change[(block, gate)]))})
    report = {
        "model": {"name": loaded.name, "arch": loaded.arch, "trained": loaded.trained,
                  "input_size": loaded.input_size},
        "data": str(data_dir), "n": len(base), "constant": constant, "intact_top1": json_float(base.mean()),
        "rows": rows,
        "settings": {"n_boot": n_boot, "seed": seed, "max_images": max_images, "batch_size": batch_size,
                     "torch_threads": torch.get_num_threads(), "device": str(_device(model))},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return report, means


def markdown_report(report: Mapping[str, Any]) -> str:
    """The ``ablate-gates`` table: accuracy of each ablation and its drop with a 95 % interval."""
    m = report["model"]
    replaced = "1 (gate off)" if report["constant"] == "one" else "its dataset mean (over these same images unless given)"
    lines = [f"## Gate ablation: {m['name']}", "",
             f"{report['n']} images from `{report['data']}` at {m['input_size']} px. Each row replaces a "
             f"CBAM gate by {replaced}. Intact top-1: **{100 * report['intact_top1']:.1f} %**. Drop = intact − "
             "ablated top-1 in points, with a paired bootstrap 95 % interval over the same images; "
             "Δp = mean change (ablated − intact, so negative when the gate helped) of the intact top-1 "
             "class's probability.", ""]
    if not m["trained"]:
        lines += ["> **Untrained model**: these numbers describe a random network.", ""]
    lines += ["| block | gate | top-1 | drop [95 % CI] | Δp |", "|---|---|---:|---|---:|"]
    for r in report["rows"]:
        d = r["drop"]
        ci = "n/a" if d["value"] is None else \
            f"{100 * d['value']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
        lines.append(f"| {r['block']} | {r['gate']} | {100 * r['top1']:.1f} % | {ci} | {r['mean_prob_change']:+.3f} |")
    lines += ["", f"Run time: {report['seconds']:.0f} s, {report['settings']['torch_threads']} threads.", ""]
    return "\n".join(lines)


def write_report(report: Mapping[str, Any], out: str | os.PathLike, *, means: GateMeans | None = None,
                 stem: str = "gate_ablation") -> dict[str, Path]:
    """Write ``<stem>.md``, ``<stem>.json`` (last) and, given ``means``, ``gate_means.npz`` to ``out``, atomically."""
    from cbam_viz.outputs import atomic_write_text, prepare_output_dir, write_json

    out = prepare_output_dir(out)
    paths = {"markdown": out / f"{stem}.md", "json": out / f"{stem}.json"}
    if means is not None:
        paths["means"] = save_gate_means(means, out / "gate_means.npz")
    atomic_write_text(paths["markdown"], markdown_report(report))
    write_json(report, paths["json"])
    return paths
