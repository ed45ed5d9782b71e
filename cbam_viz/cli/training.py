"""The training commands: ``train``, ``evaluate`` (accuracy of shipped files) and ``plot-curves``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

# Imports of the library sit inside each command: `import torch, torchvision` alone takes 2-8 s
# here (measured under load, 2 cores), and --help, argument errors and the other commands must not
# pay it.

__all__ = ["add_parsers"]


def _cmd_train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from cbam_viz.training.train import Recipe, train

    recipe = Recipe()
    overrides = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "seed", "eval_size", "eval_every", "cache_size",
                                            "holdout", "ema_decay", "warmup_epochs", "cutmix_alpha",
                                            "mixup_alpha")
                 if getattr(args, k) is not None}
    for flag in ("cutmix_alpha", "mixup_alpha"):
        value = overrides.get(flag, 0.0)
        if not (math.isfinite(value) and value >= 0):
            print(f"error: --{flag.replace('_', '-')} must be a finite number >= 0 (0 = off), got {value}",
                  file=sys.stderr)
            return 2
    if args.sizes:
        overrides["sizes"] = tuple(tuple(int(v) for v in s.split(":")) for s in args.sizes.split(","))
    if args.crop_scale:
        try:
            lo, hi = (float(v) for v in args.crop_scale.split(","))
        except ValueError:
            lo = hi = -1.0
        if not 0 < lo <= hi <= 1:
            print(f"error: --crop-scale wants MIN,MAX with 0 < MIN <= MAX <= 1, got {args.crop_scale!r}",
                  file=sys.stderr)
            return 2
        overrides["crop_scale"] = (lo, hi)
    from cbam_viz.pair import select_device

    try:
        device = select_device(args.device)  # "auto" and a missing GPU are settled before any work
    except ValueError as err:
        print(f"error: --device: {err}", file=sys.stderr)
        return 2
    if args.no_bf16 or args.bf16 == "off":
        overrides["bf16"] = False
    elif args.bf16 == "on":
        overrides["bf16"] = True
    elif device.type == "cuda":  # auto on a GPU: bfloat16 where its tensor cores have it (Ampere, sm 8.0, on)
        import torch

        overrides["bf16"] = torch.cuda.get_device_capability(device)[0] >= 8
        print(f"bf16 auto: {'on' if overrides['bf16'] else 'off'} ({torch.cuda.get_device_name(device)})")
    elif device.type != "cpu":  # mps and others: float32, the one precision every backend trains in
        overrides["bf16"] = False
    else:  # auto: bfloat16 only where the CPU multiplies it in hardware
        from cbam_viz.training.train import cpu_has_fast_bf16

        overrides["bf16"] = cpu_has_fast_bf16()
        print(f"bf16 auto: {'on' if overrides['bf16'] else 'off'} (this CPU "
              f"{'has' if overrides['bf16'] else 'lacks'} AVX-512 BF16 / AMX)")
    starts = {}
    if args.init_from:
        from cbam_viz.weights import WeightRecord, read_manifest

        overrides["init_from"] = args.init_from
        try:
            models = read_manifest(args.init_from)["models"]
        except (FileNotFoundError, ValueError, KeyError) as err:
            print(f"error: --init-from {args.init_from!r}: no readable manifest ({err})", file=sys.stderr)
            return 2
        for arch in args.arch:
            if f"{arch}_{args.name}" not in models:
                print(f"error: --init-from {args.init_from!r} has no record '{arch}_{args.name}' to start {arch} from",
                      file=sys.stderr)
                return 2
            starts[arch] = WeightRecord(**models[f"{arch}_{args.name}"])
    recipe = replace(recipe, **overrides)
    settings = None
    try:  # checked before training, so a long run does not end in a refused export
        if args.settings_from:
            from cbam_viz.training.export import carried_settings

            if not args.export:
                raise ValueError("--settings-from needs --export (the folder the final run is written to)")
            settings = carried_settings(args.settings_from, recipe=recipe, archs=args.arch)
            print(f"settings from {args.settings_from}: {settings['weights']} weights at {settings['input_size']} px, "
                  f"as pair {settings['carried_from']['pair']!r} chose on its held-out files")
        if args.pair_with:
            from cbam_viz.training.export import read_half

            if not args.export:
                raise ValueError("--pair-with needs --export (the folder the pair is written to)")
            read_half(args.pair_with, name=args.name, recipe=recipe, holdout_files=None, other_than=args.arch,
                      settings=settings)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results = {}
    for arch in args.arch:
        run_dir = Path(args.runs) / arch
        results[arch] = train(arch, args.data, run_dir, recipe=recipe, resume=args.resume, cache_dir=args.cache_dir,
                              val_dir=args.val, threads=args.threads, max_steps=args.max_steps, device=device,
                              init_record=starts.get(arch))
    unfinished = [a for a, r in results.items() if len(r.history) < recipe.epochs]
    if args.export and unfinished:
        print(f"not exported: {', '.join(unfinished)} not finished (only a finished pair replaces shipped files)")
    elif args.export:
        from cbam_viz.training.data import scan_image_folder
        from cbam_viz.training.export import export_runs

        try:
            lines = export_runs(results, recipe=recipe, classes=list(scan_image_folder(args.data).classes),
                                data_dir=args.data, weights_dir=args.export, name=args.name,
                                sizes=args.select_sizes, pair_with=args.pair_with, settings=settings)
        except ValueError as err:
            print(f"error: not exported: {err}", file=sys.stderr)
            return 2
        print("\n".join(lines))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import shlex

    from cbam_viz.training.evaluate import evaluate_models, format_paired, format_report, paired_difference, resolve_models
    from cbam_viz.outputs import atomic_write_text
    from cbam_viz.weights import ChecksumError, resolve_weights_dir, update_manifest

    weights = resolve_weights_dir(args.weights)
    try:
        records = resolve_models(weights, model=args.model, pair=args.pair)
        results = evaluate_models(records, args.data, weights_dir=weights, batch_size=args.batch_size,
                                  hflip=args.hflip, progress=not args.no_progress)
    except (KeyError, FileNotFoundError, ValueError, ChecksumError) as err:
        # Known failures (unknown name, missing/corrupt file, wrong class folders): one line, no traceback.
        print(f"evaluate: error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2
    print(format_report(results))
    if args.pair:  # the two records of a pair, baseline first
        diff = paired_difference(*results)
        print("\n" + format_paired(diff))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps({r.name: r.to_json() for r in results}, indent=2) + "\n")
        print(f"wrote {out}")
    if args.update_manifest:
        which = ["--pair", args.pair] if args.pair else ["--model", args.model]
        given = ["--weights", str(args.weights)] if args.weights else []
        command = shlex.join(["python", "-m", "cbam_viz", "evaluate", *given, *which, "--data", str(args.data),
                              *(["--hflip"] if args.hflip else [])])
        for r in results:
            metrics = r.manifest_metrics(command)
            if args.hflip:  # reported beside the plain figures, never instead of them
                metrics = {("val_hflip_" + k[4:] if k.startswith("val_") else "hflip_" + k): v
                           for k, v in metrics.items()}
            if args.pair:
                metrics["val_hflip_paired_difference" if args.hflip else "val_paired_difference"] = diff
            update_manifest(weights, metrics=(r.name, metrics))
        print(f"updated {weights / 'manifest.json'}: {', '.join(r.name for r in results)}")
    return 0


def _cmd_plot_curves(args: argparse.Namespace) -> int:
    from cbam_viz.training.curves import plot_training_curves

    runs = {}
    for item in args.run:
        label, sep, path = item.partition("=")
        if not sep or not label or not Path(path).is_file():
            print(f"plot-curves: error: --run wants LABEL=LOG.jsonl with an existing file, got {item!r}",
                  file=sys.stderr)
            return 2
        runs[label] = path
    print(f"wrote {plot_training_curves(runs, args.out, eval_size=args.eval_size)}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register this group's sub-commands on the top-level parser's sub-parsers."""
    t = sub.add_parser("train", help="train one or more architectures with one shared recipe")
    t.add_argument("--arch", nargs="+", default=["resnet18", "resnet18_cbam"], help="registered model names")
    t.add_argument("--data", required=True, help="training folder in ImageFolder layout")
    t.add_argument("--val", help="validation folder, evaluated during training")
    t.add_argument("--runs", default="runs", help="folder for checkpoints and logs (one sub-folder per arch)")
    t.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "cbam_viz"), help="decoded-split cache")
    t.add_argument("--resume", action="store_true", help="continue from the last finished epoch")
    t.add_argument("--export", help="weights folder to write the safetensors files, manifest entries and the pair "
                                   "to, once every --arch has finished (weights and input size chosen on the "
                                   "held-out files)")
    t.add_argument("--name", default="imagenette", help="suffix of the exported record name")
    t.add_argument("--pair-with", help="weights folder holding the other model of the pair, exported alone by an "
                                      "earlier 'train --export' of one --arch with the same options: --export "
                                      "then makes the pair's held-out choice over both and writes the pair")
    t.add_argument("--settings-from", help="weights folder whose default pair was trained with this recipe and a "
                                          "held-out split: a final run on every training file (--holdout 0) ships "
                                          "with the weights kind and input size that pair chose on its held-out files")
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--eval-size", type=int)
    t.add_argument("--eval-every", type=int)
    t.add_argument("--cache-size", type=int)
    t.add_argument("--holdout", type=float, help="share of each training class held out to choose the evaluation "
                                                 "size and EMA-or-raw weights on (default 0.08; 0 = none)")
    t.add_argument("--warmup-epochs", type=float, help="linear learning-rate warm-up before the cosine (default 2)")
    t.add_argument("--ema-decay", type=float, help="decay of the weight average (default 0.999; 0 = off)")
    t.add_argument("--select-sizes", type=lambda v: [int(x) for x in v.split(",")],
                   help="input sizes tried on the held-out files before --export, e.g. 160,192,224 "
                        "(default: cbam_viz.training.holdout.CANDIDATE_SIZES)")
    t.add_argument("--sizes", help="progressive resizing as EPOCH:SIZE,..., e.g. 0:96,10:128,21:144")
    t.add_argument("--crop-scale", help="random-resized-crop area range as MIN,MAX, e.g. 0.35,1")
    t.add_argument("--cutmix-alpha", type=float, help="CutMix: paste a box of another training image, Beta(a, a) "
                                                      "area (default 0 = off; 1 is usual)")
    t.add_argument("--mixup-alpha", type=float, help="Mixup: blend with another training image, Beta(a, a) weight "
                                                     "(default 0 = off; with --cutmix-alpha a coin picks one per batch)")
    t.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bfloat16 autocast: auto = on only where the CPU has AVX-512 BF16 or AMX (elsewhere "
                        "it is emulated, over 10x slower); the choice is recorded in the recipe, so --resume "
                        "needs the same one")
    t.add_argument("--no-bf16", action="store_true", help="same as --bf16 off")
    t.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    t.add_argument("--device", default="cpu", help="cpu (default), cuda or auto: on a GPU the cache, augmentation, "
                                                   "model and optimizer live there (same recipe, same data order)")
    t.add_argument("--max-steps", type=int, help="stop after this many steps (smoke runs)")
    t.add_argument("--init-from", help="weights folder whose records <arch>_<name> each run starts from (a second, "
                                       "fine-tuning stage with its own recipe; the first stage's recipe and "
                                       "training are kept in the exported record)")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("evaluate", help="top-1/top-5, per-class accuracy and confusion of shipped weights")
    e.add_argument("--weights", help="folder holding manifest.json and the safetensors files (default: "
                                      "$CBAM_VIZ_WEIGHTS_DIR, else the repository's weights/)")
    which = e.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="record name in the manifest")
    which.add_argument("--pair", help="pair name in the manifest (evaluates both models)")
    e.add_argument("--data", required=True, help="ImageFolder split whose folder names are the class ids")
    e.add_argument("--out", help="write the results as JSON to this file")
    e.add_argument("--update-manifest", action="store_true",
                   help="merge val_top1/val_top5/val_per_class/val_confusion/val_n into the records' metrics")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--hflip", action="store_true", help="average each image's softmax with its mirror image's "
                   "(test-time augmentation; the app does not do it); --update-manifest stores it as val_hflip_*")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=_cmd_evaluate)

    c = sub.add_parser("plot-curves", help="training-curves figure (loss, train accuracy, monitored top-1) "
                       "from the trainer's log.jsonl files")
    c.add_argument("--run", action="append", required=True, metavar="LABEL=LOG",
                   help="a run's label and its log.jsonl, e.g. resnet18=runs/resnet18/log.jsonl (repeatable)")
    c.add_argument("--out", default="docs/training_curves.png", help="PNG to write")
    c.add_argument("--eval-size", type=int, help="monitoring image size, for the third panel's title")
    c.set_defaults(func=_cmd_plot_curves)
