"""The research commands over a dataset: ``evaluate-cams``, ``ablate-gates``, ``channel-profiles``,
``sanity-check`` (``fit-ood`` registers itself from :mod:`cbam_viz.research.ood_fit`).

Each also runs under ``torchrun --nproc_per_node N -m cbam_viz COMMAND ...`` (issue 31): the ranks
share the images (:mod:`cbam_viz.research.shards`), rank 0 alone prepares the output folder, warns,
shows progress, prints and writes the report one process writes; the other ranks print only errors.
"""
from __future__ import annotations

import argparse
import sys

# Imports of the library sit inside each command: `import torch, torchvision` alone takes 2-8 s
# here (measured under load, 2 cores), and --help, argument errors and the other commands must not
# pay it.

__all__ = ["add_parsers"]


def _lineup(command: str, args: argparse.Namespace, **kw):
    """The lineup the command runs on (``--lineup``, alias ``--pair``), with a warning when a member is
    untrained (by rank 0 alone under torchrun).

    Joins the torchrun job first (:func:`cbam_viz.distributed.context`): under NCCL that picks this
    rank's GPU, where the lineup is then loaded.
    """
    from cbam_viz import distributed
    from cbam_viz.engine.lineup import load_lineup

    main = distributed.context().main
    lineup = load_lineup(args.lineup, weights_dir=args.weights, **kw)
    untrained = [m.name for m in lineup.members if not m.trained]
    if untrained and main:
        verb = "is" if len(untrained) == 1 else "are"
        print(f"{command}: warning: {', '.join(untrained)} in lineup {lineup.name!r} {verb} untrained; "
              "those numbers describe random networks", file=sys.stderr)
    return lineup


def _finish_ranks() -> None:
    """End a command that succeeded on this rank: under torchrun wait for every rank (rank 0 is still
    writing when the others are done) and leave the process group, so no rank exits while another
    still talks to it; nothing in one process. A failing rank skips this: torchrun stops the others."""
    from cbam_viz import distributed

    distributed.barrier()
    distributed.shutdown()


def _method_limits(items) -> dict[str, int]:
    limits = {}
    for item in items or ():
        method, _, count = item.partition("=")
        if not count.isdigit():
            raise SystemExit(f"--method-limit expects METHOD=N, got {item!r}")
        limits[method.strip().lower()] = int(count)
    return limits


def _cmd_evaluate_cams(args: argparse.Namespace) -> int:
    import torch

    from cbam_viz.research.quality import evaluate_cams, write_report
    from cbam_viz.training.compare import parse_comparison

    compare = [parse_comparison(c) for c in args.compare]
    if args.threads:
        torch.set_num_threads(args.threads)
    limits = _method_limits(args.method_limit)
    lineup = _lineup("evaluate-cams", args, device=args.device)
    report, cams = evaluate_cams(
        args.data, args.boxes, lineup=lineup, methods=args.methods, layer=args.layer, batch_size=args.batch_size,
        fractions=tuple(float(f) for f in args.fractions.split(",")), imputer=args.imputer, n_boot=args.n_boot,
        seed=args.seed, max_images=args.max_images, method_limits=limits, allow_missing=args.allow_missing,
        compare=compare, progress=not args.no_progress,
    )
    if report is not None:  # None: a torchrun rank other than 0; rank 0 writes the report of every image
        paths = write_report(report, cams, args.out)
        print(paths["markdown"].read_text())
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    _finish_ranks()
    return 0


def _run_research(command: str, args: argparse.Namespace, run) -> int:
    """Shared by the dataset commands: threads, output folder checked first, the lineup, known errors as one line.

    ``run(lineup)`` does the work and returns the written paths (None on a torchrun rank other than
    0, which writes and prints nothing); the Markdown one is printed.
    """
    import torch

    from cbam_viz import distributed
    from cbam_viz.engine.loading import ModelLoadError
    from cbam_viz.engine.preprocess import ImageError
    from cbam_viz.messages import UserFacingError
    from cbam_viz.outputs import prepare_output_dir
    from cbam_viz.training.evaluate import ClassMismatchError

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if distributed.context().main:
            prepare_output_dir(args.out)
        paths = run(_lineup(command, args))
    except (KeyError, FileNotFoundError, ClassMismatchError, ImageError, UserFacingError, ModelLoadError) as err:
        print(f"{command}: error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2
    if paths is not None:  # None: a torchrun rank other than 0
        print(paths["markdown"].read_text())
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    _finish_ranks()
    return 0


def _cmd_ablate_gates(args: argparse.Namespace) -> int:
    from cbam_viz.research.ablation_report import ablate_lineup, write_report

    def run(lineup):
        report, means = ablate_lineup(lineup, args.data, constant=args.constant, max_images=args.max_images,
                                      batch_size=args.batch_size, progress=not args.no_progress)
        return None if report is None else write_report(report, args.out, means=means)

    return _run_research("ablate-gates", args, run)


def _cmd_channel_profiles(args: argparse.Namespace) -> int:
    from cbam_viz.research.channel_profiles import profile_lineup
    from cbam_viz.research.profile_files import write_lineup_profiles

    def run(lineup):
        profiles = profile_lineup(lineup, args.data, max_images=args.max_images, batch_size=args.batch_size,
                                  progress=not args.no_progress)
        return None if profiles is None else write_lineup_profiles(profiles, args.out, lineup=lineup)

    return _run_research("channel-profiles", args, run)


def _cmd_sanity_check(args: argparse.Namespace) -> int:
    from cbam_viz.engine.cam import list_methods
    from cbam_viz.research.sanity import sanity_dataset, write_report

    unknown = [m for m in args.methods if m.lower() not in list_methods()]
    if unknown:
        print(f"sanity-check: error: unknown CAM method(s) {', '.join(unknown)}; choose from {', '.join(list_methods())}",
              file=sys.stderr)
        return 2

    def run(lineup):
        report = sanity_dataset(lineup, args.data, methods=[m.lower() for m in args.methods], layer=args.layer,
                                max_images=args.max_images, batch_size=args.batch_size, seed=args.seed,
                                progress=not args.no_progress)
        return None if report is None else write_report(report, args.out)

    return _run_research("sanity-check", args, run)


def _add_lineup_args(sp: argparse.ArgumentParser) -> None:
    """``--lineup`` (with ``--pair`` as a hidden alias) and ``--weights``."""
    sp.add_argument("--lineup", help="lineup name from the weights manifest (default: its default lineup); every "
                                     "member is measured, each compared with the lineup's reference")
    sp.add_argument("--pair", dest="lineup", help=argparse.SUPPRESS)
    sp.add_argument("--weights", help="folder holding manifest.json (default: $CBAM_VIZ_WEIGHTS_DIR, else the "
                                      "repository's weights/)")


def _add_research_args(sp: argparse.ArgumentParser, *, out_default: str | None, batch_size: int) -> None:
    """The options the three dataset commands share."""
    sp.add_argument("--data", required=True, help="ImageFolder split whose folder names are the class ids")
    if out_default is None:
        sp.add_argument("--out", required=True, help="output folder (created if needed)")
    else:
        sp.add_argument("--out", default=out_default, help=f"output folder (default: {out_default})")
    _add_lineup_args(sp)
    sp.add_argument("--max-images", type=int, help="use only this many images, spread evenly over the classes")
    sp.add_argument("--batch-size", type=int, default=batch_size, help=f"images per forward (default {batch_size})")
    sp.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register this group's sub-commands on the top-level parser's sub-parsers."""
    q = sub.add_parser("evaluate-cams", help="score every lineup member's CAMs on boxed images (pointing game, "
                       "energy, MaxBoxAcc, ROAD-style faithfulness), paired against the reference")
    q.add_argument("--data", required=True, help="ImageFolder-layout folder (one sub-folder per class id)")
    q.add_argument("--boxes", required=True, help="CSV with wnid,file,xmin,ymin,xmax,ymax in image pixels")
    q.add_argument("--methods", nargs="+", default=["gradcam", "gradcam++", "layercam"],
                   help="CAM methods (scorecam costs ~500x a gradient method: see --method-limit)")
    q.add_argument("--method-limit", action="append", metavar="METHOD=N",
                   help="run METHOD on N evenly spread images only, e.g. scorecam=16 (repeatable)")
    q.add_argument("--out", default="docs/explanation_quality", help="folder for report.json/.md, summary.png, cams.npz")
    _add_lineup_args(q)
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
    q.add_argument("--compare", action="append", default=[], metavar="MEMBER:AGAINST",
                   help="also compare these two members on the same images (repeatable), e.g. "
                        "resnet18_cbam_imagenette:resnet18_se_imagenette")
    q.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(func=_cmd_evaluate_cams)

    a = sub.add_parser("ablate-gates", help="accuracy of every gated member with each gate replaced by a constant "
                       "(off or its dataset mean), with paired bootstrap intervals of the drop")
    _add_research_args(a, out_default="docs/gate_ablation", batch_size=32)
    a.add_argument("--constant", choices=["one", "mean"], default="one",
                   help="replacement: one (gate off) or mean (the gate's mean over --data; also writes "
                        "gate_means_<member>.npz)")
    a.set_defaults(func=_cmd_ablate_gates)

    cp = sub.add_parser("channel-profiles", help="mean channel-gate vector of every gated block per class, for "
                        "every member with channel gates, with class-similarity numbers per block (SE-Net Fig. 6)")
    _add_research_args(cp, out_default="docs/channel_profiles", batch_size=32)
    cp.set_defaults(func=_cmd_channel_profiles)

    sc = sub.add_parser("sanity-check", help="CAMs of every lineup member vs its cascading randomisation "
                        "(Adebayo et al. 2018): SSIM and rank correlation per step and method")
    _add_research_args(sc, out_default="docs/sanity", batch_size=16)
    sc.add_argument("--methods", nargs="+", default=["gradcam", "gradcam++", "layercam"], help="CAM methods")
    sc.add_argument("--layer", help="CAM layer, dotted module name (default: last block of layer4)")
    sc.add_argument("--seed", type=int, default=0, help="seed of the re-initialisation")
    sc.set_defaults(func=_cmd_sanity_check)
