"""Channel attention per class: which blocks gate channels differently for different classes?

SE-Net (Hu et al., CVPR 2018, arXiv 1709.01507, Sec. 7.2 and Fig. 6) plots the mean
excitation of each channel per class and finds early blocks *class-agnostic* (every class gets
the same profile: the gate re-weights general features) and late blocks *class-specific*. CBAM's
channel gate (Woo et al., ECCV 2018, arXiv 1807.06521) is the same kind of gate with max pooling
added, so the same question applies, and BAM's joint gate averaged over positions gives one
channel vector per stage transition (:mod:`cbam_viz.engine.attention`). For each gated block this
module averages the channel-gate vector ``Mc`` (``(C,)`` per image) over the images of each class,
over an ImageFolder split, and summarises each block by two numbers (see :func:`block_similarity`
for why these two). A lineup is profiled member by member (:func:`profile_lineup`), every member
with a channel gate; the others are listed as skipped.

Their files (:mod:`cbam_viz.research.profile_files`): of one member (``write_profiles``): ``profiles.npz`` (per block the ``(K, C)`` class
means, plus counts), ``channel_profiles.json`` (the numbers per block), ``channel_profiles.md`` and
``channel_profiles.png`` (one panel per block), all atomic. ``python -m cbam_viz channel-profiles``
writes a lineup (``write_lineup_profiles``): each member's files in a sub-folder named after it,
and beside them one ``channel_profiles.md`` / ``.json`` with every member's numbers side by side.
"""
from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure  # no pyplot: no global backend or figure state touched
from PIL import Image
from torch import nn

from cbam_viz import distributed
from cbam_viz.engine.attention import attention_gates, record_attention
from cbam_viz.engine.lineup import Lineup
from cbam_viz.training.evaluate import image_batches, labelled_images
from cbam_viz.outputs import json_float
from cbam_viz.engine.loading import LoadedModel
from cbam_viz.engine.locks import model_lock
from cbam_viz.research.shards import image_share, merge_partial_sums

__all__ = [
    "ChannelProfiles", "accumulate_profiles", "has_channel_gates", "profile_dataset", "profile_lineup",
    "block_similarity", "chance_variance_ratio", "similarity_rows", "profiles_figure", "profiles_image",
]

#: Tiny total variance below which a block's gate counts as constant (then nothing is class-specific).
_CONSTANT_VARIANCE = 1e-12


def has_channel_gates(model: nn.Module) -> bool:
    """Whether ``model`` has a gate with a channel map (CBAM, SE, BAM's joint gate); a plain ResNet has none."""
    return any(kind in ("channel", "joint") for _, kind, _ in attention_gates(model))


@dataclass(frozen=True)
class ChannelProfiles:
    """Per-class mean channel gates of every gated block, and what is needed to decompose their variance.

    Attributes:
        class_ids, class_names: the model's classes, in its order (rows of every array).
        counts: ``(K,)`` images per class.
        means: block -> ``(K, C)`` mean gate value per class and channel (nan rows: no image).
        mean_squares: block -> ``(K, C)`` mean squared gate value (for the within-class variance).
        model_name, data: where the numbers come from (for the reports).
    """

    class_ids: tuple[str, ...]
    class_names: tuple[str, ...]
    counts: np.ndarray
    means: dict[str, np.ndarray]
    mean_squares: dict[str, np.ndarray]
    model_name: str = ""
    data: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # JSON-ready run details (timings, settings)

    @property
    def blocks(self) -> list[str]:
        return list(self.means)


def accumulate_profiles(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                        num_classes: int) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Run ``model`` over ``(x, labels)`` batches and average each block's channel gate per class.

    Every forward holds the model's lock (:func:`cbam_viz.engine.locks.model_lock`) while
    :func:`cbam_viz.engine.attention.record_attention` hooks the gates.

    Returns:
        ``(counts (K,), means {block: (K, C)}, mean_squares {block: (K, C)})``, float64; a class
        without images has a nan row.
    """
    return _class_means(*_class_sums(model, batches, num_classes=num_classes))


def _class_sums(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                num_classes: int) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(counts (K,), sums {block: (K, C)}, sums of squares {block: (K, C)})`` of the channel gates, float64."""
    counts = np.zeros(num_classes, np.int64)
    sums: dict[str, torch.Tensor] = {}
    squares: dict[str, torch.Tensor] = {}
    for x, y in batches:
        with model_lock(model), torch.no_grad(), record_attention(model) as maps:
            model(x)
        y = y.to(torch.int64).cpu()
        counts += np.bincount(y.numpy(), minlength=num_classes)
        for block, gate in maps.items():
            if "channel" not in gate:
                continue
            g = gate["channel"].cpu().double()  # float64 on the CPU: MPS has no float64
            if block not in sums:
                sums[block] = torch.zeros((num_classes, g.shape[1]), dtype=torch.float64)
                squares[block] = torch.zeros_like(sums[block])
            sums[block].index_add_(0, y, g)
            squares[block].index_add_(0, y, g * g)
    return counts, {b: s.numpy() for b, s in sums.items()}, {b: s.numpy() for b, s in squares.items()}


def _class_means(counts: np.ndarray, sums: dict[str, np.ndarray], squares: dict[str, np.ndarray]):
    """:func:`_class_sums` divided by the counts: ``(counts, means, mean_squares)`` (nan rows: no image)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        n = counts[:, None].astype(np.float64)
        means = {b: s / n for b, s in sums.items()}
        mean_squares = {b: s / n for b, s in squares.items()}
    return counts, means, mean_squares


def profile_lineup(lineup: Lineup, data_dir: str | os.PathLike, **kw) -> dict[str, ChannelProfiles]:
    """:func:`profile_dataset` for every member of ``lineup`` with channel gates, in its order.

    Under torchrun: every member's profiles on rank 0, None on the other ranks (see :func:`profile_dataset`).

    Raises:
        ValueError: no member has a channel gate.
    """
    gated = [m for m in lineup.members if has_channel_gates(m.model)]
    if not gated:
        raise ValueError(f"no member of lineup {lineup.name!r} has a channel gate ({', '.join(lineup.names)})")
    profiles = {m.name: profile_dataset(m, data_dir, **kw) for m in gated}
    return None if any(p is None for p in profiles.values()) else profiles


def profile_dataset(
    loaded: LoadedModel,
    data_dir: str | os.PathLike,
    *,
    max_images: int | None = None,
    batch_size: int = 32,
    workers: int = 2,
    progress: bool = True,
) -> ChannelProfiles | None:
    """The per-class channel-gate profiles of ``loaded``'s model on an ImageFolder split.

    Images are decoded and labelled as ``python -m cbam_viz evaluate`` does
    (:func:`cbam_viz.training.evaluate.image_batches`); ``max_images`` keeps an evenly spread subset.

    Under torchrun (:mod:`cbam_viz.research.shards`) each rank sums the gates of its share of the
    images per class; rank 0 adds the ranks' *partial sums* up in rank order and returns the
    profiles (equal to one process's within float64 rounding: the sums are added in another
    order), the other ranks None.

    Raises:
        ValueError: the model has no channel gate.
        cbam_viz.training.evaluate.ClassMismatchError: the folder names are not the model's class ids.
    """
    if not has_channel_gates(loaded.model):
        raise ValueError(f"{loaded.name} has no channel gate: channel profiles need a CBAM, SE or BAM model")
    t0 = time.perf_counter()
    ctx = distributed.context()
    images = labelled_images(loaded.class_ids, data_dir, model_name=loaded.name, max_images=max_images)
    share, _ = image_share(images, ctx)
    batches = image_batches(share, loaded, batch_size=batch_size, workers=workers, progress=progress and ctx.main,
                            desc=f"channel profiles {loaded.name}")
    counts, sums, squares = _class_sums(loaded.model, batches, num_classes=len(loaded.class_ids))
    total = merge_partial_sums({"counts": counts, "sums": sums, "squares": squares}, ctx)
    if total is None:  # a rank other than 0: its sums went to rank 0
        return None
    counts, means, mean_squares = _class_means(total["counts"], total["sums"], total["squares"])
    return ChannelProfiles(
        class_ids=tuple(loaded.class_ids), class_names=tuple(loaded.classes), counts=counts, means=means,
        mean_squares=mean_squares, model_name=loaded.name, data=str(data_dir),
        extra={"trained": loaded.trained, "input_size": loaded.input_size, "max_images": max_images,
               "seconds": round(time.perf_counter() - t0, 2), "torch_threads": torch.get_num_threads()},
    )


# --------------------------------------------------------------------------------- numbers


def _profile_correlation(means: np.ndarray) -> float:
    """Mean over class pairs of the Pearson correlation (across channels) of their mean profiles."""
    rows = means[~np.isnan(means).any(axis=1)]
    if len(rows) < 2:
        return float("nan")
    centred = rows - rows.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1)
    if (norms < 1e-12).all():  # every profile flat: all classes get the same (flat) gate
        return 1.0
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (centred @ centred.T) / np.outer(norms, norms)
    upper = corr[np.triu_indices(len(rows), k=1)]
    return float(np.nanmean(upper)) if np.isfinite(upper).any() else float("nan")


def _class_variance_ratio(counts: np.ndarray, means: np.ndarray, mean_squares: np.ndarray) -> float:
    """eta^2 pooled over channels: between-class sum of squares / total sum of squares of the gate values."""
    ok = counts > 0
    n_k, mu, sq = counts[ok].astype(np.float64), means[ok], mean_squares[ok]
    n = n_k.sum()
    if n == 0:
        return float("nan")
    grand = (n_k[:, None] * mu).sum(0) / n
    between = float((n_k[:, None] * (mu - grand) ** 2).sum())
    total = float((n_k[:, None] * sq).sum() - n * (grand ** 2).sum())
    if total <= _CONSTANT_VARIANCE * n * mu.shape[1]:
        return 0.0  # a constant gate: no variance at all, so none of it is class-specific
    return min(1.0, max(0.0, between / total))


def block_similarity(profiles: ChannelProfiles) -> dict[str, dict[str, float]]:
    """Two numbers per block saying how class-agnostic its channel gate is.

    * ``profile_correlation``: the mean, over pairs of classes, of the Pearson correlation
      across channels between their mean gate profiles; SE-Net's Fig. 6 read as one number. Near
      1: every class gets the same *shape* of re-weighting (class-agnostic); low or negative:
      classes emphasise different channels. Pearson rather than cosine similarity because gate
      values are all positive (sigmoids around 0.5), so the cosine of any two profiles is close to
      1 and barely separates blocks; Pearson removes each profile's offset and scale first.
    * ``class_variance_ratio``: the share of the variance of the per-image gate values that the
      class explains (eta^2 = between-class / total sum of squares, pooled over channels), in
      [0, 1]. The correlation alone misses how *large* class differences are next to the image-to-
      image spread: two classes can have perfectly correlated mean profiles that still differ in
      level. 0: the class tells nothing about the gate (or the gate is constant); 1: the gate is a
      function of the class. Pooling sums before dividing keeps near-constant channels from
      dominating, which averaging per-channel ratios would not. It is biased upwards with few
      images per class: a class-agnostic gate scores about ``(K - 1) / (N - 1)`` by chance for N
      images of K classes (:func:`chance_variance_ratio`; 0.002 for Imagenette's validation split,
      1 with one image per class), so read it against that.

    Expected (SE-Net): high correlation and a small ratio in early blocks, the reverse late.
    """
    return {block: {"profile_correlation": _profile_correlation(m),
                    "class_variance_ratio": _class_variance_ratio(profiles.counts, m, profiles.mean_squares[block])}
            for block, m in profiles.means.items()}


def chance_variance_ratio(profiles: ChannelProfiles) -> float:
    """The ``class_variance_ratio`` a class-agnostic gate gets by chance: ``(K - 1) / (N - 1)``
    (the expected eta^2 under no class effect, K classes with images, N images)."""
    k, n = int((profiles.counts > 0).sum()), int(profiles.counts.sum())
    return (k - 1) / (n - 1) if n > 1 else float("nan")


def similarity_rows(profiles: ChannelProfiles) -> list[dict[str, Any]]:
    """Table rows for the app: ``{"block", "channels", "profile_correlation", "class_variance_ratio"}``
    (None where undefined), in forward order."""
    sim = block_similarity(profiles)
    return [{"block": b, "channels": int(profiles.means[b].shape[1]),
             "profile_correlation": json_float(s["profile_correlation"], 4),
             "class_variance_ratio": json_float(s["class_variance_ratio"], 4)} for b, s in sim.items()]


# ---------------------------------------------------------------------------------- figure


def profiles_figure(profiles: ChannelProfiles):
    """A matplotlib Figure, one heat map per block: classes (rows) x channels, each class's mean
    gate *minus the mean over classes*.

    The raw profiles of all classes look alike (which channels a block opens is mostly the same
    for every class, r close to 1), so the figure shows what differs: red where a class opens a
    channel more than the others, blue where less, on a symmetric scale per block. Channels are
    sorted by their mean over classes; the block title gives r and eta^2.
    """
    blocks = profiles.blocks
    sim = block_similarity(profiles)
    ncols = min(4, max(1, len(blocks)))
    nrows = max(1, math.ceil(len(blocks) / ncols))
    k = len(profiles.class_ids)
    fig = Figure(figsize=(3.4 * ncols, nrows * (0.18 * k + 1.4) + 0.5), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(blocks):]:
        ax.set_visible(False)
    for ax, block in zip(axes, blocks):
        m = profiles.means[block]
        mean = np.nanmean(m, axis=0)
        order = np.argsort(mean, kind="stable")
        dev = (m - mean)[:, order]
        lim = float(np.nanmax(np.abs(dev))) or 1e-6
        im = ax.imshow(dev, aspect="auto", interpolation="nearest", cmap="RdBu_r", vmin=-lim, vmax=lim)
        fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
        s = sim[block]
        ax.set_title(f"{block}: r={s['profile_correlation']:.2f}, η²={s['class_variance_ratio']:.2f}", fontsize=8)
        ax.set_yticks(range(k), [n[:14] for n in profiles.class_names], fontsize=6)
        ax.set_xlabel(f"{m.shape[1]} channels (sorted by mean gate)", fontsize=7)
        ax.tick_params(axis="x", labelsize=6)
    fig.suptitle(f"Mean channel gate per class minus the mean over classes: {profiles.model_name} "
                 f"(r: mean class-pair correlation of the raw profiles; η²: share of variance explained by the class)",
                 fontsize=9)
    return fig


def profiles_image(profiles: ChannelProfiles, *, dpi: int = 110) -> Image.Image:
    """:func:`profiles_figure` rendered to an RGB PIL image (for the app; no file written)."""
    buf = io.BytesIO()
    profiles_figure(profiles).savefig(buf, format="png", dpi=dpi)
    buf.seek(0)
    with Image.open(buf) as im:
        return im.convert("RGB")
