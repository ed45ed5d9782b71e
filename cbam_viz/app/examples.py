"""Example images for the app: one Imagenette photo per class first, then a few unfamiliar pictures.

The Imagenette photos (``examples/imagenette/``, one val image per class, Apache-2.0 as the dataset's
``LICENSE`` beside them says) show what the shipped models know, and each is one the default lineup
classifies correctly (``tests/test_examples.py`` checks it against the shipped weights). The rest
show none of the classes on purpose: photos that come with the packages the app already installs
(matplotlib's sample data, the scikit-learn sample images that grad-cam pulls in) and a picture
drawn here at first use. Those are when the app's "unsure" and "out-of-distribution" warnings are
most instructive.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cbam_viz.outputs import atomic_write
from cbam_viz.resources import SHIPPED_ROOT

__all__ = ["Example", "IMAGENETTE_EXAMPLES", "imagenette_dir", "list_examples", "generated_dir", "synthetic_photo"]


@dataclass(frozen=True)
class Example:
    path: Path
    caption: str


#: (file in examples/imagenette/, class name, the Imagenette2 val file it is: wnid/original name).
IMAGENETTE_EXAMPLES = (
    ("tench.JPEG", "tench", "n01440764/n01440764_10542.JPEG"),
    ("english_springer.JPEG", "English springer", "n02102040/n02102040_1030.JPEG"),
    ("cassette_player.JPEG", "cassette player", "n02979186/ILSVRC2012_val_00020400.JPEG"),
    ("chain_saw.JPEG", "chain saw", "n03000684/n03000684_11070.JPEG"),
    ("church.JPEG", "church", "n03028079/n03028079_10590.JPEG"),
    ("french_horn.JPEG", "French horn", "n03394916/n03394916_17890.JPEG"),
    ("garbage_truck.JPEG", "garbage truck", "n03417042/n03417042_11031.JPEG"),
    ("gas_pump.JPEG", "gas pump", "n03425413/n03425413_11910.JPEG"),
    ("golf_ball.JPEG", "golf ball", "n03445777/n03445777_10671.JPEG"),
    ("parachute.JPEG", "parachute", "n03888257/n03888257_11081.JPEG"),
)

# (package, path inside the package, caption): kept only when the file exists.
_PACKAGED = (
    ("sklearn", "datasets/images/china.jpg", "A pagoda (scikit-learn sample): close to 'church'?"),
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


def imagenette_dir() -> Path:
    """The shipped Imagenette photos: ``examples/imagenette/`` of the checkout, or the wheel's copy."""
    return SHIPPED_ROOT / "examples" / "imagenette"


def generated_dir() -> Path:
    """Where the drawn examples are written (under the system temp folder, which Gradio may serve)."""
    return Path(os.environ.get("CBAM_VIZ_EXAMPLES_DIR", Path(tempfile.gettempdir()) / "cbam_viz_examples"))


def _shapes(size: int = 320) -> Image.Image:
    """Plain geometric shapes: nothing the models know; shows how they react to the unfamiliar."""
    im = Image.new("RGB", (size, size), (235, 235, 245))
    d = ImageDraw.Draw(im)
    d.rectangle((30, 40, 150, 160), fill=(200, 40, 40))
    d.ellipse((170, 60, 290, 180), fill=(40, 80, 200))
    d.polygon([(80, 290), (160, 190), (240, 290)], fill=(240, 190, 30))
    return im


_GENERATED = (
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
    """The example images available on this machine: Imagenette's first, drawn ones written on first call."""
    folder = imagenette_dir()
    out = [Example(folder / file, f"{name[0].upper()}{name[1:]} (Imagenette val photo)")
           for file, name, original in IMAGENETTE_EXAMPLES if (folder / file).is_file()]
    out += [Example(p, caption) for pkg, rel, caption in _PACKAGED if (p := _package_file(pkg, rel))]
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
