"""The pictures a person sees, against references that do not use the code under test: resizing
against PIL's antialiased bilinear filter (and never mirrored), overlays against matplotlib's colour
table blended by hand, and each member's overlay equal to ``render.overlay`` of that member's CAM."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cbam_viz import render
from cbam_viz.training.data import normalize, resize_batch
from conftest import make_image

pytestmark = pytest.mark.usefixtures("one_thread")


def _pil_resize(batch: torch.Tensor, size: int) -> torch.Tensor:
    """PIL's bilinear resize of each float channel ('F' mode: antialiased when shrinking)."""
    out = [[np.asarray(Image.fromarray(c.numpy().astype(np.float32), "F").resize((size, size), Image.BILINEAR))
            for c in img] for img in batch]
    return torch.from_numpy(np.asarray(out, np.float32))


@pytest.mark.parametrize("shape,size", [((2, 3, 40, 60), 16), ((1, 3, 9, 12), 24), ((1, 1, 50, 20), 10)])
def test_resize_batch_is_pils_bilinear_resize(shape, size):
    gen = torch.Generator().manual_seed(0)
    batch = torch.rand(*shape, generator=gen)
    batch[..., : shape[-1] // 3] += 2.0  # a bright left third: any mirroring moves it
    out = resize_batch(batch, size)
    assert out.shape == (*shape[:2], size, size) and out.dtype == batch.dtype
    torch.testing.assert_close(out, _pil_resize(batch, size), atol=0.02, rtol=0)
    assert out[..., : size // 4].mean() > out[..., -(size // 4):].mean() + 1.0  # left stays left
    rows = torch.linspace(0, 1, shape[-2]).view(1, 1, -1, 1).expand(shape).contiguous()
    tall = resize_batch(rows, size)  # top stays top
    assert tall[..., 0, :].mean() < tall[..., -1, :].mean()


def test_resize_batch_leaves_a_batch_of_that_size_alone():
    batch = torch.rand(2, 3, 12, 12)
    assert resize_batch(batch, 12) is batch


def test_normalize_is_per_channel_mean_and_std_of_unit_range_values():
    u8 = torch.tensor([[[[0, 255]], [[51, 102]], [[255, 0]]]], dtype=torch.uint8)  # (1, 3, 1, 2)
    mean, std = (0.5, 0.2, 0.25), (0.5, 0.1, 0.25)
    out = normalize(u8, mean, std)
    expected = torch.tensor([[[[-1.0, 1.0]], [[0.0, 2.0]], [[3.0, -1.0]]]])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(normalize(u8.float() / 255, mean, std), expected)
    assert u8.dtype == torch.uint8 and u8[0, 0, 0, 1] == 255  # the input is left as it was


def test_overlay_is_the_colour_table_blended_by_hand():
    from matplotlib import colormaps

    image = make_image(24, 16, seed=3)
    mask = np.random.default_rng(1).random((16, 24)).astype(np.float32)
    for name, alpha in (("jet", 0.5), ("viridis", 0.3), ("gray", 1.0), ("inferno", 0.0)):
        heat = np.rint(colormaps[name](np.rint(mask * 255).astype(int))[..., :3] * 255)
        expected = (1 - alpha) * np.asarray(image, np.float64) + alpha * heat
        out = render.overlay(image, mask, alpha=alpha, colormap=name)
        assert out.size == image.size and out.mode == "RGB"
        assert np.abs(np.asarray(out, np.float64) - expected).max() <= 1.0, name
        np.testing.assert_array_equal(np.asarray(render.colorize(mask, colormap=name)), heat.astype(np.uint8))
    lut = render.colormap_lut("jet")
    assert lut.shape == (256, 3) and lut.dtype == np.uint8 and not lut.flags.writeable
    # A mask at another size is stretched over the whole image: its left half stays on the left.
    half = np.zeros((4, 6), np.float32)
    half[:, :3] = 1.0
    stretched = np.asarray(render.colorize(half, size=(24, 16)))
    assert (stretched[:, :8] == lut[255]).all() and (stretched[:, -8:] == lut[0]).all()
    gray = render.overlay(image.convert("L"), half, alpha=1.0, colormap="gray")
    assert gray.mode == "RGB" and np.asarray(gray)[0, 0].tolist() == [255, 255, 255]


def test_overlay_refuses_what_it_cannot_draw():
    image = make_image(8, 8)
    ok = np.zeros((8, 8), np.float32)
    for bad in (np.zeros((0, 3)), np.zeros(4), np.full((2, 2), np.nan), np.full((2, 2), 1.01), np.full((2, 2), -0.01),
                np.array([["a"]]), np.zeros((2, 2), complex)):
        with pytest.raises(ValueError):
            render.overlay(image, bad)
    for alpha in (-0.1, 1.1, True, "0.5"):
        with pytest.raises(ValueError):
            render.overlay(image, ok, alpha=alpha)
    for cmap in ("nope", 3):
        with pytest.raises(ValueError):
            render.overlay(image, ok, colormap=cmap)
    with pytest.raises(TypeError):
        render.overlay(np.zeros((8, 8, 3)), ok)
    with pytest.raises(ValueError):
        render.overlay(Image.new("RGB", (0, 3)), ok)
    edge = np.full((8, 8), 1 + 5e-7, np.float32)  # float noise above 1 is drawn as 1
    assert np.asarray(render.overlay(image, edge, alpha=1.0)).tolist() == np.asarray(
        render.overlay(image, np.ones((8, 8)), alpha=1.0)).tolist()
    assert render.overlay(image, ok, alpha=1).size == (8, 8)


@pytest.mark.parametrize("archs", [("resnet18", "resnet18_cbam"), ("resnet18", "resnet18_se", "resnet18_cbam")])
def test_each_members_pictures_are_drawn_from_its_own_explanation(archs):
    from cbam_viz import figures
    from cbam_viz.service import analyse
    from conftest import make_service_lineup

    lineup = make_service_lineup("pictures", archs=archs)
    analysis = analyse(make_image(72, 56, seed=8), lineup=lineup, alpha=0.4, faithfulness=True,
                       pictures={"overlays", "spatial_sheet", "channel_overview", "composite", "faithfulness"})
    names = lineup.names
    assert list(analysis.overlays) == names
    cams = {name: analysis.explanation.models[name].cam for name in names}
    assert all(np.abs(cams[names[0]] - cams[n]).max() > 0.05 for n in names[1:])  # the members' maps differ
    for name in names:
        expected = render.overlay(analysis.image, cams[name], alpha=0.4)
        np.testing.assert_array_equal(np.asarray(analysis.overlays[name]), np.asarray(expected), err_msg=name)
    models = analysis.explanation.models
    spatial = [n for n in names if models[n].spatial_attention]
    channel = [n for n in names if models[n].channel_attention]
    assert spatial == [names[-1]]  # only the CBAM member has spatial maps
    assert channel == names[1:]  # SE and CBAM have channel gates; the plain reference none
    assert list(analysis.spatial_sheets) == spatial and list(analysis.channel_overviews) == channel
    for name in spatial:
        want = render.attention_sheet(analysis.image, models[name], alpha=0.4)
        assert np.array_equal(np.asarray(analysis.spatial_sheets[name]), np.asarray(want)), name
    for name in channel:
        want = render.channel_attention_summary(models[name])
        assert np.array_equal(np.asarray(analysis.channel_overviews[name]), np.asarray(want)), name
    assert np.array_equal(np.asarray(analysis.composite),
                          np.asarray(figures.composite(analysis.image, analysis.explanation, alpha=0.4)))
    assert list(analysis.faithfulness) == names
    assert np.array_equal(np.asarray(analysis.faithfulness_image),
                          np.asarray(figures.confidence_drop_figure(analysis.faithfulness, lineup)))
    only = analyse(analysis.image, lineup=lineup, faithfulness=False, pictures={"overlays"})
    assert only.spatial_sheets == {} and only.channel_overviews == {} and only.composite is None
    assert only.faithfulness_image is None and list(only.overlays) == names
    measured = analyse(analysis.image, lineup=lineup, faithfulness=True, pictures={"overlays"})
    assert measured.faithfulness is not None and measured.faithfulness_image is None  # measured, not drawn
    none = analyse(analysis.image, lineup=lineup, faithfulness=False, pictures=())
    assert none.overlays == {} and none.spatial_sheets == {} and none.channel_overviews == {}
