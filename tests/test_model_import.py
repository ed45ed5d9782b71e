"""add-model / add-lineup: each source's checkpoint becomes our record with the source's logits.

The sources are written in tmp_path by reference networks in their own key layouts and wrappers
(tests/foreign_models.py); the record is then loaded the way every command loads a model
(``load_record``: sha256, architecture options, strict keys) and compared output for output.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torchvision

from cbam_viz import cli
from cbam_viz.models.importer import add_model, detect, read_classes
from cbam_viz.models.weights import WeightRecord, load_record, read_manifest, save_safetensors
from cbam_viz.models import create_model
from tests.foreign_models import RefResNet, official_wrapper, randomize

pytestmark = pytest.mark.usefixtures("one_thread")

BASIC = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}
BOTTLENECK = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}


def _x(size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(3))


def _layers(depth):
    return (BASIC | BOTTLENECK)[depth], depth in BOTTLENECK


def _added(tmp_path, source_model, payload, *, name="mine", suffix=".pth", **kw):
    """Save ``payload`` as a checkpoint, add it, load the record back; return (record, model, detection)."""
    weights = tmp_path / "weights"
    weights.mkdir(exist_ok=True)
    path = tmp_path / f"source{suffix}"
    torch.save(payload, path)
    record, found = add_model(path, name=name, weights_dir=weights, **kw)
    stored = WeightRecord(**read_manifest(weights)["models"][name])
    assert stored == record
    return record, load_record(stored, weights), found


def _same_logits(ours, theirs, size):
    x = _x(size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=2e-5, rtol=1e-4)


DEPTHS = [18, 34, 50, *(pytest.param(d, marks=pytest.mark.slow) for d in (101, 152))]  # the deep ones: seconds each


@pytest.mark.parametrize("depth", DEPTHS)
def test_torchvision_resnets(tmp_path, depth):
    source = randomize(getattr(torchvision.models, f"resnet{depth}")(num_classes=5))
    record, model, found = _added(tmp_path, source, source.state_dict())
    assert (record.arch, found.num_classes, record.input_size) == (f"resnet{depth}", 5, 224)
    _same_logits(model, source, 64)


@pytest.mark.parametrize("depth,stem", [(18, "imagenet"), (50, "imagenet"), (18, "cifar"), (34, "cifar")])
def test_official_cbam_code(tmp_path, depth, stem):
    layers, bottleneck = _layers(depth)
    source = randomize(RefResNet(layers, bottleneck=bottleneck, style="official", stem=stem))
    record, model, found = _added(tmp_path, source, official_wrapper(source, f"resnet{depth}"), suffix=".pth.tar")
    assert record.arch == f"resnet{depth}_cbam" and found.layout == "official"
    assert record.arch_options.get("stem", "imagenet") == stem
    assert record.input_size == (32 if stem == "cifar" else 224)
    _same_logits(model, source, 32 if stem == "cifar" else 64)


@pytest.mark.parametrize("depth", DEPTHS)
def test_resnet_cbam_snippet(tmp_path, depth):
    layers, bottleneck = _layers(depth)
    source = randomize(RefResNet(layers, bottleneck=bottleneck, style="snippet", r=8))
    record, model, found = _added(tmp_path, source, source.state_dict())
    assert record.arch == f"resnet{depth}_cbam" and found.layout == "simplified"
    assert record.arch_options["cbam"]["reduction"] == 8 and record.arch_options["cbam"]["spatial_bn"] is False
    _same_logits(model, source, 64)


@pytest.mark.parametrize("depth", [18, 50])
def test_timm_style_se_resnet(tmp_path, depth):
    layers, bottleneck = _layers(depth)
    source = randomize(RefResNet(layers, bottleneck=bottleneck, style="timm_se"))
    record, model, _ = _added(tmp_path, source, {"state_dict": source.state_dict()})
    assert record.arch == f"resnet{depth}_se"
    # timm rounds C / 16 to multiples of 8: ResNet-18's 64 channels get 8, not 4; ResNet-50's widths
    # (256 .. 2048) are multiples already, so the paper's C // 16 fits and the record needs no option.
    assert record.arch_options.get("se") == ({"reduction": 16, "divisor": 8} if depth == 18 else None)
    _same_logits(model, source, 64)


@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
def test_official_bam_code(tmp_path, stem):
    source = randomize(RefResNet([2, 2, 2, 2], bottleneck=False, style="official_bam", stem=stem))
    record, model, found = _added(tmp_path, source, official_wrapper(source, "resnet18"), suffix=".pth.tar")
    assert record.arch == "resnet18_bam" and found.layout == "official_bam"
    assert record.arch_options["bam"]["join"] == "product"  # the official code multiplies the branches
    _same_logits(model, source, 32 if stem == "cifar" else 64)


@pytest.mark.parametrize("arch", ["resnet18_se", "resnet18_bam", "resnet18_cbam"])
def test_our_own_safetensors(tmp_path, arch):
    source = randomize(create_model(arch, num_classes=4))
    path = tmp_path / "ours.safetensors"
    save_safetensors(source, path, dtype=None)
    (tmp_path / "w").mkdir()
    record, found = add_model(path, name="own", weights_dir=tmp_path / "w")
    assert record.arch == arch and record.arch_options == {} and found.layout == "native"
    _same_logits(load_record(record, tmp_path / "w"), source, 64)


def test_detection_reads_structure_not_names():
    found = detect(RefResNet([3, 4, 6, 3], bottleneck=True, style="official", stem="cifar").state_dict())
    assert (found.arch, found.blocks, found.bottleneck, found.num_classes) == ("resnet50_cbam", (3, 4, 6, 3), True, 7)
    assert "stem: cifar" in found.lines()


# ------------------------------------------------------------------------------ classes
def test_classes_from_every_kind_of_source(tmp_path):
    (tmp_path / "a.txt").write_text("cat\n\ndog\nbird\n")
    (tmp_path / "b.json").write_text(json.dumps(["cat", "dog", "bird"]))
    (tmp_path / "c.json").write_text(json.dumps({"2": "bird", "0": "cat", "1": "dog"}))
    folder = tmp_path / "train"
    for name in ("dog", "bird", "cat"):
        (folder / name).mkdir(parents=True)
    for source in ("a.txt", "b.json", "c.json"):
        assert [c["name"] for c in read_classes(tmp_path / source, 3)] == ["cat", "dog", "bird"]
    assert [c["name"] for c in read_classes(folder, 3)] == ["bird", "cat", "dog"]  # ImageFolder: sorted
    assert [c["name"] for c in read_classes(None, 2)] == ["class 0", "class 1"]


@pytest.mark.parametrize("file,content,message", [
    ("classes.txt", "cat\ndog\n", "gives 2 classes but the checkpoint's fc layer has 3 rows"),
    ("classes.json", '{"0": "cat", "2": "dog"}', "indices 0..N-1"),
    ("classes.json", "[1, 2", "not valid JSON"),
])
def test_bad_classes_are_one_sentence(tmp_path, file, content, message):
    (tmp_path / file).write_text(content)
    with pytest.raises(ValueError) as err:
        read_classes(tmp_path / file, 3)
    assert message in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------ refusals (CLI)
class _Payload:
    """os.system: a module torch blocks by name (its message differs from other unsupported globals)."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _cli(tmp_path, *args):
    return cli.main(["add-model", *map(str, args), "--weights", str(tmp_path / "w")])


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "w").mkdir()
    src = randomize(torchvision.models.resnet18(num_classes=3))
    torch.save(src.state_dict(), tmp_path / "tv.pth")
    return tmp_path


def _manifest_bytes(tmp_path):
    path = tmp_path / "w" / "manifest.json"
    return path.read_bytes() if path.exists() else None


def test_a_code_running_pickle_runs_nothing(folder, capsys, monkeypatch):
    monkeypatch.chdir(folder)
    torch.save({"state_dict": _Payload()}, folder / "evil.pth")  # pickles the payload; loading would run it
    assert _cli(folder, folder / "evil.pth", "--name", "evil") == 2
    assert "would create arbitrary Python objects" in capsys.readouterr().err
    assert not (folder / "pwned").exists() and _manifest_bytes(folder) is None


REFUSALS = {
    "no checkpoint": (lambda t: (t / "notes.txt", "not a PyTorch checkpoint")),
    "missing file": (lambda t: (t / "nope.pth", "checkpoint file not found")),
    "not a resnet": (lambda t: (t / "vgg.pth", "not a ResNet checkpoint this tool reads")),
    "unknown layout": (lambda t: (t / "odd.pth", "keys of an unknown layout: layer1.0.extra.weight")),
}


@pytest.mark.parametrize("problem", REFUSALS)
def test_files_that_are_no_usable_checkpoint_are_refused(folder, capsys, problem):
    (folder / "notes.txt").write_text("cat\ndog\n")  # parses as a text pickle: must not be called unsafe
    torch.save(torchvision.models.vgg11(num_classes=3).features.state_dict(), folder / "vgg.pth")
    odd = torchvision.models.resnet18(num_classes=3).state_dict()
    odd["layer1.0.extra.weight"] = torch.zeros(3)
    torch.save(odd, folder / "odd.pth")
    path, message = REFUSALS[problem](folder)
    assert _cli(folder, path, "--name", "x") == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert _manifest_bytes(folder) is None and list((folder / "w").iterdir()) == []


def test_classes_that_do_not_match_fc_rows(folder, capsys):
    (folder / "classes.txt").write_text("a\nb\n")
    assert _cli(folder, folder / "tv.pth", "--name", "x", "--classes", folder / "classes.txt") == 2
    assert "gives 2 classes but the checkpoint's fc layer has 3 rows" in capsys.readouterr().err
    assert _manifest_bytes(folder) is None


@pytest.mark.parametrize("args,message", [
    (["--input-size", "-3"], "--input-size wants a size in pixels from 8 to 2048"),
    (["--std", "0.2,0,0.2"], "--std wants three numbers R,G,B > 0"),
    (["--arch", "resnet50"], "--arch resnet50: the checkpoint is a resnet18"),
])
def test_bad_options_are_refused_before_anything_is_written(folder, capsys, args, message):
    assert _cli(folder, folder / "tv.pth", "--name", "x", *args) == 2
    assert message in capsys.readouterr().err and _manifest_bytes(folder) is None
    assert list((folder / "w").iterdir()) == []


def test_a_taken_name_is_refused_unless_replace(folder, capsys):
    assert _cli(folder, folder / "tv.pth", "--name", "mine") == 0
    first = _manifest_bytes(folder)
    old_file = read_manifest(folder / "w")["models"]["mine"]["file"]
    assert _cli(folder, folder / "tv.pth", "--name", "mine") == 2
    assert "already in" in capsys.readouterr().err and _manifest_bytes(folder) == first
    other = randomize(torchvision.models.resnet18(num_classes=3), seed=5)
    torch.save(other.state_dict(), folder / "tv2.pth")
    assert _cli(folder, folder / "tv2.pth", "--name", "mine", "--replace") == 0
    new = read_manifest(folder / "w")["models"]["mine"]
    assert new["file"] != old_file and not (folder / "w" / old_file).exists()
    assert sorted(p.name for p in (folder / "w").iterdir()) == sorted(["manifest.json", new["file"]])


def test_a_missing_weights_folder(folder, capsys):
    assert cli.main(["add-model", str(folder / "tv.pth"), "--name", "x", "--weights", str(folder / "none")]) == 2
    err = capsys.readouterr().err
    assert str(folder / "none") in err and ("does not exist" in err or "no such folder" in err)
    assert not (folder / "none").exists()


def test_a_read_only_weights_folder(folder, monkeypatch):
    """os.access decides (CI runs as root, who may write anywhere, so the folder's mode cannot show it)."""
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(folder / "w") else real(p, mode))
    with pytest.raises(ValueError, match="is not writable"):
        add_model(folder / "tv.pth", name="x", weights_dir=folder / "w")


def test_an_interrupted_add_leaves_the_manifest_as_it_was(folder, monkeypatch):
    assert _cli(folder, folder / "tv.pth", "--name", "first") == 0
    before = _manifest_bytes(folder)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("cbam_viz.models.importer.update_manifest", interrupted)
    with pytest.raises(KeyboardInterrupt):
        add_model(folder / "tv.pth", name="second", weights_dir=folder / "w")
    assert _manifest_bytes(folder) == before
    rec = WeightRecord(**read_manifest(folder / "w")["models"]["first"])
    load_record(rec, folder / "w")  # the record in place still loads


def test_cli_prints_what_it_found(folder, capsys):
    (folder / "classes.txt").write_text("tench\nchurch\nparachute\n")
    assert _cli(folder, folder / "tv.pth", "--name", "mine", "--classes", folder / "classes.txt",
                "--input-size", "160") == 0
    out = capsys.readouterr().out
    assert "architecture: resnet18 (basic blocks 2-2-2-2)" in out and "class names: tench, church, parachute" in out
    assert read_manifest(folder / "w")["models"]["mine"]["input_size"] == 160


# ------------------------------------------------------------------------------ lineups
@pytest.fixture
def two_models(tmp_path):
    weights = tmp_path / "w"
    weights.mkdir()
    for arch in ("resnet18", "resnet18_cbam"):
        src = randomize(create_model(arch, num_classes=3))
        save_safetensors(src, tmp_path / f"{arch}.safetensors", dtype=None)
        add_model(tmp_path / f"{arch}.safetensors", name=arch, weights_dir=weights)
    return weights


def test_add_lineup_writes_members_reference_and_default(two_models, capsys):
    assert cli.main(["add-lineup", "mine", "resnet18_cbam", "resnet18", "--default", "--weights", str(two_models)]) == 0
    manifest = read_manifest(two_models)
    assert manifest["lineups"]["mine"] == {"members": ["resnet18_cbam", "resnet18"], "reference": "resnet18",
                                           "default": True}
    # a plain + CBAM lineup is also a pair, for the pages that know pairs only
    assert manifest["pairs"]["mine"] == {"baseline": "resnet18", "cbam": "resnet18_cbam", "default": True}
    assert cli.main(["add-lineup", "solo", "resnet18_cbam", "--default", "--weights", str(two_models)]) == 0
    manifest = read_manifest(two_models)
    assert manifest["lineups"]["solo"]["reference"] == "resnet18_cbam"
    assert [n for n, v in manifest["lineups"].items() if v["default"]] == ["solo"]


@pytest.mark.parametrize("args,message", [
    (["x", "nobody"], "no model 'nobody'"),
    (["x", "resnet18", "resnet18"], "1 to 4 different models"),
    (["x", "resnet18", "--reference", "resnet18_cbam"], "is not one of the lineup's models"),
    (["bad name!", "resnet18"], "lineup name"),
])
def test_add_lineup_refusals(two_models, capsys, args, message):
    before = (two_models / "manifest.json").read_bytes()
    assert cli.main(["add-lineup", *args, "--weights", str(two_models)]) == 2
    assert message in capsys.readouterr().err
    assert (two_models / "manifest.json").read_bytes() == before
