"""Channel profiles: the picture is the figure it renders (and the figure shows the numbers), the
class-similarity numbers equal direct formulas, and the per-class means follow the labels."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cbam_viz.research.channel_profiles import (
    ChannelProfiles, accumulate_profiles, block_similarity, chance_variance_ratio, profiles_figure, profiles_image,
    similarity_rows,
)
from cbam_viz.research.profile_files import load_profiles, report_json, write_profiles
from conftest import make_loaded, make_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _per_image(seed=0, n=(3, 5, 4), channels=6, blocks=2):
    """Per-image gate values with a class effect, and the ChannelProfiles they average to."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(n)), n)
    gates = {f"layer{b + 1}.0": rng.random((len(labels), channels)) * 0.3 + 0.1 * labels[:, None] * (b + 1)
             for b in range(blocks)}
    means = {b: np.stack([g[labels == k].mean(0) for k in range(len(n))]) for b, g in gates.items()}
    squares = {b: np.stack([(g[labels == k] ** 2).mean(0) for k in range(len(n))]) for b, g in gates.items()}
    profiles = ChannelProfiles(("a", "b", "c"), ("ant", "bee", "cat"), np.asarray(n), means, squares,
                               model_name="toy", data="here")
    return profiles, gates, labels


def _render(fig, dpi):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def test_picture_is_the_rendered_figure_and_shows_each_class_minus_the_mean():
    profiles, _, _ = _per_image(blocks=5)
    img = profiles_image(profiles, dpi=60)
    assert img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img), _render(profiles_figure(profiles), 60))
    pixels = np.asarray(img).reshape(-1, 3).astype(int)
    assert len(np.unique(pixels, axis=0)) > 50  # heat maps and text, not a blank canvas
    assert ((pixels[:, 0] - pixels[:, 2]) > 100).any() and ((pixels[:, 2] - pixels[:, 0]) > 100).any()  # red, blue

    fig = profiles_figure(profiles)
    visible = [ax for ax in fig.axes if ax.get_visible() and ax.images]
    assert len(visible) == 5 and sum(1 for ax in fig.axes if not ax.get_visible()) == 3  # 4 columns, 2 rows
    sim = block_similarity(profiles)
    for ax, block in zip(visible, profiles.blocks):
        m = profiles.means[block]
        mean = m.mean(0)
        dev = (m - mean)[:, np.argsort(mean, kind="stable")]
        shown = ax.images[0]
        np.testing.assert_allclose(np.asarray(shown.get_array()), dev, atol=1e-12)
        lim = np.abs(dev).max()
        assert shown.get_clim() == pytest.approx((-lim, lim))
        assert f"r={sim[block]['profile_correlation']:.2f}" in ax.get_title()
        assert f"η²={sim[block]['class_variance_ratio']:.2f}" in ax.get_title()
        assert [t.get_text() for t in ax.get_yticklabels()] == ["ant", "bee", "cat"]
        assert ax.get_xlabel().startswith(f"{m.shape[1]} channels")


def test_one_block_figure_has_one_panel_and_default_resolution():
    profiles, _, _ = _per_image(blocks=1)
    fig = profiles_figure(profiles)
    assert sum(1 for ax in fig.axes if ax.images) == 1 and all(ax.get_visible() for ax in fig.axes)
    np.testing.assert_array_equal(np.asarray(profiles_image(profiles)), _render(profiles_figure(profiles), 110))


def test_identical_classes_and_long_names():
    flat = np.tile(np.linspace(0.2, 0.8, 5), (2, 1))  # both classes gated alike: nothing to show
    long_name = "a class name longer than fourteen letters"
    same = ChannelProfiles(("a", "b"), (long_name, "b"), np.array([2, 2]), {"x": flat}, {"x": flat ** 2})
    ax = next(ax for ax in profiles_figure(same).axes if ax.images)
    assert ax.images[0].get_clim() == pytest.approx((-1e-6, 1e-6), abs=1e-12)
    assert [t.get_text() for t in ax.get_yticklabels()] == [long_name[:14], "b"]


def test_similarity_numbers_equal_direct_formulas():
    profiles, gates, labels = _per_image()
    sim = block_similarity(profiles)
    for block, g in gates.items():
        m = profiles.means[block]
        corr = np.corrcoef(m)
        assert sim[block]["profile_correlation"] == pytest.approx(corr[np.triu_indices(3, 1)].mean())
        grand = g.mean(0)
        between = sum((labels == k).sum() * ((m[k] - grand) ** 2).sum() for k in range(3))
        total = ((g - grand) ** 2).sum()
        assert sim[block]["class_variance_ratio"] == pytest.approx(between / total)
    assert chance_variance_ratio(profiles) == pytest.approx(2 / 11)
    rows = similarity_rows(profiles)
    assert rows[0] == {"block": "layer1.0", "channels": 6,
                       "profile_correlation": round(sim["layer1.0"]["profile_correlation"], 4),
                       "class_variance_ratio": round(sim["layer1.0"]["class_variance_ratio"], 4)}
    doc = report_json(profiles)
    assert doc["n"] == 12 and doc["counts"] == {"a": 3, "b": 5, "c": 4}
    assert doc["chance_variance_ratio"] == pytest.approx(round(2 / 11, 4))
    assert doc["classes"][1] == {"id": "b", "name": "bee"} and set(doc["blocks"]) == {"layer1.0", "layer2.0"}


def test_similarity_edge_cases():
    profiles, _, _ = _per_image()
    m = profiles.means["layer1.0"].copy()
    m[1] = np.nan  # a class without images is left out
    sq = profiles.mean_squares["layer1.0"].copy()
    sq[1] = np.nan
    counts = np.array([3, 0, 4])
    gap = ChannelProfiles(("a", "b", "c"), ("a", "b", "c"), counts, {"x": m}, {"x": sq})
    corr = np.corrcoef(m[[0, 2]])[0, 1]
    assert block_similarity(gap)["x"]["profile_correlation"] == pytest.approx(corr)
    kept = ChannelProfiles(("a", "c"), ("a", "c"), counts[[0, 2]], {"x": m[[0, 2]]}, {"x": sq[[0, 2]]})
    ratio = block_similarity(gap)["x"]["class_variance_ratio"]
    assert np.isfinite(ratio) and ratio == pytest.approx(block_similarity(kept)["x"]["class_variance_ratio"])
    assert chance_variance_ratio(gap) == pytest.approx(1 / 6)
    pair = ChannelProfiles(("a", "b"), ("a", "b"), np.array([1, 1]), {"x": m[[0, 2]]}, {"x": sq[[0, 2]]})
    assert chance_variance_ratio(pair) == 1.0  # one image per class: eta^2 is 1 whatever the gate
    one = ChannelProfiles(("a",), ("a",), np.array([1]), {"x": m[:1]}, {"x": sq[:1]})
    assert np.isnan(block_similarity(one)["x"]["profile_correlation"]) and np.isnan(chance_variance_ratio(one))
    flat = np.full((3, 4), 0.5)
    same = ChannelProfiles(("a", "b", "c"), ("a", "b", "c"), np.array([2, 2, 2]), {"x": flat}, {"x": flat ** 2})
    assert block_similarity(same)["x"] == {"profile_correlation": 1.0, "class_variance_ratio": 0.0}
    empty = ChannelProfiles(("a",), ("a",), np.array([0]), {"x": np.full((1, 4), np.nan)},
                            {"x": np.full((1, 4), np.nan)})
    assert np.isnan(block_similarity(empty)["x"]["class_variance_ratio"])
    assert similarity_rows(one)[0]["profile_correlation"] is None


def test_means_follow_the_labels_in_any_order_and_round_trip(tmp_path):
    from cbam_viz.engine.attention import record_attention

    model = make_model("resnet18_cbam", seed=3)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([2, 0, 2, 0, 2])  # class 1 has no image; labels out of order, split over batches
    counts, means, squares = accumulate_profiles(model, [(x[:2], y[:2]), (x[2:], y[2:])], num_classes=3)
    assert counts.tolist() == [2, 0, 3]
    with record_attention(model) as maps, torch.no_grad():
        model(x)
    for block, gate in maps.items():
        g = gate["channel"].double().numpy()
        np.testing.assert_allclose(means[block][0], g[[1, 3]].mean(0), rtol=1e-6)
        np.testing.assert_allclose(means[block][2], g[[0, 2, 4]].mean(0), rtol=1e-6)
        np.testing.assert_allclose(squares[block][2], (g[[0, 2, 4]] ** 2).mean(0), rtol=1e-6)
        assert np.isnan(means[block][1]).all()
    profiles = ChannelProfiles(("a", "b", "c"), ("ant", "bee", "cat"), counts, means, squares, model_name="m",
                               data="d")
    paths = write_profiles(profiles, tmp_path / "out")
    for target in (paths["npz"], tmp_path / "out"):
        back = load_profiles(target)
        assert back.class_ids == ("a", "b", "c") and back.class_names == ("ant", "bee", "cat")
        assert back.model_name == "m" and back.data == "d" and back.counts.tolist() == [2, 0, 3]
        assert back.blocks == profiles.blocks
        for block in means:
            np.testing.assert_array_equal(back.means[block], means[block])
            np.testing.assert_array_equal(back.mean_squares[block], squares[block])


def test_profile_dataset_reads_the_folder_in_the_models_class_order(tmp_path):
    import time

    from cbam_viz.research.channel_profiles import profile_dataset
    from cbam_viz.engine.preprocess import open_image, to_model_batch
    from tests.synthetic import make_image_folder

    loaded = make_loaded("resnet18_cbam", input_size=32, seed=2)
    data = make_image_folder(tmp_path / "val", ("c0", "c1", "c2"), per_class=2, size=(30, 36))
    for f in list((data / "c1").iterdir())[:1]:
        f.unlink()
    t0 = time.perf_counter()
    profiles = profile_dataset(loaded, data, batch_size=2, workers=1, progress=False)
    wall = time.perf_counter() - t0
    assert profiles.counts.tolist() == [2, 1, 2] and profiles.class_ids == ("c0", "c1", "c2")
    assert profiles.model_name == loaded.name and profiles.data == str(data)
    extra = profiles.extra
    assert (extra["trained"], extra["input_size"], extra["max_images"]) == (False, 32, None)
    assert 0 <= extra["seconds"] <= wall + 0.01 and extra["seconds"] == round(extra["seconds"], 2)
    files = sorted(data.glob("*/*.png"))
    x = to_model_batch([open_image(f) for f in files], 32, loaded.mean, loaded.std)
    y = torch.tensor([("c0", "c1", "c2").index(f.parent.name) for f in files])
    _, means, _ = accumulate_profiles(loaded.model, [(x, y)], num_classes=3)
    for block in means:
        np.testing.assert_allclose(profiles.means[block], means[block], rtol=1e-5, atol=1e-7)
