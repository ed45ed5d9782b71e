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
import cbam_viz.app_views as views, cbam_viz.examples, cbam_viz.pair, cbam_viz.quality.view, cbam_viz.service
import cbam_viz.weights

def loader_called(*args, **kwargs):
    raise AssertionError("a loader ran while app was imported")

for module, names in ((views, ("quality_report", "quality_markdown", "quality_figure", "examples", "page_view",
                               "pair_view", "pair_names")),
                      (cbam_viz.pair, ("pair_names", "list_pairs", "load_pair")),
                      (cbam_viz.weights, ("read_manifest",)), (cbam_viz.examples, ("list_examples",)),
                      (cbam_viz.quality.view, ("load_app_report",)), (cbam_viz.service, ("get_pair",))):
    for name in names:
        setattr(module, name, loader_called)

repo, tmp = Path(sys.argv[1]), Path(tempfile.gettempdir())
watched = [str(repo / "docs"), str(repo / "weights"), str(tmp / "cbam_viz")]  # + cbam_viz_examples, ..._app_examples
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


@pytest.mark.parametrize("handler, view, args", [
    ("explain_ui", "explain_view", ("img", "files", "pair", "gradcam", "auto", "layer3.1", 0.3)),
    ("show_item", "show_item", ("1. a.png", [{"x": 1}])),
    ("explain_api", "api_explain", ("img", "gradcam", "auto", "layer3.1", 0.3, "pair")),
    ("info_api", "api_info", ("pair",)),
    ("show_differences", "quality_differences", ("energy", "gradcam", "CBAM better", 3)),
    ("on_pair_change", "pair_view", ("pair",)),
    ("on_load", "page_view", ()),
    ("load_example", "example_image", (2,)),
])
def test_each_event_function_is_one_library_call(app, monkeypatch, handler, view, args):
    real = getattr(app_views, view)
    calls = []

    def recorder(*a, **kw):
        calls.append((a, kw))
        return real(*a, **kw) if view in ("pair_view", "page_view") else _fake(view)

    def _fake(name):
        return {"explain_view": app_views.ExplainView([{}], app_views.Choices(["1. a"], "1. a"), "", ("shown",)),
                "show_item": ("status", "shown"), "api_explain": ("summary",), "api_info": {"pair": "p"},
                "quality_differences": ([], "note"), "example_image": "/tmp/x.png"}[name]

    monkeypatch.setattr(app_views, view, recorder)
    monkeypatch.setattr(app_views, "pair_view", recorder if view == "pair_view" else
                        lambda name: app_views.PairView("md", None, None, "card"))
    getattr(app, handler)(*args)
    assert len(calls) == 1
    flat = [*calls[0][0], *calls[0][1].values()]
    assert all(any(a is f or a == f for f in flat) for a in args), (args, calls[0])


def test_explain_and_picker_in_process(app, use_service_pair, upload, tmp_path):
    second = {"path": str(make_image(tmp_path / "b.jpg", size=(64, 64), seed=3)), "orig_name": "b.jpg"}
    items, picker, status, *shown = app.explain_ui(upload, [second], None, "gradcam", app.AUTO_TARGET,
                                                   app.AUTO_LAYER, 0.5)
    assert [it["name"] for it in items] == ["my street.png", "b.jpg"]
    assert picker["choices"] and picker["visible"] is True and picker["value"] == "1. my street.png"
    labels, cam = shown[0], shown[1]
    assert set(labels) <= set(use_service_pair.cbam.classes) and Image.open(cam).size == (96, 72)
    assert "untrained" in status  # the untrained pair is said plainly
    assert len(shown[-1]) == 4 and shown[-1][-1].endswith(".zip")  # png, json, npz + the zip of both
    status2, *shown2 = app.show_item("2. b.jpg", items)
    assert Image.open(shown2[1]).size == (64, 64)


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


def test_page_load_fills_the_page(app, use_service_pair):
    import gradio as gr

    pairs, examples, quality_md, quality_fig, q_method, q_note, pair_md, target, layer, card = app.on_load()
    assert pairs["choices"][-1] == "untrained" and pairs["value"] == pairs["choices"][0]
    assert isinstance(examples, gr.Dataset) and len(examples.raw_samples) == len(app_views.examples())
    assert "Pointing game" in quality_md and "![" not in quality_md
    assert q_method["value"] in q_method["choices"]
    assert f"`{use_service_pair.name}`" in pair_md and "Untrained" in card
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
    with running_app(log_name="test_app-server.log") as app:
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


def _opens(path: str) -> tuple[int, int]:
    with Image.open(path) as im:
        im.load()
        return im.size
