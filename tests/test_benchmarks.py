"""Smoke tests of the benchmark scripts: they run with tiny settings and print their ratio lines.

No timing assertions: the numbers of a smoke run on a shared CI machine mean nothing; the point
is that ``benchmarks/`` keeps working as the code it measures changes.
"""
from __future__ import annotations

import json
from dataclasses import replace
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def _run(args: list[str], timeout: float) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[0]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.timeout(600)
def test_bench_explain_prints_medians_and_ratios(tmp_path):
    out_json = tmp_path / "explain.json"
    out = _run([str(BENCH / "bench_explain.py"), "--tiny", "--batch", "1", "--repeats", "1", "--warmup", "0",
                "--no-memory", "--variants", "floor", "engine", "full", "app", "page", "naive", "--image-size", "224",
                "224", "--json", str(out_json)], 600)
    for variant in ("floor", "engine", "full", "app", "page", "naive"):
        assert re.search(rf"^\s+{variant}\s+median ", out, re.M), out
    for ratio in ("engine/floor", "full/floor", "naive/full", "app/full", "page/full"):
        assert re.search(rf"^ratio b=1 {re.escape(ratio)} = \d+\.\d+ \(target [<>]= \d\.\d\d\) (MET|MISSED)$",
                         out, re.M), out
    assert "engine steps" in out and "images 224x224" in out
    doc = json.loads(out_json.read_text())
    assert set(doc["batches"][0]["median_s"]) == {"floor", "engine", "full", "app", "page", "naive"}


@pytest.mark.timeout(600)
def test_bench_explain_memory_child_reports_peaks():
    out = _run([str(BENCH / "bench_explain.py"), "--_memory-child", "engine", "--tiny", "--batch", "1",
                "--memory-repeats", "1"], 600)
    mem = json.loads(out.strip().splitlines()[-1])
    assert mem["variant"] == "engine"
    assert mem["peak_rss_mib"] >= mem["base_rss_mib"] > 0
    assert mem["py_peak_mib"] > 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bench_server_answers_every_request(tmp_path):
    out_json = tmp_path / "server.json"
    app = str(ROOT / "app.py")
    out = _run([str(BENCH / "bench_server.py"), "--requests", "3", "--concurrency", "1", "2",
                "--server-concurrency", "1", "--max-seconds", "240", "--apps", app, app, "--labels", "new", "old",
                "--json", str(out_json)], 900)
    assert "cold start:" in out and "request 2" in out, out
    for label in ("new", "old"):  # two apps side by side, taking turns at each level
        assert re.search(rf"^{label}: queue=1 users=2: 3/3 ok .*throughput [\d.]+ req/s, latency p50 ", out, re.M), out
    assert re.search(r"^ratio users=2 throughput new/old = \d+\.\d\d, p50 new/old = \d+\.\d\d$", out, re.M), out
    doc = json.loads(out_json.read_text())
    assert [c["app"] for c in doc["configs"]] == ["new", "old"]
    for cfg in doc["configs"]:
        for level in cfg["levels"]:
            assert level["errors"] == 0 and level["lost"] == 0, level
            assert level["ok"] == 3 and level["server_processed"] == 3, level
        cold = cfg["cold_start"]
        assert cold["request2_server_s"] is not None and cold["request2_s"] > 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bench_roundtrip_prints_what_serving_adds(tmp_path):
    """One request of each kind: the split is printed, and /explain's answer carries its pictures
    inline (a data URI per member's overlay at least) and no file to fetch."""
    out_json = tmp_path / "roundtrip.json"
    out = _run([str(BENCH / "bench_roundtrip.py"), "--requests", "1", "--json", str(out_json)], 900)
    assert re.search(r"^  serving adds -?\d+ ms = -?\d+\.\d\dx the floor \(target <= 1\.5x\)", out, re.M), out
    assert re.search(r"^  paired, per request .*: -?\d+ ms = -?\d+\.\d\dx the floor: (NOT )?met$", out, re.M), out
    (result,) = json.loads(out_json.read_text()).values()
    assert result["files_returned"] == 0 and result["inline_pictures"] >= len(result["members"]), result
    assert result["inline_bytes"] > 1000 and set(result["p50_s"]) == {"floor", "request", "round_trip", "in_process"}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bench_coldstart_runs(tmp_path):
    out = _run([str(BENCH / "bench_coldstart.py"), "--starts", "1"], 900)
    assert re.search(r"cold start \(CBAM_VIZ_WARMUP=1, median of 1\): .* first /explain answered [\d.]+ s", out), out
    assert "CBAM_VIZ_WARMUP=0" in out


@pytest.mark.timeout(600)
def test_bench_train_prints_speeds_ratio_and_recipe_estimate(tmp_path):
    out_json = tmp_path / "train.json"
    out = _run([str(BENCH / "bench_train.py"), "--tiny", "--json", str(out_json)], 600)
    assert re.search(r"^CPU: .* native bf16: (yes|no) -> --bf16 auto trains in (bf16|fp32)", out, re.M), out
    for arch in ("resnet18", "resnet18_cbam"):
        assert re.search(rf"^\s+{arch}\s+32 px\s+(fp32|bf16)\s+\d+\.\d img/s$", out, re.M), out
        assert re.search(rf"^\s+{arch}\s+32 px .* ratio (bf16/fp32|fp32/bf16) = \d+\.\d\d$", out, re.M), out
        assert re.search(rf"^estimated recipe time {arch} = \d+\.\d min .* (MET|MISSED)$", out, re.M), out
    doc = json.loads(out_json.read_text())
    assert set(doc["estimated_minutes"]) == {"resnet18", "resnet18_cbam"}
    assert all(v > 0 for v in doc["estimated_minutes"].values())


def test_recipe_estimate_adds_each_epoch_at_its_size():
    """The estimate is steps x batch / speed at each epoch's size, plus the evaluations."""
    sys.path.insert(0, str(BENCH))
    from bench_train import estimate_minutes

    from cbam_viz.training.recipe import Recipe

    recipe = Recipe(epochs=3, batch_size=10, sizes=((0, 32), (2, 64)), eval_size=64, eval_every=100, holdout=0.0)
    minutes = estimate_minutes(recipe, {32: 10.0, 64: 5.0}, train_images=105, val_images=30)
    # 10 steps x 10 images: 10 s, 10 s, then 20 s; one final eval of 30 images at 3 x 5 img/s: 2 s
    assert minutes == pytest.approx((10 + 10 + 20 + 2) / 60)
    held = estimate_minutes(replace(recipe, holdout=0.2), {32: 10.0, 64: 5.0}, train_images=105, val_images=30)
    # 84 images train: 8 steps x 10 images: 8 s, 8 s, 16 s, plus the same evaluation
    assert held == pytest.approx((8 + 8 + 16 + 2) / 60)


@pytest.mark.timeout(600)
def test_bn_recalibration_scores_the_held_out_files_and_changes_no_file(tmp_path):
    from cbam_viz.models.imagenette import IMAGENETTE_NAMES
    from cbam_viz.models.weights import sha256_file
    from tests.bad_inputs import TEST_PAIR, write_test_weights
    from tests.synthetic import make_image_folder

    weights = write_test_weights(tmp_path / "weights", input_size=32)
    data = make_image_folder(tmp_path / "data", tuple(IMAGENETTE_NAMES), per_class=13)  # 0.08 x 13: one per class
    args = [str(BENCH / "bn_recalibration.py"), "--train", str(data), "--weights", str(weights), "--images", "8",
            "--sizes", "32,40", "--threads", "1", "--json", str(tmp_path / "bn.json")]
    # records without a recipe held nothing out: there is nothing to score on, and the script says so
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "not one fraction > 0" in proc.stderr, proc.stderr
    manifest = json.loads((weights / "manifest.json").read_text())
    for rec in manifest["models"].values():
        rec["recipe"], rec["training"] = {"holdout": 0.08}, {"holdout_images": 11}
    (weights / "manifest.json").write_text(json.dumps(manifest))
    # a record that held out another number of files was trained on another folder
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "holding out 11 files" in proc.stderr, proc.stderr
    for rec in manifest["models"].values():
        rec["training"] = {"holdout_images": 10}
    (weights / "manifest.json").write_text(json.dumps(manifest))
    before = {p.name: sha256_file(p) for p in weights.iterdir()}
    out = _run(args, 600)
    names = ("resnet18_baseline_test", "resnet18_cbam_cbam_test")
    for name in names:
        for size in (32, 40):
            assert re.search(rf"^{name} at {size} px: held-out top-1 as shipped \d+\.\d\d %, BN re-estimated "
                             rf"\d+\.\d\d % \([+-]\d+\.\d\d points\)", out, re.M), out
    assert re.search(r"^held out 10 files, statistics from 8: BN re-estimation (beats|does not beat) ", out, re.M), out
    doc = json.loads((tmp_path / "bn.json").read_text())
    assert doc["pair"] == TEST_PAIR and set(doc["models"]) == set(names)  # the manifest's default pair
    for kind in ("shipped", "recalibrated"):
        choice = doc["choices"][kind]
        assert choice["weights"] == kind and choice["input_size"] in (32, 40)
        mean = sum(doc["models"][n]["scores"][kind][str(choice["input_size"])]["top1"] for n in names) / 2
        assert choice["mean_holdout_top1"] == pytest.approx(mean)
    assert doc["recalibration_better"] == (doc["choices"]["recalibrated"]["mean_holdout_top1"]
                                           > doc["choices"]["shipped"]["mean_holdout_top1"])
    assert {p.name: sha256_file(p) for p in weights.iterdir()} == before  # the files stay as shipped


def test_bn_recalibration_holds_out_what_the_run_held_out_and_calibrates_on_the_rest(tmp_path):
    import importlib.util

    from cbam_viz.training.recipe import Recipe
    from cbam_viz.training.train import train
    from tests.synthetic import make_image_folder

    spec = importlib.util.spec_from_file_location("bn_recalibration", BENCH / "bn_recalibration.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    data = make_image_folder(tmp_path / "data", ("n001", "n002", "n003"), per_class=16)
    recipe = Recipe(epochs=1, batch_size=8, sizes=((0, 32),), cache_size=40, eval_size=32, bf16=False, holdout=0.25,
                    ema_decay=0.0)
    run = train("resnet18", data, tmp_path / "run", recipe=recipe, cache_dir=tmp_path / "cache", progress=False,
                max_steps=1)
    held_out, calibration = bench.split_files(str(data), 0.25, images=100)
    assert tuple(held_out) == run.holdout_files and len(held_out) == 12
    assert len(calibration) == 36 and not set(calibration) & set(held_out)  # every file not held out, no more
    assert len(bench.split_files(str(data), 0.25, images=5)[1]) == 5
