"""The colour scale under every heatmap picture, on the page and in the README; a font with the captions' glyphs."""
from __future__ import annotations

import numpy as np
import pytest

from cbam_viz import colour_scale, figures, render
from cbam_viz.engine.explain import explain


def _has_scale(picture, colormap: str = "jet") -> bool:
    """Some row of the picture's bottom 100 px runs through the colormap from its first to its last colour."""
    lut = render.colormap_lut(colormap).astype(int)
    pixels = np.asarray(picture.convert("RGB")).astype(int)[-100:]
    for row in pixels:
        near = lambda c, tol=6: np.abs(row - c).sum(axis=1) <= tol  # noqa: E731
        first, last = np.flatnonzero(near(lut[0])), np.flatnonzero(near(lut[-1]))
        mid = np.flatnonzero(near(lut[128], 40))  # a short ramp samples the middle of the map coarsely
        if first.size and last.size and mid.size and first.min() < mid.min() < last.max():
            return True
    return False


def test_caption_font_draws_the_arrow_and_the_ellipsis():
    from PIL import Image, ImageDraw

    font = colour_scale.caption_font(13)

    def drawn(text):
        canvas = Image.new("L", (40, 30))
        ImageDraw.Draw(canvas).text((4, 4), text, fill=255, font=font)
        return canvas.tobytes()

    missing = drawn("\ue000")  # a private-use code point: no font has it (drawn as the "box")
    for glyph in ("→", "…"):
        assert drawn(glyph) != missing, glyph


def test_colour_bar_runs_low_to_high():
    bar = colour_scale.colour_bar("viridis", width=300, text="CAM")
    assert bar.width == 300 and _has_scale(bar, "viridis")
    with pytest.raises(ValueError):
        colour_scale.colour_bar("rainbow-ish")


def test_composite_and_attention_sheet_carry_the_scale(tiny_lineup, image):
    (e,) = explain([image], tiny_lineup)
    cbam = e.models[tiny_lineup.members[-1].name]
    assert _has_scale(figures.composite(image, e))
    assert _has_scale(render.attention_sheet(image, cbam))
    assert not _has_scale(render.overlay(image, cbam.cam))  # the page's slider overlay stays the photo's size


def test_a_narrow_picture_still_gets_a_readable_scale():
    from PIL import Image

    tall = Image.new("RGB", (12, 300), (40, 40, 40))  # a 1:25 panorama's composite is about this narrow
    framed = colour_scale.add_colour_scale(tall)
    assert framed.width > tall.width and _has_scale(framed)
    assert framed.crop((0, 0, 12, 300)).tobytes() == tall.tobytes()  # the picture itself is untouched


def test_html_scale_for_the_page():
    html = colour_scale.colour_scale_html("jet")
    r, g, b = render.colormap_lut("jet")[0]
    assert "linear-gradient" in html and f"rgb({r},{g},{b})" in html and "high 1" in html


def test_the_pages_jet_is_matplotlibs():
    """The page draws "jet" without matplotlib (cold start); it must be the same colours."""
    diff = np.abs(colour_scale.jet_colours(256).astype(int) - render.colormap_lut("jet").astype(int))
    assert diff.max() <= 1


def test_page_shows_the_scale():
    import app

    blocks = [c for c in app.demo.blocks.values() if getattr(c, "elem_id", None) == "colour_scale"]
    assert len(blocks) == 1 and "linear-gradient" in colour_scale.colour_scale_html()
