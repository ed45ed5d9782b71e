"""Fit a model record's out-of-distribution statistics (``python -m cbam_viz fit-ood``).

The features come from the same preprocessing the app uses (:func:`cbam_viz.engine.preprocess.to_model_batch`
at the record's input size, images decoded by :func:`cbam_viz.training.data.load_rgb`), so a threshold set
here means the same thing on an uploaded photo. The statistics are fitted on ``DATA/train`` and the
threshold is set to accept :data:`cbam_viz.engine.ood.ACCEPT` of ``DATA/val``; nothing else is chosen on
val. Works for any manifest record (a user's own model included): only its ``avgpool`` and ``fc``
are assumed (:mod:`cbam_viz.engine.ood`).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from cbam_viz.engine import ood
from cbam_viz.engine.lineup import default_lineup_name, lineup_specs
from cbam_viz.engine.loading import ModelLoadError, load_model
from cbam_viz.engine.locks import model_lock
from cbam_viz.engine.preprocess import to_model_batch
from cbam_viz.models.weights import resolve_weights_dir, update_manifest
from cbam_viz.training.data import load_rgb, scan_image_folder

__all__ = ["extract", "split_features", "fit_record", "add_parser", "DEFAULT_METHOD"]

#: The score the comparison in docs/out_of_distribution.md chose (best mean AUROC over both models).
DEFAULT_METHOD = "mahalanobis"


def extract(model: torch.nn.Module, images: Sequence[str | os.PathLike | Image.Image], *, input_size: int,
            mean, std, batch_size: int = 64, progress: bool = False, desc: str = "features"
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features ``(N, D)`` and logits ``(N, K)`` of images (paths or PIL), batched.

    Raises:
        ValueError: the model has no ``avgpool`` whose output could be read.
    """
    device = next(model.parameters()).device
    feats, logits = [], []
    with model_lock(model), torch.inference_mode(), ood.penultimate_features(model) as captured:
        for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, unit="batch"):
            chunk = [im if isinstance(im, Image.Image) else load_rgb(im) for im in images[start:start + batch_size]]
            x = to_model_batch(chunk, input_size, mean, std).to(device)
            captured.clear()
            logits.append(model(x).float().cpu())
            if not captured:
                raise ValueError(f"{type(model).__name__} has no {ood.FEATURE_LAYER!r} module to read features from")
            feats.append(captured[0])
    return torch.cat(feats), torch.cat(logits)


def split_features(loaded, folder: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                   per_class: int | None = None, batch_size: int = 64, progress: bool = False
                   ) -> dict[str, torch.Tensor]:
    """``{"features", "logits", "labels"}`` of an ImageFolder split, labels in the record's class order.

    Class folders are matched to the record's class ids (WordNet ids); a folder that is not one of
    them is an error. ``per_class``: at most that many images of each class, evenly spread over its
    sorted files (a cheaper fit on a busy CPU); None: all. With ``cache_dir`` the result is kept there, keyed by the weights' sha256 and
    the folder's fingerprint, so fitting and the comparison share one pass over the data.

    Raises:
        ValueError: a class folder that the model does not know.
    """
    scan = scan_image_folder(folder)
    unknown = [c for c in scan.classes if c not in loaded.class_ids]
    if unknown:
        raise ValueError(f"class folders {unknown[:5]} of {folder} are not classes of {loaded.name!r} "
                         f"(it knows {', '.join(loaded.class_ids[:10])})")
    files, labels = _subsample(scan, per_class)
    labels = torch.tensor([loaded.class_ids.index(scan.classes[i]) for i in labels])
    sha = loaded.record.sha256[:16] if loaded.record is not None else loaded.name
    key = f"{sha}_{loaded.input_size}_{scan.fingerprint()}_{per_class or 'all'}"
    cache = Path(cache_dir) / f"{key}.pt" if cache_dir else None
    if cache is not None and cache.is_file():
        return torch.load(cache, weights_only=True)
    feats, logits = extract(loaded.model, [scan.root / f for f in files], input_size=loaded.input_size,
                            mean=loaded.mean, std=loaded.std, batch_size=batch_size, progress=progress,
                            desc=f"{loaded.name} {Path(folder).name}")
    out = {"features": feats, "logits": logits, "labels": labels}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, cache)
    return out


def _subsample(scan, per_class: int | None) -> tuple[list[str], list[int]]:
    """Files and labels of a scan, at most ``per_class`` of each class, evenly spread (deterministic)."""
    if per_class is None:
        return list(scan.files), list(scan.labels)
    files, labels = [], []
    for c in range(len(scan.classes)):
        own = [f for f, lab in zip(scan.files, scan.labels) if lab == c]
        step = max(1.0, len(own) / per_class)
        picked = [own[int(i * step)] for i in range(min(per_class, len(own)))]
        files += picked
        labels += [c] * len(picked)
    return files, labels


def fit_record(name: str, data: str | os.PathLike, *, weights_dir: str | os.PathLike | None = None,
               method: str = DEFAULT_METHOD, cache_dir: str | os.PathLike | None = None,
               per_class: tuple[int | None, int | None] = (None, None), batch_size: int = 64,
               progress: bool = False):
    """Fit record ``name``'s statistics on ``data/train``, threshold on ``data/val``; store them.

    Writes ``<record stem>.ood.safetensors`` beside the weights and the entry that points to it
    into the record's ``metrics["ood"]`` (the weights file and its sha256 are untouched).
    Returns that entry.

    Raises:
        FileNotFoundError: ``data`` lacks a ``train`` or ``val`` folder of images.
        ValueError: an unknown method, or class folders the model does not know.

    ``per_class``: (train, val) caps per class (:func:`split_features`); the default uses every image.
    """
    if method not in ood.METHODS:
        raise ValueError(f"unknown out-of-distribution method {method!r}; choose one of {', '.join(ood.METHODS)}")
    weights_dir = resolve_weights_dir(weights_dir)
    data = Path(data)
    for split in ("train", "val"):
        if not (data / split).is_dir():
            raise FileNotFoundError(f"{data} has no {split}/ folder (expected DATA/train/<class>/... and DATA/val/...)")
    loaded = load_model(name, weights_dir=weights_dir, device="cpu")
    kw = {"cache_dir": cache_dir, "batch_size": batch_size, "progress": progress}
    train = split_features(loaded, data / "train", per_class=per_class[0], **kw)
    val = split_features(loaded, data / "val", per_class=per_class[1], **kw)
    stats = ood.fit_stats(method, train["features"], train["labels"], len(loaded.classes))
    stats = ood.calibrate(stats, val["features"], val["logits"])
    record = loaded.record
    file = Path(record.file).name.removesuffix(".safetensors") + ood.STATS_SUFFIX
    sha = ood.save_stats(stats, weights_dir / file)
    caps = [f"--{s}-per-class={n}" for s, n in zip(("train", "val"), per_class) if n is not None]
    command = shlex.join(["python", "-m", "cbam_viz", "fit-ood", "--data", str(data), "--model", name,
                          "--method", method, *caps])
    entry = ood.record_entry(stats, file, sha, fitted_on=f"{len(train['labels'])} training images",
                             calibrated_on=f"{len(val['labels'])} validation images", command=command)
    update_manifest(weights_dir, metrics=(name, {"ood": entry}))
    return entry


def _cmd_fit_ood(args) -> int:
    """``fit-ood``: fit the statistics of every model of a lineup (or the named records)."""
    weights_dir = resolve_weights_dir(args.weights)
    try:
        names = list(args.model or [])
        if not names:
            specs = lineup_specs(weights_dir)  # a manifest's lineups, and its old pairs as lineups of two
            lineup = args.lineup or default_lineup_name(weights_dir)
            if lineup not in specs:
                raise KeyError(f"no lineup {lineup!r} in {weights_dir / 'manifest.json'}")
            names = list(specs[lineup][1]["members"])
        for name in names:
            entry = fit_record(name, args.data, weights_dir=weights_dir, method=args.method, cache_dir=args.cache,
                               per_class=(args.train_per_class, args.val_per_class), batch_size=args.batch_size,
                               progress=not args.no_progress)
            print(f"fit-ood: {name}: {entry['method']} threshold {entry['threshold']:.4g} "
                  f"(accepts {entry['accept']:.0%} of {entry['calibrated_on']}), wrote {entry['file']}")
    except (KeyError, ValueError, FileNotFoundError, ModelLoadError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"fit-ood: error: {message}", file=sys.stderr)
        return 2
    return 0


def add_parser(sub) -> None:
    """Register ``fit-ood`` on the CLI's sub-parsers (:mod:`cbam_viz.cli`)."""
    f = sub.add_parser("fit-ood", help="fit each model's out-of-distribution statistics (training split) and "
                       "threshold (95 %% of val accepted); stored beside its weights")
    f.add_argument("--data", required=True, type=Path, help="ImageFolder root with train/<class>/ and val/<class>/")
    f.add_argument("--lineup", help="the lineup whose models are fitted (default: the default one)")
    f.add_argument("--pair", dest="lineup", help=argparse.SUPPRESS)
    f.add_argument("--model", action="append", help="fit this manifest record instead (repeatable)")
    f.add_argument("--weights", help="folder of manifest.json and the weights (default: $CBAM_VIZ_WEIGHTS_DIR, "
                   "else the repository's weights/)")
    f.add_argument("--method", default=DEFAULT_METHOD, choices=ood.METHODS, help="the score (default: %(default)s)")
    f.add_argument("--cache", type=Path, help="keep the extracted features here (re-runs skip the forwards)")
    f.add_argument("--train-per-class", type=int, help="fit on at most N images per class (default: all)")
    f.add_argument("--val-per-class", type=int, help="set the threshold on at most N per class (default: all)")
    f.add_argument("--batch-size", type=int, default=64)
    f.add_argument("--no-progress", action="store_true")
    f.set_defaults(func=_cmd_fit_ood)
