"""The trainer on a tiny generated dataset: learning, exact resume, seeding, logs and export."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from cbam_viz.models import create_model
from cbam_viz.training.export import export_record
from cbam_viz.training.recipe import Recipe, train_size_at
from cbam_viz.training.train import train
from cbam_viz.models.weights import WeightRecord, load_record, read_manifest, sha256_file
from tests.synthetic import make_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ("n001", "n002", "n003")
# lr 0.1 (the full recipe) is too hot for batches of 8: the loss jumps around; 0.02 learns steadily.
# No holdout and no weight average here (their own tests below), so every file trains and --val is monitored.
RECIPE = Recipe(epochs=3, batch_size=8, sizes=((0, 32),), cache_size=40, eval_size=32, bf16=False, lr=0.02,
                holdout=0.0, ema_decay=0.0)
STEPS_PER_EPOCH = 48 // 8


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data") / "train", CLASSES)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def full_run(dataset, cache, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "resnet18"
    return train("resnet18", dataset, run_dir, recipe=RECIPE, cache_dir=cache, val_dir=dataset, progress=False)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_recipe_json_round_trip_and_sizes():
    r = Recipe(sizes=((0, 112), (6, 128), (13, 160)))
    assert Recipe.from_json(json.loads(json.dumps(r.to_json()))) == r
    assert [train_size_at(r, e) for e in (0, 5, 6, 12, 13, 19)] == [112, 112, 128, 128, 160, 160]


def test_loss_falls_and_log_has_one_line_per_epoch(full_run):
    hist = full_run.history
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert hist[-1]["train_loss"] < 0.8 * hist[0]["train_loss"]
    assert hist[-1]["val_top1"] > 0.5  # chance is 1/3: the colours were learned
    assert all(h["size"] == 32 for h in hist)
    assert "val_top1" in hist[-1] and 0.0 <= hist[-1]["val_top1"] <= 1.0
    lines = (full_run.run_dir / "log.jsonl").read_text().splitlines()
    assert [json.loads(ln)["epoch"] for ln in lines] == [1, 2, 3]
    assert not full_run.model.training


def test_cut_then_resume_equals_uninterrupted(full_run, dataset, cache, tmp_path):
    run_dir = tmp_path / "resnet18"
    cut = train("resnet18", dataset, run_dir, recipe=RECIPE, cache_dir=cache, val_dir=dataset, progress=False,
                max_steps=STEPS_PER_EPOCH + 3)  # one epoch and half of the next
    assert len(cut.history) == 1
    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 0
    with open(run_dir / "log.jsonl", "a") as f:  # killed after epoch 2's log line, before its checkpoint
        f.write(json.dumps({"epoch": 2, "train_loss": 99.0}) + "\n")
    resumed = train("resnet18", dataset, run_dir, recipe=RECIPE, cache_dir=cache, val_dir=dataset, progress=False,
                    resume=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert _same_weights(resumed.model, full_run.model)
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    assert [json.loads(ln)["epoch"] for ln in lines] == [1, 2, 3]  # neither the cut epoch nor the stale line
    assert [json.loads(ln) for ln in lines] == resumed.history
    for a, b in zip(resumed.history, full_run.history):
        assert a["train_loss"] == b["train_loss"]


@pytest.mark.filterwarnings("ignore:bfloat16 autocast")
def test_resume_with_another_recipe_is_refused(full_run, dataset, cache):
    """The refusal names the fields that changed, so the user knows which option to put back."""
    with pytest.raises(ValueError, match="recipe") as err:
        train("resnet18", dataset, full_run.run_dir, recipe=replace(RECIPE, lr=0.05, bf16=True), cache_dir=cache,
              resume=True, progress=False)
    assert "lr: 0.02 -> 0.05" in str(err.value) and "bf16: False -> True" in str(err.value)
    assert "epochs" not in str(err.value)  # unchanged fields are not listed


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(False, False, False), (True, False, True),
                                                        (False, True, True)])
def test_fast_bf16_needs_avx512_bf16_or_amx(monkeypatch, avx512_bf16, amx, expected):
    from cbam_viz.training.recipe import cpu_has_fast_bf16

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert cpu_has_fast_bf16() is expected


def test_bf16_on_a_cpu_that_emulates_it_warns(monkeypatch, dataset, cache, tmp_path):
    monkeypatch.setattr("cbam_viz.training.train.cpu_has_fast_bf16", lambda: False)
    with pytest.warns(UserWarning, match="emulated"):
        train("resnet18", dataset, tmp_path / "r", recipe=replace(RECIPE, bf16=True), cache_dir=cache,
              progress=False, max_steps=1)


@pytest.mark.parametrize("flags, fast, expected", [([], True, True), ([], False, False),
                                                   (["--bf16", "on"], False, True),
                                                   (["--bf16", "off"], True, False), (["--no-bf16"], True, False)])
def test_cli_bf16_auto_follows_the_cpu(monkeypatch, tmp_path, flags, fast, expected):
    """``--bf16 auto`` (the default) turns autocast on only where the CPU has bfloat16 hardware."""
    from cbam_viz import cli

    seen = {}

    def fake_train(arch, data, run_dir, *, recipe, **kwargs):
        seen[arch] = recipe
        from cbam_viz.training.train import TrainResult
        return TrainResult(run_dir, torch.nn.Identity())

    monkeypatch.setattr("cbam_viz.training.recipe.cpu_has_fast_bf16", lambda: fast)
    monkeypatch.setattr("cbam_viz.training.train.train", fake_train)
    assert cli.main(["train", "--data", str(tmp_path), "--runs", str(tmp_path), *flags]) == 0
    assert {r.bf16 for r in seen.values()} == {expected}
    assert set(seen) == {"resnet18", "resnet18_cbam"}  # one recipe for both models of the pair


def test_seed_decides_the_weights(full_run, dataset, cache, tmp_path):
    same = train("resnet18", dataset, tmp_path / "a", recipe=RECIPE, cache_dir=cache, val_dir=dataset,
                 progress=False)
    assert _same_weights(same.model, full_run.model)
    other = train("resnet18", dataset, tmp_path / "b", recipe=replace(RECIPE, seed=1), cache_dir=cache,
                  progress=False)
    assert not _same_weights(other.model, full_run.model)


def test_export_writes_file_and_manifest_that_load_strictly(full_run, tmp_path):
    weights = tmp_path / "weights"
    rec = export_record(full_run, arch="resnet18", recipe=RECIPE, classes=list(CLASSES), weights_dir=weights,
                        name="resnet18_tiny", class_names={"n001": "red", "n002": "green", "n003": "blue"})
    path = weights / rec.file
    assert path.exists() and rec.file == "resnet18_tiny.safetensors"
    assert rec.sha256 == sha256_file(path)
    entry = read_manifest(weights)["models"]["resnet18_tiny"]
    assert entry["sha256"] == rec.sha256
    loaded_rec = WeightRecord(**entry)
    assert loaded_rec.class_names == ["red", "green", "blue"]
    assert [c["id"] for c in loaded_rec.classes] == list(CLASSES)
    assert loaded_rec.input_size == RECIPE.eval_size and loaded_rec.mean == list(RECIPE.mean)
    assert Recipe.from_json(loaded_rec.recipe) == RECIPE
    assert loaded_rec.metrics["val_top1"] == full_run.history[-1]["val_top1"]
    model = load_record(loaded_rec, weights)
    assert loaded_rec.num_params == sum(p.numel() for p in model.parameters())
    # float16 storage: same predictions, logits within half-precision rounding
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x), full_run.model.eval()(x)
    torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)
    assert torch.equal(a.argmax(1), b.argmax(1))


def _a_class_folder(tmp_path):
    """A training folder that passes the CLI's up-front checks, so the option under test is what is refused."""
    folder = tmp_path.parent / f"{tmp_path.name}-data"  # beside tmp_path, which must stay empty
    (folder / "n001").mkdir(parents=True, exist_ok=True)
    return folder


@pytest.mark.parametrize("value", ["0.35", "0.9,0.2", "0,1", "a,b", "0.2,1.5"])
def test_cli_refuses_a_bad_crop_scale(value, tmp_path, capsys):
    """A wrong --crop-scale stops before any data is read, naming the option (exit status 2)."""
    from cbam_viz.cli import main

    rc = main(["train", "--data", str(_a_class_folder(tmp_path)), "--crop-scale", value, "--runs", str(tmp_path)])
    assert rc == 2 and "--crop-scale" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_batchnorm_recalibration_is_the_exact_mean_of_the_images():
    """After recalibration a BN's running statistics are those of the given images at that size."""
    from cbam_viz.training.data import TensorDataset, normalize, resize_batch
    from cbam_viz.training.monitor import recalibrate_batchnorm

    torch.manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 20, 20), dtype=torch.uint8)
    ds = TensorDataset(images, torch.zeros(8, dtype=torch.int64), ("a",), tuple(f"{i}.png" for i in range(8)))
    conv = torch.nn.Conv2d(3, 4, 3)
    model = torch.nn.Sequential(conv, torch.nn.BatchNorm2d(4, momentum=0.3)).eval()
    recalibrate_batchnorm(model, ds, size=16, mean=RECIPE.mean, std=RECIPE.std, images=8, batch_size=8)
    with torch.no_grad():
        feats = conv(normalize(resize_batch(images.float() / 255, 16), RECIPE.mean, RECIPE.std))
    bn = model[1]
    torch.testing.assert_close(bn.running_mean, feats.mean((0, 2, 3)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn.running_var, feats.var((0, 2, 3), unbiased=True), atol=1e-4, rtol=1e-4)
    assert bn.momentum == 0.3 and not model.training  # both restored
    assert torch.equal(conv.weight, model[0].weight)  # weights untouched


def test_batchnorm_recalibration_reaches_the_cbam_spatial_gate():
    from cbam_viz.training.data import TensorDataset
    from cbam_viz.training.monitor import recalibrate_batchnorm

    model = create_model("resnet18_cbam", num_classes=3).eval()
    gate_bn = model.layer1[0].cbam.spatial.bn
    ds = TensorDataset(torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8), torch.zeros(4, dtype=torch.int64),
                       ("a",), ("0", "1", "2", "3"))
    recalibrate_batchnorm(model, ds, size=32, mean=RECIPE.mean, std=RECIPE.std, images=4)
    assert gate_bn.num_batches_tracked.item() == 1 and gate_bn.momentum == 0.01
    assert not torch.equal(gate_bn.running_mean, torch.zeros(1))


def test_holdout_split_is_stratified_disjoint_and_fixed_by_file_names():
    """The same files are held out whatever the order of the others: both models of a pair, and a
    resumed run, hold out exactly the same images."""
    from cbam_viz.training.data import TensorDataset, holdout_split

    files = tuple(f"c{i % 3}/img{i:03d}.png" for i in range(60))
    labels = torch.tensor([i % 3 for i in range(60)])
    ds = TensorDataset(torch.zeros(60, 1, 1, 1, dtype=torch.uint8), labels, ("c0", "c1", "c2"), files)
    train_idx, hold_idx = holdout_split(ds, 0.25)
    assert set(train_idx.tolist()).isdisjoint(hold_idx.tolist())
    assert sorted(train_idx.tolist() + hold_idx.tolist()) == list(range(60))
    assert torch.bincount(labels[hold_idx], minlength=3).tolist() == [5, 5, 5]
    held = {files[i] for i in hold_idx.tolist()}
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(3))
    shuffled = ds.subset(perm)
    assert {shuffled.files[i] for i in holdout_split(shuffled, 0.25)[1].tolist()} == held
    assert len(holdout_split(ds, 0.0)[1]) == 0
    with pytest.raises(ValueError, match="holdout"):
        holdout_split(ds, 1.0)


def test_weight_average_follows_the_warmup_rule():
    from cbam_viz.training.ema import WeightEMA

    model = torch.nn.Linear(2, 1, bias=False)
    ema = WeightEMA(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(step=0)  # decay_0 = min(0.9, 1/10) = 0.1: mostly the new weights
    torch.testing.assert_close(ema.state["weight"], start + 0.9)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(step=1000)  # decay = 0.9
    torch.testing.assert_close(ema.state["weight"], (start + 0.9) * 0.9 + (start + 2.0) * 0.1)
    twin = ema.model_copy(model)
    assert torch.equal(twin.weight, ema.state["weight"]) and not torch.equal(twin.weight, model.weight)


def _cut_then_resume(dataset, cache, run_dir, recipe: Recipe, *, cut_after: int):
    """Train ``cut_after`` steps (one epoch and part of the next), check one epoch was kept, then resume."""
    cut = train("resnet18", dataset, run_dir, recipe=recipe, cache_dir=cache, progress=False, max_steps=cut_after)
    assert len(cut.history) == 1
    return train("resnet18", dataset, run_dir, recipe=recipe, cache_dir=cache, progress=False, resume=True)


def test_holdout_and_weight_average_resume_exactly_and_are_logged(dataset, cache, tmp_path):
    """With a holdout and an EMA, a cut run resumes to the same weights *and* the same average; the
    held-out files are monitored instead of --val, and each epoch says what hardware and precision ran it."""
    recipe = replace(RECIPE, holdout=0.25, ema_decay=0.9, eval_every=1)
    full = train("resnet18", dataset, tmp_path / "full", recipe=recipe, cache_dir=cache, val_dir=dataset,
                 progress=False)
    assert len(full.holdout_files) == 12 and {f.split("/")[0] for f in full.holdout_files} == set(CLASSES)
    resumed = _cut_then_resume(dataset, cache, tmp_path / "cut", recipe, cut_after=36 // 8 + 2)
    assert _same_weights(resumed.model, full.model)
    assert _same_weights(resumed.ema_model, full.ema_model)
    assert not _same_weights(full.ema_model, full.model)
    assert resumed.holdout_files == full.holdout_files
    for entry in full.history:
        assert {"holdout_top1", "holdout_top1_ema"} <= set(entry) and "val_top1" not in entry
        assert entry["device"].startswith("cpu: ") and entry["precision"] == "fp32"


def _scores(table):
    return {"n": 10, "scores": {kind: {str(size): {"top1": v, "top1_hflip": v + 0.01} for size, v in row.items()}
                                for kind, row in table.items()}}


def test_the_pair_gets_one_choice_the_best_mean_of_both_models():
    """One (weights, size) for both models: the best *mean*, even where one model alone prefers another."""
    from cbam_viz.training.holdout import choose_for_lineup

    choice = choose_for_lineup({
        "a": _scores({"raw": {160: 0.80, 192: 0.84}, "ema": {160: 0.81, 192: 0.90}}),
        "b": _scores({"raw": {160: 0.90, 192: 0.85}, "ema": {160: 0.88, 192: 0.86}}),
    })
    assert (choice["weights"], choice["input_size"]) == ("ema", 192)
    assert choice["holdout_top1"] == {"a": 0.90, "b": 0.86}
    assert choice["mean_holdout_top1"] == pytest.approx(0.88)
    tie = choose_for_lineup({"a": _scores({"raw": {160: 0.5, 192: 0.5}, "ema": {160: 0.5}})})
    assert (tie["weights"], tie["input_size"]) == ("raw", 160)  # ties: raw, then the smaller size


def test_cli_exports_a_finished_pair_with_the_held_out_choice(dataset, cache, tmp_path, capsys):
    """``train --export`` waits for every model; then both ship with one held-out choice, the
    pair becomes the default, and each record says which hardware, precision and weights it has."""
    from cbam_viz import cli

    args = ["train", "--data", str(dataset), "--runs", str(tmp_path / "runs"), "--cache-dir", str(cache),
            "--epochs", "2", "--batch-size", "8", "--lr", "0.02", "--sizes", "0:32", "--cache-size", "40",
            "--eval-size", "32", "--holdout", "0.25", "--ema-decay", "0.9", "--bf16", "off", "--threads", "1",
            "--export", str(tmp_path / "weights"), "--name", "tiny", "--select-sizes", "32,40"]
    assert cli.main([*args, "--max-steps", "3"]) == 0  # cut short: nothing is exported
    assert "not exported" in capsys.readouterr().out and not (tmp_path / "weights").exists()
    assert cli.main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "held-out choice" in out
    manifest = read_manifest(tmp_path / "weights")
    assert manifest["pairs"]["resnet18-tiny"] == {"baseline": "resnet18_tiny", "cbam": "resnet18_cbam_tiny",
                                                  "default": True}
    assert manifest["lineups"]["resnet18-tiny"] == {"members": ["resnet18_tiny", "resnet18_cbam_tiny"],
                                                    "reference": "resnet18_tiny", "default": True}
    assert "lineup 'resnet18-tiny' (resnet18_tiny, resnet18_cbam_tiny; reference resnet18_tiny)" in out
    records = [WeightRecord(**manifest["models"][n]) for n in ("resnet18_tiny", "resnet18_cbam_tiny")]
    sel = [r.training["selection"] for r in records]
    assert sel[0]["weights"] == sel[1]["weights"] and records[0].input_size == records[1].input_size
    assert records[0].input_size in (32, 40)
    for r in records:
        assert r.training["hardware"][0].startswith("cpu: ") and r.training["precision"] == ["fp32"]
        assert r.training["holdout_images"] == 12 and set(r.training["selection"]["scores"]["scores"]) == {"raw", "ema"}
        load_record(r, tmp_path / "weights")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is missing")
def test_asking_for_a_gpu_where_there_is_none_fails_before_any_data_is_read(tmp_path):
    with pytest.raises(ValueError, match="CUDA is not available"):
        train("resnet18", tmp_path / "no-data", tmp_path / "run", recipe=RECIPE, device="cuda", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("capability, bf16", [((8, 0), True), ((9, 0), True), ((7, 5), False)])
def test_cli_bf16_auto_on_a_gpu_is_on_from_ampere(monkeypatch, tmp_path, capability, bf16):
    """A T4 (sm 7.5) emulates bfloat16, slower than float32: auto leaves it off there."""
    from cbam_viz import cli
    from cbam_viz.training.train import TrainResult

    seen = {}
    monkeypatch.setattr("cbam_viz.training.recipe.cpu_has_fast_bf16", lambda: False)
    monkeypatch.setattr("cbam_viz.engine.loading.select_device", lambda preferred=None: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    monkeypatch.setattr("cbam_viz.training.train.train", lambda arch, data, run_dir, *, recipe, device, **kw:
                        seen.setdefault(arch, (recipe.bf16, device)) and TrainResult(run_dir, torch.nn.Identity()))
    assert cli.main(["train", "--data", str(tmp_path), "--runs", str(tmp_path), "--device", "cuda"]) == 0
    assert set(seen.values()) == {(bf16, torch.device("cuda"))}


def test_cli_device_auto_is_settled_before_training_and_a_bad_one_is_refused(monkeypatch, tmp_path, capsys):
    from cbam_viz import cli
    from cbam_viz.training.train import TrainResult

    seen = {}
    monkeypatch.setattr("cbam_viz.training.train.train", lambda arch, data, run_dir, *, recipe, device, **kw:
                        seen.setdefault(arch, device) and TrainResult(run_dir, torch.nn.Identity()))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert cli.main(["train", "--data", str(tmp_path), "--runs", str(tmp_path), "--device", "auto"]) == 0
    assert set(seen.values()) == {torch.device("cpu")}
    assert cli.main(["train", "--data", str(tmp_path), "--runs", str(tmp_path), "--device", "gpu0"]) == 2
    assert "--device" in capsys.readouterr().err


def test_a_second_stage_starts_from_shipped_weights_and_keeps_the_first_stage(full_run, dataset, cache, tmp_path):
    """``init_from``: the run starts from the record's weights (not a random draw), and the exported
    record carries the first stage's recipe, training and sha256, so the card can tell both stages."""
    first = tmp_path / "stage1"
    rec1 = export_record(full_run, arch="resnet18", recipe=RECIPE, classes=list(CLASSES), weights_dir=first,
                         name="resnet18_tiny")
    stage2 = replace(RECIPE, epochs=1, lr=0.0, warmup_epochs=0.0, init_from=str(first))
    result = train("resnet18", dataset, tmp_path / "run2", recipe=stage2, cache_dir=cache, progress=False,
                   max_steps=1, init_record=rec1)
    # lr 0 with weight decay 0 on BN/bias only: one step moves nothing but the BN statistics
    assert _same_weights(_without_bn_stats(result.model), _without_bn_stats(load_record(rec1, first)))
    assert result.init["sha256"] == rec1.sha256 and result.init["recipe"] == rec1.recipe
    done = train("resnet18", dataset, tmp_path / "run3", recipe=stage2, cache_dir=cache, progress=False,
                 init_record=rec1)
    rec2 = export_record(done, arch="resnet18", recipe=stage2, classes=list(CLASSES), weights_dir=tmp_path / "stage2",
                         name="resnet18_tiny")
    entry = read_manifest(tmp_path / "stage2")["models"]["resnet18_tiny"]
    assert entry["training"]["init"]["sha256"] == rec1.sha256
    assert entry["training"]["init"]["training"]["epochs"] == RECIPE.epochs and entry["recipe"]["init_from"] == str(first)
    assert rec2.sha256 != rec1.sha256


def _without_bn_stats(model: torch.nn.Module) -> torch.nn.Module:
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
    return model


def test_a_second_stage_needs_its_record_and_the_right_architecture(full_run, dataset, cache, tmp_path):
    rec = export_record(full_run, arch="resnet18", recipe=RECIPE, classes=list(CLASSES), weights_dir=tmp_path / "w",
                        name="resnet18_tiny")
    stage2 = replace(RECIPE, init_from=str(tmp_path / "w"))
    with pytest.raises(ValueError, match="pass the record"):
        train("resnet18", dataset, tmp_path / "r", recipe=stage2, cache_dir=cache, progress=False, max_steps=1)
    with pytest.raises(ValueError, match="is a resnet18"):
        train("resnet18_cbam", dataset, tmp_path / "r", recipe=stage2, cache_dir=cache, progress=False, max_steps=1,
              init_record=rec)


def test_cli_init_from_names_the_missing_record(full_run, tmp_path, capsys):
    from cbam_viz.cli import main

    export_record(full_run, arch="resnet18", recipe=RECIPE, classes=list(CLASSES), weights_dir=tmp_path / "w",
                  name="resnet18_tiny")
    rc = main(["train", "--data", str(_a_class_folder(tmp_path)), "--runs", str(tmp_path / "runs"), "--name", "tiny",
               "--init-from", str(tmp_path / "w"), "--arch", "resnet18", "resnet18_cbam", "--bf16", "off"])
    assert rc == 2 and "resnet18_cbam_tiny" in capsys.readouterr().err and not (tmp_path / "runs").exists()


def test_a_second_stage_resumes_without_its_record_to_the_same_weights(full_run, dataset, cache, tmp_path):
    """A cut second stage resumes from last.pt alone (weights and first-stage record) to the weights of an
    uninterrupted one."""
    first = tmp_path / "stage1"
    rec1 = export_record(full_run, arch="resnet18", recipe=RECIPE, classes=list(CLASSES), weights_dir=first,
                         name="resnet18_tiny")
    stage2 = replace(RECIPE, epochs=2, lr=0.005, init_from=str(first))
    whole = train("resnet18", dataset, tmp_path / "whole", recipe=stage2, cache_dir=cache, progress=False,
                  init_record=rec1)
    train("resnet18", dataset, tmp_path / "cut", recipe=stage2, cache_dir=cache, progress=False,
          max_steps=STEPS_PER_EPOCH, init_record=rec1)
    resumed = train("resnet18", dataset, tmp_path / "cut", recipe=stage2, cache_dir=cache, progress=False,
                    resume=True)
    assert _same_weights(resumed.model, whole.model)
    assert resumed.init == whole.init and resumed.init["sha256"] == rec1.sha256


def test_a_mixing_step_weights_the_two_labels_by_lam():
    """train_step's loss under CutMix is lam * CE(own label) + (1 - lam) * CE(partner's label)."""
    import torch.nn.functional as F

    from cbam_viz.training.data import mix_batch, normalize, random_resized_crop_flip
    from cbam_viz.training.step import train_step

    recipe = replace(RECIPE, cutmix_alpha=1.0)
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=3).train()
    images = torch.randint(0, 256, (8, 3, 40, 40), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    gen = torch.Generator().manual_seed(5)
    replay = torch.Generator().manual_seed(5)
    x = random_resized_crop_flip(images.float().div_(255), 32, generator=replay, scale=recipe.crop_scale)
    x, partner, lam = mix_batch(x, generator=replay, cutmix_alpha=1.0)
    assert lam < 1.0 and not torch.equal(labels[partner], labels)
    with torch.no_grad():  # channels-last as train_step runs it, so the same kernels compute both
        logits = model(normalize(x, recipe.mean, recipe.std).contiguous(memory_format=torch.channels_last))
    expected = (lam * F.cross_entropy(logits, labels, label_smoothing=0.1)
                + (1 - lam) * F.cross_entropy(logits, labels[partner], label_smoothing=0.1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loss, _ = train_step(model, optimizer, images, labels, recipe=recipe, size=32, generator=gen)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_mixing_run_resumes_exactly_and_the_recipe_records_it(dataset, cache, tmp_path):
    recipe = replace(RECIPE, epochs=2, cutmix_alpha=1.0, mixup_alpha=0.2)
    full = train("resnet18", dataset, tmp_path / "full", recipe=recipe, cache_dir=cache, progress=False)
    resumed = _cut_then_resume(dataset, cache, tmp_path / "cut", recipe, cut_after=STEPS_PER_EPOCH + 2)
    assert _same_weights(resumed.model, full.model)
    unmixed = train("resnet18", dataset, tmp_path / "plain", recipe=replace(recipe, cutmix_alpha=0.0, mixup_alpha=0.0),
                    cache_dir=cache, progress=False, max_steps=STEPS_PER_EPOCH)
    assert full.history[0]["train_loss"] != unmixed.history[0]["train_loss"]  # the mixing did happen
    saved = Recipe.from_json(torch.load(tmp_path / "full" / "last.pt", weights_only=True)["recipe"])
    assert (saved.cutmix_alpha, saved.mixup_alpha) == (1.0, 0.2)
    old = {k: v for k, v in RECIPE.to_json().items() if k not in ("cutmix_alpha", "mixup_alpha")}
    assert Recipe.from_json(old) == RECIPE  # recipes recorded before mixing existed read as "off"


@pytest.mark.parametrize("flag", ["--cutmix-alpha", "--mixup-alpha"])
@pytest.mark.parametrize("value", ["-0.5", "nan", "inf"])
def test_cli_refuses_a_bad_mixing_alpha(flag, value, tmp_path, capsys):
    from cbam_viz.cli import main

    rc = main(["train", "--data", str(_a_class_folder(tmp_path)), flag, value, "--runs", str(tmp_path)])
    assert rc == 2 and flag in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_epoch_sums_read_once_equal_the_per_step_float_sum():
    """The loop keeps each step's loss on the device and sums at the end: the logged figures must be
    those a per-step ``loss.item() * len(y)`` sum gives, to the last digit (logs are compared across runs)."""
    from cbam_viz.training.train import _epoch_sums

    gen = torch.Generator().manual_seed(0)
    losses = [torch.rand((), generator=gen) * 3 for _ in range(50)]
    hits = [torch.randint(0, 9, (), generator=gen) for _ in range(50)]
    sizes = [8] * 49 + [5]
    expected = 0.0
    for loss, n in zip(losses, sizes):
        expected += loss.item() * n
    assert _epoch_sums(losses, hits, sizes) == (expected, sum(int(h) for h in hits))
    assert _epoch_sums([], [], []) == (0.0, 0)
