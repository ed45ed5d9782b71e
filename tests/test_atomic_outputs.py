"""Output files are whole or absent: atomic writes, a CLI killed with SIGKILL, unwritable folders.

Every file is written (:func:`cbam_viz.outputs.atomic_write`) to a hidden temporary name in the
same folder and renamed into place (``os.replace``), so a reader (or a crash) never sees half a
PNG/JSON/npz under its final name. Unwritable output folders fail up front with one sentence.
Tests run as root, where ``chmod`` does not stop writes, so "read-only" is simulated with folders
that cannot exist or be written even by root: a path below a regular file (ENOTDIR) and a folder
under ``/sys`` (EPERM or EROFS, depending on the container).
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbam_viz import outputs, service
from cbam_viz.cli import main
from tests.bad_inputs import good_image, write_test_weights
from tests.e2e_helpers import REPO_ROOT

pytestmark = pytest.mark.usefixtures("no_cbam_env")  # the CLI's default pair must not come from the shell

FINAL_NAME = re.compile(r"^img_\d{3}\.(png|json|npz)$")


def _assert_complete(path: Path) -> None:
    """The file is whole: the PNG decodes to the end, the JSON parses, the npz's arrays load."""
    if path.suffix == ".png":
        with Image.open(path) as im:
            im.load()
            assert im.size[0] > 0
    elif path.suffix == ".json":
        doc = json.loads(path.read_text())
        assert doc["members"] and all(doc["models"][m]["predictions"] for m in doc["members"])
    elif path.suffix == ".npz":
        with np.load(path) as z:
            cams = [k for k in z.files if k.endswith("/cam")]
            assert cams and all(z[k].ndim == 2 for k in cams) and all(z[k].size for k in z.files)
    else:
        raise AssertionError(f"unexpected file {path.name}")


def test_atomic_write_leaves_old_file_or_nothing(tmp_path):
    target = tmp_path / "result.json"

    def crash_halfway(f):
        f.write(b'{"half": ')
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        outputs.atomic_write(target, crash_halfway)
    assert list(tmp_path.iterdir()) == []  # neither a partial file nor a temp file

    outputs.atomic_write(target, lambda f: f.write(b'{"version": 1}'))
    with pytest.raises(RuntimeError):
        outputs.atomic_write(target, crash_halfway)
    assert json.loads(target.read_text()) == {"version": 1}  # the old complete file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_save_writes_whole_files_and_no_temp_files(tiny_lineup, tmp_path):
    analysis = service.analyse(Image.new("RGB", (50, 40), (10, 200, 30)), lineup=tiny_lineup, name="img_000.png")
    paths = service.save(analysis, tmp_path / "out", formats=("png", "json", "npz"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["img_000.json", "img_000.npz", "img_000.png"]
    for p in paths.values():
        _assert_complete(p)


@pytest.mark.slow
def test_cli_killed_with_sigkill_leaves_only_whole_files(tmp_path):
    weights = write_test_weights(tmp_path / "weights")
    inputs = tmp_path / "in"
    inputs.mkdir()
    n = 40
    for i in range(n):
        good_image(inputs / f"img_{i:03d}.png", seed=i, size=(400, 300))
    out = tmp_path / "out"
    env = {**os.environ, "CBAM_VIZ_WEIGHTS_DIR": str(weights), "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "cbam_viz", "explain", str(inputs), "--out", str(out), "--npz",
                             "--no-progress"], cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            if out.is_dir() and len(list(out.glob("img_*.npz"))) >= 3:
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"the CLI ended before it was killed: {proc.stderr.read()[-2000:]!r}"
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    visible = [p for p in out.iterdir() if not p.name.startswith(".")]
    hidden = [p for p in out.iterdir() if p.name.startswith(".")]
    assert 3 <= len({p.stem for p in visible}) < n, "killed too early or too late to test anything"
    for p in visible:
        assert FINAL_NAME.match(p.name), f"a temporary or unexpected file under a visible name: {p.name}"
        _assert_complete(p)
    # Temporary files of the interrupted write (if the kill hit one) are hidden dot-files.
    assert all(p.name.endswith(".tmp") for p in hidden), [p.name for p in hidden]


@pytest.fixture
def one_image(tmp_path) -> Path:
    return good_image(tmp_path / "img_000.png", seed=1)


@pytest.mark.parametrize("where", ["below_a_file", "sys", "is_a_file"])
def test_unwritable_output_folder_is_one_clear_error(where, one_image, tmp_path, capsys):
    blocker = tmp_path / "blocker.txt"
    blocker.write_text("a file, not a folder")
    out = {"below_a_file": blocker / "out", "sys": Path("/sys/cbam_viz_out"), "is_a_file": blocker}[where]
    reason = {"below_a_file": "Not a directory", "sys": "permission denied|read-only",
              "is_a_file": "is a file, not a folder"}[where]
    code = main(["explain", str(one_image), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("explain: error: ") and len(err.splitlines()) == 1, err
    assert str(out) in err and re.search(reason, err), err
    assert blocker.read_text() == "a file, not a folder" and not Path("/sys/cbam_viz_out").exists()


def test_temporary_files_are_atomic_without_fsync(tmp_path, monkeypatch):
    """``durable=False`` skips the fsync only: a failed write still leaves nothing behind."""
    synced = []
    real = os.fsync
    monkeypatch.setattr(outputs.os, "fsync", lambda fd: synced.append(fd) or real(fd))
    outputs.atomic_write_bytes(tmp_path / "kept.bin", b"1")
    outputs.write_jpeg(Image.new("RGBA", (8, 6), (1, 2, 3, 4)), tmp_path / "a.jpg", durable=False)
    outputs.write_png(Image.new("RGB", (8, 6)), tmp_path / "a.png", compress_level=outputs.PNG_FAST, durable=False)
    outputs.write_npz({"x": np.arange(3)}, tmp_path / "a.npz", compress=False, durable=False)
    assert len(synced) == 1
    with Image.open(tmp_path / "a.jpg") as im:
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (8, 6)
    with np.load(tmp_path / "a.npz") as z:
        assert z["x"].tolist() == [0, 1, 2]

    def crash(f):
        f.write(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        outputs.atomic_write(tmp_path / "b.bin", crash, durable=False)
    assert not any(p.name.startswith(".") or p.name == "b.bin" for p in tmp_path.iterdir())


def test_result_ids_name_nothing_outside_the_request_folders(tmp_path):
    from cbam_viz.messages import UserFacingError

    (tmp_path / "req-abc_1" / "00_photo").mkdir(parents=True)
    assert outputs.result_dir("req-abc_1/00_photo", tmp_path) == tmp_path / "req-abc_1" / "00_photo"
    for bad in ("", None, "req-abc_1", "req-abc_1/00_photo/..", "req-abc_1/../00_x", "../etc/passwd", "/etc/passwd",
                "req-abc_1/00_..", "req-a/b/00_c"):
        with pytest.raises(UserFacingError, match="Explain an image first"):
            outputs.result_dir(bad, tmp_path)
    with pytest.raises(UserFacingError, match="no longer on the server"):
        outputs.result_dir("req-abc_1/01_other", tmp_path)


def test_pictures_encoded_in_memory_decode_to_the_same_picture():
    """/explain's pictures travel as data URIs: a PNG comes back pixel for pixel, a JPEG close to it,
    both at their size; a picture with transparency still becomes a JPEG; another format is refused."""
    rng = np.random.default_rng(0)
    chart = Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8), "RGB")
    smooth = Image.fromarray(np.repeat(np.linspace(0, 255, 50, dtype=np.uint8)[None, :, None], 30, 0).repeat(3, 2))
    for image, fmt in ((chart, "png"), (smooth, "jpeg"), (smooth.convert("RGBA"), "jpeg")):
        head, data = outputs.data_uri(image, fmt).split(",", 1)
        assert head == f"data:image/{fmt};base64"
        with Image.open(io.BytesIO(base64.b64decode(data))) as back:
            assert back.format.lower() == fmt and back.size == (50, 30) and back.mode == "RGB"
            diff = np.abs(np.asarray(back, dtype=int) - np.asarray(image.convert("RGB"), dtype=int))
        assert diff.max() == 0 if fmt == "png" else diff.mean() < 3
    with pytest.raises(ValueError, match="jpeg or png"):
        outputs.image_bytes(chart, "gif")


def test_old_request_folders_are_looked_for_at_most_every_interval(tmp_path, monkeypatch):
    """A request does not list every folder of the last hour: the cleanup runs once per interval."""
    def old_folder(name: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        os.utime(folder, (0, 0))
        return folder

    first = old_folder("req-first")
    outputs.new_request_dir(tmp_path)
    second = old_folder("req-second")
    outputs.new_request_dir(tmp_path)
    assert not first.exists() and second.exists()  # within the interval: not looked for
    monkeypatch.setattr(outputs, "CLEANUP_EVERY_S", 0.0)
    outputs.new_request_dir(tmp_path)
    assert not second.exists()
