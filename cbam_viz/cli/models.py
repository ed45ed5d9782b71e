"""The `add-model`, `add-lineup` and `model-card` sub-commands: a user's own checkpoints, usable like shipped models.

Their work lives in :mod:`cbam_viz.models.importer`; here they are parsed, called and printed. Every
refusal is one sentence on stderr and exit 2; nothing is half-written (the manifest is the commit
point).
"""
from __future__ import annotations

import argparse
import sys

from cbam_viz.models.checkpoints import UnsafeCheckpointError
from cbam_viz.models.weights import resolve_weights_dir

__all__ = ["add_parsers"]


def _triple(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"want three numbers R,G,B, got {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"want three numbers R,G,B, got {text!r}")
    return values


def _refuse(err: BaseException) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 2


def _cmd_add_model(args: argparse.Namespace) -> int:
    from cbam_viz.models.importer import add_model

    weights = resolve_weights_dir(args.weights)
    try:
        record, found = add_model(args.checkpoint, name=args.name, weights_dir=weights, arch=args.arch,
                                  classes=args.classes, input_size=args.input_size, mean=args.mean, std=args.std,
                                  replace=args.replace)
    except (ValueError, FileNotFoundError, UnsafeCheckpointError, RuntimeError) as err:
        return _refuse(err)
    print(f"read {args.checkpoint}:")
    print("\n".join(f"  {line}" for line in found.lines()))
    names = record.class_names
    shown = ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
    print(f"  class names: {shown}")
    print(f"  input size {record.input_size} px, mean {record.mean}, std {record.std}")
    print(f"wrote {weights / record.file} (sha256 {record.sha256[:12]}) and the record {record.name!r} "
          f"in {weights / 'manifest.json'}")
    print(f"next: python -m cbam_viz add-lineup NAME {record.name} [OTHER ...] --weights {weights}")
    return 0


def _cmd_add_lineup(args: argparse.Namespace) -> int:
    from cbam_viz.models.importer import add_lineup

    weights = resolve_weights_dir(args.weights)
    try:
        entry = add_lineup(args.name, args.models, weights_dir=weights, reference=args.reference,
                           default=args.default)
    except ValueError as err:
        return _refuse(err)
    print(f"lineup {args.name!r}: {', '.join(entry['members'])} (reference {entry['reference']})"
          f"{', the default' if entry['default'] else ''}, in {weights / 'manifest.json'}")
    return 0


def _cmd_model_card(args: argparse.Namespace) -> int:
    """The About tab's card from the manifests alone (no weights loaded), for the README or a file."""
    from cbam_viz.service.model_card import manifest_card

    try:
        card = manifest_card(args.lineup, weights_dir=args.weights)
    except (KeyError, FileNotFoundError, ValueError) as err:
        print(f"model-card: error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2
    if args.out:
        from cbam_viz.outputs import atomic_write_text

        print(f"wrote {atomic_write_text(args.out, card + chr(10))}")
    else:
        print(card)
    return 0


def add_parsers(sub) -> None:
    """Register the three sub-commands on the CLI's sub-parser collection."""
    weights_help = ("weights folder to write to (default: $CBAM_VIZ_WEIGHTS_DIR, else the repository's weights/); "
                    "it must exist")
    a = sub.add_parser("add-model", help="register your own checkpoint (ResNet, CBAM, SE or BAM) with its classes",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a.add_argument("checkpoint", help="a .pth/.pt/.tar (read with weights_only=True) or .safetensors file written by "
                                      "torchvision, timm, the official CBAM/BAM code, the resnet_cbam.py snippet or us")
    a.add_argument("--name", required=True, help="record name (letters, digits, _ - .)")
    a.add_argument("--arch", default="auto", help="registered architecture; auto = read from the keys and shapes")
    a.add_argument("--classes", help="class names: a text file (one per line), a JSON list or {index: name}, or an "
                                     "ImageFolder folder (its sorted sub-folders); default 'class 0' .. 'class N-1'")
    a.add_argument("--input-size", type=int, help="input size in px (default 224, 32 for a CIFAR stem)")
    a.add_argument("--mean", type=_triple, help="normalisation mean R,G,B (default ImageNet's)")
    a.add_argument("--std", type=_triple, help="normalisation std R,G,B (default ImageNet's)")
    a.add_argument("--weights", help=weights_help)
    a.add_argument("--replace", action="store_true", help="replace a model of the same name")
    a.set_defaults(func=_cmd_add_model)

    lu = sub.add_parser("add-lineup", help="name 1 to 4 models of one weights folder to show side by side",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    lu.add_argument("name", help="lineup name")
    lu.add_argument("models", nargs="+", help="record names (see add-model), 1 to 4")
    lu.add_argument("--reference", help="the model the others are compared with (default: the plain ResNet, else "
                                        "the first)")
    lu.add_argument("--default", action="store_true", help="make it the folder's default lineup")
    lu.add_argument("--weights", help=weights_help)
    lu.set_defaults(func=_cmd_add_lineup)

    mc = sub.add_parser("model-card", help="the lineup's model card (the About tab's) from the manifest, as Markdown")
    mc.add_argument("--weights", help="weights folder(s) holding manifest.json, path-separator list (default: "
                                      "$CBAM_VIZ_WEIGHTS_DIR, else the repository's weights/)")
    mc.add_argument("--lineup", help="lineup name in the manifests (default: the default lineup)")
    mc.add_argument("--pair", dest="lineup", help=argparse.SUPPRESS)  # the older name of --lineup
    mc.add_argument("--out", help="write the Markdown to this file instead of printing it")
    mc.set_defaults(func=_cmd_model_card)
