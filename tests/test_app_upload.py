"""The page's "your own model" upload (issue 29): local only, a size limit, one sentence per refusal,
nothing half-written, and the new lineup offered at once."""
from __future__ import annotations

import json
import os

import pytest
import torch

from cbam_viz.app import upload
from cbam_viz.engine.lineup import lineup_names, load_lineup
from cbam_viz.messages import UserFacingError
from cbam_viz.models import create_model
from cbam_viz.models.weights import WEIGHTS_DIR_ENV, read_manifest

pytestmark = pytest.mark.usefixtures("no_cbam_env")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A CBAM ResNet-18 of three classes saved as people do (``torch.save`` of the state dict)."""
    path = tmp_path_factory.mktemp("ckpt") / "my cbam.pth"
    torch.manual_seed(0)
    torch.save(create_model("resnet18_cbam", num_classes=3).state_dict(), path)
    return path


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """Uploads allowed; the user weights folder is the first of ``$CBAM_VIZ_WEIGHTS_DIR``."""
    folder = tmp_path / "user-weights"
    monkeypatch.setenv(upload.ALLOW_ENV, "1")
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(folder))
    return folder


def _file(path, name=None) -> dict:
    return {"path": str(path), "orig_name": name or os.path.basename(path), "meta": {"_type": "gradio.FileData"}}


def test_an_uploaded_checkpoint_becomes_a_lineup_at_once(user_dir, checkpoint, tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("tench\nchurch\ngolf ball\n")
    added = upload.add_model_view(_file(checkpoint), _file(classes), "")
    assert "**Added `my-cbam`**" in added.markdown and "resnet18_cbam" in added.markdown
    assert "classes: 3" in added.markdown and "224 px" in added.markdown
    assert added.lineups.value == "my-cbam" and "my-cbam" in added.lineups.choices
    assert "my-cbam" in lineup_names()  # every loader sees it: the dropdown, /info, the CLI
    lineup = load_lineup("my-cbam")
    (member,) = lineup.members
    assert member.arch == "resnet18_cbam" and member.classes == ("tench", "church", "golf ball")
    assert lineup.reference == "my-cbam"


@pytest.mark.parametrize("how, expected", [
    ("off", "switched off on this server"),
    ("space", "switched off on this server"),
    ("none", "Please upload a checkpoint"),
    ("too large", "at most"),
    ("bad name", "cannot be used"),
    ("not a checkpoint", "my.pth"),
])
def test_each_refusal_is_one_sentence_and_writes_nothing(user_dir, checkpoint, tmp_path, monkeypatch, how, expected):
    source, name = _file(checkpoint), ""
    if how == "off":
        monkeypatch.delenv(upload.ALLOW_ENV)
    elif how == "space":
        monkeypatch.setenv("SPACE_ID", "someone/cbam-viz")
    elif how == "none":
        source = None
    elif how == "too large":
        monkeypatch.setattr(upload, "MAX_MODEL_BYTES", 1000)
    elif how == "bad name":
        name = "../etc/passwd"
    else:
        junk = tmp_path / "my.pth"
        junk.write_text("these are not weights")
        source = _file(junk)
    with pytest.raises(UserFacingError, match=expected) as err:
        upload.add_model_view(source, None, name)
    assert "\n" not in str(err.value) and str(tmp_path) not in str(err.value)
    assert not user_dir.exists() or read_manifest(user_dir)["models"] == {}


def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(user_dir, tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "x": Payload()}, evil)
    with pytest.raises(UserFacingError, match="evil.pth was refused"):
        upload.add_model_view(_file(evil), None, "evil")
    assert not marker.exists() and (not user_dir.exists() or read_manifest(user_dir)["models"] == {})


def test_a_taken_name_and_classes_that_do_not_fit_are_refused(user_dir, checkpoint, tmp_path):
    upload.add_model_view(_file(checkpoint), None, "mine")
    before = json.loads((user_dir / "manifest.json").read_text())
    with pytest.raises(UserFacingError, match="already there; choose another name"):
        upload.add_model_view(_file(checkpoint), None, "mine")
    two = tmp_path / "two.txt"
    two.write_text("cat\ndog\n")
    with pytest.raises(UserFacingError, match="class"):
        upload.add_model_view(_file(checkpoint), _file(two), "other")
    assert json.loads((user_dir / "manifest.json").read_text()) == before  # nothing half-written
    kept = sorted(p.name for p in user_dir.iterdir() if p.suffix == ".safetensors")
    assert kept == [before["models"]["mine"]["file"]]


def test_without_a_weights_folder_set_uploads_go_to_the_user_folder_searched_first(tmp_path, monkeypatch, checkpoint):
    monkeypatch.setenv(upload.ALLOW_ENV, "1")
    monkeypatch.setenv(WEIGHTS_DIR_ENV, "")  # unset for the loaders; restored after the test
    monkeypatch.setattr(upload, "DEFAULT_USER_WEIGHTS", tmp_path / "cache" / "user-weights")
    assert upload.user_weights_dir() == tmp_path / "cache" / "user-weights"
    upload.add_model_view(_file(checkpoint), None, "cached")
    assert os.environ[WEIGHTS_DIR_ENV].split(os.pathsep)[0] == str(tmp_path / "cache" / "user-weights")
    names = lineup_names()
    assert "cached" in names and len(names) > 1  # the shipped lineups are still there


def test_the_page_event_shows_what_was_found_and_chooses_the_lineup(user_dir, checkpoint):
    import gradio as gr

    import app

    out = app.add_own_model(_file(checkpoint), None, "from-page")
    dropdown = out[app.lineup]
    assert "resnet18_cbam" in out[app.own.result] and dropdown["value"] == "from-page"
    assert "from-page" in dropdown["choices"]
    assert out[app.ui.member_cam[0]] is None and out[app.ui.current] == ""  # the last lineup's result goes
    with pytest.raises(gr.Error, match="already there"):
        app.add_own_model(_file(checkpoint), None, "from-page")
