"""Image-folder datasets decoded once into a uint8 tensor, and batched augmentation on tensors.

Training on a 2-core CPU cannot afford to decode JPEGs every epoch: the whole split is decoded
once (in threads, PIL releases the GIL while decoding), resized to a square, and kept as one
``(N, 3, S, S)`` uint8 tensor, cached on disk. Augmentation (random-resized crop + horizontal
flip) then runs on whole batches through one ``affine_grid``/``grid_sample`` call, with no
per-image Python work.

The square resize *stretches* (it does not crop), as the Imagenette 224x224 split was made and
as the app preprocesses a user's photo, so train, evaluation and app see images the same way.
"""
from __future__ import annotations

import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from cbam_viz.engine.preprocess import open_image
from cbam_viz.outputs import atomic_write

__all__ = [
    "IMAGE_EXTENSIONS", "ImageFolderScan",
    "TensorDataset", "scan_image_folder", "load_rgb", "decode_one", "decode_images", "load_cached_split", "holdout_split",
    "random_resized_crop_flip", "mix_batch", "normalize", "resize_batch",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


@dataclass(frozen=True)
class ImageFolderScan:
    """Files of an ImageFolder layout (``root/<class>/<file>``), classes sorted as torchvision does."""

    root: Path
    classes: tuple[str, ...]
    files: tuple[str, ...]  # relative to root, "<class>/<file>"
    labels: tuple[int, ...]

    def fingerprint(self) -> str:
        """Changes whenever the file list or any file's size or mtime changes."""
        h = hashlib.sha256()
        for rel in self.files:
            st = os.stat(self.root / rel)
            h.update(f"{rel}\0{st.st_size}\0{int(st.st_mtime)}\n".encode())
        return h.hexdigest()[:16]


def scan_image_folder(root: str | os.PathLike) -> ImageFolderScan:
    """List an ImageFolder-layout directory.

    Raises:
        FileNotFoundError: ``root`` is missing or holds no class folder with images.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files, labels = [], []
    for idx, cls in enumerate(classes):
        for f in sorted((root / cls).iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(f"{cls}/{f.name}")
                labels.append(idx)
    if not files:
        raise FileNotFoundError(f"no images in ImageFolder layout (root/<class>/<image>) under {root}")
    return ImageFolderScan(root, tuple(classes), tuple(files), tuple(labels))


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB exactly as the app does (:func:`cbam_viz.engine.preprocess.open_image`:
    EXIF orientation applied, transparency on white, the size limit), so training, evaluation and
    the explanation-quality measurements see what a user of the app sees.

    Raises:
        cbam_viz.engine.preprocess.ImageError: not an image, damaged, or too large.
    """
    return open_image(path)


def decode_one(path: Path, size: int) -> torch.Tensor:
    """One image file as a ``(3, size, size)`` uint8 tensor: the cached split's pixels exactly (the
    streamed path of :mod:`cbam_viz.training.stream` decodes with it too)."""
    img = load_rgb(path).resize((size, size), Image.BILINEAR, reducing_gap=None)
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)


def decode_images(paths: list[Path], size: int, *, workers: int = 2, progress: bool = True) -> torch.Tensor:
    """Decode and stretch-resize images into one ``(N, 3, size, size)`` uint8 tensor."""
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        it = pool.map(lambda p: decode_one(p, size), paths)
        for i, img in enumerate(tqdm(it, total=len(paths), desc=f"decode {size}px", disable=not progress)):
            out[i] = img
    return out


@dataclass
class TensorDataset:
    """A split held in memory: uint8 images, int64 labels, class names and file names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    files: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> "TensorDataset":
        """The samples at ``indices`` (same classes); images are copied, not viewed."""
        idx = indices.tolist()
        return TensorDataset(self.images[indices], self.labels[indices], self.classes,
                             tuple(self.files[i] for i in idx))


def holdout_split(ds: TensorDataset, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, holdout)`` indices: ``fraction`` of every class held out of training.

    The recipe's choices that are made after training (evaluation size, EMA or raw weights) are
    made on this held-out part of the *training* folder, so the validation split stays untouched
    until the final, reported measurement. Which files are held out depends only on their names
    (a hash of ``<class>/<file>``), not on the seed or on the other files, so every model of a lineup
    and a resumed run hold out exactly the same images.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    train_idx, hold_idx = [], []
    for label in range(len(ds.classes)):
        members = [i for i, y in enumerate(ds.labels.tolist()) if y == label]
        members.sort(key=lambda i: hashlib.sha256(ds.files[i].encode()).hexdigest())
        k = round(fraction * len(members))
        hold_idx += members[:k]
        train_idx += members[k:]
    return torch.tensor(sorted(train_idx), dtype=torch.int64), torch.tensor(sorted(hold_idx), dtype=torch.int64)


def load_cached_split(
    root: str | os.PathLike, size: int, *, cache_dir: str | os.PathLike | None = None, progress: bool = True,
    write: bool = True,
) -> TensorDataset:
    """Decode ``root`` once at ``size`` px; later calls read the cached tensor file.

    The cache file name holds a fingerprint of the file list, so an edited dataset is re-decoded.
    ``write=False`` reads an existing cache file but never writes one (a torchrun rank other than 0).
    """
    scan = scan_image_folder(root)
    cache_path = None
    if cache_dir is not None:
        key = hashlib.sha256(f"{Path(root).resolve()}|{size}|{scan.fingerprint()}".encode()).hexdigest()[:20]
        cache_path = Path(cache_dir) / f"split-{key}.pt"
        if cache_path.exists():
            blob = torch.load(cache_path, weights_only=True)
            return TensorDataset(blob["images"], blob["labels"], tuple(blob["classes"]), tuple(blob["files"]))
    images = decode_images([scan.root / f for f in scan.files], size, progress=progress)
    ds = TensorDataset(images, torch.tensor(scan.labels, dtype=torch.int64), scan.classes, scan.files)
    if cache_path is not None and write:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        blob = {"images": images, "labels": ds.labels, "classes": list(ds.classes), "files": list(ds.files)}
        atomic_write(cache_path, lambda f: torch.save(blob, f))
    return ds


def normalize(batch: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 or [0, 1] float ``(B, 3, H, W)`` -> normalised float32."""
    if batch.dtype == torch.uint8:
        batch = batch.float().div_(255.0)
    m = torch.tensor(mean, dtype=batch.dtype, device=batch.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=batch.dtype, device=batch.device).view(1, 3, 1, 1)
    return (batch - m) / s


def resize_batch(batch: torch.Tensor, size: int) -> torch.Tensor:
    """Stretch-resize a float batch to ``size`` x ``size`` (antialiased when shrinking)."""
    if batch.shape[-2:] == (size, size):
        return batch
    return F.interpolate(batch, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def random_resized_crop_flip(
    batch: torch.Tensor,
    out_size: int,
    *,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.25, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    share: tuple[int, int] = (0, 1),
) -> torch.Tensor:
    """Random-resized crop and horizontal flip of a whole float batch in one ``grid_sample``.

    Each sample draws an area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``
    (torchvision's RandomResizedCrop distribution, clamped to the image instead of retried), a
    position where the crop fits, and a coin for the flip.

    ``share=(k, n)``: ``batch`` is the k-th of n equal parts of a global batch (a rank's share under
    torchrun). The draws are made for the whole global batch and the part's rows used, so every
    image gets the crop it gets on one process and every rank's generator stays in step.
    """
    b = batch.shape[0]
    k, n = share
    u = torch.rand((b * n, 5), generator=generator)[k * b:(k + 1) * b]
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    aspect = torch.exp(log_r)
    w = torch.sqrt(area * aspect).clamp(max=1.0)  # fractions of the full width / height
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (1 - w) * (2 * u[:, 2] - 1)  # centre in [-1, 1] normalised coordinates
    cy = (1 - h) * (2 * u[:, 3] - 1)
    sign = torch.where(u[:, 4] < 0.5, -1.0, 1.0) if flip else torch.ones(b)
    theta = torch.zeros((b, 2, 3))
    theta[:, 0, 0] = w * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    # The draws stay on the CPU generator (the same augmentation on any device); the warp runs
    # where the batch is (a GPU when training there).
    grid = F.affine_grid(theta.to(batch.device), [b, batch.shape[1], out_size, out_size], align_corners=False)
    return F.grid_sample(batch, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def mix_batch(batch: torch.Tensor, *, generator: torch.Generator, cutmix_alpha: float = 0.0,
              mixup_alpha: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mix every image of a batch with a partner image of the same batch: CutMix or Mixup.

    A regulariser for a model that learns its training set by heart: CutMix (Yun et al., 2019)
    pastes a box of the partner into the image, Mixup (Zhang et al., 2018) blends the two; the
    loss then weights the two labels by ``lam`` and ``1 - lam``. One ``lam ~ Beta(alpha, alpha)``
    and one box serve the whole batch (no per-image Python work); with both alphas set, a coin
    picks CutMix or Mixup per batch. CutMix's ``lam`` is the share of the image left unpasted
    after the box is clipped to the image.

    The draws come from ``generator`` (through a NumPy generator it seeds, for the Beta draw), so
    a resumed run mixes exactly as an uninterrupted one; the pixel work runs where the batch is.

    Returns:
        ``(mixed, partner, lam)``: the mixed batch, each image's partner index, and the weight of
        the image's own label. With both alphas 0 the batch is returned as is, with ``lam`` 1.
    """
    if not all(math.isfinite(a) and a >= 0 for a in (cutmix_alpha, mixup_alpha)):
        raise ValueError(f"mixing alphas must be finite and >= 0, got cutmix {cutmix_alpha}, mixup {mixup_alpha}")
    b, _, h, w = batch.shape
    if not (cutmix_alpha or mixup_alpha):
        return batch, torch.arange(b, device=batch.device), 1.0
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))
    cutmix = cutmix_alpha > 0 and (mixup_alpha == 0 or rng.random() < 0.5)
    alpha = cutmix_alpha if cutmix else mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    partner = torch.from_numpy(rng.permutation(b)).to(batch.device)
    if not cutmix:
        return batch.mul(lam).add_(batch[partner], alpha=1 - lam), partner, lam
    cut = math.sqrt(1 - lam)  # the box's side as a share of the image's
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1 = max(cy - int(h * cut) // 2, 0), min(cy + int(h * cut) // 2, h)
    x0, x1 = max(cx - int(w * cut) // 2, 0), min(cx + int(w * cut) // 2, w)
    mixed = batch.clone()
    mixed[:, :, y0:y1, x0:x1] = batch[partner, :, y0:y1, x0:x1]
    return mixed, partner, 1 - (y1 - y0) * (x1 - x0) / (h * w)
