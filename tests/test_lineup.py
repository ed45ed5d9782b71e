"""Lineups: 1 to 4 members named by their records, a reference, from lineups or old pairs, in every folder."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from cbam_viz.engine.lineup import (
    IMAGENET_LINEUP, UNTRAINED_LINEUP, Lineup, default_lineup_name, lineup_names, load_lineup,
)
from cbam_viz.models.importer import add_lineup, add_model
from cbam_viz.models import create_model
from cbam_viz.engine.loading import ModelLoadError, clear_cache
from cbam_viz.models.weights import WEIGHTS_DIR_ENV, read_manifest, save_safetensors
from tests.bad_inputs import write_test_weights
from tests.foreign_models import randomize

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = ("resnet18", "resnet18_se", "resnet18_bam", "resnet18_cbam")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A folder with the four members of the family (3 classes each) and two lineups."""
    tmp = tmp_path_factory.mktemp("family")
    weights = tmp / "w"
    weights.mkdir()
    for seed, arch in enumerate(ARCHS):
        save_safetensors(randomize(create_model(arch, num_classes=3), seed=seed), tmp / f"{arch}.safetensors", dtype=None)
        add_model(tmp / f"{arch}.safetensors", name=arch, weights_dir=weights, input_size=32)
    add_lineup("family", list(ARCHS), weights_dir=weights, default=True)
    add_lineup("solo", ["resnet18_cbam"], weights_dir=weights)
    return weights


@pytest.fixture
def env(family, monkeypatch):
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(family))
    clear_cache()
    yield family
    clear_cache()


def test_a_lineup_of_four_loads_its_members_in_order_with_the_plain_model_as_reference(env):
    lineup = load_lineup()
    assert lineup.name == "family" and lineup.names == list(ARCHS)
    assert lineup.reference == "resnet18" and [m.name for m in lineup.others] == list(ARCHS[1:])
    assert [m.arch for m in lineup.members] == list(ARCHS)
    x = torch.randn(1, 3, 32, 32)
    outs = [m.model(x) for m in lineup.members]
    assert all(not torch.equal(outs[0], o) for o in outs[1:])  # four different models, not one four times


def test_a_lineup_of_one(env):
    lineup = load_lineup("solo")
    assert lineup.names == ["resnet18_cbam"] and lineup.reference == "resnet18_cbam" and lineup.others == ()


def test_old_pairs_are_lineups_of_two(tmp_path, monkeypatch):
    folder = write_test_weights(tmp_path / "old")
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(folder))
    clear_cache()
    name, pair = next(iter(read_manifest(folder)["pairs"].items()))
    assert lineup_names() == [name, IMAGENET_LINEUP, UNTRAINED_LINEUP] and default_lineup_name() == name
    lineup = load_lineup()
    assert lineup.name == name and lineup.names == [pair["baseline"], pair["cbam"]] and lineup.reference == pair["baseline"]
    assert [m.arch for m in lineup.members] == ["resnet18", "resnet18_cbam"]
    assert load_lineup(name) == lineup
    clear_cache()


def test_lineups_of_every_folder_first_wins(family, tmp_path, monkeypatch):
    old = write_test_weights(tmp_path / "old")
    monkeypatch.setenv(WEIGHTS_DIR_ENV, f"{family}{os.pathsep}{old}")
    clear_cache()
    pair = next(iter(read_manifest(old)["pairs"]))
    assert lineup_names() == ["family", "solo", pair, IMAGENET_LINEUP, UNTRAINED_LINEUP]
    assert load_lineup(pair).reference == read_manifest(old)["pairs"][pair]["baseline"]
    clear_cache()


def test_unknown_lineup_and_broken_member(env, tmp_path):
    with pytest.raises(KeyError, match="known lineups: family, solo"):
        load_lineup("nope")
    record = read_manifest(env)["models"]["resnet18_bam"]
    path = env / record["file"]
    original = path.read_bytes()
    try:
        path.write_bytes(original[:-8] + b"\0" * 8)
        clear_cache()
        with pytest.raises(ModelLoadError, match="lineup 'family'") as err:
            load_lineup("family")
        assert err.value.model_name == "resnet18_bam"
    finally:
        path.write_bytes(original)
        clear_cache()


def test_a_lineup_checks_its_own_shape(env):
    lineup = load_lineup()
    with pytest.raises(ValueError, match="1 to 4 different models"):
        Lineup("x", lineup.members + lineup.members[:1], reference="resnet18")
    with pytest.raises(ValueError, match="is not a member"):
        Lineup("x", lineup.members[1:], reference="resnet18")
    with pytest.raises(KeyError, match="members: resnet18, resnet18_se"):
        lineup.member("nobody")


def test_explain_gives_each_member_what_explain_model_gives_it(env):
    from PIL import Image

    from cbam_viz.engine.explain import explain, explain_model

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    lineup = load_lineup()
    (result,) = explain(image, lineup, method="gradcam", layer="layer4.1")
    assert list(result.models) == list(ARCHS) and result.reference == "resnet18" and result.image_size == (48, 40)
    for member in lineup.members:
        (alone,) = explain_model(image, member, method="gradcam", layer="layer4.1")
        got = result.models[member.name]
        assert got.predictions == alone.predictions and got.target == alone.target
        np.testing.assert_allclose(got.cam, alone.cam, atol=1e-6)
        assert set(got.channel_attention) == set(alone.channel_attention)
    gates = {name: (set(e.channel_attention), set(e.spatial_attention)) for name, e in result.models.items()}
    assert gates["resnet18"] == (set(), set())
    assert gates["resnet18_se"][1] == set() and len(gates["resnet18_se"][0]) == 8  # SE: channel gates only
    assert gates["resnet18_bam"] == ({"bam1", "bam2", "bam3"}, {"bam1", "bam2", "bam3"})
    assert len(gates["resnet18_cbam"][0]) == len(gates["resnet18_cbam"][1]) == 8
    (dog,) = explain(image, lineup, target=1)
    assert {e.target for e in dog.models.values()} == {1}
