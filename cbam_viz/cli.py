"""Command line: ``python -m cbam_viz {train,evaluate,explain,evaluate-cams,...}``.

Each sub-command is a thin layer: parse arguments, call the library, print. The work lives in the
modules named in each ``_cmd_*`` function.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]


def _cmd_train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from cbam_viz.train import Recipe, train

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
        from cbam_viz.train import cpu_has_fast_bf16

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
            from cbam_viz.pair_export import carried_settings

            if not args.export:
                raise ValueError("--settings-from needs --export (the folder the final run is written to)")
            settings = carried_settings(args.settings_from, recipe=recipe, archs=args.arch)
            print(f"settings from {args.settings_from}: {settings['weights']} weights at {settings['input_size']} px, "
                  f"as pair {settings['carried_from']['pair']!r} chose on its held-out files")
        if args.pair_with:
            from cbam_viz.pair_export import read_half

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
        from cbam_viz.data import scan_image_folder
        from cbam_viz.pair_export import export_runs

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

    from cbam_viz.evaluate import evaluate_models, format_paired, format_report, paired_difference, resolve_models
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


def _cmd_explain(args: argparse.Namespace) -> int:
    """Explain images or folders of images; write ``<name>.png`` + ``<name>.json`` (+ ``.npz``) each."""
    from tqdm import tqdm

    from cbam_viz import ood, outputs, service
    from cbam_viz.controls import check_controls
    from cbam_viz.messages import UserFacingError

    paths, missing = service.collect_images(args.inputs)
    failures: list[tuple[str, str]] = [(p, "no such file or folder") for p in missing]
    if not paths and not failures:
        print("explain: error: no image files found in the given folders", file=sys.stderr)
        return 2
    try:
        out = outputs.prepare_output_dir(args.out)
        pair = service.get_pair(args.pair)
        controls = check_controls(pair, method=args.method, target=args.target, layer=args.layer, alpha=args.alpha)
    except UserFacingError as err:
        print(f"explain: error: {err}", file=sys.stderr)
        return 2
    for warning in service.describe_pair(pair).warnings:
        print(f"explain: warning: {warning}", file=sys.stderr)
    formats = ("png", "json", "npz") if args.npz else ("png", "json")
    used: set[str] = set()
    written = 0
    for path in tqdm(paths, desc="explain", unit="image", disable=args.no_progress or None):
        try:
            analysis = service.analyse(path, pair=pair, method=controls.method, target=controls.target,
                                       layer=controls.layer, alpha=controls.alpha)
        except UserFacingError as err:
            failures.append((str(path), str(err)))
            continue
        stem = outputs.unique_stem(outputs.safe_stem(path.name), used)
        try:
            service.save(analysis, out, stem=stem, formats=formats)
        except OSError as err:  # disk full, folder removed or made read-only mid-run: stop here
            print(f"explain: error: cannot write to {out}: {err.strerror or err}", file=sys.stderr)
            return 2
        written += 1
        if args.verbose:
            top = {role: getattr(analysis.explanation, role) for role in ("baseline", "cbam")}
            tqdm.write(f"{path.name}: baseline {top['baseline'].top1.label} {top['baseline'].top1.prob:.0%}, "
                       f"CBAM {top['cbam'].top1.label} {top['cbam'].top1.prob:.0%}; CAM of "
                       f"{top['baseline'].target_label!r} / {top['cbam'].target_label!r}")
            if note := ood.verbose_note({t: top[r].out_of_distribution for r, t in (("baseline", "baseline"),
                                                                                       ("cbam", "CBAM"))}):
                tqdm.write(f"{path.name}: {note}")
    print(f"explain: wrote {written} of {len(paths) + len(missing)} image(s) to {out}")
    if failures:
        print(f"explain: {len(failures)} file(s) failed:", file=sys.stderr)
        for name, reason in failures:
            print(f"  {name}: {reason}", file=sys.stderr)
        return 1
    return 0


def _cmd_evaluate_cams(args: argparse.Namespace) -> int:
    import torch

    from cbam_viz.pair import load_pair
    from cbam_viz.quality import evaluate_cams, write_report

    if args.threads:
        torch.set_num_threads(args.threads)
    limits = {}
    for item in args.method_limit or ():
        method, _, count = item.partition("=")
        if not count.isdigit():
            raise SystemExit(f"--method-limit expects METHOD=N, got {item!r}")
        limits[method.strip().lower()] = int(count)
    kw = {"weights_dir": args.weights} if args.weights else {}
    pair = load_pair(args.pair, device=args.device, **kw)
    if not pair.trained:
        print(f"warning: pair {pair.name!r} is untrained (no trained weights found); its numbers mean nothing",
              file=sys.stderr)
    report, cams = evaluate_cams(
        args.data, args.boxes, pair=pair, methods=args.methods, layer=args.layer, batch_size=args.batch_size,
        fractions=tuple(float(f) for f in args.fractions.split(",")), imputer=args.imputer, n_boot=args.n_boot,
        seed=args.seed, max_images=args.max_images, method_limits=limits, allow_missing=args.allow_missing,
        progress=not args.no_progress,
    )
    paths = write_report(report, cams, args.out)
    print(paths["markdown"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _cmd_plot_curves(args: argparse.Namespace) -> int:
    from cbam_viz.curves import plot_training_curves

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


def _cmd_model_card(args: argparse.Namespace) -> int:
    """The About tab's card from the manifest alone (no weights loaded), for the README or a file."""
    from cbam_viz.evaluate import resolve_models
    from cbam_viz.model_card import records_card
    from cbam_viz.pair import default_pair_name
    from cbam_viz.weights import resolve_weights_dir

    weights = resolve_weights_dir(args.weights)
    try:
        pair = args.pair or default_pair_name(weights)
        if pair is None:
            raise FileNotFoundError(f"no pair in {weights / 'manifest.json'}; train and export one first")
        base, cbam = resolve_models(weights, pair=pair)
    except (KeyError, FileNotFoundError, ValueError) as err:
        print(f"model-card: error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2
    card = records_card(pair, {"baseline": (base.name, base.arch, base), "CBAM": (cbam.name, cbam.arch, cbam)})
    if args.out:
        from cbam_viz.outputs import atomic_write_text

        print(f"wrote {atomic_write_text(args.out, card + chr(10))}")
    else:
        print(card)
    return 0


# ---- issue 15: gate ablation, channel profiles per class, sanity check (model randomisation)


def _run_research(command: str, args: argparse.Namespace, run) -> int:
    """Shared by the issue-15 commands: threads, output folder checked first, the pair, known errors as one line.

    ``run(pair)`` does the work and returns the written paths; the Markdown one is printed.
    """
    import torch

    from cbam_viz.evaluate import ClassMismatchError
    from cbam_viz.messages import UserFacingError
    from cbam_viz.outputs import prepare_output_dir
    from cbam_viz.pair import ModelLoadError, load_pair
    from cbam_viz.preprocess import ImageError

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        prepare_output_dir(args.out)
        pair = load_pair(args.pair, weights_dir=args.weights)
        if not pair.trained:
            print(f"{command}: warning: pair {pair.name!r} is untrained; its numbers describe random networks",
                  file=sys.stderr)
        paths = run(pair)
    except (KeyError, FileNotFoundError, ClassMismatchError, ImageError, UserFacingError, ModelLoadError) as err:
        print(f"{command}: error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2
    print(paths["markdown"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _cmd_ablate_gates(args: argparse.Namespace) -> int:
    from cbam_viz.gate_ablation import ablate_dataset, write_report

    def run(pair):
        report, means = ablate_dataset(pair.cbam, args.data, constant=args.constant, max_images=args.max_images,
                                       batch_size=args.batch_size, progress=not args.no_progress)
        return write_report(report, args.out, means=means)

    return _run_research("ablate-gates", args, run)


def _cmd_channel_profiles(args: argparse.Namespace) -> int:
    from cbam_viz.channel_profiles import profile_dataset, write_profiles

    def run(pair):
        profiles = profile_dataset(pair.cbam, args.data, max_images=args.max_images, batch_size=args.batch_size,
                                   progress=not args.no_progress)
        return write_profiles(profiles, args.out)

    return _run_research("channel-profiles", args, run)


def _cmd_sanity_check(args: argparse.Namespace) -> int:
    from cbam_viz.cam import list_methods
    from cbam_viz.sanity import sanity_dataset, write_report

    unknown = [m for m in args.methods if m.lower() not in list_methods()]
    if unknown:
        print(f"sanity-check: error: unknown CAM method(s) {', '.join(unknown)}; choose from {', '.join(list_methods())}",
              file=sys.stderr)
        return 2

    def run(pair):
        report = sanity_dataset(pair, args.data, methods=[m.lower() for m in args.methods], layer=args.layer,
                                max_images=args.max_images, batch_size=args.batch_size, seed=args.seed,
                                progress=not args.no_progress)
        return write_report(report, args.out)

    return _run_research("sanity-check", args, run)


def _add_research_args(sp: argparse.ArgumentParser, *, out_default: str | None, batch_size: int) -> None:
    """The options the three issue-15 commands share."""
    sp.add_argument("--data", required=True, help="ImageFolder split whose folder names are the class ids")
    if out_default is None:
        sp.add_argument("--out", required=True, help="output folder (created if needed)")
    else:
        sp.add_argument("--out", default=out_default, help=f"output folder (default: {out_default})")
    sp.add_argument("--pair", help="pair name from the weights manifest (default: its default pair)")
    sp.add_argument("--weights", help="folder holding manifest.json (default: $CBAM_VIZ_WEIGHTS_DIR, else the "
                                      "repository's weights/)")
    sp.add_argument("--max-images", type=int, help="use only this many images, spread evenly over the classes")
    sp.add_argument("--batch-size", type=int, default=batch_size, help=f"images per forward (default {batch_size})")
    sp.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cbam_viz", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

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
                        "(default: cbam_viz.holdout.CANDIDATE_SIZES)")
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

    from cbam_viz.cli_models import add_parsers as add_model_parsers

    add_model_parsers(sub)  # add-model, add-lineup

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

    x = sub.add_parser("explain", help="explain images with both models; write composite PNG + JSON per image")
    x.add_argument("inputs", nargs="+", help="image files and/or folders of images (searched recursively)")
    x.add_argument("--out", required=True, help="output folder (created if needed)")
    x.add_argument("--pair", help="model pair from weights/manifest.json (default: the manifest's default, "
                                  "or the untrained pair without weights)")
    x.add_argument("--method", default="gradcam", help="CAM method (see cbam_viz.explain.list_methods())")
    x.add_argument("--target", help="class to explain: a name, an index or a class id such as the WordNet id "
                                  "n03028079 (default: each model's predicted class)")
    x.add_argument("--layer", help="block the CAM looks at, e.g. layer3.1 (default: the last block)")
    x.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity in the overlays, 0 to 1")
    x.add_argument("--npz", action="store_true", help="also write the raw maps as <name>.npz")
    x.add_argument("--no-progress", action="store_true", help="no progress bar")
    x.add_argument("-v", "--verbose", action="store_true",
                   help="print both models' top-1 and the class each CAM explains, per image")
    x.set_defaults(func=_cmd_explain)

    c = sub.add_parser("plot-curves", help="training-curves figure (loss, train accuracy, monitored top-1) "
                       "from the trainer's log.jsonl files")
    c.add_argument("--run", action="append", required=True, metavar="LABEL=LOG",
                   help="a run's label and its log.jsonl, e.g. resnet18=runs/resnet18/log.jsonl (repeatable)")
    c.add_argument("--out", default="docs/training_curves.png", help="PNG to write")
    c.add_argument("--eval-size", type=int, help="monitoring image size, for the third panel's title")
    c.set_defaults(func=_cmd_plot_curves)

    mc = sub.add_parser("model-card", help="the pair's model card (the About tab's) from the manifest, as Markdown")
    mc.add_argument("--weights", help="folder holding manifest.json (default: $CBAM_VIZ_WEIGHTS_DIR, else the "
                                      "repository's weights/)")
    mc.add_argument("--pair", help="pair name in the manifest (default: the default pair)")
    mc.add_argument("--out", help="write the Markdown to this file instead of printing it")
    mc.set_defaults(func=_cmd_model_card)

    q = sub.add_parser("evaluate-cams", help="score both models' CAMs on boxed images (pointing game, energy, "
                       "MaxBoxAcc, ROAD-style faithfulness) with paired bootstrap intervals")
    q.add_argument("--data", required=True, help="ImageFolder-layout folder (one sub-folder per class id)")
    q.add_argument("--boxes", required=True, help="CSV with wnid,file,xmin,ymin,xmax,ymax in image pixels")
    q.add_argument("--methods", nargs="+", default=["gradcam", "gradcam++", "layercam"],
                   help="CAM methods (scorecam costs ~500x a gradient method: see --method-limit)")
    q.add_argument("--method-limit", action="append", metavar="METHOD=N",
                   help="run METHOD on N evenly spread images only, e.g. scorecam=16 (repeatable)")
    q.add_argument("--out", default="docs/explanation_quality", help="folder for report.json/.md, summary.png, cams.npz")
    q.add_argument("--pair", help="pair name from the weights manifest (default: its default pair)")
    q.add_argument("--weights", help="folder holding manifest.json (default: the repository's weights/)")
    q.add_argument("--device", help="cpu, cuda, mps or auto (default: $CBAM_VIZ_DEVICE, else auto)")
    q.add_argument("--layer", help="CAM layer, dotted module name (default: last block of layer4)")
    q.add_argument("--batch-size", type=int, default=8, help="images per explain() call")
    q.add_argument("--fractions", default="0.2,0.5", help="shares of pixels removed for the faithfulness scores")
    q.add_argument("--imputer", choices=["blur", "mean", "road"], default="blur",
                   help="fill for removed pixels (road: the ROAD paper's noisy-linear imputer, much slower)")
    q.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples")
    q.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    q.add_argument("--max-images", type=int, help="evaluate only this many boxed images, spread evenly (smoke runs)")
    q.add_argument("--allow-missing", action="store_true", help="skip CSV rows whose image is not in --data")
    q.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(func=_cmd_evaluate_cams)

    a = sub.add_parser("ablate-gates", help="accuracy of the CBAM model with each gate replaced by a constant "
                       "(1 or its dataset mean), with paired bootstrap intervals of the drop")
    _add_research_args(a, out_default="docs/gate_ablation", batch_size=32)
    a.add_argument("--constant", choices=["one", "mean"], default="one",
                   help="replacement: one (gate off) or mean (the gate's mean over --data; also writes gate_means.npz)")
    a.set_defaults(func=_cmd_ablate_gates)

    cp = sub.add_parser("channel-profiles", help="mean channel-gate vector of every CBAM block per class, "
                        "with class-similarity numbers per block (SE-Net Fig. 6)")
    _add_research_args(cp, out_default="docs/channel_profiles", batch_size=32)
    cp.set_defaults(func=_cmd_channel_profiles)

    sc = sub.add_parser("sanity-check", help="CAMs of each model vs its cascading randomisation "
                        "(Adebayo et al. 2018): SSIM and rank correlation per step and method")
    _add_research_args(sc, out_default="docs/sanity", batch_size=16)
    sc.add_argument("--methods", nargs="+", default=["gradcam", "gradcam++", "layercam"], help="CAM methods")
    sc.add_argument("--layer", help="CAM layer, dotted module name (default: last block of layer4)")
    sc.add_argument("--seed", type=int, default=0, help="seed of the re-initialisation")
    sc.set_defaults(func=_cmd_sanity_check)
    from cbam_viz.ood_fit import add_parser as add_ood_parser

    add_ood_parser(sub)  # fit-ood
    from cbam_viz.cli_help import extend_parser

    return extend_parser(p, sub)  # defaults and method names in --help, --overwrite, the `app` command


def main(argv: list[str] | None = None) -> int:
    from cbam_viz.cli_errors import run_command

    args = build_parser().parse_args(argv)
    return run_command(args)  # checks, then the command; any failure -> one sentence and an exit status
