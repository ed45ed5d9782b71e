"""``python -m cbam_viz explain``: per-image PNG + JSON, bad files listed, exit codes, clear output errors."""
from __future__ import annotations

import errno
import json

import pytest
from PIL import Image

from cbam_viz import outputs, service
from cbam_viz.cli import main
from tests.e2e_helpers import make_broken_image, make_image

pytestmark = pytest.mark.usefixtures("no_cbam_env", "use_service_lineup")


@pytest.fixture()
def inputs(tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    make_image(folder / "a.png", size=(80, 64))
    make_image(folder / "sub" / "a.png", size=(64, 80), seed=1)  # same name: must not overwrite
    make_broken_image(folder / "broken.jpg")
    return folder


def test_writes_png_and_json_lists_broken_file_and_fails(inputs, tmp_path, capsys, use_service_lineup):
    out = tmp_path / "out"
    code = main(["explain", str(inputs), str(tmp_path / "missing.png"), "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "a.png", "a_2.json", "a_2.png"]
    for png in out.glob("*.png"):
        with Image.open(png) as im:
            im.verify()
    doc = json.loads((out / "a.json").read_text())
    assert list(doc["models"]) == use_service_lineup.names and doc["models"][use_service_lineup.names[-1]]["predictions"]
    assert "2 file(s) failed" in captured.err
    assert "broken.jpg" in captured.err and "not an image" in captured.err
    assert "missing.png: no such file or folder" in captured.err
    assert "untrained" in captured.err  # untrained models are said plainly
    assert "wrote 2 of 4" in captured.out


def test_all_good_exits_zero_with_npz(tmp_path, capsys):
    image = make_image(tmp_path / "ok.jpg", size=(72, 72))
    out = tmp_path / "out"
    assert main(["explain", str(image), "--out", str(out), "--npz", "--method", "gradcam++",
                 "--target", "church", "--layer", "layer3.1", "--alpha", "0.3", "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["ok.json", "ok.npz", "ok.png"]
    doc = json.loads((out / "ok.json").read_text())
    assert doc["method"] == "gradcam++" and doc["layer"] == "layer3.1" and doc["alpha"] == 0.3
    assert all(m["target"]["label"] == "church" for m in doc["models"].values())


def test_target_by_wordnet_id(tmp_path):
    """``--target`` takes a class id (a WordNet id such as n03028079 for Imagenette's church) too."""
    image = make_image(tmp_path / "ok.jpg", size=(72, 72))
    out = tmp_path / "out"
    assert main(["explain", str(image), "--out", str(out), "--target", "n1", "--no-progress"]) == 0
    doc = json.loads((out / "ok.json").read_text())
    assert [m["target"] for m in doc["models"].values()] == [{"index": 1, "label": "church"}] * 2


@pytest.mark.parametrize("option, phrase", [
    (["--layer", "layer9.0"], "Unknown layer"),
    (["--method", "nope"], "Unknown CAM method"),
    (["--target", "cat"], "Unknown target class"),
])
def test_wrong_option_fails_before_any_work(inputs, tmp_path, capsys, option, phrase):
    assert main(["explain", str(inputs), "--out", str(tmp_path / "out"), "--no-progress", *option]) == 2
    assert phrase in capsys.readouterr().err


def test_output_path_that_is_a_file(inputs, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["explain", str(inputs), "--out", str(blocker), "--no-progress"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["explain", str(inputs), "--out", str(blocker / "sub"), "--no-progress"]) == 2
    assert "Cannot write to the output folder" in capsys.readouterr().err


def test_disk_full_stops_with_a_clear_error(inputs, tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(service, "save", full)
    assert main(["explain", str(inputs), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "No space left on device" in capsys.readouterr().err


def test_full_disk_is_detected_up_front(inputs, tmp_path, capsys, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs.os, "fsync", full)
    assert main(["explain", str(inputs), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "the disk is full" in capsys.readouterr().err


def test_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["explain", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "no image files" in capsys.readouterr().err


def test_verbose_names_every_member_and_lineup_option(tmp_path, capsys, monkeypatch):
    """``-v`` prints each member's top-1 by name; ``--lineup`` (and the older ``--pair``) picks the lineup."""
    from tests.conftest import make_service_lineup, serve_lineup

    family = make_service_lineup("family", archs=("resnet18", "resnet18_se", "resnet18_cbam"))
    asked = []
    serve_lineup(monkeypatch, family, asked)
    image = make_image(tmp_path / "ok.jpg", size=(72, 72))
    for flag in ("--lineup", "--pair"):
        assert main(["explain", str(image), "--out", str(tmp_path / flag[2:]), flag, "family", "-v",
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in family.names) and "family" in asked
    doc = json.loads((tmp_path / "lineup" / "ok.json").read_text())
    assert doc["members"] == family.names and doc["lineup"] == "family"


def test_weights_option_is_searched_first(tmp_path, monkeypatch):
    """``--weights DIR`` puts a user's folder before $CBAM_VIZ_WEIGHTS_DIR for this run."""
    from cbam_viz.cli.explain import _use_weights
    from cbam_viz.models.weights import DEFAULT_WEIGHTS_DIR, WEIGHTS_DIR_ENV, weights_dirs

    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path / "b"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _use_weights(str(tmp_path / "a"))
    assert [p.name for p in weights_dirs()][:2] == ["a", "b"]
    monkeypatch.delenv(WEIGHTS_DIR_ENV)
    _use_weights(str(tmp_path / "a"))  # without the variable: the given folder, then the shipped one
    assert weights_dirs() == [tmp_path / "a", DEFAULT_WEIGHTS_DIR]
