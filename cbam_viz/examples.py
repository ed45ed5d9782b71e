"""Example images for the app: pictures shipped by installed packages, plus ones we draw.

No dataset image is shipped with the project (licences), so the examples are photos that come with
the packages the app already installs (Gradio's media assets, matplotlib's sample data, the
scikit-learn sample images that grad-cam pulls in) and a few pictures drawn here at first use.
Most of them show none of the pair's classes on purpose: that is when the app's "unsure" warning
and the attention maps are most instructive.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from cbam_viz.outputs import atomic_write

__all__ = ["Example", "list_examples", "generated_dir", "synthetic_photo"]


@dataclass(frozen=True)
class Example:
    path: Path
    caption: str


# (package, path inside the package, caption): kept only when the file exists.
_PACKAGED = (
    ("sklearn", "datasets/images/china.jpg", "A pagoda (scikit-learn sample): close to 'church'?"),
    ("gradio", "media_assets/images/tower.jpg", "The Eiffel tower (Gradio media asset): not a known class"),
    ("gradio", "media_assets/images/cheetah.jpg", "A cheetah (Gradio media asset): not a known class"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "Grace Hopper (matplotlib sample): not a known class"),
)


def _package_file(package: str, relative: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / relative
        if path.is_file():
            return path
    return None


def generated_dir() -> Path:
    """Where the drawn examples are written (under the system temp folder, which Gradio may serve)."""
    return Path(os.environ.get("CBAM_VIZ_EXAMPLES_DIR", Path(tempfile.gettempdir()) / "cbam_viz_examples"))


def _golf_ball(size: int = 320) -> Image.Image:
    """A white dimpled ball on grass: a drawing, not a photo of the class."""
    rng = np.random.default_rng(0)
    grass = np.zeros((size, size, 3), np.float32)
    grass[..., 1] = 120 + 40 * rng.random((size, size))
    grass[..., 0] = 40 + 20 * rng.random((size, size))
    grass[..., 2] = 30 + 15 * rng.random((size, size))
    im = Image.fromarray(grass.astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.2))
    d = ImageDraw.Draw(im)
    c, r = size * 0.55, size * 0.22
    d.ellipse((c - r + 6, c - r + 10, c + r + 6, c + r + 10), fill=(30, 70, 25))  # shadow
    d.ellipse((c - r, c - r, c + r, c + r), fill=(245, 245, 240))
    for y in np.arange(c - r + 8, c + r - 4, 11):
        for x in np.arange(c - r + 8, c + r - 4, 11):
            if (x - c) ** 2 + (y - c) ** 2 < (r - 8) ** 2:
                d.ellipse((x - 2.5, y - 2.5, x + 2.5, y + 2.5), fill=(205, 205, 200))
    return im


def _shapes(size: int = 320) -> Image.Image:
    """Plain geometric shapes: nothing the models know; shows how they react to the unfamiliar."""
    im = Image.new("RGB", (size, size), (235, 235, 245))
    d = ImageDraw.Draw(im)
    d.rectangle((30, 40, 150, 160), fill=(200, 40, 40))
    d.ellipse((170, 60, 290, 180), fill=(40, 80, 200))
    d.polygon([(80, 290), (160, 190), (240, 290)], fill=(240, 190, 30))
    return im


_GENERATED = (
    ("generated_golf_ball.png", _golf_ball, "A drawn golf ball (generated)"),
    ("generated_shapes.png", _shapes, "Coloured shapes (generated): none of the classes"),
)


def synthetic_photo(size: tuple[int, int] = (320, 240), seed: int = 0) -> Image.Image:
    """A seeded photo-like picture (gradient, shapes, noise) for benchmarks and tests.

    Not an example for people: it shows none of the classes. Its point is that CAMs and
    attention over it are not flat, as over a real photo, without shipping a dataset image.
    """
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([x / w, y / h, 1 - x / w], axis=-1) * 180 + rng.normal(0, 12, (h, w, 3))
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w - w // 4)), int(rng.integers(0, h - h // 4))
        x1, y1 = x0 + int(rng.integers(w // 12, w // 4)), y0 + int(rng.integers(h // 12, h // 4))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    return img


def list_examples(*, include_generated: bool = True) -> list[Example]:
    """The example images available on this machine, drawn ones written on first call."""
    out = [Example(p, caption) for pkg, rel, caption in _PACKAGED if (p := _package_file(pkg, rel))]
    if include_generated:
        folder = generated_dir()
        for file, draw, caption in _GENERATED:
            path = folder / file
            if not path.is_file():
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                    atomic_write(path, lambda f: draw().save(f, format="PNG"))
                except OSError:
                    continue  # a read-only temp folder: do without the drawn examples
            out.append(Example(path, caption))
    return out
