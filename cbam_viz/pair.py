"""The two models the app compares: a baseline ResNet and its CBAM twin, trained the same way.

Pairs are listed in ``weights/manifest.json`` (``{"pairs": {name: {"baseline": record,
"cbam": record, "default": true?}}}``); every model carries its own classes, mean/std and input
size (:class:`cbam_viz.weights.WeightRecord`), so nothing here is hard-coded for trained weights.

With no manifest (a fresh checkout, before training) :func:`load_pair` returns a seeded,
*untrained* resnet18 / resnet18_cbam pair with ``trained=False`` so the app still runs and can
say plainly that its predictions mean nothing.

Models are built once and kept in a small LRU cache keyed by (name, weights dir, device, sha256),
never per request: the process's only model cache (the app and the CLI hold none of their own), so
two pairs that name the same record share one :class:`LoadedModel`, and with it one
:func:`model_lock`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cbam_viz.training.data import IMAGENET_MEAN, IMAGENET_STD, IMAGENETTE_NAMES
from cbam_viz.ood import load_stats
from cbam_viz.weights import (
    WEIGHTS_DIR_ENV, WeightRecord, load_record, read_manifest, resolve_weights_dir, weights_dirs,
)

__all__ = [
    "LoadedModel", "ModelPair", "ModelLoadError", "list_pairs", "default_pair_name", "load_pair",
    "load_model", "untrained_pair", "load_available_pairs", "select_device", "clear_cache",
    "UNTRAINED_PAIR", "IMAGENET_PAIR", "imagenet_pair", "pair_unavailable_reason", "DEVICE_ENV", "WEIGHTS_DIR_ENV", "weights_dir_default", "model_lock", "models_locked",
    "pair_names",
]

log = logging.getLogger(__name__)

UNTRAINED_PAIR = "untrained"
#: The paper's own ResNet-50 pair on ImageNet (:mod:`cbam_viz.imagenet_pair`; same name there).
IMAGENET_PAIR = "resnet50-imagenet"
DEVICE_ENV = "CBAM_VIZ_DEVICE"
_UNTRAINED_INPUT = 224
_UNTRAINED_SEED = 0
_CACHE_SIZE = 6  # a few pairs' worth of models; resnet18s are ~45 MB each


_model_locks: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_model_locks_guard = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The one lock of a model object, taken by every pass over it (explanation, attention, faithfulness).

    Hooks live on modules, so a forward that runs while another thread's hooks are attached feeds
    that thread's recorders. Every forward over a model therefore holds this lock; it belongs to
    the module object, so two pairs that share a model (one manifest record in both) share its lock.
    Re-entrant: an explanation that holds it may call helpers that take it again.
    """
    with _model_locks_guard:
        lock = _model_locks.get(model)
        if lock is None:
            lock = _model_locks[model] = threading.RLock()
        return lock


@contextlib.contextmanager
def models_locked(*models: nn.Module) -> Iterator[None]:
    """Hold :func:`model_lock` of every model (each once) for the ``with`` block.

    The locks are taken in one global order (by object id), so two threads locking the same
    models, whatever order they name them in, cannot deadlock.
    """
    unique = {id(m): m for m in models}
    with contextlib.ExitStack() as stack:
        for key in sorted(unique):
            stack.enter_context(model_lock(unique[key]))
        yield


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
    ood: Any = None           # cbam_viz.ood.OODStats, or NoStats saying why not (None: not looked for)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def lock(self) -> threading.RLock:
        """:func:`model_lock` of this model: hold it around every forward."""
        return model_lock(self.model)


@dataclass(frozen=True)
class ModelPair:
    name: str
    baseline: LoadedModel
    cbam: LoadedModel

    @property
    def trained(self) -> bool:
        return self.baseline.trained and self.cbam.trained


class ModelLoadError(RuntimeError):
    """One model of a pair could not be loaded (missing file, corrupted file, wrong architecture).

    Attributes:
        model_name: the manifest record that failed.
        file: the weights file involved (a path), or None if the record itself is missing.
        pair: the pair being loaded, if any.
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
    (:func:`cbam_viz.weights.resolve_weights_dir`, the one default)."""
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


def _untrained_model(arch: str, device: torch.device) -> LoadedModel:
    from cbam_viz.models import create_model

    def build() -> LoadedModel:
        # Seeded without disturbing the caller's global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_UNTRAINED_SEED)
            model = create_model(arch, num_classes=len(IMAGENETTE_NAMES))
        return LoadedModel(
            name=f"{arch} (untrained)",
            arch=arch,
            model=model.to(device).eval(),
            classes=tuple(IMAGENETTE_NAMES.values()),
            class_ids=tuple(IMAGENETTE_NAMES),
            mean=tuple(IMAGENET_MEAN),
            std=tuple(IMAGENET_STD),
            input_size=_UNTRAINED_INPUT,
            trained=False,
            record=None,
            device=device,
        )

    return _cached((f"{arch} (untrained)", None, str(device), None), build)


def imagenet_pair(*, weights_dir: str | os.PathLike | None = None, device=None) -> ModelPair:
    """The paper's own pair (:mod:`cbam_viz.imagenet_pair`): torchvision's ResNet-50 vs the official
    ResNet-50-CBAM, 1000 ImageNet classes; both models built once and cached.

    Raises:
        ModelLoadError: a file is missing (the message says what to fetch and from where) or
            cannot be loaded.
    """
    from cbam_viz import imagenet_pair as inet

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
    return ModelPair(name=inet.PAIR_NAME, baseline=_cached(("resnet50", *key), lambda: member(0)),
                     cbam=_cached(("resnet50_cbam", *key), lambda: member(1)))


def untrained_pair(*, device=None) -> ModelPair:
    """A seeded, untrained resnet18 / resnet18_cbam pair on Imagenette's ten classes (``trained=False``)."""
    device = select_device(device)
    return ModelPair(
        name=UNTRAINED_PAIR,
        baseline=_untrained_model("resnet18", device),
        cbam=_untrained_model("resnet18_cbam", device),
    )


# ------------------------------------------------------------------------------------- pairs


def _pair_index(weights_dir) -> dict[str, tuple[Path, dict[str, Any]]]:
    """pair name -> (its folder, its spec) over every weights folder (:func:`weights_dirs`), first wins."""
    index: dict[str, tuple[Path, dict[str, Any]]] = {}
    for folder in weights_dirs(weights_dir):
        for name, spec in read_manifest(folder)["pairs"].items():
            index.setdefault(name, (folder, spec))
    return index


def _pairs(weights_dir) -> dict[str, dict[str, Any]]:
    return {name: spec for name, (_, spec) in _pair_index(weights_dir).items()}


def list_pairs(weights_dir: str | os.PathLike | None = None) -> list[str]:
    """Pair names in manifest order, the default first; empty when there is no manifest."""
    pairs = _pairs(weights_dir)
    default = default_pair_name(weights_dir)
    return ([default] if default else []) + [p for p in pairs if p != default]


def pair_names(weights_dir: str | os.PathLike | None = None) -> list[str]:
    """What a person can pick: the manifest's pairs (default first), the paper's own ImageNet pair
    (:data:`IMAGENET_PAIR`, loadable where its files are), then :data:`UNTRAINED_PAIR`.

    The untrained pair is always offered: it runs without any weights file, and comparing it with
    a trained pair shows what training taught the attention gates. Never raises: a broken
    manifest is logged and leaves the untrained pair only, so the app still starts.
    """
    try:
        names = list_pairs(weights_dir)
    except Exception as err:  # noqa: BLE001  a broken manifest must not stop the app from starting
        log.warning("cannot list pairs: %s", err)
        names = []
    return [n for n in names if n not in (UNTRAINED_PAIR, IMAGENET_PAIR)] + [IMAGENET_PAIR, UNTRAINED_PAIR]


def pair_unavailable_reason(name: str, weights_dir: str | os.PathLike | None = None) -> str | None:
    """One sentence when pair ``name`` cannot load on this machine for want of a file; else None.

    Only the ImageNet pair depends on files the project cannot ship (:mod:`cbam_viz.imagenet_pair`).
    """
    if name != IMAGENET_PAIR:
        return None
    from cbam_viz.imagenet_pair import unavailable_reason

    return unavailable_reason(weights_dir)


def default_pair_name(weights_dir: str | os.PathLike | None = None) -> str | None:
    """The pair marked ``"default": true`` (in the first folder that marks one), else the first one;
    None without pairs."""
    pairs = _pairs(weights_dir)
    for name, spec in pairs.items():
        if isinstance(spec, dict) and spec.get("default"):
            return name
    return next(iter(pairs), None)


def load_pair(
    name: str | None = None,
    *,
    weights_dir: str | os.PathLike | None = None,
    device=None,
) -> ModelPair:
    """Load a pair of models from the manifest (cached).

    Args:
        name: a pair from :func:`list_pairs`; None for the default pair. ``"untrained"`` always
            gives the untrained fallback pair.
        weights_dir: folder of the manifest and the weight files (default: see
            :func:`weights_dir_default`).
        device: see :func:`select_device`.

    Returns:
        The pair; with no manifest or no pairs in it (and ``name`` None), the seeded untrained
        resnet18 pair whose models have ``trained=False``.

    Raises:
        KeyError: ``name`` is not a pair of the manifest (the message lists the known ones).
        ModelLoadError: one of its models cannot be loaded (e.g. a corrupted file, a
            :class:`~cbam_viz.weights.ChecksumError` as ``__cause__``); the message names the
            file, ``.model_name``/``.file``/``.pair`` say which. Other pairs may still load.
    """
    device = select_device(device)
    if name == UNTRAINED_PAIR:
        return untrained_pair(device=device)
    index = _pair_index(weights_dir)
    pairs = {n: spec for n, (_, spec) in index.items()}
    if name == IMAGENET_PAIR and name not in pairs:
        return imagenet_pair(weights_dir=weights_dir_default(weights_dir), device=device)
    if name is None:
        name = default_pair_name(weights_dir)
        if name is None:
            return untrained_pair(device=device)
    if name not in pairs:
        where = ", ".join(str(f / "manifest.json") for f in weights_dirs(weights_dir))
        raise KeyError(f"no pair {name!r} in {where}; known pairs: {', '.join(pairs) or 'none'}")
    weights_dir, spec = index[name]
    loaded = {}
    for role in ("baseline", "cbam"):
        model_name = spec.get(role) if isinstance(spec, dict) else None
        if not model_name:
            raise ModelLoadError(f"pair {name!r} names no {role} model", model_name="", file=None, pair=name)
        try:
            loaded[role] = load_model(model_name, weights_dir=weights_dir, device=device)
        except ModelLoadError as err:
            raise ModelLoadError(
                f"pair {name!r}: {err}", model_name=err.model_name, file=err.file, pair=name
            ) from err.__cause__
    return ModelPair(name=name, baseline=loaded["baseline"], cbam=loaded["cbam"])


def load_available_pairs(
    *, weights_dir: str | os.PathLike | None = None, device=None
) -> tuple[dict[str, ModelPair], dict[str, str]]:
    """Load every pair that can be loaded, so the app stays up when one file is broken.

    Returns:
        ``(pairs, errors)``: pair name -> :class:`ModelPair` for those that loaded (default first;
        the untrained pair when the manifest lists none), and pair name -> error message for
        those that did not.
    """
    loaded: dict[str, ModelPair] = {}
    errors: dict[str, str] = {}
    names = list_pairs(weights_dir)
    for name in names:
        try:
            loaded[name] = load_pair(name, weights_dir=weights_dir, device=device)
        except (ModelLoadError, KeyError) as err:
            errors[name] = str(err)
    if not names:
        loaded[UNTRAINED_PAIR] = untrained_pair(device=device)
    return loaded, errors
