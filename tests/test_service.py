"""cbam_viz.service: explain + render + downloads on a tiny pair; every failure is one sentence."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from cbam_viz import app_views, outputs, service
from cbam_viz.controls import AUTO_LAYER, AUTO_TARGET, block_names
from cbam_viz.messages import UserFacingError, format_error
from cbam_viz.pair import pair_names
from tests.conftest import SERVICE_CLASSES as CLASSES, make_service_pair
from tests.e2e_helpers import make_broken_image, make_image

pytestmark = pytest.mark.usefixtures("no_cbam_env")


@pytest.fixture()
def tiny_pair(service_pair):
    return service_pair


@pytest.fixture()
def use_pair(use_service_pair):
    return use_service_pair


@pytest.fixture()
def image(tmp_path):
    return make_image(tmp_path / "photo.png", size=(96, 72))


def test_analyse_returns_everything(tiny_pair, image):
    a = service.analyse(image, pair=tiny_pair, method="gradcam", alpha=0.4)
    assert set(a.overlays) == {"baseline", "cbam"}
    assert all(im.size == (96, 72) for im in a.overlays.values())
    blocks = block_names(tiny_pair.cbam.model)
    assert len(a.spatial_gallery) >= len(blocks)  # every CBAM block's spatial attention
    assert all(any(c.startswith(f"{b} channel") for _, c in a.channel_gallery) for b in blocks)
    assert set(a.labels("baseline")) <= set(CLASSES)
    assert abs(sum(a.labels("cbam").values()) - 1.0) < 1e-4  # top-3 of 3 classes
    for step in ("open_image", "explain", "render", "total"):
        assert a.timings[step] >= 0
    assert a.summary["layer"] == blocks[-1] and a.summary["method"] == "gradcam"


def test_save_writes_valid_png_json_npz(tiny_pair, image, tmp_path):
    a = service.analyse(image, pair=tiny_pair)
    paths = service.save(a, tmp_path / "out", stem="x")
    assert {p.name for p in paths.values()} == {"x.png", "x.json", "x.npz"}
    with Image.open(paths["png"]) as im:
        im.verify()
    doc = json.loads(paths["json"].read_text())
    for role in ("baseline", "cbam"):
        m = doc["models"][role]
        assert m["predictions"][0]["label"] in CLASSES and 0 <= m["predictions"][0]["prob"] <= 1
        assert m["target"]["label"] in CLASSES and m["trained"] is False
    assert doc["image"]["name"] == "photo.png" and doc["metadata"]["classes"] == list(CLASSES)
    assert doc["timings"]["total"] > 0 and doc["warnings"]
    with np.load(paths["npz"]) as z:
        keys = set(z.files)
        assert {"image", "baseline/cam", "cbam/cam"} <= keys
        blocks = block_names(tiny_pair.cbam.model)
        assert {f"cbam/channel/{b}" for b in blocks} <= keys
        assert {f"cbam/spatial/{b}" for b in blocks} <= keys
        assert not any(k.startswith("baseline/channel") for k in keys)  # the baseline has no gates
        assert z["cbam/cam"].shape == (72, 96) and z["image"].shape == (72, 96, 3)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp files left


def test_untrained_pair_is_said_plainly(tiny_pair):
    info = service.describe_pair(tiny_pair)
    assert not info.baseline_trained and not info.cbam_trained
    assert any("untrained" in w and "random" in w for w in info.warnings)
    assert "Untrained" in app_views.model_card_markdown(tiny_pair)
    assert info.targets[0] == AUTO_TARGET and info.layer_choices[0] == AUTO_LAYER
    assert service.describe_pair(make_service_pair("t", trained=True)).warnings == ()


@pytest.mark.parametrize("carried", [False, True])
def test_the_model_card_says_how_weights_and_size_were_chosen(carried):
    from dataclasses import replace

    from cbam_viz.weights import WeightRecord

    selection = {"weights": "ema", "input_size": 192, "mean_holdout_top1": 0.90329}
    if carried:  # the earlier pair's scores travel under carried_from
        selection = {"weights": "ema", "input_size": 192, "carried_from": {
            "pair": "resnet18-imagenette", "holdout_images": 729, "mean_holdout_top1": 0.90329}}
    training = {"holdout_images": 0 if carried else 729, "selection": selection}
    pair = make_service_pair("t", trained=True)
    record = WeightRecord(name="r", file="r.safetensors", arch="resnet18", sha256="0" * 64, num_params=1,
                          classes=[{"id": "n0", "name": "tench"}], mean=[0.5] * 3, std=[0.5] * 3, input_size=192,
                          training=training)
    pair = replace(pair, baseline=replace(pair.baseline, record=record), cbam=replace(pair.cbam, record=record))
    card = app_views.model_card_markdown(pair)
    assert card.count("- Shipped as (both): EMA weights at 192 px") == 1
    assert "mean held-out top-1: 90.33 %" in card
    if carried:
        assert "as pair `resnet18-imagenette` chose on its 729 held-out training files" in card
        assert "then trained again with the same recipe on every training file" in card
    else:
        assert "chosen on 729 held-out training files, never on val" in card
    assert app_views.choice_sentence({"holdout_images": 0}) is None  # a run that chose nothing says nothing
    unnumbered = app_views.choice_sentence({"selection": {"weights": "raw", "input_size": 160}})
    assert unnumbered == "raw weights at 160 px, chosen on held-out training files, never on val"


def test_the_model_card_puts_both_models_side_by_side_with_the_paired_difference_and_hardware():
    from dataclasses import replace

    from cbam_viz.weights import WeightRecord

    classes = [{"id": "n0", "name": "tench"}, {"id": "n1", "name": "church"}]
    diff = {"cbam_minus_baseline": -0.0013, "ci95": [-0.0092, 0.0066], "n": 3925, "n_boot": 10000,
            "only_cbam_right": 122, "only_baseline_right": 127, "mcnemar_p": 0.8}

    def record(arch, params, top1, per_class, hardware, recipe):
        return WeightRecord(name=f"{arch}_x", file=f"{arch}_x.safetensors", arch=arch, sha256="ab" * 32,
                            num_params=params, classes=classes, mean=[0.5] * 3, std=[0.5] * 3, input_size=192,
                            recipe=recipe, training={"hardware": [hardware], "precision": ["bf16"], "epochs": 100,
                                                     "wall_time_s": 8340.0, "holdout_images": 0},
                            metrics={"val_top1": top1, "val_n": 3925, "val_per_class": per_class,
                                     "val_paired_difference": diff, "eval_command": "python -m cbam_viz evaluate"})

    recipe = {"epochs": 100, "sizes": [[0, 96], [90, 176]], "crop_scale": [0.25, 1.0], "mean": [0.5] * 3}
    base = record("resnet18", 1000, 0.8989, {"n0": 0.9, "n1": 0.8}, "cpu: AMD EPYC, 2 threads", recipe)
    cbam = record("resnet18_cbam", 1008, 0.8976, {"n0": 0.95, "n1": None}, "cuda: NVIDIA H100", recipe)
    pair = make_service_pair("t", trained=True)
    pair = replace(pair, baseline=replace(pair.baseline, record=base), cbam=replace(pair.cbam, record=cbam))
    card = app_views.model_card_markdown(pair)
    assert "| val top-1 (3,925 images) | **89.89 %** | **89.76 %** |" in card
    assert "| parameters | 1,000 | 1,008 (+0.8 %) |" in card
    assert "| trained on | cpu: AMD EPYC, 2 threads | cuda: NVIDIA H100 |" in card
    assert "| epochs, wall time | 100, 139 min | 100, 139 min |" in card
    assert "| data | every training file | every training file |" in card
    assert ("**CBAM − baseline on val**: -0.13 points, 95 % paired bootstrap interval [-0.92, +0.66], 10,000 "
            "resamples, on the same 3,925 images; 122 images only CBAM gets right, 127 only the baseline; "
            "two-sided exact McNemar p = 0.8.") in card
    assert "- Recipe (the same for both): epochs=100, sizes=0:96,90:176, crop_scale=0.25-1.0" in card
    assert "| tench | 90.00 % | 95.00 % | +5.0 |" in card and "| church | 80.00 % | – | – |" in card
    assert "flip" not in card  # not measured: no row, no sentence
    other = replace(pair, cbam=replace(pair.cbam, record=replace(cbam, recipe={**recipe, "epochs": 90})))
    card = app_views.model_card_markdown(other)
    assert "- Recipe (baseline): epochs=100" in card and "- Recipe (CBAM): epochs=90" in card
    retrained = replace(pair, cbam=replace(pair.cbam, record=replace(cbam, metrics={"val_top1": 0.9})))
    assert "CBAM − baseline" not in app_views.model_card_markdown(retrained)  # one record's old difference


def test_unsure_prediction_names_the_known_classes(tiny_pair, image):
    # An untrained 3-class model is never sure of anything: thresholds above 1 force the flag.
    a = service.analyse(image, pair=tiny_pair, unsure_prob=1.01)
    unsure = [w for w in a.warnings if w.startswith("Unsure prediction")]
    assert unsure and "The models only know these 3 classes: tench, church, golf ball" in unsure[0]
    assert "may show none of them" in unsure[0]
    sure = service.analyse(image, pair=tiny_pair, unsure_prob=0.0, unsure_margin=0.0)
    assert not [w for w in sure.warnings if w.startswith("Unsure")]


@pytest.mark.parametrize("kwargs, phrase", [
    ({"method": "nope"}, "Unknown CAM method 'nope'"),
    ({"target": "cat"}, "Unknown target class 'cat'"),
    ({"target": 7}, "out of range"),
    ({"layer": "layer9.9"}, "Unknown layer 'layer9.9'"),
    ({"alpha": 1.5}, "between 0 and 1"),
])
def test_wrong_controls_are_one_sentence(tiny_pair, image, kwargs, phrase):
    with pytest.raises(UserFacingError) as info:
        service.analyse(image, pair=tiny_pair, **kwargs)
    assert phrase in str(info.value) and "\n" not in str(info.value)


def test_target_by_name_or_index_string(tiny_pair, image):
    by_name = service.analyse(image, pair=tiny_pair, target="church")
    by_index = service.analyse(image, pair=tiny_pair, target="1")
    assert by_name.explanation.cbam.target_label == by_index.explanation.cbam.target_label == "church"
    # what was asked, for a shared link: the same class, whichever way it was named
    assert by_name.summary["target_request"] == by_index.summary["target_request"] == {"index": 1, "label": "church"}
    assert service.analyse(image, pair=tiny_pair).summary["target_request"] is None  # auto


def test_bad_image_is_a_clear_sentence_without_server_path(tiny_pair, tmp_path):
    broken = make_broken_image(tmp_path / "holiday.png")
    with pytest.raises(UserFacingError) as info:
        service.analyse(broken, pair=tiny_pair)
    message = str(info.value)
    assert "holiday.png" in message and "not an image" in message
    assert str(tmp_path) not in message and message.endswith(".")
    with pytest.raises(UserFacingError, match="does not exist"):
        service.analyse(tmp_path / "missing.jpg", pair=tiny_pair)


def test_large_image_is_downscaled_for_display(tiny_pair, tmp_path):
    big = make_image(tmp_path / "big.png", size=(service.DISPLAY_MAX_SIDE * 2, 300))
    a = service.analyse(big, pair=tiny_pair)
    assert max(a.image.size) == service.DISPLAY_MAX_SIDE
    assert a.summary["image"]["original_size"] == [service.DISPLAY_MAX_SIDE * 2, 300]


def test_explain_files_batch_in_private_folder(use_pair, tmp_path):
    good = [make_image(tmp_path / "a.png", size=(80, 64)), make_image(tmp_path / "b.jpg", size=(72, 72), seed=3)]
    broken = make_broken_image(tmp_path / "c.png")
    root = tmp_path / "outputs"
    first = service.explain_files([good[0], broken, good[1]], names=["a.png", "upload c.png", None], out_root=root)
    second = service.explain_files([good[0]], out_root=root)
    assert first.out_dir != second.out_dir and first.out_dir.parent == root  # no cross-request mixing
    assert [r.name for r in first.results] == ["a.png", "b.jpg"]
    assert first.failures and first.failures[0][0] == "upload c.png"
    assert first.archive is not None and first.archive.is_file() and second.archive is None
    for r in first.results:
        assert all(p.is_file() and first.out_dir in p.parents for p in r.files.values())
        assert all(os.path.isfile(p) for p, _ in r.spatial_gallery + r.channel_gallery)
        assert all(p.is_file() for p in r.overlays.values())


def test_explain_files_all_failing_or_empty(use_pair, tmp_path):
    with pytest.raises(UserFacingError, match="upload an image"):
        service.explain_files([])
    with pytest.raises(UserFacingError, match="not an image"):
        service.explain_files([make_broken_image(tmp_path / "x.png")], out_root=tmp_path)
    with pytest.raises(UserFacingError, match="at most 2 images"):
        service.explain_files(["a", "b", "c"], max_images=2)


def test_old_request_folders_are_cleaned(tmp_path):
    old = tmp_path / "req-old"
    old.mkdir()
    os.utime(old, (0, 0))
    fresh = outputs.new_request_dir(tmp_path)
    assert not old.exists() and fresh.is_dir()


def test_collect_images_and_output_dir(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    a = make_image(tmp_path / "in" / "a.png", size=(72, 72))
    make_image(tmp_path / "in" / "sub" / "b.jpg", size=(72, 72))
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    found, missing = service.collect_images([tmp_path / "in", a, tmp_path / "nope.png"])
    assert [p.name for p in found] == ["a.png", "b.jpg"] and missing == [str(tmp_path / "nope.png")]
    assert outputs.prepare_output_dir(tmp_path / "new" / "dir").is_dir()
    with pytest.raises(UserFacingError, match="is a file"):
        outputs.prepare_output_dir(a)


def test_format_error_hides_tracebacks():
    assert format_error(ValueError("unknown class 'x'")) == "unknown class 'x'."
    message = format_error(RuntimeError("CUDA error: device-side assert\nline 2"))
    assert "RuntimeError" in message and "\n" not in message and "server log" in message
    assert "memory" in format_error(MemoryError())


def test_format_error_logs_what_the_checks_did_not_turn_into_a_user_error(caplog):
    """A person's mistake (UserFacingError) is only shown; a plain ValueError / KeyError that got past
    the request checks is shown by its sentence and logged with its traceback, so a bug is seen."""
    import logging

    with caplog.at_level(logging.WARNING, logger="cbam_viz"):
        assert format_error(UserFacingError("Choose a class the models know.")) == "Choose a class the models know."
        assert not caplog.records
        assert format_error(KeyError("layer9")) == "layer9."
        assert format_error(ValueError("operands could not be broadcast")) == "operands could not be broadcast."
    assert [r.exc_info[0] for r in caplog.records] == [KeyError, ValueError]


def test_pair_names_always_offer_the_untrained_pair():
    assert pair_names()[-1] == "untrained"


def test_faithfulness_is_measured_for_both_models(tiny_pair, image):
    """Each model's own CAM top is blurred away; probabilities before match the predictions."""
    a = service.analyse(image, pair=tiny_pair, target=1)
    doc = a.summary["faithfulness"]
    assert doc["fraction"] == service.FAITHFULNESS_FRACTION and doc["imputer"] == "blur"
    from cbam_viz.faithfulness import confidence_drop
    from cbam_viz.preprocess import to_model_tensor

    for role in ("baseline", "cbam"):
        d, loaded = doc[role], getattr(tiny_pair, role)
        assert d["target"] == 1
        # Recomputed from scratch (its own forward of the unperturbed input): the same numbers,
        # so the probability taken from the explanation is the one of the input the model saw.
        x = to_model_tensor(a.image, loaded.input_size, loaded.mean, loaded.std)[0]
        ref = confidence_drop(loaded.model, x, getattr(a.explanation, role).cam, 1,
                              fraction=service.FAITHFULNESS_FRACTION)
        assert (d["prob_before"], d["prob_after"]) == pytest.approx((ref.prob_before, ref.prob_after), abs=1e-4)
    assert a.faithfulness_image is not None and a.faithfulness_image.width > a.faithfulness_image.height
    assert a.timings["faithfulness"] >= 0
    text = app_views.faithfulness_markdown(doc)
    assert f"{doc['baseline']['prob_before']:.2f}" in text and f"{doc['cbam']['prob_after']:.2f}" in text


def test_faithfulness_when_the_target_is_not_in_the_top_k(tiny_pair, image):
    """Without the target's probability in the predictions, the drop runs the extra forward."""
    import dataclasses

    from cbam_viz.explain import explain
    from cbam_viz.faithfulness import pair_confidence_drop

    im = service.open_image(image)
    (e,) = explain([im], tiny_pair, target=2)
    full = pair_confidence_drop(im, e, tiny_pair)
    cut = dataclasses.replace(e, baseline=dataclasses.replace(e.baseline, predictions=()),
                              cbam=dataclasses.replace(e.cbam, predictions=()))
    recomputed = pair_confidence_drop(im, cut, tiny_pair)
    for role in ("baseline", "cbam"):
        assert recomputed[role].prob_before == pytest.approx(full[role].prob_before, abs=1e-5)
        assert recomputed[role].prob_after == pytest.approx(full[role].prob_after, abs=1e-5)


def test_faithfulness_can_be_skipped(tiny_pair, image):
    a = service.analyse(image, pair=tiny_pair, faithfulness=False)
    assert a.faithfulness is None and a.faithfulness_image is None
    assert "faithfulness" not in a.summary and "faithfulness" not in a.timings
    assert app_views.faithfulness_markdown(None) == ""


def test_faithfulness_sentence_names_the_more_faithful_cam():
    doc = {"fraction": 0.2, "imputer": "blur",
           "baseline": {"prob_before": 0.9, "prob_after": 0.8, "drop": 0.1, "relative_drop": 0.11},
           "cbam": {"prob_before": 0.9, "prob_after": 0.3, "drop": 0.6, "relative_drop": 0.67}}
    assert "CBAM's CAM points more" in app_views.faithfulness_markdown(doc)
    doc["cbam"] = dict(doc["baseline"])
    assert "about equally faithful" in app_views.faithfulness_markdown(doc)
    doc["cbam"] = {"prob_before": 0.5, "prob_after": 0.7, "drop": -0.2, "relative_drop": -0.4}
    text = app_views.faithfulness_markdown(doc)
    assert "(it rose)" in text and "-40%" not in text and "baseline's CAM points more" in text


def test_explain_files_writes_the_faithfulness_picture(use_pair, image, tmp_path):
    batch = service.explain_files([image], out_root=tmp_path)
    path = batch.results[0].faithfulness
    assert path is not None and path.is_file()
    with Image.open(path) as im:
        assert im.format == "PNG"


def test_target_by_wordnet_id(tiny_pair, image):
    """A class id (a WordNet id for Imagenette) is a target, as ``explain`` always accepted."""
    a = service.analyse(image, pair=tiny_pair, target="n1", faithfulness=False)
    assert a.explanation.baseline.target_label == a.explanation.cbam.target_label == "church"
    assert a.summary["models"]["cbam"]["target"] == {"index": 1, "label": "church"}


def test_written_json_has_every_timing_and_analysis_is_never_changed(use_pair, image, tmp_path):
    """``write_files`` is measured before the JSON is written, so the JSON holds it; the analysis
    returned is a new one, and no analysis' timings can be changed afterwards."""
    (r,) = service.explain_files([image], out_root=tmp_path).results
    doc = json.loads(r.files["json"].read_text())
    assert "write_files" in doc["timings"] and doc["timings"]["write_files"] >= 0
    assert doc["timings"] == dict(r.analysis.timings) == r.analysis.summary["timings"]
    assert {"load_pair", "open_image", "wait_for_model", "explain", "faithfulness", "render", "total"} <= set(doc["timings"])
    with pytest.raises(TypeError):
        r.analysis.timings["write_files"] = 0.0
    a = service.analyse(image, pair=use_pair, faithfulness=False)
    b = a.with_timing("write_files", 1.5)
    assert "write_files" not in a.timings and "write_files" not in a.summary["timings"]
    assert b.timings["write_files"] == b.summary["timings"]["write_files"] == 1.5


def test_service_keeps_no_pair_cache_of_its_own(tmp_path, monkeypatch):
    """Models come from cbam_viz.pair's one LRU cache: after it is cleared, the service reloads."""
    from cbam_viz.pair import WEIGHTS_DIR_ENV, clear_cache
    from tests.bad_inputs import TEST_PAIR, write_test_weights

    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(write_test_weights(tmp_path / "weights")))
    clear_cache()
    first = service.get_pair(TEST_PAIR)
    assert service.get_pair(TEST_PAIR).cbam is first.cbam  # cached: loaded once
    assert service.get_pair().cbam is first.cbam  # None: the default pair, the same models
    clear_cache()
    again = service.get_pair(TEST_PAIR)
    assert again.cbam is not first.cbam and again.cbam.model is not first.cbam.model
    clear_cache()


# ------------------------------------------------------------ what a request draws and writes

def test_a_request_draws_and_writes_only_what_its_caller_shows(use_pair, image, tmp_path):
    page = service.explain_files([image], out_root=tmp_path, pictures=service.PAGE_PICTURES,
                                 write=service.PAGE_FILES).results[0]
    assert page.overlays and page.photo and page.spatial_sheet and page.faithfulness
    assert page.spatial_gallery == [] and page.channel_gallery == [] and set(page.files) == {"json", "npz"}
    assert page.analysis.composite is None and page.analysis.channel_gallery == []
    for path in (page.photo, *page.overlays.values(), page.spatial_sheet):
        with Image.open(path) as im:
            assert im.format == "JPEG"
    with Image.open(page.photo) as im:
        assert im.size == (96, 72)
    api = service.explain_files([image], out_root=tmp_path, pictures=service.API_PICTURES,
                                write=service.API_FILES).results[0]
    assert set(api.files) == {"png", "json", "npz"} and api.photo is None and api.faithfulness is None
    assert len(api.spatial_gallery) == 8 and [c for _, c in api.channel_gallery] == [service.CHANNEL_OVERVIEW_CAPTION]
    with pytest.raises(ValueError, match="unknown pictures"):
        service.analyse(image, pair=use_pair, pictures=["overlays", "sketch"])
    with pytest.raises(ValueError, match="unknown files"):
        service.explain_files([image], out_root=tmp_path, write=["json", "pdf"])


def test_downloads_built_later_equal_the_ones_written_at_once(use_pair, image, tmp_path):
    """The composite build_downloads draws from the JSON and npz is the one analyse would have drawn."""
    (page,) = service.explain_files([image], out_root=tmp_path, pictures=service.PAGE_PICTURES,
                                    write=service.PAGE_FILES).results
    (full,) = service.explain_files([image], out_root=tmp_path).results  # everything, at once
    png, js, npz = service.build_downloads([page.result_id], root=tmp_path)
    with Image.open(png) as built, Image.open(full.files["png"]) as direct:
        assert np.array_equal(np.asarray(built.convert("RGB")), np.asarray(direct.convert("RGB")))
    saved = service.load_result(page.result_id, root=tmp_path)
    e, original = saved.explanation(), page.analysis.explanation
    assert np.array_equal(e.cbam.cam, original.cbam.cam) and list(e.cbam.spatial_attention) == list(
        original.cbam.spatial_attention)
    assert e.baseline.predictions == original.baseline.predictions and e.layer == original.layer
    assert np.array_equal(np.asarray(saved.image), np.asarray(page.analysis.image))
    with np.load(npz) as z, np.load(full.files["npz"]) as zf:  # the same arrays, compressed or not
        assert z.files == zf.files and all(np.array_equal(z[k], zf[k]) for k in z.files)
    doc, full_doc = json.loads(js.read_text()), json.loads(full.files["json"].read_text())
    assert set(doc) == set(full_doc)
    assert doc["models"]["cbam"]["predictions"] == full_doc["models"]["cbam"]["predictions"]
    with pytest.raises(UserFacingError, match="no longer on the server"):
        service.load_result("req-gone/00_x", root=tmp_path)


def test_request_files_skip_fsync_and_kept_files_do_not(use_pair, image, tmp_path, monkeypatch):
    """Request folders are temporary (atomic, not durable); save() writes files a person keeps (durable)."""
    synced = []
    real = os.fsync
    monkeypatch.setattr(outputs.os, "fsync", lambda fd: synced.append(fd) or real(fd))
    service.explain_files([image], out_root=tmp_path)
    assert synced == []
    service.save(service.analyse(image, pair=use_pair), tmp_path / "kept")
    assert len(synced) == 3


def test_spatial_value_at_a_point(use_pair, image, tmp_path):
    (r,) = service.explain_files([image], out_root=tmp_path, write=service.PAGE_FILES).results
    values = dict(service.spatial_at(r.result_id, 0, 71, root=tmp_path))
    maps = r.analysis.explanation.cbam.spatial_attention
    assert list(values) == list(maps)
    assert all(values[b] == pytest.approx(float(m[-1, 0])) for b, m in maps.items())  # bottom-left cell
    with pytest.raises(UserFacingError, match="inside the photo"):
        service.spatial_at(r.result_id, -1, 5, root=tmp_path)


def test_a_file_name_with_dots_keeps_its_result_usable(use_service_pair, tmp_path):
    """`2024..05..01.jpg` gave a result id with "..", which every later button refused."""
    assert ".." not in outputs.safe_stem("2024..05..01.jpg") and outputs.safe_stem("..") == "image"
    batch = service.explain_files([make_image(tmp_path / "photo.png")], names=["2024..05..01.jpg"],
                                  out_root=tmp_path / "out")
    values = service.spatial_at(batch.results[0].result_id, 5, 5, root=tmp_path / "out")
    assert len(values) == len(block_names(use_service_pair.cbam.model))


def test_page_text_stays_readable_and_inert():
    from cbam_viz.messages import classes_sentence

    many = classes_sentence([f"class {i}" for i in range(1000)])  # an ImageNet pair
    assert many.startswith("The models only know these 1,000 classes: class 0, class 1") and len(many) < 400
    assert many.endswith("class 19 and 980 more")
    status = app_views.status_markdown([], [("[Sign in again](https:evil.com).jpg", "not an image")])
    assert "](" not in status and r"\[Sign in again\]" in status


def test_a_broken_record_costs_the_card_not_the_page(monkeypatch, use_service_pair):
    from cbam_viz.model_card import paired_sentence

    assert paired_sentence({"n": 3}) is None  # no difference: no sentence
    assert paired_sentence({"cbam_minus_baseline": 0.01, "mcnemar_p": None}) == "+1.00 points."

    def broken(pair):
        raise KeyError("cbam_minus_baseline")

    monkeypatch.setattr(app_views, "model_card_markdown", broken)
    view = app_views.pair_view(None)
    assert "could not be drawn" in view.card and view.error is None and view.targets is not None


def test_the_card_of_a_half_trained_or_foreign_pair_claims_nothing_for_the_other_model():
    from dataclasses import replace

    from cbam_viz.weights import WeightRecord

    rec = WeightRecord(name="r", file="/srv/secret/folder/RN50_CBAM.pth", arch="resnet18_cbam", sha256="",
                       num_params=2, classes=[{"id": "n0", "name": "tench"}], mean=[0.5] * 3, std=[0.5] * 3,
                       input_size=64, training={"selection": {"weights": "ema", "input_size": 64}})
    pair = make_service_pair("t", trained=True)
    pair = replace(pair, baseline=replace(pair.baseline, trained=False), cbam=replace(pair.cbam, record=rec))
    card = app_views.model_card_markdown(pair)
    assert "- Shipped as (CBAM): EMA weights at 64 px" in card and "(both)" not in card
    assert "`RN50_CBAM.pth`" in card and "/srv/secret" not in card  # the server's folders stay private
    assert "(untrained)" in card


def test_the_hundred_and_first_image_of_a_request_has_a_usable_result_id(tmp_path):
    """Folders are numbered 00_, 01_, ... 99_, then 100_: a large CBAM_VIZ_MAX_IMAGES must not break ids."""
    (tmp_path / "req-a" / "100_photo").mkdir(parents=True)
    assert outputs.result_dir("req-a/100_photo", tmp_path) == tmp_path / "req-a" / "100_photo"
    with pytest.raises(UserFacingError):
        outputs.result_dir("req-a/1_photo", tmp_path)


def test_warm_up_of_a_corrupted_pair_logs_one_traceback(tmp_path, monkeypatch, caplog):
    """A pair that fails to load is logged once with its traceback (by get_pair); warm-up adds one
    plain line instead of a second traceback, and never raises: the app must start anyway."""
    import logging

    from cbam_viz.pair import WEIGHTS_DIR_ENV, clear_cache
    from tests.bad_inputs import TEST_PAIR, write_test_weights

    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(write_test_weights(tmp_path / "weights", corrupt="flip")))
    clear_cache()
    with caplog.at_level(logging.WARNING, logger="cbam_viz"):
        assert service.warm_up(TEST_PAIR) >= 0
    clear_cache()
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "loading pair" in tracebacks[0].getMessage()
    assert any(r.levelno == logging.WARNING and r.getMessage().startswith("warm-up skipped") for r in caplog.records)
