"""Sanity check (cascading randomisation): the stored ``passes`` is the rule applied to the stored
numbers (and can be False), every number equals a recomputation from the randomised copies, and
the dataset report holds the per-image values of the images it read."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cbam_viz.engine.cam import compute_cams
from cbam_viz.engine.preprocess import open_image, to_model_batch
from cbam_viz.research.sanity import (
    PASS_THRESHOLD, STAGES, SanityResult, _summary, cascading_randomization, markdown_report, rank_correlation,
    sanity_check, sanity_dataset, sanity_flags, ssim, stage_modules,
)
from conftest import make_model
from tests.research_lineups import make_lineup
from tests.synthetic import make_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")

LAYER = "layer2.1"  # 8 x 8 at a 32 px input: CAMs with structure, cheap passes


def _constructed() -> SanityResult:
    n = len(STAGES)
    stuck = np.full((n, 3), 0.9)  # the map survives randomisation: fails
    good = np.linspace(0.8, 0.1, n)[:, None] + np.array([[0.0, 0.05123, -0.05]])  # passes
    return SanityResult("m", ("stuck", "good"), STAGES, ssim={"stuck": stuck * 0.5, "good": good * 0.5},
                        rank={"stuck": stuck, "good": good}, layer="layer4.1")


def test_stored_passes_is_the_rule_on_the_stored_numbers():
    result = _constructed()
    summary = _summary(result, n_boot=200, seed=0)
    verdicts = {}
    for m, stored in summary["methods"].items():
        last = stored["rank_correlation"][-1]["value"]
        assert stored["passes"] is (last < PASS_THRESHOLD), m
        verdicts[m] = stored["passes"]
        for i, iv in enumerate(stored["rank_correlation"]):
            assert iv["value"] == pytest.approx(result.rank[m][i].mean()) and iv["n"] == 3
        for i, iv in enumerate(stored["ssim"]):
            assert iv["value"] == pytest.approx(result.ssim[m][i].mean())
    assert verdicts == {"stuck": False, "good": True}
    assert summary["n"] == 3 and summary["steps"] == list(STAGES) and summary["name"] == "m"
    text = markdown_report({"lineup": "p", "data": "d", "pass_threshold": PASS_THRESHOLD, "seconds": 1.0,
                            "settings": {"torch_threads": 1},
                            "models": {"cbam": {**summary, "trained": True}}})
    assert "stuck: **FAILS**" in text and "good: passes" in text


def test_flags_rows_and_concat_follow_the_numbers():
    result = _constructed()
    flags = sanity_flags(result)
    assert flags == {"stuck": False, "good": True}
    assert sanity_flags(result, threshold=0.95) == {"stuck": True, "good": True}
    late = np.full((len(STAGES), 2), 0.9)
    late[-1] = 0.1  # only the fully randomised model loses the map: the verdict reads the last step
    only_last = SanityResult("m", ("late",), STAGES, ssim={"late": late}, rank={"late": late}, layer="l")
    assert sanity_flags(only_last) == {"late": True}
    late[-1], late[-2] = 0.9, 0.1
    assert sanity_flags(only_last) == {"late": False}
    nan_last = SanityResult("m", ("a",), STAGES, ssim={"a": np.zeros((7, 2))},
                            rank={"a": np.vstack([np.zeros((6, 2)), [[np.nan, 0.2]]])}, layer="l")
    assert sanity_flags(nan_last) == {"a": True}  # NaN images are left out of the mean
    rows = result.rows()
    assert [(r["step"], r["method"]) for r in rows[:3]] == [(STAGES[0], "stuck"), (STAGES[0], "good"),
                                                            (STAGES[1], "stuck")]
    assert rows[1]["rank_correlation"] == round(float(result.rank["good"][0].mean()), 4)  # 4 decimals, exactly
    assert rows[-1]["ssim"] == round(float(result.ssim["good"][-1].mean()), 4)
    both = SanityResult.concat([result, _constructed()])
    assert both.n_images == 6 and both.rank["good"].shape == (len(STAGES), 6)
    np.testing.assert_array_equal(both.rank["good"][:, 3:], result.rank["good"])
    assert SanityResult("m", (), (), {}, {}, "l").n_images == 0


def test_a_model_missing_any_one_stage_is_refused_by_name():
    for stage in STAGES[:-1]:
        model = make_model("resnet18", seed=0)
        delattr(model, stage)
        with pytest.raises(ValueError, match=f"has no {stage}"):
            stage_modules(model)


def _ssim_window(a, b, w):
    """Wang et al.'s SSIM with a w x w Gaussian window (sigma 1.5), one 2-D window per moment."""
    g = np.exp(-((np.arange(w) - (w - 1) / 2) ** 2) / (2 * 1.5 ** 2))
    k = np.outer(g, g) / np.outer(g, g).sum()
    h, wd = a.shape[0] - w + 1, a.shape[1] - w + 1
    filt = lambda m: np.array([[(m[i:i + w, j:j + w] * k).sum() for j in range(wd)] for i in range(h)])  # noqa: E731
    mx, my = filt(a), filt(b)
    sxx, syy, sxy = filt(a * a) - mx ** 2, filt(b * b) - my ** 2, filt(a * b) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return float((((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))).mean())


def test_ssim_of_maps_smaller_than_the_window_uses_the_largest_odd_window():
    rng = np.random.default_rng(4)
    a, b = rng.random((10, 12)), rng.random((10, 12))
    assert ssim(a, b) == pytest.approx(_ssim_window(a, b, 9), abs=1e-12)  # 10 rows: a 9 x 9 window
    for x, y in ((a, b[:, :11]), (a[0], b[0]), (a[None], b[None])):
        with pytest.raises(ValueError):
            ssim(x, y)


def test_the_cascade_seeds_stage_i_with_seed_plus_i_and_defaults_to_seed_0():
    import copy

    model = make_model("resnet18", seed=1)
    steps = cascading_randomization(model, seed=3)
    next(steps)
    _, step1 = next(steps)  # fc (seed 3), then layer4 (seed 4)
    fresh = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        for m in fresh.layer4.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    for key, v in fresh.layer4.state_dict().items():
        torch.testing.assert_close(step1.layer4.state_dict()[key], v, rtol=0, atol=0)
    _, default = next(cascading_randomization(model))
    _, zero = next(cascading_randomization(model, seed=0))
    torch.testing.assert_close(default.fc.weight, zero.fc.weight, rtol=0, atol=0)


def test_every_number_equals_a_recomputation_from_the_randomised_copies():
    model = make_model("resnet18_cbam", seed=4)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    result = sanity_check(model, x, methods=("gradcam", "layercam"), layer=LAYER, seed=5, model_name="tiny",
                          keep_cams=True)
    assert result.steps == STAGES and result.methods == ("gradcam", "layercam") and result.layer == LAYER
    originals = {m: compute_cams(model, x, method=m, layer=LAYER) for m in result.methods}
    targets = originals["gradcam"].targets
    for i, (stage, randomised) in enumerate(cascading_randomization(model, seed=5)):
        for m in result.methods:
            cams = compute_cams(randomised, x, method=m, layer=LAYER, targets=targets).cams
            for j in range(2):
                assert result.ssim[m][i, j] == pytest.approx(ssim(originals[m].cams[j], cams[j]), abs=1e-9)
                assert result.rank[m][i, j] == pytest.approx(rank_correlation(originals[m].cams[j], cams[j]),
                                                             abs=1e-9)
                np.testing.assert_allclose(result.cams[m][i + 1, j], cams[j], atol=1e-6)
    for m in result.methods:
        np.testing.assert_allclose(result.cams[m][0], np.stack(originals[m].cams), atol=1e-6)
        assert result.cams[m].shape == (1 + len(STAGES), 2, 32, 32)
    assert (result.rank["gradcam"] < 0.999).any()
    other_seed = sanity_check(model, x, methods=("gradcam",), layer=LAYER, seed=6)
    assert not np.allclose(other_seed.rank["gradcam"], result.rank["gradcam"])
    assert sanity_check(model, x, methods=("gradcam",), layer=LAYER, seed=5).cams == {}
    with pytest.raises(ValueError):
        sanity_check(model, x, methods=())


def test_dataset_report_holds_the_values_of_the_images_it_read(tmp_path):
    """Every member of a lineup of three (one without gates), each against a direct cascade; each
    other member's final-step rank correlation paired against the reference's."""
    import time

    from cbam_viz.stats import paired_bootstrap

    lineup = make_lineup()
    data = make_image_folder(tmp_path / "val", lineup.reference_model.class_ids, per_class=2, size=(36, 30))
    t0 = time.perf_counter()
    report = sanity_dataset(lineup, data, methods=("gradcam",), layer=LAYER, batch_size=4, workers=1, seed=2,
                            n_boot=100, progress=False)
    wall = time.perf_counter() - t0
    assert 0 <= report["seconds"] <= wall + 0.01 and report["seconds"] == round(report["seconds"], 2)
    assert list(report["models"]) == lineup.names and report["pass_threshold"] == PASS_THRESHOLD
    assert report["lineup"] == lineup.name and report["reference"] == lineup.reference
    assert report["settings"]["methods"] == ["gradcam"] and report["settings"]["seed"] == 2
    files = sorted(data.glob("*/*.png"))
    direct = {}
    for name, stored in report["models"].items():
        loaded = lineup.member(name)
        assert stored["name"] == loaded.name and stored["n"] == 6 and stored["input_size"] == 32
        assert stored["trained"] is False and stored["layer"] == LAYER
        x = to_model_batch([open_image(f) for f in files], 32, loaded.mean, loaded.std)
        direct[name] = sanity_check(loaded.model, x, methods=("gradcam",), layer=LAYER, seed=2)
        g = stored["methods"]["gradcam"]
        for i in range(len(STAGES)):
            assert g["rank_correlation"][i]["value"] == pytest.approx(direct[name].rank["gradcam"][i].mean(), abs=1e-6)
            assert g["ssim"][i]["value"] == pytest.approx(direct[name].ssim["gradcam"][i].mean(), abs=1e-6)
        assert g["passes"] is (g["rank_correlation"][-1]["value"] < PASS_THRESHOLD)
        assert g["passes"] == sanity_flags(direct[name])["gradcam"]
    ref = lineup.reference
    assert set(report["vs_reference"]) == set(lineup.names) - {ref}
    for name, d in report["vs_reference"].items():
        expected = paired_bootstrap(direct[name].rank["gradcam"][-1], direct[ref].rank["gradcam"][-1], n_boot=100,
                                    seed=2).to_json()
        assert d["gradcam"]["value"] == pytest.approx(expected["value"], abs=1e-9)
    assert "rank correlation at the last step" in markdown_report(report)
    one = make_lineup(("resnet18_cbam",), name="alone")
    smaller = sanity_dataset(one, data, methods=("gradcam",), layer=LAYER, max_images=3, workers=1, n_boot=50,
                             progress=False)
    assert smaller["models"]["tiny resnet18_cbam"]["n"] == 3 and smaller["vs_reference"] == {}
