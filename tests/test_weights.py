"""Checkpoint loading: our safetensors files, torchvision, official CBAM and the simplified snippet.

Each foreign layout is produced by a small reference network written for the tests, with the key
names of the code it stands for (tests/foreign_models.py), then saved to ``tmp_path``, loaded into
our models and compared output for output.
"""
from __future__ import annotations

import os
import pickle

import pytest
import torch
from torch import nn

from cbam_viz.models import SIMPLIFIED, create_model
from cbam_viz.models.checkpoints import (
    UnsafeCheckpointError, convert_state_dict, detect_layout, infer_model_kwargs, load_any, load_checkpoint_into,
    read_state_dict,
)
from cbam_viz.models.weights import ChecksumError, WeightRecord, load_record, read_manifest, save_safetensors, sha256_file, update_manifest
from tests.foreign_models import RefResNet, randomize

NUM_CLASSES = 7


def _x(size: int = 64, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------ foreign layouts
@pytest.mark.parametrize("arch,layers,bottleneck", [
    ("resnet18_cbam", [2, 2, 2, 2], False),
    ("resnet50_cbam", [3, 4, 6, 3], True),
])
def test_official_checkpoint_loads_and_matches(tmp_path, arch, layers, bottleneck):
    ref = randomize(RefResNet(layers, bottleneck=bottleneck, style="official"))
    keys = list(ref.state_dict())
    assert "layer1.0.cbam.ChannelGate.mlp.1.weight" in keys
    assert "layer1.0.cbam.SpatialGate.spatial.bn.running_var" in keys
    path = tmp_path / "official.pth.tar"
    # The official trainer saves a DataParallel model inside a dict with training state.
    torch.save({"epoch": 90, "arch": arch, "best_prec1": torch.tensor(77.6),
                "state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, path)

    assert detect_layout(read_state_dict(path)) == "official"
    model = load_any(arch, path)
    assert model.fc.out_features == NUM_CLASSES and not model.training
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)

    # create_model(weights=...) goes through the same loader.
    model2 = create_model(arch, num_classes=NUM_CLASSES, weights=path).eval()
    with torch.no_grad():
        torch.testing.assert_close(model2(x), ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ratio", [16, 8])
def test_simplified_snippet_checkpoint_loads_and_matches(tmp_path, ratio):
    ref = randomize(RefResNet([2, 2, 2, 2], bottleneck=False, style="snippet", r=ratio))
    state = ref.state_dict()
    assert state["layer1.0.ca.fc.0.weight"].shape == (64 // ratio, 64, 1, 1)
    assert "layer1.0.sa.conv1.weight" in state
    path = tmp_path / "seed.pth"
    torch.save(state, path)

    assert detect_layout(read_state_dict(path)) == "simplified"
    kw = infer_model_kwargs(read_state_dict(path))
    assert kw["num_classes"] == NUM_CLASSES
    assert kw["cbam_config"] == SIMPLIFIED.__class__(**{**SIMPLIFIED.__dict__, "reduction": ratio})
    model = load_any("resnet18_cbam", path)
    assert model.layer1[0].cbam.channel.mlp[0].weight.shape == (64 // ratio, 64)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)


def test_simplified_checkpoint_via_create_model(tmp_path):
    ref = randomize(RefResNet([2, 2, 2, 2], bottleneck=False, style="snippet"))
    path = tmp_path / "seed.pth"
    torch.save({"state_dict": ref.state_dict()}, path)
    model = create_model("resnet18_cbam", num_classes=NUM_CLASSES, cbam_config=SIMPLIFIED, weights=path).eval()
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)


def test_simplified_checkpoint_into_official_model_says_what_to_do(tmp_path):
    ref = RefResNet([2, 2, 2, 2], bottleneck=False, style="snippet")
    path = tmp_path / "seed.pth"
    torch.save(ref.state_dict(), path)
    with pytest.raises(RuntimeError) as err:
        create_model("resnet18_cbam", num_classes=NUM_CLASSES, weights=path)
    msg = str(err.value)
    assert str(path) in msg and "SIMPLIFIED" in msg and "spatial.bn" in msg


def test_convert_state_dict_reshapes_snippet_mlp():
    state = {"layer1.0.ca.fc.0.weight": torch.zeros(4, 64, 1, 1), "layer1.0.ca.fc.2.weight": torch.zeros(64, 4, 1, 1),
             "layer1.0.sa.conv1.weight": torch.zeros(1, 2, 7, 7), "fc.weight": torch.zeros(3, 512)}
    out = convert_state_dict(state)
    assert out["layer1.0.cbam.channel.mlp.0.weight"].shape == (4, 64)
    assert out["layer1.0.cbam.channel.mlp.2.weight"].shape == (64, 4)
    assert out["layer1.0.cbam.spatial.conv.weight"].shape == (1, 2, 7, 7)
    assert out["fc.weight"] is state["fc.weight"]
    with pytest.raises(ValueError, match="layout"):
        convert_state_dict(state, layout="keras")


def test_torchvision_pth_loads_with_inferred_classes(tmp_path):
    tv = pytest.importorskip("torchvision")
    ref = randomize(tv.models.resnet18(num_classes=NUM_CLASSES))
    path = tmp_path / "resnet18-tv.pth"
    torch.save(ref.state_dict(), path)
    assert detect_layout(read_state_dict(path)) == "native"
    model = load_any("resnet18", path)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ failures
def test_wrong_keys_error_names_file_and_keys(tmp_path):
    model = create_model("resnet18", num_classes=3)
    state = model.state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["layer2.0.conv1.weight"]
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(RuntimeError) as err:
        load_checkpoint_into(create_model("resnet18", num_classes=3), path)
    msg = str(err.value)
    assert str(path) in msg and "layer2.0.conv1.weight" in msg and "extra.weight" in msg


def test_wrong_shape_error_names_file_and_shapes(tmp_path):
    path = tmp_path / "ten.safetensors"
    save_safetensors(create_model("resnet18", num_classes=10), path)
    with pytest.raises(RuntimeError) as err:
        load_checkpoint_into(create_model("resnet18", num_classes=3), path)
    msg = str(err.value)
    assert str(path) in msg and "fc.weight" in msg and "(10, 512)" in msg


class _Payload:
    """Unpickling this would create a file: the stand-in for code a hostile checkpoint runs."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_code_running_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}, "payload": _Payload(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError) as err:
        load_checkpoint_into(create_model("resnet18", num_classes=2), path)
    assert str(path) in str(err.value) and "weights_only" in str(err.value)
    with pytest.raises(UnsafeCheckpointError):
        load_any("resnet18", path)
    assert not marker.exists()

    # The payload is live: a plain unpickler would have created the file.
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(_Payload(str(live)))).close()
    assert live.exists()


def test_garbage_files_fail_clearly(tmp_path):
    for name in ("junk.safetensors", "junk.pth"):
        path = tmp_path / name
        path.write_bytes(b"not a checkpoint at all")
        with pytest.raises(ValueError, match=name):
            read_state_dict(path)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_state_dict(tmp_path / "nope.pth")


# ------------------------------------------------------------------------------ records
def _record(tmp_path, arch="resnet18", n=3, **save_kw) -> WeightRecord:
    torch.manual_seed(0)
    model = create_model(arch, num_classes=n)
    digest = save_safetensors(model, tmp_path / f"{arch}.safetensors", **save_kw)
    rec = WeightRecord(name=f"{arch}_tiny", file=f"{arch}.safetensors", arch=arch, sha256=digest,
                       num_params=sum(p.numel() for p in model.parameters()),
                       classes=[{"id": f"c{i}", "name": f"class {i}"} for i in range(n)],
                       mean=[0.5] * 3, std=[0.25] * 3, input_size=32)
    return rec, model


def test_load_record_round_trip_float32_exact(tmp_path):
    rec, model = _record(tmp_path, dtype=None)
    loaded = load_record(rec, tmp_path)
    assert not loaded.training
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_float16_storage_is_half_size_and_loads_as_float32(tmp_path):
    rec16, model = _record(tmp_path / "h", arch="resnet18_cbam")
    rec32, _ = _record(tmp_path / "f", arch="resnet18_cbam", dtype=None)
    size16 = os.path.getsize(tmp_path / "h" / rec16.file)
    size32 = os.path.getsize(tmp_path / "f" / rec32.file)
    assert size16 < 0.51 * size32
    assert size16 < 25e6  # what a shipped ResNet-18 may weigh
    loaded = load_record(rec16, tmp_path / "h")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), atol=2e-2, rtol=2e-2)


def test_equal_weights_give_equal_files(tmp_path):
    # The safetensors library orders its metadata keys by a per-process hash, so before the header
    # was re-written in a fixed order, 20 saves of one state dict gave two different sha256s.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    digests = {save_safetensors(model, tmp_path / f"{i}.safetensors") for i in range(12)}
    assert len(digests) == 1
    from safetensors import safe_open
    with safe_open(str(tmp_path / "0.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "storage_dtype": "float16"}
        assert torch.equal(f.get_tensor("0.weight"), model[0].weight.detach().half())


def test_corrupt_file_raises_checksum_error_naming_file(tmp_path):
    rec, _ = _record(tmp_path)
    path = tmp_path / rec.file
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=rec.file):
        load_record(rec, tmp_path)


def test_missing_file_is_named(tmp_path):
    rec, _ = _record(tmp_path)
    (tmp_path / rec.file).unlink()
    with pytest.raises(FileNotFoundError, match=rec.file):
        load_record(rec, tmp_path)


def test_manifest_records_metrics_and_pairs(tmp_path):
    assert read_manifest(tmp_path) == {"models": {}, "pairs": {}}
    rec, _ = _record(tmp_path)
    update_manifest(tmp_path, record=rec)
    update_manifest(tmp_path, metrics=(rec.name, {"val_top1": 0.5}))
    update_manifest(tmp_path, metrics=(rec.name, {"val_top5": 0.9}))
    update_manifest(tmp_path, pair=("tiny", {"baseline": rec.name, "cbam": rec.name}))
    data = read_manifest(tmp_path)
    assert data["models"][rec.name]["metrics"] == {"val_top1": 0.5, "val_top5": 0.9}
    assert data["pairs"]["tiny"]["baseline"] == rec.name
    assert WeightRecord(**data["models"][rec.name]).sha256 == sha256_file(tmp_path / rec.file)
    with pytest.raises(KeyError, match="nope"):
        update_manifest(tmp_path, metrics=("nope", {}))


def test_manifest_lineups_keep_one_default_and_leave_the_pairs_alone(tmp_path):
    rec, _ = _record(tmp_path)
    update_manifest(tmp_path, record=rec)
    update_manifest(tmp_path, pair=("old", {"baseline": rec.name, "cbam": rec.name, "default": True}))
    update_manifest(tmp_path, lineup=("a", {"members": [rec.name], "reference": rec.name, "default": True}))
    update_manifest(tmp_path, lineup=("b", {"members": [rec.name], "reference": rec.name, "default": True}))
    data = read_manifest(tmp_path)
    assert list(data["lineups"]) == ["a", "b"]
    assert [v["default"] for v in data["lineups"].values()] == [False, True]  # the mark moves to the newest
    assert data["pairs"]["old"]["default"] is True  # pairs and lineups each keep their own mark
    assert data["lineups"]["b"]["members"] == [rec.name]


def test_recast_record_shrinks_a_float32_export(tmp_path):
    from cbam_viz.models.weights import recast_record

    rec, model = _record(tmp_path, dtype=None)
    update_manifest(tmp_path, record=rec)
    update_manifest(tmp_path, metrics=(rec.name, {"val_top1": 0.25}))
    before = os.path.getsize(tmp_path / rec.file)
    new = recast_record(tmp_path, rec.name)
    assert os.path.getsize(tmp_path / rec.file) < 0.51 * before
    entry = read_manifest(tmp_path)["models"][rec.name]
    assert entry["sha256"] == new.sha256 == sha256_file(tmp_path / rec.file) != rec.sha256
    assert entry["metrics"] == {"val_top1": 0.25}
    load_record(WeightRecord(**entry), tmp_path)
