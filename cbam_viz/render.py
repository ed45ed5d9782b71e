"""Arrays -> PIL images: CAM overlays, attention galleries and sheets, channel-attention strips.

Pure numpy + PIL: no hooks, no file I/O, no matplotlib figures in the request path. Colour maps
are matplotlib's own 256-entry tables, read once per process (:func:`cbam_viz.colour_scale.colormap_lut`). Everything
drawn for one 224 px request takes a few milliseconds. Figures of several captioned panels (the
composite, the faithfulness panel) are in :mod:`cbam_viz.figures`.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cbam_viz.colour_scale import COLORMAPS, add_colour_scale, caption_font, colormap_lut

if TYPE_CHECKING:  # render needs only the fields, not torch
    from cbam_viz.engine.explain import ModelExplanation

__all__ = [
    "COLORMAPS", "colormap_lut", "overlay", "colorize", "attention_gallery", "attention_sheet",
    "channel_attention_image", "channel_attention_summary",
]


# Layout constants, in one place.
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
MUTED = (110, 110, 110)
PANEL = 256          # composite: longest side of each of the three main panels
TILE = 112           # composite: side of each attention tile
GALLERY_SIDE = 256   # attention_gallery: longest side of each image
SHEET_TILE = 200     # attention_sheet: longest side of each tile
SHEET_COLUMNS = 4    # attention_sheet: tiles per row (resnet18: two rows, one per pair of stages)
SHEET_TOP = 28       # attention_sheet: blank band on top, where image viewers put their label badge
PAD = 8
FONT_SIZE = 13


@functools.lru_cache(maxsize=8)
def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:

    return caption_font(size)


# --------------------------------------------------------------------------------- validation


def _check_image(image) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"image is empty ({image.width}x{image.height})")
    return image if image.mode == "RGB" else image.convert("RGB")


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    return float(alpha)


def _check_mask(mask, name: str = "mask") -> np.ndarray:
    a = np.asarray(mask)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array (H, W), got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise ValueError(f"{name} must be real numbers, got dtype {a.dtype}")
    a = a.astype(np.float32, copy=False)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    lo, hi = float(a.min()), float(a.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"{name} values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]")
    return a


def _check_colormap(colormap: str) -> np.ndarray:
    if not isinstance(colormap, str):
        raise ValueError(f"unknown colormap {colormap!r}; choose one of: {', '.join(COLORMAPS)}")
    return colormap_lut(colormap)


# ----------------------------------------------------------------------------------- overlays


def colorize(mask: np.ndarray, *, colormap: str = "jet", size: tuple[int, int] | None = None) -> Image.Image:
    """A [0, 1] mask -> an RGB heat map, optionally resized (bilinear) to ``size = (W, H)``."""
    lut = _check_colormap(colormap)
    a = _check_mask(mask)
    if size is not None and (a.shape[1], a.shape[0]) != tuple(size):
        a = np.asarray(Image.fromarray(a).resize(tuple(size), Image.BILINEAR))
    idx = np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(lut[idx])


def overlay(image: Image.Image, mask: np.ndarray, *, alpha: float = 0.5, colormap: str = "jet") -> Image.Image:
    """Blend a heat map of ``mask`` over ``image``, at the image's own size.

    Args:
        image: any PIL image (converted to RGB).
        mask: 2-D array in [0, 1]; resized bilinearly when its shape differs from the image's.
        alpha: weight of the heat map (0: the image only, 1: the heat map only).
        colormap: a name from :data:`COLORMAPS`.

    Raises:
        ValueError: a mask that is not 2-D, empty, non-finite or outside [0, 1]; alpha outside
            [0, 1]; an unknown colormap.
    """
    image = _check_image(image)
    alpha = _check_alpha(alpha)
    heat = colorize(mask, colormap=colormap, size=image.size)
    return Image.blend(image, heat, alpha)


def _fit(image: Image.Image, side: int) -> Image.Image:
    """Resize so the longest side is ``side`` px, keeping the aspect ratio."""
    w, h = image.size
    scale = side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size == image.size:
        return image
    return image.resize(size, Image.BILINEAR if scale < 1 else Image.BICUBIC)


def attention_gallery(
    image: Image.Image,
    explanation: ModelExplanation,
    *,
    alpha: float = 0.5,
    colormap: str = "jet",
    side: int | None = GALLERY_SIDE,
) -> list[tuple[Image.Image, str]]:
    """One overlay per CBAM block: its spatial attention upsampled onto the image.

    Captions read ``"layer3.1 spatial (14x14)"``. A baseline model (no CBAM) gives ``[]``. The
    maps are shown on their absolute [0, 1] scale (sigmoid outputs), so a block that attends
    uniformly looks uniform.

    Args:
        side: longest side of each gallery image (the image is downscaled first, which keeps a
            gallery of large photos fast); None keeps the image's own size.
    """
    image = _check_image(image)
    alpha = _check_alpha(alpha)
    _check_colormap(colormap)
    if side is not None:
        image = _fit(image, int(side))
    out = []
    for block, spatial in explanation.spatial_attention.items():
        h, w = np.shape(spatial)
        out.append((overlay(image, spatial, alpha=alpha, colormap=colormap), f"{block} spatial ({h}x{w})"))
    return out


def attention_sheet(
    image: Image.Image,
    explanation: ModelExplanation,
    *,
    alpha: float = 0.5,
    colormap: str = "jet",
    side: int = SHEET_TILE,
    columns: int = SHEET_COLUMNS,
) -> Image.Image | None:
    """Every CBAM block's spatial attention over the image in one picture, captioned, in forward order.

    The same overlays as :func:`attention_gallery` (absolute [0, 1] scale), as one image: a page
    shows and a browser fetches one picture instead of one per block. None for a model without CBAM.

    Args:
        side: longest side of each tile; columns: tiles per row.
    """
    tiles = attention_gallery(image, explanation, alpha=alpha, colormap=colormap, side=side)
    if not tiles:
        return None
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    font = _font()
    line_h = FONT_SIZE + 4
    tw, th = tiles[0][0].size
    per_row = min(columns, len(tiles))
    rows = -(-len(tiles) // per_row)
    top = SHEET_TOP
    out = Image.new("RGB", (PAD + per_row * (tw + PAD), top + rows * (th + line_h + PAD)), BACKGROUND)
    draw = ImageDraw.Draw(out)
    for k, (tile, caption) in enumerate(tiles):
        r, c = divmod(k, per_row)
        x, y = PAD + c * (tw + PAD), top + r * (th + line_h + PAD)
        draw.text((x, y), _ellipsize(draw, caption, font, tw), fill=TEXT, font=font)
        out.paste(tile, (x, y + line_h))

    return add_colour_scale(out, colormap, text="spatial attention: the gate's value, 0 to 1")


# ---------------------------------------------------------------------------------- channels


def channel_attention_image(
    values: np.ndarray,
    *,
    title: str,
    width: int = 512,
    height: int = 64,
    colormap: str = "viridis",
) -> Image.Image:
    """A compact bar strip of one block's channel attention: one bar per channel, height = value.

    Bars are coloured by value too, with a guide line at 0.5; the title line also gives the
    channel count, mean and range.

    Raises:
        ValueError: ``values`` not a non-empty 1-D array in [0, 1], or a size below 16 px.
    """
    v = np.asarray(values)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"channel attention must be a non-empty 1-D array (C,), got shape {v.shape}")
    v = _check_mask(v[None, :], "channel attention")[0]
    if width < 16 or height < 16:
        raise ValueError(f"width and height must be >= 16 px, got {width}x{height}")
    lut = _check_colormap(colormap)
    font = _font()
    title_h = FONT_SIZE + 6
    img = Image.new("RGB", (width, height + title_h), BACKGROUND)
    # Column x shows channel floor(x * C / width): every channel gets >= 1 px when C <= width.
    cols = v[(np.arange(width) * v.size) // width]
    bar_h = np.rint(cols * (height - 1)).astype(np.int64)
    rows = np.arange(height)[:, None]
    filled = rows >= (height - bar_h)[None, :]
    strip = np.full((height, width, 3), 245, dtype=np.uint8)
    colors = lut[np.clip(np.rint(cols * 255), 0, 255).astype(np.uint8)]
    strip[filled] = np.broadcast_to(colors[None], (height, width, 3))[filled]
    strip[height - 1 - round(0.5 * (height - 1))] = (200, 200, 200)
    img.paste(Image.fromarray(strip), (0, title_h))
    draw = ImageDraw.Draw(img)
    text = f"{title}  C={v.size}  mean {v.mean():.2f}  [{v.min():.2f}, {v.max():.2f}]"
    draw.text((2, 2), _ellipsize(draw, text, font, width - 4), fill=TEXT, font=font)
    return img


def channel_attention_summary(explanation: ModelExplanation, *, width: int = 512, height: int = 40) -> Image.Image | None:
    """Every block's channel strip stacked into one image; None for a model without CBAM."""
    strips = [channel_attention_image(v, title=f"{blk} channel", width=width, height=height)
              for blk, v in explanation.channel_attention.items()]
    if not strips:
        return None
    out = Image.new("RGB", (width, sum(s.height for s in strips) + PAD * (len(strips) - 1)), BACKGROUND)
    y = 0
    for s in strips:
        out.paste(s, (0, y))
        y += s.height + PAD
    return out


# --------------------------------------------------------------------------------- composite


def _ellipsize(draw: ImageDraw.ImageDraw, text: str, font, max_width: int) -> str:
    if draw.textlength(text, font=font) <= max_width:
        return text
    while text and draw.textlength(text + "…", font=font) > max_width:
        text = text[:-1]
    return text + "…"
