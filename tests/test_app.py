"""app.py: importing it reads no file, each event function is one library call, the named view parts
land on the components, and the page on a lineup of three (one member without gates).

Fast tests build the Blocks in this process (or a fresh one) and call the event functions directly
with tiny lineups; the slow test starts ``app.py`` on a free port and calls its named endpoints with
gradio_client.
"""
from __future__ import annotations

import ast
import base64
import io
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbam_viz.app import content, gates, page, quality, results
from tests.app_lineups import val
from tests.e2e_helpers import REPO_ROOT, make_broken_image, make_image, running_app

pytestmark = pytest.mark.usefixtures("no_cbam_env")

_IMPORT_PROBE = r"""
import json, sys, tempfile
from pathlib import Path

import gradio  # noqa: F401  (imports first: only what importing app itself does is watched)
import cbam_viz.app.content, cbam_viz.app.page, cbam_viz.app.examples, cbam_viz.engine.lineup, cbam_viz.service
import cbam_viz.research.quality.view, cbam_viz.models.weights

def loader_called(*args, **kwargs):
    raise AssertionError("a loader ran while app was imported")

for module, names in ((cbam_viz.app.content, ("quality_report", "quality_markdown", "quality_figure", "examples")),
                      (cbam_viz.app.page, ("page_view", "lineup_view", "lineup_choices")),
                      (cbam_viz.engine.lineup, ("lineup_names", "load_lineup", "lineup_specs")),
                      (cbam_viz.models.weights, ("read_manifest",)), (cbam_viz.app.examples, ("list_examples",)),
                      (cbam_viz.research.quality.view, ("load_app_report",)),
                      (cbam_viz.service, ("get_lineup", "lineup_names"))):
    for name in names:
        assert hasattr(module, name), (module.__name__, name)
        setattr(module, name, loader_called)

repo, tmp = Path(sys.argv[1]), Path(tempfile.gettempdir())
watched = [str(repo / "docs"), str(repo / "weights"), str(tmp / "cbam-viz-results")]
opened = []
sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" else None)
import app
print(json.dumps({"read": [p for p in opened if p.startswith(tuple(watched))], "events": len(app.demo.fns)}))
"""


def test_import_reads_no_file_and_calls_no_loader():
    """Importing app builds the Blocks only: lineups, examples, the quality report and docs load with the page."""
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
                        "lineup_names", "get_lineup", "describe_lineup", "add_model", "explain_files"}


class _Select:
    """What Gradio hands a ``.select`` listener (a ``gr.SelectData``): the clicked pixel as ``index``."""

    def __init__(self, index):
        self.index = index


def _stub_item() -> dict:
    member = {"name": "m", "title": "M", "labels": {}, "overlay": "c.jpg", "gated": True, "spatial": True,
              "sheet": None, "channel": {"layer1.0": [0.5]}, "faithfulness_md": ""}
    return {"photo": "p.jpg", "members": [member], "reference": "m", "faithfulness": None, "faithfulness_md": "",
            "timings_line": "the timings line", "timings_md": "", "result_id": "req-x/00_a", "warnings": []}


def _fake(name):
    shown = results.result_view(_stub_item())
    explained = results.ExplainView([_stub_item()], content.Choices(["1. a"], "1. a"), "", shown)
    from cbam_viz.app.upload import ModelAdded

    return {"explain_view": explained, "example_view": explained, "show_item": ("status", shown),
            "compare_view": ("a.jpg", "b.jpg"), "api_explain": ("summary",), "api_info": {"lineup": "p"},
            "quality_differences": ([], "note"), "example_image": "/tmp/x.png", "downloads_view": [],
            "probe_view": (None, ""), "ablation_view": (None, None, ""), "method_note": "",
            "add_model_view": ModelAdded("md", content.Choices(["mine"], "mine")),
            "lineup_view": page.LineupView("md", None, None, "card"), "shows_another_lineup": False,
            "quality_extras": quality.QualityExtras("", None, None, "")}[name]


@pytest.mark.parametrize("handler, module, view, args", [
    ("explain_ui", results, "explain_view", ("img", "files", "lineup", "gradcam", "auto", "layer3.1", 0.3)),
    ("explain_example", results, "example_view", (1, "lineup", "gradcam", "auto", "layer3.1", 0.3)),
    ("show_item", results, "show_item", ("1. a.png", [{"x": 1}])),
    ("compare_members", results, "compare_view", ("a", "b", "req-x/00_a", [{"x": 1}])),
    ("build_downloads", results, "downloads_view", ("req-x/00_a", [{"x": 1}])),
    ("probe", gates, "probe_view", ("req-x/00_a", "m", [{"x": 1}], _Select([3, 4]))),
    ("ablate", gates, "ablation_view", ("req-x/00_a", "m", [{"x": 1}])),
    ("add_own_model", "upload", "add_model_view", ("ckpt", "classes", "mine")),
    ("show_quality_extras", quality, "quality_extras", ()),
    ("on_method_change", content, "method_note", ("scorecam",)),
    ("explain_api", "api", "api_explain", ("img", "gradcam", "auto", "layer3.1", 0.3, "lineup", False)),
    ("info_api", "api", "api_info", ("lineup",)),
    ("show_differences", quality, "quality_differences", ("energy", "gradcam", "CBAM better", 3, "m2")),
    ("on_lineup_change", page, "lineup_view", ("lineup", "church", "layer3.1")),
    ("on_lineup_pick", page, "shows_another_lineup", ("lineup", "req-x/00_a", [{"x": 1}])),
    ("on_load", page, "page_view", ("lineup", "gradcam++", "church", "layer3.1")),
    ("load_example", content, "example_image", (2,)),
])
def test_each_event_function_is_one_library_call(app, monkeypatch, handler, module, view, args):
    import importlib

    module = importlib.import_module(f"cbam_viz.app.{module}") if isinstance(module, str) else module
    real = getattr(module, view)
    calls = []

    def recorder(*a, **kw):
        calls.append((a, kw))
        return real(*a, **kw) if view == "page_view" else _fake(view)

    if view != "lineup_view":
        monkeypatch.setattr(page, "lineup_view", lambda name, **kw: page.LineupView("md", None, None, "card"))
    monkeypatch.setattr(module, view, recorder)
    monkeypatch.setattr(page, "lineup_choices", lambda: ["lineup"])
    getattr(app, handler)(*args)
    assert len(calls) == 1
    flat = [*calls[0][0], *calls[0][1].values()]
    args = [a.index if isinstance(a, _Select) else a for a in args]  # the listener passes the clicked point on
    assert all(any(a is f or a == f for f in flat) for a in args), (args, calls[0])


def _outputs(app, fn_name: str) -> set:
    (fn,) = [f for f in app.demo.fns.values() if getattr(f.fn, "__name__", "") == fn_name]
    return {c._id for c in fn.outputs}


def test_named_view_parts_land_on_the_events_outputs(app):
    """What each event returns by component is among the components it declares (Gradio refuses
    anything else), and every part of a result has its component (no tuple positions)."""
    shown = results.result_view(_stub_item())
    mapped = app.ui.show(shown)
    assert {c._id for c in mapped} == {c._id for c in app.ui.components}
    for fn_name in ("explain_ui", "explain_example", "show_item", "on_lineup_pick"):
        assert {c._id for c in mapped} <= _outputs(app, fn_name), fn_name
    # The page load and a lineup change fill the columns' headings only: a shared link's restored result
    # would be lost if they named a component holding it (Gradio drops restored values of their outputs).
    holding = {c._id for c in app.ui.components} - {c._id for c in app.ui.headings}
    for fn_name in ("on_load", "on_lineup_change"):
        assert not holding & _outputs(app, fn_name), fn_name
    explained = app.ui.explained(results.ExplainView([_stub_item()], content.Choices(["1. a"], "1. a"), "", shown),
                                 items_state=app.items_state, picker=app.picker, status=app.status)
    assert {c._id for c in explained} <= _outputs(app, "explain_ui")
    assert len(app.ui.member_col) == len(app.ui.gate_col) == page.MAX_MEMBERS == 4
    kinds = {k: {type(c).__name__ for c in getattr(app.ui, k)} for k in ("member_cam", "member_label", "gate_channel")}
    assert kinds == {"member_cam": {"ImageSlider"}, "member_label": {"Label"}, "gate_channel": {"LinePlot"}}
    assert type(app.ui.compare).__name__ == "ImageSlider" and type(app.ui.probe_plot).__name__ == "BarPlot"
    assert type(app.ui.ablation_plot).__name__ == "BarPlot" and type(app.ui.ablation_table).__name__ == "Dataframe"
    assert val(mapped, app.ui.timings_line) == "the timings line" and val(mapped, app.ui.current) == "req-x/00_a"


def test_showing_another_result_cancels_the_answers_about_the_previous_one(app):
    """A slow gate ablation or download started on photo 1 must not land under photo 2: Explain, an
    example and the picker cancel them (Gradio adds a cancel step to each of those events)."""
    deps = app.demo.get_config_file()["dependencies"]

    def ids(component, event):
        return [d["id"] for d in deps if [component._id, event] in [list(t) for t in d["targets"]]]

    slow = {*ids(app.ui.ablate_btn, "click"), *ids(app.ui.downloads_btn, "click"), *ids(app.ui.probe_img, "select")}
    assert len(slow) == 3
    for component, event in ((app.run, "click"), (app.picker, "input"), (app.examples, "click")):
        cancelling = [set(d["cancels"]) for d in deps
                      if d["id"] in ids(component, event) and d.get("cancels")]
        assert cancelling == [slow], (component, event)


def test_page_events_are_private_and_the_queue_shows_its_position(app):
    config = app.demo.get_config_file()
    deps = config["dependencies"]
    public = sorted(d["api_name"] for d in deps if d.get("api_visibility", "public") == "public" and d.get("api_name"))
    assert public == ["downloads", "explain", "info"], public  # /downloads: the composite /explain does not draw
    (run,) = [d for d in deps if d.get("api_name") == "explain_ui"]
    assert run["queue"] is not False and run["show_progress"] == "full"  # queue position, then gr.Progress steps
    share = [d for d in deps if "gradio_api/deep_link" in (d.get("js") or "")]
    assert len(share) == 1 and share[0]["api_visibility"] == "private"  # gr.DeepLinkButton: copy a link to the result
    import inspect

    assert isinstance(inspect.signature(app.explain_ui).parameters["progress"].default, type(app.gr.Progress()))


def test_an_example_copy_left_by_an_older_version_is_replaced(monkeypatch, tmp_path):
    from cbam_viz.app import examples as examples_module

    source = tmp_path / "site-packages" / "ex.png"
    source.parent.mkdir()
    source.write_bytes(b"new picture")
    monkeypatch.setattr(examples_module, "list_examples",
                        lambda: [types.SimpleNamespace(path=str(source), caption="ex")])
    monkeypatch.setattr(content, "EXAMPLES_DIR", tmp_path / "copies")
    monkeypatch.setattr(content.tempfile, "gettempdir", lambda: str(tmp_path / "copies"))
    (tmp_path / "copies").mkdir()
    (tmp_path / "copies" / "ex.png").write_bytes(b"old picture")
    [(path, caption)] = content.examples.__wrapped__()  # the function, not the process's cached answer
    assert Path(path).read_bytes() == b"new picture" and caption == "ex"


def test_sanity_flag_beside_the_method(tmp_path, monkeypatch):
    """Members are named by their titles; a report of the pair era (roles as keys) still reads."""
    report = {"models": {
        "resnet18-x": {"title": "ResNet-18", "methods": {"gradcam": {"passes": True}, "eigencam": {"passes": False}}},
        "resnet18_cbam-x": {"title": "ResNet-18 + CBAM", "methods": {"eigencam": {"passes": False},
                                                                     "layercam": {"passes": False}}}}}
    (tmp_path / "sanity.json").write_text(json.dumps(report))
    monkeypatch.setenv(content.SANITY_ENV, str(tmp_path))
    content.sanity_failures.cache_clear()
    try:
        assert content.method_note("gradcam") == ""
        assert "Sanity check failed" in content.method_note("eigencam")
        assert "ResNet-18 and ResNet-18 + CBAM model" in content.method_note("eigencam")
        assert "(ResNet-18 + CBAM model)" in content.method_note("LayerCAM")
        old = {"models": {"baseline": {"methods": {"eigencam": {"passes": False}}},
                          "cbam": {"methods": {"eigencam": {"passes": False}}}}}
        (tmp_path / "sanity.json").write_text(json.dumps(old))
        content.sanity_failures.cache_clear()
        assert "baseline and CBAM model" in content.method_note("eigencam")
        monkeypatch.setenv(content.SANITY_ENV, str(tmp_path / "absent.json"))
        content.sanity_failures.cache_clear()
        assert content.sanity_failures() == {} and content.method_note("eigencam") == ""
    finally:
        content.sanity_failures.cache_clear()


def test_quality_tab_research_sections(tmp_path, monkeypatch):
    import cbam_viz.research.quality.report as report_module

    quality.quality_extras.cache_clear()
    monkeypatch.setenv(quality.CHANNEL_PROFILES_ENV, str(tmp_path))
    monkeypatch.setattr(report_module, "spatial_gate_markdown", lambda report: [])  # a report without the section
    try:
        extras = quality.quality_extras()
        assert extras.profiles_images is None and extras.profiles_rows is None
        assert "channel-profiles --data DIR --out docs/channel_profiles" in extras.profiles_note
        assert extras.spatial_gates.count("\n") == 0 and "evaluate-cams" in extras.spatial_gates  # one line
        monkeypatch.delenv(quality.CHANNEL_PROFILES_ENV)
        monkeypatch.setattr(report_module, "spatial_gate_markdown", lambda report: ["", "### Gates", "| a |"])
        quality.quality_extras.cache_clear()
        extras = quality.quality_extras()
        assert "### Gates" in extras.spatial_gates
        if (quality.CHANNEL_PROFILES / "channel_profiles.json").is_file():  # the shipped lineup's profiles
            assert extras.profiles_images and all(img.width > 100 for img, _ in extras.profiles_images)
            assert {"member", "block", "class_variance_ratio"} <= set(extras.profiles_rows.columns)
    finally:
        quality.quality_extras.cache_clear()


def test_quality_tab_shows_every_gated_members_channel_profiles(tmp_path, monkeypatch):
    """A lineup's folder (SE beside CBAM) gives one figure per member, captioned, and one table with a
    member column: not only the last member's."""
    import numpy as np
    from cbam_viz.research.channel_profiles import ChannelProfiles
    from cbam_viz.research.profile_files import write_lineup_profiles, write_profiles

    def toy(name, channels, blocks):
        rng = np.random.default_rng(len(name))
        means = {b: rng.random((2, channels)) for b in blocks}
        return ChannelProfiles(("a", "b"), ("ant", "bee"), np.array([3, 4]), means,
                               {b: m ** 2 + 0.01 for b, m in means.items()}, model_name=name, data="here")

    write_lineup_profiles({"se": toy("se", 4, ["layer1.0", "layer2.0"]), "bam": toy("bam", 6, ["bam1"])},
                          tmp_path / "lineup")
    monkeypatch.setenv(quality.CHANNEL_PROFILES_ENV, str(tmp_path / "lineup"))
    quality.quality_extras.cache_clear()
    try:
        extras = quality.quality_extras()
        assert [caption for _, caption in extras.profiles_images] == ["se", "bam"]
        assert all(img.width > 100 for img, _ in extras.profiles_images)
        assert list(extras.profiles_rows["member"]) == ["se", "se", "bam"]
        assert list(extras.profiles_rows["block"]) == ["layer1.0", "layer2.0", "bam1"]
        assert {"profile_correlation", "class_variance_ratio"} <= set(extras.profiles_rows.columns)
        write_profiles(toy("one", 4, ["layer1.0"]), tmp_path / "single")  # one model's folder, as before lineups
        monkeypatch.setenv(quality.CHANNEL_PROFILES_ENV, str(tmp_path / "single" / "profiles.npz"))
        quality.quality_extras.cache_clear()
        assert [c for _, c in quality.quality_extras().profiles_images] == ["one"]
    finally:
        quality.quality_extras.cache_clear()


def test_faithfulness_sentences_compare_each_member_with_the_reference():
    from cbam_viz.app.text import faithfulness_markdown, member_faithfulness_markdown

    drop = {"prob_before": 0.9, "prob_after": 0.8, "drop": 0.1, "relative_drop": 0.11}
    doc = {"fraction": 0.2, "imputer": "blur", "models": {
        "r": drop, "s": dict(drop), "c": {"prob_before": 0.9, "prob_after": 0.3, "drop": 0.6, "relative_drop": 0.67}}}
    titles = {"r": "ResNet-18", "s": "SE", "c": "CBAM"}
    text = faithfulness_markdown(doc, titles, "r")
    assert "takes ResNet-18's probability from 0.90 to 0.80" in text and "and CBAM's from 0.90 to 0.30" in text
    assert "SE's CAM and ResNet-18's are about equally faithful" in text
    assert "CBAM's CAM points more at what its model relies on than ResNet-18's" in text
    doc["models"]["c"] = {"prob_before": 0.5, "prob_after": 0.7, "drop": -0.2, "relative_drop": -0.4}
    text = faithfulness_markdown(doc, titles, "r")
    assert "(it rose)" in text and "-40%" not in text and "ResNet-18's CAM points more" in text
    assert faithfulness_markdown(None, titles) == "" and member_faithfulness_markdown(None, "r", "R") == ""
    assert "top 20% of its own CAM takes ResNet-18's probability from 0.90" in member_faithfulness_markdown(
        doc, "r", "ResNet-18")
    one = faithfulness_markdown({**doc, "models": {"r": drop}}, {"r": "ResNet-18"}, "r")
    assert "proves little" not in one and one.endswith("ResNet-18's probability from 0.90 to 0.80 (drop 11%).")


def _opens(path: str) -> tuple[int, int]:
    with Image.open(path) as im:
        im.load()
        return im.size


def _decoded(uri: str, kind: str) -> tuple[int, int]:
    """The size of a data-URI picture of /explain's answer, checked to be of the format it says."""
    head, data = uri.split(",", 1)
    assert head == f"data:image/{kind};base64", head
    with Image.open(io.BytesIO(base64.b64decode(data))) as im:
        im.load()
        assert im.format.lower() == kind
        return im.size


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

        info = client.predict(api_name="/info")
        names = [m["name"] for m in info["members"]]
        assert info["lineup"] == info["lineups"][0] and info["reference"] in names
        summary, pictures = client.predict(handle_file(str(good)), api_name="/explain")
        assert summary["members"] == names and set(summary["models"]) == set(names)
        for name in names:
            preds = summary["models"][name]["predictions"]
            assert preds and all(0.0 <= p["prob"] <= 1.0 for p in preds)
            assert summary["models"][name]["target"]["label"] in summary["metadata"]["classes"]
        assert summary["image"]["name"] == "street.png"
        # The pictures travel inside the answer (data URIs), in display order, captioned; no file to fetch.
        assert list(pictures) == names
        assert [p["caption"] for p in pictures.values()] == [f"{m['title']} ({m['name']})" for m in info["members"]]
        assert all(_decoded(p["cam_overlay"], "jpeg") == (320, 240) for p in pictures.values())
        gated = [m for m in info["members"] if m["gates"]]
        for m in info["members"]:
            assert ("spatial_sheet" in pictures[m["name"]]) == ("spatial" in m["gates"])
            assert ("channel_overview" in pictures[m["name"]]) == ("channel" in m["gates"])
            if "channel" in m["gates"]:
                assert _decoded(pictures[m["name"]]["channel_overview"], "png")
            if "spatial" in m["gates"]:
                assert _decoded(pictures[m["name"]]["spatial_sheet"], "jpeg")
        bare, no_pictures = client.predict(handle_file(str(good)), pictures=False, api_name="/explain")
        assert no_pictures == {} and bare["members"] == names
        # The files /explain does not return: built on demand from its result_id.
        downloads = client.predict(summary["result_id"], api_name="/downloads")
        assert sorted(f.rsplit(".", 1)[-1] for f in downloads) == ["json", "npz", "png"]
        by_suffix = {f.rsplit(".", 1)[-1]: f for f in downloads}
        doc = json.loads(open(by_suffix["json"]).read())
        assert {**doc, "result_id": summary["result_id"]} == summary  # the JSON file is the summary
        assert _opens(next(f for f in downloads if f.endswith(".png")))[0] > 320  # the photo + a CAM per member
        assert {"image", "lineup", "reference", "members", "method", "layer", "alpha", "models", "warnings",
                "timings", "metadata", "faithfulness", "target_request", "layer_request"} <= set(doc)
        assert doc["target_request"] is None and doc["layer_request"] is None  # auto: as asked
        with np.load(by_suffix["npz"]) as z:
            assert {"image", *(f"{n}/cam" for n in names)} <= set(z.files)
            assert z["image"].shape == (240, 320, 3) and z[f"{names[-1]}/cam"].shape == (240, 320)
            for m in gated:
                blocks = summary["models"][m["name"]]["attention_blocks"]
                if "spatial" in m["gates"]:
                    assert {f"{m['name']}/spatial/{b}" for b in blocks} <= set(z.files)

        # The same app is an MCP server (CBAM_VIZ_MCP=1): /explain and /info are its tools, nothing else.
        tools = {t.name: t for t in _mcp_tools(app.url + "/gradio_api/mcp/")}
        assert set(tools) == {"downloads_api", "explain_api", "info_api"}, sorted(tools)
        assert "lineup" in tools["explain_api"].description
        assert {"image", "pictures"} <= set(tools["explain_api"].inputSchema["properties"])
        assert "classes" in tools["info_api"].description

        # A broken upload: one readable sentence, no traceback, no server path.
        with pytest.raises(Exception) as err:
            client.predict(handle_file(str(broken)), api_name="/explain")
        message = str(err.value)
        assert "broken.png" in message and "not an image" in message
        assert "Traceback" not in message and "/tmp/gradio" not in message

        # The server keeps serving, with the other controls too.
        layer = info["layers"][-2]
        summary2, *_ = client.predict(handle_file(str(good)), "gradcam++", info["classes"][0], layer, 0.3,
                                      api_name="/explain")
        assert summary2["method"] == "gradcam++" and summary2["layer"] == layer
        assert summary2["models"][names[0]]["target"]["label"] == info["classes"][0]
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
