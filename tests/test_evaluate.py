"""``evaluate``: accuracy of the shipped files, decoded the way the app decodes uploads."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cbam_viz.cli import main
from cbam_viz.training.evaluate import ClassMismatchError, evaluate_record, format_report, resolve_models
from cbam_viz.models import create_model
from cbam_viz.engine.preprocess import open_image, to_model_batch
from cbam_viz.models.weights import ChecksumError, WeightRecord, read_manifest, save_safetensors, update_manifest
from tests.synthetic import make_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ("n01", "n02", "n03")
NAMES = {"n01": "red thing", "n02": "green thing", "n03": "blue thing"}


@pytest.fixture()
def setup(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "weights"
    for arch in ("resnet18", "resnet18_cbam"):
        model = create_model(arch, num_classes=3)
        with torch.no_grad():  # make the (untrained) predictions depend on the colour
            model.fc.bias.copy_(torch.tensor([0.0, 0.1, -0.1]))
        digest = save_safetensors(model, weights / f"{arch}_tiny.safetensors")
        update_manifest(weights, record=WeightRecord(
            name=f"{arch}_tiny", file=f"{arch}_tiny.safetensors", arch=arch, sha256=digest,
            num_params=sum(p.numel() for p in model.parameters()),
            classes=[{"id": c, "name": NAMES[c]} for c in CLASSES],
            mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], input_size=32,
            metrics={"val_top1": 0.5}))
    update_manifest(weights, pair=("tiny", {"baseline": "resnet18_tiny", "cbam": "resnet18_cbam_tiny"}))
    data = make_image_folder(tmp_path / "val", CLASSES, per_class=4)
    return weights, data


def _add_member(weights, arch, bias):
    """Another tiny record in ``weights`` (its predictions depend on ``bias``)."""
    torch.manual_seed(1)
    model = create_model(arch, num_classes=3)
    with torch.no_grad():
        model.fc.bias.copy_(torch.tensor(bias))
    digest = save_safetensors(model, weights / f"{arch}_tiny.safetensors")
    update_manifest(weights, record=WeightRecord(
        name=f"{arch}_tiny", file=f"{arch}_tiny.safetensors", arch=arch, sha256=digest,
        num_params=sum(p.numel() for p in model.parameters()), classes=[{"id": c, "name": NAMES[c]} for c in CLASSES],
        mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], input_size=32))
    return f"{arch}_tiny"


@pytest.fixture()
def trio(setup):
    """A lineup of three: the plain ResNet (no gates, the reference), SE and CBAM."""
    weights, data = setup
    se = _add_member(weights, "resnet18_se", [0.2, -0.1, 0.0])
    update_manifest(weights, lineup=("trio", {"members": ["resnet18_tiny", se, "resnet18_cbam_tiny"],
                                              "reference": "resnet18_tiny"}))
    update_manifest(weights, lineup=("trio-last", {"members": ["resnet18_cbam_tiny", se, "resnet18_tiny"],
                                                   "reference": "resnet18_tiny"}))
    return weights, data


def _record(weights, name="resnet18_tiny"):
    return WeightRecord(**read_manifest(weights)["models"][name])


def test_metrics_match_a_per_image_loop_through_the_app_path(setup):
    weights, data = setup
    rec = _record(weights)
    res = evaluate_record(rec, data, weights_dir=weights, batch_size=5, progress=False)

    from cbam_viz.models.weights import load_record

    model = load_record(rec, weights)
    conf = np.zeros((3, 3), dtype=int)
    for y, cls in enumerate(CLASSES):
        for f in sorted((data / cls).iterdir()):
            x = to_model_batch([open_image(f)], 32, rec.mean, rec.std)
            assert x.dtype == torch.float32
            with torch.no_grad():
                conf[y, int(model(x).argmax())] += 1
    assert res.confusion == conf.tolist()
    assert res.n == 12 and np.sum(res.confusion) == 12
    assert res.top1 == pytest.approx(np.trace(conf) / 12)
    assert res.top5 == 1.0  # only three classes
    for i, cls in enumerate(CLASSES):
        assert res.per_class[cls] == pytest.approx(conf[i, i] / conf[i].sum())
    assert res.class_names == tuple(NAMES[c] for c in CLASSES)


def test_class_folders_must_match_record(setup, tmp_path):
    weights, data = setup
    rec = _record(weights)
    shutil.rmtree(data / "n03")
    (data / "n09").mkdir()
    Image.new("RGB", (8, 8)).save(data / "n09" / "x.png")
    with pytest.raises(ClassMismatchError) as err:
        evaluate_record(rec, data, weights_dir=weights, progress=False)
    msg = str(err.value)
    assert "n03" in msg and "n09" in msg and rec.name in msg


def test_folder_order_does_not_matter_ids_do(setup):
    weights, data = setup
    rec = _record(weights)
    shuffled = WeightRecord(**{**rec.to_json(), "classes": list(reversed(rec.classes))})
    # same file, classes listed in another order: confusion follows the record's order
    res = evaluate_record(rec, data, weights_dir=weights, progress=False)
    res2 = evaluate_record(shuffled, data, weights_dir=weights, progress=False)
    assert res2.class_ids == tuple(reversed(CLASSES))
    # output i now means folder CLASSES[2 - i]: the true-class rows flip, the outputs do not move
    assert res2.confusion == res.confusion[::-1]
    assert res2.n == res.n


def test_corrupt_shipped_file_is_refused(setup):
    weights, data = setup
    rec = _record(weights)
    path = weights / rec.file
    blob = bytearray(path.read_bytes())
    blob[100] ^= 1
    path.write_bytes(bytes(blob))
    with pytest.raises(ChecksumError, match=rec.file):
        evaluate_record(rec, data, weights_dir=weights, progress=False)


def test_resolve_models(setup, tmp_path):
    weights, _ = setup
    assert [r.name for r in resolve_models(weights, lineup="tiny")] == ["resnet18_tiny", "resnet18_cbam_tiny"]
    assert [r.name for r in resolve_models(weights, model="resnet18_tiny")] == ["resnet18_tiny"]
    with pytest.raises(KeyError, match="resnet18_tiny"):
        resolve_models(weights, model="nope")
    with pytest.raises(KeyError, match="tiny"):
        resolve_models(weights, lineup="nope")
    with pytest.raises(FileNotFoundError, match="manifest"):
        resolve_models(tmp_path / "empty", model="x")


def test_cli_pair_writes_json_and_updates_manifest(setup, tmp_path, capsys):
    weights, data = setup
    out = tmp_path / "res" / "eval.json"
    rc = main(["evaluate", "--weights", str(weights), "--pair", "tiny", "--data", str(data),
               "--out", str(out), "--update-manifest", "--no-progress", "--batch-size", "7"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "resnet18_tiny" in text and "resnet18_cbam_tiny" in text and "red thing" in text and "top-1" in text
    doc = json.loads(out.read_text())
    assert doc["lineup"] == "tiny" and doc["reference"] == "resnet18_tiny"  # --pair: the hidden alias of --lineup
    results = doc["results"]
    assert set(results) == {"resnet18_tiny", "resnet18_cbam_tiny"}
    models = read_manifest(weights)["models"]
    for name, res in results.items():
        m = models[name]["metrics"]
        assert m["val_top1"] == res["top1"] and m["val_top5"] == res["top5"]
        assert m["val_per_class"] == res["per_class"] and m["val_confusion"] == res["confusion"]
        assert m["val_n"] == 12
        assert m["eval_command"].startswith("python -m cbam_viz evaluate --weights")
        assert "--lineup tiny" in m["eval_command"]
    # the sha256 and the rest of the record are untouched, so the file still loads
    from cbam_viz.models.weights import load_record

    load_record(_record(weights, "resnet18_cbam_tiny"), weights)


def test_cli_error_is_one_line(setup, tmp_path, capsys):
    weights, data = setup
    rc = main(["evaluate", "--weights", str(weights), "--model", "nope", "--data", str(data), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "nope" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["evaluate", "--weights", str(weights), "--model", "a", "--pair", "b", "--data", str(data)])


def test_format_report_lists_every_class(setup):
    weights, data = setup
    res = evaluate_record(_record(weights), data, weights_dir=weights, progress=False)
    text = format_report([res])
    for name in NAMES.values():
        assert name in text
    assert "confusion" in text


def test_cli_outside_the_repository_honours_the_weights_env(setup, tmp_path, monkeypatch, capsys):
    """Run from another folder with no --weights, ``evaluate`` reads $CBAM_VIZ_WEIGHTS_DIR (the one
    default every loader uses), not a ``weights/`` relative to the current directory."""
    from cbam_viz.models.weights import WEIGHTS_DIR_ENV, resolve_weights_dir

    weights, data = setup
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(weights))
    assert resolve_weights_dir() == weights
    assert main(["evaluate", "--pair", "tiny", "--data", str(data), "--no-progress"]) == 0
    assert "resnet18_cbam_tiny" in capsys.readouterr().out
    monkeypatch.delenv(WEIGHTS_DIR_ENV)
    assert resolve_weights_dir().name == "weights" and resolve_weights_dir().is_absolute()


def test_paired_difference_counts_the_discordant_images():
    """McNemar's exact test and a paired bootstrap on per-image outcomes (known answer)."""
    from cbam_viz.training.compare import paired_difference
    from cbam_viz.training.evaluate import EvalResult

    def result(correct, name):
        return EvalResult(name=name, arch="a", data_dir="d", top1=sum(correct) / len(correct), top5=1.0,
                          per_class={}, confusion=[], n=len(correct), class_ids=(), class_names=(), seconds=0.0,
                          correct=tuple(correct))

    base = result([True] * 80 + [False] * 20, "plain")
    cbam = result([True] * 78 + [False] * 2 + [True] * 10 + [False] * 10, "gated")  # gated alone: 10, plain alone: 2
    d = paired_difference(base, cbam, n_boot=2000)
    assert d["difference"] == pytest.approx(0.08)
    assert d["only_member_right"] == 10 and d["only_reference_right"] == 2
    assert d["mcnemar_p"] == pytest.approx(2 * sum(__import__("math").comb(12, i) for i in range(3)) / 2 ** 12)
    assert d["ci95"][0] < 0.08 < d["ci95"][1] and d["ci95"][0] > 0  # 10 vs 2 discordant: clearly positive
    same = paired_difference(base, base, n_boot=100)
    assert same["difference"] == 0 and same["mcnemar_p"] == 1.0


def test_cli_pair_reports_the_paired_difference_and_the_flip_average(setup, tmp_path, capsys):
    weights, data = setup
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--weights", str(weights), "--lineup", "tiny", "--data", str(data), "--out", str(out),
                 "--no-progress", "--hflip", "--update-manifest"]) == 0
    assert "resnet18_cbam_tiny - resnet18_tiny top-1" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert set(doc["results"]) == {"resnet18_tiny", "resnet18_cbam_tiny"} and doc["results"]["resnet18_tiny"]["hflip"]
    metrics = read_manifest(weights)["models"]["resnet18_tiny"]["metrics"]
    assert metrics["val_top1"] == 0.5  # the plain figure is kept; the flip average sits beside it
    assert "val_hflip_top1" in metrics and "--hflip" in metrics["hflip_eval_command"]
    member = read_manifest(weights)["models"]["resnet18_cbam_tiny"]["metrics"]
    assert member["val_hflip_paired_difference"]["n"] == 12
    assert member["val_hflip_paired_difference"]["reference"] == "resnet18_tiny"


def test_model_card_command_prints_what_evaluate_stored_without_loading_weights(setup, tmp_path, capsys):
    """The README's card comes from the manifest: after `evaluate --update-manifest` it carries the
    paired difference; the weights files are not read (removed here), only the records."""
    weights, data = setup
    assert main(["evaluate", "--weights", str(weights), "--lineup", "tiny", "--data", str(data), "--no-progress",
                 "--update-manifest"]) == 0
    for f in weights.glob("*.safetensors"):
        f.unlink()
    capsys.readouterr()
    out = tmp_path / "card.md"
    assert main(["model-card", "--weights", str(weights), "--out", str(out)]) == 0  # the only lineup is the default
    card = out.read_text()
    top1 = read_manifest(weights)["models"]["resnet18_tiny"]["metrics"]["val_top1"]
    assert card.startswith("### Lineup `tiny`: resnet18 | resnet18_cbam")
    assert f"| val top-1 (12 images) | **{100 * top1:.2f} %** |" in card
    assert "**Paired difference against `resnet18_tiny` on val**" in card and "on the same 12 images" in card
    assert "| red thing |" in card  # per-class rows by class name
    assert main(["model-card", "--weights", str(weights), "--pair", "nope"]) == 2
    assert "known: tiny" in capsys.readouterr().err


def test_a_lineup_of_three_compares_every_member_with_the_reference(trio, tmp_path, capsys):
    """Every member is measured and each non-reference member is compared with the reference
    (the plain ResNet, which has no gates): the JSON, the Markdown and the records agree with a
    direct evaluation of each record."""
    weights, data = trio
    out, md = tmp_path / "eval.json", tmp_path / "eval.md"
    assert main(["evaluate", "--weights", str(weights), "--lineup", "trio", "--data", str(data), "--out", str(out),
                 "--markdown", str(md), "--no-progress", "--update-manifest"]) == 0
    text = capsys.readouterr().out
    assert "resnet18_se_tiny - resnet18_tiny top-1" in text and "resnet18_cbam_tiny - resnet18_tiny top-1" in text
    doc = json.loads(out.read_text())
    members = ["resnet18_tiny", "resnet18_se_tiny", "resnet18_cbam_tiny"]
    assert doc["members"] == members and doc["reference"] == "resnet18_tiny" and doc["lineup"] == "trio"
    assert list(doc["differences"]) == members[1:]
    correct = {}
    for name in members:
        direct = evaluate_record(_record(weights, name), data, weights_dir=weights, progress=False)
        correct[name] = np.array(direct.correct, dtype=float)
        assert doc["results"][name]["top1"] == direct.top1 and doc["results"][name]["top5"] == direct.top5
    for name in members[1:]:
        d = doc["differences"][name]
        assert (d["member"], d["reference"], d["n"]) == (name, "resnet18_tiny", 12)
        assert d["difference"] == pytest.approx(correct[name].mean() - correct["resnet18_tiny"].mean())
        assert d["only_member_right"] == int(((correct[name] == 1) & (correct["resnet18_tiny"] == 0)).sum())
        assert d["only_reference_right"] == int(((correct[name] == 0) & (correct["resnet18_tiny"] == 1)).sum())
        assert read_manifest(weights)["models"][name]["metrics"]["val_paired_difference"] == d
    assert "val_paired_difference" not in read_manifest(weights)["models"]["resnet18_tiny"]["metrics"]
    report = md.read_text()
    assert report.startswith("# Evaluation of lineup `trio`")
    assert "| `resnet18_tiny` (reference) | resnet18 |" in report
    se = doc["differences"]["resnet18_se_tiny"]
    assert f"| `resnet18_se_tiny` | {100 * se['difference']:+.2f} |" in report
    assert "| red thing |" in report and report.count("| `resnet18_") >= 5  # members, differences
    # the reference is whichever member the lineup names, not the first one shown
    assert main(["evaluate", "--weights", str(weights), "--lineup", "trio-last", "--data", str(data), "--out",
                 str(out), "--no-progress", "--overwrite"]) == 0
    last = json.loads(out.read_text())
    assert last["members"] == members[::-1] and last["reference"] == "resnet18_tiny"
    assert last["differences"] == {n: doc["differences"][n] for n in members[:0:-1]}


def test_a_single_model_has_no_comparison_and_an_existing_markdown_is_kept(setup, tmp_path, capsys):
    weights, data = setup
    md = tmp_path / "eval.md"
    assert main(["evaluate", "--weights", str(weights), "--model", "resnet18_cbam_tiny", "--data", str(data),
                 "--markdown", str(md), "--no-progress"]) == 0
    report = md.read_text()
    assert report.startswith("# Evaluation of model `resnet18_cbam_tiny`") and "reference" not in report
    assert "top-1" in capsys.readouterr().out
    md.write_text("mine")
    assert main(["evaluate", "--weights", str(weights), "--model", "resnet18_cbam_tiny", "--data", str(data),
                 "--markdown", str(md), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err and md.read_text() == "mine"
    assert main(["evaluate", "--weights", str(weights), "--model", "resnet18_cbam_tiny", "--data", str(data),
                 "--markdown", str(md), "--no-progress", "--overwrite"]) == 0
    assert md.read_text().startswith("# Evaluation")


def test_without_a_name_the_default_lineup_is_evaluated(trio, tmp_path, capsys):
    weights, data = trio
    update_manifest(weights, lineup=("trio", {"members": ["resnet18_tiny", "resnet18_se_tiny", "resnet18_cbam_tiny"],
                                              "reference": "resnet18_tiny", "default": True}))
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--weights", str(weights), "--data", str(data), "--out", str(out), "--no-progress"]) == 0
    assert json.loads(out.read_text())["lineup"] == "trio"
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", "--weights", str(tmp_path / "empty"), "--data", str(data), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no lineup" in err and "--model" in err and "Traceback" not in err


def test_compare_tests_two_members_against_each_other_on_the_same_images(trio, tmp_path, capsys):
    """``--compare CBAM:SE`` answers "does the spatial gate add anything over channel attention?"
    with the same paired test as the reference's, from the same per-image outcomes."""
    weights, data = trio
    out, md = tmp_path / "eval.json", tmp_path / "eval.md"
    cbam, se = "resnet18_cbam_tiny", "resnet18_se_tiny"
    assert main(["evaluate", "--weights", str(weights), "--lineup", "trio", "--data", str(data), "--out", str(out),
                 "--markdown", str(md), "--no-progress", "--compare", f"{cbam}:{se}"]) == 0
    assert f"{cbam} - {se} top-1" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    (d,) = doc["comparisons"]
    a = np.array(evaluate_record(_record(weights, cbam), data, weights_dir=weights, progress=False).correct, float)
    b = np.array(evaluate_record(_record(weights, se), data, weights_dir=weights, progress=False).correct, float)
    assert (d["member"], d["reference"], d["n"]) == (cbam, se, 12)
    assert d["difference"] == pytest.approx(a.mean() - b.mean())
    assert (d["only_member_right"], d["only_reference_right"]) == (int(((a == 1) & (b == 0)).sum()),
                                                                   int(((a == 0) & (b == 1)).sum()))
    assert doc["reference"] == "resnet18_tiny" and set(doc["differences"]) == {se, cbam}  # the reference's kept
    assert f"| `{cbam}` − `{se}` | {100 * d['difference']:+.2f} |" in md.read_text()


@pytest.mark.parametrize("pair", ["resnet18_cbam_tiny:nope", "resnet18_cbam_tiny", "a:a", "a:b:c"])
def test_a_wrong_compare_pair_stops_before_evaluating(trio, tmp_path, capsys, pair):
    weights, data = trio
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--weights", str(weights), "--lineup", "trio", "--data", str(data), "--out", str(out),
                 "--no-progress", "--compare", pair]) == 2
    err = capsys.readouterr().err
    assert "--compare" in err and "Traceback" not in err and not out.exists()
