"""1 vs N processes on this machine (issue 31): images per second of training, ``evaluate`` and, where
it shards, ``evaluate-cams``, each run as a person runs it (``python -m cbam_viz ...`` and
``torchrun --nproc_per_node N -m cbam_viz ...``), with the cores split evenly between the processes.

* ``train``: resnet18 at ``--size`` px (cache ``--size`` + 16) on a generated ImageFolder of
  ``--steps`` x ``--batch`` noise images, two epochs; the figure is epoch 2's ``img_per_s`` from
  ``log.jsonl`` (all processes' images over rank 0's epoch time; epoch 1 pays the first-step costs).
* ``evaluate``: the shipped lineup (``--weights``, default the repository's ``weights/``) on a folder
  of links to ``--per-class`` boxed Imagenette val images per class (nothing is copied); the figure
  is images x members over the summed per-member seconds the report records.
* ``evaluate-cams``: the same images and lineup, Grad-CAM only, 200 bootstrap resamples; measured
  by the command's wall time (it records no seconds of its own), so it includes start-up. Run only
  where the research commands shard (``cbam_viz/research/shards.py`` exists), else left out.

Nothing is written outside a temporary folder. It never fails on a number. Run it on a quiet
machine (figures on a machine shared with a training run say little).

Usage::

    python benchmarks/bench_distributed.py                     # 1 vs 2 processes, every task
    python benchmarks/bench_distributed.py --tasks train --procs 1 2 4 --steps 4
    python benchmarks/bench_distributed.py --json artifacts/bench/distributed.json
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("CBAM_VIZ_DATA", ROOT.parent / "shared" / "data" / "imagenette2"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(procs: int, args: list[str]) -> list[str]:
    """``python -m cbam_viz ARGS`` on one process, ``torchrun --nproc_per_node N -m cbam_viz ARGS`` else."""
    if procs == 1:
        return [sys.executable, "-m", "cbam_viz", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_addr",
            "127.0.0.1", "--master_port", str(_free_port()), "-m", "cbam_viz", *args]


def _run(cmd: list[str], threads: int) -> float:
    """Run ``cmd`` from the repository root with ``threads`` torch threads a process; its wall seconds."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({done.returncode}): {done.stderr[-1500:]}")
    return wall


def _noise_folder(root: Path, n: int, size: int, classes: int = 10) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"c{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    return root


def _boxed_subset(root: Path, per_class: int) -> tuple[Path, int, int]:
    """Links to the first ``per_class`` boxed val images of every class (the files stay where they are):
    ``(folder, images, boxed images)``."""
    seen: dict[str, list[str]] = {}
    for line in (DATA / "val_boxes.csv").read_text().splitlines()[1:]:
        wnid, file = line.split(",")[:2]
        if file not in seen.setdefault(wnid, []) and len(seen[wnid]) < per_class:
            seen[wnid].append(file)
    for wnid in sorted(p.name for p in (DATA / "val").iterdir() if p.is_dir()):
        (root / wnid).mkdir(parents=True)
        for file in seen.get(wnid, []):
            (root / wnid / file).symlink_to(DATA / "val" / wnid / file)
        if not seen.get(wnid):  # evaluate wants every class folder; one unboxed image keeps it
            first = sorted((DATA / "val" / wnid).iterdir())[0]
            (root / wnid / first.name).symlink_to(first)
    return root, sum(1 for _ in root.rglob("*.*")), sum(len(files) for files in seen.values())


def bench_train(procs: int, threads: int, work: Path, args) -> dict:
    data = work / "train-data"
    if not data.exists():
        _noise_folder(data, args.steps * args.batch, args.size + 16)
    runs = work / f"train-runs-{procs}"
    cli = ["train", "--arch", "resnet18", "--data", str(data), "--runs", str(runs), "--cache-dir",
           str(work / f"cache-{procs}"), "--epochs", "2", "--batch-size", str(args.batch), "--sizes",
           f"0:{args.size}", "--cache-size", str(args.size + 16), "--holdout", "0", "--ema-decay", "0",
           "--bf16", "off", "--threads", str(threads)]
    cmd = _command(procs, cli)
    wall = _run(cmd, threads)
    log = [json.loads(line) for line in (runs / "resnet18" / "log.jsonl").read_text().splitlines()]
    return {"task": "train", "procs": procs, "threads": threads, "images": args.steps * args.batch,
            "img_per_s": log[-1]["img_per_s"], "wall_s": wall, "from": "log.jsonl epoch 2", "command": cmd}


def bench_evaluate(procs: int, threads: int, work: Path, args, data: Path, n: int, _boxed: int) -> dict:
    out = work / f"evaluate-{procs}.json"
    cmd = _command(procs, ["evaluate", *(["--weights", args.weights] if args.weights else []), "--data", str(data),
                           "--batch-size", "16", "--no-progress", "--out", str(out)])
    wall = _run(cmd, threads)
    results = json.loads(out.read_text())["results"]
    seconds = sum(r["seconds"] for r in results.values())
    return {"task": "evaluate", "procs": procs, "threads": threads, "images": n * len(results),
            "img_per_s": n * len(results) / seconds, "wall_s": wall, "from": "report seconds", "command": cmd}


def bench_cams(procs: int, threads: int, work: Path, args, data: Path, _n: int, n: int) -> dict:
    cmd = _command(procs, ["evaluate-cams", *(["--weights", args.weights] if args.weights else []), "--data",
                           str(data), "--boxes", str(DATA / "val_boxes.csv"), "--allow-missing", "--methods",
                           "gradcam", "--n-boot", "200", "--no-progress", "--out", str(work / f"cams-{procs}")])
    wall = _run(cmd, threads)
    return {"task": "evaluate-cams", "procs": procs, "threads": threads, "images": n, "img_per_s": n / wall,
            "wall_s": wall, "from": "wall time", "command": cmd}


def table(rows: list[dict]) -> str:
    """One line a run: the speed-up against the same task on one process."""
    lines = [f"{'task':<14} {'procs':>5} {'threads':>7} {'images':>6} {'img/s':>8} {'x 1 proc':>8} {'wall s':>7}  from",
             "-" * 78]
    base = {r["task"]: r["img_per_s"] for r in rows if r["procs"] == 1}
    for r in rows:
        ratio = f"{r['img_per_s'] / base[r['task']]:.2f}" if r["task"] in base else "-"
        lines.append(f"{r['task']:<14} {r['procs']:>5} {r['threads']:>7} {r['images']:>6} {r['img_per_s']:>8.1f} "
                     f"{ratio:>8} {r['wall_s']:>7.1f}  {r['from']}")
    lines += ["", "commands:"] + [f"  {shlex.join(r['command'])}" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts to compare")
    p.add_argument("--tasks", nargs="+", default=["train", "evaluate", "evaluate-cams"],
                   choices=["train", "evaluate", "evaluate-cams"])
    p.add_argument("--steps", type=int, default=8, help="training steps an epoch")
    p.add_argument("--batch", type=int, default=32, help="global training batch (a multiple of every --procs)")
    p.add_argument("--size", type=int, default=112, help="training image size")
    p.add_argument("--per-class", type=int, default=8, help="boxed val images a class for evaluate / evaluate-cams")
    p.add_argument("--weights", help="weights folder (default: the repository's)")
    p.add_argument("--cores", type=int, default=os.cpu_count(), help="cores to split between the processes")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    tasks = list(args.tasks)
    if "evaluate-cams" in tasks and not (ROOT / "cbam_viz" / "research" / "shards.py").exists():
        print("evaluate-cams left out: the research commands do not shard in this checkout")
        tasks.remove("evaluate-cams")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        work = Path(tmp)
        subset = _boxed_subset(work / "val-subset", args.per_class) if set(tasks) - {"train"} else (None, 0, 0)
        for task in tasks:
            for procs in args.procs:
                threads = max(1, args.cores // procs)
                print(f"{task} on {procs} process(es), {threads} thread(s) each ...", flush=True)
                if task == "train":
                    rows.append(bench_train(procs, threads, work, args))
                elif task == "evaluate":
                    rows.append(bench_evaluate(procs, threads, work, args, *subset))
                else:
                    rows.append(bench_cams(procs, threads, work, args, *subset))
    print(f"\n{shlex.join(['python', 'benchmarks/bench_distributed.py', *sys.argv[1:]])}  "
          f"({args.cores} cores; figures: images per second)")
    print(table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
