"""app.py: importing it reads no file, each event function is one library call, and the live app.

Fast tests build the Blocks in this process (or a fresh one) and call the event functions
directly with the tiny pair; the slow test starts ``app.py`` on a free port and calls its named
endpoints with gradio_client.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbam_viz import app_views
from tests.e2e_helpers import REPO_ROOT, make_broken_image, make_image, running_app

pytestmark = pytest.mark.usefixtures("no_cbam_env")

_IMPORT_PROBE = r"""
import json, sys, tempfile
from pathlib import Path

import gradio  # noqa: F401  (imports first: only what importing app itself does is watched)
import cbam_viz.app_views as views, cbam_viz.examples, cbam_viz.pair, cbam_viz.research.quality.view, cbam_viz.service
import cbam_viz.weights

def loader_called(*args, **kwargs):
    raise AssertionError("a loader ran while app was imported")

for module, names in ((views, ("quality_report", "quality_markdown", "quality_figure", "examples", "page_view",
                               "pair_view", "pair_names")),
                      (cbam_viz.pair, ("pair_names", "list_pairs", "load_pair")),
                      (cbam_viz.weights, ("read_manifest",)), (cbam_viz.examples, ("list_examples",)),
                      (cbam_viz.research.quality.view, ("load_app_report",)), (cbam_viz.service, ("get_pair",))):
    for name in names:
        setattr(module, name, loader_called)

repo, tmp = Path(sys.argv[1]), Path(tempfile.gettempdir())
watched = [str(repo / "docs"), str(repo / "weights"), str(tmp / "cbam-viz-results")]  # + cbam_viz_examples, ..._app_examples
opened = []
sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" else None)
import app
print(json.dumps({"read": [p for p in opened if p.startswith(tuple(watched))], "events": len(app.demo.fns)}))
"""


def test_import_reads_no_file_and_calls_no_loader():
    """Importing app builds the Blocks only: pairs, examples, the quality report and docs load with the page."""
    proc = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, str(REPO_ROOT)], cwd=REPO_ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["read"] == [] and result["events"] >= 8


def test_import_skips_what_the_first_request_does_not_need():
    """The cold start (<= 6 s to the first answer) waits for no heavy import that a request does not use:
    the quality tab's package pulls torchvision in (~2 s), so it loads with the page instead."""
    probe = ("import sys, app; print(sorted(m for m in ('torchvision', 'matplotlib', 'pytorch_grad_cam', "
             "'cbam_viz.research.quality') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


@pytest.fixture(scope="module")
def app():
    import app as module

    return module


@pytest.fixture
def upload(tmp_path):
    """A photo as Gradio hands it to an event with ``preprocess=False``."""
    path = make_image(tmp_path / "street.png", size=(96, 72))
    return {"path": str(path), "orig_name": "my street.png", "meta": {"_type": "gradio.FileData"}}


def test_app_maps_errors_in_one_place_and_reads_nothing():
    tree = ast.parse((REPO_ROOT / "app.py").read_text())
    handlers = [n for n in ast.walk(tree) if isinstance(n, ast.ExceptHandler)]
    assert len(handlers) == 1, "errors are turned into messages once, in app._run"
    calls = {n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
             for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert not calls & {"open", "read_text", "read_bytes", "is_file", "exists", "load_app_report", "list_examples",
                        "pair_names", "get_pair", "describe_pair"}


class _Select:
    """What Gradio hands a ``.select`` listener (a ``gr.SelectData``): the clicked pixel as ``index``."""

    def __init__(self, index):
        self.index = index


@pytest.mark.parametrize("handler, view, args", [
    ("explain_ui", "explain_view", ("img", "files", "pair", "gradcam", "auto", "layer3.1", 0.3)),
    ("explain_example", "example_view", (1, "pair", "gradcam", "auto", "layer3.1", 0.3)),
    ("show_item", "show_item", ("1. a.png", [{"x": 1}])),
    ("build_downloads", "downloads_view", ("req-x/00_a", [{"x": 1}])),
    ("probe", "probe_view", ("req-x/00_a", _Select([3, 4]))),
    ("ablate", "ablation_view", ("req-x/00_a",)),
    ("show_quality_extras", "quality_extras", ()),
    ("on_method_change", "method_note", ("scorecam",)),
    ("explain_api", "api_explain", ("img", "gradcam", "auto", "layer3.1", 0.3, "pair")),
    ("info_api", "api_info", ("pair",)),
    ("show_differences", "quality_differences", ("energy", "gradcam", "CBAM better", 3)),
    ("on_pair_change", "pair_view", ("pair", "church", "layer3.1")),
    ("on_load", "page_view", ("pair", "gradcam++", "church", "layer3.1")),
    ("load_example", "example_image", (2,)),
])
def test_each_event_function_is_one_library_call(app, monkeypatch, handler, view, args):
    real = getattr(app_views, view)
    calls = []

    def recorder(*a, **kw):
        calls.append((a, kw))
        return real(*a, **kw) if view in ("pair_view", "page_view") else _fake(view)

    def _fake(name):
        view = app_views.ExplainView([{}], app_views.Choices(["1. a"], "1. a"), "", ("shown",))
        return {"explain_view": view, "example_view": view,
                "show_item": ("status", "shown"), "api_explain": ("summary",), "api_info": {"pair": "p"},
                "quality_differences": ([], "note"), "example_image": "/tmp/x.png", "downloads_view": [],
                "probe_view": (None, ""), "ablation_view": (None, None, ""), "method_note": "",
                "quality_extras": app_views.QualityExtras("", None, None, "")}[name]

    monkeypatch.setattr(app_views, view, recorder)
    monkeypatch.setattr(app_views, "pair_view", recorder if view == "pair_view" else
                        lambda name, **kw: app_views.PairView("md", None, None, "card"))
    getattr(app, handler)(*args)
    assert len(calls) == 1
    flat = [*calls[0][0], *calls[0][1].values()]
    args = [a.index if isinstance(a, _Select) else a for a in args]  # the listener passes the clicked point on
    assert all(any(a is f or a == f for f in flat) for a in args), (args, calls[0])


#: Positions in ``app.view`` (what explain_ui returns after items, picker and status).
V = {name: i for i, name in enumerate(("base_label", "base_cam", "cbam_label", "cbam_cam", "compare", "faithful_img",
                                        "faithful_md", "spatial", "probe_img", "channel", "timings_line", "timings",
                                        "current", "downloads", "probe_plot", "probe_md", "ablation_plot",
                                        "ablation_table", "ablation_md"))}


def test_view_components_match_the_layout(app):
    """explain_ui's values line up with the components it fills (a new component cannot shift them silently)."""
    assert len(app.view) == len(V) == len(app_views._components(_item_stub()))
    assert app_views._components(_item_stub())[app_views._TIMINGS_LINE_AT] == "the timings line"
    assert {type(app.view[V[k]]).__name__ for k in ("base_cam", "cbam_cam", "compare")} == {"ImageSlider"}
    assert type(app.view[V["channel"]]).__name__ == "LinePlot" and type(app.view[V["probe_plot"]]).__name__ == "BarPlot"
    assert type(app.view[V["ablation_plot"]]).__name__ == "BarPlot"
    assert type(app.view[V["ablation_table"]]).__name__ == "Dataframe"


def test_showing_another_result_cancels_the_answers_about_the_previous_one(app):
    """A slow gate ablation or download started on photo 1 must not land under photo 2: Explain, an
    example and the picker cancel them (Gradio adds a cancel step to each of those events)."""
    deps = app.demo.get_config_file()["dependencies"]

    def ids(component, event):
        return [d["id"] for d in deps if [component._id, event] in [list(t) for t in d["targets"]]]

    slow = {*ids(app.ablate_btn, "click"), *ids(app.downloads_btn, "click"), *ids(app.probe_img, "select")}
    assert len(slow) == 3
    for component, event in ((app.run, "click"), (app.picker, "input"), (app.examples, "click")):
        cancelling = [set(d["cancels"]) for d in deps
                      if d["id"] in ids(component, event) and d.get("cancels")]
        assert cancelling == [slow], (component, event)


def _item_stub() -> dict:
    return {"labels": {"baseline": {}, "cbam": {}}, "photo": "p.jpg",
            "overlays": {"baseline": "b.jpg", "cbam": "c.jpg"},
            "faithfulness": None, "faithfulness_md": "", "sheet": None, "channel": {"layer1.0": [0.5]},
            "timings_line": "the timings line", "timings_md": "", "result_id": "req-x/00_a"}


def _open_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def test_explain_and_picker_in_process(app, use_service_pair, upload, tmp_path):
    second = {"path": str(make_image(tmp_path / "b.jpg", size=(64, 64), seed=3)), "orig_name": "b.jpg"}
    broken = {"path": str(make_broken_image(tmp_path / "holiday.png")), "orig_name": "holiday.png"}
    items, picker, status, *shown = app.explain_ui(upload, [second, broken], None, "gradcam", app.AUTO_TARGET,
                                                   app.AUTO_LAYER, 0.5)
    assert [it["name"] for it in items] == ["my street.png", "b.jpg"] and "Skipped holiday.png" in status
    assert picker["choices"] and picker["visible"] is True and picker["value"] == "1. my street.png"
    labels = shown[V["base_label"]]
    assert set(labels) <= set(use_service_pair.cbam.classes)
    photo, cam = shown[V["base_cam"]]
    assert _open_size(photo) == _open_size(cam) == (96, 72)  # a slider's two sides line up
    assert shown[V["compare"]] == (shown[V["base_cam"]][1], shown[V["cbam_cam"]][1])  # baseline CAM | CBAM CAM
    assert shown[V["probe_img"]] == photo and _open_size(shown[V["spatial"]])[0] > 96  # one sheet of every block
    frame = shown[V["channel"]]
    assert list(frame.columns) == ["block", "rank", "channel", "attention"]
    first = frame[frame["block"] == "layer1.0"]
    assert sorted(first["channel"]) == list(range(len(first))) and first["attention"].is_monotonic_decreasing
    assert list(first["rank"]) == list(range(len(first)))  # each block one curve, most passed channel first
    assert set(frame["block"]) == set(items[0]["channel"]) and len(frame) > 8
    assert shown[V["timings_line"]].startswith("**Took ") and "| explain |" in shown[V["timings"]]
    assert "untrained" in status  # the untrained pair is said plainly
    assert shown[V["downloads"]] is None  # built on demand
    status2, *shown2 = app.show_item("2. b.jpg", items)
    assert "Skipped holiday.png" in status2  # the batch's skipped file is still said on its other images
    assert _open_size(shown2[V["base_cam"]][1]) == (64, 64)
    assert shown2[V["current"]] == items[1]["result_id"] != items[0]["result_id"]


def test_page_writes_what_it_shows_and_builds_the_downloads_on_demand(app, use_service_pair, upload, tmp_path):
    second = {"path": str(make_image(tmp_path / "b.jpg", size=(64, 64), seed=3)), "orig_name": "b.jpg"}
    items, _, _, *shown = app.explain_ui(upload, [second], None, "gradcam", app.AUTO_TARGET, app.AUTO_LAYER, 0.5)
    folder = Path(items[0]["photo"]).parent
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["cam_baseline.jpg", "cam_cbam.jpg", "faithfulness.png", "my_street.json", "my_street.npz",
                     "photo.jpg", "spatial_sheet.jpg"], names  # no composite, no per-block pictures yet
    files = app.build_downloads(shown[V["current"]], items)
    by_suffix = {Path(f).suffix: f for f in files}
    assert set(by_suffix) == {".png", ".json", ".npz", ".zip"}
    with Image.open(by_suffix[".png"]) as im:
        assert im.format == "PNG" and im.width > 3 * 96
    doc = json.loads(Path(by_suffix[".json"]).read_text())
    assert doc["image"]["name"] == "my street.png" and doc["models"]["cbam"]["predictions"]
    with np.load(by_suffix[".npz"]) as z:
        assert {"image", "baseline/cam", "cbam/cam"} <= set(z.files)
        assert any(k.startswith("cbam/spatial/") for k in z.files)
        assert any(k.startswith("cbam/channel/") for k in z.files)
    import zipfile

    with zipfile.ZipFile(by_suffix[".zip"]) as zf:
        assert len(zf.namelist()) == 6 and "b.png" in zf.namelist()  # both images' composite, JSON, npz
    assert app.build_downloads(shown[V["current"]], items) == files  # built once
    # A deep link has the result's id but no page state: the shown image's downloads still build.
    assert len(app.build_downloads(items[1]["result_id"], [])) == 3
    import gradio as gr

    for bad in ("", "req-x/../../etc", "../req-a/00_x", "/etc/passwd"):
        with pytest.raises(gr.Error, match="Explain an image first"):
            app.build_downloads(bad, [])


def test_click_probe_reads_every_block_at_the_point(app, use_service_pair, upload):
    import gradio as gr

    items, _, _, *shown = app.explain_ui(upload, None, None, "gradcam", app.AUTO_TARGET, app.AUTO_LAYER, 0.5)
    rid = shown[V["current"]]
    frame, text = app.probe(rid, _Select([95, 0]))
    assert list(frame.columns) == ["block", "spatial attention"] and "pixel (95, 0)" in text
    with np.load(Path(items[0]["photo"]).parent / "my_street.npz") as z:
        maps = {k.split("/")[-1]: z[k] for k in z.files if k.startswith("cbam/spatial/")}
    assert list(frame["block"]) == list(maps)
    for block, value in zip(frame["block"], frame["spatial attention"]):
        h, w = maps[block].shape
        assert value == pytest.approx(maps[block][0, int(95 * w / 96)], abs=1e-4)  # the cell under the point
    with pytest.raises(gr.Error, match="inside the photo"):
        app.probe(rid, _Select([96, 10]))


def test_gate_ablation_on_the_shown_photo(app, use_service_pair, upload):
    _, _, _, *shown = app.explain_ui(upload, None, None, "gradcam", app.AUTO_TARGET, app.AUTO_LAYER, 0.5)
    plot, table, text = app.ablate(shown[V["current"]])
    blocks = [b for b in table["block"].unique() if b != "all"]
    assert len(blocks) == 8 and len(table) == 3 * (len(blocks) + 1)  # each block x 3 gates, then all blocks
    assert list(table.columns) == ["block", "gate", "prob_change", "cam_correlation"]
    assert set(plot["ablation"]) >= {"layer1.0 channel", "all both"} and "top-1 probability" in text
    assert table["prob_change"].between(-1, 1).all()


def test_progress_steps_for_batches_and_slow_methods(use_service_pair, upload, tmp_path, monkeypatch):
    from cbam_viz import service

    steps = []

    def progress(fraction, desc=None):
        steps.append((fraction, desc))

    second = {"path": str(make_image(tmp_path / "b.jpg", size=(64, 64), seed=3)), "orig_name": "b.jpg"}
    app_views.explain_view(upload, [second], progress=progress)
    assert [d.split(":")[0] for _, d in steps] == ["image 1 of 2", "image 1 of 2", "image 2 of 2", "image 2 of 2"]
    assert [f for f, _ in steps] == sorted(f for f, _ in steps) and steps[-1][0] < 1
    steps.clear()
    app_views.explain_view(upload, None, progress=progress)
    assert steps == []  # one fast image: no progress bar
    assert service.is_slow_method("scorecam") and service.is_slow_method("ablationcam")
    assert not service.is_slow_method("gradcam") and not service.is_slow_method("no such method")
    monkeypatch.setattr(service, "is_slow_method", lambda method: True)
    app_views.explain_view(upload, None, progress=progress)
    assert steps and "many passes" in steps[0][1]


def test_examples_answer_from_the_cache_after_their_first_use(app, use_service_pair, monkeypatch):
    from cbam_viz import service

    if not app_views.examples():
        pytest.skip("no example pictures on this machine")
    calls = []
    real = service.explain_files
    monkeypatch.setattr(service, "explain_files", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    app_views._EXAMPLE_CACHE.clear()
    first = app.explain_example(0, None, "gradcam", app.AUTO_TARGET, app.AUTO_LAYER, 0.5)
    second = app.explain_example(0, None, "gradcam", app.AUTO_TARGET, app.AUTO_LAYER, 0.5)
    t = 3 + V["timings_line"]  # the cached answer says so instead of repeating the first run's time
    assert len(calls) == 1 and first[3:t] + first[t + 1:] == second[3:t] + second[t + 1:]
    assert "Answered from the example cache" in second[t] and "Answered" not in first[t]
    app.explain_example(0, None, "gradcam", app.AUTO_TARGET, app.AUTO_LAYER, 0.3)  # other controls: computed
    assert len(calls) == 2
    for f in Path(first[0][0]["photo"]).parent.iterdir():  # the request folder was cleaned up
        f.unlink()
    app.explain_example(0, None, "gradcam", app.AUTO_TARGET, app.AUTO_LAYER, 0.5)
    assert len(calls) == 3


def test_an_example_copy_left_by_an_older_version_is_replaced(monkeypatch, tmp_path):
    from cbam_viz import examples as examples_module

    source = tmp_path / "site-packages" / "ex.png"
    source.parent.mkdir()
    source.write_bytes(b"new picture")
    monkeypatch.setattr(examples_module, "list_examples",
                        lambda: [types.SimpleNamespace(path=str(source), caption="ex")])
    monkeypatch.setattr(app_views, "EXAMPLES_DIR", tmp_path / "copies")
    monkeypatch.setattr(app_views.tempfile, "gettempdir", lambda: str(tmp_path / "copies"))
    (tmp_path / "copies").mkdir()
    (tmp_path / "copies" / "ex.png").write_bytes(b"old picture")
    [(path, caption)] = app_views.examples.__wrapped__()  # the function, not the process's cached answer
    assert Path(path).read_bytes() == b"new picture" and caption == "ex"


def test_sanity_flag_beside_the_method(tmp_path, monkeypatch):
    report = {"pair": "p", "models": {
        "baseline": {"methods": {"gradcam": {"passes": True}, "eigencam": {"passes": False}}},
        "cbam": {"methods": {"gradcam": {"passes": True}, "eigencam": {"passes": False},
                             "layercam": {"passes": False}}}}}
    (tmp_path / "sanity.json").write_text(json.dumps(report))
    monkeypatch.setenv(app_views.SANITY_ENV, str(tmp_path))
    app_views.sanity_failures.cache_clear()
    try:
        assert app_views.method_note("gradcam") == ""
        assert "Sanity check failed" in app_views.method_note("eigencam") and "baseline and CBAM" in \
            app_views.method_note("eigencam")
        assert "CBAM model" in app_views.method_note("LayerCAM")
        monkeypatch.setenv(app_views.SANITY_ENV, str(tmp_path / "absent.json"))
        app_views.sanity_failures.cache_clear()
        assert app_views.sanity_failures() == {} and app_views.method_note("eigencam") == ""
    finally:
        app_views.sanity_failures.cache_clear()


def test_quality_tab_research_sections(tmp_path, monkeypatch):
    import cbam_viz.research.quality.report as report_module

    app_views.quality_extras.cache_clear()
    monkeypatch.setenv(app_views.CHANNEL_PROFILES_ENV, str(tmp_path))
    monkeypatch.setattr(report_module, "spatial_gate_markdown", lambda report: [])  # a report without the section
    try:
        extras = app_views.quality_extras()
        assert extras.profiles_image is None and extras.profiles_rows is None
        assert "channel-profiles --data DIR --out docs/channel_profiles" in extras.profiles_note
        assert extras.spatial_gates.count("\n") == 0 and "evaluate-cams" in extras.spatial_gates  # one line
        monkeypatch.delenv(app_views.CHANNEL_PROFILES_ENV)
        monkeypatch.setattr(report_module, "spatial_gate_markdown", lambda report: ["", "### Gates", "| a |"])
        app_views.quality_extras.cache_clear()
        extras = app_views.quality_extras()
        assert "### Gates" in extras.spatial_gates
        if (app_views.CHANNEL_PROFILES / "profiles.npz").is_file():  # the shipped profiles
            assert extras.profiles_image is not None and extras.profiles_image.width > 100
            assert {"block", "profile_correlation", "class_variance_ratio"} <= set(extras.profiles_rows.columns)
    finally:
        app_views.quality_extras.cache_clear()


def test_page_events_are_private_and_the_queue_shows_its_position(app):
    config = app.demo.get_config_file()
    deps = config["dependencies"]
    public = sorted(d["api_name"] for d in deps if d.get("api_visibility", "public") == "public" and d.get("api_name"))
    assert public == ["explain", "info"], public
    (run,) = [d for d in deps if d.get("api_name") == "explain_ui"]
    assert run["queue"] is not False and run["show_progress"] == "full"  # queue position, then gr.Progress steps
    share = [d for d in deps if "gradio_api/deep_link" in (d.get("js") or "")]
    assert len(share) == 1 and share[0]["api_visibility"] == "private"  # gr.DeepLinkButton: copy a link to the result
    import inspect

    assert isinstance(inspect.signature(app.explain_ui).parameters["progress"].default, type(app.gr.Progress()))


def test_errors_reach_the_page_as_one_sentence(app, use_service_pair, tmp_path):
    import gradio as gr

    broken = {"path": str(make_broken_image(tmp_path / "holiday.png")), "orig_name": "holiday.png"}
    with pytest.raises(gr.Error) as err:
        app.explain_ui(broken, None, None, "gradcam", app.AUTO_TARGET, app.AUTO_LAYER, 0.5)
    assert "holiday.png" in err.value.message and "not an image" in err.value.message
    assert str(tmp_path) not in err.value.message
    with pytest.raises(gr.Error, match="Unknown layer"):
        app.explain_api(broken, "gradcam", app.AUTO_TARGET, "layer9.9", 0.5)
    with pytest.raises(gr.Error, match="Explain an image first"):
        app.show_item("", [])


def test_a_shared_link_reopens_with_its_controls_and_a_pair_switch_keeps_what_applies(app, use_service_pair):
    """A deep link restores pair, method, target and layer before the page loads; the load keeps them
    (it used to reset them to the first pair and auto), and an unknown value falls back to auto."""
    pairs, *_, method, method_md, _, target, layer, _ = app.on_load("untrained", "scorecam", "church", "layer3.1")
    assert pairs["value"] == "untrained" and method == "scorecam" and method_md == app_views.method_note("scorecam")
    assert (target["value"], layer["value"]) == ("church", "layer3.1")
    pairs, *_, target, layer, _ = app.on_load("gone-pair", None, "zebra", "layer9.9")
    assert pairs["value"] == pairs["choices"][0] and (target["value"], layer["value"]) == (app.AUTO_TARGET,
                                                                                             app.AUTO_LAYER)
    _, target, layer, _ = app.on_pair_change("untrained", "church", "layer2.0")
    assert (target["value"], layer["value"]) == ("church", "layer2.0")


def test_a_shared_results_controls_come_from_the_result_itself(app, use_service_pair, upload):
    """The page learns a dropdown's value only when an event sends it, so a link restores the result
    id and the page takes the controls that made that result from its JSON."""
    _, _, _, *shown = app.explain_ui(upload, None, use_service_pair.name, "gradcam++", "church", "layer3.1", 0.5)
    rid = shown[V["current"]]
    pairs, *_, method, _, _, target, layer, _ = app.on_load(None, "gradcam", app.AUTO_TARGET, app.AUTO_LAYER, rid)
    assert (method, target["value"], layer["value"]) == ("gradcam++", "church", "layer3.1")
    _, _, _, *shown = app.explain_ui(upload, None, use_service_pair.name, "gradcam", app.AUTO_TARGET, app.AUTO_LAYER,
                                     0.5)
    *_, target, layer, _ = app.on_load(None, "scorecam", "church", None, shown[V["current"]])
    assert (target["value"], layer["value"]) == (app.AUTO_TARGET, app.AUTO_LAYER)  # auto stays auto
    *_, method, _, _, target, _, _ = app.on_load(None, "scorecam", "church", None, "req-gone/00_x")
    assert (method, target["value"]) == ("scorecam", "church")  # a result that is gone: the page's own values


def test_page_load_fills_the_page(app, use_service_pair):
    import gradio as gr

    (pairs, examples, quality_md, quality_fig, q_metric, q_method, q_direction, q_note, method, method_md, pair_md,
     target, layer, card) = app.on_load()
    from cbam_viz.research.quality.view import DIRECTIONS, metric_choices

    assert q_metric["choices"] == metric_choices() and q_metric["value"] == "energy"
    assert q_direction["choices"] == list(DIRECTIONS) and q_direction["value"] in DIRECTIONS
    assert pairs["choices"][-1] == "untrained" and pairs["value"] == pairs["choices"][0]
    assert isinstance(examples, gr.Dataset) and len(examples.raw_samples) == len(app_views.examples())
    assert "Pointing game" in quality_md and "![" not in quality_md
    assert q_method["value"] in q_method["choices"]
    assert f"`{use_service_pair.name}`" in pair_md and "Untrained" in card
    assert method == "gradcam" and method_md == app_views.method_note("gradcam")
    assert target["choices"] == [app.AUTO_TARGET, *use_service_pair.cbam.classes] and layer["value"] == app.AUTO_LAYER
    if app_views.examples():
        assert app.load_example(0) == app_views.examples()[0][0]
    info = app.info_api()
    assert info["classes"] == list(use_service_pair.cbam.classes) and info["pairs"] == pairs["choices"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_explain_endpoint_end_to_end(tmp_path):
    from gradio_client import Client, handle_file

    good = make_image(tmp_path / "street.png", size=(320, 240))
    broken = make_broken_image(tmp_path / "broken.png")
    with running_app(log_name="test_app-server.log", env={"CBAM_VIZ_MCP": "1"}) as app:
        client = Client(app.url, verbose=False)
        api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
        assert {"/explain", "/info"} <= set(api)
        defaults = [p["parameter_name"] for p in api["/explain"]["parameters"] if not p["parameter_has_default"]]
        assert defaults == ["image"], "every input but the image has a default"

        summary, cam_base, cam_cbam, composite, attention, files = client.predict(
            handle_file(str(good)), api_name="/explain")
        for role in ("baseline", "cbam"):
            preds = summary["models"][role]["predictions"]
            assert preds and all(0.0 <= p["prob"] <= 1.0 for p in preds)
            assert summary["models"][role]["target"]["label"] in summary["metadata"]["classes"]
        assert summary["image"]["name"] == "street.png"
        assert _opens(cam_base) == _opens(cam_cbam) == (320, 240)
        assert _opens(composite)[0] > 320
        assert attention and all(_opens(item["image"]) for item in attention)
        assert any("spatial" in (item.get("caption") or "") for item in attention)
        by_suffix = {f.rsplit(".", 1)[-1]: f for f in files}
        assert json.loads(open(by_suffix["json"]).read())["models"]["cbam"]["predictions"]
        with np.load(by_suffix["npz"]) as z:
            assert {"baseline/cam", "cbam/cam"} <= set(z.files)
        # The JSON and the npz as before: the same document as the summary, every raw array.
        doc = json.loads(open(by_suffix["json"]).read())
        assert doc == summary
        assert set(doc) == {"image", "pair", "method", "layer", "alpha", "models", "warnings", "timings", "metadata",
                            "faithfulness", "target_request", "layer_request"}
        assert doc["target_request"] is None and doc["layer_request"] is None  # auto: as asked
        assert {"load_pair", "open_image", "explain", "faithfulness", "render", "total", "write_files"} <= set(
            doc["timings"])
        with np.load(by_suffix["npz"]) as z:
            blocks = summary["models"]["cbam"]["attention_blocks"]
            assert set(z.files) == {"image", "baseline/cam", "cbam/cam", *(f"cbam/{kind}/{b}" for b in blocks
                                                                           for kind in ("channel", "spatial"))}
            assert z["image"].shape == (240, 320, 3) and z["cbam/cam"].shape == (240, 320)
            assert all(0.0 <= float(z[f"cbam/spatial/{b}"].min()) <= float(z[f"cbam/spatial/{b}"].max()) <= 1.0
                       for b in blocks)

        # The same app is an MCP server (CBAM_VIZ_MCP=1): /explain and /info are its tools, nothing else.
        tools = {t.name: t for t in _mcp_tools(app.url + "/gradio_api/mcp/")}
        assert set(tools) == {"explain_api", "info_api"}, sorted(tools)
        assert "CBAM twin" in tools["explain_api"].description and "image" in tools["explain_api"].inputSchema[
            "properties"]
        assert "classes" in tools["info_api"].description

        # A broken upload: one readable sentence, no traceback, no server path.
        with pytest.raises(Exception) as err:
            client.predict(handle_file(str(broken)), api_name="/explain")
        message = str(err.value)
        assert "broken.png" in message and "not an image" in message
        assert "Traceback" not in message and "/tmp/gradio" not in message

        # The server keeps serving, with the other controls too.
        info = client.predict(api_name="/info")
        layer = info["layers"][-2]
        summary2, *_ = client.predict(handle_file(str(good)), "gradcam++", info["classes"][0], layer, 0.3,
                                      api_name="/explain")
        assert summary2["method"] == "gradcam++" and summary2["layer"] == layer
        assert summary2["models"]["baseline"]["target"]["label"] == info["classes"][0]
        with pytest.raises(Exception, match="Unknown layer"):
            client.predict(handle_file(str(good)), "gradcam", info["targets"][0], "layer9.9", 0.5,
                           api_name="/explain")
    assert app.proc.poll() is not None, "the server was stopped"


def _mcp_tools(url: str) -> list:
    """The tools an MCP client lists at ``url`` (the streamable-HTTP transport of ``gradio[mcp]``)."""
    import asyncio

    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async def listing():
        async with streamable_http_client(url) as (read, write, _), ClientSession(read, write) as session:
            await session.initialize()
            return (await session.list_tools()).tools

    return asyncio.run(asyncio.wait_for(listing(), timeout=120))


def _opens(path: str) -> tuple[int, int]:
    with Image.open(path) as im:
        im.load()
        return im.size
