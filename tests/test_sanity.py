"""Sanity check by cascading model randomisation: metrics, the cascade, the untouched original, flags, CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cbam_viz.engine.cam import compute_cams
from cbam_viz.research.sanity import (
    PASS_THRESHOLD, STAGES, SanityResult, cascading_randomization, rank_correlation, sanity_check, sanity_flags,
    sanity_image, ssim, stage_modules,
)
from conftest import assert_no_hooks, make_image, make_loaded, make_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cbam_model():
    return make_model("resnet18_cbam", seed=1)


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))


def test_a_cam_compared_with_itself_scores_one(cbam_model, x):
    first = compute_cams(cbam_model, x[:1]).cams[0]
    again = compute_cams(cbam_model, x[:1]).cams[0]
    assert first.std() > 0
    assert ssim(first, again) == pytest.approx(1.0, abs=1e-9)
    assert rank_correlation(first, again) == pytest.approx(1.0, abs=1e-9)


def test_metrics_against_known_values():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a = np.clip(rng.normal(0.3, 0.3, (24, 20)), 0, 1)  # many exact zeros and ones: ties
    b = np.clip(a + rng.normal(0, 0.2, a.shape), 0, 1)
    assert rank_correlation(a, b) == pytest.approx(spearmanr(a.ravel(), b.ravel()).statistic, abs=1e-9)
    assert rank_correlation(a, 1 - a) == pytest.approx(-1.0)
    assert ssim(a, b) < 0.9 and ssim(a, 1 - a) < 0
    assert rank_correlation(a, np.zeros_like(a)) == 0.0  # a flat map reproduces no ordering
    assert ssim(a[:5, :5], a[:5, :5]) == pytest.approx(1.0)  # smaller than the 11x11 window
    assert ssim(a, b) == pytest.approx(_ssim_2d(a, b), abs=1e-12)


def _ssim_2d(a, b):
    """Wang et al.'s SSIM with the 11x11 Gaussian window applied as one 2-D window per moment."""
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    h, wd = a.shape[0] - 10, a.shape[1] - 10
    filt = lambda m: np.array([[(m[i:i + 11, j:j + 11] * w).sum() for j in range(wd)] for i in range(h)])
    mx, my = filt(a), filt(b)
    sxx, syy, sxy = filt(a * a) - mx ** 2, filt(b * b) - my ** 2, filt(a * b) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return float((((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))).mean())


def test_the_cascade_is_cumulative_seeded_and_leaves_the_original_untouched(cbam_model):
    before = {k: v.clone() for k, v in cbam_model.state_dict().items()}
    rng = torch.get_rng_state()
    stage_of = lambda key: key.split(".")[0] if key.split(".")[0] in STAGES else "stem"
    runs = []
    for _ in range(2):
        seen = []
        for i, (stage, model) in enumerate(cascading_randomization(cbam_model, seed=3)):
            state = model.state_dict()
            changed = {stage_of(k) for k, v in state.items()
                       if v.dtype.is_floating_point and "running" not in k and not torch.equal(v, before[k])}
            seen.append((stage, changed, {k: v.clone() for k, v in state.items()} if i == 1 else None))
        runs.append(seen)
    assert [s for s, _, _ in runs[0]] == list(STAGES)
    for i, (_, changed, _) in enumerate(runs[0]):
        assert set(STAGES[:i + 1]) <= changed | {"stem"} and not changed - set(STAGES[:i + 1])
    for key, v in runs[0][1][2].items():  # same seed, same random networks
        torch.testing.assert_close(v, runs[1][1][2][key], rtol=0, atol=0)
    for key, v in cbam_model.state_dict().items():
        torch.testing.assert_close(v, before[key], rtol=0, atol=0)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG stream is not consumed
    assert_no_hooks(cbam_model)


def test_stem_is_conv1_and_bn1(cbam_model):
    stages = dict(stage_modules(cbam_model))
    assert stages["stem"] == [cbam_model.conv1, cbam_model.bn1]
    with pytest.raises(ValueError, match="ResNet layout"):
        stage_modules(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_randomising_changes_the_cams(cbam_model):
    from cbam_viz.engine.preprocess import to_model_batch

    loaded = make_loaded("resnet18_cbam", input_size=128)
    x = to_model_batch([make_image(128, 128, seed=s) for s in range(2)], 128, loaded.mean, loaded.std)
    before = {k: v.clone() for k, v in cbam_model.state_dict().items()}
    result = sanity_check(cbam_model, x, model_name="tiny")
    assert result.steps == STAGES and result.n_images == 2
    # Grad-CAM's channel weights come from the logits: a new fc alone already scrambles its map.
    assert result.rank["gradcam"][0].mean() < 0.5 and result.rank["gradcam"][-1].mean() < 0.6
    assert sanity_flags(result)["gradcam"]
    for m in result.methods:
        assert result.rank[m].shape == result.ssim[m].shape == (len(STAGES), 2)
        # Every method changes at least somewhat. (On this *untrained* tiny model Grad-CAM++ and
        # LayerCAM, which weight activations by positive gradients, keep ~0.9: activation-dominated.)
        assert result.rank[m].mean() < 0.95, m
        assert result.ssim[m].mean() < 0.95, m
    rows = result.rows()
    assert len(rows) == len(STAGES) * 3 and set(rows[0]) == {"step", "method", "ssim", "rank_correlation"}
    for key, v in cbam_model.state_dict().items():
        torch.testing.assert_close(v, before[key], rtol=0, atol=0)
    assert_no_hooks(cbam_model)


def test_flags_on_constructed_results():
    n = len(STAGES)
    unchanged = np.ones((n, 4))
    decays = np.linspace(0.9, 0.1, n)[:, None] * np.ones((1, 4))
    borderline = np.full((n, 4), PASS_THRESHOLD)
    result = SanityResult("m", ("stuck", "good", "edge"), STAGES,
                          ssim={k: np.ones((n, 4)) for k in ("stuck", "good", "edge")},
                          rank={"stuck": unchanged, "good": decays, "edge": borderline}, layer="layer4.1")
    assert sanity_flags(result) == {"stuck": False, "good": True, "edge": False}
    assert sanity_flags(result, threshold=0.95) == {"stuck": False, "good": True, "edge": True}


def test_one_call_for_the_app_keeps_the_cams():
    loaded = make_loaded("resnet18_cbam", input_size=96, seed=1)
    result = sanity_image(loaded, make_image(80, 60), methods=("gradcam",))
    cams = result.cams["gradcam"]
    assert cams.shape == (1 + len(STAGES), 1, 96, 96) and cams.dtype == np.float32
    assert 0 <= cams.min() and cams.max() <= 1
    assert set(sanity_flags(result)) == {"gradcam"}


def test_cli_writes_json_and_markdown_for_every_member(tmp_path):
    from cbam_viz.cli import main
    from cbam_viz.models.imagenette import IMAGENETTE_NAMES
    from tests.bad_inputs import TEST_PAIR, write_test_weights
    from tests.synthetic import make_image_folder

    weights = write_test_weights(tmp_path / "weights")
    data = make_image_folder(tmp_path / "val", list(IMAGENETTE_NAMES), per_class=1)
    out = tmp_path / "out"
    assert main(["sanity-check", "--data", str(data), "--weights", str(weights), "--pair", TEST_PAIR,
                 "--methods", "gradcam", "layercam", "--max-images", "3", "--batch-size", "2", "--threads", "1",
                 "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "sanity.json").read_text())
    assert report["lineup"] == TEST_PAIR and len(report["models"]) == 2  # a manifest pair: a lineup of two
    assert list(report["vs_reference"]) == [n for n in report["models"] if n != report["reference"]]
    for m in report["models"].values():
        assert m["n"] == 3 and m["steps"] == list(STAGES) and list(m["methods"]) == ["gradcam", "layercam"]
        for res in m["methods"].values():
            assert len(res["ssim"]) == len(res["rank_correlation"]) == len(STAGES)
            for iv in res["ssim"] + res["rank_correlation"]:
                assert iv["n"] == 3 and iv["low"] <= iv["value"] <= iv["high"]
            assert isinstance(res["passes"], bool)
    md = (out / "sanity.md").read_text()
    assert md.count("| re-initialised up to |") == 2 and "| stem |" in md
    assert main(["sanity-check", "--data", str(data), "--weights", str(weights), "--methods", "nocam",
                 "--out", str(out)]) == 2
