"""Smoke tests of the benchmark scripts: they run with tiny settings and print their ratio lines.

No timing assertions: the numbers of a smoke run on a shared CI machine mean nothing; the point
is that ``benchmarks/`` keeps working as the code it measures changes.
"""
from __future__ import annotations

import json
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
                "--no-memory", "--variants", "floor", "engine", "full", "naive", "--json", str(out_json)], 600)
    for variant in ("floor", "engine", "full", "naive"):
        assert re.search(rf"^\s+{variant}\s+median ", out, re.M), out
    for ratio in ("engine/floor", "full/floor", "naive/full"):
        assert re.search(rf"^ratio b=1 {re.escape(ratio)} = \d+\.\d+ \(target [<>]= \d\.\d\d\) (MET|MISSED)$",
                         out, re.M), out
    assert "engine steps" in out
    doc = json.loads(out_json.read_text())
    assert set(doc["batches"][0]["median_s"]) == {"floor", "engine", "full", "naive"}


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
    out = _run([str(BENCH / "bench_server.py"), "--requests", "3", "--concurrency", "1", "2",
                "--server-concurrency", "1", "--max-seconds", "240", "--json", str(out_json)], 900)
    assert "cold start:" in out and "request 2" in out, out
    assert re.search(r"users=2: 3/3 ok .*throughput [\d.]+ req/s, latency p50 ", out), out
    doc = json.loads(out_json.read_text())
    for level in doc["configs"][0]["levels"]:
        assert level["errors"] == 0 and level["lost"] == 0, level
        assert level["ok"] == 3 and level["server_processed"] == 3, level
    cold = doc["configs"][0]["cold_start"]
    assert cold["request2_server_s"] is not None and cold["request2_s"] > 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bench_coldstart_runs(tmp_path):
    out = _run([str(BENCH / "bench_coldstart.py"), "--starts", "1"], 900)
    assert re.search(r"cold start \(CBAM_VIZ_WARMUP=1, median of 1\): .* first /explain answered [\d.]+ s", out), out
    assert "CBAM_VIZ_WARMUP=0" in out
