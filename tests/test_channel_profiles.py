"""Channel attention per class: per-class mean gates, the class-similarity numbers, the CLI's files."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cbam_viz.engine.attention import record_attention
from cbam_viz.research.channel_profiles import (
    block_similarity, profile_dataset, profile_lineup, profiles_image, similarity_rows,
)
from cbam_viz.research.profile_files import load_lineup_profiles, load_profiles, write_lineup_profiles
from cbam_viz.training.evaluate import image_batches, labelled_images
from cbam_viz.models.cbam import CBAM, CBAMConfig
from cbam_viz.engine.loading import LoadedModel
from conftest import assert_no_hooks, make_loaded
from tests.synthetic import make_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ("c0", "c1", "c2")


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cbam = CBAM(3, CBAMConfig(reduction=1))

    def forward(self, x):
        return self.cbam(x)


class ColourNet(nn.Module):
    """Two CBAM blocks straight on the RGB input: ``layer1.0``'s channel gate opens the image's
    dominant colour (the class, in :func:`make_image_folder`), ``layer2.0``'s is a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(_Block())
        self.layer2 = nn.Sequential(_Block())
        self.fc = nn.Linear(3, 3)
        with torch.no_grad():
            mlp = self.layer1[0].cbam.channel.mlp  # gate_c = sigmoid(4 relu(4 avg_c) + 4 relu(4 max_c))
            for lin in (mlp[0], mlp[2]):
                lin.weight.copy_(4 * torch.eye(3))
                lin.bias.zero_()
            const = self.layer2[0].cbam.channel.mlp[2]  # sigmoid(2 b): the same vector for every image
            const.weight.zero_()
            const.bias.copy_(torch.tensor([-1.0, 0.25, 1.0]))

    def forward(self, x):
        return self.fc(self.layer2(self.layer1(x)).mean((2, 3)))


def _loaded(model: nn.Module, *, input_size: int = 32) -> LoadedModel:
    return LoadedModel(name="colour net", arch="colournet", model=model.eval(), classes=("red", "green", "blue"),
                       class_ids=CLASSES, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                       input_size=input_size, trained=False, record=None, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("profiles") / "val", CLASSES, per_class=4, size=(32, 32))


def test_class_dependent_gate_is_told_apart_from_a_constant_gate(folder):
    profiles = profile_dataset(_loaded(ColourNet()), folder, batch_size=5, progress=False)
    assert profiles.blocks == ["layer1.0", "layer2.0"]
    np.testing.assert_array_equal(profiles.counts, [4, 4, 4])
    m = profiles.means["layer1.0"]
    assert (m.argmax(1) == np.arange(3)).all()  # each class opens its own colour channel
    sim = block_similarity(profiles)
    # colour-coded: profiles anti-correlated across classes, class explains most of the variance
    assert sim["layer1.0"]["profile_correlation"] < 0
    assert sim["layer1.0"]["class_variance_ratio"] > 0.8
    # constant: every class has the very same profile, and there is no variance to explain
    assert sim["layer2.0"]["profile_correlation"] == pytest.approx(1.0)
    assert sim["layer2.0"]["class_variance_ratio"] == 0.0
    rows = similarity_rows(profiles)
    assert [r["block"] for r in rows] == ["layer1.0", "layer2.0"] and rows[0]["channels"] == 3


def test_means_and_variance_ratio_equal_a_direct_per_image_computation(folder):
    loaded = make_loaded("resnet18_cbam", input_size=32, seed=1)
    profiles = profile_dataset(loaded, folder, batch_size=5, progress=False)
    images = labelled_images(loaded.class_ids, folder, model_name=loaded.name)
    gates, labels = {}, []
    for x, y in image_batches(images, loaded, batch_size=1, progress=False):
        with record_attention(loaded.model) as maps, torch.no_grad():
            loaded.model(x)
        for block, g in maps.items():
            gates.setdefault(block, []).append(g["channel"][0].double().numpy())
        labels.append(int(y[0]))
    labels = np.asarray(labels)
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for block, per_image in gates.items():
        g = np.stack(per_image)
        direct = np.stack([g[labels == k].mean(0) for k in range(3)])
        np.testing.assert_allclose(profiles.means[block], direct, rtol=1e-6, atol=1e-9)
        between = sum((labels == k).sum() * ((direct[k] - g.mean(0)) ** 2).sum() for k in range(3))
        total = ((g - g.mean(0)) ** 2).sum()
        assert block_similarity(profiles)[block]["class_variance_ratio"] == pytest.approx(between / total, rel=1e-5)
    assert_no_hooks(loaded.model)


def test_a_model_without_channel_gates_is_refused(folder):
    with pytest.raises(ValueError, match="no channel gate"):
        profile_dataset(make_loaded("resnet18", input_size=32), folder, progress=False)


def test_a_lineup_profiles_every_member_with_channel_gates_se_and_bam_included(folder, tmp_path):
    """SE's gates per block, BAM's joint gate per stage transition (averaged over positions), CBAM's
    per block; the plain member is skipped; the files hold each member and read back by name."""
    from tests.research_lineups import make_lineup

    lineup = make_lineup(("resnet18", "resnet18_se", "resnet18_bam", "resnet18_cbam"), name="four")
    profiles = profile_lineup(lineup, folder, batch_size=4, workers=1, progress=False)
    assert list(profiles) == ["tiny resnet18_se", "tiny resnet18_bam", "tiny resnet18_cbam"]
    blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert profiles["tiny resnet18_se"].blocks == blocks and profiles["tiny resnet18_cbam"].blocks == blocks
    bam = profiles["tiny resnet18_bam"]
    assert bam.blocks == ["bam1", "bam2", "bam3"] and bam.means["bam2"].shape == (3, 128)
    x, y = next(iter(image_batches(labelled_images(CLASSES, folder), lineup.member("tiny resnet18_bam"),
                                   batch_size=64, workers=1, progress=False)))
    with record_attention(lineup.member("tiny resnet18_bam").model) as maps, torch.no_grad():
        lineup.member("tiny resnet18_bam").model(x)
    for k in range(3):  # the class mean of the joint gate averaged over positions
        np.testing.assert_allclose(bam.means["bam2"][k], maps["bam2"]["channel"][y == k].double().mean(0).numpy(),
                                   rtol=1e-5, atol=1e-6)
    paths = write_lineup_profiles(profiles, tmp_path / "out", lineup=lineup)
    doc = json.loads(paths["json"].read_text())
    assert doc["skipped"] == ["tiny resnet18"] and doc["members"] == list(profiles)
    back = load_lineup_profiles(tmp_path / "out")
    assert list(back) == list(profiles) and back["tiny resnet18_bam"].blocks == ["bam1", "bam2", "bam3"]
    assert load_profiles(tmp_path / "out").model_name == "tiny resnet18_cbam"  # a lineup folder: its last member
    md = paths["markdown"].read_text()
    assert "| bam2 |" in md and "tiny resnet18_se: r" in md and "No channel gate: tiny resnet18." in md
    with pytest.raises(ValueError, match="no member of lineup 'plain' has a channel gate"):
        profile_lineup(make_lineup(("resnet18",), name="plain"), folder, progress=False)


def test_figure_for_the_app_is_an_rgb_image(folder):
    profiles = profile_dataset(_loaded(ColourNet()), folder, progress=False)
    img = profiles_image(profiles)
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.width > 100


def test_cli_writes_every_file(tmp_path):
    """A manifest pair is a lineup of two: the CBAM member's files in its folder, the lineup's beside them."""
    from cbam_viz.cli import main
    from cbam_viz.models.imagenette import IMAGENETTE_NAMES
    from tests.bad_inputs import TEST_PAIR, write_test_weights

    weights = write_test_weights(tmp_path / "weights")
    data = make_image_folder(tmp_path / "val", list(IMAGENETTE_NAMES), per_class=1)
    top = tmp_path / "out"
    assert main(["channel-profiles", "--data", str(data), "--out", str(top), "--weights", str(weights),
                 "--pair", TEST_PAIR, "--max-images", "6", "--batch-size", "4", "--threads", "1",
                 "--no-progress"]) == 0
    lineup_doc = json.loads((top / "channel_profiles.json").read_text())
    (member,) = lineup_doc["members"]
    assert lineup_doc["lineup"] == TEST_PAIR and len(lineup_doc["skipped"]) == 1
    out = top / lineup_doc["folders"][member]
    assert sorted(p.name for p in out.iterdir()) == [
        "channel_profiles.json", "channel_profiles.md", "channel_profiles.png", "profiles.npz"]
    doc = json.loads((out / "channel_profiles.json").read_text())
    blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert list(doc["blocks"]) == blocks and doc["n"] == 6
    assert sum(doc["counts"].values()) == 6 and doc["blocks"]["layer4.1"]["channels"] == 512
    back = load_profiles(out)
    assert back.blocks == blocks and back.means["layer1.0"].shape == (10, 64)
    assert int(back.counts.sum()) == 6 and back.class_ids == tuple(IMAGENETTE_NAMES)
    assert back.model_name == doc["model"] and back.data == doc["data"]  # the figure's title survives a reload
    assert np.isnan(back.means["layer1.0"][back.counts == 0]).all()  # classes left out by --max-images
    sim = block_similarity(back)
    for block, numbers in doc["blocks"].items():
        for key in ("profile_correlation", "class_variance_ratio"):
            assert sim[block][key] == pytest.approx(numbers[key], abs=1e-4)
    assert doc["chance_variance_ratio"] == pytest.approx((6 - 1) / (6 - 1))  # 6 classes, one image each
    md = (out / "channel_profiles.md").read_text()
    assert "| layer1.0 | 64 |" in md and "| layer4.1 | 512 |" in md
    with Image.open(out / "channel_profiles.png") as im:
        assert im.width > 400
