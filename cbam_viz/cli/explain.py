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
    """``--weights DIR``: searched before ``$CBAM_VIZ_WEIGHTS_DIR``'s folders (this process only)."""
    if folder:
        from cbam_viz.models.weights import WEIGHTS_DIR_ENV

        rest = os.environ.get(WEIGHTS_DIR_ENV, "")
        os.environ[WEIGHTS_DIR_ENV] = os.pathsep.join([folder, rest]) if rest else folder


def _print_verbose(tqdm, path, analysis) -> None:
    from cbam_viz.engine import ood

    models = analysis.explanation.models
    tqdm.write(f"{path.name}: " + "; ".join(f"{n} {m.top1.label} {m.top1.prob:.0%} (CAM of {m.target_label!r})"
                                             for n, m in models.items()))
    if note := ood.verbose_note({n: m.out_of_distribution for n, m in models.items()}):
        tqdm.write(f"{path.name}: {note}")


def _cmd_explain(args: argparse.Namespace) -> int:
    """Explain images or folders of images; write ``<name>.png`` + ``<name>.json`` (+ ``.npz``) each."""
    from tqdm import tqdm

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
    used: set[str] = set()
    written = 0
    for path in tqdm(paths, desc="explain", unit="image", disable=args.no_progress or None):
        try:
            analysis = service.analyse_checked(path, lineup, controls)
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
            _print_verbose(tqdm, path, analysis)
    print(f"explain: wrote {written} of {len(paths) + len(missing)} image(s) to {out}")
    if failures:
        print(f"explain: {len(failures)} file(s) failed:", file=sys.stderr)
        for name, reason in failures:
            print(f"  {name}: {reason}", file=sys.stderr)
        return 1
    return 0


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
