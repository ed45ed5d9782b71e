"""Synthetic datasets for the tests: generated in ``tmp_path``, never committed."""
from __future__ import annotations

import numpy as np
from PIL import Image


def make_image_folder(root, classes, *, per_class: int = 16, size=(40, 48), seed: int = 0):
    """An ImageFolder of ``len(classes)`` x ``per_class`` PNGs of coloured noise (W x H = ``size``),
    one dominant colour channel per class, so a tiny model can learn it in a few steps."""
    rng = np.random.default_rng(seed)
    for i, cls in enumerate(classes):
        (root / cls).mkdir(parents=True)
        for j in range(per_class):
            img = rng.integers(0, 90, (size[1], size[0], 3), dtype=np.uint8)
            img[..., i % 3] += 160
            Image.fromarray(img).save(root / cls / f"img{j:02d}.png")
    return root

