"""Gate ablation: constant gates through hooks, restored afterwards, under the model's lock."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from cbam_viz.engine.attention import record_attention
from cbam_viz.research.ablation_report import ablation_chart
from cbam_viz.research.gate_ablation import (
    ALL_BLOCKS, ablate_gates, ablate_image, ablation_effects, ablation_grid, gate_means, gated_blocks,
    load_gate_means,
)
from cbam_viz.engine.locks import model_lock
from cbam_viz.stats import pearson
from conftest import assert_no_hooks, make_image, make_loaded, make_model

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCKS = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]


@pytest.fixture(scope="module")
def cbam_model():
    return make_model("resnet18_cbam", seed=1)


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _logits(model, x):
    with model_lock(model), torch.no_grad():
        return model(x)


def test_grid_lists_every_block_and_gate_then_all_blocks(cbam_model):
    assert gated_blocks(cbam_model) == BLOCKS
    grid = ablation_grid(cbam_model)
    assert grid[:3] == [("layer1.0", "channel"), ("layer1.0", "spatial"), ("layer1.0", "both")]
    assert grid[-3:] == [(ALL_BLOCKS, g) for g in ("channel", "spatial", "both")]
    assert len(grid) == 3 * (len(BLOCKS) + 1)


def test_ablating_gates_that_are_already_one_changes_nothing(x):
    model = make_model("resnet18_cbam", seed=1)
    with torch.no_grad():  # every channel gate saturates: sigmoid(40) == 1.0 in float32
        for name, m in model.named_modules():
            if name.endswith("cbam.channel"):
                m.mlp[2].weight.zero_()
                m.mlp[2].bias.fill_(20.0)
    with record_attention(model) as maps, torch.no_grad():
        model(x)
    assert all(float(g["channel"].min()) == 1.0 for g in maps.values())
    ablations = [(b, "channel") for b in BLOCKS] + [(ALL_BLOCKS, "channel")]
    effects = ablation_effects(model, x, ablations=ablations, constant="one")
    for key in ablations:
        np.testing.assert_allclose(effects[key]["prob_change"], 0.0, atol=1e-6)
        np.testing.assert_allclose(effects[key]["cam_correlation"], 1.0, atol=1e-5)


def test_a_spatial_gate_that_zeroes_its_block_matters_when_ablated(x):
    model = make_model("resnet18_cbam", seed=1)
    with torch.no_grad():
        model.layer4[1].cbam.spatial.bn.bias.fill_(-50.0)  # gate ~ 0: the CBAM branch is switched off
    with record_attention(model) as maps, torch.no_grad():
        model(x)
    assert float(maps["layer4.1"]["spatial"].max()) < 1e-6
    before = _logits(model, x)
    with ablate_gates(model, blocks="layer4.1", gate="spatial", constant="one"):
        after = _logits(model, x)
    assert (after - before).abs().max() > 1e-2
    effects = ablation_effects(model, x, ablations=[("layer4.1", "spatial"), ("layer4.1", "channel")])
    assert np.abs(effects[("layer4.1", "spatial")]["prob_change"]).max() > 1e-3
    # the channel gate of that block feeds a branch the spatial gate discards: ablating it is a no-op
    np.testing.assert_allclose(effects[("layer4.1", "channel")]["prob_change"], 0.0, atol=1e-5)


def test_hooks_are_removed_and_outputs_restored_also_after_an_exception(cbam_model, x):
    reference = _logits(cbam_model, x)
    with ablate_gates(cbam_model, gate="both"):
        ablated = _logits(cbam_model, x)
    assert not torch.allclose(ablated, reference)
    assert_no_hooks(cbam_model)
    torch.testing.assert_close(_logits(cbam_model, x), reference, rtol=0, atol=0)

    with pytest.raises(RuntimeError, match="boom"):
        with ablate_gates(cbam_model, blocks=["layer2.0", "layer3.1"], gate="spatial"):
            _logits(cbam_model, x)
            raise RuntimeError("boom")
    assert_no_hooks(cbam_model)
    torch.testing.assert_close(_logits(cbam_model, x), reference, rtol=0, atol=0)
    assert _free_in_another_thread(cbam_model), "the lock was not released after the exception"


def _free_in_another_thread(model) -> bool:
    """Whether another thread could take the model's lock right now (it gives it straight back)."""
    got = {}

    def probe():
        lock = model_lock(model)
        got["free"] = lock.acquire(blocking=False)
        if got["free"]:
            lock.release()

    t = threading.Thread(target=probe)
    t.start()
    t.join()
    return got["free"]


def test_another_threads_forward_waits_for_the_ablation_and_sees_the_intact_model(cbam_model, x):
    intact = _logits(cbam_model, x)
    entered, tried = threading.Event(), threading.Event()
    seen = {}

    def other_request():
        entered.wait()
        lock = model_lock(cbam_model)
        seen["free"] = lock.acquire(blocking=False)
        if seen["free"]:
            lock.release()
        tried.set()
        seen["out"] = _logits(cbam_model, x)  # blocks until the ablation is over

    thread = threading.Thread(target=other_request)
    thread.start()
    with ablate_gates(cbam_model, gate="both"):
        entered.set()
        assert tried.wait(timeout=120)  # only guards against a hang; no timing is asserted
        ablated = _logits(cbam_model, x)
    thread.join(timeout=120)
    assert seen["free"] is False, "the lock was free while the gates were replaced"
    torch.testing.assert_close(seen["out"], intact, rtol=0, atol=0)
    assert not torch.allclose(ablated, intact)


def test_mean_ablation_feeds_the_dataset_means_and_the_means_are_direct_averages(cbam_model, x):
    batches = [x[:1], (x[1:], torch.tensor([0]))]  # plain tensors or (x, labels) pairs
    means = gate_means(cbam_model, batches)
    with record_attention(cbam_model) as maps, torch.no_grad():
        cbam_model(x)
    for block in BLOCKS:
        torch.testing.assert_close(means[block]["channel"], maps[block]["channel"].mean(0))
        torch.testing.assert_close(means[block]["spatial"], maps[block]["spatial"].mean())
    with ablate_gates(cbam_model, gate="both", constant="mean", means=means), \
            record_attention(cbam_model) as seen, torch.no_grad():
        cbam_model(x)
    for block in BLOCKS:
        torch.testing.assert_close(seen[block]["channel"], means[block]["channel"].expand(2, -1))
        torch.testing.assert_close(seen[block]["spatial"], means[block]["spatial"].expand_as(seen[block]["spatial"]))
    assert_no_hooks(cbam_model)


def test_wrong_names_and_missing_means_fail_before_any_hook(cbam_model):
    with pytest.raises(ValueError, match="no gated block.*layer9.0"):
        with ablate_gates(cbam_model, blocks="layer9.0"):
            pass
    with pytest.raises(ValueError, match="unknown gate"):
        with ablate_gates(cbam_model, gate="attention"):
            pass
    with pytest.raises(ValueError, match="needs the dataset means of layer1.0.channel"):
        with ablate_gates(cbam_model, blocks="layer1.0", gate="channel", constant="mean", means={}):
            pass
    with pytest.raises(ValueError, match="no attention gate"):
        with ablate_gates(make_model("resnet18")):
            pass
    with pytest.raises(ValueError, match="layer1.0 has no spatial gate; it has: channel"):
        with ablate_gates(make_model("resnet18_se"), blocks="layer1.0", gate="spatial"):
            pass
    assert_no_hooks(cbam_model)


def test_pearson_handles_flat_maps():
    a = np.arange(16.0).reshape(4, 4)
    assert pearson(a, a) == pytest.approx(1.0)
    assert pearson(a, -a) == pytest.approx(-1.0)
    assert pearson(a, np.zeros_like(a)) == 0.0
    assert pearson(np.zeros_like(a), np.zeros_like(a)) == 1.0


def test_one_image_rows_and_chart_for_the_app():
    loaded = make_loaded("resnet18_cbam", seed=1)
    rows = ablate_image(loaded, make_image(80, 60), gates=("spatial",), include_all=True)
    assert [(r["block"], r["gate"]) for r in rows] == [(b, "spatial") for b in BLOCKS + [ALL_BLOCKS]]
    for r in rows:
        assert set(r) == {"block", "gate", "prob_change", "cam_correlation"}
        assert -1 <= r["prob_change"] <= 1 and -1 <= r["cam_correlation"] <= 1
    assert any(abs(r["prob_change"]) > 1e-4 for r in rows)
    chart = ablation_chart(rows, title="tiny")
    assert chart.mode == "RGB" and chart.height > 14 * len(rows)
    assert len(np.unique(np.asarray(chart).reshape(-1, 3), axis=0)) > 2  # bars and text, not a blank canvas
    assert_no_hooks(loaded.model)


def test_cli_writes_table_and_json_with_paired_intervals(tmp_path):
    """A manifest pair is a lineup of two: the plain member is skipped, the CBAM member ablated."""
    from cbam_viz.cli import main
    from cbam_viz.models.imagenette import IMAGENETTE_NAMES
    from cbam_viz.training.evaluate import evaluate_record, resolve_models
    from tests.bad_inputs import TEST_PAIR, write_test_weights
    from tests.synthetic import make_image_folder

    weights = write_test_weights(tmp_path / "weights")
    data = make_image_folder(tmp_path / "val", list(IMAGENETTE_NAMES), per_class=1)
    out = tmp_path / "out"
    assert main(["ablate-gates", "--data", str(data), "--weights", str(weights), "--lineup", TEST_PAIR,
                 "--out", str(out), "--batch-size", "4", "--threads", "1", "--no-progress", "--constant", "mean"]) == 0
    doc = json.loads((out / "gate_ablation.json").read_text())
    plain_record, cbam_record = resolve_models(weights, lineup=TEST_PAIR)
    assert doc["lineup"] == TEST_PAIR and doc["skipped"] == [plain_record.name]
    assert list(doc["models"]) == [cbam_record.name]
    report = doc["models"][cbam_record.name]
    assert report["n"] == 10 and report["constant"] == "mean"
    evaluated = evaluate_record(cbam_record, data, weights_dir=weights, progress=False)
    assert report["intact_top1"] == pytest.approx(evaluated.top1)  # decoded and labelled as `evaluate` does
    assert [(r["block"], r["gate"]) for r in report["rows"]] == [
        (b, g) for b in BLOCKS + [ALL_BLOCKS] for g in ("channel", "spatial", "both")]
    for r in report["rows"]:
        d = r["drop"]
        assert d["n"] == 10 and d["low"] <= d["value"] <= d["high"]
        assert d["value"] == pytest.approx(report["intact_top1"] - r["top1"])
    md = (out / "gate_ablation.md").read_text()
    assert "| layer4.1 | spatial |" in md and "| all | both |" in md and f"No gate to ablate: {plain_record.name}" in md
    means = load_gate_means(out / f"gate_means_{cbam_record.name}.npz")
    assert means["layer1.0"]["channel"].shape == (64,) and means["layer4.1"]["spatial"].shape == ()


# ------------------------------------------------------------------------- the attention family


def test_se_blocks_have_a_channel_gate_only_and_switching_it_off_removes_the_se_module(x):
    """Known answer: SE's gate set to 1 is the block without its SE module (``x * 1``)."""
    import copy

    se = make_model("resnet18_se", seed=2)
    assert gated_blocks(se) == BLOCKS
    assert ablation_grid(se) == [(b, "channel") for b in BLOCKS] + [(ALL_BLOCKS, "channel")]
    plain = copy.deepcopy(se)
    for name, module in list(plain.named_modules()):
        if name.endswith(".se"):
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent), child, torch.nn.Identity())
    with ablate_gates(se, gate="channel"):
        ablated = _logits(se, x)
    torch.testing.assert_close(ablated, _logits(plain, x))
    assert not torch.allclose(ablated, _logits(se, x))
    means = gate_means(se, [x])
    assert set(means["layer2.0"]) == {"channel"} and means["layer2.0"]["channel"].shape == (128,)
    assert_no_hooks(se)


def test_bam_modules_ablate_as_one_joint_gate_and_off_is_the_identity(x):
    """Known answer: BAM's joint gate set to its off value (0) makes ``x * (1 + 0)``: the network
    without its BAM modules; ``both`` is the only choice a BAM module has."""
    import copy

    bam = make_model("resnet18_bam", seed=3)
    assert gated_blocks(bam) == ["bam1", "bam2", "bam3"]
    assert ablation_grid(bam) == [("bam1", "both"), ("bam2", "both"), ("bam3", "both"), (ALL_BLOCKS, "both")]
    plain = copy.deepcopy(bam)
    plain.bam2 = torch.nn.Identity()
    with ablate_gates(bam, blocks="bam2"):
        ablated = _logits(bam, x)
    torch.testing.assert_close(ablated, _logits(plain, x))
    assert not torch.allclose(ablated, _logits(bam, x))
    with pytest.raises(ValueError, match="bam1 has no spatial gate; it has: joint"):
        with ablate_gates(bam, blocks="bam1", gate="spatial"):
            pass
    means = gate_means(bam, [x])
    with record_attention(bam) as maps, torch.no_grad():
        bam(x)
    torch.testing.assert_close(means["bam2"]["joint"], maps["bam2"]["channel"].mean(0))  # per channel, over positions
    rows = ablate_image(make_loaded("resnet18_bam", seed=3), make_image(80, 60), include_all=False)
    assert [(r["block"], r["gate"]) for r in rows] == [("bam1", "both"), ("bam2", "both"), ("bam3", "both")]
    assert_no_hooks(bam)


def test_ablate_lineup_runs_every_gated_member_and_skips_the_plain_one(tmp_path):
    from cbam_viz.research.ablation_report import ablate_lineup, markdown_report, write_report
    from tests.research_lineups import make_lineup
    from tests.synthetic import make_image_folder

    lineup = make_lineup(("resnet18", "resnet18_se", "resnet18_bam"))
    data = make_image_folder(tmp_path / "val", ["c0", "c1", "c2"], per_class=1)
    report, means = ablate_lineup(lineup, data, constant="mean", gates=("both",), batch_size=3, workers=1,
                                  n_boot=50, progress=False)
    assert report["skipped"] == ["tiny resnet18"] and list(report["models"]) == ["tiny resnet18_se", "tiny resnet18_bam"]
    assert [r["block"] for r in report["models"]["tiny resnet18_bam"]["rows"]] == ["bam1", "bam2", "bam3", "all"]
    assert report["models"]["tiny resnet18_se"]["rows"] == []  # SE has no "both" row: its channel gate is the whole of it
    assert set(means) == {"tiny resnet18_se", "tiny resnet18_bam"}
    paths = write_report(report, tmp_path / "out", means=means)
    assert (tmp_path / "out" / "gate_means_tiny_resnet18_bam.npz").is_file() and paths["json"].is_file()
    assert "### tiny resnet18_bam" in markdown_report(report)
    with pytest.raises(ValueError, match="no member of lineup 'plain' has an attention gate"):
        ablate_lineup(make_lineup(("resnet18",), name="plain"), data, progress=False)
