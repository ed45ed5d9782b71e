"""The research commands over a lineup of three through the CLI: a plain ResNet-18 (the reference,
no gates), an SE and a CBAM member; every member measured, the plain one skipped where it has
nothing to measure, ``--pair`` still naming the lineup."""
from __future__ import annotations

import json

import pytest

import cbam_viz.engine.lineup
from cbam_viz.cli import main
from tests.research_lineups import make_lineup
from tests.synthetic import make_image_folder

pytestmark = pytest.mark.usefixtures("no_cbam_env", "one_thread")

REF, SE, CBAM = "tiny resnet18", "tiny resnet18_se", "tiny resnet18_cbam"


@pytest.fixture()
def three(monkeypatch):
    """The lineup the commands load, and the names they asked for."""
    lineup, asked = make_lineup(), []
    monkeypatch.setattr(cbam_viz.engine.lineup, "load_lineup", lambda name=None, **kw: asked.append(name) or lineup)
    return lineup, asked


@pytest.fixture()
def data(tmp_path):
    return make_image_folder(tmp_path / "val", ["c0", "c1", "c2"], per_class=1, size=(36, 30))


def test_ablate_gates_ablates_every_gated_member(three, data, tmp_path, capsys):
    lineup, asked = three
    out = tmp_path / "ablation"
    assert main(["ablate-gates", "--data", str(data), "--lineup", "tiny-three", "--out", str(out),
                 "--batch-size", "3", "--no-progress"]) == 0
    assert asked == ["tiny-three"] and "untrained" in capsys.readouterr().err
    doc = json.loads((out / "gate_ablation.json").read_text())
    assert doc["skipped"] == [REF] and list(doc["models"]) == [SE, CBAM] and doc["reference"] == REF
    assert {r["gate"] for r in doc["models"][SE]["rows"]} == {"channel"}  # SE: a channel gate only
    assert {r["gate"] for r in doc["models"][CBAM]["rows"]} == {"channel", "spatial", "both"}
    md = (out / "gate_ablation.md").read_text()
    assert f"### {SE}" in md and f"### {CBAM}" in md and f"No gate to ablate: {REF}." in md


def test_channel_profiles_writes_a_folder_per_member_with_channel_gates(three, data, tmp_path):
    out = tmp_path / "profiles"
    assert main(["channel-profiles", "--data", str(data), "--pair", "tiny-three", "--out", str(out),
                 "--batch-size", "3", "--no-progress"]) == 0
    assert three[1] == ["tiny-three"]  # --pair: the hidden alias of --lineup
    doc = json.loads((out / "channel_profiles.json").read_text())
    assert doc["members"] == [SE, CBAM] and doc["skipped"] == [REF]
    for name in (SE, CBAM):
        member = json.loads((out / doc["folders"][name] / "channel_profiles.json").read_text())
        assert member["model"] == name and member["n"] == 3 and "layer4.1" in member["blocks"]
    assert "| layer1.0 |" in (out / "channel_profiles.md").read_text()


def test_a_lineups_profiles_replace_one_models_left_in_the_folder(three, data, tmp_path):
    """A folder that held one model's profiles (the layout before lineups) and is overwritten by a
    lineup's run shows the lineup: the old ``profiles.npz`` would shadow the new index."""
    from cbam_viz.research.profile_files import load_lineup_profiles

    out = tmp_path / "profiles"
    out.mkdir()
    (out / "profiles.npz").write_bytes(b"old single-model profiles")
    (out / "channel_profiles.png").write_bytes(b"old figure")
    assert main(["channel-profiles", "--data", str(data), "--out", str(out), "--batch-size", "3", "--no-progress",
                 "--overwrite"]) == 0
    assert not (out / "profiles.npz").exists() and not (out / "channel_profiles.png").exists()
    assert list(load_lineup_profiles(out)) == [SE, CBAM]


def test_sanity_check_runs_every_member_and_compares_each_with_the_reference(three, data, tmp_path):
    out = tmp_path / "sanity"
    assert main(["sanity-check", "--data", str(data), "--out", str(out), "--methods", "gradcam",
                 "--max-images", "3", "--batch-size", "3", "--no-progress"]) == 0
    assert three[1] == [None]  # no --lineup: the default one
    doc = json.loads((out / "sanity.json").read_text())
    assert list(doc["models"]) == [REF, SE, CBAM] and list(doc["vs_reference"]) == [SE, CBAM]
    assert all(m["n"] == 3 for m in doc["models"].values())
    assert (out / "sanity.md").read_text().count("| re-initialised up to |") == 3


def test_help_shows_lineup_and_hides_pair(capsys):
    with pytest.raises(SystemExit):
        main(["ablate-gates", "--help"])
    text = capsys.readouterr().out
    assert "--lineup" in text and "--pair" not in text
