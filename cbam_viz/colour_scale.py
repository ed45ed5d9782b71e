"""How to read a heatmap: the colour scale drawn under the pictures, and the font of their captions.

Why: a heatmap without a scale says nothing about which colour is high. Every picture that shows
CAMs or attention maps (the composite, the spatial-attention sheet) gets a bar under it from
:func:`add_colour_scale`; the page shows the same bar as HTML (:func:`colour_scale_html`), and the
README shows the picture :func:`colour_bar` draws. What the numbers mean: a CAM is scaled to its
own maximum (1 = where this map is highest, not a probability); a spatial gate's value is its
absolute sigmoid output, 0 to 1.

The captions use DejaVu Sans, the TrueType font matplotlib (a pinned dependency) ships, because
Pillow's built-in font has no arrow (``→``) or ellipsis glyph and draws them as boxes. Pure: no
file is written; the font file is read once per size.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["COLORMAPS", "colormap_lut", "CAM_SCALE_TEXT", "caption_font", "colour_bar", "add_colour_scale", "colour_scale_html", "jet_colours"]

#: What the colours mean, under every CAM picture.
CAM_SCALE_TEXT = ("CAM: scaled to its own maximum (1 = where this map is highest); "
                  "spatial attention: the gate's value, 0 to 1")
_BAR_HEIGHT = 12
_PAD = 8


@functools.lru_cache(maxsize=8)
def caption_font(size: int = 13) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans at ``size`` px (it has ``→`` and ``…``); Pillow's default font if it cannot be read."""
    try:
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        return ImageFont.truetype(str(path), size=size)
    except (ImportError, OSError):
        try:
            return ImageFont.load_default(size=size)
        except (TypeError, OSError):  # Pillow built without FreeType
            return ImageFont.load_default()


#: Colour maps a mask can be drawn with (matplotlib's own tables).
COLORMAPS = ("jet", "viridis", "inferno", "gray")


@functools.cache
def colormap_lut(name: str) -> np.ndarray:
    """matplotlib's colour map ``name`` as a read-only 256 x 3 uint8 table, built once per process.

    The heatmaps (:mod:`cbam_viz.render`) and their colour bars are painted from the same table.
    Built on first use rather than at import: importing matplotlib costs a few tenths of a second
    that the app's cold start need not pay before the first request (its warm-up pays it).

    Raises:
        ValueError: ``name`` is not one of :data:`COLORMAPS`.
    """
    if name not in COLORMAPS:
        raise ValueError(f"unknown colormap {name!r}; choose one of: {', '.join(COLORMAPS)}")
    from matplotlib import colormaps

    lut = np.rint(colormaps[name](np.arange(256))[:, :3] * 255.0).astype(np.uint8)
    lut.setflags(write=False)
    return lut


def colour_bar(colormap: str = "jet", *, width: int = 256, text: str = CAM_SCALE_TEXT,
               font_size: int = 12) -> Image.Image:
    """A horizontal bar from 0 (left) to 1 (right) in ``colormap``, "0 low" / "high 1" at its ends and ``text`` below.

    ``width`` is raised to what the two end labels and a 120 px ramp need (about 210 px).

    Raises:
        ValueError: an unknown colormap, or a width under 64 px.
    """
    if width < 64:
        raise ValueError(f"a colour bar needs at least 64 px, got {width}")
    font = caption_font(font_size)
    lut = colormap_lut(colormap)
    line_h = font_size + 4
    low, high = "0 low", "high 1"
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lw, hw = probe.textlength(low, font=font), probe.textlength(high, font=font)
    width = max(width, int(lw + hw) + 132)  # a narrow picture still gets a readable bar (wider than it)
    out = Image.new("RGB", (width, _BAR_HEIGHT + 4 * line_h + 4), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    x0, x1 = int(lw) + 6, width - int(hw) - 6
    ramp = lut[np.linspace(0, 255, max(1, x1 - x0)).round().astype(int)]
    out.paste(Image.fromarray(np.repeat(ramp[None], _BAR_HEIGHT, axis=0), "RGB"), (x0, 1))
    draw.rectangle((x0 - 1, 0, x1, _BAR_HEIGHT + 1), outline=(120, 120, 120))  # around the ramp, not on it
    draw.text((0, 0), low, fill=(20, 20, 20), font=font)
    draw.text((x1 + 6, 0), high, fill=(20, 20, 20), font=font)
    words, line = text.split(), ""
    lines = []
    for word in words:  # wrap the explanation to the bar's width (four lines at most)
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) > width and line:
            lines.append(line)
            line = word
        else:
            line = trial
    lines.append(line)
    out = out.crop((0, 0, width, _BAR_HEIGHT + 4 + line_h * min(len(lines), 4)))
    draw = ImageDraw.Draw(out)
    for k, part in enumerate(lines[:4]):
        draw.text((0, _BAR_HEIGHT + 3 + k * line_h), part, fill=(110, 110, 110), font=font)
    return out


def add_colour_scale(image: Image.Image, colormap: str = "jet", *, text: str = CAM_SCALE_TEXT) -> Image.Image:
    """``image`` with a colour bar (:func:`colour_bar`) added under it, on white, as wide as it allows."""
    bar = colour_bar(colormap, width=max(64, min(image.width - 2 * _PAD, 520)), text=text)
    out = Image.new("RGB", (max(image.width, bar.width + 2 * _PAD), image.height + bar.height + _PAD),
                    (255, 255, 255))
    out.paste(image.convert("RGB"), (0, 0))
    out.paste(bar, (_PAD, image.height))
    return out


#: matplotlib's "jet" as its anchor points (``matplotlib._cm._jet_data``), so the page's bar needs no
#: matplotlib import: the app builds its page without loading matplotlib (a cold-start cost).
_JET = {"red": ((0, 0), (0.35, 0), (0.66, 1), (0.89, 1), (1, 0.5)),
        "green": ((0, 0), (0.125, 0), (0.375, 1), (0.64, 1), (0.91, 0), (1, 0)),
        "blue": ((0, 0.5), (0.11, 1), (0.34, 1), (0.65, 0), (1, 0))}


def jet_colours(n: int) -> np.ndarray:
    """``n`` colours of "jet" from 0 to 1, as uint8 RGB, computed without matplotlib."""
    x = np.linspace(0.0, 1.0, n)
    channels = [np.interp(x, *zip(*_JET[c])) for c in ("red", "green", "blue")]
    return np.rint(np.stack(channels, axis=1) * 255.0).astype(np.uint8)


def colour_scale_html(colormap: str = "jet", *, text: str = CAM_SCALE_TEXT, stops: int = 11) -> str:
    """The bar as HTML (a CSS gradient through ``stops`` colours of ``colormap``), for the page."""
    lut = jet_colours(256) if colormap == "jet" else colormap_lut(colormap)
    colours = ", ".join(f"rgb({r},{g},{b})" for r, g, b in lut[np.linspace(0, 255, stops).round().astype(int)])
    return ('<div class="cbam-colour-scale" style="display:flex;align-items:center;gap:6px;font-size:0.85em">'
            f'<span>0 low</span><span style="flex:0 1 260px;height:12px;border:1px solid #888;'
            f'background:linear-gradient(to right, {colours})"></span><span>high 1</span>'
            f'<span style="opacity:0.75">{text}</span></div>')
