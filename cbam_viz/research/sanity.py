"""Sanity check for saliency maps: model-parameter randomisation (Adebayo et al., NeurIPS 2018).

"Sanity Checks for Saliency Maps" (arXiv 1810.03292) asks of an explanation method whether its
maps depend on what the model learnt. Its cascading randomisation re-initialises the network's
layers top-down (logits first, then deeper and deeper) and compares each map with the trained
model's: a method whose maps barely change when the weights are destroyed explains the image (an
edge detector would do as well), not the model. Grad-CAM passed in the paper; any method shown
in the app should pass on *our* models too.

Here the stages of a ResNet are re-initialised cumulatively: ``fc``, then ``layer4``, ``layer3``,
``layer2``, ``layer1`` and the stem (``conv1``/``bn1``), each step adding one stage, with every
module's own ``reset_parameters()`` (PyTorch's default init; BatchNorm back to weight 1, bias 0
and unit running statistics), seeded per step, on a deep copy: the original model is never
touched. CAMs (:func:`cbam_viz.engine.cam.compute_cams`) of the *same* class (the trained model's
prediction) are compared at each step by SSIM (:func:`ssim`) and Spearman rank correlation
(:func:`rank_correlation`), both on the [0, 1] maps at the input size.

A method passes (:func:`sanity_flags`) when its mean rank correlation at the fully randomised
step is below :data:`PASS_THRESHOLD`.
"""
from __future__ import annotations

import contextlib
import copy
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cbam_viz import distributed
from cbam_viz.distributed import DistContext
from cbam_viz.engine.cam import compute_cams
from cbam_viz.engine.lineup import Lineup
from cbam_viz.engine.loading import LoadedModel
from cbam_viz.engine.locks import model_lock
from cbam_viz.engine.preprocess import to_model_batch
from cbam_viz.outputs import json_float
from cbam_viz.research.sanity_files import markdown_report, write_report
from cbam_viz.research.shards import image_share
from cbam_viz.stats import bootstrap, paired_bootstrap, pearson
from cbam_viz.training.evaluate import image_batches, labelled_images

__all__ = [
    "DEFAULT_METHODS", "STAGES", "PASS_THRESHOLD", "SanityResult", "stage_modules", "cascading_randomization",
    "ssim", "rank_correlation", "sanity_check", "sanity_image", "sanity_flags", "sanity_dataset",
    "markdown_report", "write_report",
]

DEFAULT_METHODS = ("gradcam", "gradcam++", "layercam")
#: Stages re-initialised, in cascade order (each step adds the next one).
STAGES = ("fc", "layer4", "layer3", "layer2", "layer1", "stem")
#: A method passes when its mean Spearman rank correlation with the trained model's CAM, at the
#: fully randomised step, is below this. 0.5 is half-way between "unchanged" (1) and "unrelated"
#: (0): Adebayo et al. report rank correlations near 0 for Grad-CAM once a few blocks are
#: randomised, while the methods they flag (Guided Backprop, Guided Grad-CAM) stay well above 0.5.
PASS_THRESHOLD = 0.5
# SSIM constants of Wang et al. (2004) for data in [0, 1]: 11x11 Gaussian window, sigma 1.5.
_SSIM_WINDOW, _SSIM_SIGMA, _SSIM_C1, _SSIM_C2 = 11, 1.5, 0.01 ** 2, 0.03 ** 2


# ------------------------------------------------------------------------------- randomisation


def stage_modules(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """``(stage, modules)`` in cascade order (:data:`STAGES`); the stem is every other top-level
    child with parameters (``conv1``, ``bn1``).

    Raises:
        ValueError: the model lacks one of ``fc``, ``layer1``..``layer4``.
    """
    named = dict(model.named_children())
    missing = [s for s in STAGES[:-1] if s not in named]
    if missing:
        raise ValueError(f"{type(model).__name__} has no {', '.join(missing)}: the cascade needs a ResNet layout")
    stem = [m for name, m in named.items() if name not in STAGES and any(True for _ in m.parameters())]
    return [(s, [named[s]]) for s in STAGES[:-1]] + [("stem", stem)]


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the RNG of ``device`` for the block, leaving the caller's RNG state as it was."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def cascading_randomization(model: nn.Module, *, seed: int = 0) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(stage, randomised copy)`` for each step of the cascade, on one deep copy.

    Step ``i`` has stages ``STAGES[:i + 1]`` re-initialised (the copy is updated in place from one
    step to the next, so consume each model before asking for the next). Stage ``i`` is seeded
    with ``seed + i``: the same seed gives the same random networks, whatever the batch.
    The copy is made under the original's lock, so no other request's hooks are copied with it.
    """
    with model_lock(model):
        clone = copy.deepcopy(model).eval()
    device = next(clone.parameters()).device
    for i, (stage, modules) in enumerate(stage_modules(clone)):
        with _seeded(seed + i, device), torch.no_grad():
            for top in modules:
                for m in top.modules():
                    if hasattr(m, "reset_parameters"):
                        m.reset_parameters()
        yield stage, clone


# ----------------------------------------------------------------------------------- metrics


def _gaussian_1d(size: int) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * _SSIM_SIGMA ** 2))
    return g / g.sum()


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity of two ``(H, W)`` maps in [0, 1] (Wang et al., 2004).

    An 11x11 Gaussian window (sigma 1.5) over the valid region, constants for a data range of 1;
    maps smaller than the window use the largest odd window that fits. 1 for identical maps.
    (scikit-image is not a dependency; this is its ``gaussian_weights=True`` variant.) The window
    is applied as two 1-D passes over the five local moments at once: ~10x cheaper than one 2-D
    pass per moment, which cost more than the CAM itself at 192 px.
    """
    x = torch.as_tensor(np.asarray(a, np.float64))
    y = torch.as_tensor(np.asarray(b, np.float64))
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"ssim needs two maps of one (H, W) shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    size = min(_SSIM_WINDOW, *x.shape)
    size -= 1 - size % 2  # odd
    g = _gaussian_1d(size)
    moments = torch.stack((x, y, x * x, y * y, x * y))[:, None]  # (5, 1, H, W)
    filtered = F.conv2d(F.conv2d(moments, g.view(1, 1, -1, 1)), g.view(1, 1, 1, -1))[:, 0]
    mx, my, exx, eyy, exy = filtered
    sxx, syy, sxy = exx - mx * mx, eyy - my * my, exy - mx * my
    s = ((2 * mx * my + _SSIM_C1) * (2 * sxy + _SSIM_C2)) / ((mx ** 2 + my ** 2 + _SSIM_C1) * (sxx + syy + _SSIM_C2))
    return float(s.mean())


def _average_ranks(a: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 with ties sharing their mean rank (CAMs hold many exact zeros after the ReLU)."""
    _, inverse, counts = np.unique(np.asarray(a).ravel(), return_inverse=True, return_counts=True)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    return (starts + (counts - 1) / 2.0)[inverse.ravel()]


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps (Pearson of tie-averaged ranks).

    Follows :func:`cbam_viz.stats.pearson` for flat maps: 0 when only one map is flat
    (no ordering of the other is reproduced), 1 when both are the same flat map.
    """
    return pearson(_average_ranks(a), _average_ranks(b))


# ------------------------------------------------------------------------------------- check


@dataclass(frozen=True)
class SanityResult:
    """Per method, per cascade step, per image: SSIM and rank correlation with the trained model's CAM.

    Attributes:
        model_name: which model was checked.
        methods, steps: the CAM methods and the cascade steps (:data:`STAGES`, cumulative).
        ssim, rank: method -> ``(len(steps), n_images)`` float64.
        layer: the CAM layer.
        cams: given ``keep_cams``: method -> ``(1 + len(steps), n_images, H, W)`` float32, the
            trained model's CAM first (for the app to draw the cascade).
    """

    model_name: str
    methods: tuple[str, ...]
    steps: tuple[str, ...]
    ssim: dict[str, np.ndarray]
    rank: dict[str, np.ndarray]
    layer: str
    cams: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_images(self) -> int:
        return next(iter(self.rank.values())).shape[1] if self.rank else 0

    def rows(self) -> list[dict[str, Any]]:
        """Table rows ``{"step", "method", "ssim", "rank_correlation"}`` (means over images)."""
        return [{"step": step, "method": m, "ssim": json_float(self.ssim[m][i].mean(), 4),
                 "rank_correlation": json_float(self.rank[m][i].mean(), 4)}
                for i, step in enumerate(self.steps) for m in self.methods]

    @staticmethod
    def concat(parts: Sequence["SanityResult"]) -> "SanityResult":
        """The results of several batches of images, as one (same model, methods and steps)."""
        first = parts[0]
        cat = lambda key: {m: np.concatenate([getattr(p, key)[m] for p in parts], axis=1) for m in first.methods}
        return SanityResult(first.model_name, first.methods, first.steps, cat("ssim"), cat("rank"), first.layer)


def sanity_check(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    layer: str | None = None,
    seed: int = 0,
    model_name: str = "",
    keep_cams: bool = False,
) -> SanityResult:
    """Cascading randomisation of ``model`` on a batch: how much each method's CAM changes at each step.

    Args:
        model: a ResNet (baseline or CBAM), left untouched.
        inputs: normalised ``(B, 3, S, S)`` batch.
        methods: CAM methods (:func:`cbam_viz.engine.cam.list_methods`).
        layer: CAM layer name (default: last block of ``layer4``); the same in every copy.
        seed: seed of the re-initialisation.
        model_name: recorded in the result.
        keep_cams: also return every CAM (memory: ``7 x B x S x S`` floats per method).
    """
    methods = tuple(methods)
    if not methods:
        raise ValueError("no CAM method to check")
    originals = {m: compute_cams(model, inputs, method=m, layer=layer) for m in methods}
    first = originals[methods[0]]
    targets, layer = first.targets, first.layer  # the trained model's class, for every step
    cams = {m: [np.stack(originals[m].cams)] for m in methods}
    ssim_v = {m: [] for m in methods}
    rank_v = {m: [] for m in methods}
    steps = []
    for stage, randomised in cascading_randomization(model, seed=seed):
        steps.append(stage)
        for m in methods:
            res = compute_cams(randomised, inputs, method=m, layer=layer, targets=targets)
            pairs = list(zip(originals[m].cams, res.cams))
            ssim_v[m].append([ssim(a, b) for a, b in pairs])
            rank_v[m].append([rank_correlation(a, b) for a, b in pairs])
            if keep_cams:
                cams[m].append(np.stack(res.cams))
    arr = lambda d: {m: np.asarray(v, np.float64) for m, v in d.items()}
    return SanityResult(model_name, methods, tuple(steps), arr(ssim_v), arr(rank_v), layer,
                        {m: np.stack(v).astype(np.float32) for m, v in cams.items()} if keep_cams else {})


def sanity_image(
    loaded: LoadedModel,
    images: Image.Image | Sequence[Image.Image],
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    layer: str | None = None,
    seed: int = 0,
) -> SanityResult:
    """One call for the app: the cascade on one or a few pictures, CAMs kept (at the model's input size).

    Show ``result.rows()`` as a table, :func:`sanity_flags` beside each method, and
    ``result.cams[method][:, i]`` (trained, then each step) with :func:`cbam_viz.render.overlay`.
    """
    images = [images] if isinstance(images, Image.Image) else list(images)
    x = to_model_batch(images, loaded.input_size, loaded.mean, loaded.std).to(loaded.device)
    return sanity_check(loaded.model, x, methods=methods, layer=layer, seed=seed, model_name=loaded.name,
                        keep_cams=True)


def sanity_flags(result: SanityResult, *, threshold: float = PASS_THRESHOLD) -> dict[str, bool]:
    """``{method: passes}``: True when the method's mean rank correlation at the last (fully
    randomised) step is below ``threshold``, i.e. its CAM depends on the learnt weights. A method
    with False is one the UI should flag: its maps survive the destruction of the model."""
    return {m: bool(np.nanmean(result.rank[m][-1]) < threshold) for m in result.methods}


# ----------------------------------------------------------------------------------- dataset


def _summary(result: SanityResult, *, n_boot: int, seed: int) -> dict[str, Any]:
    flags = sanity_flags(result)
    return {"name": result.model_name, "layer": result.layer, "n": result.n_images, "steps": list(result.steps),
            "methods": {m: {"ssim": [bootstrap(v, n_boot=n_boot, seed=seed).to_json() for v in result.ssim[m]],
                            "rank_correlation": [bootstrap(v, n_boot=n_boot, seed=seed).to_json()
                                                 for v in result.rank[m]],
                            "passes": flags[m]} for m in result.methods}}


def _vs_reference(results: Mapping[str, SanityResult], reference: str, *, n_boot: int, seed: int) -> dict:
    """Per member other than the reference and per method: the paired interval, over the same
    images, of ``member - reference`` mean rank correlation at the fully randomised step."""
    ref = results.get(reference)
    if ref is None:
        return {}
    return {name: {m: paired_bootstrap(r.rank[m][-1], ref.rank[m][-1], n_boot=n_boot, seed=seed).to_json()
                   for m in r.methods}
            for name, r in results.items() if name != reference}


def _gather_result(parts: Sequence[SanityResult], mine: Sequence[int], ctx: DistContext) -> SanityResult | None:
    """This rank's batches -> one result over every rank's images, in image order, on rank 0 (None
    elsewhere). Per image, each method's SSIM and rank correlation at every step travel."""
    own = SanityResult.concat(parts) if parts else None
    pairs = [] if own is None else [
        (i, {m: (own.ssim[m][:, j], own.rank[m][:, j]) for m in own.methods}) for j, i in enumerate(mine)]
    per_image = distributed.gather_ordered(pairs, ctx)
    if per_image is None:
        return None
    if own is None:
        raise ValueError("no image to run the sanity check on")
    stack = lambda k: {m: np.stack([v[m][k] for v in per_image], axis=1) for m in own.methods}
    return SanityResult(own.model_name, own.methods, own.steps, stack(0), stack(1), own.layer)


def sanity_dataset(
    lineup: Lineup,
    data_dir: str | os.PathLike,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    layer: str | None = None,
    max_images: int | None = None,
    batch_size: int = 16,
    workers: int = 2,
    seed: int = 0,
    n_boot: int = 2000,
    progress: bool = True,
) -> dict[str, Any] | None:
    """The cascade for every member of ``lineup`` over an ImageFolder split; a JSON-ready report.

    Images are decoded as ``python -m cbam_viz evaluate`` does, at each member's own input size;
    each mean gets a 95 % bootstrap interval over images (:func:`cbam_viz.stats.bootstrap`),
    and each member other than the reference the paired interval of its final-step rank
    correlation minus the reference's (``vs_reference``; empty for a lineup of one).

    Under torchrun (:mod:`cbam_viz.research.shards`) each rank runs the cascade on an even share
    of the images (the random networks are seeded per step, so every rank randomises alike);
    rank 0 gathers the per-image SSIMs and rank correlations in image order and returns the
    one-process report, bootstrapped with the same seed; the other ranks return None.
    """
    t0 = time.perf_counter()
    ctx = distributed.context()
    models, results = {}, {}
    for loaded in lineup.members:
        images = labelled_images(loaded.class_ids, data_dir, model_name=loaded.name, max_images=max_images)
        share, mine = image_share(images, ctx)
        parts = [sanity_check(loaded.model, x, methods=methods, layer=layer, seed=seed, model_name=loaded.name)
                 for x, _ in image_batches(share, loaded, batch_size=batch_size, workers=workers,
                                           progress=progress and ctx.main, desc=f"sanity {loaded.name}")]
        result = _gather_result(parts, mine, ctx)
        if result is None:  # a rank other than 0 (every rank goes through every member: the gathers pair up)
            continue
        results[loaded.name] = result
        models[loaded.name] = {**_summary(results[loaded.name], n_boot=n_boot, seed=seed),
                               "trained": loaded.trained, "input_size": loaded.input_size}
    if not ctx.main:
        return None
    return {"lineup": lineup.name, "reference": lineup.reference, "data": str(data_dir), "models": models,
            "vs_reference": _vs_reference(results, lineup.reference, n_boot=n_boot, seed=seed),
            "pass_threshold": PASS_THRESHOLD,
            "settings": {"methods": list(methods), "seed": seed, "n_boot": n_boot, "max_images": max_images,
                         "batch_size": batch_size, "torch_threads": torch.get_num_threads()},
            "seconds": round(time.perf_counter() - t0, 2)}
