"""Accuracy of the *shipped* weights, measured the way the app uses them.

The training loop reports validation accuracy on its own cached tensors, in bfloat16, before the
weights are written out. The numbers a user should trust are those of the files in ``weights/``:
this module loads a manifest record through :func:`cbam_viz.models.weights.load_record` (sha256
verified, float32), decodes every image with the app's own path (:func:`cbam_viz.engine.preprocess.open_image`
then :func:`cbam_viz.engine.preprocess.to_model_batch`: RGB, stretch-resize to the record's input size,
bilinear, normalised with the record's mean/std; the app also shrinks uploads over 1024 px first,
which no Imagenette image is) and reports top-1, top-5, per-class accuracy
and the confusion matrix (rows: true class, columns: predicted, both in the record's class order).
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cbam_viz import distributed
from cbam_viz.engine.lineup import lineup_specs
from cbam_viz.engine.preprocess import open_image, to_model_batch
from cbam_viz.models.weights import WeightRecord, load_record, read_manifest, resolve_weights_dir
from cbam_viz.training.data import scan_image_folder

__all__ = ["EvalResult", "ClassMismatchError", "resolve_models", "resolve_lineup", "evaluate_record",
           "evaluate_models", "format_report", "LabelledImages", "labelled_images", "image_batches", "spread_indices"]


class ClassMismatchError(ValueError):
    """The class folders of a dataset are not the classes a model was trained on."""


@dataclass(frozen=True)
class EvalResult:
    """Accuracy of one weight record on one ImageFolder split."""

    name: str
    arch: str
    data_dir: str
    top1: float
    top5: float
    per_class: dict[str, float | None]  # class id -> top-1 (None for a class without images)
    confusion: list[list[int]]           # [true][predicted], record class order
    n: int
    class_ids: tuple[str, ...]
    class_names: tuple[str, ...]
    seconds: float
    correct: tuple[bool, ...] = ()      # per image, in the folder's sorted file order (paired tests)
    hflip: bool = False                  # softmax averaged with the mirror image (test-time augmentation)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "arch": self.arch, "data_dir": self.data_dir, "top1": self.top1,
                "top5": self.top5, "per_class": self.per_class, "confusion": self.confusion, "n": self.n,
                "classes": [{"id": i, "name": c} for i, c in zip(self.class_ids, self.class_names)],
                "hflip": self.hflip, "seconds": round(self.seconds, 2)}

    def manifest_metrics(self, command: str) -> dict[str, Any]:
        """The keys merged into the record's ``metrics`` by ``evaluate --update-manifest``."""
        return {"val_top1": self.top1, "val_top5": self.top5, "val_per_class": self.per_class,
                "val_confusion": self.confusion, "val_n": self.n, "eval_command": command}


def resolve_models(weights_dir: str | os.PathLike | None = None, *, model: str | None = None,
                   lineup: str | None = None) -> list[WeightRecord]:
    """The record named by ``model``, or every member of ``lineup`` in its display order.

    Raises:
        FileNotFoundError: no manifest in ``weights_dir``.
        KeyError: unknown model or lineup (the message lists the known ones).
    """
    return resolve_lineup(weights_dir, model=model, lineup=lineup)[0]


def resolve_lineup(weights_dir: str | os.PathLike | None = None, *, model: str | None = None,
                   lineup: str | None = None) -> tuple[list[WeightRecord], str]:
    """:func:`resolve_models` and the reference member's name (a single model is its own reference).

    A manifest's ``lineups`` and its ``pairs`` (lineups of two, the plain model the reference)
    are both found; the lineup must be in ``weights_dir``'s own manifest, where its files are.
    """
    if (model is None) == (lineup is None):
        raise ValueError("give exactly one of model= or lineup=")
    weights_dir = resolve_weights_dir(weights_dir)
    manifest_path = weights_dir / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"no manifest at {manifest_path}; train and export first "
                                f"(python -m cbam_viz train --export {weights_dir})")
    data = read_manifest(weights_dir)
    if lineup is not None:
        specs = {name: spec for name, (_, spec) in lineup_specs(weights_dir).items()}
        if lineup not in specs:
            raise KeyError(f"no lineup {lineup!r} in {manifest_path}; known: {', '.join(sorted(specs)) or 'none'}")
        names = list(specs[lineup]["members"])
        reference = specs[lineup].get("reference") or names[0]
    else:
        names, reference = [model], model
    for name in names:
        if name not in data["models"]:
            raise KeyError(f"no model {name!r} in {manifest_path}; known: {', '.join(sorted(data['models'])) or 'none'}")
    return [WeightRecord(**data["models"][n]) for n in names], reference


def _labels_in_class_order(class_ids: Sequence[str], model_name: str, scan) -> list[int]:
    ids = list(class_ids)
    missing = sorted(set(ids) - set(scan.classes))
    extra = sorted(set(scan.classes) - set(ids))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no folder for {missing}")
        if extra:
            parts.append(f"folders the model does not know: {extra}")
        raise ClassMismatchError(
            f"the class folders of {scan.root} do not match the classes of model {model_name!r} "
            f"({len(ids)} classes: {ids[:10]}): " + "; ".join(parts))
    index = {cid: i for i, cid in enumerate(ids)}
    return [index[scan.classes[label]] for label in scan.labels]


def spread_indices(n: int, k: int | None) -> np.ndarray:
    """``k`` indices spread evenly over ``range(n)`` (all of them when ``k`` is None or >= n), so a
    subset of a class-sorted list keeps every class."""
    if k is None or k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max(k, 1)).round().astype(int))


@dataclass(frozen=True)
class LabelledImages:
    """Image files of an ImageFolder split with their true class as an index into a model's classes."""

    root: Path
    files: tuple[str, ...]   # "<class id>/<file>", sorted by class then name
    labels: tuple[int, ...]  # index into the model's class ids


def labelled_images(class_ids: Sequence[str], data_dir: str | os.PathLike, *, model_name: str = "the model",
                    max_images: int | None = None) -> LabelledImages:
    """The split's files, labelled in the model's class order (folder names are its class ids).

    Every dataset command (``evaluate``, ``ablate-gates``, ``channel-profiles``, ``sanity-check``)
    labels images here. ``max_images`` keeps that many files spread evenly over the sorted list, so
    every class stays represented in a smoke run.

    Raises:
        FileNotFoundError: no ImageFolder layout at ``data_dir``.
        ClassMismatchError: the folder names are not the model's class ids.
    """
    scan = scan_image_folder(data_dir)
    labels = _labels_in_class_order(class_ids, model_name, scan)
    keep = spread_indices(len(scan.files), max_images).tolist()
    return LabelledImages(scan.root, tuple(scan.files[i] for i in keep), tuple(labels[i] for i in keep))


def image_batches(images: LabelledImages, preprocessing, *, device: torch.device | str | None = None,
                  batch_size: int = 32, workers: int = 2, progress: bool = True,
                  desc: str = "images") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, labels)`` batches decoded as the app decodes an upload.

    :func:`cbam_viz.engine.preprocess.open_image`, then :func:`cbam_viz.engine.preprocess.to_model_batch` at
    ``preprocessing``'s ``input_size``, ``mean`` and ``std`` (a weight record or a loaded model);
    ``x`` on ``device`` (default: ``preprocessing.device``, else the CPU), labels on the CPU.
    Decoding runs in ``workers`` threads (PIL releases the GIL while decoding).

    Raises:
        cbam_viz.engine.preprocess.ImageError: an image cannot be decoded (the message names it).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = device or getattr(preprocessing, "device", None) or "cpu"
    paths = [images.root / f for f in images.files]
    labels = torch.tensor(images.labels, dtype=torch.int64)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
            tqdm(total=len(paths), desc=desc, unit="img", disable=not progress) as bar:
        for start in range(0, len(paths), batch_size):
            decoded = list(pool.map(open_image, paths[start:start + batch_size]))
            x = to_model_batch(decoded, preprocessing.input_size, preprocessing.mean, preprocessing.std)
            yield x.to(device), labels[start:start + len(decoded)]
            bar.update(len(decoded))


@torch.no_grad()
def evaluate_record(
    record: WeightRecord,
    data_dir: str | os.PathLike,
    *,
    weights_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    workers: int = 2,
    hflip: bool = False,
    progress: bool = True,
) -> EvalResult | None:
    """Top-1/top-5, per-class accuracy and confusion of one record on an ImageFolder split.

    Under torchrun (:mod:`cbam_viz.distributed`) each rank scores an even share of the images on its
    device; rank 0 returns the figures of all of them, the same as one process, the other ranks None.

    Args:
        record: a manifest record; its file is sha256-checked and loaded in float32.
        data_dir: ``<class id>/<image>`` folders whose names are the record's class ids.
        weights_dir: where the record's file lives.
        batch_size: images per forward.
        workers: threads decoding images (PIL releases the GIL while decoding).
        hflip: average the softmax of each image and its mirror image (reported beside the plain
            figure; the app does not do it).
        progress: show a tqdm bar.

    Raises:
        ClassMismatchError: the folder names are not the record's class ids.
        ChecksumError / FileNotFoundError: from :func:`cbam_viz.models.weights.load_record`.
        cbam_viz.engine.preprocess.ImageError: an image cannot be decoded (the message names it).
    """
    t0 = time.perf_counter()
    images = labelled_images([c["id"] for c in record.classes], data_dir, model_name=record.name)
    ctx = distributed.context()
    model = load_record(record, weights_dir).float().eval().to(ctx.device)
    k = min(5, record.num_classes)
    outcomes: list[tuple[int, tuple[int, int, bool]]] = []  # (image index, (label, prediction, in top-k))
    mine = [i for i, _ in distributed.shard(images.files, ctx)]  # every image on one process
    share = LabelledImages(images.root, tuple(images.files[i] for i in mine), tuple(images.labels[i] for i in mine))
    done = 0
    for x, y in image_batches(share, record, device=ctx.device, batch_size=batch_size, workers=workers,
                              progress=progress and ctx.main, desc=f"eval {record.name}"):
        logits = model(x).float()
        if hflip:  # log of the averaged probabilities ranks classes as the average does
            logits = ((logits.softmax(1) + model(x.flip(3)).float().softmax(1)) / 2).log()
        pred, top = logits.argmax(1).cpu(), logits.topk(k, 1).indices.cpu()
        for j in range(len(y)):
            outcomes.append((mine[done + j], (int(y[j]), int(pred[j]), bool((top[j] == y[j]).any()))))
        done += len(y)
    gathered = distributed.gather_ordered(outcomes, ctx)  # rank 0: every image, in order
    if gathered is None:
        return None
    return _result(record, data_dir, gathered, hflip=hflip, seconds=time.perf_counter() - t0)


def _result(record: WeightRecord, data_dir, outcomes: list[tuple[int, int, bool]], *, hflip: bool,
            seconds: float) -> EvalResult:
    """The figures of one record from its per-image ``(label, prediction, in top-k)``, in image order."""
    n_cls, n = record.num_classes, len(outcomes)
    y = torch.tensor([o[0] for o in outcomes], dtype=torch.int64)
    pred = torch.tensor([o[1] for o in outcomes], dtype=torch.int64)
    confusion = torch.bincount(y * n_cls + pred, minlength=n_cls * n_cls).view(n_cls, n_cls)
    support = confusion.sum(1)
    per_class = {c["id"]: (float(confusion[i, i]) / float(support[i]) if support[i] else None)
                 for i, c in enumerate(record.classes)}
    return EvalResult(
        name=record.name, arch=record.arch, data_dir=str(Path(data_dir)),
        top1=float(confusion.diag().sum()) / n, top5=sum(o[2] for o in outcomes) / n, per_class=per_class,
        confusion=confusion.tolist(), n=n, class_ids=tuple(c["id"] for c in record.classes),
        class_names=tuple(record.class_names), seconds=seconds, correct=tuple((y == pred).tolist()), hflip=hflip,
    )


def evaluate_models(records: list[WeightRecord], data_dir: str | os.PathLike, **kwargs) -> list[EvalResult] | None:
    """:func:`evaluate_record` for each record (e.g. every member of a lineup), on the same images.

    Under torchrun each rank takes an even share of the images (:mod:`cbam_viz.distributed`); rank 0
    gets the results one process would compute, the other ranks None.
    """
    results = [evaluate_record(r, data_dir, **kwargs) for r in records]
    return None if any(r is None for r in results) else results


def _pct(v: float | None) -> str:
    return "   -  " if v is None else f"{100 * v:5.1f}%"


def format_report(results: list[EvalResult], *, confusion: bool = True) -> str:
    """A plain-text table: overall accuracy, per-class top-1 side by side, then each confusion matrix."""
    if not results:
        return "no results"
    lines = []
    w = max(12, *(len(r.name) for r in results))
    lines.append(f"{'model':<{w}}  {'top-1':>6}  {'top-5':>6}  {'images':>6}")
    for r in results:
        lines.append(f"{r.name:<{w}}  {_pct(r.top1)}  {_pct(r.top5)}  {r.n:>6}")
    first = results[0]
    cw = max(5, *(len(c) for c in first.class_names))
    cols = [max(8, min(len(r.name), 24)) for r in results]
    lines.append("")
    lines.append(f"{'per-class top-1':<{cw}}  " + "  ".join(f"{r.name[:c]:>{c}}" for r, c in zip(results, cols)))
    for cid, cname in zip(first.class_ids, first.class_names):
        cells = [f"{_pct(r.per_class.get(cid)):>{c}}" for r, c in zip(results, cols)]
        lines.append(f"{cname:<{cw}}  " + "  ".join(cells))
    if confusion:
        for r in results:
            lines.append("")
            lines.append(f"confusion of {r.name} (rows: true class, columns: predicted)")
            width = max(4, len(str(max(max(row) for row in r.confusion))) + 1)
            head = "".join(f"{i:>{width}}" for i in range(len(r.class_ids)))
            lines.append(f"{'':<{cw + 4}}{head}")
            for i, (cname, row) in enumerate(zip(r.class_names, r.confusion)):
                lines.append(f"{i:>2}  {cname:<{cw}}" + "".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)
