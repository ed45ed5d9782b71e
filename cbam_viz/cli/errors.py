"""The command line's one error path: every failure of every sub-command ends as one sentence.

Why: a person who typed a wrong option or pointed at a wrong file should read what to change, not
a traceback, and a script should read the same exit status from every sub-command:

* ``0`` done;
* ``1`` some input files could not be used (the command lists them, one reason each);
* ``2`` a wrong argument or an unusable input (a missing, unreadable or malformed file or folder,
  an unknown name, a bad number): one sentence on stderr, ``<prog> <command>: error: ...``;
* ``3`` a bug: one sentence naming the exception; ``CBAM_VIZ_DEBUG=1`` adds the traceback;
* ``130`` interrupted (Ctrl-C).

:func:`run_command` wraps whatever ``args.func`` a sub-command set, so a new sub-command joins by
being added to :func:`cbam_viz.cli.build_parser` as usual; its own argument checks join
:data:`cbam_viz.cli.checks.CHECKS`. An exception type that means "the person can fix this" and is
not a ``ValueError``, ``LookupError`` or ``OSError`` joins :data:`USER_ERRORS` (by dotted name, so
this module imports nothing heavy).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from cbam_viz.messages import first_sentence

__all__ = ["EXIT_FILES", "EXIT_USAGE", "EXIT_BUG", "EXIT_INTERRUPTED", "DEBUG_ENV", "USER_ERRORS",
           "error_sentence", "run_command", "prog_name"]

EXIT_FILES, EXIT_USAGE, EXIT_BUG, EXIT_INTERRUPTED = 1, 2, 3, 130
#: Set to 1 to see the traceback of any failure as well as its sentence.
DEBUG_ENV = "CBAM_VIZ_DEBUG"
#: Exceptions that are not ValueError / LookupError / OSError but still mean "fix your input".
USER_ERRORS = {
    "cbam_viz.models.weights.ChecksumError",         # a weights file that does not match its manifest
    "cbam_viz.engine.loading.ModelLoadError",           # a pair that cannot be loaded (the sentence says why)
    "cbam_viz.models.checkpoints.UnsafeCheckpointError",
}


def prog_name() -> str:
    """``cbam-viz`` when run as the console command, else ``python -m cbam_viz``."""
    base = os.path.basename(sys.argv[0] if sys.argv else "")
    return "cbam-viz" if base.startswith("cbam-viz") else "python -m cbam_viz"


def _is_user_error(err: BaseException) -> bool:
    if isinstance(err, (ValueError, LookupError, OSError, MemoryError)):
        return True
    return any(f"{c.__module__}.{c.__qualname__}" in USER_ERRORS for c in type(err).__mro__)


def error_sentence(err: BaseException) -> tuple[str, int]:
    """The sentence shown for ``err`` and the exit status it ends with."""
    if isinstance(err, MemoryError):
        return "ran out of memory; try a smaller --batch-size or fewer images (--max-images).", EXIT_USAGE
    if isinstance(err, OSError) and err.filename is not None and isinstance(err, (FileNotFoundError,
                                                                                    PermissionError,
                                                                                    IsADirectoryError,
                                                                                    NotADirectoryError)):
        reason = {FileNotFoundError: "no such file or folder", PermissionError: "permission denied",
                  IsADirectoryError: "is a folder, not a file", NotADirectoryError: "is not a folder"}
        return f"{err.filename}: {reason[type(err)] if type(err) in reason else err.strerror}.", EXIT_USAGE
    if isinstance(err, UnicodeDecodeError):  # a binary file where text (CSV, JSON lines) was expected
        return (f"a file that should be text is not ({err.encoding} cannot decode byte {err.start}); "
                "check the files you named."), EXIT_USAGE
    if isinstance(err, KeyError) and err.args:  # str(KeyError("x")) is "'x'": the message is the argument
        return first_sentence(str(err.args[0])), EXIT_USAGE
    if _is_user_error(err):
        return first_sentence(err), EXIT_USAGE
    return (f"internal error ({type(err).__name__}: {first_sentence(err, 200)}) This is a bug; "
            f"rerun with {DEBUG_ENV}=1 to see the traceback."), EXIT_BUG


class _CurrentStderr(logging.Handler):
    """Log records as one line each on the *current* ``sys.stderr``, tracebacks only when debugging."""

    def emit(self, record: logging.LogRecord) -> None:
        text = f"{record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info and os.environ.get(DEBUG_ENV) == "1":
            text += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
        print(text, file=sys.stderr)


def _quiet_library_logs() -> None:
    """The library logs unexpected errors with their traceback for a server's log; a terminal gets the line."""
    logger = logging.getLogger("cbam_viz")
    if not any(isinstance(h, _CurrentStderr) for h in logger.handlers):
        logger.addHandler(_CurrentStderr(logging.WARNING))
        logger.propagate = False


def run_command(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    """Check ``args`` (:mod:`cbam_viz.cli.checks`), run ``args.func(args)``; any failure -> one sentence.

    Returns:
        The exit status (see the module docstring).
    """
    from cbam_viz.cli.checks import check_arguments

    command = args.command  # "explain: error: ...", as the commands' own messages begin
    _quiet_library_logs()
    try:
        check_arguments(args)
        return args.func(args)
    except KeyboardInterrupt:
        print(f"\n{command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as stop:  # a sub-command that stops with a message (or a status)
        if isinstance(stop.code, str):
            print(f"{command}: error: {first_sentence(stop.code)}", file=sys.stderr)
            return EXIT_USAGE
        return int(stop.code or 0)
    except Exception as err:  # noqa: BLE001 -- the one place every failure turns into a sentence
        sentence, status = error_sentence(err)
        if os.environ.get(DEBUG_ENV) == "1":
            traceback.print_exc()
        print(f"{command}: error: {sentence}", file=sys.stderr)
        return status
