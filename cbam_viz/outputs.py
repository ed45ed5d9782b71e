"""Every file the project writes goes through :func:`atomic_write`; and the app's request folders.

A reader (a browser fetching a download, the app reading the manifest, a resumed training run)
must never see half a file: each write goes to a hidden temporary file in the same folder, is
flushed to disk, then renamed over the target with ``os.replace`` (atomic on POSIX and Windows).
If anything fails on the way, the temporary file is removed and the old target is left as it was.

Files that only live for a while (the app's request folders, removed after an hour) are written
with ``durable=False``: still atomic (the rename), without the ``fsync`` that makes a file survive
a power cut, which costs a few milliseconds per file and buys nothing for a temporary file.

On top of it: the download formats (:func:`write_png`, :func:`write_jpeg`, :func:`write_json`,
:func:`write_npz` with the arrays of :func:`npz_arrays`, :func:`write_zip`), pictures encoded in memory for a
JSON answer (:func:`image_bytes`, :func:`data_uri`), file names made from uploads
(:func:`safe_stem`, :func:`unique_stem`), an output folder checked before any work
(:func:`prepare_output_dir`), and one fresh private folder per app request under the system temp
folder (:func:`new_request_dir`), old ones removed (:func:`cleanup_outputs`).
"""
from __future__ import annotations

import base64
import errno
import io
import json
import math
import os
import re
import shutil
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from cbam_viz.messages import UserFacingError

__all__ = [
    "json_float",
    "atomic_write", "atomic_write_bytes", "atomic_write_text", "write_png", "write_jpeg", "write_json", "write_npz",
    "write_zip", "npz_arrays", "image_bytes", "data_uri", "PNG_FAST", "JPEG_QUALITY", "safe_stem", "unique_stem",
    "prepare_output_dir",
    "OUTPUT_ROOT", "OUTPUT_MAX_AGE_S", "CLEANUP_EVERY_S", "RESULT_ID", "result_dir", "new_request_dir",
    "cleanup_outputs",
]

#: Where per-request folders go. Under the system temp folder, which Gradio may serve from.
# Not "cbam_viz": a folder of the package's own name in the temp folder would shadow the package for
# `python -m cbam_viz` run there from an uninstalled checkout.
OUTPUT_ROOT = Path(tempfile.gettempdir()) / "cbam-viz-results"
#: Request folders older than this (seconds) are removed when a new request starts.
OUTPUT_MAX_AGE_S = 3600.0
#: zlib level of the PNGs a request writes for the page: 1 encodes ~4x faster than PIL's default
#: 6 and the file is ~15 % larger, which a loopback or LAN transfer does not notice.
PNG_FAST = 1
#: JPEG quality of the photo-like pictures (CAM overlays, attention tiles): no visible loss on a
#: heat map, and ~50x faster to encode than a PNG of the same picture.
JPEG_QUALITY = 90


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object], *, durable: bool = True) -> Path:
    """Call ``write(f)`` on a binary file that becomes ``path`` only once it is complete.

    Args:
        path: the final file; its folder must exist.
        write: fills the open binary file (e.g. ``lambda f: image.save(f, format="PNG")``).
        durable: flush the file to disk (``fsync``) before the rename, so that it survives a
            crash of the machine; False for temporary files (still atomic for every reader).

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
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> Path:
    return atomic_write(path, lambda f: f.write(data), durable=durable)


def atomic_write_text(path: str | os.PathLike, text: str, *, durable: bool = True) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")), durable=durable)


# ------------------------------------------------------------------------------ download formats

def image_bytes(image, fmt: str, *, quality: int = JPEG_QUALITY, compress_level: int = PNG_FAST) -> bytes:
    """A PIL image encoded in memory: ``"jpeg"`` (RGB, photo-like pictures) or ``"png"`` (charts, text).

    Raises:
        ValueError: another format.
    """
    buf = io.BytesIO()
    if fmt == "jpeg":
        (image if image.mode == "RGB" else image.convert("RGB")).save(buf, format="JPEG", quality=quality)
    elif fmt == "png":
        image.save(buf, format="PNG", compress_level=compress_level)
    else:
        raise ValueError(f"unknown picture format {fmt!r}; choose jpeg or png")
    return buf.getvalue()


def data_uri(image, fmt: str) -> str:
    """A PIL image as a ``data:image/<fmt>;base64,...`` URI (:func:`image_bytes`): a picture that travels
    inside a JSON answer, so the caller needs no second request to fetch it."""
    return f"data:image/{fmt};base64," + base64.b64encode(image_bytes(image, fmt)).decode("ascii")


def write_png(image, path: str | os.PathLike, *, compress_level: int = 6, durable: bool = True) -> Path:
    """A PIL image as a PNG file (``compress_level`` 0-9: zlib's speed / size trade, see :data:`PNG_FAST`)."""
    return atomic_write(path, lambda f: image.save(f, format="PNG", compress_level=compress_level), durable=durable)


def write_jpeg(image, path: str | os.PathLike, *, quality: int = JPEG_QUALITY, durable: bool = True) -> Path:
    """A PIL image as a JPEG file (RGB; for photo-like pictures, not for text or charts)."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return atomic_write(path, lambda f: rgb.save(f, format="JPEG", quality=quality), durable=durable)


def write_json(doc: Mapping[str, Any], path: str | os.PathLike, *, durable: bool = True) -> Path:
    """A JSON document, indented, with a final newline."""
    data = json.dumps(doc, indent=2).encode() + b"\n"
    return atomic_write(path, lambda f: f.write(data), durable=durable)


def write_npz(arrays: Mapping[str, np.ndarray], path: str | os.PathLike, *, compress: bool = True,
              durable: bool = True) -> Path:
    """Named arrays as an ``.npz`` (keys may hold ``/``); ``np.load`` reads both kinds alike.

    Args:
        compress: deflate the arrays (``np.savez_compressed``: ~30 % smaller for CAMs and a photo,
            ~70x slower to write); False stores them as they are (``np.savez``).
    """
    save = np.savez_compressed if compress else np.savez
    return atomic_write(path, lambda f: save(f, **arrays), durable=durable)


def write_zip(files: Iterable[Path], path: str | os.PathLike, *, durable: bool = True) -> Path:
    """A zip of ``files``, each stored under its own file name."""
    files = list(files)

    def write(f):
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for file in files:
                z.write(file, arcname=Path(file).name)
    return atomic_write(path, write, durable=durable)


def npz_arrays(explanation, image=None) -> dict[str, np.ndarray]:
    """The raw maps by key: ``MEMBER/cam``, ``MEMBER/channel/<block>``, ``MEMBER/spatial/<block>`` for
    every member of the lineup (a member's name is its record name).

    Args:
        explanation: a :class:`cbam_viz.engine.explain.Explanation`.
        image: the RGB picture it explains, stored as ``image`` (uint8 ``(H, W, 3)``) if given.
    """
    arrays: dict[str, np.ndarray] = {}
    if image is not None:
        arrays["image"] = np.asarray(image, dtype=np.uint8)
    for name, m in explanation.models.items():
        arrays[f"{name}/cam"] = np.asarray(m.cam, dtype=np.float32)
        for block, v in m.channel_attention.items():
            arrays[f"{name}/channel/{block}"] = np.asarray(v, dtype=np.float32)
        for block, v in m.spatial_attention.items():
            arrays[f"{name}/spatial/{block}"] = np.asarray(v, dtype=np.float32)
    return arrays


# ------------------------------------------------------------------------------------ file names

def safe_stem(name: str) -> str:
    """A file-name stem safe on every OS, from an upload's name."""
    stem = Path(name).stem if name else "image"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem)
    stem = re.sub(r"\.{2,}", ".", stem).strip("._") or "image"  # no "..": result ids refuse it
    return stem[:80]


def unique_stem(stem: str, used: set[str]) -> str:
    """``stem``, or ``stem_2``, ``stem_3``... if already in ``used`` (which it is added to)."""
    candidate, k = stem, 1
    while candidate in used:
        k += 1
        candidate = f"{stem}_{k}"
    used.add(candidate)
    return candidate


# --------------------------------------------------------------------------------------- folders

_REASONS = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
            errno.EROFS: "the file system is read-only", errno.ENOSPC: "the disk is full",
            errno.EDQUOT: "the disk quota is exceeded"}


def prepare_output_dir(path: str | os.PathLike) -> Path:
    """Create the output folder and prove it is writable (and not full) before any work.

    Raises:
        UserFacingError: it is a file, cannot be created, is read-only or the disk is full.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserFacingError(f"The output path {path} is a file, not a folder.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".cbam_viz_write_test.{uuid.uuid4().hex[:8]}"
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * 65536)  # a small real write: a full disk fails here, not after an hour
                f.flush()
                os.fsync(f.fileno())
        finally:
            probe.unlink(missing_ok=True)
    except OSError as err:
        reason = _REASONS.get(err.errno, err.strerror or str(err))
        raise UserFacingError(f"Cannot write to the output folder {path}: {reason}.") from None
    return path


#: Old request folders are looked for at most this often (seconds) per root: listing them on every
#: request cost ~80 ms with 7,200 folders (an hour at 2 requests/s) on the 2-core machine.
CLEANUP_EVERY_S = 60.0
_last_cleanup: dict[Path, float] = {}  # root -> time.monotonic() of its last cleanup


def new_request_dir(root: str | os.PathLike | None = None) -> Path:
    """A fresh, private folder for one request's files (old ones are cleaned up first, at most every
    :data:`CLEANUP_EVERY_S`)."""
    root = Path(root) if root is not None else OUTPUT_ROOT
    root.mkdir(parents=True, exist_ok=True)
    now = time.monotonic()
    if now - _last_cleanup.get(root, -math.inf) >= CLEANUP_EVERY_S:
        _last_cleanup[root] = now  # two requests racing here both clean: harmless
        cleanup_outputs(root)
    return Path(tempfile.mkdtemp(prefix="req-", dir=root))


#: The id of one image's result: its request folder and its own folder in it (``req-abc/00_street``).
RESULT_ID = re.compile(r"^req-[A-Za-z0-9_]+/\d{2,}_[A-Za-z0-9._-]+$")  # 00_<stem>, 100_<stem>...


def result_dir(result_id: str, root: str | os.PathLike | None = None) -> Path:
    """The folder of a result id (see :data:`RESULT_ID`), strictly under the output root.

    The page keeps only this id (a deep link carries it too), and the server derives every path
    from it: an id can name nothing outside the request folders, whatever a client sends.

    Raises:
        UserFacingError: a malformed id, or results that are gone (request folders live an hour).
    """
    root = Path(root) if root is not None else OUTPUT_ROOT
    if not isinstance(result_id, str) or not RESULT_ID.fullmatch(result_id) or ".." in result_id:
        raise UserFacingError("Explain an image first.")
    folder = root / result_id
    if not folder.is_dir():
        raise UserFacingError("These results are no longer on the server (they are kept for an hour); "
                              "press Explain again.")
    return folder


def cleanup_outputs(root: str | os.PathLike | None = None, *, max_age_s: float = OUTPUT_MAX_AGE_S) -> int:
    """Remove request folders older than ``max_age_s``; return how many were removed."""
    root = Path(root) if root is not None else OUTPUT_ROOT
    now = time.time()
    removed = 0
    try:
        entries = list(root.glob("req-*"))
    except OSError:
        return 0
    for d in entries:
        try:
            if d.is_dir() and now - d.stat().st_mtime > max_age_s:
                shutil.rmtree(d, ignore_errors=True)
                removed += 1
        except OSError:
            continue
    return removed


def json_float(value, digits: int = 6) -> float | None:
    """A number for strict JSON: rounded, None for nan or infinity (strict JSON has neither)."""
    value = float(value)
    return round(value, digits) if math.isfinite(value) else None
