"""cbam_viz.service: explain + render + downloads on a tiny lineup; every failure is one sentence."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from cbam_viz import outputs, service
from cbam_viz.engine.controls import AUTO_LAYER, AUTO_TARGET, block_names
from cbam_viz.messages import UserFacingError, format_error
from cbam_viz.engine.lineup import lineup_names
from tests.conftest import SERVICE_CLASSES as CLASSES, make_service_lineup
from tests.e2e_helpers import make_broken_image, make_image

pytestmark = pytest.mark.usefixtures("no_cbam_env")


@pytest.fixture()
def tiny_lineup(service_lineup):
    return service_lineup


@pytest.fixture()
def use_pair(use_service_lineup):
    return use_service_lineup


@pytest.fixture()
def image(tmp_path):
    return make_image(tmp_path / "photo.png", size=(96, 72))


def test_analyse_returns_everything(tiny_lineup, image):
    a = service.analyse(image, lineup=tiny_lineup, method="gradcam", alpha=0.4)
    plain, cbam = tiny_lineup.names
    assert list(a.overlays) == tiny_lineup.names
    assert all(im.size == (96, 72) for im in a.overlays.values())
    blocks = block_names(tiny_lineup.member(cbam).model)
    assert list(a.spatial_sheets) == [cbam] and list(a.channel_overviews) == [cbam]  # only the gated member
    assert list(a.explanation.models[cbam].spatial_attention) == blocks
    assert set(a.labels(plain)) <= set(CLASSES)
    assert abs(sum(a.labels(cbam).values()) - 1.0) < 1e-4  # top-3 of 3 classes
    for step in ("open_image", "explain", "render", "total"):
        assert a.timings[step] >= 0
    assert a.summary["layer"] == blocks[-1] and a.summary["method"] == "gradcam"


def test_save_writes_valid_png_json_npz(tiny_lineup, image, tmp_path):
    a = service.analyse(image, lineup=tiny_lineup)
    paths = service.save(a, tmp_path / "out", stem="x")
    assert {p.name for p in paths.values()} == {"x.png", "x.json", "x.npz"}
    with Image.open(paths["png"]) as im:
        im.verify()
    doc = json.loads(paths["json"].read_text())
    plain, cbam = tiny_lineup.names
    assert doc["members"] == [plain, cbam] and doc["reference"] == plain and doc["lineup"] == tiny_lineup.name
    for name in (plain, cbam):
        m = doc["models"][name]
        assert m["predictions"][0]["label"] in CLASSES and 0 <= m["predictions"][0]["prob"] <= 1
        assert m["target"]["label"] in CLASSES and m["trained"] is False
    assert doc["models"][plain]["gates"] == [] and doc["models"][cbam]["gates"] == ["channel", "spatial"]
    assert doc["models"][cbam]["title"] == "ResNet-18 + CBAM" and doc["models"][plain]["title"] == "ResNet-18"
    assert doc["image"]["name"] == "photo.png" and doc["metadata"]["classes"] == list(CLASSES)
    assert doc["timings"]["total"] > 0 and doc["warnings"]
    with np.load(paths["npz"]) as z:
        keys = set(z.files)
        assert {"image", f"{plain}/cam", f"{cbam}/cam"} <= keys
        blocks = block_names(tiny_lineup.member(cbam).model)
        assert {f"{cbam}/channel/{b}" for b in blocks} <= keys
        assert {f"{cbam}/spatial/{b}" for b in blocks} <= keys
        assert not any(k.startswith(f"{plain}/channel") for k in keys)  # the plain ResNet has no gates
        assert z[f"{cbam}/cam"].shape == (72, 96) and z["image"].shape == (72, 96, 3)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp files left


def test_untrained_lineup_is_said_plainly(tiny_lineup):
    info = service.describe_lineup(tiny_lineup)
    assert not any(m.trained for m in info.members) and info.reference == tiny_lineup.names[0]
    assert [m.gates for m in info.members] == [(), ("channel", "spatial")] and len(info.gated) == 1
    assert any("untrained" in w and "random" in w for w in info.warnings)
    assert info.targets[0] == AUTO_TARGET and info.layer_choices[0] == AUTO_LAYER
    assert service.describe_lineup(make_service_lineup("t", trained=True)).warnings == ()


def test_unsure_prediction_names_the_known_classes(tiny_lineup, image):
    # An untrained 3-class model is never sure of anything: thresholds above 1 force the flag.
    a = service.analyse(image, lineup=tiny_lineup, unsure_prob=1.01)
    unsure = [w for w in a.warnings if w.startswith("Unsure prediction")]
    assert unsure and "The models only know these 3 classes: tench, church, golf ball" in unsure[0]
    assert "may show none of them" in unsure[0]
    sure = service.analyse(image, lineup=tiny_lineup, unsure_prob=0.0, unsure_margin=0.0)
    assert not [w for w in sure.warnings if w.startswith("Unsure")]


@pytest.mark.parametrize("kwargs, phrase", [
    ({"method": "nope"}, "Unknown CAM method 'nope'"),
    ({"target": "cat"}, "Unknown target class 'cat'"),
    ({"target": 7}, "out of range"),
    ({"layer": "layer9.9"}, "Unknown layer 'layer9.9'"),
    ({"alpha": 1.5}, "between 0 and 1"),
])
def test_wrong_controls_are_one_sentence(tiny_lineup, image, kwargs, phrase):
    with pytest.raises(UserFacingError) as info:
        service.analyse(image, lineup=tiny_lineup, **kwargs)
    assert phrase in str(info.value) and "\n" not in str(info.value)


def test_target_by_name_or_index_string(tiny_lineup, image):
    by_name = service.analyse(image, lineup=tiny_lineup, target="church")
    by_index = service.analyse(image, lineup=tiny_lineup, target="1")
    assert all(m.target_label == "church" for e in (by_name, by_index) for m in e.explanation.models.values())
    # what was asked, for a shared link: the same class, whichever way it was named
    assert by_name.summary["target_request"] == by_index.summary["target_request"] == {"index": 1, "label": "church"}
    assert service.analyse(image, lineup=tiny_lineup).summary["target_request"] is None  # auto


def test_bad_image_is_a_clear_sentence_without_server_path(tiny_lineup, tmp_path):
    broken = make_broken_image(tmp_path / "holiday.png")
    with pytest.raises(UserFacingError) as info:
        service.analyse(broken, lineup=tiny_lineup)
    message = str(info.value)
    assert "holiday.png" in message and "not an image" in message
    assert str(tmp_path) not in message and message.endswith(".")
    with pytest.raises(UserFacingError, match="does not exist"):
        service.analyse(tmp_path / "missing.jpg", lineup=tiny_lineup)


def test_large_image_is_downscaled_for_display(tiny_lineup, tmp_path):
    big = make_image(tmp_path / "big.png", size=(service.DISPLAY_MAX_SIDE * 2, 300))
    a = service.analyse(big, lineup=tiny_lineup)
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
        assert all(p.is_file() for p in (*r.overlays.values(), *r.spatial_sheets.values(),
                                          *r.channel_overviews.values()))
        assert len(r.overlays) == 2 and len(r.spatial_sheets) == 1


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


def test_lineup_names_always_offer_the_untrained_lineup():
    assert lineup_names()[-1] == "untrained"


def test_faithfulness_is_measured_for_both_models(tiny_lineup, image):
    """Each model's own CAM top is blurred away; probabilities before match the predictions."""
    a = service.analyse(image, lineup=tiny_lineup, target=1)
    doc = a.summary["faithfulness"]
    assert doc["fraction"] == service.FAITHFULNESS_FRACTION and doc["imputer"] == "blur"
    from cbam_viz.engine.faithfulness import confidence_drop
    from cbam_viz.engine.preprocess import to_model_tensor

    for loaded in tiny_lineup.members:
        d = doc["models"][loaded.name]
        assert d["target"] == 1
        # Recomputed from scratch (its own forward of the unperturbed input): the same numbers,
        # so the probability taken from the explanation is the one of the input the model saw.
        x = to_model_tensor(a.image, loaded.input_size, loaded.mean, loaded.std)[0]
        ref = confidence_drop(loaded.model, x, a.explanation.models[loaded.name].cam, 1,
                              fraction=service.FAITHFULNESS_FRACTION)
        assert (d["prob_before"], d["prob_after"]) == pytest.approx((ref.prob_before, ref.prob_after), abs=1e-4)
    assert a.faithfulness_image is not None and a.faithfulness_image.width > a.faithfulness_image.height
    assert a.timings["faithfulness"] >= 0


def test_faithfulness_when_the_target_is_not_in_the_top_k(tiny_lineup, image):
    """Without the target's probability in the predictions, the drop runs the extra forward."""
    import dataclasses

    from cbam_viz.engine.explain import explain
    from cbam_viz.engine.faithfulness import lineup_confidence_drop

    im = service.open_image(image)
    (e,) = explain([im], tiny_lineup, target=2)
    full = lineup_confidence_drop(im, e, tiny_lineup)
    cut = dataclasses.replace(e, models={n: dataclasses.replace(m, predictions=()) for n, m in e.models.items()})
    recomputed = lineup_confidence_drop(im, cut, tiny_lineup)
    for role in tiny_lineup.names:
        assert recomputed[role].prob_before == pytest.approx(full[role].prob_before, abs=1e-5)
        assert recomputed[role].prob_after == pytest.approx(full[role].prob_after, abs=1e-5)


def test_faithfulness_can_be_skipped(tiny_lineup, image):
    a = service.analyse(image, lineup=tiny_lineup, faithfulness=False)
    assert a.faithfulness is None and a.faithfulness_image is None
    assert "faithfulness" not in a.summary and "faithfulness" not in a.timings


def test_explain_files_writes_the_faithfulness_picture(use_pair, image, tmp_path):
    batch = service.explain_files([image], out_root=tmp_path)
    path = batch.results[0].faithfulness
    assert path is not None and path.is_file()
    with Image.open(path) as im:
        assert im.format == "PNG"


def test_target_by_wordnet_id(tiny_lineup, image):
    """A class id (a WordNet id for Imagenette) is a target, as ``explain`` always accepted."""
    a = service.analyse(image, lineup=tiny_lineup, target="n1", faithfulness=False)
    assert all(m.target_label == "church" for m in a.explanation.models.values())
    assert a.summary["models"][tiny_lineup.names[-1]]["target"] == {"index": 1, "label": "church"}


def test_written_json_has_every_timing_and_analysis_is_never_changed(use_pair, image, tmp_path):
    """``write_files`` is measured before the JSON is written, so the JSON holds it; the analysis
    returned is a new one, and no analysis' timings can be changed afterwards."""
    (r,) = service.explain_files([image], out_root=tmp_path).results
    doc = json.loads(r.files["json"].read_text())
    assert "write_files" in doc["timings"] and doc["timings"]["write_files"] >= 0
    assert doc["timings"] == dict(r.analysis.timings) == r.analysis.summary["timings"]
    assert {"open_image", "wait_for_model", "explain", "faithfulness", "render", "total"} <= set(doc["timings"])
    with pytest.raises(TypeError):
        r.analysis.timings["write_files"] = 0.0
    a = service.analyse(image, lineup=use_pair, faithfulness=False)
    b = a.with_timing("write_files", 1.5)
    assert "write_files" not in a.timings and "write_files" not in a.summary["timings"]
    assert b.timings["write_files"] == b.summary["timings"]["write_files"] == 1.5


def test_service_keeps_no_model_cache_of_its_own(tmp_path, monkeypatch):
    """Models come from cbam_viz.engine.loading's one LRU cache: after it is cleared, the service reloads."""
    from cbam_viz.engine.loading import WEIGHTS_DIR_ENV, clear_cache
    from tests.bad_inputs import TEST_PAIR, write_test_weights

    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(write_test_weights(tmp_path / "weights")))
    clear_cache()
    first = service.get_lineup(TEST_PAIR)
    assert service.get_lineup(TEST_PAIR).members[-1] is first.members[-1]  # cached: loaded once
    assert service.get_lineup().members[-1] is first.members[-1]  # None: the default lineup, the same models
    clear_cache()
    again = service.get_lineup(TEST_PAIR)
    assert again.members[-1] is not first.members[-1] and again.members[-1].model is not first.members[-1].model
    clear_cache()


# ------------------------------------------------------------ what a request draws and writes

def test_a_request_draws_and_writes_only_what_its_caller_shows(use_pair, image, tmp_path):
    page = service.explain_files([image], out_root=tmp_path, pictures=service.PAGE_PICTURES,
                                 write=service.PAGE_FILES).results[0]
    assert page.overlays and page.photo and page.spatial_sheets and page.faithfulness
    assert page.channel_overviews == {} and set(page.files) == {"json", "npz"}
    assert page.analysis.composite is None and page.analysis.channel_overviews == {}
    for path in (page.photo, *page.overlays.values(), *page.spatial_sheets.values()):
        with Image.open(path) as im:
            assert im.format == "JPEG"
    with Image.open(page.photo) as im:
        assert im.size == (96, 72)
    api = service.explain_files([image], out_root=tmp_path, pictures=service.API_PICTURES,
                                write=service.API_FILES).results[0]
    assert set(api.files) == {"json", "npz"} and api.photo is None and api.faithfulness is None
    # /explain's pictures are drawn, and travel in its answer: its folder holds what /downloads reads.
    assert api.overlays == api.spatial_sheets == api.channel_overviews == {}
    assert list(api.analysis.spatial_sheets) == list(api.analysis.channel_overviews) == [use_pair.names[-1]]
    assert sorted(f.suffix for f in (tmp_path / api.result_id).iterdir()) == [".json", ".npz"]
    with pytest.raises(ValueError, match="unknown pictures"):
        service.analyse(image, lineup=use_pair, pictures=["overlays", "sketch"])
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
    plain, cbam = use_pair.names
    assert np.array_equal(e.models[cbam].cam, original.models[cbam].cam)
    assert list(e.models[cbam].spatial_attention) == list(original.models[cbam].spatial_attention)
    assert e.models[plain].predictions == original.models[plain].predictions and e.layer == original.layer
    assert e.reference == original.reference == plain
    assert np.array_equal(np.asarray(saved.image), np.asarray(page.analysis.image))
    with np.load(npz) as z, np.load(full.files["npz"]) as zf:  # the same arrays, compressed or not
        assert z.files == zf.files and all(np.array_equal(z[k], zf[k]) for k in z.files)
    doc, full_doc = json.loads(js.read_text()), json.loads(full.files["json"].read_text())
    assert set(doc) == set(full_doc)
    assert doc["models"][cbam]["predictions"] == full_doc["models"][cbam]["predictions"]
    with pytest.raises(UserFacingError, match="no longer on the server"):
        service.load_result("req-gone/00_x", root=tmp_path)


def test_request_files_skip_fsync_and_kept_files_do_not(use_pair, image, tmp_path, monkeypatch):
    """Request folders are temporary (atomic, not durable); save() writes files a person keeps (durable)."""
    synced = []
    real = os.fsync
    monkeypatch.setattr(outputs.os, "fsync", lambda fd: synced.append(fd) or real(fd))
    service.explain_files([image], out_root=tmp_path)
    assert synced == []
    service.save(service.analyse(image, lineup=use_pair), tmp_path / "kept")
    assert len(synced) == 3


def test_spatial_value_at_a_point(use_pair, image, tmp_path):
    (r,) = service.explain_files([image], out_root=tmp_path, write=service.PAGE_FILES).results
    values = dict(service.spatial_at(r.result_id, 0, 71, root=tmp_path))
    maps = r.analysis.explanation.models[use_pair.names[-1]].spatial_attention
    assert dict(service.spatial_at(r.result_id, 0, 71, member=use_pair.names[-1], root=tmp_path)) == values
    assert list(values) == list(maps)
    assert all(values[b] == pytest.approx(float(m[-1, 0])) for b, m in maps.items())  # bottom-left cell
    with pytest.raises(UserFacingError, match="inside the photo"):
        service.spatial_at(r.result_id, -1, 5, root=tmp_path)
    with pytest.raises(UserFacingError, match="No model 'nope'"):
        service.spatial_at(r.result_id, 0, 0, member="nope", root=tmp_path)
    assert service.spatial_at(r.result_id, 0, 0, member=use_pair.names[0], root=tmp_path) == []  # no gates


def test_a_file_name_with_dots_keeps_its_result_usable(use_service_lineup, tmp_path):
    """`2024..05..01.jpg` gave a result id with "..", which every later button refused."""
    assert ".." not in outputs.safe_stem("2024..05..01.jpg") and outputs.safe_stem("..") == "image"
    batch = service.explain_files([make_image(tmp_path / "photo.png")], names=["2024..05..01.jpg"],
                                  out_root=tmp_path / "out")
    values = service.spatial_at(batch.results[0].result_id, 5, 5, root=tmp_path / "out")
    assert len(values) == len(block_names(use_service_lineup.members[-1].model))


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

    from cbam_viz.engine.loading import WEIGHTS_DIR_ENV, clear_cache
    from tests.bad_inputs import TEST_PAIR, write_test_weights

    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(write_test_weights(tmp_path / "weights", corrupt="flip")))
    clear_cache()
    with caplog.at_level(logging.WARNING, logger="cbam_viz"):
        assert service.warm_up(TEST_PAIR) >= 0
    clear_cache()
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "loading lineup" in tracebacks[0].getMessage()
    assert any(r.levelno == logging.WARNING and r.getMessage().startswith("warm-up skipped") for r in caplog.records)


def test_a_three_member_lineup_with_a_plain_reference(tmp_path, monkeypatch):
    """Every member explained, drawn and written by name; only the gated members get gate pictures."""
    from tests.conftest import serve_lineup

    family = make_service_lineup("family", archs=("resnet18", "resnet18_se", "resnet18_cbam"))
    serve_lineup(monkeypatch, family)
    (r,) = service.explain_files([make_image(tmp_path / "p.png", size=(80, 64))], out_root=tmp_path / "out").results
    plain, se, cbam = family.names
    doc = json.loads(r.files["json"].read_text())
    assert doc["members"] == family.names and doc["reference"] == plain
    assert [doc["models"][n]["gates"] for n in family.names] == [[], ["channel"], ["channel", "spatial"]]
    assert doc["models"][se]["title"] == "ResNet-18 + SE"
    assert list(r.overlays) == family.names and list(r.spatial_sheets) == [cbam]
    assert list(r.channel_overviews) == [se, cbam]
    assert set(doc["faithfulness"]["models"]) == set(family.names)
    with np.load(r.files["npz"]) as z:
        assert f"{se}/channel/layer4.1" in z.files and not any(k.startswith(f"{se}/spatial/") for k in z.files)
    assert service.spatial_at(r.result_id, 1, 1, root=tmp_path / "out")[0][0] == "layer1.0"  # CBAM's by default
    with pytest.raises(UserFacingError, match="No model of this lineup has spatial"):
        one = make_service_lineup("one", archs=("resnet18",))
        serve_lineup(monkeypatch, one)
        (single,) = service.explain_files([make_image(tmp_path / "q.png")], out_root=tmp_path / "out").results
        assert single.analysis.summary["members"] == one.names and not single.spatial_sheets
        service.spatial_at(single.result_id, 1, 1, root=tmp_path / "out")


def test_controls_are_checked_once_per_request(use_pair, image, tmp_path, monkeypatch):
    """explain_files checks the controls once and hands the checked value to every photo."""
    from cbam_viz.service import files

    calls = []
    real = files.check_controls
    monkeypatch.setattr(files, "check_controls", lambda *a, **k: calls.append(k) or real(*a, **k))
    batch = service.explain_files([image, image], out_root=tmp_path, target="church")
    assert len(calls) == 1 and len(batch.results) == 2
    assert all(r.analysis.summary["target_request"] == {"index": 1, "label": "church"} for r in batch.results)
