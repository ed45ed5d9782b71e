"""cbam_viz.engine.loading (one record -> a cached LoadedModel) and the lineups built from it:
the untrained fallback, a manifest's lineups and its old pairs (lineups of two), broken files."""
import pytest
import torch

from cbam_viz.engine.lineup import (
    IMAGENET_LINEUP, UNTRAINED_LINEUP, default_lineup_name, lineup_names, lineup_specs, load_available_lineups,
    load_lineup,
)
from cbam_viz.engine.loading import ModelLoadError, clear_cache, load_model, select_device, untrained_model
from cbam_viz.engine.locks import model_lock, models_locked
from cbam_viz.models.weights import ChecksumError, WeightRecord, save_safetensors, update_manifest
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
    lineup = load_lineup(weights_dir=tmp_path)
    assert lineup.name == UNTRAINED_LINEUP and not lineup.trained
    assert [m.arch for m in lineup.members] == ["resnet18", "resnet18_cbam"]
    assert lineup.reference == lineup.members[0].name == "resnet18 (untrained)"
    assert lineup.names == ["resnet18 (untrained)", "resnet18_cbam (untrained)"]
    for m in lineup.members:
        assert m.trained is False and m.record is None
        assert len(m.classes) == 10 and m.classes[0] == "tench" and m.input_size == 224
        assert not m.model.training
    assert load_lineup(weights_dir=tmp_path).members[-1].model is lineup.members[-1].model  # cached, not rebuilt
    assert load_lineup(UNTRAINED_LINEUP, weights_dir=tmp_path).members[0] is lineup.members[0]
    assert untrained_model("resnet18_cbam") is lineup.members[-1]
    assert lineup_specs(tmp_path) == {} and default_lineup_name(tmp_path) is None


def test_untrained_is_seeded_and_leaves_global_rng_alone(tmp_path):
    first = load_lineup(weights_dir=tmp_path).members[-1].model.fc.weight.detach().clone()
    torch.manual_seed(123)
    expected = torch.rand(3)
    clear_cache()
    torch.manual_seed(123)
    again = load_lineup(weights_dir=tmp_path).members[-1].model.fc.weight
    assert torch.equal(first, again)
    assert torch.equal(torch.rand(3), expected)


def test_old_manifest_pairs_load_as_lineups_of_two(weights_dir):
    assert list(lineup_specs(weights_dir)) == ["bad", "good"] and default_lineup_name(weights_dir) == "good"
    lineup = load_lineup(weights_dir=weights_dir)
    assert lineup.name == "good" and lineup.trained
    assert lineup.names == ["base", "cb"] and lineup.reference == "base"  # baseline -> the reference
    assert [m.name for m in lineup.others] == ["cb"] and lineup.reference_model.arch == "resnet18"
    cb = lineup.member("cb")
    assert cb.arch == "resnet18_cbam" and cb.classes == ("apple", "banana", "cherry") and cb.class_ids == ("a", "b", "c")
    assert cb.input_size == 96 and cb.mean == (0.5, 0.5, 0.5)
    assert lineup.members[0].record.name == "base" and cb.device == torch.device("cpu")
    assert load_lineup("good", weights_dir=weights_dir).members[0] is lineup.members[0]  # cached
    assert load_model("cb", weights_dir=weights_dir) is cb  # the one model cache


@pytest.fixture(scope="module")
def lineup_dir(tmp_path_factory):
    """A manifest with ``lineups`` beside an old pair: three records, a lineup listing its reference
    last, a lineup of one, and a pair and a lineup of the same name (the lineup wins)."""
    d = tmp_path_factory.mktemp("lineups")
    for name, arch in (("plain", "resnet18"), ("se", "resnet18_se"), ("cb", "resnet18_cbam")):
        update_manifest(d, record=_record(d, name, arch))
    update_manifest(d, pair=("twin", {"baseline": "plain", "cbam": "cb", "default": True}))
    update_manifest(d, pair=("same", {"baseline": "plain", "cbam": "cb"}))
    update_manifest(d, lineup=("trio", {"members": ["cb", "se", "plain"], "reference": "plain", "default": True}))
    update_manifest(d, lineup=("solo", {"members": ["se"], "reference": "se"}))
    update_manifest(d, lineup=("same", {"members": ["se", "cb"], "reference": "se"}))
    return d


def test_manifest_lineups_load_in_their_order_with_their_reference(lineup_dir):
    assert list(lineup_specs(lineup_dir)) == ["trio", "solo", "same", "twin"]  # lineups first, then pairs
    assert default_lineup_name(lineup_dir) == "trio"  # the first default, lineups before pairs
    assert lineup_names(lineup_dir) == ["trio", "solo", "same", "twin", IMAGENET_LINEUP, UNTRAINED_LINEUP]
    trio = load_lineup(weights_dir=lineup_dir)
    assert trio.name == "trio" and trio.trained
    assert trio.names == ["cb", "se", "plain"] and trio.reference == "plain"  # display order kept
    assert [m.arch for m in trio.members] == ["resnet18_cbam", "resnet18_se", "resnet18"]
    assert [m.name for m in trio.others] == ["cb", "se"] and trio.reference_model is trio.member("plain")
    solo = load_lineup("solo", weights_dir=lineup_dir)
    assert solo.names == ["se"] and solo.reference == "se" and solo.others == ()
    same = load_lineup("same", weights_dir=lineup_dir)
    assert same.names == ["se", "cb"] and same.reference == "se"  # the lineup hides the pair of its name
    twin = load_lineup("twin", weights_dir=lineup_dir)
    assert twin.names == ["plain", "cb"] and twin.reference == "plain"


def test_lineups_naming_one_record_share_its_model_and_lock(lineup_dir):
    trio, twin = load_lineup("trio", weights_dir=lineup_dir), load_lineup("twin", weights_dir=lineup_dir)
    assert trio.member("cb") is twin.member("cb") and trio.member("plain") is twin.member("plain")
    assert trio.member("cb").lock is twin.member("cb").lock is model_lock(twin.member("cb").model)
    assert trio.member("se").lock is not trio.member("cb").lock


def test_corrupted_file_is_named_and_others_stay_up(weights_dir):
    with pytest.raises(ModelLoadError) as err:
        load_lineup("bad", weights_dir=weights_dir)
    assert "broken.safetensors" in str(err.value) and "'bad'" in str(err.value)
    assert err.value.model_name == "broken" and err.value.file.name == "broken.safetensors"
    assert isinstance(err.value.__cause__, ChecksumError)
    lineups, errors = load_available_lineups(weights_dir=weights_dir)
    assert list(lineups) == ["good"] and list(errors) == ["bad"]
    assert lineups["good"].names == ["base", "cb"]
    assert "broken.safetensors" in errors["bad"]


def test_available_lineups_without_a_manifest_are_the_untrained_one(tmp_path):
    lineups, errors = load_available_lineups(weights_dir=tmp_path)
    assert list(lineups) == [UNTRAINED_LINEUP] and errors == {}
    assert not lineups[UNTRAINED_LINEUP].trained


def test_unknown_lineup(weights_dir):
    with pytest.raises(KeyError, match="known lineups: good, bad"):
        load_lineup("nope", weights_dir=weights_dir)
    with pytest.raises(ModelLoadError) as err:
        load_model("nope", weights_dir=weights_dir)
    assert "no model 'nope'" in str(err.value) and "base" in str(err.value) and err.value.file is None


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


def test_lineup_names_offer_the_manifest_then_untrained(weights_dir, tmp_path):
    """The manifest's lineups (default first), the paper's ImageNet lineup (loadable where its files
    are), and the untrained lineup last."""
    assert lineup_names(weights_dir) == ["good", "bad", IMAGENET_LINEUP, UNTRAINED_LINEUP]
    assert lineup_names(tmp_path) == [IMAGENET_LINEUP, UNTRAINED_LINEUP]  # no manifest
    (tmp_path / "manifest.json").write_text("{not json")
    assert lineup_names(tmp_path) == [IMAGENET_LINEUP, UNTRAINED_LINEUP]  # a broken manifest never stops the app


def test_models_locked_holds_each_lock_once_and_releases():
    a, b = make_model("resnet18"), make_model("resnet18", seed=1)
    with models_locked(b, a, b):
        assert model_lock(a)._is_owned() and model_lock(b)._is_owned()
    assert not model_lock(a)._is_owned() and not model_lock(b)._is_owned()
    assert model_lock(a) is model_lock(a) and model_lock(a) is not model_lock(b)


def test_a_lineup_entry_that_cannot_be_a_lineup_is_refused_and_the_others_stay_up(tmp_path):
    """A hand-edited manifest: a reference that is not a member, a repeated member, five members."""
    for name, arch in (("plain", "resnet18"), ("cb", "resnet18_cbam")):
        update_manifest(tmp_path, record=_record(tmp_path, name, arch))
    update_manifest(tmp_path, lineup=("good", {"members": ["plain", "cb"], "reference": "plain", "default": True}))
    update_manifest(tmp_path, lineup=("stray", {"members": ["plain", "cb"], "reference": "other"}))
    update_manifest(tmp_path, lineup=("twice", {"members": ["cb", "cb"], "reference": "cb"}))
    update_manifest(tmp_path, lineup=("five", {"members": ["plain", "cb"] * 2 + ["plain"], "reference": "plain"}))
    with pytest.raises(ValueError, match="the reference 'other' is not a member"):
        load_lineup("stray", weights_dir=tmp_path)
    lineups, errors = load_available_lineups(weights_dir=tmp_path)
    assert list(lineups) == ["good"] and sorted(errors) == ["five", "stray", "twice"]
    assert "'other'" in errors["stray"] and "1 to 4 different models" in errors["twice"]
