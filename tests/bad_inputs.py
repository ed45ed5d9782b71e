"""A corpus of awkward and hostile uploads, generated on the fly (nothing is committed).

Each :class:`Case` is one kind of input a public Space receives sooner or later: empty files,
random bytes, truncated or checksum-broken files, a decompression bomb, extreme sizes, every
PIL mode, EXIF-rotated phone photos, animations, web pages and SVGs named ``.png``, a file over
the upload limit. A case says what must happen: either a correct result (``ok``: the size, as
``(W, H)``, of the picture a person sees, and optionally a pixel check), or a refusal whose one
sentence matches ``error`` (a regular expression).

``server_error`` covers the one case where the web app must refuse what the library accepts:
the library has no file-size limit, the server does (``app.MAX_FILE_SIZE``).

Also here: :func:`write_test_weights`, a weights folder (manifest + two seeded safetensors files,
64-pixel input) that the live-server tests point ``CBAM_VIZ_WEIGHTS_DIR`` at, so they run the
real manifest/sha256 path quickly and do not depend on whether the shipped weights are trained.
"""
from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

#: Upload limit the app ships with (``app.MAX_FILE_SIZE`` default, "20mb" = 20 * 1024**2 bytes).
DEFAULT_UPLOAD_LIMIT = 20 * 1024 * 1024
#: Longest side the service explains and renders (``service.DISPLAY_MAX_SIDE``).
DISPLAY_MAX_SIDE = 1024

# Error sentences, as regular expressions (case-insensitive).
NOT_IMAGE = r"not an image|cannot identify|empty"
DAMAGED = r"damaged|truncated|broken|not an image|cannot be decoded"
TOO_LARGE = r"too large|megapixels"
TOO_BIG_FILE = r"(too large|exceeds|maximum|limit|size).*|.*(file size|too big)"


@dataclass(frozen=True)
class Case:
    """One generated input and what each layer must make of it."""

    kind: str                                # short name, unique; also the file stem
    filename: str                            # the name the file is written (and uploaded) under
    make: Callable[[], bytes] = field(repr=False)
    ok: tuple[int, int] | None = None        # (W, H) a viewer shows; None: must be refused
    error: str | None = None                 # regex the refusal sentence must match
    check: Callable[[Image.Image], None] | None = field(default=None, repr=False)  # extra pixel checks
    server_error: str | None = None          # the server refuses it although the library accepts it

    @property
    def display_size(self) -> tuple[int, int] | None:
        """(W, H) the service analyses: the viewer size, shrunk to :data:`DISPLAY_MAX_SIDE`."""
        if self.ok is None:
            return None
        w, h = self.ok
        if max(w, h) <= DISPLAY_MAX_SIDE:
            return (w, h)
        im = Image.new("L", (w, h))
        im.thumbnail((DISPLAY_MAX_SIDE, DISPLAY_MAX_SIDE))
        return im.size


# ----------------------------------------------------------------------------------- makers

def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _picture(w: int = 96, h: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    return Image.fromarray(small, "RGB").resize((w, h), Image.BILINEAR)


def _png_chunk(kind: bytes, data: bytes, *, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF if crc is None else crc
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _bomb_png() -> bytes:
    """A 100-byte PNG whose header claims 30000 x 30000 RGB (2.7 GB once decoded)."""
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _broken_crc_png() -> bytes:
    data = bytearray(_save(_picture(), "PNG"))
    # IHDR is the first chunk: 8-byte signature, 4 length, 4 type, 13 data, then its CRC.
    data[8 + 8 + 13] ^= 0xFF
    return bytes(data)


def _truncated_jpeg() -> bytes:
    data = _save(_picture(200, 150), "JPEG", quality=90)
    return data[: len(data) * 6 // 10]


def _gray16() -> bytes:
    a = np.tile(np.linspace(0, 65535, 80, dtype=np.float64), (50, 1)).astype(np.uint16)
    im = Image.fromarray(a)  # mode "I;16"
    assert im.mode.startswith("I;16"), im.mode
    return _save(im, "PNG")


def _float_tiff() -> bytes:
    a = np.tile(np.linspace(0.0, 1.0, 70, dtype=np.float32), (40, 1))
    im = Image.fromarray(a, mode="F")
    return _save(im, "TIFF")


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (48, 32), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _exif_rotated_jpeg() -> bytes:
    """Stored 120 x 80 with a red top-left corner; EXIF orientation 6 = shown rotated 90 degrees clockwise."""
    im = Image.new("RGB", (120, 80), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 30, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(im, "JPEG", quality=95, exif=exif)


def _check_exif_rotated(im: Image.Image) -> None:
    # Rotated 90 degrees clockwise, the stored top-left corner is shown at the top-right.
    top_right = im.getpixel((im.width - 5, 5))
    top_left = im.getpixel((5, 5))
    assert top_right[0] > 200 and top_right[2] < 60, f"top-right {top_right}: EXIF orientation ignored"
    assert top_left[2] > 200, f"top-left {top_left}"


def _rgba() -> bytes:
    im = _picture(64, 48).convert("RGBA")
    a = np.asarray(im).copy()
    a[:, :32, 3] = 0  # left half fully transparent
    return _save(Image.fromarray(a, "RGBA"), "PNG")


def _check_transparent_is_white(im: Image.Image) -> None:
    assert im.getpixel((5, 5)) == (255, 255, 255), f"transparent pixel shown as {im.getpixel((5, 5))}"


def _la() -> bytes:
    a = np.zeros((40, 60, 2), dtype=np.uint8)
    a[..., 0] = 30
    a[..., 1] = 255
    a[:, :20, 1] = 0
    return _save(Image.fromarray(a, "LA"), "PNG")


def _check_gray16(im: Image.Image) -> None:
    a = np.asarray(im)
    assert a[:, 0].max() < 10 and a[:, -1].min() > 245, "16-bit range not scaled to 8 bits"


def _check_float(im: Image.Image) -> None:
    a = np.asarray(im)
    assert a[:, 0].max() < 10 and a[:, -1].min() > 245, "float range not scaled to 8 bits"


def _check_first_frame(im: Image.Image) -> None:
    r, g, b = im.getpixel((10, 10))
    assert r > 200 and g < 60 and b < 60, f"animated GIF: not the first (red) frame: {(r, g, b)}"


def _check_constant(im: Image.Image) -> None:
    assert np.asarray(im).std() == 0


def _oversized_bmp(limit: int = DEFAULT_UPLOAD_LIMIT) -> bytes:
    """A valid uncompressed BMP just over ``limit`` bytes (about 7 megapixels)."""
    side = int(np.ceil(np.sqrt(limit / 3))) + 64
    rng = np.random.default_rng(7)
    small = rng.integers(0, 256, (side // 32 + 1, side // 32 + 1, 3), dtype=np.uint8)
    im = Image.fromarray(small, "RGB").resize((side, side), Image.NEAREST)
    data = _save(im, "BMP")
    assert len(data) > limit
    return data


OVERSIZED_SIDE = int(np.ceil(np.sqrt(DEFAULT_UPLOAD_LIMIT / 3))) + 64

HTML = b"<!DOCTYPE html>\n<html><head><title>hi</title></head><body><img src=x onerror=alert(1)></body></html>\n"
SVG = (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
       b'<rect width="64" height="64" fill="red"/><script>alert(1)</script></svg>\n')


def corpus() -> list[Case]:
    """Every kind, in a fixed order (good and bad interleaved)."""
    pic = _picture
    return [
        Case("empty", "empty.jpg", lambda: b"", error=NOT_IMAGE),
        Case("random_bytes", "random_bytes.jpg", lambda: np.random.default_rng(1).bytes(4096), error=NOT_IMAGE),
        Case("truncated_jpeg", "truncated_jpeg.jpg", _truncated_jpeg, error=DAMAGED),
        Case("broken_crc_png", "broken_crc_png.png", _broken_crc_png, error=DAMAGED),
        Case("bomb", "bomb.png", _bomb_png, error=TOO_LARGE),
        Case("one_pixel", "one_pixel.png", lambda: _save(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"), ok=(1, 1)),
        Case("extreme_aspect", "extreme_aspect.png", lambda: _save(pic(3, 10000), "PNG"), ok=(3, 10000)),
        Case("gray_L", "gray_L.png", lambda: _save(pic(70, 50).convert("L"), "PNG"), ok=(70, 50)),
        Case("gray_LA", "gray_LA.png", _la, ok=(60, 40), check=_check_transparent_is_white),
        Case("rgba_transparent", "rgba_transparent.png", _rgba, ok=(64, 48), check=_check_transparent_is_white),
        Case("palette_P", "palette_P.png", lambda: _save(pic(66, 44).convert("P", palette=Image.ADAPTIVE), "PNG"),
             ok=(66, 44)),
        Case("cmyk_jpeg", "cmyk_jpeg.jpg", lambda: _save(pic(72, 48).convert("CMYK"), "JPEG"), ok=(72, 48)),
        Case("gray16_png", "gray16_png.png", _gray16, ok=(80, 50), check=_check_gray16),
        Case("float_tiff", "float_tiff.tif", _float_tiff, ok=(70, 40), check=_check_float),
        Case("animated_gif", "animated_gif.gif", _animated_gif, ok=(48, 32), check=_check_first_frame),
        Case("exif_rotated", "exif_rotated.jpg", _exif_rotated_jpeg, ok=(80, 120), check=_check_exif_rotated),
        Case("webp", "webp.webp", lambda: _save(pic(88, 56), "WEBP"), ok=(88, 56)),
        Case("bmp", "bmp.bmp", lambda: _save(pic(50, 70), "BMP"), ok=(50, 70)),
        Case("html_as_png", "html_as_png.png", lambda: HTML, error=NOT_IMAGE),
        Case("svg_as_png", "svg_as_png.png", lambda: SVG, error=NOT_IMAGE),
        Case("constant", "constant.png", lambda: _save(Image.new("RGB", (64, 64), (120, 120, 120)), "PNG"),
             ok=(64, 64), check=_check_constant),
        Case("png_named_jpg", "png_named_jpg.jpg", lambda: _save(pic(40, 30), "PNG"), ok=(40, 30)),
        Case("over_upload_limit", "over_upload_limit.bmp", _oversized_bmp, ok=(OVERSIZED_SIDE, OVERSIZED_SIDE),
             server_error=TOO_BIG_FILE),
    ]


def write_corpus(folder: str | Path, cases: list[Case] | None = None) -> dict[str, Path]:
    """Write every case's file into ``folder``; return kind -> path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for case in cases or corpus():
        path = folder / case.filename
        path.write_bytes(case.make())
        out[case.kind] = path
    return out


def good_image(path: str | Path, *, seed: int, size: tuple[int, int] = (72, 56)) -> Path:
    """A small distinct RGB PNG (the size doubles as a fingerprint in the answer)."""
    path = Path(path)
    _picture(*size, seed=seed).save(path)
    return path


# ------------------------------------------------------------------------------- test weights

TEST_PAIR = "tiny64"


def write_test_weights(folder: str | Path, *, input_size: int = 64, corrupt: str | None = None,
                       extra_pair: bool = False) -> Path:
    """A weights folder: two seeded models (resnet18 / resnet18_cbam, 10 classes) and a manifest.

    Args:
        input_size: the records' input size (64 keeps each explanation cheap on a small CPU).
        corrupt: ``"flip"`` flips one byte of the CBAM file after its sha256 was recorded;
            ``"swap"`` replaces it by the baseline's file. Either way the manifest no longer matches.
        extra_pair: also list a second pair ``"intact"`` made of two intact copies, so a test can
            check the app keeps serving the models that did load.
    """
    import shutil

    import torch

    from cbam_viz.models.imagenette import IMAGENET_MEAN, IMAGENET_STD, IMAGENETTE_NAMES
    from cbam_viz.models import create_model
    from cbam_viz.models.weights import WeightRecord, save_safetensors, update_manifest

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    classes = [{"id": k, "name": v} for k, v in IMAGENETTE_NAMES.items()]
    names = {}
    archs = [("baseline", "resnet18", 0), ("cbam", "resnet18_cbam", 1)]
    if extra_pair:
        archs += [("baseline2", "resnet18", 0), ("cbam2", "resnet18_cbam", 1)]
    for role, arch, seed in archs:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = create_model(arch, num_classes=len(classes))
            with torch.no_grad():  # non-uniform spatial gates, as in tests/conftest.py
                for n, m in model.named_modules():
                    if n.endswith("spatial.bn"):
                        m.weight.uniform_(0.5, 1.5)
                        m.bias.uniform_(-0.5, 0.5)
        name = f"{arch}_{role}_test"
        file = f"{name}.safetensors"
        sha = save_safetensors(model.eval(), folder / file)
        record = WeightRecord(
            name=name, file=file, arch=arch, sha256=sha, num_params=sum(p.numel() for p in model.parameters()),
            classes=classes, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), input_size=input_size,
        )
        update_manifest(folder, record=record)
        names[role] = name
    update_manifest(folder, pair=(TEST_PAIR, {"baseline": names["baseline"], "cbam": names["cbam"], "default": True}))
    if extra_pair:
        update_manifest(folder, pair=("intact", {"baseline": names["baseline2"], "cbam": names["cbam2"]}))
    if corrupt:
        target = folder / f"{names['cbam']}.safetensors"
        if corrupt == "flip":
            data = bytearray(target.read_bytes())
            data[len(data) // 2] ^= 0xFF
            target.write_bytes(bytes(data))
        elif corrupt == "swap":
            shutil.copyfile(folder / f"{names['baseline']}.safetensors", target)
        else:
            raise ValueError(f"corrupt must be 'flip' or 'swap', got {corrupt!r}")
    return folder
