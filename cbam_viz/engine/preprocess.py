"""A user's image, whatever it is, to a validated RGB picture and a model tensor.

Uploads come in every mode PIL knows: palette GIFs (animated or not), PNGs with alpha, 16-bit
grayscale, float TIFFs, CMYK JPEGs, phone photos whose pixels are stored sideways with an EXIF
orientation tag. :func:`to_rgb` turns each into the RGB image a person would see in a viewer:
EXIF orientation applied, first frame, transparency composited on white, high bit depths scaled
to 8 bits. :func:`to_model_tensor` then stretch-resizes it to the model's square input, as the
training data was made (see :mod:`cbam_viz.training.data`), and normalises it.

Decoding failures of any kind become :class:`ImageError` with one sentence a person understands.
"""
from __future__ import annotations

import io
import os
import struct
import warnings
from collections.abc import Sequence
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from cbam_viz.messages import UserFacingError

__all__ = ["ImageError", "MAX_PIXELS", "open_image", "to_rgb", "is_display_rgb", "to_model_tensor", "to_model_batch"]

#: Largest image accepted, in pixels (40 MP: a 7300 x 5470 photo). Bigger uploads are refused
#: before decoding, so a crafted file cannot make the server allocate gigabytes.
MAX_PIXELS = 40_000_000

# The limit is applied here, where images are opened (the header's size is checked before any
# pixel is decoded), not by lowering PIL's process-wide ``Image.MAX_IMAGE_PIXELS``: importing the
# project must not change how the rest of a process opens images. PIL's own guard (a warning
# above its limit, DecompressionBombError above twice that) stays the backstop.

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_BACKGROUND = (255, 255, 255)


class ImageError(UserFacingError):
    """The input is not an image we can show and explain (the message says why, in one sentence).

    A :class:`~cbam_viz.messages.UserFacingError` (so a ``ValueError``): a person can fix it.
    """


def _check_size(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise ImageError(f"The image is empty ({width}x{height} pixels).")
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"The image is too large ({width}x{height} = {width * height / 1e6:.1f} megapixels); "
            f"the limit is {MAX_PIXELS / 1e6:.0f} megapixels, please downscale it."
        )


def open_image(source: str | os.PathLike | bytes | bytearray | BinaryIO) -> Image.Image:
    """Open and fully decode an image file, returned as RGB (see :func:`to_rgb`).

    Args:
        source: a path, the file's bytes, or a binary file object.

    Raises:
        ImageError: missing file, not an image (e.g. an HTML page named ``.png``), truncated or
            corrupt data, or more than :data:`MAX_PIXELS` pixels.
    """
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageError("The file is empty.")
        source = io.BytesIO(source)
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "the upload"
    if isinstance(source, (str, os.PathLike)) and os.path.isfile(source) and os.path.getsize(source) == 0:
        raise ImageError(f"The file {name} is empty.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                _check_size(*im.size)
                im.load()
                return to_rgb(im)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"The file {name} does not exist.") from None
    except UnidentifiedImageError:
        kind = _signature(source)
        if kind:  # starts like a real image file: a damaged one, not a wrong extension
            raise ImageError(f"{name} is not an image file PIL can read: it starts like a {kind} file "
                             "but is damaged.") from None
        raise ImageError(f"{name} is not an image file PIL can read (wrong format or extension).") from None
    except Image.DecompressionBombError:
        raise ImageError(
            f"The image is too large to decode safely; the limit is {MAX_PIXELS / 1e6:.0f} megapixels."
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as err:
        # Truncated files ("image file is truncated"), broken chunks, bad headers...
        raise ImageError(f"The image {name} is damaged or truncated and cannot be decoded ({err}).") from None


_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
               (b"BM", "BMP"), (b"II*\0", "TIFF"), (b"MM\0*", "TIFF"))


def _signature(source) -> str | None:
    """The image format a file's first bytes announce (None if none we know)."""
    try:
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as f:
                head = f.read(12)
        else:
            source.seek(0)
            head = source.read(12)
    except (OSError, ValueError, AttributeError):
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((kind for magic, kind in _SIGNATURES if head.startswith(magic)), None)


def _first_frame(im: Image.Image) -> Image.Image:
    if getattr(im, "n_frames", 1) > 1 and im.tell() != 0:
        try:
            im.seek(0)
        except (EOFError, OSError, ValueError):
            pass  # a frame we cannot rewind to: keep the current one
    return im


def _exif_transpose(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001  a broken EXIF block must not refuse an otherwise fine image
        return im


def _scale_to_8bit(im: Image.Image) -> Image.Image:
    """Grayscale ``I;16*``/``I`` (16-bit range) and ``F`` images -> ``L`` with the full range kept."""
    a = np.asarray(im)
    if im.mode == "F":
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(a.min()), float(a.max())
        if lo >= 0.0 and hi <= 1.0:  # float images are conventionally in [0, 1]
            a = a * 255.0
        elif hi > lo:  # anything else: stretch its range
            a = (a - lo) * (255.0 / (hi - lo))
        else:
            a = np.zeros_like(a)
    else:
        # 16-bit sources (PNG, TIFF) decode to I;16* or I; scale 0..65535 -> 0..255.
        a = np.clip(a.astype(np.float64), 0, 65535) / 257.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> an 8-bit RGB image as a viewer would show it.

    EXIF orientation is applied, an animation gives its first frame, transparency is composited
    on white, 16-bit and float grayscale are scaled to 8 bits. A new image is returned; the input
    is not modified.

    Raises:
        ImageError: empty, larger than :data:`MAX_PIXELS`, or a mode that cannot become RGB.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    _check_size(*image.size)
    im = _exif_transpose(_first_frame(image))
    try:
        if im.mode.startswith("I") or im.mode == "F":
            im = _scale_to_8bit(im)
        if (im.mode == "P" and "transparency" in im.info) or im.mode in _ALPHA_MODES:
            rgba = im.convert("RGBA")
            out = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
            out.alpha_composite(rgba)
            return out.convert("RGB")
        if im.mode != "RGB":
            return im.convert("RGB")
        return im.copy() if im is image else im
    except (OSError, ValueError) as err:
        raise ImageError(f"Images in mode {image.mode!r} cannot be converted to RGB ({err}).") from None


def is_display_rgb(image: Image.Image) -> bool:
    """True when :func:`to_rgb` would return the same pixels: 8-bit RGB, upright, first frame."""
    if image.mode != "RGB" or (getattr(image, "n_frames", 1) > 1 and image.tell() != 0):
        return False
    try:
        return image.getexif().get(0x0112, 1) == 1
    except Exception:  # noqa: BLE001  unreadable EXIF: to_rgb ignores it too
        return True


def to_model_tensor(
    image: Image.Image,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """One image -> a normalised ``(1, 3, size, size)`` float32 tensor.

    The image is stretch-resized to a square (bilinear, antialiased), exactly as
    :func:`cbam_viz.training.data.decode_images` made the training data, so aspect ratios are distorted
    the same way the model saw them in training.
    """
    return to_model_batch([image], size, mean, std)


def to_model_batch(
    images: Sequence[Image.Image],
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """Several images -> one normalised ``(N, 3, size, size)`` float32 tensor (see :func:`to_model_tensor`)."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    arrays = []
    for image in images:
        rgb = image if isinstance(image, Image.Image) and is_display_rgb(image) else to_rgb(image)
        _check_size(*rgb.size)
        # Same call as cbam_viz.training.data.decode_one: bilinear with PIL's antialiasing support.
        arrays.append(np.asarray(rgb.resize((size, size), Image.BILINEAR, reducing_gap=None)))
    if not arrays:
        raise ValueError("no images given")
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((batch - m) / s).contiguous()
