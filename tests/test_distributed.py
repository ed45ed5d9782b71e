"""cbam_viz.distributed: sharding and gathering give rank 0 exactly what one process computes."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cbam_viz import distributed

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(n: int, out: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                           str(ROOT / "tests" / "dist_worker.py"), str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _one_and_two(args: list[str], out_one: Path, out_two: Path, **env_extra: str):
    """``python -m cbam_viz ARGS --out OUT_ONE`` and the same under ``torchrun --nproc_per_node 2``
    (``--out OUT_TWO``), in a clean environment (no torchrun or CBAM_VIZ_* variables of the caller's)."""
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")
              and not k.startswith("CBAM_VIZ_")}, "PYTHONPATH": str(ROOT), **env_extra}
    one = subprocess.run([sys.executable, "-m", "cbam_viz", *args, "--out", str(out_one)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                          "-m", "cbam_viz", *args, "--out", str(out_two)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    return one, two


def test_one_process_is_the_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(distributed, "_context", None)
    ctx = distributed.context()
    assert ctx.world == 1 and ctx.main and ctx.backend is None and distributed.is_main()
    assert distributed.shard("abc") == [(0, "a"), (1, "b"), (2, "c")]
    assert distributed.gather_ordered([(2, "c"), (0, "a"), (1, "b")]) == ["a", "b", "c"]
    assert distributed.map_sharded(str.upper, "ab") == ["A", "B"]


def test_a_finished_command_leaves_the_job(monkeypatch):
    """``cli.main`` ends every successful command with ``leave``: the group is left (a rank that
    exits still joined can abort the others), and a process that never joined is left alone."""
    import torch.distributed as dist

    from cbam_viz import cli

    monkeypatch.setattr(distributed, "_context", None)
    left = []
    monkeypatch.setattr(cli, "run_command", lambda args: 0)
    monkeypatch.setattr(distributed, "leave", lambda: left.append(True))
    assert cli.main(["model-card"]) == 0 and left == [True]
    monkeypatch.undo()
    distributed.leave()  # never joined: nothing to do, nothing initialised
    assert not dist.is_initialized()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    distributed.leave()
    assert not dist.is_initialized() and distributed._context is None


def test_shards_are_interleaved_even_and_complete():
    ctxs = [distributed.DistContext(rank=r, world=3) for r in range(3)]
    shards = [distributed.shard(list(range(11)), c) for c in ctxs]
    assert [len(s) for s in shards] == [4, 4, 3]
    assert sorted(i for s in shards for i, _ in s) == list(range(11))
    assert [i for i, _ in shards[1]] == [1, 4, 7, 10]


def test_a_bad_world_size_is_one_sentence(monkeypatch):
    monkeypatch.setattr(distributed, "_context", None)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match=r"\$WORLD_SIZE must be an integer"):
        distributed.context()
    monkeypatch.setattr(distributed, "_context", None)


def test_two_gloo_processes_gather_what_one_process_computes(tmp_path):
    out = tmp_path / "result.json"
    done = _torchrun(2, out)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2 and result["backend"] == "gloo"
    assert result["values"] == [float(i * i) for i in range(11)]  # rank 0 holds every item, in order
    assert result["doubled"] == [2 * i for i in range(11)]
    assert json.loads((tmp_path / "result.json.rank0").read_text()) == [0, 2, 4, 6, 8, 10]
    assert json.loads((tmp_path / "result.json.rank1").read_text()) == [1, 3, 5, 7, 9]


def test_evaluate_on_two_processes_writes_the_one_process_report(tmp_path):
    """``torchrun --nproc_per_node 2 -m cbam_viz evaluate``: each rank scores half of the images; rank 0
    writes the report one process writes (same figures, same per-image outcomes), the other rank nothing."""
    from tests.test_evaluate import CLASSES, NAMES  # noqa: F401  (the tiny records' classes)
    from tests.synthetic import make_image_folder
    from cbam_viz.models import create_model
    from cbam_viz.models.weights import WeightRecord, save_safetensors, update_manifest

    import torch

    weights = tmp_path / "weights"
    torch.manual_seed(0)
    model = create_model("resnet18_cbam", num_classes=3)
    digest = save_safetensors(model, weights / "tiny.safetensors")
    update_manifest(weights, record=WeightRecord(
        name="tiny", file="tiny.safetensors", arch="resnet18_cbam", sha256=digest,
        num_params=sum(p.numel() for p in model.parameters()),
        classes=[{"id": c, "name": NAMES[c]} for c in CLASSES], mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225], input_size=32))
    data = make_image_folder(tmp_path / "val", CLASSES, per_class=3)  # 9 images: uneven shards
    args = ["evaluate", "--model", "tiny", "--weights", str(weights), "--data", str(data), "--batch-size", "2",
            "--no-progress"]
    one, two = _one_and_two(args, tmp_path / "one.json", tmp_path / "two.json")
    assert two.stdout.count("top-1") == one.stdout.count("top-1")  # printed once, by rank 0

    def figures(path):
        doc = json.loads(path.read_text())
        result = doc["results"]["tiny"] if "results" in doc else doc["tiny"]
        return {k: v for k, v in result.items() if k not in ("seconds",)}

    assert figures(tmp_path / "two.json") == figures(tmp_path / "one.json")


def test_explain_on_two_processes_writes_what_one_process_writes(tmp_path):
    """``torchrun --nproc_per_node 2 -m cbam_viz explain FOLDER``: the ranks share the images and write
    the same files as one process (names chosen for the whole list, so two same-named photos in
    different folders never collide), with the same predictions; rank 0 prints the one summary."""
    from tests.e2e_helpers import make_image

    (tmp_path / "in" / "sub").mkdir(parents=True)
    make_image(tmp_path / "in" / "a.png", size=(64, 48))
    make_image(tmp_path / "in" / "sub" / "a.png", size=(48, 64), seed=1)  # same name
    make_image(tmp_path / "in" / "b.png", size=(56, 56), seed=2)
    args = ["explain", str(tmp_path / "in"), "--no-progress", "--target", "church"]
    _, two = _one_and_two(args, tmp_path / "one", tmp_path / "two",
                          CBAM_VIZ_WEIGHTS_DIR=str(tmp_path / "no-weights"))  # the untrained lineup
    assert two.stdout.count("wrote 3 of 3") == 1
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "a.json", "a.png", "a_2.json", "a_2.png", "b.json", "b.png"]
    for name in ("a.json", "a_2.json", "b.json"):
        docs = [json.loads((tmp_path / d / name).read_text()) for d in ("one", "two")]
        assert docs[0]["image"] == docs[1]["image"]
        for name_ in docs[0]["members"]:
            p1, p2 = (d["models"][name_]["predictions"] for d in docs)
            assert [p["index"] for p in p1] == [p["index"] for p in p2]
            assert [p["prob"] for p in p1] == pytest.approx([p["prob"] for p in p2], abs=1e-5)
            assert docs[0]["models"][name_]["target"] == docs[1]["models"][name_]["target"]
