"""Bounding-box files for the explanation-quality metrics (:mod:`cbam_viz.research.quality.metrics`).

A box CSV has the header ``wnid,file,xmin,ymin,xmax,ymax`` (any column order, extra columns
ignored) and one row per box, in the pixels of the image file as stored: x to the right, y down,
``xmax``/``ymax`` exclusive, so a box ``0,0,224,224`` covers a whole 224x224 image. A file may
have several rows (several objects). ``wnid`` is the class folder of an ImageFolder layout, so a
row names the image ``<data>/<wnid>/<file>``; every box of a file belongs to that file's class.

Parsing is strict and errors name the file and line: a silently skipped row would quietly change
the numbers a report shows.
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["Box", "BoxFileError", "REQUIRED_COLUMNS", "read_boxes", "parse_boxes", "boxes_mask", "check_boxes_fit"]

REQUIRED_COLUMNS = ("wnid", "file", "xmin", "ymin", "xmax", "ymax")


class BoxFileError(ValueError):
    """A box CSV is malformed; the message names the file and the line."""


@dataclass(frozen=True)
class Box:
    """One axis-aligned box in image pixels; ``xmax``/``ymax`` are exclusive."""

    xmin: float
    ymin: float
    xmax: float
    ymax: float

    @property
    def area(self) -> float:
        return max(0.0, self.xmax - self.xmin) * max(0.0, self.ymax - self.ymin)

    def as_list(self) -> list[float]:
        return [self.xmin, self.ymin, self.xmax, self.ymax]


def read_boxes(path: str | os.PathLike) -> dict[str, tuple[Box, ...]]:
    """Read a box CSV into ``{"<wnid>/<file>": (Box, ...)}``, in file order.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        BoxFileError: a missing column, an empty or non-numeric field, a non-finite or negative
            coordinate, or an empty box (``xmax <= xmin`` or ``ymax <= ymin``); the message names
            the line (1 is the header).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"box file not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        return parse_boxes(f, source=str(path))


def parse_boxes(lines: Iterable[str], *, source: str = "<boxes>") -> dict[str, tuple[Box, ...]]:
    """Parse box CSV text (see :func:`read_boxes`); ``source`` names it in error messages."""
    reader = csv.reader(lines)
    try:
        header = next(reader)
    except StopIteration:
        raise BoxFileError(f"{source}: empty file, expected the header {','.join(REQUIRED_COLUMNS)}") from None
    header = [h.strip().lower() for h in header]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise BoxFileError(f"{source}:1: missing column(s) {', '.join(missing)}; "
                           f"expected a header with {','.join(REQUIRED_COLUMNS)}, got {','.join(header)}")
    col = {c: header.index(c) for c in REQUIRED_COLUMNS}
    out: dict[str, list[Box]] = {}
    for row in reader:
        line = reader.line_num
        if not row or all(not v.strip() for v in row):
            continue  # blank lines (a trailing newline) carry no box
        if len(row) < len(header):
            raise BoxFileError(f"{source}:{line}: expected {len(header)} fields, got {len(row)}: {','.join(row)!r}")
        wnid, file = row[col["wnid"]].strip(), row[col["file"]].strip()
        if not wnid or not file:
            raise BoxFileError(f"{source}:{line}: empty wnid or file")
        if "/" in file or "\\" in file or "/" in wnid or "\\" in wnid or wnid in (".", "..") or file in (".", ".."):
            raise BoxFileError(f"{source}:{line}: wnid and file must be plain names, got {wnid!r}, {file!r}")
        coords = []
        for name in ("xmin", "ymin", "xmax", "ymax"):
            text = row[col[name]].strip()
            try:
                v = float(text)
            except ValueError:
                raise BoxFileError(f"{source}:{line}: {name} is not a number: {text!r}") from None
            if not math.isfinite(v):
                raise BoxFileError(f"{source}:{line}: {name} is not finite: {text!r}")
            if v < 0:
                raise BoxFileError(f"{source}:{line}: {name} is negative ({v}); coordinates are image pixels")
            coords.append(v)
        box = Box(*coords)
        if box.xmax <= box.xmin or box.ymax <= box.ymin:
            raise BoxFileError(f"{source}:{line}: empty box (need xmin < xmax and ymin < ymax), got {box.as_list()}")
        out.setdefault(f"{wnid}/{file}", []).append(box)
    if not out:
        raise BoxFileError(f"{source}: no boxes after the header")
    return {k: tuple(v) for k, v in out.items()}


def check_boxes_fit(boxes: Mapping[str, Sequence[Box]], sizes: Mapping[str, tuple[int, int]], *, tol: float = 1.0) -> None:
    """Check every box lies inside its image (``sizes``: key -> (W, H)), ``tol`` px of slack.

    Boxes written for a resized copy of the images (e.g. 500 px originals against a 224 px folder)
    would otherwise give plausible-looking but wrong numbers.

    Raises:
        BoxFileError: naming the first few offending images.
    """
    bad = []
    for key, (w, h) in sizes.items():
        for b in boxes.get(key, ()):
            if b.xmax > w + tol or b.ymax > h + tol:
                bad.append(f"{key} box {b.as_list()} vs image {w}x{h}")
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise BoxFileError("boxes outside their image (are they in another image size?): " + "; ".join(bad[:3]) + more)


def boxes_mask(boxes: Sequence[Box], shape: tuple[int, int]) -> np.ndarray:
    """Boolean ``(H, W)`` mask of the pixels whose centre lies inside any box.

    Pixel ``(y, x)`` covers ``[x, x+1) x [y, y+1)``; it belongs to a box when its centre
    ``(x + 0.5, y + 0.5)`` does, so integer boxes cover exactly ``xmin..xmax-1`` and fractional
    boxes are rounded the same way on every side. Boxes are clipped to the image.
    """
    h, w = shape
    mask = np.zeros((h, w), dtype=bool)
    for b in boxes:
        x0, x1 = int(np.clip(math.ceil(b.xmin - 0.5), 0, w)), int(np.clip(math.ceil(b.xmax - 0.5), 0, w))
        y0, y1 = int(np.clip(math.ceil(b.ymin - 0.5), 0, h)), int(np.clip(math.ceil(b.ymax - 0.5), 0, h))
        mask[y0:y1, x0:x1] = True
    return mask
