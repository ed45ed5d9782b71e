"""Accuracy experiment: does re-estimating BatchNorm statistics at the test size help the pair?

The recipe trains on random-resized crops up to 144 px and tests whole images at a larger size, so the
running BN statistics come from another distribution than the test images (FixRes, Touvron et
al., 2019). For each model of a pair this script evaluates the shipped file on the validation
split, then :func:`cbam_viz.train.recalibrate_batchnorm` on ``--images`` un-augmented training
images at the record's input size, then evaluates again, and prints both top-1 figures. It
changes no file: the weights stay as shipped.

Evaluation runs on the decoded-split cache (float32), which gives the same top-1 as
``python -m cbam_viz evaluate`` (checked on the 26-epoch pair at 192 px: 86.98 % / 85.17 %).

Usage::

    python benchmarks/bn_recalibration.py --train ../shared/data/imagenette2/train \\
        --val ../shared/data/imagenette2/val
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from cbam_viz.data import load_cached_split  # noqa: E402
from cbam_viz.evaluate import resolve_models  # noqa: E402
from cbam_viz.pair import default_pair_name  # noqa: E402
from cbam_viz.train import evaluate_tensors, recalibrate_batchnorm  # noqa: E402
from cbam_viz.weights import DEFAULT_WEIGHTS_DIR, load_record  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", required=True, help="training split (ImageFolder) to recalibrate on")
    p.add_argument("--val", required=True, help="validation split (ImageFolder) to evaluate on")
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS_DIR))
    p.add_argument("--pair", help="pair name (default: the manifest's default pair)")
    p.add_argument("--images", type=int, default=2048, help="training images used for the statistics")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "cbam_viz"))
    p.add_argument("--threads", type=int)
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pair = args.pair or default_pair_name(args.weights)
    rows = {}
    for rec in resolve_models(args.weights, pair=pair):
        val = load_cached_split(args.val, rec.input_size, cache_dir=args.cache_dir, progress=False)
        train = load_cached_split(args.train, rec.input_size, cache_dir=args.cache_dir, progress=False)
        model = load_record(rec, args.weights).float().eval().to(memory_format=torch.channels_last)
        before = evaluate_tensors(model, val, size=rec.input_size, mean=rec.mean, std=rec.std)["top1"]
        t0 = time.perf_counter()
        recalibrate_batchnorm(model, train, size=rec.input_size, mean=rec.mean, std=rec.std, images=args.images)
        after = evaluate_tensors(model, val, size=rec.input_size, mean=rec.mean, std=rec.std)["top1"]
        rows[rec.name] = {"as_shipped": before, "recalibrated": after, "images": min(args.images, len(train)),
                          "size": rec.input_size, "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{rec.name}: top-1 as shipped {100 * before:.2f} %, BN recalibrated on {rows[rec.name]['images']} "
              f"images at {rec.input_size} px {100 * after:.2f} % ({100 * (after - before):+.2f} points)", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"pair": pair, "models": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
