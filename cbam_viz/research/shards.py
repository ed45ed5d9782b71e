"""The research commands under ``torchrun --nproc_per_node N -m cbam_viz ...`` (issue 31).

``evaluate-cams``, ``ablate-gates``, ``channel-profiles`` and ``sanity-check`` share their images
among the processes the way ``evaluate`` does (:func:`cbam_viz.distributed.shard`: every N-th
image from the rank's own index) and put the results back together on rank 0, which writes the
report one process writes; the other ranks return None and write nothing. Two ways back:

* per image (:func:`cbam_viz.distributed.gather_ordered`): the values every statistic is computed
  from (correct or not, a probability change, an SSIM, a CAM's scores), so rank 0 holds the list
  one process holds, in the same order, and bootstraps it with the same seed: same intervals;
* per rank (:func:`merge_partial_sums`): sums over images (channel profiles' per-class sums, the
  gate means of ``ablate-gates --constant mean``), added up in rank order. Float addition in another
  order: the merged sums equal one process's within float64 rounding, not bit for bit.

Without torchrun every function here is the identity: one process takes every image.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cbam_viz import distributed
from cbam_viz.distributed import DistContext
from cbam_viz.training.evaluate import LabelledImages

__all__ = ["image_share", "merge_partial_sums"]


def image_share(images: LabelledImages, ctx: DistContext | None = None) -> tuple[LabelledImages, list[int]]:
    """This rank's share of ``images`` (every image in one process) and their indices in ``images``."""
    ctx = ctx or distributed.context()
    mine = [i for i, _ in distributed.shard(images.files, ctx)]
    share = LabelledImages(images.root, tuple(images.files[i] for i in mine), tuple(images.labels[i] for i in mine))
    return share, mine


def _add(total: Any, part: Any) -> Any:
    """``total + part``, key by key for (nested) mappings; a key only one side has is kept as it is."""
    if isinstance(total, Mapping):
        out = dict(total)
        for key, value in part.items():
            out[key] = _add(out[key], value) if key in out else value
        return out
    return total + part


def merge_partial_sums(partial: Mapping[str, Any], ctx: DistContext | None = None, *,
                       everywhere: bool = False) -> dict[str, Any] | None:
    """Every rank's ``partial`` sums (a mapping, maybe nested, of numbers or arrays) added up in rank order.

    Args:
        partial: this rank's sums over its share of the images (a rank with no image sends what
            it has: keys missing there are taken from the other ranks).
        everywhere: every rank gets the total (it needs it to go on); else rank 0 alone, None elsewhere.
    """
    ctx = ctx or distributed.context()
    pairs = [(ctx.rank, dict(partial))]
    parts = distributed.gather_everywhere(pairs, ctx) if everywhere else distributed.gather_ordered(pairs, ctx)
    if parts is None:
        return None
    total: dict[str, Any] = parts[0]
    for part in parts[1:]:
        total = _add(total, part)
    return total
