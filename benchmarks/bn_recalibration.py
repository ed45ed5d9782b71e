"""Accuracy experiment: does re-estimating BatchNorm statistics at the test size help the pair?

The recipe trains on random-resized crops up to 144 px and tests whole images at a larger size, so the
running BN statistics come from another distribution than the test images (FixRes, Touvron et
al., 2019). For each model of a pair, at each candidate size, this script scores the shipped file
and a copy whose statistics :func:`cbam_viz.training.monitor.recalibrate_batchnorm` re-estimated on
``--images`` un-augmented training images, both on the files the run held out of training
(:func:`cbam_viz.training.data.holdout_split` with the record's own fraction; the re-estimation images
are drawn from the rest). It then applies the pair's selection rule
(:func:`cbam_viz.training.holdout.choose_for_lineup`) to both kinds of weights, as ``train --export`` does.

Scoring on the held-out files, not on val, is the point: whether to adopt the re-estimation is a
recipe choice, and the validation split stays for the final, reported measurement. The script
changes no file: the weights stay as shipped.

Usage::

    python benchmarks/bn_recalibration.py --train ../shared/data/imagenette2/train \\
        --json docs/bn_recalibration.json
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from cbam_viz.training.data import TensorDataset, decode_images, holdout_split, scan_image_folder  # noqa: E402
from cbam_viz.training.evaluate import resolve_models  # noqa: E402
from cbam_viz.training.holdout import CANDIDATE_SIZES, choose_for_lineup, holdout_scores  # noqa: E402
from cbam_viz.engine.lineup import default_lineup_name  # noqa: E402
from cbam_viz.training.monitor import recalibrate_batchnorm  # noqa: E402
from cbam_viz.models.weights import DEFAULT_WEIGHTS_DIR, load_record  # noqa: E402

KINDS = ("shipped", "recalibrated")


def split_files(train_dir: str, fraction: float, images: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``(held_out, calibration)`` file names: the run's held-out files and ``images`` of the others."""
    scan = scan_image_folder(train_dir)
    index = SimpleNamespace(classes=scan.classes, labels=torch.tensor(scan.labels), files=scan.files)
    train_idx, hold_idx = holdout_split(index, fraction)
    pick = train_idx[torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(seed))[:images]]
    return [scan.files[i] for i in hold_idx.tolist()], [scan.files[i] for i in sorted(pick.tolist())]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", required=True, help="the training folder the pair was trained on (ImageFolder)")
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS_DIR))
    p.add_argument("--lineup", "--pair", dest="lineup", help="lineup name (default: the manifest's default lineup)")
    p.add_argument("--images", type=int, default=2048, help="training images (not held out) for the statistics")
    p.add_argument("--sizes", default=",".join(map(str, CANDIDATE_SIZES)), help="comma-separated test sizes")
    p.add_argument("--threads", type=int)
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pair = args.lineup or default_lineup_name(args.weights)
    records = resolve_models(args.weights, lineup=pair)
    # A record without the field was trained before holdouts existed: it held nothing out.
    fractions = sorted({(r.recipe or {}).get("holdout", 0.0) for r in records})
    if len(fractions) != 1 or not fractions[0]:
        print(f"error: the pair's records held out {fractions} of train, not one fraction > 0", file=sys.stderr)
        return 2
    held_out, calibration = split_files(args.train, fractions[0], args.images)
    for rec in records:  # another folder (files added or removed) would hold out other files
        recorded = (rec.training or {}).get("holdout_images")
        if recorded is not None and recorded != len(held_out):
            print(f"error: {rec.name} was trained holding out {recorded} files, but {args.train} gives "
                  f"{len(held_out)}: is it the folder the pair was trained on?", file=sys.stderr)
            return 2
    if len({(tuple(r.mean), tuple(r.std)) for r in records}) != 1:
        print("error: the pair's models normalise their inputs differently", file=sys.stderr)
        return 2
    sizes = [int(s) for s in args.sizes.split(",")]
    shipped = {r.name: load_record(r, args.weights).float().eval() for r in records}
    per_model = {r.name: {"n": len(held_out), "scores": {k: {} for k in KINDS}} for r in records}
    t0 = time.perf_counter()
    for size in sizes:
        paths = [Path(args.train) / f for f in calibration]
        cal = TensorDataset(decode_images(paths, size, progress=False), torch.zeros(len(paths), dtype=torch.int64),
                            (), tuple(calibration))
        models = {}
        for rec in records:
            model = copy.deepcopy(shipped[rec.name]).to(memory_format=torch.channels_last)
            recalibrate_batchnorm(model, cal, size=size, mean=rec.mean, std=rec.std, images=len(cal))
            models.update({f"{rec.name}/shipped": shipped[rec.name], f"{rec.name}/recalibrated": model})
        # one decode of the held-out files per size for every model (the pair shares mean and std)
        scores = holdout_scores(models, args.train, held_out, mean=records[0].mean, std=records[0].std,
                                sizes=[size])["scores"]
        for rec in records:
            for kind in KINDS:
                per_model[rec.name]["scores"][kind][str(size)] = scores[f"{rec.name}/{kind}"][str(size)]
            before, after = (per_model[rec.name]["scores"][k][str(size)]["top1"] for k in KINDS)
            print(f"{rec.name} at {size} px: held-out top-1 as shipped {100 * before:.2f} %, BN re-estimated "
                  f"{100 * after:.2f} % ({100 * (after - before):+.2f} points) [{time.perf_counter() - t0:.0f} s]",
                  flush=True)
    choices = {kind: choose_for_lineup(per_model, kinds=(kind,)) for kind in KINDS}
    for kind, c in choices.items():
        each = ", ".join(f"{n} {100 * a:.2f} %" for n, a in c["holdout_top1"].items())
        print(f"pair rule, {kind}: {c['input_size']} px, mean held-out top-1 {100 * c['mean_holdout_top1']:.2f} % ({each})")
    better = choices["recalibrated"]["mean_holdout_top1"] > choices["shipped"]["mean_holdout_top1"]
    print(f"held out {len(held_out)} files, statistics from {len(calibration)}: BN re-estimation "
          f"{'beats' if better else 'does not beat'} the shipped weights on the held-out files")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        doc = {"pair": pair, "held_out_images": len(held_out), "calibration_images": len(calibration),
               "models": per_model, "choices": choices, "recalibration_better": better}
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
