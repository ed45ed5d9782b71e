"""Weights integrity, no checkpoint uploads, and a server killed mid-request.

* Every shipped file's sha256 is checked at load: a corrupted (one byte flipped) or swapped file
  gives an error naming it, and the other lineups keep working, in the library and in the live app
  (pointed at a temporary weights folder with ``CBAM_VIZ_WEIGHTS_DIR``).
* ``.pth`` files load with ``torch.load(weights_only=True)``: a pickle that would run code is
  refused and its payload never runs; see ``tests/test_weights.py::test_code_running_pickle_is_refused``
  (not duplicated here).
* The web app takes no checkpoint from its users (unless a local run allows it with
  ``CBAM_VIZ_ALLOW_MODEL_UPLOAD=1``; never on a Space): no input accepts anything but images.
* A server killed with SIGKILL in the middle of a request starts again and serves correctly.
"""
from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from cbam_viz.engine.lineup import lineup_specs, load_available_lineups, load_lineup
from cbam_viz.engine.loading import WEIGHTS_DIR_ENV, ModelLoadError, clear_cache, weights_dir_default
from cbam_viz.models.weights import ChecksumError
from tests.bad_inputs import TEST_PAIR, good_image, write_test_weights
from tests.e2e_helpers import running_app

CBAM_FILE = "resnet18_cbam_cbam_test.safetensors"

pytestmark = pytest.mark.usefixtures("no_cbam_env")  # servers and loaders see only the variables set here


@pytest.fixture(scope="module")
def flipped(tmp_path_factory) -> Path:
    return write_test_weights(tmp_path_factory.mktemp("flipped"), corrupt="flip", extra_pair=True)


@pytest.fixture(autouse=True)
def _fresh_model_cache():
    clear_cache()
    yield
    clear_cache()


# ------------------------------------------------------------------------------------ library

@pytest.mark.parametrize("how", ["flip", "swap"])
def test_corrupted_or_swapped_file_is_named_and_other_lineups_load(tmp_path, how):
    weights = write_test_weights(tmp_path, corrupt=how, extra_pair=True)
    with pytest.raises(ModelLoadError) as err:
        load_lineup(TEST_PAIR, weights_dir=weights)
    message = str(err.value)
    assert CBAM_FILE in message and "corrupted or was replaced" in message and "sha256" in message
    assert isinstance(err.value.__cause__, ChecksumError)
    assert err.value.file == weights / CBAM_FILE
    lineups, errors = load_available_lineups(weights_dir=weights)
    assert list(lineups) == ["intact"] and list(errors) == [TEST_PAIR]
    assert CBAM_FILE in errors[TEST_PAIR]
    assert all(m.trained for m in lineups["intact"].members)


def test_weights_dir_env_var_is_read_at_call_time(tmp_path, monkeypatch):
    weights = write_test_weights(tmp_path / "w")
    monkeypatch.delenv(WEIGHTS_DIR_ENV, raising=False)
    assert weights_dir_default() != weights
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(weights))
    assert weights_dir_default() == weights
    assert list(lineup_specs()) == [TEST_PAIR]
    lineup = load_lineup()
    assert lineup.name == TEST_PAIR and lineup.members[-1].input_size == 64
    assert all(m.trained for m in lineup.members)
    assert weights_dir_default(tmp_path / "other") == tmp_path / "other"  # an explicit folder wins
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path / "empty"))
    assert list(lineup_specs()) == [] and load_lineup().name == "untrained"


# -------------------------------------------------------------------------------- live server

def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


@pytest.mark.slow
def test_live_app_names_a_corrupted_file_and_serves_the_other_lineup(flipped, tmp_path):
    from gradio_client import Client, handle_file

    image = good_image(tmp_path / "cat.png", seed=11, size=(70, 52))
    with running_app(env={"CBAM_VIZ_WEIGHTS_DIR": str(flipped)}, log_name="corrupt-weights-server.log") as app:
        client = Client(app.url, verbose=False)
        # The default pair is the broken one: the app still started; asking for it names the file.
        for call in (lambda: client.predict(lineup_name=TEST_PAIR, api_name="/info"),
                     lambda: client.predict(image=handle_file(str(image)), lineup_name=TEST_PAIR, api_name="/explain")):
            with pytest.raises(Exception) as err:
                call()
            message = str(err.value)
            assert CBAM_FILE in message and "corrupted" in message and "Traceback" not in message, message
        # The intact pair and the untrained fallback still serve.
        info = client.predict(lineup_name="intact", api_name="/info")
        assert info["lineup"] == "intact" and info["trained"]
        # The manifest's lineups first, then the built-in ones (the ImageNet pair, the untrained fallback last).
        assert info["lineups"][:2] == [TEST_PAIR, "intact"] and info["lineups"][-1] == "untrained"
        summary = client.predict(image=handle_file(str(image)), lineup_name="intact", api_name="/explain")[0]
        assert summary["lineup"] == "intact" and summary["image"]["analysed_size"] == [70, 52]
        assert all(summary["models"][m["name"]]["predictions"] for m in info["members"])
        assert client.predict(lineup_name="untrained", api_name="/info")["trained"] is False
        assert app.proc.poll() is None


_IMAGE_TYPES = {"image", ".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
_CHECKPOINT_WORDS = ("checkpoint", "weight", ".pth", ".pt", ".safetensors", ".ckpt", ".bin", "model file")


@pytest.mark.slow
@pytest.mark.parametrize("env", [{}, {"CBAM_VIZ_ALLOW_MODEL_UPLOAD": "1", "SPACE_ID": "someone/cbam-viz"}],
                         ids=["default", "space-with-uploads-asked"])
def test_web_ui_and_api_take_no_checkpoint_uploads(flipped, env):
    """Model uploads are a local run's choice (CBAM_VIZ_ALLOW_MODEL_UPLOAD=1); by default, and always on
    a Space, no input of the page or the API takes a checkpoint."""
    from gradio_client import Client

    with running_app(env={"CBAM_VIZ_WEIGHTS_DIR": str(flipped), "CBAM_VIZ_WARMUP": "0", **env},
                     log_name="no-checkpoint-upload-server.log") as app:
        config = _get_json(app.url + "/config")
        api = Client(app.url, verbose=False).view_api(return_format="dict", print_info=False)

    components = {c["id"]: c for c in config["components"]}
    inputs = {i for dep in config["dependencies"] for i in dep.get("inputs", [])}
    # (gr.Examples' "dataset" is an input too, but it only picks one of the shipped examples.)
    upload_kinds = {"file", "image", "uploadbutton", "model3d", "imageeditor", "gallery", "video", "audio",
                    "multimodaltextbox", "annotatedimage", "simpleimage"}
    uploads = [components[i] for i in inputs if components[i]["type"] in upload_kinds]
    assert {c["type"] for c in uploads} <= {"image", "file"}, [c["type"] for c in uploads]
    assert any(c["type"] == "file" for c in uploads)  # the multi-photo input is checked below, not skipped
    for c in uploads:
        props = c.get("props", {})
        text = json.dumps({k: props.get(k) for k in ("label", "info", "file_types")}).lower()
        assert not any(w in text for w in _CHECKPOINT_WORDS), f"{c['type']} input {props.get('label')!r}"
        if c["type"] == "file":
            assert props.get("file_types") and set(props["file_types"]) <= _IMAGE_TYPES, props.get("file_types")
    # The documented API: /explain takes an image and controls, /info a lineup name; nothing else uploads.
    for name, endpoint in api["named_endpoints"].items():
        for p in endpoint["parameters"]:
            described = json.dumps(p).lower()
            assert not any(w in described for w in ("checkpoint", ".pth", ".safetensors", ".ckpt")), (name, p)
            if "filedata" in described or "filepath" in described:
                assert name in ("/explain", "/explain_ui") and p["parameter_name"] in ("image", "files"), (name, p)


@pytest.mark.slow
def test_server_killed_mid_request_restarts_and_serves(flipped, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.utils import Status

    image = good_image(tmp_path / "dog.png", seed=12, size=(64, 48))
    env = {"CBAM_VIZ_WEIGHTS_DIR": str(flipped), "CBAM_VIZ_WARMUP": "0"}
    with running_app(env=env, log_name="sigkill-server-1.log") as app:
        port = app.port
        client = Client(app.url, verbose=False)
        # Score-CAM at 224 pixels (the untrained pair) runs hundreds of forward passes: many
        # seconds of work to be killed in the middle of.
        job = client.submit(image=handle_file(str(image)), method="scorecam", lineup_name="untrained",
                            api_name="/explain")
        deadline = time.monotonic() + 240
        while job.status().code != Status.PROCESSING and time.monotonic() < deadline:
            assert not job.done(), "the request finished before it could be killed"
            time.sleep(0.05)
        assert job.status().code == Status.PROCESSING
        time.sleep(0.5)
        assert not job.done(), "the request finished before it could be killed"
        os.killpg(app.proc.pid, signal.SIGKILL)
        assert app.proc.wait(timeout=30) == -signal.SIGKILL
        with pytest.raises(Exception):
            job.result(timeout=30)  # the client sees a failure, it does not hang

    with running_app(port=port, env=env, log_name="sigkill-server-2.log") as app:
        client = Client(app.url, verbose=False)
        summary = client.predict(image=handle_file(str(image)), lineup_name="intact", api_name="/explain")[0]
        assert summary["lineup"] == "intact" and summary["image"]["name"] == "dog.png"
        assert summary["image"]["analysed_size"] == [64, 48]
        assert all(summary["models"][m]["predictions"] for m in summary["members"])
        assert app.proc.poll() is None
