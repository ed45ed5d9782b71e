"""A pair trained one model per session: the half, its checks, and the pair it completes."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cbam_viz import cli
from cbam_viz.training.holdout import choose_for_lineup
from cbam_viz.models.weights import WeightRecord, load_record, read_manifest, sha256_file
from tests.synthetic import make_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data") / "train", ("n001", "n002", "n003"))


def _args(dataset, tmp_path, *extra):
    return ["train", "--data", str(dataset), "--runs", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"),
            "--epochs", "2", "--batch-size", "8", "--lr", "0.02", "--sizes", "0:32", "--cache-size", "40",
            "--eval-size", "32", "--holdout", "0.25", "--ema-decay", "0.9", "--bf16", "off", "--threads", "1",
            "--name", "tiny", "--select-sizes", "32,40", *extra]


@pytest.fixture(scope="module")
def halves(dataset, tmp_path_factory):
    """The CBAM model trained and exported alone (the first session)."""
    tmp = tmp_path_factory.mktemp("first")
    assert cli.main(_args(dataset, tmp, "--arch", "resnet18_cbam", "--export", str(tmp / "halves"))) == 0
    return tmp / "halves"


def _same_tensors(path_a, path_b) -> bool:
    a, b = load_file(path_a), load_file(path_b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_one_model_alone_exports_both_weight_kinds_and_no_pair(halves):
    manifest = read_manifest(halves)
    assert manifest["pairs"] == {}
    assert set(manifest["models"]) == {"resnet18_cbam_tiny_raw", "resnet18_cbam_tiny_ema"}
    records = {n: WeightRecord(**r) for n, r in manifest["models"].items()}
    assert records["resnet18_cbam_tiny_raw"].sha256 != records["resnet18_cbam_tiny_ema"].sha256
    for name, rec in records.items():
        assert rec.training["half"] == name.rsplit("_", 1)[1]
        assert set(rec.training["selection"]["scores"]["scores"]) == {"raw", "ema"}  # both, for the later choice
        assert len(rec.training["holdout_digest"]) == 64
        load_record(rec, halves)


def test_the_second_session_completes_the_pair_as_one_session_would(dataset, halves, tmp_path, capsys):
    """Pairing a half gives the same choice and the same files as training both models in one run."""
    two = tmp_path / "two-sessions"
    assert cli.main(_args(dataset, tmp_path, "--arch", "resnet18", "--export", str(two), "--pair-with", str(halves))) == 0
    assert "copied resnet18_cbam_tiny_" in capsys.readouterr().out
    half = read_manifest(halves)["models"]
    one = tmp_path / "one-session"
    assert cli.main(_args(dataset, tmp_path / "both", "--export", str(one))) == 0
    got, want = read_manifest(two), read_manifest(one)
    assert got["pairs"] == want["pairs"] == {"resnet18-tiny": {"baseline": "resnet18_tiny",
                                                              "cbam": "resnet18_cbam_tiny", "default": True}}
    for name in ("resnet18_tiny", "resnet18_cbam_tiny"):
        a, b = WeightRecord(**got["models"][name]), WeightRecord(**want["models"][name])
        assert sha256_file(two / a.file) == a.sha256
        assert _same_tensors(two / a.file, one / b.file) and a.sha256 == b.sha256  # the header order is fixed too
        assert a.input_size == b.input_size and a.training["weights"] == b.training["weights"]
        assert a.training["selection"] == b.training["selection"]
        assert "half" not in a.training
        load_record(a, two)
    cbam = got["models"]["resnet18_cbam_tiny"]
    assert cbam["sha256"] == half[f"resnet18_cbam_tiny_{cbam['training']['weights']}"]["sha256"]  # a copy
    scores = {n: got["models"][n]["training"]["selection"]["scores"] for n in ("resnet18_tiny", "resnet18_cbam_tiny")}
    choice = choose_for_lineup(scores)
    assert got["models"]["resnet18_cbam_tiny"]["input_size"] == choice["input_size"]


def test_a_half_of_another_recipe_is_refused_before_training(dataset, halves, tmp_path, capsys):
    out = tmp_path / "weights"
    code = cli.main(_args(dataset, tmp_path, "--arch", "resnet18", "--seed", "1", "--export", str(out),
                          "--pair-with", str(halves)))
    assert code == 2 and "seed: 0 -> 1" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not out.exists()  # nothing trained, nothing written


def test_a_half_that_held_out_other_files_is_refused_and_nothing_is_written(dataset, halves, tmp_path, capsys):
    changed = tmp_path / "changed"
    changed.mkdir()
    manifest = read_manifest(halves)
    for rec in manifest["models"].values():
        rec["training"]["holdout_digest"] = "0" * 64
        (changed / rec["file"]).write_bytes((halves / rec["file"]).read_bytes())
    (changed / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "weights"
    code = cli.main(_args(dataset, tmp_path, "--arch", "resnet18", "--export", str(out), "--pair-with", str(changed)))
    assert code == 2 and "held out other training files" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("problem", ["no export", "no half", "same arch"])
def test_pair_with_without_a_partner_is_refused(dataset, halves, tmp_path, capsys, problem):
    extra = {"no export": ["--arch", "resnet18", "--pair-with", str(halves)],
             "no half": ["--arch", "resnet18", "--export", str(tmp_path / "w"), "--pair-with", str(tmp_path)],
             "same arch": ["--arch", "resnet18_cbam", "--export", str(tmp_path / "w"), "--pair-with", str(halves)]}
    assert cli.main(_args(dataset, tmp_path, *extra[problem])) == 2
    err = capsys.readouterr().err
    assert {"no export": "needs --export", "no half": "other than resnet18; found none",
            "same arch": "other than resnet18_cbam; found none"}[problem] in err
    assert not (tmp_path / "runs").exists()


def test_a_run_without_weight_average_is_a_half_of_raw_weights_only(dataset, tmp_path, capsys):
    """--ema-decay 0 leaves one weight kind: still a half (it was exported as a lone model, unpairable)."""
    no_ema = ("--ema-decay", "0")
    halves = tmp_path / "halves"
    assert cli.main(_args(dataset, tmp_path / "first", "--arch", "resnet18_cbam", *no_ema, "--export", str(halves))) == 0
    models = read_manifest(halves)["models"]
    assert set(models) == {"resnet18_cbam_tiny_raw"} and models["resnet18_cbam_tiny_raw"]["training"]["half"] == "raw"
    out = tmp_path / "pair"
    assert cli.main(_args(dataset, tmp_path / "second", "--arch", "resnet18", *no_ema, "--export", str(out),
                          "--pair-with", str(halves))) == 0
    got = read_manifest(out)
    assert got["pairs"]["resnet18-tiny"]["cbam"] == "resnet18_cbam_tiny"
    assert {got["models"][n]["training"]["weights"] for n in ("resnet18_tiny", "resnet18_cbam_tiny")} == {"raw"}
    assert got["models"]["resnet18_cbam_tiny"]["sha256"] == models["resnet18_cbam_tiny_raw"]["sha256"]


# ------------------------------------------------------------------ final pairs (--holdout 0 --settings-from)

FINAL = ("--holdout", "0")


@pytest.fixture(scope="module")
def chosen(dataset, tmp_path_factory):
    """A pair trained with a held-out split whose choice is set to EMA weights at 40 px.

    The choice is written into the manifest (as the pair rule could have made it), so that a final
    run that ignored it (raw weights at the eval size, 32 px) could not pass for one that carried it.
    """
    tmp = tmp_path_factory.mktemp("chosen")
    assert cli.main(_args(dataset, tmp, "--export", str(tmp / "weights"))) == 0
    manifest = read_manifest(tmp / "weights")
    for rec in manifest["models"].values():
        rec["input_size"] = 40
        rec["training"]["selection"].update(weights="ema", input_size=40)
    (tmp / "weights" / "manifest.json").write_text(json.dumps(manifest))
    return tmp / "weights"


def test_a_final_pair_trains_on_every_file_and_ships_with_the_carried_choice(dataset, chosen, tmp_path, capsys):
    out = tmp_path / "final"
    assert cli.main(_args(dataset, tmp_path, *FINAL, "--settings-from", str(chosen), "--export", str(out))) == 0
    assert "ema weights at 40 px" in capsys.readouterr().out
    got, source = read_manifest(out), read_manifest(chosen)
    assert got["pairs"]["resnet18-tiny"] == {"baseline": "resnet18_tiny", "cbam": "resnet18_cbam_tiny", "default": True}
    for name in ("resnet18_tiny", "resnet18_cbam_tiny"):
        rec = WeightRecord(**got["models"][name])
        assert rec.input_size == 40 and rec.training["weights"] == "ema"
        assert rec.training["holdout_images"] == 0 and rec.recipe["holdout"] == 0
        carried = rec.training["selection"]["carried_from"]
        assert carried["pair"] == "resnet18-tiny" and carried["holdout"] == 0.25
        assert carried["records"][name] == source["models"][name]["sha256"]
        assert carried["holdout_top1"] == source["models"][name]["training"]["selection"]["holdout_top1"]
        # nothing was scored (nothing held out); the earlier models' scores stay under carried_from
        assert not {"scores", "holdout_top1", "mean_holdout_top1"} & set(rec.training["selection"])
        assert rec.sha256 != source["models"][name]["sha256"]  # retrained, not copied
        load_record(rec, out)


def test_a_final_pair_trained_one_half_per_session_equals_one_trained_at_once(dataset, chosen, tmp_path, capsys):
    halves = tmp_path / "halves"
    assert cli.main(_args(dataset, tmp_path / "first", "--arch", "resnet18_cbam", *FINAL,
                          "--settings-from", str(chosen), "--export", str(halves))) == 0
    models = read_manifest(halves)["models"]
    assert set(models) == {"resnet18_cbam_tiny_ema"}  # only the carried weight kind: nothing to choose later
    assert models["resnet18_cbam_tiny_ema"]["training"]["settings_from"]["input_size"] == 40
    two = tmp_path / "two"
    assert cli.main(_args(dataset, tmp_path / "second", "--arch", "resnet18", *FINAL, "--settings-from", str(chosen),
                          "--export", str(two), "--pair-with", str(halves))) == 0
    one = tmp_path / "one"
    assert cli.main(_args(dataset, tmp_path / "both", *FINAL, "--settings-from", str(chosen), "--export", str(one))) == 0
    got, want = read_manifest(two), read_manifest(one)
    assert got["pairs"] == want["pairs"]
    for name in ("resnet18_tiny", "resnet18_cbam_tiny"):
        a, b = got["models"][name], want["models"][name]
        assert a["sha256"] == b["sha256"] and a["input_size"] == b["input_size"] == 40
        assert a["training"]["selection"] == b["training"]["selection"]
        assert set(a["training"]) == set(b["training"])  # a copied half records what a trained run does


@pytest.fixture(scope="module")
def final_half(dataset, chosen, tmp_path_factory):
    """The CBAM model of a final pair, exported alone with the settings of ``chosen``."""
    tmp = tmp_path_factory.mktemp("final-half")
    assert cli.main(_args(dataset, tmp, "--arch", "resnet18_cbam", *FINAL, "--settings-from", str(chosen),
                          "--export", str(tmp / "half"))) == 0
    return tmp / "half"


def _edited_copy(folder, to, edit):
    """A copy of a weights folder whose manifest ``edit(manifest)`` changed."""
    to.mkdir()
    manifest = read_manifest(folder)
    for rec in manifest["models"].values():
        (to / rec["file"]).write_bytes((folder / rec["file"]).read_bytes())
    edit(manifest)
    (to / "manifest.json").write_text(json.dumps(manifest))
    return to


def _resettle(manifest):  # the source pair re-exported between the two sessions
    for rec in manifest["models"].values():
        rec["training"]["settings_from"]["carried_from"]["records"]["resnet18_tiny"] = "f" * 64


def _unhold(manifest):  # a source that is itself a final pair
    for rec in manifest["models"].values():
        rec["recipe"]["holdout"] = 0.0


PROBLEMS = {
    "holds files out": (lambda c, h, t: ["--settings-from", str(c)],
                        "is for a final run on every training file (--holdout 0)"),
    "other recipe": (lambda c, h, t: [*FINAL, "--seed", "1", "--settings-from", str(c)],
                     "(seed: 0 -> 1); only --holdout may differ"),
    "no export": (lambda c, h, t: [*FINAL, "--settings-from", str(c), "--no-export"], "--settings-from needs --export"),
    "other models": (lambda c, h, t: ["--arch", "resnet34", *FINAL, "--settings-from", str(c)],
                     "is resnet18 and resnet18_cbam, not resnet34"),
    "source chose nothing": (lambda c, h, t: [*FINAL, "--settings-from", str(_edited_copy(c, t / "s", _unhold))],
                             "held no files out, so it made no held-out choice"),
    "run without the half's settings": (lambda c, h, t: ["--arch", "resnet18", *FINAL, "--pair-with", str(h)],
                                        "(the half: --settings-from, this run: none)"),
    "half with other settings": (
        lambda c, h, t: ["--arch", "resnet18", *FINAL, "--settings-from", str(c),
                         "--pair-with", str(_edited_copy(h, t / "h", _resettle))],
        f"carried_from.records.resnet18_tiny: '{'f' * 64}' -> "),
}


@pytest.mark.parametrize("problem", PROBLEMS)
def test_a_final_run_that_cannot_carry_the_choice_is_refused_before_training(dataset, chosen, final_half, tmp_path,
                                                                             capsys, problem):
    out = tmp_path / "w"
    extra, message = PROBLEMS[problem]
    args = extra(chosen, final_half, tmp_path)
    export = [] if "--no-export" in args else ["--export", str(out)]
    assert cli.main(_args(dataset, tmp_path, *[a for a in args if a != "--no-export"], *export)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not out.exists()


def _finalise(manifest):  # the chosen pair, as a final pair that carried its own choice would record it
    for rec in manifest["models"].values():
        selection = rec["training"]["selection"]
        carried = {"pair": "resnet18-tiny", "records": {n: "0" * 64 for n in manifest["models"]}, "holdout": 0.25,
                   "holdout_images": 6, "holdout_top1": selection.get("holdout_top1")}
        rec["training"]["selection"] = {"weights": selection["weights"], "input_size": selection["input_size"],
                                        "rule": "carried over", "carried_from": carried}
        rec["recipe"]["holdout"] = 0.0


@pytest.mark.parametrize("arch", ["resnet18_se", "resnet18_bam"])
def test_a_new_member_takes_the_final_pairs_carried_choice_and_ships_whole(dataset, chosen, tmp_path, capsys, arch):
    """SE and BAM beside a final pair: the recipe and the (weights, size) of the pair, one record each."""
    final = _edited_copy(chosen, tmp_path / "final", _finalise)
    out = tmp_path / "member"
    assert cli.main(_args(dataset, tmp_path, "--arch", arch, *FINAL, "--settings-from", str(final),
                          "--export", str(out))) == 0
    assert "show it beside the pair with add-lineup" in capsys.readouterr().out
    models = read_manifest(out)["models"]
    assert set(models) == {f"{arch}_tiny"}  # whole, not a half waiting for a partner
    rec = WeightRecord(**models[f"{arch}_tiny"])
    assert rec.input_size == 40 and rec.training["weights"] == "ema" and rec.recipe["holdout"] == 0
    carried = rec.training["selection"]["carried_from"]
    assert carried["pair"] == "resnet18-tiny" and carried["via"]["holdout_images"] == 6
    assert f"{arch}: same backbone, other attention" in rec.training["selection"]["rule"]
    load_record(rec, out)


def test_a_new_member_of_another_depth_is_refused(dataset, chosen, tmp_path, capsys):
    final = _edited_copy(chosen, tmp_path / "final", _finalise)
    assert cli.main(_args(dataset, tmp_path, "--arch", "resnet34_se", *FINAL, "--settings-from", str(final),
                          "--export", str(tmp_path / "w"))) == 2
    assert "is resnet18 and resnet18_cbam, not resnet34_se" in capsys.readouterr().err


@pytest.mark.parametrize("archs, members, pair", [
    (["resnet18_cbam", "resnet18"], ["resnet18_tiny", "resnet18_cbam_tiny"], True),
    (["resnet18_cbam", "resnet18_se", "resnet18"], ["resnet18_tiny", "resnet18_cbam_tiny", "resnet18_se_tiny"], False),
    (["resnet18_se", "resnet18_cbam"], ["resnet18_se_tiny", "resnet18_cbam_tiny"], False),
])
def test_a_lineup_is_written_with_the_plain_model_as_its_reference(tmp_path, archs, members, pair):
    """Models exported together become the default lineup, the plain ResNet first as its reference
    (else the first model); a plain ResNet and its CBAM twin are also the pair older readers know."""
    from cbam_viz.engine.lineup import default_lineup_name, lineup_specs
    from cbam_viz.models.weights import update_manifest
    from cbam_viz.training.export import write_lineup

    update_manifest(tmp_path, lineup=("older", {"members": ["x"], "reference": "x", "default": True}))
    line = write_lineup(tmp_path, archs, name="tiny")
    name = f"{members[0].removesuffix('_tiny')}-tiny"
    manifest = read_manifest(tmp_path)
    assert manifest["lineups"][name] == {"members": members, "reference": members[0], "default": True}
    assert manifest["lineups"]["older"]["default"] is False and default_lineup_name(tmp_path) == name
    assert lineup_specs(tmp_path)[name][1]["members"] == members
    assert (name in manifest["pairs"]) == pair and name in line and "reference " + members[0] in line
    if pair:
        assert manifest["pairs"][name] == {"baseline": members[0], "cbam": members[1], "default": True}
