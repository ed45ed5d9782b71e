"""The bad-inputs corpus (tests/bad_inputs.py) through the library, the CLI and the live server.

Every kind gets either a correct result (the picture a viewer shows: size, orientation, first
frame, transparency on white, full-range 8 bits) or one plain sentence saying what is wrong.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from cbam_viz import service
from cbam_viz.engine.explain import explain
from cbam_viz.messages import UserFacingError
from cbam_viz.engine.preprocess import ImageError, open_image
from tests.bad_inputs import TEST_PAIR, corpus, good_image, write_corpus, write_test_weights
from tests.conftest import assert_no_hooks
from tests.e2e_helpers import REPO_ROOT, running_app

pytestmark = pytest.mark.usefixtures("no_cbam_env")

CASES = corpus()
GOOD = [c for c in CASES if c.ok is not None]
BAD = [c for c in CASES if c.ok is None]
#: Peak resident memory the server may reach over the whole corpus (VmHWM).
SERVER_PEAK_BYTES = int(2.5 * 1024**3)


def test_corpus_has_enough_distinct_kinds():
    kinds = [c.kind for c in CASES]
    assert len(kinds) >= 20 and len(set(kinds)) == len(kinds)
    assert len({c.filename for c in CASES}) == len(CASES)
    assert len(GOOD) >= 10 and len(BAD) >= 6


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    write_corpus(folder, CASES)
    return folder


@pytest.fixture(scope="module")
def test_weights(tmp_path_factory) -> Path:
    return write_test_weights(tmp_path_factory.mktemp("weights"))


def assert_one_sentence(message: str, pattern: str, *, forbidden: tuple[str, ...] = ()) -> None:
    """One readable sentence that says what is wrong: no traceback, no line breaks, no server path."""
    assert re.search(pattern, message, re.IGNORECASE), f"{message!r} does not match {pattern!r}"
    assert "Traceback" not in message and "\n" not in message.strip(), message
    assert 10 <= len(message) <= 300, message
    assert message.rstrip().endswith("."), message
    for text in forbidden:
        assert text not in message, f"{text!r} leaked into {message!r}"


# ------------------------------------------------------------------------------------ library

@pytest.mark.parametrize("case", CASES, ids=lambda c: c.kind)
def test_library_result_or_one_sentence(case, corpus_dir, tiny_lineup):
    path = corpus_dir / case.filename
    if case.ok is None:
        with pytest.raises(ImageError) as err:
            open_image(path)
        assert_one_sentence(str(err.value), case.error)
        assert case.filename in str(err.value) or case.kind == "bomb"  # names the file
        return
    image = open_image(path)
    assert image.mode == "RGB" and image.size == case.ok
    if case.check is not None:
        case.check(image)
    (ex,) = explain(image, tiny_lineup)
    w, h = case.ok
    assert ex.image_size == (w, h)
    assert list(ex.models) == tiny_lineup.names
    for m in ex.models.values():
        assert m.cam.shape == (h, w) and m.cam.dtype == np.float32
        assert np.isfinite(m.cam).all() and m.cam.min() >= 0.0 and m.cam.max() <= 1.0
        probs = [p.prob for p in m.predictions]
        assert np.isfinite(probs).all() and abs(sum(probs) - 1.0) < 1e-4  # 3 classes: top-5 is all
    cbam = ex.models[tiny_lineup.members[-1].name]
    assert cbam.spatial_attention and all(np.isfinite(v).all() for v in cbam.spatial_attention.values())
    for member in tiny_lineup.members:
        assert_no_hooks(member.model)


def test_exif_orientation_is_respected_without_open_image(corpus_dir, tiny_lineup):
    """A raw PIL image straight from Image.open (EXIF tag 6, stored 120x80): CAMs at the shown 80x120."""
    with Image.open(corpus_dir / "exif_rotated.jpg") as raw:
        assert raw.size == (120, 80)
        (ex,) = explain(raw, tiny_lineup)
    assert ex.image_size == (80, 120)
    assert [m.cam.shape for m in ex.models.values()] == [(120, 80)] * len(tiny_lineup.members)


def test_bomb_is_refused_before_decoding(corpus_dir, monkeypatch):
    loads = []
    real_load = ImageFile.ImageFile.load

    def spy(self):
        loads.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    bomb = corpus_dir / "bomb.png"
    for source in (bomb, bomb.read_bytes()):
        with pytest.raises(ImageError, match="too large"):
            open_image(source)
    assert loads == [], f"the bomb was decoded: {loads}"
    open_image(corpus_dir / "one_pixel.png")  # the spy does see real decodes
    assert loads and set(loads) == {(1, 1)}


def test_service_names_the_upload_not_the_server_path(corpus_dir, tiny_lineup):
    for case in BAD:
        with pytest.raises(UserFacingError) as err:
            service.analyse(corpus_dir / case.filename, lineup=tiny_lineup, name=f"upload-{case.kind}")
        assert_one_sentence(str(err.value), case.error, forbidden=(str(corpus_dir),))


# ---------------------------------------------------------------------------------------- CLI

def test_cli_writes_good_ones_and_lists_bad_ones(corpus_dir, test_weights, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "CBAM_VIZ_WEIGHTS_DIR": str(test_weights), "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "cbam_viz", "explain", str(corpus_dir), "--out", str(out), "--no-progress"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"wrote {len(GOOD)} of {len(CASES)} image(s)" in proc.stdout, proc.stdout
    assert f"{len(BAD)} file(s) failed" in proc.stderr
    assert "Traceback" not in proc.stderr
    for case in GOOD:
        with Image.open(out / f"{case.kind}.png") as im:
            im.verify()
        doc = json.loads((out / f"{case.kind}.json").read_text())
        assert doc["lineup"] == TEST_PAIR and len(doc["members"]) == 2
        assert doc["image"]["original_size"] == list(case.ok), case.kind
        assert doc["image"]["analysed_size"] == list(case.display_size), case.kind
        assert all(doc["models"][name]["predictions"] for name in doc["members"])
    lines = proc.stderr.splitlines()
    for case in BAD:
        prefix = f"  {corpus_dir / case.filename}: "
        found = [line[len(prefix):] for line in lines if line.startswith(prefix)]
        assert len(found) == 1, f"{case.kind} not listed once in:\n{proc.stderr}"
        assert_one_sentence(found[0], case.error)
        assert not (out / f"{case.kind}.png").exists()
    expected = {f"{c.kind}.{ext}" for c in GOOD for ext in ("png", "json")}
    assert {p.name for p in out.iterdir()} == expected  # nothing else: no temp files, no partial writes


# -------------------------------------------------------------------------------- live server

def _vm_hwm_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM line")


@pytest.mark.slow
def test_live_server_survives_the_corpus(corpus_dir, test_weights, tmp_path):
    from gradio_client import Client, handle_file

    good = good_image(tmp_path / "good.png", seed=5, size=(77, 55))
    env = {"CBAM_VIZ_WEIGHTS_DIR": str(test_weights)}
    with running_app(env=env, log_name="bad-inputs-server.log") as app:
        client = Client(app.url, verbose=False)

        def explain_file(path: Path):
            return client.predict(image=handle_file(str(path)), api_name="/explain")

        def check_good() -> None:
            summary = explain_file(good)[0]
            assert summary["image"]["name"] == "good.png" and summary["image"]["analysed_size"] == [77, 55]
            assert summary["lineup"] == TEST_PAIR

        check_good()
        for case in CASES:
            path = corpus_dir / case.filename
            expected_error = case.server_error or case.error
            if case.ok is None or case.server_error:
                with pytest.raises(Exception) as err:
                    explain_file(path)
                message = str(err.value)
                assert re.search(expected_error, message, re.IGNORECASE), f"{case.kind}: {message!r}"
                assert "Traceback" not in message and "/tmp/gradio" not in message, message
                if case.server_error is None:
                    assert_one_sentence(message, expected_error, forbidden=("/tmp/gradio",))
                check_good()  # the next good request still works
                continue
            summary, pictures = explain_file(path)
            assert summary["image"]["name"] == case.filename
            assert summary["image"]["original_size"] == list(case.ok), case.kind
            assert summary["image"]["analysed_size"] == list(case.display_size), case.kind
            assert list(pictures) == summary["members"] and len(pictures) == 2
            for member in pictures.values():  # each overlay a data URI of the analysed size
                with Image.open(io.BytesIO(base64.b64decode(member["cam_overlay"].split(",", 1)[1]))) as im:
                    assert im.size == case.display_size, case.kind
            assert "spatial_sheet" in pictures[summary["members"][-1]]  # the CBAM member's attention
        check_good()
        peak = _vm_hwm_bytes(app.proc.pid)
        assert app.proc.poll() is None, app.log_tail()
    assert peak < SERVER_PEAK_BYTES, f"server peak memory {peak / 2**30:.2f} GiB"
