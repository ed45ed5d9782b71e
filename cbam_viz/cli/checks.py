"""Argument checks every sub-command gets before it starts: numbers, files, method names, overwrites.

Why here and not in each ``_cmd_*``: a wrong number or a missing file should be refused in the
same words by every command, before a model is loaded or a minute of work is lost. The checks are
keyed by the argparse ``dest`` they look at, so a new sub-command that names its options like the
others (``--data``, ``--max-images``, ``--methods``...) gets them without a line of code; a check
of its own joins :data:`CHECKS` under its command name. Each check raises
:class:`~cbam_viz.messages.UserFacingError` (exit 2, one sentence, via :mod:`cbam_viz.cli.errors`)
and may normalise the value in place (method aliases become registered names).
"""
from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path

from cbam_viz.messages import UserFacingError

__all__ = ["CHECKS", "AT_LEAST_ONE", "AT_LEAST_ZERO", "FOLDERS", "FILES", "REPORT_FILES", "check_arguments",
           "planned_explain_files", "CAM_COMMANDS"]

#: Whole-number options that must be >= 1 (argparse ``dest`` names).
AT_LEAST_ONE = ("max_images", "batch_size", "threads", "n_boot", "epochs", "eval_size", "eval_every", "max_steps")
#: Whole-number options that must be >= 0.
AT_LEAST_ZERO = ("cache_size", "seed")
#: Options naming a folder that must exist (``--data`` of every research command, ``--val``, ``--weights``).
FOLDERS = ("data", "val", "weights")
#: Options naming a file that must exist and be readable.
FILES = ("boxes",)
#: The file each report-writing command writes into ``--out``: present means "this would replace a report".
#: Commands whose --method / --methods / --method-limit name CAM methods.
CAM_COMMANDS = ("explain", "evaluate-cams", "sanity-check")
REPORT_FILES = {"ablate-gates": "gate_ablation.json", "channel-profiles": "channel_profiles.json",
                "sanity-check": "sanity.json", "evaluate-cams": "report.json"}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _numbers(args: argparse.Namespace) -> None:
    for dests, low in ((AT_LEAST_ONE, 1), (AT_LEAST_ZERO, 0)):
        for dest in dests:
            value = getattr(args, dest, None)
            if value is not None and value < low:
                raise UserFacingError(f"{_flag(dest)} must be {low} or more, not {value}.")
    for dest in ("alpha",):
        value = getattr(args, dest, None)
        if value is not None and not (math.isfinite(value) and 0 <= value <= 1):
            raise UserFacingError(f"{_flag(dest)} must be a number from 0 to 1, not {value}.")
    fractions = getattr(args, "fractions", None)
    if isinstance(fractions, str):
        try:
            values = [float(f) for f in fractions.split(",")]
        except ValueError:
            values = []
        if not values or not all(0 < v < 1 for v in values):
            raise UserFacingError(f"--fractions wants shares between 0 and 1 separated by commas, e.g. 0.2,0.5; "
                                  f"got {fractions!r}.")


def _paths(args: argparse.Namespace) -> None:
    for dest in FOLDERS:
        value = getattr(args, dest, None)
        if not isinstance(value, (str, Path)):
            continue
        # --weights may list several folders (cbam_viz.models.weights.weights_dirs: "/mine:/app/weights")
        for part in (str(value).split(os.pathsep) if dest == "weights" else [value]):
            if part and not Path(part).is_dir():
                what = "is a file, not a folder" if Path(part).exists() else "no such folder"
                raise UserFacingError(f"{_flag(dest)} {part}: {what}.")
    for dest in FILES:
        value = getattr(args, dest, None)
        if isinstance(value, (str, Path)):
            path = Path(value)
            if not path.is_file():
                raise UserFacingError(f"{_flag(dest)} {value}: "
                                      f"{'is a folder, not a file' if path.exists() else 'no such file'}.")
            try:
                with path.open("rb") as f:
                    head = f.read(65536)
            except OSError as err:
                raise UserFacingError(f"{_flag(dest)} {value}: cannot be read ({err.strerror or err}).") from None
            try:
                head.decode("utf-8")
            except UnicodeDecodeError as err:
                if err.start < len(head) - 4:  # not merely a character cut at the end of the sample
                    raise UserFacingError(f"{_flag(dest)} {value}: not a text (CSV) file.") from None


def _methods(args: argparse.Namespace) -> None:
    """``--method`` / ``--methods`` / ``--method-limit`` in any usual spelling -> registered names."""
    if getattr(args, "command", None) not in CAM_COMMANDS:  # e.g. fit-ood's --method is an OOD score
        return
    from cbam_viz.engine.controls import check_method

    if isinstance(getattr(args, "method", None), str):
        args.method = check_method(args.method)
    if getattr(args, "methods", None):
        args.methods = list(dict.fromkeys(check_method(m) for m in args.methods))
    limits = []
    for item in getattr(args, "method_limit", None) or ():
        method, _, count = item.partition("=")
        if not count.strip().isdigit() or int(count) < 1:
            raise UserFacingError(f"--method-limit wants METHOD=N with N a whole number of 1 or more, got {item!r}.")
        limits.append(f"{check_method(method)}={int(count)}")
    if limits:
        args.method_limit = limits


def planned_explain_files(args: argparse.Namespace) -> list[Path]:
    """The files ``explain`` would write into ``--out`` that are already there."""
    from cbam_viz.outputs import safe_stem, unique_stem
    from cbam_viz.service import collect_images

    out = Path(args.out)
    if not out.is_dir():
        return []
    paths, _ = collect_images(args.inputs)
    used: set[str] = set()
    suffixes = (".png", ".json", ".npz") if getattr(args, "npz", False) else (".png", ".json")
    stems = [unique_stem(safe_stem(p.name), used) for p in paths]  # the same names the command gives them
    return [out / (s + x) for s in stems for x in suffixes if (out / (s + x)).exists()]


def _overwrite(args: argparse.Namespace) -> None:
    """Refuse to replace earlier results unless ``--overwrite`` says so."""
    if getattr(args, "overwrite", True) or not getattr(args, "out", None):
        return
    if args.command == "explain":
        clash = planned_explain_files(args)
    elif args.command in REPORT_FILES:
        clash = [p for p in [Path(args.out) / REPORT_FILES[args.command]] if p.exists()]
    else:  # a single output file (model-card, plot-curves, evaluate)
        clash = [p for p in [Path(args.out)] if p.is_file()]
    if clash:
        names = ", ".join(p.name for p in clash[:4]) + (f" and {len(clash) - 4} more" if len(clash) > 4 else "")
        raise UserFacingError(f"{args.out} already holds {names}; pass --overwrite to replace "
                              f"{'them' if len(clash) > 1 else 'it'}, or choose another --out.")


def _train_archs(args: argparse.Namespace) -> None:
    """Unknown architectures are refused before the split is decoded (minutes on a large one)."""
    from cbam_viz.models import list_models

    unknown = [a for a in args.arch if a not in list_models()]
    if unknown:
        raise UserFacingError(f"--arch: unknown model {', '.join(map(repr, unknown))}; "
                              f"choose among: {', '.join(list_models())}.")


#: Checks run for every command, in order; a command's own checks (``CHECKS[command]``) run after.
COMMON: list[Callable[[argparse.Namespace], None]] = [_numbers, _paths, _methods, _overwrite]
#: Extra checks per sub-command name: ``CHECKS.setdefault("fit-ood", []).append(my_check)``.
CHECKS: dict[str, list[Callable[[argparse.Namespace], None]]] = {"train": [_train_archs]}


def check_arguments(args: argparse.Namespace) -> None:
    """Every check for ``args.command``; the first failure raises.

    Raises:
        UserFacingError: one sentence naming the option, the value and what it accepts.
    """
    for check in [*COMMON, *CHECKS.get(getattr(args, "command", ""), ())]:
        check(args)
