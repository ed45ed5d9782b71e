"""The paper's own ResNet-50 lineup (a plain ResNet-50 and its CBAM twin): both foreign layouts at 1000 classes, built in tmp_path (no network)."""
from __future__ import annotations

import urllib.error

import pytest
import torch
from PIL import Image

from cbam_viz.engine import imagenet as inet
from cbam_viz.models import create_model
from cbam_viz.engine.lineup import IMAGENET_LINEUP, lineup_names, lineup_unavailable_reason, load_lineup
from cbam_viz.engine.loading import ModelLoadError, clear_cache

pytestmark = pytest.mark.usefixtures("one_thread", "no_cbam_env")

# Our key -> the official Jongchan/attention-module key (the inverse of checkpoints' renames).
_TO_OFFICIAL = ((".cbam.channel.mlp.0.", ".cbam.ChannelGate.mlp.1."), (".cbam.channel.mlp.2.", ".cbam.ChannelGate.mlp.3."),
                (".cbam.spatial.conv.", ".cbam.SpatialGate.spatial.conv."), (".cbam.spatial.bn.", ".cbam.SpatialGate.spatial.bn."))


def _official_checkpoint(path):
    """A ResNet-50-CBAM training checkpoint as the official code saves it: DataParallel keys, wrapped."""
    torch.manual_seed(1)
    state = create_model("resnet50_cbam", num_classes=1000).state_dict()
    renamed = {}
    for key, value in state.items():
        for ours, theirs in _TO_OFFICIAL:
            key = key.replace(ours, theirs)
        renamed["module." + key] = value
    torch.save({"epoch": 100, "arch": "resnet", "best_prec1": 77.622, "state_dict": renamed}, path)
    return path


@pytest.fixture()
def files(tmp_path, monkeypatch):
    """The torchvision file in a fresh torch hub cache, the official file where the env var says."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(create_model("resnet50", num_classes=1000).state_dict(), cache / "resnet50-0676ba61.pth")
    monkeypatch.setenv(inet.OFFICIAL_ENV, str(_official_checkpoint(tmp_path / inet.OFFICIAL_FILE)))
    clear_cache()
    yield tmp_path
    clear_cache()


def test_the_lineup_loads_explains_and_names_the_1000_classes(files):
    from cbam_viz.engine.explain import explain

    assert lineup_unavailable_reason(IMAGENET_LINEUP) is None
    lineup = load_lineup(IMAGENET_LINEUP, device="cpu")
    plain, cbam = lineup.members
    assert lineup.name == IMAGENET_LINEUP and lineup.reference == plain.name and len(lineup.members) == 2
    assert plain.arch == "resnet50" and cbam.arch == "resnet50_cbam"
    assert len(cbam.classes) == 1000 and cbam.classes[:2] == ("tench", "goldfish")
    assert cbam.input_size == 224 and cbam.record.metrics["reported_imagenet_top1"] == pytest.approx(0.77622)
    assert load_lineup(IMAGENET_LINEUP, device="cpu").members[-1] is cbam  # built once, cached
    (exp,) = explain([Image.new("RGB", (96, 80), (120, 90, 60))], lineup, target="goldfish", topk=3)
    assert list(exp.models) == lineup.names and exp.reference == plain.name
    got = exp.models[cbam.name]
    assert got.target == 1 and got.target_label == "goldfish" and got.cam.shape == (80, 96)
    assert len(got.spatial_attention) == 16  # 3 + 4 + 6 + 3 bottleneck blocks, each gated
    assert not exp.models[plain.name].spatial_attention
    assert IMAGENET_LINEUP in lineup_names()


def test_without_the_official_file_the_lineup_says_what_to_fetch(tmp_path, monkeypatch):
    from cbam_viz import service
    from cbam_viz.messages import UserFacingError

    monkeypatch.setenv(inet.OFFICIAL_ENV, str(tmp_path / "nowhere.pth"))
    reason = lineup_unavailable_reason(IMAGENET_LINEUP, tmp_path)
    assert reason.count(". ") == 0 and reason.endswith(".")  # one sentence
    assert inet.OFFICIAL_FILE in reason and "Jongchan/attention-module" in reason and inet.OFFICIAL_ENV in reason
    with pytest.raises(ModelLoadError, match="official ResNet-50-CBAM"):
        load_lineup(IMAGENET_LINEUP, weights_dir=tmp_path)
    with pytest.raises(UserFacingError, match="Jongchan/attention-module"):
        service.get_lineup(IMAGENET_LINEUP)
    assert lineup_unavailable_reason("resnet18-imagenette") is None  # other lineups are unaffected


def test_offline_before_the_baseline_is_cached_is_a_clear_error(files, monkeypatch):
    (files / "torch" / "hub" / "checkpoints" / "resnet50-0676ba61.pth").unlink()

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ModelLoadError) as err:
        load_lineup(IMAGENET_LINEUP, device="cpu")
    message = str(err.value)
    assert "not in the torch hub cache" in message and "machine with network" in message
    assert "resnet50-0676ba61.pth" in message
