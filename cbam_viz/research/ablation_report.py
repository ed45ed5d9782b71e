"""Gate ablation over a dataset (``python -m cbam_viz ablate-gates``), its report and the app's chart.

For every gated member of a lineup (CBAM, SE, BAM: whatever its gates,
:func:`cbam_viz.research.gate_ablation.ablation_grid`; a plain ResNet has nothing to ablate and is
listed as skipped), the top-1 accuracy with each gate ablation on an ImageFolder split, and its
drop from the intact model with a paired bootstrap 95 % interval over the same images
(:func:`cbam_viz.stats.paired_bootstrap`). The comparison is within a member
(ablated vs intact), so a lineup of one gated model runs the same way. Images are read and labelled
as ``evaluate`` reads them (:func:`cbam_viz.training.evaluate.labelled_images`,
:func:`cbam_viz.training.evaluate.image_batches`).
"""
from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from cbam_viz import distributed
from cbam_viz.engine.lineup import Lineup
from cbam_viz.engine.loading import LoadedModel
from cbam_viz.engine.locks import model_lock
from cbam_viz.outputs import atomic_write_text, json_float, prepare_output_dir, write_json
from cbam_viz.research.gate_ablation import (
    GATE_KINDS, GateMeans, ablate_gates, ablation_grid, gate_sums, gated_blocks, means_from_sums, save_gate_means,
)
from cbam_viz.research.shards import image_share, merge_partial_sums
from cbam_viz.stats import paired_bootstrap
from cbam_viz.training.evaluate import image_batches, labelled_images

__all__ = ["ablation_chart", "ablate_dataset", "ablate_lineup", "markdown_report", "write_report"]


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


def _count(loaded: LoadedModel, images, grid, *, constant: str, means: GateMeans | None, batch_size: int,
           workers: int, progress: bool) -> tuple[dict, dict]:
    """Per image: is the intact / each ablated model right, and how much the intact top-1 class's probability moves."""
    model = loaded.model
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
    return correct, prob_change


def _shared_means(loaded: LoadedModel, share, ctx, **batch_kw) -> GateMeans:
    """The gate means over *every* rank's images: each rank sums its share's gates and every rank
    gets the partial sums added up in rank order (it ablates with them next); one process: gate_means."""
    sums, n = gate_sums(loaded.model, image_batches(share, loaded, desc="gate means", **batch_kw))
    total = merge_partial_sums({"sums": sums, "n": n}, ctx, everywhere=True)
    return means_from_sums(total["sums"], total["n"])


def _gather_counts(correct: dict, prob_change: dict, mine: list[int], ctx) -> tuple[dict, dict] | None:
    """:func:`_count`'s per-image lists of every rank, in image order, on rank 0 (None elsewhere)."""
    keys, grid = list(correct), list(prob_change)
    rows = distributed.gather_ordered(
        [(i, ([correct[k][j] for k in keys], [prob_change[k][j] for k in grid])) for j, i in enumerate(mine)], ctx)
    if rows is None:
        return None
    return ({k: [r[0][c] for r in rows] for c, k in enumerate(keys)},
            {k: [r[1][c] for r in rows] for c, k in enumerate(grid)})


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
) -> tuple[dict[str, Any] | None, GateMeans | None]:
    """Top-1 accuracy of ``loaded``'s model with each gate ablation, on an ImageFolder split.

    Every ablation sees the same images as the intact model, so its accuracy drop
    ``top1(intact) - top1(ablated)`` gets a paired bootstrap 95 % interval over images. The mean
    change in the intact top-1 class's probability is reported too: it moves long before the
    accuracy does.

    With ``constant="mean"`` and no ``means``, the gate means are computed first, in one extra
    intact pass over the same images (mean ablation on the evaluated split itself).

    Under torchrun (:mod:`cbam_viz.research.shards`) each rank takes an even share of the images;
    rank 0 gathers the per-image outcomes (right or not, the probability change) in image order
    and returns the one-process report, bootstrapped on them with the same seed; the other ranks
    return ``(None, None)``. The gate means add up every rank's partial sums (every rank needs them).

    Returns:
        ``(report, means)``: the JSON-ready report (``rows``: one per ablation, see
        :func:`markdown_report`) and the means used (None for ``constant="one"``).

    Raises:
        ValueError: the model has no gate.
        cbam_viz.training.evaluate.ClassMismatchError: the class folders are not the model's classes.
    """
    t0 = time.perf_counter()
    model = loaded.model
    if not gated_blocks(model):  # a plain ResNet fails here, before any work
        raise ValueError(f"{loaded.name} has no attention gate to ablate (a plain ResNet?)")
    ctx = distributed.context()
    images = labelled_images(loaded.class_ids, data_dir, model_name=loaded.name, max_images=max_images)
    share, mine = image_share(images, ctx)
    progress = progress and ctx.main
    grid = ablation_grid(model, gates=gates)
    if constant == "mean" and means is None:
        means = _shared_means(loaded, share, ctx, batch_size=batch_size, workers=workers, progress=progress)
    gathered = _gather_counts(*_count(loaded, share, grid, constant=constant, means=means, batch_size=batch_size,
                                      workers=workers, progress=progress), mine, ctx)
    if gathered is None:  # a rank other than 0: its outcomes went to rank 0
        return None, None
    correct, prob_change = gathered
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
                     "torch_threads": torch.get_num_threads(), "device": str(next(model.parameters()).device)},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return report, means


def ablate_lineup(lineup: Lineup, data_dir: str | os.PathLike, **kw) -> tuple[dict[str, Any], dict[str, GateMeans]]:
    """:func:`ablate_dataset` for every gated member of ``lineup``, in its order.

    Returns:
        ``(report, means)``: ``{"lineup", "reference", "members", "skipped" (members without a
        gate), "models": {member: ablate_dataset's report}}`` and ``{member: means}`` (members with
        means only); ``(None, None)`` on a torchrun rank other than 0.

    Raises:
        ValueError: no member has a gate.
    """
    gated = [m for m in lineup.members if gated_blocks(m.model)]
    if not gated:
        raise ValueError(f"no member of lineup {lineup.name!r} has an attention gate to ablate "
                         f"({', '.join(lineup.names)})")
    models, means = {}, {}
    for member in gated:
        models[member.name], member_means = ablate_dataset(member, data_dir, **kw)
        if member_means is not None:
            means[member.name] = member_means
    if any(m is None for m in models.values()):
        return None, None
    report = {"lineup": lineup.name, "reference": lineup.reference, "members": lineup.names,
              "skipped": [m.name for m in lineup.members if m not in gated], "models": models}
    return report, means


def _member_markdown(report: Mapping[str, Any]) -> list[str]:
    m = report["model"]
    replaced = "its off value (1; 0 for BAM's joint gate)" if report["constant"] == "one" else \
        "its dataset mean (over these same images unless given)"
    lines = [f"### {m['name']} ({m['arch']})", "",
             f"{report['n']} images from `{report['data']}` at {m['input_size']} px. Each row replaces a "
             f"gate by {replaced}. Intact top-1: **{100 * report['intact_top1']:.1f} %**.", ""]
    if not m["trained"]:
        lines += ["> **Untrained model**: these numbers describe a random network.", ""]
    lines += ["| block | gate | top-1 | drop [95 % CI] | Δp |", "|---|---|---:|---|---:|"]
    for r in report["rows"]:
        d = r["drop"]
        ci = "n/a" if d["value"] is None else \
            f"{100 * d['value']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
        lines.append(f"| {r['block']} | {r['gate']} | {100 * r['top1']:.1f} % | {ci} | {r['mean_prob_change']:+.3f} |")
    return lines + ["", f"Run time: {report['seconds']:.0f} s, {report['settings']['torch_threads']} threads.", ""]


def markdown_report(report: Mapping[str, Any]) -> str:
    """The ``ablate-gates`` tables, one per gated member: accuracy of each ablation and its drop with a 95 % interval."""
    lines = [f"## Gate ablation: lineup {report['lineup']}", "",
             "Drop = intact − ablated top-1 in points, with a paired bootstrap 95 % interval over the same "
             "images; Δp = mean change (ablated − intact, so negative when the gate helped) of the intact top-1 "
             "class's probability. `both`: every gate of the block (BAM: its joint gate).", ""]
    if report["skipped"]:
        lines += [f"No gate to ablate: {', '.join(report['skipped'])}.", ""]
    for member in report["models"].values():
        lines += _member_markdown(member)
    return "\n".join(lines)


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def write_report(report: Mapping[str, Any], out: str | os.PathLike, *, means: Mapping[str, GateMeans] | None = None,
                 stem: str = "gate_ablation") -> dict[str, Path]:
    """Write ``<stem>.md``, ``<stem>.json`` (last) and, given ``means``, ``gate_means_<member>.npz`` to
    ``out``, atomically (a report of :func:`ablate_lineup`)."""
    out = prepare_output_dir(out)
    paths = {"markdown": out / f"{stem}.md", "json": out / f"{stem}.json"}
    for member, member_means in (means or {}).items():
        paths[f"means {member}"] = save_gate_means(member_means, out / f"gate_means_{_file_safe(member)}.npz")
    atomic_write_text(paths["markdown"], markdown_report(report))
    write_json(report, paths["json"])
    return paths
