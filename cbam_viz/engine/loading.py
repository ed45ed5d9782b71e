"""Loading models: one manifest record (or an untrained or the paper's ImageNet model) -> a :class:`LoadedModel`.

Every model carries its own classes, mean/std and input size
(:class:`cbam_viz.models.weights.WeightRecord`), so nothing here is hard-coded for trained weights.
Lineups of them (:mod:`cbam_viz.engine.lineup`) load their members here.

Models are built once and kept in a small LRU cache keyed by (name, weights dir, device, sha256),
never per request: the process's only model cache (the app and the CLI hold none of their own), so
two lineups that name the same record share one :class:`LoadedModel`, and with it one
:func:`cbam_viz.engine.locks.model_lock`.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cbam_viz.engine import imagenet as inet
from cbam_viz.engine.locks import model_lock
from cbam_viz.engine.ood import load_stats
from cbam_viz.models import create_model
from cbam_viz.models.weights import WEIGHTS_DIR_ENV, WeightRecord, load_record, read_manifest, resolve_weights_dir
from cbam_viz.models.imagenette import IMAGENET_MEAN, IMAGENET_STD, IMAGENETTE_NAMES

__all__ = [
    "LoadedModel", "ModelLoadError", "load_model", "untrained_model", "imagenet_models", "select_device",
    "clear_cache", "DEVICE_ENV", "WEIGHTS_DIR_ENV", "weights_dir_default",
]

log = logging.getLogger(__name__)

DEVICE_ENV = "CBAM_VIZ_DEVICE"
_UNTRAINED_INPUT = 224
_UNTRAINED_SEED = 0
_CACHE_SIZE = 10  # two lineups of four and a spare; resnet18s are ~45 MB each


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for inference plus everything needed to preprocess for it and label it."""

    name: str                 # record name, or e.g. "resnet18 (untrained)"
    arch: str                 # registry name
    model: nn.Module          # eval mode, on `device`
    classes: tuple[str, ...]  # readable class names
    class_ids: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int
    trained: bool             # False when no weights were found: the UI says so plainly
    record: WeightRecord | None
    device: torch.device
    ood: Any = None           # cbam_viz.engine.ood.OODStats, or NoStats saying why not (None: not looked for)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def lock(self) -> threading.RLock:
        """:func:`model_lock` of this model: hold it around every forward."""
        return model_lock(self.model)


class ModelLoadError(RuntimeError):
    """A model could not be loaded (missing file, corrupted file, wrong architecture).

    Attributes:
        model_name: the manifest record that failed.
        file: the weights file involved (a path), or None if the record itself is missing.
        pair: the lineup being loaded, if any.
    """

    def __init__(self, message: str, *, model_name: str, file: Path | None, pair: str | None = None):
        super().__init__(message)
        self.model_name = model_name
        self.file = file
        self.pair = pair


# ------------------------------------------------------------------------------------ device


def select_device(preferred: str | torch.device | None = None) -> torch.device:
    """The device to run on: ``preferred``, else ``$CBAM_VIZ_DEVICE``, else cuda, mps, cpu.

    Args:
        preferred: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, ``"auto"`` or a device.

    Raises:
        ValueError: the requested device is not a valid name or is not available here.
    """
    if preferred is None:
        preferred = os.environ.get(DEVICE_ENV) or "auto"
    if isinstance(preferred, str) and preferred.strip().lower() in ("", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(preferred)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{preferred!r} is not a device name (use cpu, cuda, cuda:N, mps or auto)") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {preferred!r} requested but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {preferred!r} requested but only {torch.cuda.device_count()} GPU(s) exist")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"device {preferred!r} requested but MPS is not available on this machine")
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {preferred!r} (use cpu, cuda, cuda:N, mps or auto)")
    return device


def weights_dir_default(weights_dir: str | os.PathLike | None = None) -> Path:
    """``weights_dir`` if given, else ``$CBAM_VIZ_WEIGHTS_DIR``, else the repository's ``weights/``
    (:func:`cbam_viz.models.weights.resolve_weights_dir`, the one default)."""
    return resolve_weights_dir(weights_dir)


# ------------------------------------------------------------------------------------- cache

_cache: OrderedDict[tuple, LoadedModel] = OrderedDict()
_cache_lock = threading.Lock()
_build_locks: dict[tuple, threading.Lock] = {}


def clear_cache() -> None:
    """Forget every cached model (tests; or after replacing weight files)."""
    with _cache_lock:
        _cache.clear()
        _build_locks.clear()


def _cached(key: tuple, build) -> LoadedModel:
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
        lock = _build_locks.setdefault(key, threading.Lock())
    with lock:  # one build per key even when several requests arrive at once
        with _cache_lock:
            if key in _cache:
                return _cache[key]
        loaded = build()
        with _cache_lock:
            _cache[key] = loaded
            while len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
            _build_locks.pop(key, None)
        return loaded


# ------------------------------------------------------------------------------------ models


def _weights_key(weights_dir) -> str:
    return str(Path(weights_dir).resolve())


def load_model(
    name: str, *, weights_dir: str | os.PathLike | None = None, device=None
) -> LoadedModel:
    """Load one manifest record (sha256-checked), cached.

    Raises:
        ModelLoadError: unknown record, missing or corrupted file, or a file that does not fit
            the architecture; the message names the file.
    """
    device = select_device(device)
    weights_dir = weights_dir_default(weights_dir)
    records = read_manifest(weights_dir)["models"]
    if name not in records:
        raise ModelLoadError(
            f"no model {name!r} in {Path(weights_dir) / 'manifest.json'}; "
            f"known: {', '.join(sorted(records)) or 'none'}",
            model_name=name, file=None,
        )
    record = WeightRecord(**records[name])
    key = (name, _weights_key(weights_dir), str(device), record.sha256)

    def build() -> LoadedModel:
        path = Path(weights_dir) / record.file
        try:
            model = load_record(record, weights_dir)
        except Exception as err:  # noqa: BLE001  re-raised with the file and model named
            raise ModelLoadError(
                f"cannot load model {name!r} from {path}: {err}", model_name=name, file=path
            ) from err
        return LoadedModel(
            name=record.name,
            arch=record.arch,
            model=model.to(device).eval(),
            classes=tuple(record.class_names),
            class_ids=tuple(c["id"] for c in record.classes),
            mean=tuple(float(v) for v in record.mean),
            std=tuple(float(v) for v in record.std),
            input_size=int(record.input_size),
            trained=True,
            record=record,
            device=device,
            ood=load_stats(record, weights_dir, model),
        )

    return _cached(key, build)


def untrained_model(arch: str, *, device=None) -> LoadedModel:
    """A seeded, untrained ``arch`` on Imagenette's ten classes (``trained=False``), cached."""
    device = select_device(device)

    def build() -> LoadedModel:
        # Seeded without disturbing the caller's global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_UNTRAINED_SEED)
            model = create_model(arch, num_classes=len(IMAGENETTE_NAMES))
        return LoadedModel(
            name=f"{arch} (untrained)", arch=arch, model=model.to(device).eval(),
            classes=tuple(IMAGENETTE_NAMES.values()), class_ids=tuple(IMAGENETTE_NAMES), mean=tuple(IMAGENET_MEAN),
            std=tuple(IMAGENET_STD), input_size=_UNTRAINED_INPUT, trained=False, record=None, device=device,
        )

    return _cached((f"{arch} (untrained)", None, str(device), None), build)


def imagenet_models(*, weights_dir: str | os.PathLike | None = None, device=None) -> tuple[LoadedModel, LoadedModel]:
    """The paper's own ResNet-50 and ResNet-50-CBAM (:mod:`cbam_viz.engine.imagenet`), 1000 ImageNet
    classes; both built once and cached.

    Raises:
        ModelLoadError: a file is missing (the message says what to fetch and from where) or
            cannot be loaded.
    """
    device = select_device(device)
    reason = inet.unavailable_reason(weights_dir)
    if reason:
        raise ModelLoadError(reason, model_name="resnet50_cbam", file=None, pair=inet.PAIR_NAME)
    official = inet.official_checkpoint(weights_dir)

    def build_both() -> tuple[LoadedModel, LoadedModel]:
        try:
            models = inet.build_models(weights_dir)
        except (OSError, RuntimeError, ValueError) as err:
            raise ModelLoadError(str(err), model_name="resnet50", file=official, pair=inet.PAIR_NAME) from err
        recs = inet.records(*models, weights_dir)
        return tuple(LoadedModel(
            name=rec.name, arch=rec.arch, model=model.to(device).eval(), classes=tuple(rec.class_names),
            class_ids=tuple(c["id"] for c in rec.classes), mean=tuple(rec.mean), std=tuple(rec.std),
            input_size=rec.input_size, trained=True, record=rec, device=device,
        ) for model, rec in zip(models, recs))

    built: dict[str, tuple[LoadedModel, LoadedModel]] = {}

    def member(i: int) -> LoadedModel:
        if "both" not in built:  # one build reads both files; the cache keeps each model
            built["both"] = build_both()
        return built["both"][i]

    key = (inet.PAIR_NAME, str(official.resolve()), str(device), official.stat().st_mtime_ns)
    return _cached(("resnet50", *key), lambda: member(0)), _cached(("resnet50_cbam", *key), lambda: member(1))
