"""The model passes of ``evaluate-cams``, over this process's share of the boxed images (issue 31).

Every member's CAMs per method, scored per image (:func:`run_methods`), and every spatial-gate map
scored per image (:func:`spatial_gates`). Under ``torchrun`` each rank takes an even share of the
images of each method (:func:`cbam_viz.distributed.shard`) and rank 0 gathers, per image, what
the report is computed from: the scores (numbers and short arrays: the IoU curve, the MoRF/LeRF
probabilities) and the stored 112 px uint8 CAM; never a photo or a model. So rank 0 holds the
lists one process builds, in the same order, and bootstraps them with the same seed; the other
ranks get None. Without torchrun a process takes every image.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from cbam_viz import distributed
from cbam_viz.distributed import DistContext
from cbam_viz.engine.attention import record_attention
from cbam_viz.engine.explain import ModelExplanation, explain
from cbam_viz.engine.faithfulness import blur_fill_image, perturbation_scores, resize_cam
from cbam_viz.engine.lineup import Lineup
from cbam_viz.engine.preprocess import to_model_batch
from cbam_viz.research.quality.boxed_images import BoxedImages
from cbam_viz.research.quality.boxes import Box
from cbam_viz.research.quality.gates import image_gate_scores, summarize_gate_scores
from cbam_viz.research.quality.metrics import (
    DEFAULT_THRESHOLDS, box_hits_over_thresholds, energy_in_boxes, pointing_game,
)
from cbam_viz.research.quality.report import CAM_STORE_SIZE
from cbam_viz.training.evaluate import spread_indices

__all__ = ["run_methods", "spatial_gates"]


def _quantize(cam: np.ndarray) -> np.ndarray:
    small = cv2.resize(cam.astype(np.float32), (CAM_STORE_SIZE, CAM_STORE_SIZE), interpolation=cv2.INTER_AREA)
    return np.clip(np.rint(small * 255), 0, 255).astype(np.uint8)


def _score_cam(
    me: ModelExplanation, boxes: Sequence[Box], model: torch.nn.Module, x: torch.Tensor, *,
    fractions: tuple[float, ...], imputer: str, fill: torch.Tensor | None,
) -> dict[str, Any]:
    """Every per-image value of one model's CAM: localization on the image, faithfulness on ``x``."""
    cam = me.cam
    cam_in = cam if cam.shape == tuple(x.shape[-2:]) else resize_cam(cam, x.shape[-2:])
    p0 = next(p.prob for p in me.predictions if p.index == me.target)
    s = perturbation_scores(model, x, cam_in, me.target, fractions=fractions, imputer=imputer, p_original=p0,
                            fill=fill)
    return {"pointing": pointing_game(cam, boxes), "energy": energy_in_boxes(cam, boxes),
            "ious": box_hits_over_thresholds(cam, boxes, thresholds=DEFAULT_THRESHOLDS),
            "p": s["p"], "morf": s["morf"], "lerf": s["lerf"], "top1": me.predictions[0].index}


def _run_method(
    method: str, imgs: BoxedImages, index: np.ndarray, lineup: Lineup, *, layer: str | None, batch_size: int,
    fractions: tuple[float, ...], imputer: str, fills: dict[tuple, torch.Tensor], bar,
) -> tuple[dict[str, list[dict]], dict[str, np.ndarray]]:
    """Every member's CAMs of the true class on the images ``index``, scored.

    Returns:
        ``({member: [values of each image]}, {member: (len(index), 112, 112) uint8 CAMs})``.
        ``fills`` caches the blur background per (image, model preprocessing) across methods.
    """
    values: dict[str, list[dict]] = {name: [] for name in lineup.names}
    store = {name: np.zeros((len(index), CAM_STORE_SIZE, CAM_STORE_SIZE), np.uint8) for name in lineup.names}
    num_classes = len(lineup.reference_model.classes)
    for start in range(0, len(index), batch_size):
        chunk = index[start:start + batch_size]
        photos = [imgs.images[i] for i in chunk]
        exps = explain(photos, lineup, method=method, target=[imgs.targets[i] for i in chunk], layer=layer,
                       topk=num_classes)
        for member in lineup.members:
            batch = to_model_batch(photos, member.input_size, member.mean, member.std)
            for j, (i, exp) in enumerate(zip(chunk, exps)):
                me, x = exp.models[member.name], batch[j]
                fkey = (int(i), member.input_size, tuple(member.mean), tuple(member.std))
                if imputer == "blur" and fkey not in fills:
                    fills[fkey] = blur_fill_image(x)
                values[member.name].append(_score_cam(me, imgs.boxes[imgs.keys[i]], member.model, x,
                                                      fractions=fractions, imputer=imputer, fill=fills.get(fkey)))
                store[member.name][start + j] = _quantize(me.cam)
        bar.update(len(chunk))
    return values, store


def _spatial_gate_maps(imgs: BoxedImages, indices: Sequence[int], member, *,
                      batch_size: int) -> list[dict[str, np.ndarray]]:
    """Every spatial-gate map of ``member`` for the images ``indices`` (``[]`` for a member without
    one): plain forwards. The gates do not depend on the CAM method or the target class, so they
    are recorded once.
    """
    out: list[dict[str, np.ndarray]] = []
    for start in range(0, len(indices), batch_size):
        photos = [imgs.images[i] for i in indices[start:start + batch_size]]
        x = to_model_batch(photos, member.input_size, member.mean, member.std)
        with member.lock, torch.no_grad(), record_attention(member.model) as maps:
            member.model(x.to(member.device))
        spatial = {owner: g["spatial"] for owner, g in maps.items() if "spatial" in g}
        if not spatial:
            return []
        out += [{owner: m[j].float().cpu().numpy() for owner, m in spatial.items()} for j in range(len(x))]
    return out


def run_methods(imgs: BoxedImages, lineup: Lineup, methods: Sequence[str], *, method_limits: Mapping[str, int],
                progress: bool, ctx: DistContext, **run_kw) -> tuple[dict, dict, dict, dict] | None:
    """Every method over this rank's share of its images (``method_limits``: an evenly spread subset).

    Returns:
        On rank 0 ``(values, cams, timings, index)`` of every image, in order: per method
        ``{member: [values of each image]}``, ``{"<method>/<member>": (n, 112, 112) uint8}``,
        ``{"wall_s", "cpu_s", "images"}`` and the image indices; None on the other ranks.
    """
    n = len(imgs.keys)
    index = {m: spread_indices(n, method_limits.get(m)) for m in methods}
    mine = {m: [pos for pos, _ in distributed.shard(index[m], ctx)] for m in methods}  # positions in index[m]
    values: dict[str, dict[str, list[dict]]] = {}
    cams: dict[str, np.ndarray] = {}
    timings: dict[str, dict[str, float]] = {}
    fills: dict[tuple, torch.Tensor] = {}  # blur background per (image, preprocessing): the same for every CAM
    with tqdm(total=sum(len(p) for p in mine.values()), desc="evaluate-cams", unit="img",
              disable=not progress or not ctx.main) as bar:
        for method in methods:
            t0, c0 = time.perf_counter(), time.process_time()
            bar.set_postfix_str(method)
            own, store = _run_method(method, imgs, index[method][mine[method]], lineup, fills=fills, bar=bar,
                                     **run_kw)
            gathered = distributed.gather_ordered(
                [(pos, {name: (own[name][j], store[name][j]) for name in lineup.names})
                 for j, pos in enumerate(mine[method])], ctx)
            if gathered is None:  # a rank other than 0: its values went to rank 0
                continue
            values[method] = {name: [g[name][0] for g in gathered] for name in lineup.names}
            cams.update({f"{method}/{name}": np.stack([g[name][1] for g in gathered]) for name in lineup.names})
            timings[method] = {"wall_s": round(time.perf_counter() - t0, 2),
                               "cpu_s": round(time.process_time() - c0, 2), "images": len(index[method])}
    return (values, cams, timings, index) if ctx.main else None


def spatial_gates(imgs: BoxedImages, lineup: Lineup, *, batch_size: int, ctx: DistContext,
                  **score_kw) -> dict[str, Any] | None:
    """``{member: summarize_gate_scores(...)}`` for every member with spatial maps (CBAM, BAM), in
    order, on rank 0 (None on the other ranks): each rank scores its share of the images."""
    mine = [i for i, _ in distributed.shard(imgs.keys, ctx)]
    out = {}
    for member in lineup.members:  # every rank, every member: the gathers pair up
        maps = _spatial_gate_maps(imgs, mine, member, batch_size=batch_size)
        scores = [(i, image_gate_scores(m, imgs.images[i].size, imgs.boxes[imgs.keys[i]])) for i, m in zip(mine, maps)]
        gathered = distributed.gather_ordered(scores, ctx)
        if gathered:  # rank 0, a member with spatial gates
            out[member.name] = summarize_gate_scores(gathered, **score_kw)
    return out if ctx.main else None
