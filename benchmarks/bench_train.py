"""Training throughput on this machine, and what it means for the default recipe's wall time.

The accuracy a recipe reaches in its time budget depends on how many images per second this
CPU trains, and that depends above all on whether it multiplies bfloat16 in hardware (AVX-512
BF16 or AMX): where it does, bfloat16 autocast is the fast path; where it does not, oneDNN
emulates it and it is many times *slower* than float32. This script measures one training step
with the trainer's own :func:`cbam_viz.training.step.train_step` (batched random-resized crop + flip
from a uint8 batch, normalise, channels-last, optional autocast, label-smoothed cross-entropy,
backward, SGD step) for each model and train size of the recipe, and prints:

* images/s per (model, size) in the precision ``--bf16 auto`` would pick on this CPU;
* the other precision at the first size only (it can be 10x slower) and the ratio of the two;
* the recipe's estimated training time per model (steps x batch / measured speed, plus one
  evaluation), against the time budget (:data:`BUDGET_MIN`).

Medians of ``--repeats`` steps after ``--warmup`` steps; the models are interleaved per repeat so a
steady neighbour slows both alike. It never fails on a number.

Usage::

    python benchmarks/bench_train.py                  # default recipe, both models
    python benchmarks/bench_train.py --tiny           # smoke run (tests)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from cbam_viz.models import create_model  # noqa: E402
from cbam_viz.training.recipe import Recipe, cpu_has_fast_bf16, train_size_at  # noqa: E402
from cbam_viz.training.step import train_step  # noqa: E402

BUDGET_MIN = 150.0  # issue 12: up to about 150 min per model on the fast CPU kind


class _Stepper:
    """One model, optimizer and fixed uint8 batch; ``step(size, bf16)`` times one training step."""

    def __init__(self, arch: str, recipe: Recipe, num_classes: int, cache_size: int) -> None:
        torch.manual_seed(0)
        self.recipe = recipe
        self.model = create_model(arch, num_classes=num_classes,
                                  zero_init_residual=recipe.zero_init_residual).to(memory_format=torch.channels_last)
        self.model.train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=recipe.momentum, nesterov=True)
        self.images = torch.randint(0, 256, (recipe.batch_size, 3, cache_size, cache_size), dtype=torch.uint8)
        self.labels = torch.randint(0, num_classes, (recipe.batch_size,))
        self.gen = torch.Generator().manual_seed(0)

    def step(self, size: int, bf16: bool) -> float:
        recipe = replace(self.recipe, bf16=bf16)
        t0 = time.perf_counter()
        train_step(self.model, self.opt, self.images, self.labels, recipe=recipe, size=size, generator=self.gen)
        return time.perf_counter() - t0


def _measure(steppers: dict[str, _Stepper], size: int, bf16: bool, warmup: int, repeats: int) -> dict[str, float]:
    """Median images/s per model at ``size``; models interleaved within each repeat."""
    for _ in range(warmup):
        for s in steppers.values():
            s.step(size, bf16)
    times: dict[str, list[float]] = {a: [] for a in steppers}
    for _ in range(repeats):
        for arch, s in steppers.items():
            times[arch].append(s.step(size, bf16))
    return {a: steppers[a].recipe.batch_size / statistics.median(t) for a, t in times.items()}


def estimate_minutes(recipe: Recipe, img_per_s: dict[int, float], train_images: int, val_images: int) -> float:
    """Training minutes of ``recipe`` at the measured speed per train size, plus the final evaluation.

    Evaluation is a forward only (about a third of a training step per image) at ``eval_size``,
    scaled from the speed at the last train size by the pixel count.
    """
    steps = round(train_images * (1 - recipe.holdout)) // recipe.batch_size  # the holdout does not train
    seconds = sum(steps * recipe.batch_size / img_per_s[train_size_at(recipe, e)] for e in range(recipe.epochs))
    last = train_size_at(recipe, recipe.epochs - 1)
    eval_speed = 3 * img_per_s[last] * (last / recipe.eval_size) ** 2
    n_evals = sum(1 for e in range(recipe.epochs) if (e + 1) % recipe.eval_every == 0 or e == recipe.epochs - 1)
    return (seconds + n_evals * val_images / eval_speed) / 60


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="+", default=["resnet18", "resnet18_cbam"])
    p.add_argument("--repeats", type=int, default=5, help="timed steps per (model, size)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per (model, size)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--train-images", type=int, default=9103, help="training split size (Imagenette2 here)")
    p.add_argument("--val-images", type=int, default=3925)
    p.add_argument("--tiny", action="store_true", help="smoke run: batch 4, one 32 px size, 2 epochs")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = Recipe()
    if args.tiny:
        recipe = replace(recipe, batch_size=4, sizes=((0, 32),), epochs=2, eval_size=40, cache_size=40)
        args.repeats, args.warmup, args.train_images, args.val_images = 1, 0, 16, 8
    fast_bf16 = cpu_has_fast_bf16()
    chosen, other = (True, False) if fast_bf16 else (False, True)
    name = {True: "bf16", False: "fp32"}
    sizes = sorted({s for _, s in recipe.sizes})
    print(f"CPU: {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, native bf16: "
          f"{'yes' if fast_bf16 else 'no'} -> --bf16 auto trains in {name[chosen]}; torch {torch.__version__}")
    steppers = {a: _Stepper(a, recipe, 10, recipe.cache_size) for a in args.arch}
    speed: dict[str, dict[int, float]] = {a: {} for a in args.arch}
    for size in sizes:
        for arch, ips in _measure(steppers, size, chosen, args.warmup, args.repeats).items():
            speed[arch][size] = ips
            print(f"  {arch:<16} {size:>4} px  {name[chosen]}  {ips:7.1f} img/s", flush=True)
    # The other precision at the first size only: on a CPU that emulates bf16 one step takes ~20 s.
    other_speed = _measure(steppers, sizes[0], other, min(args.warmup, 1), max(1, min(args.repeats, 2)))
    report = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": fast_bf16,
              "threads": torch.get_num_threads(), "precision": name[chosen], "img_per_s": speed,
              "other_precision": {"precision": name[other], "size": sizes[0], "img_per_s": other_speed},
              "estimated_minutes": {}}
    for arch in args.arch:
        ratio = other_speed[arch] / speed[arch][sizes[0]]
        print(f"  {arch:<16} {sizes[0]:>4} px  {name[other]}  {other_speed[arch]:7.1f} img/s  "
              f"ratio {name[other]}/{name[chosen]} = {ratio:.2f}")
    for arch in args.arch:
        minutes = estimate_minutes(recipe, speed[arch], args.train_images, args.val_images)
        report["estimated_minutes"][arch] = minutes
        verdict = "MET" if minutes <= BUDGET_MIN else "MISSED"
        print(f"estimated recipe time {arch} = {minutes:.1f} min ({recipe.epochs} epochs, {name[chosen]}; "
              f"budget <= {BUDGET_MIN:.0f}) {verdict}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
