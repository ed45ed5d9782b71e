"""Figures of several panels with captions: the composite of a lineup, the faithfulness panel, box comparisons.

Pure, like :mod:`cbam_viz.render` whose overlays they lay out: arrays in, PIL images out, no I/O.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cbam_viz.colour_scale import add_colour_scale
from cbam_viz.render import (
    BACKGROUND, FONT_SIZE, MUTED, PAD, PANEL, TEXT, TILE, _check_alpha, _check_colormap, _check_image, _ellipsize, _fit,
    _font, overlay,
)

if TYPE_CHECKING:
    from cbam_viz.engine.explain import Explanation, ModelExplanation

__all__ = ["composite", "confidence_drop_figure", "render_comparison", "photo_placeholder", "PLACEHOLDER_GREY"]


def _caption_lines(m: ModelExplanation, method: str) -> list[str]:
    top = m.predictions[0] if m.predictions else None
    lines = [m.model_name]
    if top is not None:
        lines.append(f"top-1: {top.label} ({top.prob:.1%})")
    lines.append(f"{method} → {m.target_label}")
    return lines


def composite(
    image: Image.Image,
    explanation: Explanation,
    *,
    alpha: float = 0.5,
    colormap: str = "jet",
) -> Image.Image:
    """The side-by-side figure: original | one CAM per lineup member, captioned, then for each member
    with spatial gates a row of its spatial attention maps (one tile per gate). Ready to save as PNG.

    Captions give the model name, its top-1 label and probability, the method and the class
    explained.

    Raises:
        ValueError: invalid alpha/colormap, or CAMs that are not 2-D masks in [0, 1].
    """
    image = _check_image(image)
    alpha = _check_alpha(alpha)
    _check_colormap(colormap)
    base = _fit(image, PANEL)
    panels = [(base, ["original", f"{explanation.image_size[0]}x{explanation.image_size[1]} px",
                      f"layer {explanation.layer}"])]
    panels += [(overlay(base, m.cam, alpha=alpha, colormap=colormap), _caption_lines(m, explanation.method))
               for m in explanation.models.values()]
    pw, ph = base.size
    width = len(panels) * (pw + PAD) + PAD
    tile_img = _fit(image, TILE)
    rows = [(m.model_name, [(overlay(tile_img, a, alpha=alpha, colormap=colormap), f"{blk} ({a.shape[0]}x{a.shape[1]})")
                            for blk, a in m.spatial_attention.items()])
            for m in explanation.models.values() if m.spatial_attention]
    return add_colour_scale(_compose(panels, rows, width, (pw, ph)), colormap)  # what red and blue mean


def _compose(panels, rows, width: int, panel_size: tuple[int, int]) -> Image.Image:
    """Lay out the captioned main panels, then one titled row of attention tiles per gated member."""
    font = _font()
    line_h = FONT_SIZE + 4
    caption_h = 3 * line_h + PAD
    pw, ph = panel_size
    tw, th = next((tiles[0][0].size for _, tiles in rows if tiles), (TILE, TILE))
    per_row = max(1, (width - PAD) // (tw + PAD))
    rows_h = sum(line_h + -(-len(tiles) // per_row) * (th + line_h + PAD) for _, tiles in rows)
    width = max(width, max((min(len(t), per_row) * (tw + PAD) + PAD for _, t in rows), default=0))
    out = Image.new("RGB", (width, PAD + ph + caption_h + rows_h + PAD), BACKGROUND)
    draw = ImageDraw.Draw(out)
    for i, (panel, lines) in enumerate(panels):
        x = PAD + i * (pw + PAD)
        out.paste(panel, (x, PAD))
        for j, line in enumerate(lines):
            draw.text((x, PAD + ph + 4 + j * line_h), _ellipsize(draw, line, font, pw),
                      fill=TEXT if j == 0 else MUTED, font=font)
    y0 = PAD + ph + caption_h
    for name, tiles in rows:
        draw.text((PAD, y0), f"{name}: spatial attention (absolute scale 0..1)", fill=TEXT, font=font)
        y0 += line_h
        for k, (tile, caption) in enumerate(tiles):
            r, c = divmod(k, per_row)
            x, y = PAD + c * (tw + PAD), y0 + r * (th + line_h + PAD)
            out.paste(tile, (x, y))
            draw.text((x, y + th + 2), _ellipsize(draw, caption, font, tw), fill=MUTED, font=font)
        y0 += -(-len(tiles) // per_row) * (th + line_h + PAD)
    return out


# ------------------------------------------------------------------ explanation-quality pictures
# The Explain tab's faithfulness panel and the Explanation-quality tab's box comparisons. They
# keep PIL's small bitmap font (ImageFont.load_default()), whose ~6 px per character sizes them.

#: Canvas colour of a photo that is not on this machine (dataset images never ship).
PLACEHOLDER_GREY = (150, 150, 150)
TRUE_BOX = (0, 255, 0)
CAM_BOX = (255, 255, 255)


def _box_edges(box) -> list[float]:
    """A box (``Box`` or ``[xmin, ymin, xmax, ymax]``, ``xmax``/``ymax`` exclusive) -> PIL's inclusive corners."""
    x0, y0, x1, y1 = box.as_list() if hasattr(box, "as_list") else list(box)
    return [x0, y0, x1 - 1, y1 - 1]


def render_comparison(
    image: Image.Image,
    baseline_cam: np.ndarray,
    cbam_cam: np.ndarray,
    boxes: Sequence,
    *,
    cam_boxes: tuple[Sequence[float] | None, Sequence[float] | None] = (None, None),
    titles: tuple[str, str, str] = ("image + boxes", "baseline", "CBAM"),
    alpha: float = 0.5,
) -> Image.Image:
    """Image with its true boxes, then each model's CAM over it: one PIL image, three panels.

    True boxes (:class:`cbam_viz.research.quality.Box` or ``[xmin, ymin, xmax, ymax]`` in image pixels)
    are drawn in green, a CAM's own box (e.g. at its MaxBoxAcc threshold) in white. CAMs in
    [0, 1] at any size (resized to the image).
    """
    image = image.convert("RGB")
    w, h = image.size
    panels = [image.copy(), overlay(image, np.clip(baseline_cam, 0, 1), alpha=alpha),
              overlay(image, np.clip(cbam_cam, 0, 1), alpha=alpha)]
    for i, panel in enumerate(panels):
        draw = ImageDraw.Draw(panel)
        for b in boxes:
            draw.rectangle(_box_edges(b), outline=TRUE_BOX, width=2)
        own = cam_boxes[i - 1] if i > 0 else None
        if own is not None:
            draw.rectangle(_box_edges(own), outline=CAM_BOX, width=2)
    pad, title_h = 6, 18
    canvas = Image.new("RGB", (3 * w + 4 * pad, h + title_h + 2 * pad), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, (panel, title) in enumerate(zip(panels, titles)):
        x = pad + i * (w + pad)
        draw.text((x, pad), title, fill=(0, 0, 0), font=font)
        canvas.paste(panel, (x, pad + title_h))
    return canvas


def photo_placeholder(size: tuple[int, int], text: str = "photo not shipped") -> Image.Image:
    """A grey canvas of ``size = (W, H)`` to draw CAMs and boxes on when the photo is absent."""
    image = Image.new("RGB", tuple(int(v) for v in size), PLACEHOLDER_GREY)
    ImageDraw.Draw(image).text((4, 4), text, fill=(235, 235, 235))
    return image


def confidence_drop_figure(drops, lineup, *, labels=None) -> Image.Image:
    """The main tab's faithfulness panel: each member's input with its top CAM region blurred away,
    and its probability before -> after.

    Args:
        drops: member name -> ConfidenceDrop, from :func:`cbam_viz.engine.faithfulness.lineup_confidence_drop`.
        lineup: the lineup (each member's mean/std, to show the perturbed input, and class names).
        labels: optional panel titles per member (default: the member's name).
    """
    font = ImageFont.load_default()
    tiles = []
    for name, d in drops.items():
        loaded = lineup.member(name)
        x = d.perturbed.detach().cpu().float().numpy()
        rgb = x * np.asarray(loaded.std, np.float32)[:, None, None] + np.asarray(loaded.mean, np.float32)[:, None, None]
        tile = Image.fromarray(np.clip(np.rint(rgb.transpose(1, 2, 0) * 255), 0, 255).astype(np.uint8), "RGB")
        title = (labels or {}).get(name, name)
        text = [f"{title}: top {d.fraction:.0%} of its CAM {'blurred' if d.imputer == 'blur' else 'removed'}",
                f"p({loaded.classes[d.target]}) {d.prob_before:.2f} -> {d.prob_after:.2f}",
                f"drop {d.relative_drop:.0%} of its confidence"]
        tiles.append((tile, text))
    # Wide enough for the longest line in the default bitmap font (~6 px per character).
    side = max(max(t.width for t, _ in tiles), 6 * max(len(line) for _, text in tiles for line in text) + 8)
    pad, line_h = 6, 14
    text_h = 3 * line_h
    top = 24  # blank band: image viewers (Gradio's label badge) often cover an image's top-left corner
    canvas = Image.new("RGB", (len(tiles) * (side + pad) + pad, top + side + text_h + 3 * pad), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for i, (tile, text) in enumerate(tiles):
        x0 = pad + i * (side + pad)
        for j, t in enumerate(text):
            draw.text((x0, top + pad + j * line_h), t, fill=(0, 0, 0), font=font)
        canvas.paste(tile.resize((side, side)), (x0, top + 2 * pad + text_h))
    return canvas
