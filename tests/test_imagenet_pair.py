"""The paper's own ResNet-50 pair: both foreign layouts at 1000 classes, built in tmp_path (no network)."""
from __future__ import annotations

import urllib.error

import pytest
import torch
from PIL import Image

from cbam_viz import imagenet_pair as inet
from cbam_viz.models import create_model
from cbam_viz.pair import IMAGENET_PAIR, ModelLoadError, clear_cache, load_pair, pair_names, pair_unavailable_reason

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


def test_the_pair_loads_explains_and_names_the_1000_classes(files):
    from cbam_viz.explain import explain

    assert pair_unavailable_reason(IMAGENET_PAIR) is None
    pair = load_pair(IMAGENET_PAIR, device="cpu")
    assert pair.baseline.arch == "resnet50" and pair.cbam.arch == "resnet50_cbam"
    assert len(pair.cbam.classes) == 1000 and pair.cbam.classes[:2] == ("tench", "goldfish")
    assert pair.cbam.input_size == 224 and pair.cbam.record.metrics["reported_imagenet_top1"] == pytest.approx(0.77622)
    assert load_pair(IMAGENET_PAIR, device="cpu").cbam is pair.cbam  # built once, cached
    (exp,) = explain([Image.new("RGB", (96, 80), (120, 90, 60))], pair, target="goldfish", topk=3)
    assert exp.cbam.target == 1 and exp.cbam.target_label == "goldfish" and exp.cbam.cam.shape == (80, 96)
    assert len(exp.cbam.spatial_attention) == 16  # 3 + 4 + 6 + 3 bottleneck blocks, each gated
    assert not exp.baseline.spatial_attention
    assert IMAGENET_PAIR in pair_names()


def test_without_the_official_file_the_pair_says_what_to_fetch(tmp_path, monkeypatch):
    from cbam_viz import service
    from cbam_viz.messages import UserFacingError

    monkeypatch.setenv(inet.OFFICIAL_ENV, str(tmp_path / "nowhere.pth"))
    reason = pair_unavailable_reason(IMAGENET_PAIR, tmp_path)
    assert reason.count(". ") == 0 and reason.endswith(".")  # one sentence
    assert inet.OFFICIAL_FILE in reason and "Jongchan/attention-module" in reason and inet.OFFICIAL_ENV in reason
    with pytest.raises(ModelLoadError, match="official ResNet-50-CBAM"):
        load_pair(IMAGENET_PAIR, weights_dir=tmp_path)
    with pytest.raises(UserFacingError, match="Jongchan/attention-module"):
        service.get_pair(IMAGENET_PAIR)
    assert pair_unavailable_reason("resnet18-imagenette") is None  # other pairs are unaffected


def test_offline_before_the_baseline_is_cached_is_a_clear_error(files, monkeypatch):
    (files / "torch" / "hub" / "checkpoints" / "resnet50-0676ba61.pth").unlink()

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ModelLoadError) as err:
        load_pair(IMAGENET_PAIR, device="cpu")
    message = str(err.value)
    assert "not in the torch hub cache" in message and "machine with network" in message
    assert "resnet50-0676ba61.pth" in message
