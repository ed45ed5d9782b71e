"""Every failure a person can cause or fix, as one plain sentence (the app, the CLI, the library).

:class:`UserFacingError` is what the control validators (:mod:`cbam_viz.engine.controls`), the service
and the output helpers raise; ``str(err)`` is the sentence shown, never a traceback.
:func:`format_error` turns any other exception into such a sentence, and logs the unexpected ones
with their traceback for whoever runs the server. It subclasses :class:`ValueError`, so library
callers of :func:`cbam_viz.engine.explain.explain` keep catching a wrong method, target or layer as one.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Sequence

__all__ = ["UserFacingError", "SHOWN_CLASSES", "classes_sentence", "escape_markdown", "first_sentence", "format_error"]

log = logging.getLogger(__name__)


class UserFacingError(ValueError):
    """A failure a person can understand; ``str(err)`` is one plain sentence, no traceback."""


def first_sentence(err: BaseException | str, limit: int = 300) -> str:
    """``err``'s message on one line, at most ``limit`` characters, ending with a full stop."""
    text = " ".join(str(err).split()) or (type(err).__name__ if isinstance(err, BaseException) else "Error")
    if len(text) > limit:
        text = text[: limit - 3].rstrip() + "..."
    return text if text.endswith((".", "!", "?")) else text + "."


#: How many class names a sentence lists (an ImageNet pair knows 1,000: the page would drown in them).
SHOWN_CLASSES = 20


def classes_sentence(classes: Sequence[str]) -> str:
    """"The models only know these N classes: a, b, c" (no full stop: callers go on or add one).

    Up to :data:`SHOWN_CLASSES` names; a longer list ends with how many more there are.
    """
    if len(classes) <= SHOWN_CLASSES:
        return f"The models only know these {len(classes)} classes: {', '.join(classes)}"
    return (f"The models only know these {len(classes):,} classes: {', '.join(classes[:SHOWN_CLASSES])} "
            f"and {len(classes) - SHOWN_CLASSES:,} more")


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]()!<>|#~])")


def escape_markdown(text: str) -> str:
    """``text`` shown literally in Markdown: a file name such as ``[Sign in](https:x).jpg`` (legal on
    Linux and macOS, and any client can send one) must not become a link on someone's page."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", str(text))


def format_error(err: BaseException) -> str:
    """One sentence for any exception raised while explaining; unexpected ones are logged."""
    if isinstance(err, UserFacingError):  # cbam_viz.engine.preprocess.ImageError is one
        return first_sentence(err)
    if isinstance(err, MemoryError):
        return "The server ran out of memory on this image; try a smaller image or fewer at once."
    if isinstance(err, (KeyError, ValueError)):
        # The request path turns what a person can fix into UserFacingError; a plain ValueError or
        # KeyError got past those checks, so it is logged (a bug must not hide behind a polite
        # sentence) while its sentence, which usually says what was wrong, still reaches the page.
        log.warning("%s while explaining, not turned into a user-facing message", type(err).__name__, exc_info=err)
        # str(KeyError("x")) is "'x'": the message is its first argument.
        return first_sentence(str(err.args[0]) if isinstance(err, KeyError) and err.args else err)
    if isinstance(err, OSError) and err.errno is not None:
        return f"A file could not be read or written: {first_sentence(err)}"
    log.error("unexpected error while explaining", exc_info=err)
    return (f"Something went wrong while explaining this image ({type(err).__name__}); "
            "the details are in the server log.")
