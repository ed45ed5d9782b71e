"""Imagenette's ten classes and ImageNet's normalisation: what untrained models and the trainer assume.

At the bottom of the package (no imports): the trainer, the loader's untrained models and the
examples read the same names.
"""

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "IMAGENETTE_NAMES"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Readable names of the ten Imagenette classes (WordNet id -> ImageNet label).
IMAGENETTE_NAMES = {
    "n01440764": "tench",
    "n02102040": "English springer",
    "n02979186": "cassette player",
    "n03000684": "chain saw",
    "n03028079": "church",
    "n03394916": "French horn",
    "n03417042": "garbage truck",
    "n03425413": "gas pump",
    "n03445777": "golf ball",
    "n03888257": "parachute",
}
