"""Out-of-distribution scores: the maths, fitting, storing beside the weights, loading (checked
against the model), the result's per-model flag, the fallback, the page's sentence and the CLI."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from cbam_viz.engine import ood
from cbam_viz.research import ood_eval, ood_fit
from cbam_viz.engine.explain import explain
from cbam_viz.engine.lineup import load_lineup
from cbam_viz.engine.loading import clear_cache, load_model
from cbam_viz.models.weights import WeightRecord, read_manifest, save_safetensors, sha256_file, update_manifest
from conftest import assert_no_hooks, make_image, make_model, make_service_lineup, serve_lineup

pytestmark = pytest.mark.usefixtures("no_cbam_env")

CLASSES = [{"id": "a", "name": "apple"}, {"id": "b", "name": "banana"}, {"id": "c", "name": "cherry"}]


def _clusters(n=60, dim=4, seed=0):
    """Three well separated Gaussian clusters (labels 0..2) in ``dim`` dimensions."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(3, dim) * 10
    labels = torch.arange(3).repeat_interleave(n)
    return centres[labels] + torch.randn(3 * n, dim, generator=g), labels, centres


# ------------------------------------------------------------------------------ the scores

def test_mahalanobis_is_the_smallest_class_distance_under_the_shared_covariance():
    feats, labels, centres = _clusters()
    stats = ood.fit_stats("mahalanobis", feats, labels, 3)
    x = torch.tensor([[10.0, 0, 0, 0], [0, 0, 0, 25.0]])
    got = stats.score(x, torch.zeros(2, 3))
    means = np.stack([feats[labels == c].numpy().mean(0) for c in range(3)])
    centred = feats.numpy() - means[labels.numpy()]
    prec = np.linalg.inv(centred.T @ centred / len(feats))
    want = [min((xi - m) @ prec @ (xi - m) for m in means) for xi in x.numpy()]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-3)
    assert got[1] > 50 * got[0]  # far from every class mean


def test_knn_is_the_kth_neighbour_distance_of_normalised_features():
    feats, labels, _ = _clusters(n=20)
    stats = ood.fit_stats("knn", feats, labels, 3, k=3, bank_size=1000)
    x = torch.tensor([[1.0, 0.1, 0, 0], [-1.0, -1.0, -1.0, -1.0]])
    bank = torch.nn.functional.normalize(feats, dim=1)
    z = torch.nn.functional.normalize(x, dim=1)
    want = torch.cdist(z, bank).sort(dim=1).values[:, 2]
    torch.testing.assert_close(stats.score(x, torch.zeros(2, 3)), want, atol=2e-3, rtol=0)
    assert stats.tensors["bank"].dtype == torch.float16  # small on disk
    assert len(ood.fit_stats("knn", feats, labels, 3, bank_size=7).tensors["bank"]) == 7  # subsampled


def test_msp_and_energy_follow_the_logits():
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.1, 0.0, 0.0]])
    msp = ood.OODStats("msp").score(torch.zeros(2, 0), logits)
    energy = ood.OODStats("energy").score(torch.zeros(2, 0), logits)
    torch.testing.assert_close(msp, -torch.softmax(logits, 1).amax(1))
    torch.testing.assert_close(energy, -torch.logsumexp(logits, 1))
    assert msp[1] > msp[0] and energy[1] > energy[0]  # the flat softmax is the stranger one


def test_calibrate_accepts_95_percent_of_the_calibration_images():
    feats, labels, _ = _clusters(n=200)
    stats = ood.calibrate(ood.fit_stats("mahalanobis", feats, labels, 3), feats, torch.zeros(600, 3))
    flagged = (stats.score(feats, torch.zeros(600, 3)) > stats.threshold).float().mean()
    assert abs(float(flagged) - 0.05) < 0.01


def test_fit_refuses_an_unknown_method_and_a_class_without_images():
    feats, labels, _ = _clusters(n=5)
    with pytest.raises(ValueError, match="unknown out-of-distribution method"):
        ood.fit_stats("odin", feats, labels, 3)
    with pytest.raises(ValueError, match=r"class index \[3\]"):
        ood.fit_stats("mahalanobis", feats, labels, 4)


def test_the_fallback_rule_is_the_apps_unsure_rule():
    from cbam_viz import service

    assert (ood.UNSURE_PROB, ood.UNSURE_MARGIN) == (service.UNSURE_PROB, service.UNSURE_MARGIN)
    # sure; just sure (55 %, a 30-point margin); over 50 % but a 12-point margin; a clear margin but under 50 %
    logits = torch.tensor([[0.9, 0.05, 0.05], [0.55, 0.25, 0.20], [0.52, 0.40, 0.08], [0.45, 0.30, 0.25]]).log()
    out = ood.assess(None, [], logits)
    assert [r["flagged"] for r in out] == [False, False, True, True]
    assert all(r["score"] is None and r["threshold"] is None and "unsure rule" in r["fallback"] for r in out)


# ------------------------------------------------------------------------------ features

def test_hook_reads_the_features_the_classifier_sees_and_leaves_no_hook():
    model = make_model("resnet18_cbam")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), ood.penultimate_features(model) as captured:
        logits = model(x)
    assert len(captured) == 1 and captured[0].shape == (2, ood.feature_dim(model))
    torch.testing.assert_close(model.fc(captured[0]), logits)
    assert_no_hooks(model)
    with pytest.raises(RuntimeError), ood.penultimate_features(model):
        raise RuntimeError("boom")
    assert_no_hooks(model)


# ------------------------------------------------------------------------------ files and records

def _folder(root, per_class=4, size=40):
    for split in ("train", "val"):
        for i, c in enumerate("abc"):
            (root / split / c).mkdir(parents=True)
            for j in range(per_class):
                make_image(size, size, seed=100 * i + j + (50 if split == "val" else 0)).save(root / split / c / f"{j}.png")
    return root


@pytest.fixture
def weights_dir(tmp_path):
    d = tmp_path / "weights"
    d.mkdir()
    for name, arch in (("base", "resnet18"), ("cb", "resnet18_cbam")):
        model = make_model(arch)
        sha = save_safetensors(model, d / f"{name}.safetensors")
        update_manifest(d, record=WeightRecord(
            name=name, file=f"{name}.safetensors", arch=arch, sha256=sha, num_params=1, classes=CLASSES,
            mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], input_size=32))
    update_manifest(d, pair=("tiny", {"baseline": "base", "cbam": "cb", "default": True}))
    clear_cache()
    yield d
    clear_cache()


def test_fit_stores_small_statistics_beside_the_weights_and_loading_checks_them(weights_dir, tmp_path):
    data = _folder(tmp_path / "data")
    sha_before = sha256_file(weights_dir / "cb.safetensors")
    entry = ood_fit.fit_record("cb", data, weights_dir=weights_dir, cache_dir=tmp_path / "cache")
    record = read_manifest(weights_dir)["models"]["cb"]
    assert record["metrics"]["ood"] == json.loads(json.dumps(entry))
    assert record["sha256"] == sha_before == sha256_file(weights_dir / "cb.safetensors")
    assert entry["file"] == "cb.ood.safetensors" and entry["sha256"] == sha256_file(weights_dir / entry["file"])
    assert entry["method"] == "mahalanobis" and np.isfinite(entry["threshold"])
    assert list((tmp_path / "cache").iterdir())  # the features were kept for a re-run

    clear_cache()
    loaded = load_model("cb", weights_dir=weights_dir, device="cpu")
    assert isinstance(loaded.ood, ood.OODStats) and loaded.ood.threshold == entry["threshold"]
    assert loaded.ood.tensors["means"].shape == (3, 512)
    # The threshold accepts 95 % of val: at most one of these 12 val images is flagged.
    val = ood_fit.split_features(loaded, data / "val")
    assert int((loaded.ood.score(val["features"], val["logits"]) > loaded.ood.threshold).sum()) <= 1
    assert isinstance(load_model("base", weights_dir=weights_dir, device="cpu").ood, ood.NoStats)


def test_a_capped_split_takes_evenly_spread_files_of_every_class(tmp_path):
    from cbam_viz.training.data import scan_image_folder

    scan = scan_image_folder(_folder(tmp_path / "data", per_class=4) / "train")
    files, labels = ood_fit._subsample(scan, 2)
    assert files == ["a/0.png", "a/2.png", "b/0.png", "b/2.png", "c/0.png", "c/2.png"] and labels == [0, 0, 1, 1, 2, 2]
    assert ood_fit._subsample(scan, 9) == (list(scan.files), list(scan.labels))
    assert ood_fit._subsample(scan, None) == (list(scan.files), list(scan.labels))


def test_explanations_carry_the_score_of_their_own_forward(weights_dir, tmp_path):
    ood_fit.fit_record("cb", _folder(tmp_path / "data"), weights_dir=weights_dir)
    clear_cache()
    lineup = load_lineup("tiny", weights_dir=weights_dir, device="cpu")
    base, cb = lineup.member("base"), lineup.member("cb")
    images = [make_image(48, 40, seed=7), make_image(48, 40, seed=8)]
    ex = explain(images, lineup)
    for i, e in enumerate(ex):
        r = e.models["cb"].out_of_distribution
        assert set(r) == {"method", "score", "threshold", "flagged"} and r["flagged"] == (r["score"] > r["threshold"])
        with torch.no_grad():
            from cbam_viz.engine.preprocess import to_model_batch
            x = to_model_batch([images[i]], 32, cb.mean, cb.std)
            with ood.penultimate_features(cb.model) as f:
                logits = cb.model(x)
        assert r["score"] == pytest.approx(float(cb.ood.score(f[0], logits)[0]), rel=1e-4)
        assert e.models["base"].out_of_distribution["score"] is None  # no statistics: the fallback, said so
        assert "no fitted out-of-distribution statistics" in e.models["base"].out_of_distribution["fallback"]
    assert_no_hooks(cb.model)
    assert_no_hooks(base.model)


def _with_entry(weights_dir, name, **change):
    data = read_manifest(weights_dir)
    data["models"][name]["metrics"]["ood"].update(change)
    (weights_dir / "manifest.json").write_text(json.dumps(data))
    clear_cache()
    return load_model(name, weights_dir=weights_dir, device="cpu")


@pytest.mark.parametrize("case", ["wrong classes", "wrong width", "altered file", "missing file", "no threshold"])
def test_statistics_that_do_not_fit_fall_back_without_breaking_the_model(weights_dir, tmp_path, case):
    ood_fit.fit_record("cb", _folder(tmp_path / "data"), weights_dir=weights_dir)
    path = weights_dir / "cb.ood.safetensors"
    if case in ("wrong classes", "wrong width"):
        k, d = (4, 512) if case == "wrong classes" else (3, 64)
        bad = ood.OODStats("mahalanobis", 1.0, tensors={"means": torch.zeros(k, d), "precision": torch.eye(d)})
        loaded = _with_entry(weights_dir, "cb", sha256=ood.save_stats(bad, path))
        expected = "(4, 512) for a model of 3 classes" if case == "wrong classes" else "64 features for a model with 512"
    elif case == "altered file":
        path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
        loaded, expected = _with_entry(weights_dir, "cb"), "does not match the sha256"
    elif case == "missing file":
        path.unlink()
        loaded, expected = _with_entry(weights_dir, "cb"), "is missing"
    else:
        loaded, expected = _with_entry(weights_dir, "cb", threshold=None), "threshold"
    assert isinstance(loaded.ood, ood.NoStats) and expected in loaded.ood.reason
    (r,) = [e.models["cb"].out_of_distribution for e in explain(make_image(), load_lineup("tiny", weights_dir=weights_dir))]
    assert r["score"] is None and "unusable" in r["fallback"] and isinstance(r["flagged"], bool)


# ------------------------------------------------------------------------------ page, JSON and CLI

def _flagging_lineup(threshold: float, archs=("resnet18", "resnet18_cbam")):
    lineup = make_service_lineup("tiny", trained=True, archs=archs)
    stats = ood.OODStats("energy", threshold=threshold)
    return dataclasses.replace(lineup, members=tuple(dataclasses.replace(m, ood=stats) for m in lineup.members))


def test_the_result_says_plainly_when_a_photo_is_unlike_the_classes():
    from cbam_viz import service
    from cbam_viz.app.text import status_markdown

    flagged = service.analyse(make_image(), lineup=_flagging_lineup(-1e9), faithfulness=False, pictures=())
    first = flagged.warnings[0]
    assert first.startswith("This photo looks unlike the classes") and "the ResNet-18 model and the ResNet-18 + CBAM model" in first
    assert "heatmaps" in first and "tench, church, golf ball" in first
    assert list(flagged.summary["models"]) == ["resnet18-tiny", "resnet18_cbam-tiny"]
    for name in flagged.summary["models"]:
        r = flagged.summary["models"][name]["out_of_distribution"]
        assert r["flagged"] is True and r["threshold"] == -1e9 and isinstance(r["score"], float)
    json.dumps(flagged.summary)  # the /explain and CLI JSON stay serialisable
    assert status_markdown(flagged.warnings, []).startswith("> **Note:** This photo looks unlike")

    accepted = service.analyse(make_image(), lineup=_flagging_lineup(1e9), faithfulness=False, pictures=())
    assert not [w for w in accepted.warnings if "unlike the classes" in w or "out-of-distribution" in w]
    assert accepted.summary["models"]["resnet18_cbam-tiny"]["out_of_distribution"]["flagged"] is False


def test_every_member_of_a_three_member_lineup_is_named_in_the_sentence_and_flagged_in_the_json():
    from cbam_viz import service

    flagged = service.analyse(make_image(), lineup=_flagging_lineup(-1e9, ("resnet18", "resnet18_se", "resnet18_cbam")),
                              faithfulness=False, pictures=())
    first = flagged.warnings[0]
    assert first.startswith("This photo looks unlike the classes")
    for title in ("the ResNet-18 model", "the ResNet-18 + SE model", "the ResNet-18 + CBAM model"):
        assert title in first
    assert [r["out_of_distribution"]["flagged"] for r in flagged.summary["models"].values()] == [True, True, True]


def test_page_and_api_carry_the_flag(monkeypatch, tmp_path):
    from cbam_viz.app import api, results

    serve_lineup(monkeypatch, _flagging_lineup(-1e9))
    path = tmp_path / "photo.png"
    make_image(64, 48).save(path)
    view = results.explain_view({"path": str(path), "orig_name": "photo.png"}, None)
    assert view.status.startswith("> **Note:** This photo looks unlike the classes")  # above the predictions
    assert all(m.slider[1] for m in view.shown.members)  # every heatmap is still shown, with the caveat
    summary = api.api_explain(str(path))[0]
    assert summary["models"]["resnet18-tiny"]["out_of_distribution"]["flagged"] is True


def test_a_trained_model_without_statistics_says_it_falls_back():
    from cbam_viz import service

    a = service.analyse(make_image(), lineup=make_service_lineup("tiny", trained=True), faithfulness=False, pictures=())
    assert any(w.startswith("No out-of-distribution check for the ResNet-18 model and the ResNet-18 + CBAM model") for w in a.warnings)
    assert a.summary["models"]["resnet18-tiny"]["out_of_distribution"]["method"] == "unsure rule"
    untrained = service.analyse(make_image(), lineup=make_service_lineup("tiny"), faithfulness=False, pictures=())
    assert not [w for w in untrained.warnings if "out-of-distribution" in w]  # random models: already warned


# ------------------------------------------------------------------------------ the comparison runner

def test_out_of_class_set_is_seeded_and_the_comparison_reports_every_score(tmp_path):
    first, again = ood_eval.generated_images(per_kind=2, size=32), ood_eval.generated_images(per_kind=2, size=32)
    assert len(first) == 16 and all(np.array_equal(np.asarray(first[k]), np.asarray(again[k])) for k in first)
    assert "matplotlib/grace_hopper.jpg" in ood_eval.packaged_images()
    assert ood_eval._auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 1.0

    from conftest import make_loaded

    loaded = dataclasses.replace(make_loaded("resnet18", input_size=32), class_ids=("a", "b", "c"))
    result = ood_eval.compare(loaded, _folder(tmp_path / "data"))
    assert set(result["scores"]) == set(ood.METHODS)
    for row in result["scores"].values():
        assert 0 <= row["all"]["auroc"] <= 1 and 0 <= row["packaged"]["flagged"] <= 1
        assert row["val_flagged"] <= 1 / 12 + 1e-9
    assert "| tiny resnet18 | mahalanobis |" in ood_eval.markdown([result])
