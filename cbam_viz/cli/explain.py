"""The ``explain`` command: images or folders -> a composite PNG + JSON (+ npz) per image.
"""
from __future__ import annotations

import argparse
import os
import sys

# Imports of the library sit inside each command: `import torch, torchvision` alone takes 2-8 s
# here (measured under load, 2 cores), and --help, argument errors and the other commands must not
# pay it.

__all__ = ["add_parsers"]


def _use_weights(folder: str | None) -> None:
    """``--weights DIR``: searched before the folders models are read from otherwise
    (``$CBAM_VIZ_WEIGHTS_DIR``'s, else the shipped ``weights/``), for this process only."""
    if folder:
        from cbam_viz.models.weights import WEIGHTS_DIR_ENV, weights_dirs

        rest = [str(p) for p in weights_dirs()]
        os.environ[WEIGHTS_DIR_ENV] = os.pathsep.join([folder, *rest])


def _print_verbose(tqdm, path, analysis) -> None:
    from cbam_viz.engine import ood

    models = analysis.explanation.models
    tqdm.write(f"{path.name}: " + "; ".join(f"{n} {m.top1.label} {m.top1.prob:.0%} (CAM of {m.target_label!r})"
                                             for n, m in models.items()))
    if note := ood.verbose_note({n: m.out_of_distribution for n, m in models.items()}):
        tqdm.write(f"{path.name}: {note}")


def _cmd_explain(args: argparse.Namespace) -> int:
    """Explain images or folders of images; write ``<name>.png`` + ``<name>.json`` (+ ``.npz``) each.

    Under ``torchrun`` every rank explains an even share of the images into the same folder.
    """
    from cbam_viz import outputs, service
    from cbam_viz.engine.controls import check_controls
    from cbam_viz.messages import UserFacingError

    paths, missing = service.collect_images(args.inputs)
    failures: list[tuple[str, str]] = [(p, "no such file or folder") for p in missing]
    if not paths and not failures:
        print("explain: error: no image files found in the given folders", file=sys.stderr)
        return 2
    _use_weights(args.weights)
    try:
        out = outputs.prepare_output_dir(args.out)
        lineup = service.get_lineup(args.lineup)
        controls = check_controls(lineup, method=args.method, target=args.target, layer=args.layer, alpha=args.alpha)
    except UserFacingError as err:
        print(f"explain: error: {err}", file=sys.stderr)
        return 2
    for warning in service.describe_lineup(lineup).warnings:
        print(f"explain: warning: {warning}", file=sys.stderr)
    formats = ("png", "json", "npz") if args.npz else ("png", "json")
    outcomes = _explain_share(args, paths, lineup, controls, out, formats)
    if outcomes is None:  # a torchrun rank other than 0: rank 0 reports for every rank
        return 0
    stopped = next((o[1] for o in outcomes if o[0] == "stopped"), None)
    if stopped:
        print(f"explain: error: cannot write to {out}: {stopped}", file=sys.stderr)
        return 2
    failures += [(o[1], o[2]) for o in outcomes if o[0] == "failed"]
    written = sum(o[0] == "written" for o in outcomes)
    print(f"explain: wrote {written} of {len(paths) + len(missing)} image(s) to {out}")
    if failures:
        print(f"explain: {len(failures)} file(s) failed:", file=sys.stderr)
        for name, reason in failures:
            print(f"  {name}: {reason}", file=sys.stderr)
        return 1
    return 0


def _explain_share(args, paths, lineup, controls, out, formats) -> list[tuple] | None:
    """Explain and save this process's share of ``paths`` (all of them without torchrun); rank 0 gets
    every image's outcome in order: ``("written",)``, ``("failed", path, reason)`` or ``("stopped", why)``
    (the folder cannot be written: the rank stops there). File names are chosen for the whole list
    up front, so two ranks never pick the same one."""
    from tqdm import tqdm

    from cbam_viz import distributed, outputs, service
    from cbam_viz.messages import UserFacingError

    used: set[str] = set()
    stems = [outputs.unique_stem(outputs.safe_stem(path.name), used) for path in paths]
    ctx = distributed.context()
    outcomes: list[tuple[int, tuple]] = []
    for i, path in tqdm(distributed.shard(paths, ctx), desc="explain", unit="image",
                        disable=args.no_progress or not ctx.main or None):
        try:
            analysis = service.analyse_checked(path, lineup, controls)
        except UserFacingError as err:
            outcomes.append((i, ("failed", str(path), str(err))))
            continue
        try:
            service.save(analysis, out, stem=stems[i], formats=formats)
        except OSError as err:  # disk full, folder removed or made read-only mid-run: stop here
            outcomes.append((i, ("stopped", err.strerror or str(err))))
            break
        outcomes.append((i, ("written",)))
        if args.verbose:
            _print_verbose(tqdm, path, analysis)
    return distributed.gather_ordered(outcomes, ctx)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register this group's sub-commands on the top-level parser's sub-parsers."""
    x = sub.add_parser("explain", help="explain images with every model of a lineup; write composite PNG + JSON per image")
    x.add_argument("inputs", nargs="+", help="image files and/or folders of images (searched recursively)")
    x.add_argument("--out", required=True, help="output folder (created if needed)")
    x.add_argument("--lineup", "--pair", dest="lineup",
                   help="lineup from the weights manifests (default: the default lineup, or the untrained one "
                        "without weights); --pair is an older spelling")
    x.add_argument("--weights", help="weights folder searched first (then $CBAM_VIZ_WEIGHTS_DIR, then the "
                                     "repository's weights/), e.g. one written by add-model")
    x.add_argument("--method", default="gradcam", help="CAM method (see cbam_viz.engine.explain.list_methods())")
    x.add_argument("--target", help="class to explain: a name, an index or a class id such as the WordNet id "
                                  "n03028079 (default: each model's predicted class)")
    x.add_argument("--layer", help="block the CAM looks at, e.g. layer3.1 (default: the last block)")
    x.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity in the overlays, 0 to 1")
    x.add_argument("--npz", action="store_true", help="also write the raw maps as <name>.npz")
    x.add_argument("--no-progress", action="store_true", help="no progress bar")
    x.add_argument("-v", "--verbose", action="store_true",
                   help="print each model's top-1 and the class its CAM explains, per image")
    x.set_defaults(func=_cmd_explain)
