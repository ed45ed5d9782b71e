"""Gate ablation's numbers against separate computations: per image, the probability change equals
the difference of two plain forwards and a gate that matters lowers the CAM correlation below 1;
per dataset, on images a tiny model gets partly right by construction, every accuracy, drop and
mean probability change equals a plain per-image loop."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cbam_viz.engine.attention import record_attention
from cbam_viz.engine.cam import compute_cams
from cbam_viz.research.ablation_report import ablate_dataset
from cbam_viz.research.gate_ablation import (
    ALL_BLOCKS, GATE_KINDS, ablate_gates, ablate_image, ablation_effects, ablation_grid, gate_means,
    load_gate_means, save_gate_means,
)
from cbam_viz.engine.preprocess import open_image, to_model_batch
from cbam_viz.stats import pearson
from conftest import assert_no_hooks, make_image, make_loaded, make_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _probs(model, x):
    with torch.no_grad():
        return model(x).softmax(1)


@pytest.fixture(scope="module")
def gated():
    """A tiny CBAM model whose layer4.1 spatial gate is ~0: its branch is switched off, so
    ablating that gate (to 1) must change both the prediction and the CAM."""
    model = make_model("resnet18_cbam", seed=1)
    with torch.no_grad():
        model.layer4[1].cbam.spatial.bn.bias.fill_(-50.0)
    return model


@pytest.fixture(scope="module")
def x():
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def test_prob_change_is_the_difference_of_two_plain_forwards_and_the_cam_moves(gated, x):
    ablations = [("layer4.1", "spatial"), ("layer3.0", "channel"), (ALL_BLOCKS, "both"), ("layer4.1", "channel")]
    effects = ablation_effects(gated, x, ablations=ablations, layer="layer4.1")
    p0 = _probs(gated, x)
    top = p0.argmax(1)
    assert effects[("intact", "")]["class"].tolist() == top.tolist()
    np.testing.assert_allclose(effects[("intact", "")]["prob"], p0.gather(1, top[:, None])[:, 0].double(), atol=1e-6)
    intact_cams = compute_cams(gated, x, layer="layer4.1", targets=top.tolist()).cams
    for block, gate in ablations:
        with ablate_gates(gated, blocks=block, gate=gate):
            p = _probs(gated, x)
            cams = compute_cams(gated, x, layer="layer4.1", targets=top.tolist()).cams
        expected = (p - p0).gather(1, top[:, None])[:, 0].double().numpy()
        np.testing.assert_allclose(effects[(block, gate)]["prob_change"], expected, atol=1e-6, err_msg=f"{block} {gate}")
        corr = [pearson(a, b) for a, b in zip(intact_cams, cams)]
        np.testing.assert_allclose(effects[(block, gate)]["cam_correlation"], corr, atol=1e-6)
    switched_on = effects[("layer4.1", "spatial")]
    assert np.abs(switched_on["prob_change"]).max() > 1e-3
    assert switched_on["cam_correlation"].min() < 0.99  # a new branch adds to the CAM's layer
    # The channel gate of that block feeds the branch its spatial gate discards: a true no-op.
    np.testing.assert_allclose(effects[("layer4.1", "channel")]["cam_correlation"], 1.0, atol=1e-5)
    assert_no_hooks(gated)


def test_default_grid_and_mean_constant(gated, x):
    means = gate_means(gated, [x])
    effects = ablation_effects(gated, x, constant="mean", means=means)
    assert set(effects) == {("intact", "")} | set(ablation_grid(gated))
    p0 = _probs(gated, x)
    top = p0.argmax(1, keepdim=True)
    with ablate_gates(gated, blocks="layer2.1", gate="both", constant="mean", means=means):
        p = _probs(gated, x)
    np.testing.assert_allclose(effects[("layer2.1", "both")]["prob_change"],
                               (p.gather(1, top) - p0.gather(1, top))[:, 0].double().numpy(), atol=1e-6)


def test_gate_means_of_one_image_and_of_none(gated, x):
    one = gate_means(gated, [x[:1]])
    with record_attention(gated) as maps, torch.no_grad():
        gated(x[:1])
    torch.testing.assert_close(one["layer3.1"]["channel"], maps["layer3.1"]["channel"][0])
    with pytest.raises(ValueError, match="no images"):
        gate_means(gated, [])


def test_ablate_image_default_rows_are_every_block_and_gate_then_all_blocks():
    loaded = make_loaded("resnet18_cbam", input_size=32, seed=1)
    rows = ablate_image(loaded, make_image(40, 30, seed=6), layer="layer2.1")
    assert [(r["block"], r["gate"]) for r in rows] == ablation_grid(loaded.model)
    assert rows[-1]["block"] == ALL_BLOCKS


def test_ablate_image_rows_equal_plain_forwards_of_the_apps_input(gated):
    loaded = make_loaded("resnet18_cbam", seed=1)
    loaded.model.load_state_dict(gated.state_dict())
    picture = make_image(80, 60, seed=5)
    rows = ablate_image(loaded, picture, gates=("spatial",), include_all=False, layer="layer4.1")
    assert [(r["block"], r["gate"]) for r in rows] == [(b, "spatial") for b in ablation_grid(gated, include_all=False)
                                                      if b[1] == "spatial" for b in [b[0]]]
    x = to_model_batch([picture], loaded.input_size, loaded.mean, loaded.std)
    p0 = _probs(loaded.model, x)[0]
    top = int(p0.argmax())
    for r in rows:
        with ablate_gates(loaded.model, blocks=r["block"], gate="spatial"):
            p = _probs(loaded.model, x)[0]
        assert r["prob_change"] == pytest.approx(float(p[top] - p0[top]), abs=1e-6)
    last = rows[-1]
    assert last["block"] == "layer4.1" and last["cam_correlation"] < 0.99 and abs(last["prob_change"]) > 1e-3


# ------------------------------------------------------------------------------- the dataset


@pytest.fixture(scope="module")
def partly_right(tmp_path_factory, gated):
    """12 pictures filed under the class the intact model predicts for them, except every third,
    filed under another class: the intact top-1 is 8/12 by construction."""
    loaded = make_loaded("resnet18_cbam", input_size=32, seed=1)
    loaded.model.load_state_dict(gated.state_dict())
    root = tmp_path_factory.mktemp("ablation") / "val"
    for cid in loaded.class_ids:
        (root / cid).mkdir(parents=True)
    pictures = [make_image(40, 36, seed=100 + i) for i in range(12)]
    pred = _probs(loaded.model, to_model_batch(pictures, 32, loaded.mean, loaded.std)).argmax(1).tolist()
    for i, (pic, p) in enumerate(zip(pictures, pred)):
        label = p if i % 3 else (p + 1 + i % 2) % 3
        pic.save(root / loaded.class_ids[label] / f"im{i:02d}.png")
    return loaded, root


def _plain_loop(loaded, root, grid, *, constant="one", means=None):
    """Accuracy and mean probability change per ablation, one image and one forward at a time."""
    files = sorted(root.glob("*/*.png"))
    hits = {key: [] for key in [("intact", ""), *grid]}
    change = {key: [] for key in grid}
    for f in files:
        label = loaded.class_ids.index(f.parent.name)
        x = to_model_batch([open_image(f)], loaded.input_size, loaded.mean, loaded.std)
        p0 = _probs(loaded.model, x)[0]
        top = int(p0.argmax())
        hits[("intact", "")].append(top == label)
        for block, gate in grid:
            with ablate_gates(loaded.model, blocks=block, gate=gate, constant=constant, means=means):
                p = _probs(loaded.model, x)[0]
            hits[(block, gate)].append(int(p.argmax()) == label)
            change[(block, gate)].append(float(p[top] - p0[top]))
    return {k: float(np.mean(v)) for k, v in hits.items()}, {k: float(np.mean(v)) for k, v in change.items()}


def test_dataset_accuracies_drops_and_prob_changes_equal_a_plain_loop(partly_right):
    import time

    loaded, root = partly_right
    t0 = time.perf_counter()
    report, means = ablate_dataset(loaded, root, batch_size=5, workers=1, n_boot=200, progress=False)
    wall = time.perf_counter() - t0
    assert 0 <= report["seconds"] <= wall + 0.01 and report["seconds"] == round(report["seconds"], 2)
    assert means is None and report["n"] == 12 and report["constant"] == "one"
    assert report["intact_top1"] == pytest.approx(8 / 12)
    grid = ablation_grid(loaded.model)
    top1, change = _plain_loop(loaded, root, grid)
    assert [(r["block"], r["gate"]) for r in report["rows"]] == grid
    for r in report["rows"]:
        key = (r["block"], r["gate"])
        assert r["top1"] == pytest.approx(top1[key]), key
        assert r["drop"]["value"] == pytest.approx(top1[("intact", "")] - top1[key]), key
        assert r["drop"]["n"] == 12 and r["drop"]["low"] <= r["drop"]["value"] <= r["drop"]["high"]
        assert r["mean_prob_change"] == pytest.approx(change[key], abs=1e-6), key
    assert any(abs(v) > 1e-3 for v in change.values())
    assert report["model"] == {"name": loaded.name, "arch": loaded.arch, "trained": False, "input_size": 32}
    assert report["settings"]["max_images"] is None and report["settings"]["batch_size"] == 5
    default, _ = ablate_dataset(loaded, root, progress=False)  # one batch of 32, 2000 resamples, seed 0
    assert {k: default["settings"][k] for k in ("n_boot", "seed", "batch_size")} == {
        "n_boot": 2000, "seed": 0, "batch_size": 32}
    for a, b in zip(default["rows"], report["rows"]):  # the batching changes no number
        assert a["top1"] == b["top1"] and a["mean_prob_change"] == pytest.approx(b["mean_prob_change"], abs=1e-6)


def test_dataset_mean_ablation_uses_the_means_of_the_same_images(partly_right, tmp_path):
    loaded, root = partly_right
    report, means = ablate_dataset(loaded, root, constant="mean", gates=("channel",), batch_size=4, workers=1,
                                   n_boot=100, progress=False)
    files = sorted(root.glob("*/*.png"))
    x = to_model_batch([open_image(f) for f in files], loaded.input_size, loaded.mean, loaded.std)
    with record_attention(loaded.model) as maps, torch.no_grad():
        loaded.model(x)
    for block, gate in maps.items():
        torch.testing.assert_close(means[block]["channel"], gate["channel"].mean(0), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(means[block]["spatial"], gate["spatial"].mean(), atol=1e-6, rtol=1e-5)
    grid = ablation_grid(loaded.model, gates=("channel",))
    top1, change = _plain_loop(loaded, root, grid, constant="mean", means=means)
    for r in report["rows"]:
        assert r["top1"] == pytest.approx(top1[(r["block"], r["gate"])])
        assert r["mean_prob_change"] == pytest.approx(change[(r["block"], r["gate"])], abs=1e-6)
    path = save_gate_means(means, tmp_path / "m.npz")
    back = load_gate_means(path)
    assert set(back) == set(means)
    for block in means:
        for kind in ("channel", "spatial"):
            torch.testing.assert_close(back[block][kind], means[block][kind])
    limited, _ = ablate_dataset(loaded, root, gates=("spatial",), max_images=6, batch_size=4, workers=1,
                                n_boot=50, progress=False)
    assert limited["n"] == 6 and [r["gate"] for r in limited["rows"]] == ["spatial"] * 9
    assert set(GATE_KINDS) == {"channel", "spatial", "both"}
