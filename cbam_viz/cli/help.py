"""What ``--help`` says, and the sub-commands that only start something (``cbam-viz app``).

Why a module of its own: :mod:`cbam_viz.cli` declares each option once; this module adds, for
every sub-command at once, what a newcomer needs to read in ``--help``: the default of each
option, the CAM methods by name (the registry's, filled in only when help is printed, so parsing
stays free of the CAM imports), the exit statuses, and ``--overwrite`` on the commands that write
results into a folder. :func:`extend_parser` is called once at the end of
:func:`cbam_viz.cli.build_parser`; a sub-command added there gets it all.
"""
from __future__ import annotations

import argparse
import re
import runpy
import sys

from cbam_viz.cli.errors import DEBUG_ENV, prog_name

__all__ = ["HelpFormatter", "DESCRIPTION", "EPILOG", "METHODS_HELP", "OVERWRITE_COMMANDS", "extend_parser"]

DESCRIPTION = ("cbam-viz: what CBAM attention changes inside a ResNet. Explain photos with a baseline "
               "ResNet and its CBAM twin side by side, start the web page, or run the research commands "
               "over an ImageFolder split. '%(prog)s COMMAND --help' describes each command.")
EPILOG = (f"exit status: 0 done; 1 some input files could not be used (listed, one reason each); 2 a wrong "
          f"argument or an unusable input (one sentence); 3 a bug ({DEBUG_ENV}=1 shows its traceback).")
#: Placeholder a help text may hold; replaced by the registered CAM methods when help is printed.
METHODS_HELP = "{methods}"
#: Commands that write results into --out and refuse to replace earlier ones without --overwrite.
OVERWRITE_COMMANDS = ("explain", "ablate-gates", "channel-profiles", "sanity-check", "evaluate-cams", "evaluate",
                      "model-card")
#: Commands whose --method / --methods are CAM methods (fit-ood's --method is an OOD score).
CAM_COMMANDS = ("explain", "evaluate-cams", "sanity-check")
#: Help for options that several commands share and a command left without help.
_SHARED_HELP = {"batch_size": "images per forward", "no_progress": "no progress bar",
                "threads": "torch threads (default: torch's choice)"}
_TRAIN_HELP = {  # train's Recipe fields that have no help of their own; the default is read from Recipe
    "epochs": "training epochs", "batch_size": "images per step", "lr": "peak learning rate (SGD)",
    "seed": "seed of the initialisation, data order and augmentation",
    "eval_size": "image size of the monitoring evaluation", "eval_every": "evaluate every N epochs",
    "cache_size": "shorter side of the decoded images kept in the split cache",
}


def _method_names() -> str:
    from cbam_viz.engine.cam import list_methods

    return ", ".join(list_methods())


def _shown(default) -> str:
    if isinstance(default, (list, tuple)):
        return " ".join(str(v) for v in default)
    return str(default)


class HelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" where an option has a default its help does not state, and the method list."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if METHODS_HELP in text:
            text = text.replace(METHODS_HELP, _method_names())
        recipe_field = getattr(action, "recipe_field", None)
        if recipe_field:
            from cbam_viz.training.recipe import Recipe

            default = getattr(Recipe(), recipe_field)
            text = f"{text} (default: {_shown(default)}, from cbam_viz.training.recipe.Recipe)"
        elif (action.option_strings and action.default is not None and action.default is not False
              and action.default != argparse.SUPPRESS and "default" not in text.lower()):  # 0 is a default
            text = f"{text} (default: {_shown(action.default)})"
        return re.sub(r"%(?!\()", "%%", text)  # a literal % (e.g. "20 %"), keeping %(default)s and kin


def _cmd_app(args: argparse.Namespace) -> int:
    """Start the web page, as ``python app.py`` does in a checkout (the same script, shipped in the package)."""
    import os

    from cbam_viz.resources import app_script

    if args.host:
        os.environ["GRADIO_SERVER_NAME"] = args.host
    if args.port is not None:
        os.environ["GRADIO_SERVER_PORT"] = str(args.port)
    script = app_script()
    sys.argv = [str(script)]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def _add_app(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser("app", help="start the web page (http://127.0.0.1:7860 unless --host/--port say otherwise)")
    a.add_argument("--host", help="address to serve on, e.g. 0.0.0.0 (default: $GRADIO_SERVER_NAME, else 127.0.0.1)")
    a.add_argument("--port", type=int, help="port (default: $GRADIO_SERVER_PORT, else 7860)")
    a.set_defaults(func=_cmd_app)


def extend_parser(parser: argparse.ArgumentParser, sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Help text, defaults, ``--overwrite`` and ``app`` for ``parser`` and each of its sub-commands."""
    if "app" not in sub.choices:
        _add_app(sub)
    parser.prog = prog_name()
    parser.description, parser.epilog = DESCRIPTION, EPILOG
    for name, sp in sub.choices.items():
        sp.prog = f"{parser.prog} {name}"
        sp.formatter_class = HelpFormatter
        if sp.epilog is None:
            sp.epilog = EPILOG
        for action in sp._actions:
            if name in CAM_COMMANDS and action.dest in ("method", "methods") and action.option_strings:
                action.help = (f"CAM method{'s' if action.dest == 'methods' else ''}: {METHODS_HELP} (any usual "
                               f"spelling, e.g. Grad-CAM++ or GradCAMPlusPlus){_tail(action.help)}")
            if name == "train" and action.dest in _TRAIN_HELP and not action.help:
                action.help, action.recipe_field = _TRAIN_HELP[action.dest], action.dest
            elif action.dest in _SHARED_HELP and not action.help:
                action.help = _SHARED_HELP[action.dest]
        if name in OVERWRITE_COMMANDS and "overwrite" not in {a.dest for a in sp._actions}:
            sp.add_argument("--overwrite", action="store_true",
                            help="replace results already in --out (without it the command refuses to start)")
    parser.formatter_class = HelpFormatter
    return parser


def _tail(text: str | None) -> str:
    """What an old help text said beyond "CAM method(s)" (e.g. scorecam's cost), kept after the list."""
    if not text or "(" not in text or "list_methods" in text:
        return ""
    return " " + text[text.index("("):]
