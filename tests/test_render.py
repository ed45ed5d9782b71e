import numpy as np
import pytest
from PIL import Image

from cbam_viz import figures, render
from cbam_viz.engine.explain import Explanation, ModelExplanation, Prediction
from conftest import make_image

RNG = np.random.default_rng(0)


def _model_explanation(name: str, cbam: bool, size=(90, 50), *, channel_only: bool = False) -> ModelExplanation:
    """A member's explanation: CBAM gates (``cbam``), SE-like channel gates only (``channel_only``) or none."""
    blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    spatial = {k: RNG.random((56 >> (int(k[5]) - 1),) * 2).astype(np.float32) for k in blocks} if cbam else {}
    channel = {k: RNG.random(64 << (int(k[5]) - 1)).astype(np.float32)
               for k in (blocks if cbam or channel_only else [])}
    return ModelExplanation(
        model_name=name, predictions=(Prediction(2, "bird", 0.7), Prediction(0, "cat", 0.2)), target=2,
        target_label="bird", cam=RNG.random((size[1], size[0])).astype(np.float32),
        channel_attention=channel, spatial_attention=spatial, timings={})


@pytest.fixture
def explanation():
    return _explanation(_model_explanation("resnet18", False), _model_explanation("resnet18_cbam", True))


def _explanation(*members: ModelExplanation, size=(90, 50)) -> Explanation:
    """An explanation of the given members, the first the reference."""
    return Explanation(image_size=size, method="gradcam", layer="layer4.1", reference=members[0].model_name,
                       models={m.model_name: m for m in members})


def _cbam(e: Explanation) -> ModelExplanation:
    return list(e.models.values())[-1]


def _ref(e: Explanation) -> ModelExplanation:
    return e.models[e.reference]


def test_colormaps_are_matplotlibs_tables():
    from matplotlib import colormaps

    for name in render.COLORMAPS:
        lut = render.colormap_lut(name)
        assert lut.shape == (256, 3) and lut.dtype == np.uint8 and not lut.flags.writeable, name
        expected = np.rint(colormaps[name](np.arange(256))[:, :3] * 255).astype(np.uint8)
        assert np.array_equal(lut, expected), name
    assert render.colormap_lut("jet") is render.colormap_lut("jet")  # built once
    assert tuple(render.colormap_lut("jet")[0]) == (0, 0, 128)


def test_overlay_size_and_blend():
    img = make_image(90, 50)
    mask = np.linspace(0, 1, 90 * 50, dtype=np.float32).reshape(50, 90)
    out = render.overlay(img, mask, alpha=0.4)
    assert out.size == (90, 50) and out.mode == "RGB"
    assert np.array_equal(np.asarray(render.overlay(img, mask, alpha=0.0)), np.asarray(img))
    full = np.asarray(render.overlay(img, np.zeros((50, 90)), alpha=1.0))
    assert (full == render.colormap_lut("jet")[0]).all()
    small = render.overlay(img.convert("L"), np.ones((7, 7)), alpha=0.5, colormap="viridis")
    assert small.size == (90, 50) and small.mode == "RGB"


@pytest.mark.parametrize("mask, alpha, colormap, match", [
    (np.zeros((3, 3, 3)), 0.5, "jet", "2-D"),
    (np.zeros((0, 4)), 0.5, "jet", "2-D"),
    (np.full((3, 3), np.nan), 0.5, "jet", "NaN"),
    (np.full((3, 3), 1.5), 0.5, "jet", r"\[0, 1\]"),
    (np.full((3, 3), -0.1), 0.5, "jet", r"\[0, 1\]"),
    (np.zeros((3, 3)), 1.5, "jet", "alpha"),
    (np.zeros((3, 3)), True, "jet", "alpha"),
    (np.zeros((3, 3)), 0.5, "rainbow", "unknown colormap"),
])
def test_overlay_validation(mask, alpha, colormap, match):
    with pytest.raises(ValueError, match=match):
        render.overlay(make_image(10, 10), mask, alpha=alpha, colormap=colormap)


def test_overlay_rejects_non_image():
    with pytest.raises(TypeError):
        render.overlay(np.zeros((4, 4, 3)), np.zeros((4, 4)))


def test_attention_gallery(explanation):
    img = make_image(90, 50)
    gallery = render.attention_gallery(img, _cbam(explanation))
    assert [c for _, c in gallery][:3] == ["layer1.0 spatial (56x56)", "layer1.1 spatial (56x56)", "layer2.0 spatial (28x28)"]
    assert gallery[-1][1] == "layer4.1 spatial (7x7)" and len(gallery) == 8
    assert all(im.mode == "RGB" and max(im.size) == render.GALLERY_SIDE for im, _ in gallery)
    assert gallery[0][0].size[0] > gallery[0][0].size[1]  # aspect ratio kept
    assert render.attention_gallery(img, _cbam(explanation), side=None)[0][0].size == (90, 50)
    assert render.attention_gallery(img, _ref(explanation)) == []


def test_channel_attention_image():
    out = render.channel_attention_image(np.linspace(0, 1, 64), title="layer1.0", width=128, height=32)
    assert out.mode == "RGB" and out.width == 128 and out.height > 32
    a = np.asarray(out)
    assert (a[-1, -1] != a[-1, 0]).any()  # bar colour follows the value
    for bad in (np.zeros((2, 3)), np.array([]), np.array([0.5, 2.0]), np.array([np.nan])):
        with pytest.raises(ValueError):
            render.channel_attention_image(bad, title="x")


def test_composite(explanation):
    img = make_image(90, 50)
    out = figures.composite(img, explanation, alpha=0.5)
    assert out.mode == "RGB" and out.width >= 3 * render.PANEL
    bare = _explanation(_ref(explanation), _model_explanation("x", False))
    assert figures.composite(img, bare).height < out.height  # the attention row is there
    with pytest.raises(ValueError):
        figures.composite(img, explanation, alpha=2)


def _panel(picture: Image.Image, i: int, size: tuple[int, int]) -> np.ndarray:
    """Main panel ``i`` of a composite (0: the original, then one per member)."""
    pw, ph = size
    x = render.PAD + i * (pw + render.PAD)
    return np.asarray(picture)[render.PAD:render.PAD + ph, x:x + pw]


def test_composite_of_three_members_shows_each_members_cam_and_a_row_per_spatial_member():
    img = make_image(90, 50)
    plain, se, cbam = (_model_explanation("resnet18", False), _model_explanation("resnet18_se", False, channel_only=True),
                       _model_explanation("resnet18_cbam", True))
    three = figures.composite(img, _explanation(plain, se, cbam), alpha=0.5)
    two = figures.composite(img, _explanation(plain, cbam), alpha=0.5)
    base = render._fit(img, render.PANEL)
    assert three.width == two.width + base.width + render.PAD  # one more main panel
    ungated = figures.composite(img, _explanation(plain, _model_explanation("resnet18_b", False), cbam), alpha=0.5)
    assert three.size == ungated.size  # SE has no spatial gates: no row of its own
    assert np.array_equal(_panel(three, 0, base.size), np.asarray(base))
    for i, m in enumerate((plain, se, cbam), start=1):  # each member's own CAM, in the lineup's order
        assert np.array_equal(_panel(three, i, base.size), np.asarray(render.overlay(base, m.cam, alpha=0.5))), m.model_name
    assert not np.array_equal(_panel(three, 2, base.size), _panel(three, 3, base.size))
    bam = _model_explanation("resnet18_bam", True)
    four = figures.composite(img, _explanation(plain, se, bam, cbam))
    one_row = figures.composite(img, _explanation(plain, se, _model_explanation("resnet18_b", False), cbam))
    assert four.width == one_row.width and four.height > one_row.height  # a second spatial member: a second row


def test_every_picture_of_a_224_px_request(explanation):
    """What one request draws, at the app's size (its speed is measured by benchmarks/bench_explain.py)."""
    img = make_image(224, 224)
    cam = RNG.random((224, 224)).astype(np.float32)
    explanation = _explanation(_model_explanation("b", False, (224, 224)), _model_explanation("c", True, (224, 224)),
                               size=(224, 224))
    assert render.overlay(img, cam).size == (224, 224)
    gallery = render.attention_gallery(img, _cbam(explanation))
    assert len(gallery) == len(_cbam(explanation).spatial_attention)
    for block, v in _cbam(explanation).channel_attention.items():
        assert render.channel_attention_image(v, title=block).mode == "RGB"
    assert figures.composite(img, explanation).width > 3 * 224


def test_attention_sheet_is_every_tile_in_one_picture(explanation):
    """The page shows one picture of every block's spatial attention, the gallery's tiles in order."""
    img = make_image(90, 50)
    sheet = render.attention_sheet(img, _cbam(explanation), side=60, columns=4)
    tiles = render.attention_gallery(img, _cbam(explanation), side=60)
    tw, th = tiles[0][0].size
    assert sheet.mode == "RGB" and sheet.width == render.PAD + 4 * (tw + render.PAD)
    scale = 60  # the colour bar and its caption under the tiles (cbam_viz.colour_scale)
    assert sheet.height > 2 * th + scale and sheet.height < 3 * th + 3 * (render.FONT_SIZE + 4 + render.PAD) + scale
    a = np.asarray(sheet)
    y = render.SHEET_TOP + render.FONT_SIZE + 4
    for k in (0, 5):  # tile 0 (row 0) and tile 5 (row 1, column 1) are pasted where they belong
        r, c = divmod(k, 4)
        x0, y0 = render.PAD + c * (tw + render.PAD), y + r * (th + render.FONT_SIZE + 4 + render.PAD)
        assert np.array_equal(a[y0:y0 + th, x0:x0 + tw], np.asarray(tiles[k][0]))
    assert render.attention_sheet(img, _ref(explanation)) is None
    with pytest.raises(ValueError, match="columns"):
        render.attention_sheet(img, _cbam(explanation), columns=0)


def test_composite_of_the_three_member_family_lineup(family_lineup):
    """The real explanation of a three-member lineup: its original, then each member's CAM in order."""
    from cbam_viz.engine.explain import explain

    img = make_image(90, 50, seed=3)
    (e,) = explain(img, family_lineup)
    out = figures.composite(img, e, alpha=0.4)
    base = render._fit(img, render.PANEL)
    assert out.width >= 4 * (base.width + render.PAD)
    for i, name in enumerate(family_lineup.names, start=1):
        assert np.array_equal(_panel(out, i, base.size), np.asarray(render.overlay(base, e.models[name].cam, alpha=0.4)))
