"""Every file the project writes goes through :func:`atomic_write`.

A reader (a browser fetching a download, the app reading the manifest, a resumed training run)
must never see half a file: each write goes to a hidden temporary file in the same folder, is
flushed to disk, then renamed over the target with ``os.replace`` (atomic on POSIX and Windows).
If anything fails on the way, the temporary file is removed and the old target is left as it was.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text"]


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(f)`` on a binary file that becomes ``path`` only once it is complete.

    Args:
        path: the final file; its folder must exist.
        write: fills the open binary file (e.g. ``lambda f: image.save(f, format="PNG")``).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OSError: the folder cannot be written (permissions, disk full...); nothing is left behind.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))
