import pytest
import torch

from cbam_viz.pair import (
    IMAGENET_PAIR, UNTRAINED_PAIR, ModelLoadError, clear_cache, default_pair_name, list_pairs, load_available_pairs, load_pair,
    model_lock, models_locked, pair_names, select_device,
)
from cbam_viz.weights import ChecksumError, WeightRecord, save_safetensors, update_manifest
from conftest import make_model

pytestmark = pytest.mark.usefixtures("no_cbam_env")  # CBAM_VIZ_DEVICE / _WEIGHTS_DIR of the shell stay out

CLASSES = [{"id": "a", "name": "apple"}, {"id": "b", "name": "banana"}, {"id": "c", "name": "cherry"}]


def _record(weights_dir, name, arch):
    model = make_model(arch)
    sha = save_safetensors(model, weights_dir / f"{name}.safetensors")
    return WeightRecord(name=name, file=f"{name}.safetensors", arch=arch, sha256=sha,
                        num_params=sum(p.numel() for p in model.parameters()), classes=CLASSES,
                        mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], input_size=96)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    update_manifest(d, record=_record(d, "base", "resnet18"))
    cb = _record(d, "cb", "resnet18_cbam")
    update_manifest(d, record=cb)
    broken = WeightRecord(**{**cb.to_json(), "name": "broken", "file": "broken.safetensors"})
    (d / "broken.safetensors").write_bytes((d / "cb.safetensors").read_bytes()[:-64] + b"\0" * 64)
    update_manifest(d, record=broken)
    update_manifest(d, pair=("bad", {"baseline": "base", "cbam": "broken"}))
    update_manifest(d, pair=("good", {"baseline": "base", "cbam": "cb", "default": True}))
    return d


def test_untrained_fallback(tmp_path):
    pair = load_pair(weights_dir=tmp_path)
    assert pair.name == "untrained" and not pair.trained
    for m, arch in ((pair.baseline, "resnet18"), (pair.cbam, "resnet18_cbam")):
        assert m.trained is False and m.record is None and m.arch == arch
        assert len(m.classes) == 10 and m.classes[0] == "tench" and m.input_size == 224
        assert not m.model.training
    assert load_pair(weights_dir=tmp_path).cbam.model is pair.cbam.model  # cached, not rebuilt
    assert list_pairs(tmp_path) == [] and default_pair_name(tmp_path) is None


def test_untrained_is_seeded_and_leaves_global_rng_alone(tmp_path):
    first = load_pair(weights_dir=tmp_path).cbam.model.fc.weight.detach().clone()
    torch.manual_seed(123)
    expected = torch.rand(3)
    clear_cache()
    torch.manual_seed(123)
    again = load_pair(weights_dir=tmp_path).cbam.model.fc.weight
    assert torch.equal(first, again)
    assert torch.equal(torch.rand(3), expected)


def test_manifest_pair(weights_dir):
    assert list_pairs(weights_dir) == ["good", "bad"]
    pair = load_pair(weights_dir=weights_dir)
    assert pair.name == "good" and pair.trained
    assert pair.cbam.classes == ("apple", "banana", "cherry") and pair.cbam.class_ids == ("a", "b", "c")
    assert pair.cbam.input_size == 96 and pair.cbam.mean == (0.5, 0.5, 0.5)
    assert pair.baseline.record.name == "base" and pair.cbam.device == torch.device("cpu")
    assert load_pair("good", weights_dir=weights_dir).baseline is pair.baseline  # cached


def test_corrupted_file_is_named_and_others_stay_up(weights_dir):
    with pytest.raises(ModelLoadError) as err:
        load_pair("bad", weights_dir=weights_dir)
    assert "broken.safetensors" in str(err.value) and "'bad'" in str(err.value)
    assert err.value.model_name == "broken" and err.value.file.name == "broken.safetensors"
    assert isinstance(err.value.__cause__, ChecksumError)
    pairs, errors = load_available_pairs(weights_dir=weights_dir)
    assert list(pairs) == ["good"] and list(errors) == ["bad"]
    assert "broken.safetensors" in errors["bad"]


def test_unknown_pair(weights_dir):
    with pytest.raises(KeyError, match="good"):
        load_pair("nope", weights_dir=weights_dir)


def test_select_device(monkeypatch):
    assert select_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("CBAM_VIZ_DEVICE", "cpu")
    assert select_device() == torch.device("cpu")
    monkeypatch.delenv("CBAM_VIZ_DEVICE")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if expected == "cpu" and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        expected = "mps"
    assert select_device().type == expected == select_device("auto").type
    with pytest.raises(ValueError, match="not a device"):
        select_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            select_device("cuda")


def test_pair_names_offer_the_manifest_then_untrained(weights_dir, tmp_path):
    """The manifest's pairs (default first), the paper's ImageNet pair (loadable where its files
    are), and the untrained pair last."""
    assert pair_names(weights_dir) == ["good", "bad", IMAGENET_PAIR, UNTRAINED_PAIR]
    assert pair_names(tmp_path) == [IMAGENET_PAIR, UNTRAINED_PAIR]  # no manifest
    (tmp_path / "manifest.json").write_text("{not json")
    assert pair_names(tmp_path) == [IMAGENET_PAIR, UNTRAINED_PAIR]  # a broken manifest never stops the app


def test_models_locked_holds_each_lock_once_and_releases():
    a, b = make_model("resnet18"), make_model("resnet18", seed=1)
    with models_locked(b, a, b):
        assert model_lock(a)._is_owned() and model_lock(b)._is_owned()
    assert not model_lock(a)._is_owned() and not model_lock(b)._is_owned()
    assert model_lock(a) is model_lock(a) and model_lock(a) is not model_lock(b)
