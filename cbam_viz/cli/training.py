"""The training commands: ``train``, ``evaluate`` (accuracy of shipped files: every member of a lineup, each
against the reference) and ``plot-curves``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from dataclasses import replace
from pathlib import Path

# Imports of the library sit inside each command: `import torch, torchvision` alone takes 2-8 s
# here (measured under load, 2 cores), and --help, argument errors and the other commands must not
# pay it.

__all__ = ["add_parsers"]


class _Refusal(Exception):
    """An option ``train`` refuses before any work: one line on stderr, exit status 2."""


def _cmd_train(args: argparse.Namespace) -> int:
    from cbam_viz import distributed
    from cbam_viz.training.train import train

    try:
        recipe, device, starts, settings = _prepare_training(args)
        budget = _cache_budget(args)
    except _Refusal as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results = {}
    for arch in args.arch:
        run_dir = Path(args.runs) / arch
        results[arch] = train(arch, args.data, run_dir, recipe=recipe, resume=args.resume, cache_dir=args.cache_dir,
                              val_dir=args.val, threads=args.threads, max_steps=args.max_steps, device=device,
                              init_record=starts.get(arch), stream=args.stream, cache_budget=budget,
                              workers=args.workers, sync_bn=args.sync_bn)
    if not distributed.is_main():  # a torchrun rank other than 0: rank 0 exports for every rank
        return 0
    return _export_trained(args, results, recipe, settings)


def _cache_budget(args: argparse.Namespace) -> int | None:
    """``--cache-budget`` in bytes (None: the default, half of this machine's memory)."""
    if args.cache_budget is None:
        return None
    from cbam_viz.training.stream import parse_bytes

    try:
        return parse_bytes(args.cache_budget)
    except ValueError as err:
        raise _Refusal(f"--cache-budget: {err}") from None


def _say(text: str) -> None:
    """Print on rank 0 of a torchrun job (torchrun's ``RANK``; always without torchrun): the options are
    checked on every rank, and read once."""
    if os.environ.get("RANK", "0").strip() in ("", "0"):
        print(text)


def _prepare_training(args: argparse.Namespace):
    """``(recipe, device, records to start from, carried settings)``, every option checked in the
    order a person reads them, before any data is read."""
    from cbam_viz.training.recipe import Recipe

    overrides = _recipe_overrides(args)
    device = _training_device(args)
    overrides["bf16"] = _bf16_choice(args, device)
    starts = _init_records(args)
    if args.init_from:
        overrides["init_from"] = args.init_from
    recipe = replace(Recipe(), **overrides)
    return recipe, device, starts, _check_export_options(args, recipe)


def _recipe_overrides(args: argparse.Namespace) -> dict:
    """The recipe fields given on the command line (unset options keep the recipe's defaults)."""
    overrides = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "seed", "eval_size", "eval_every",
                                            "cache_size", "holdout", "ema_decay", "warmup_epochs", "cutmix_alpha",
                                            "mixup_alpha")
                 if getattr(args, k) is not None}
    for flag in ("cutmix_alpha", "mixup_alpha"):
        value = overrides.get(flag, 0.0)
        if not (math.isfinite(value) and value >= 0):
            raise _Refusal(f"--{flag.replace('_', '-')} must be a finite number >= 0 (0 = off), got {value}")
    if args.sizes:
        overrides["sizes"] = tuple(tuple(int(v) for v in s.split(":")) for s in args.sizes.split(","))
    if args.crop_scale:
        try:
            lo, hi = (float(v) for v in args.crop_scale.split(","))
        except ValueError:
            lo = hi = -1.0
        if not 0 < lo <= hi <= 1:
            raise _Refusal(f"--crop-scale wants MIN,MAX with 0 < MIN <= MAX <= 1, got {args.crop_scale!r}")
        overrides["crop_scale"] = (lo, hi)
    return overrides


def _training_device(args: argparse.Namespace):
    from cbam_viz.engine.loading import select_device

    try:
        return select_device(args.device)  # "auto" and a missing GPU are settled before any work
    except ValueError as err:
        raise _Refusal(f"--device: {err}") from None


def _bf16_choice(args: argparse.Namespace, device) -> bool:
    """bfloat16 on or off as asked; ``auto``: where the hardware multiplies it natively."""
    if args.no_bf16 or args.bf16 == "off":
        return False
    if args.bf16 == "on":
        return True
    if device.type == "cuda":  # auto on a GPU: bfloat16 where its tensor cores have it (Ampere, sm 8.0, on)
        import torch

        on = torch.cuda.get_device_capability(device)[0] >= 8
        _say(f"bf16 auto: {'on' if on else 'off'} ({torch.cuda.get_device_name(device)})")
        return on
    if device.type != "cpu":  # mps and others: float32, the one precision every backend trains in
        return False
    from cbam_viz.training.recipe import cpu_has_fast_bf16  # auto: only where the CPU multiplies it in hardware

    on = cpu_has_fast_bf16()
    _say(f"bf16 auto: {'on' if on else 'off'} (this CPU {'has' if on else 'lacks'} AVX-512 BF16 / AMX)")
    return on


def _init_records(args: argparse.Namespace) -> dict:
    """arch -> the record ``--init-from`` starts it from (a second stage); empty without the option."""
    if not args.init_from:
        return {}
    from cbam_viz.models.weights import WeightRecord, read_manifest

    try:
        models = read_manifest(args.init_from)["models"]
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise _Refusal(f"--init-from {args.init_from!r}: no readable manifest ({err})") from None
    starts = {}
    for arch in args.arch:
        if f"{arch}_{args.name}" not in models:
            raise _Refusal(f"--init-from {args.init_from!r} has no record '{arch}_{args.name}' to start {arch} from")
        starts[arch] = WeightRecord(**models[f"{arch}_{args.name}"])
    return starts


def _check_export_options(args: argparse.Namespace, recipe):
    """The settings ``--settings-from`` carries (None without it), and the ``--pair-with`` half checked:
    before training, so a long run does not end in a refused export."""
    from cbam_viz.training.export import carried_settings, read_half

    settings = None
    try:
        if args.settings_from:
            if not args.export:
                raise ValueError("--settings-from needs --export (the folder the final run is written to)")
            settings = carried_settings(args.settings_from, recipe=recipe, archs=args.arch)
            _say(f"settings from {args.settings_from}: {settings['weights']} weights at {settings['input_size']} px, "
                  f"as lineup {settings['carried_from']['pair']!r} chose on its held-out files")
        if args.pair_with:
            if not args.export:
                raise ValueError("--pair-with needs --export (the folder the lineup is written to)")
            read_half(args.pair_with, name=args.name, recipe=recipe, holdout_files=None, other_than=args.arch,
                      settings=settings)
    except ValueError as err:
        raise _Refusal(str(err)) from None
    return settings


def _export_trained(args: argparse.Namespace, results: dict, recipe, settings) -> int:
    if not args.export:
        return 0
    unfinished = [a for a, r in results.items() if len(r.history) < recipe.epochs]
    if unfinished:
        print(f"not exported: {', '.join(unfinished)} not finished (only a finished lineup replaces shipped files)")
        return 0
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
    from cbam_viz.engine.lineup import default_lineup_name
    from cbam_viz.models.weights import ChecksumError, resolve_weights_dir
    from cbam_viz.training.compare import (check_comparisons, evaluation_document, format_paired,
                                           lineup_differences, member_comparisons, parse_comparison)
    from cbam_viz.training.evaluate import evaluate_models, format_report, resolve_lineup

    weights = resolve_weights_dir(args.weights)
    if not args.overwrite and args.markdown and Path(args.markdown).is_file():
        print(f"evaluate: error: {args.markdown} already exists; pass --overwrite to replace it, or choose "
              f"another --markdown.", file=sys.stderr)
        return 2
    try:
        if not args.model and not args.lineup:  # neither: the folder's default lineup
            args.lineup = default_lineup_name(weights) if (weights / "manifest.json").exists() else None
        if not args.model and not args.lineup:
            raise KeyError(f"no lineup in {weights / 'manifest.json'}; name a model with --model, or train and "
                           f"export a lineup first")
        records, reference = resolve_lineup(weights, model=args.model, lineup=args.lineup)
        pairs = [parse_comparison(c) for c in args.compare]
        check_comparisons([r.name for r in records], pairs)  # before any forward pass
        results = evaluate_models(records, args.data, weights_dir=weights, batch_size=args.batch_size,
                                  hflip=args.hflip, progress=not args.no_progress)
    except (KeyError, FileNotFoundError, ValueError, ChecksumError) as err:
        # Known failures (unknown name, missing/corrupt file, wrong class folders): one line, no traceback.
        print(f"evaluate: error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2
    if results is None:  # a torchrun rank other than 0: rank 0 prints and writes for every rank
        return 0
    print(format_report(results))
    differences = lineup_differences(results, reference)  # every member against the reference
    comparisons = member_comparisons(results, pairs)
    for diff in [*differences.values(), *comparisons]:
        print("\n" + format_paired(diff))
    doc = evaluation_document(results, lineup=args.lineup, reference=reference, differences=differences,
                              comparisons=comparisons)
    _write_evaluation(args, doc)
    if args.update_manifest:
        _store_evaluation(args, weights, results, differences)
    return 0


def _write_evaluation(args: argparse.Namespace, doc: dict) -> None:
    """``--out`` (JSON) and ``--markdown``, each written atomically."""
    from cbam_viz.outputs import atomic_write_text
    from cbam_viz.training.compare import evaluation_markdown

    for path, text in ((args.out, lambda: json.dumps(doc, indent=2) + "\n"),
                       (args.markdown, lambda: evaluation_markdown(doc))):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(Path(path), text())
            print(f"wrote {path}")


def _store_evaluation(args: argparse.Namespace, weights: Path, results: list, differences: dict) -> None:
    """Merge each member's figures (and its difference against the reference) into its record."""
    from cbam_viz.models.weights import update_manifest

    which = ["--lineup", args.lineup] if args.lineup else ["--model", args.model]
    given = ["--weights", str(args.weights)] if args.weights else []
    command = shlex.join(["python", "-m", "cbam_viz", "evaluate", *given, *which, "--data", str(args.data),
                          *(["--hflip"] if args.hflip else [])])
    for r in results:
        metrics = r.manifest_metrics(command)
        if args.hflip:  # reported beside the plain figures, never instead of them
            metrics = {("val_hflip_" + k[4:] if k.startswith("val_") else "hflip_" + k): v for k, v in metrics.items()}
        if r.name in differences:
            metrics["val_hflip_paired_difference" if args.hflip else "val_paired_difference"] = differences[r.name]
        update_manifest(weights, metrics=(r.name, metrics))
    print(f"updated {weights / 'manifest.json'}: {', '.join(r.name for r in results)}")


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
    _add_train_parser(sub)
    _add_evaluate_parser(sub)
    _add_curves_parser(sub)


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train one or more architectures with one shared recipe")
    t.add_argument("--arch", nargs="+", default=["resnet18", "resnet18_cbam"], help="registered model names")
    t.add_argument("--data", required=True, help="training folder in ImageFolder layout")
    t.add_argument("--val", help="validation folder, evaluated during training")
    t.add_argument("--runs", default="runs", help="folder for checkpoints and logs (one sub-folder per arch)")
    t.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "cbam_viz"), help="decoded-split cache")
    t.add_argument("--resume", action="store_true", help="continue from the last finished epoch")
    t.add_argument("--export", help="weights folder to write the safetensors files, manifest entries and the lineup "
                                   "(the plain ResNet its reference) to, once every --arch has finished (weights "
                                   "and input size chosen on the held-out files)")
    t.add_argument("--name", default="imagenette", help="suffix of the exported record name")
    t.add_argument("--pair-with", help="weights folder holding another model of the lineup, exported alone by an "
                                      "earlier 'train --export' of one --arch with the same options: --export "
                                      "then makes the held-out choice over both and writes the lineup")
    t.add_argument("--settings-from", help="weights folder whose default lineup was trained with this recipe and a "
                                          "held-out split: a final run on every training file (--holdout 0) ships "
                                          "with the weights kind and input size that lineup chose on its held-out "
                                          "files")
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--eval-size", type=int)
    t.add_argument("--eval-every", type=int)
    t.add_argument("--cache-size", type=int, help="side in px of the decoded training images (cached or streamed)")
    t.add_argument("--cache-budget", help="memory the decoded training split may take on this machine, e.g. 8G "
                                          "(every torchrun process holds its own copy); a larger split is streamed "
                                          "from its files (default: half of this machine's memory)")
    t.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="decode the training images from their files every step, in --workers processes "
                        "(--no-stream: cache them in memory); default: chosen by --cache-budget. Same numbers")
    t.add_argument("--workers", type=int, default=2, help="processes decoding a streamed split")
    t.add_argument("--sync-bn", action="store_true",
                   help="under torchrun on GPUs (NCCL): BatchNorm over the whole global batch; without it each "
                        "process normalises over its own --batch-size / N images")
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


def _add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("evaluate", help="top-1/top-5, per-class accuracy and confusion of shipped weights")
    e.add_argument("--weights", help="folder holding manifest.json and the safetensors files (default: "
                                      "$CBAM_VIZ_WEIGHTS_DIR, else the repository's weights/)")
    which = e.add_mutually_exclusive_group()
    which.add_argument("--model", help="record name in the manifest")
    which.add_argument("--lineup", help="lineup name in the manifest (default: its default lineup): evaluates every "
                                        "member, and each one against the reference (paired bootstrap interval, "
                                        "McNemar)")
    which.add_argument("--pair", dest="lineup", help=argparse.SUPPRESS)  # the name before lineups
    e.add_argument("--data", required=True, help="ImageFolder split whose folder names are the class ids")
    e.add_argument("--out", help="write the results (every member, the differences) as JSON to this file")
    e.add_argument("--markdown", help="write the results as a Markdown report to this file")
    e.add_argument("--update-manifest", action="store_true",
                   help="merge val_top1/val_top5/val_per_class/val_confusion/val_n into the records' metrics, and "
                        "each member's difference against the reference (val_paired_difference)")
    e.add_argument("--compare", action="append", default=[], metavar="MEMBER:AGAINST",
                   help="also compare these two members on the same images (repeatable), e.g. "
                        "resnet18_cbam_imagenette:resnet18_se_imagenette: does CBAM's spatial gate add anything "
                        "over SE's channel attention? Reported and written, not stored in the manifest")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--hflip", action="store_true", help="average each image's softmax with its mirror image's "
                   "(test-time augmentation; the app does not do it); --update-manifest stores it as val_hflip_*")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=_cmd_evaluate)


def _add_curves_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("plot-curves", help="training-curves figure (loss, train accuracy, monitored top-1) "
                       "from the trainer's log.jsonl files")
    c.add_argument("--run", action="append", required=True, metavar="LABEL=LOG",
                   help="a run's label and its log.jsonl, e.g. resnet18=runs/resnet18/log.jsonl (repeatable)")
    c.add_argument("--out", default="docs/training_curves.png", help="PNG to write")
    c.add_argument("--eval-size", type=int, help="monitoring image size, for the third panel's title")
    c.set_defaults(func=_cmd_plot_curves)
