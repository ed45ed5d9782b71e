"""The page on a lineup, in process: a column per member, the compare slider, "what the gates did" per
gated member, the click probe and the gate ablation for a chosen member, a lineup of one, the page load,
shared links, examples and the in-process ``/explain`` and ``/info``.

The lineups are tiny (tests/app_lineups.py): ``trio`` = ResNet-18 | + SE | + CBAM, ``solo`` one CBAM model,
``plain`` one ResNet-18 without any gate.
"""
from __future__ import annotations

import base64
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbam_viz import outputs, service
from cbam_viz.app import content, results
from cbam_viz.messages import UserFacingError
from tests.app_lineups import prop, tiny_lineup, val
from tests.e2e_helpers import make_broken_image, make_image

pytestmark = pytest.mark.usefixtures("no_cbam_env")


@pytest.fixture(scope="module")
def lineups():
    return {lineup.name: lineup for lineup in (tiny_lineup("trio"), tiny_lineup("solo", ("resnet18_cbam",)),
                                               tiny_lineup("plain", ("resnet18",)),
                                               tiny_lineup("family", FAMILY))}


@pytest.fixture
def use_lineups(monkeypatch, lineups):
    """The service knows the tiny lineups only (no weights, no manifest involved); ``trio`` is the default."""
    def get_lineup(name=None):
        if name and name not in lineups:
            raise UserFacingError(f"There is no lineup called {name!r} (known lineups: {', '.join(lineups)}).")
        return lineups[name or "trio"]

    monkeypatch.setattr(service.access, "get_lineup", get_lineup)  # what a request gets
    monkeypatch.setattr(service, "get_lineup", get_lineup)  # what the page asks
    monkeypatch.setattr(service, "lineup_names", lambda *a, **kw: list(lineups))
    return lineups


@pytest.fixture(scope="module")
def app():
    import app as module

    return module


@pytest.fixture
def upload(tmp_path):
    path = make_image(tmp_path / "street.png", size=(96, 72))
    return {"path": str(path), "orig_name": "my street.png", "meta": {"_type": "gradio.FileData"}}


FAMILY = ("resnet18", "resnet18_se", "resnet18_bam", "resnet18_cbam")


def _titles(lineup) -> list[str]:
    return [m.title for m in service.describe_lineup(lineup).members]


def _explain(app, upload, files=None, lineup="trio", method="gradcam", target=None, layer=None):
    return app.explain_ui(upload, files, lineup, method, target or app.AUTO_TARGET, layer or app.AUTO_LAYER, 0.5)


def _size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def test_a_column_per_member_and_the_gates_of_each_gated_member(app, use_lineups, upload, tmp_path):
    trio, ui = use_lineups["trio"], app.ui
    second = {"path": str(make_image(tmp_path / "b.jpg", size=(64, 64), seed=3)), "orig_name": "b.jpg"}
    broken = {"path": str(make_broken_image(tmp_path / "holiday.png")), "orig_name": "holiday.png"}
    out = _explain(app, upload, [second, broken])
    items, status = out[app.items_state], out[app.status]
    assert [it["name"] for it in items] == ["my street.png", "b.jpg"] and "Skipped holiday.png" in status
    assert prop(out, app.picker, "visible") is True and val(out, app.picker) == "1. my street.png"
    assert "untrained" in status  # untrained members are said plainly
    titles = _titles(trio)
    assert [prop(out, c, "visible") for c in ui.member_col] == [True, True, True, False]
    assert [out[t] for t in ui.member_title] == [f"### {t}" for t in titles] + [""]
    assert not {"baseline", "cbam"} & {t.lower() for t in titles}  # titled by their records, not by roles
    for i in range(3):
        assert set(val(out, ui.member_label[i])) <= set(trio.members[i].classes)
        photo, cam = out[ui.member_cam[i]]
        assert _size(photo) == _size(cam) == (96, 72)  # a slider's two sides line up
        assert "probability from" in out[ui.member_faith[i]]
    names = trio.names
    overlays = {m["name"]: m["overlay"] for m in items[0]["members"]}
    assert out[ui.compare] == (overlays[names[0]], overlays[names[-1]])  # reference | the last member
    assert (val(out, ui.compare_a), val(out, ui.compare_b)) == (names[0], names[-1])
    assert prop(out, ui.compare_a, "choices") == [[t, n] for t, n in zip(titles, names)] or \
        prop(out, ui.compare_a, "choices") == list(zip(titles, names))
    # What the gates did: SE (channel only) and CBAM (both); the plain ResNet has no pane.
    assert prop(out, ui.gates_group, "visible") is True
    assert [prop(out, c, "visible") for c in ui.gate_col] == [True, True, False, False]
    assert [out[t] for t in ui.gate_title[:2]] == [f"#### {titles[1]}", f"#### {titles[2]}"]
    assert prop(out, ui.gate_sheet[0], "visible") is False and _size(val(out, ui.gate_sheet[1]))[0] > 96
    for pane in (0, 1):
        frame = val(out, ui.gate_channel[pane])
        first = frame[frame["block"] == "layer1.0"]
        assert sorted(first["channel"]) == list(range(len(first))) and first["attention"].is_monotonic_decreasing
    assert val(out, ui.gate_member) == names[2]  # the last member with spatial maps
    assert val(out, ui.timings_line).startswith("**Took ") and "| explain |" in out[ui.timings]
    assert out[ui.downloads] is None and out[ui.current] == items[0]["result_id"]  # downloads: on demand
    shown = app.show_item("2. b.jpg", items)
    assert "Skipped holiday.png" in shown[app.status]  # the batch's skipped file is still said
    assert _size(shown[ui.member_cam[2]][1]) == (64, 64) and shown[ui.current] == items[1]["result_id"]


def test_the_family_of_four_shows_se_bam_and_cbam_gates_each_their_own_way(app, use_lineups, upload):
    """ResNet | SE | BAM | CBAM on one photo: a column each, and a gates pane for each gated member:
    SE's channel gate per block (no spatial picture), BAM's modules at the stage transitions (its
    joint map as a spatial sheet, its channel branch per module), CBAM's both gates per block."""
    family, ui = use_lineups["family"], app.ui
    out = _explain(app, upload, lineup="family")
    titles = _titles(family)
    assert [prop(out, c, "visible") for c in ui.member_col] == [True] * 4
    assert [out[t] for t in ui.member_title] == [f"### {t}" for t in titles]
    assert [prop(out, c, "visible") for c in ui.gate_col] == [True, True, True, False]
    assert [out[t] for t in ui.gate_title[:3]] == [f"#### {t}" for t in titles[1:]]
    se, bam, cbam = (val(out, ui.gate_channel[i]) for i in range(3))
    assert sorted(set(se["block"])) == sorted({f"layer{s}.{b}" for s in range(1, 5) for b in range(2)})
    assert sorted(set(bam["block"])) == ["bam1", "bam2", "bam3"]  # after layer1..3, not in the blocks
    assert set(cbam["block"]) == set(se["block"])
    assert prop(out, ui.gate_sheet[0], "visible") is False  # SE: nothing spatial to draw
    for pane in (1, 2):  # BAM's joint maps, CBAM's spatial gates
        assert prop(out, ui.gate_sheet[pane], "visible") is not False and _size(val(out, ui.gate_sheet[pane]))[0] > 64
    assert val(out, ui.gate_member) == family.names[-1]  # the click probe: the last member with spatial maps
    assert (val(out, ui.compare_a), val(out, ui.compare_b)) == (family.names[0], family.names[-1])


def test_the_compare_slider_takes_any_two_members(app, use_lineups, upload):
    out = _explain(app, upload)
    items, names = out[app.items_state], use_lineups["trio"].names
    overlays = {m["name"]: m["overlay"] for m in items[0]["members"]}
    rid = out[app.ui.current]
    assert app.compare_members(names[1], names[2], rid, items) == (overlays[names[1]], overlays[names[2]])
    assert app.compare_members(names[2], names[0], rid, items) == (overlays[names[2]], overlays[names[0]])
    import gradio as gr

    with pytest.raises(gr.Error, match="Choose two models"):
        app.compare_members(names[0], "gone", rid, items)
    # A shared link: the page holds no state, the result's folder still answers.
    assert app.compare_members(names[1], names[0], rid, []) == (overlays[names[1]], overlays[names[0]])
    with pytest.raises(gr.Error, match="no longer on the server"):
        app.compare_members(names[0], names[1], "req-gone/00_x", [])
    with pytest.raises(gr.Error, match="Explain an image first"):
        app.compare_members(names[0], names[1], "", [])


def test_page_writes_what_it_shows_and_builds_the_downloads_on_demand(app, use_lineups, upload, tmp_path):
    names = use_lineups["trio"].names
    second = {"path": str(make_image(tmp_path / "b.jpg", size=(64, 64), seed=3)), "orig_name": "b.jpg"}
    out = _explain(app, upload, [second])
    items = out[app.items_state]
    folder = Path(items[0]["photo"]).parent
    written = sorted(p.name for p in folder.iterdir())
    assert not [n for n in written if n == "my_street.png"]  # no composite yet
    assert {"my_street.json", "my_street.npz", "photo.jpg"} <= set(written)
    assert all(Path(m["overlay"]).parent == folder for m in items[0]["members"])
    files = app.build_downloads(out[app.ui.current], items)
    by_suffix = {Path(f).suffix: f for f in files}
    assert set(by_suffix) == {".png", ".json", ".npz", ".zip"}
    with Image.open(by_suffix[".png"]) as im:
        assert im.format == "PNG" and im.width > 3 * 96
    doc = json.loads(Path(by_suffix[".json"]).read_text())
    assert doc["image"]["name"] == "my street.png" and doc["members"] == names and doc["lineup"] == "trio"
    assert all(doc["models"][n]["predictions"] for n in names) and doc["reference"] == names[0]
    with np.load(by_suffix[".npz"]) as z:
        assert {"image", *(f"{n}/cam" for n in names)} <= set(z.files)
        assert any(k.startswith(f"{names[2]}/spatial/") for k in z.files)
        assert any(k.startswith(f"{names[1]}/channel/") for k in z.files)
        assert not any(k.startswith((f"{names[1]}/spatial/", f"{names[0]}/channel/")) for k in z.files)
    with zipfile.ZipFile(by_suffix[".zip"]) as zf:
        assert len(zf.namelist()) == 6 and "b.png" in zf.namelist()  # both images' composite, JSON, npz
    assert app.build_downloads(out[app.ui.current], items) == files  # built once
    assert len(app.build_downloads(items[1]["result_id"], [])) == 3  # a deep link: no page state
    import gradio as gr

    for bad in ("", "req-x/../../etc", "../req-a/00_x", "/etc/passwd"):
        with pytest.raises(gr.Error, match="Explain an image first"):
            app.build_downloads(bad, [])


def test_the_click_probe_reads_the_chosen_members_spatial_maps(app, use_lineups, upload):
    import gradio as gr

    from tests.test_app import _Select

    names = use_lineups["trio"].names
    out = _explain(app, upload)
    items, rid = out[app.items_state], out[app.ui.current]
    frame, text = app.probe(rid, names[2], items, _Select([95, 0]))
    assert list(frame.columns) == ["block", "spatial attention"] and "pixel (95, 0)" in text
    assert _titles(use_lineups["trio"])[2].replace("+", "\\+") in text or _titles(use_lineups["trio"])[2] in text
    with np.load(Path(items[0]["photo"]).parent / "my_street.npz") as z:
        maps = {k.split("/")[-1]: z[k] for k in z.files if k.startswith(f"{names[2]}/spatial/")}
    assert list(frame["block"]) == list(maps)
    for block, value in zip(frame["block"], frame["spatial attention"]):
        h, w = maps[block].shape
        assert value == pytest.approx(maps[block][0, int(95 * w / 96)], abs=1e-4)  # the cell under the point
    with pytest.raises(gr.Error, match="inside the photo"):
        app.probe(rid, names[2], items, _Select([96, 10]))
    with pytest.raises(gr.Error, match="no spatial gate"):
        app.probe(rid, names[1], items, _Select([10, 10]))  # SE: channel gates only


def test_gate_ablation_of_the_chosen_member(app, use_lineups, upload):
    names = use_lineups["trio"].names
    out = _explain(app, upload)
    plot, table, text = app.ablate(out[app.ui.current], names[2], out[app.items_state])
    blocks = [b for b in table["block"].unique() if b != "all"]
    assert len(blocks) == 8 and len(table) == 3 * (len(blocks) + 1)  # each block x 3 gates, then all blocks
    assert list(table.columns) == ["block", "gate", "prob_change", "cam_correlation"]
    assert set(plot["ablation"]) >= {"layer1.0 channel", "all both"} and "top-1 probability" in text
    assert table["prob_change"].between(-1, 1).all()


@pytest.mark.parametrize("name, gated", [("solo", True), ("plain", False)])
def test_a_lineup_of_one_shows_everything_but_the_comparisons(app, use_lineups, upload, name, gated):
    out = _explain(app, upload, lineup=name)
    ui = app.ui
    assert [prop(out, c, "visible") for c in ui.member_col] == [True, False, False, False]
    assert out[ui.member_cam[0]] and val(out, ui.member_label[0]) and "probability from" in out[ui.member_faith[0]]
    assert prop(out, ui.compare_row, "visible") is False and out[ui.compare] is None
    assert prop(out, ui.gates_group, "visible") is gated
    assert "points more" not in out[ui.faithful_md]  # nothing to compare with


def test_another_lineup_empties_the_result_of_the_last(app, use_lineups, upload):
    out = _explain(app, upload)
    items, rid = out[app.items_state], out[app.ui.current]
    assert app.on_lineup_pick("trio", rid, items) == {}  # the shown result is this lineup's: it stays
    other = app.on_lineup_pick("solo", rid, items)
    assert other[app.ui.member_cam[0]] is None and other[app.ui.current] == ""
    assert prop(other, app.ui.gates_group, "visible") is False and other[app.ui.compare] is None
    assert app.on_lineup_pick("solo", rid, []) == {}  # a shared link being restored: no page state, kept
    headings = app.on_lineup_change("solo", app.AUTO_TARGET, app.AUTO_LAYER)
    assert [prop(headings, c, "visible") for c in app.ui.member_col] == [True, False, False, False]
    assert headings[app.ui.member_title[0]] == f"### {_titles(use_lineups['solo'])[0]}"
    assert app.ui.member_cam[0] not in headings


def test_progress_steps_for_batches_and_slow_methods(use_lineups, upload, tmp_path, monkeypatch):
    steps = []

    def progress(fraction, desc=None):
        steps.append((fraction, desc))

    second = {"path": str(make_image(tmp_path / "b.jpg", size=(48, 48), seed=4)), "orig_name": "b.jpg"}
    results.explain_view(upload, [second], progress=progress)
    assert [round(f, 2) for f, _ in steps] == [0.0, 0.45, 0.5, 0.95]
    assert steps[0][1].startswith("image 1 of 2: my street.png")
    steps.clear()
    results.explain_view(upload, None, progress=progress)  # one image, a fast method: no steps
    assert steps == []
    monkeypatch.setattr(service, "is_slow_method", lambda method: True)  # what the page asks
    monkeypatch.setattr(service.files, "is_slow_method", lambda method: True)  # what the request says
    results.explain_view(upload, None, progress=progress)
    assert steps and "many passes" in steps[0][1]


def test_examples_answer_from_the_cache_after_their_first_use(app, use_lineups, monkeypatch):
    if not content.examples():
        pytest.skip("no example pictures on this machine")
    calls = []
    real = service.explain_files
    monkeypatch.setattr(service, "explain_files", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    results._EXAMPLE_CACHE.clear()
    first = app.explain_example(0, None, "gradcam", app.AUTO_TARGET, app.AUTO_LAYER, 0.5)
    second = app.explain_example(0, None, "gradcam", app.AUTO_TARGET, app.AUTO_LAYER, 0.5)
    ui = app.ui
    assert len(calls) == 1 and second[ui.current] == first[ui.current]
    assert [second[c] for c in ui.member_cam] == [first[c] for c in ui.member_cam]
    assert "Answered from the example cache" in second[ui.timings_line] and "Answered" not in first[ui.timings_line]
    app.explain_example(0, None, "gradcam", app.AUTO_TARGET, app.AUTO_LAYER, 0.3)  # other controls: computed
    assert len(calls) == 2
    for f in Path(first[app.items_state][0]["photo"]).parent.iterdir():  # the request folder was cleaned up
        f.unlink()
    app.explain_example(0, None, "gradcam", app.AUTO_TARGET, app.AUTO_LAYER, 0.5)
    assert len(calls) == 3


def test_errors_reach_the_page_as_one_sentence(app, use_lineups, tmp_path):
    import gradio as gr

    broken = {"path": str(make_broken_image(tmp_path / "holiday.png")), "orig_name": "holiday.png"}
    with pytest.raises(gr.Error) as err:
        app.explain_ui(broken, None, None, "gradcam", app.AUTO_TARGET, app.AUTO_LAYER, 0.5)
    assert "holiday.png" in err.value.message and "not an image" in err.value.message
    assert str(tmp_path) not in err.value.message
    with pytest.raises(gr.Error, match="Unknown layer"):
        app.explain_api(broken, "gradcam", app.AUTO_TARGET, "layer9.9", 0.5)
    with pytest.raises(gr.Error, match="no lineup called 'gone'"):
        app.info_api("gone")
    with pytest.raises(gr.Error, match="Explain an image first"):
        app.show_item("", [])


def test_a_shared_link_reopens_with_its_controls_and_a_lineup_switch_keeps_what_applies(app, use_lineups):
    """A deep link restores lineup, method, target and layer before the page loads; the load keeps them,
    and an unknown value falls back to auto."""
    out = app.on_load("solo", "scorecam", "church", "layer3.1")
    assert val(out, app.lineup) == "solo" and out[app.method] == "scorecam"
    assert out[app.method_md] == content.method_note("scorecam")
    assert (val(out, app.target), val(out, app.layer)) == ("church", "layer3.1")
    out = app.on_load("gone-lineup", None, "zebra", "layer9.9")
    assert val(out, app.lineup) == "trio" and (val(out, app.target), val(out, app.layer)) == (app.AUTO_TARGET,
                                                                                              app.AUTO_LAYER)
    out = app.on_lineup_change("plain", "church", "layer2.0")
    assert (val(out, app.target), val(out, app.layer)) == ("church", "layer2.0")


def test_a_shared_results_controls_come_from_the_result_itself(app, use_lineups, upload):
    out = _explain(app, upload, lineup="solo", method="gradcam++", target="church", layer="layer3.1")
    loaded = app.on_load(None, "gradcam", app.AUTO_TARGET, app.AUTO_LAYER, out[app.ui.current])
    assert val(loaded, app.lineup) == "solo" and loaded[app.method] == "gradcam++"
    assert (val(loaded, app.target), val(loaded, app.layer)) == ("church", "layer3.1")
    out = _explain(app, upload)
    loaded = app.on_load(None, "scorecam", "church", None, out[app.ui.current])
    assert (val(loaded, app.target), val(loaded, app.layer)) == (app.AUTO_TARGET, app.AUTO_LAYER)  # auto stays
    loaded = app.on_load(None, "scorecam", "church", None, "req-gone/00_x")
    assert (loaded[app.method], val(loaded, app.target)) == ("scorecam", "church")  # gone: the page's own values


def test_page_load_fills_the_page(app, use_lineups):
    import gradio as gr

    from cbam_viz.research.quality.view import DIRECTIONS, metric_choices

    out = app.on_load()
    assert prop(out, app.q_metric, "choices") == metric_choices() and val(out, app.q_metric) == "energy"
    assert prop(out, app.q_direction, "choices") == list(DIRECTIONS)
    assert prop(out, app.lineup, "choices") == ["trio", "solo", "plain", "family"] and val(out, app.lineup) == "trio"
    assert isinstance(out[app.examples], gr.Dataset) and len(out[app.examples].raw_samples) == len(content.examples())
    assert "Pointing game" in out[app.quality_md] and "![" not in out[app.quality_md]
    assert "`trio`" in out[app.lineup_md] and all(t in out[app.lineup_md].replace("\\", "")
                                                 for t in _titles(use_lineups["trio"]))
    assert out[app.method] == "gradcam"
    assert prop(out, app.target, "choices") == [app.AUTO_TARGET, "tench", "church", "golf ball"]
    assert [prop(out, c, "visible") for c in app.ui.member_col] == [True, True, True, False]
    if content.examples():
        assert app.load_example(0) == content.examples()[0][0]


def test_info_and_explain_in_process(app, use_lineups, upload):
    trio = use_lineups["trio"]
    info = app.info_api()
    assert info["lineup"] == "trio" and info["lineups"] == ["trio", "solo", "plain", "family"]
    assert [m["name"] for m in info["members"]] == trio.names and info["reference"] == trio.reference
    assert [m["gates"] for m in info["members"]] == [[], ["channel"], ["channel", "spatial"]]
    assert info["classes"] == ["tench", "church", "golf ball"] and info["trained"] is False
    summary, pictures = app.explain_api(upload)
    assert list(summary["models"]) == trio.names == summary["members"] == list(pictures)
    assert [p["caption"] for p in pictures.values()] == [f"{m['title']} ({m['name']})" for m in info["members"]]
    kinds = {n: sorted(k for k in p if k != "caption") for n, p in pictures.items()}
    assert list(kinds.values()) == [["cam_overlay"], ["cam_overlay", "channel_overview"],  # the plain ResNet: no gate
                                    ["cam_overlay", "channel_overview", "spatial_sheet"]]
    for p in pictures.values():
        for kind, uri in p.items():
            if kind != "caption":
                fmt = "png" if kind == "channel_overview" else "jpeg"
                assert uri.startswith(f"data:image/{fmt};base64,")
                with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as im:
                    assert im.format.lower() == fmt and (kind != "cam_overlay" or im.size == (96, 72)), im.size
    folder = outputs.result_dir(summary["result_id"])  # only what /downloads builds from is written
    assert sorted(f.suffix for f in folder.iterdir()) == [".json", ".npz"]
    assert app.explain_api(upload, pictures=False)[1] == {} == app.explain_api(upload, pictures="false")[1]
    assert list(app.explain_api(upload, pictures="true")[1]) == trio.names


def test_the_composite_stays_reachable_for_api_callers(use_lineups, tmp_path, monkeypatch):
    """/explain returns no composite; its summary's result_id gets it (with the JSON and npz) from /downloads."""
    from cbam_viz import outputs
    from cbam_viz.app import api

    monkeypatch.setattr(outputs, "OUTPUT_ROOT", tmp_path)
    photo = make_image(tmp_path / "p.png", size=(80, 64))
    summary, pictures = api.api_explain(str(photo))
    assert not any("composite" in kind for p in pictures.values() for kind in p)
    downloads = results.downloads_view(summary["result_id"])
    png = next(f for f in downloads if f.endswith(".png"))
    with Image.open(png) as im:
        assert im.width > 3 * 100  # the photo and one CAM per member of the trio, side by side
    assert {Path(f).suffix for f in downloads} == {".png", ".json", ".npz"}
