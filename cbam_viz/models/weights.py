"""Our own weight files: records, the manifest, safetensors (foreign layouts: :mod:`cbam_viz.models.checkpoints`).

Our own checkpoints are safetensors files listed in ``weights/manifest.json``: each record holds
the file name, its sha256 (verified at load), the architecture, the classes with readable names,
mean/std, the input size, the training recipe and the metrics measured on it. The app reads labels
and preprocessing from here and never hard-codes them (torchvision ``Weights.meta``, timm
``PretrainedCfg``).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cbam_viz.models._registry import build_model
from cbam_viz.models.options import options_to_kwargs
from cbam_viz.outputs import atomic_write_bytes, atomic_write_text
from cbam_viz.resources import SHIPPED_ROOT

__all__ = [
    "WeightRecord", "ChecksumError", "sha256_file", "read_manifest", "update_manifest", "save_safetensors",
    "load_record", "load_state_strict", "recast_record", "DEFAULT_WEIGHTS_DIR", "WEIGHTS_DIR_ENV",
    "resolve_weights_dir", "weights_dirs",
]

DEFAULT_WEIGHTS_DIR = SHIPPED_ROOT / "weights"  # the checkout's weights/, else the installed copy
#: Folder of ``manifest.json`` and the weight files when none is passed (read at each call, so the
#: app, the CLI run from any folder, and tests can point elsewhere without code changes).
WEIGHTS_DIR_ENV = "CBAM_VIZ_WEIGHTS_DIR"


def resolve_weights_dir(weights_dir: str | os.PathLike | None = None) -> Path:
    """The one default of the weights folder, honoured by every loader and command.

    ``weights_dir`` if given, else ``$CBAM_VIZ_WEIGHTS_DIR``, else the repository's ``weights/``
    (found from this file, not from the current directory).
    """
    return weights_dirs(weights_dir)[0]


def weights_dirs(weights_dir: str | os.PathLike | None = None) -> list[Path]:
    """Every folder models are read from, in order (the first is the one written to).

    ``weights_dir`` or ``$CBAM_VIZ_WEIGHTS_DIR`` may name several folders as a path-separator
    list (``/models:/app/weights`` on Linux), so a person's own models appear beside the shipped
    ones; a name found in an earlier folder hides the same name in a later one. Without either,
    the repository's ``weights/``.
    """
    text = str(weights_dir) if weights_dir is not None else os.environ.get(WEIGHTS_DIR_ENV, "").strip()
    folders = [Path(part) for part in text.split(os.pathsep) if part.strip()] if text else []
    return folders or [DEFAULT_WEIGHTS_DIR]
MANIFEST_NAME = "manifest.json"


class ChecksumError(RuntimeError):
    """A weights file does not match the sha256 its manifest records (corrupted or swapped)."""


@dataclass
class WeightRecord:
    """Everything needed to rebuild, preprocess for and label one trained model."""

    name: str
    file: str
    arch: str
    sha256: str
    num_params: int
    classes: list[dict[str, str]]  # [{"id": "n01440764", "name": "tench"}, ...]
    mean: list[float]
    std: list[float]
    input_size: int
    recipe: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    # A variant's builder options as JSON (cbam_viz.models.options); {} = the registered default.
    arch_options: dict[str, Any] = field(default_factory=dict)
    # Where a model added with `add-model` came from (file name, sha256, layout detected).
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.classes]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(weights_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The manifest as a dict ``{"models": {name: record}, "pairs": {...}}``; empty if absent."""
    path = resolve_weights_dir(weights_dir) / MANIFEST_NAME
    if not path.exists():
        return {"models": {}, "pairs": {}}
    data = json.loads(path.read_text())
    data.setdefault("models", {})
    data.setdefault("pairs", {})
    return data


def update_manifest(weights_dir: str | os.PathLike, *, record: WeightRecord | None = None,
                    metrics: tuple[str, dict[str, Any]] | None = None,
                    pair: tuple[str, dict[str, Any]] | None = None,
                    lineup: tuple[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Add or replace a record, merge metrics into one, or set a pair or a lineup; written atomically.

    A pair or lineup marked ``"default": True`` takes the mark from every other one of its kind.
    """
    weights_dir = Path(weights_dir)
    weights_dir.mkdir(parents=True, exist_ok=True)
    data = read_manifest(weights_dir)
    if record is not None:
        data["models"][record.name] = record.to_json()
    if metrics is not None:
        name, values = metrics
        if name not in data["models"]:
            raise KeyError(f"no model {name!r} in {weights_dir / MANIFEST_NAME}")
        data["models"][name].setdefault("metrics", {}).update(values)
    if pair is not None:
        if pair[1].get("default"):
            for other in data["pairs"].values():
                if isinstance(other, dict):
                    other["default"] = False
        data["pairs"][pair[0]] = pair[1]
    if lineup is not None:
        lineups = data.setdefault("lineups", {})
        if lineup[1].get("default"):
            for other in lineups.values():
                other["default"] = False
        lineups[lineup[0]] = lineup[1]
    atomic_write_text(weights_dir / MANIFEST_NAME, json.dumps(data, indent=2) + "\n")
    return data


def save_safetensors(model: nn.Module, path: str | os.PathLike, *,
                     dtype: torch.dtype | None = torch.float16) -> str:
    """Write the model's state_dict as safetensors (atomically); return the file's sha256.

    Floating tensors are stored as ``dtype`` (float16 by default: a ResNet-18 has 11.7 M
    parameters, 45 MiB in float32 but 22 MiB in float16, under the 25 MB a shipped file may
    weigh). Loading copies them back into the float32 model, so inference stays float32.
    Pass ``dtype=None`` to keep each tensor's own dtype.

    Raises:
        ValueError: a value does not fit ``dtype`` (it would become inf).
    """
    from safetensors.torch import save

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            cast = v.to(dtype)
            if not torch.isfinite(cast).all() and torch.isfinite(v).all():
                raise ValueError(f"{k} has values outside the {dtype} range; save with dtype=None")
            v = cast
        state[k] = v.contiguous()
    meta = {"format": "pt"}
    if dtype is not None:
        meta["storage_dtype"] = str(dtype).removeprefix("torch.")
    atomic_write_bytes(path, _canonical_header(save(state, metadata=meta)))
    return sha256_file(path)


def _canonical_header(blob: bytes) -> bytes:
    """The same safetensors file with its JSON header written in one fixed order.

    The safetensors library keeps the metadata in a Rust hash map, so two saves of the same tensors
    can order its keys differently and get different sha256s. Re-dumping the header with sorted
    keys (the tensor offsets are relative to the data, which is unchanged) makes equal weights
    give equal files.
    """
    n = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header with spaces to 8 bytes
    return len(header).to_bytes(8, "little") + header + blob[8 + n:]


def load_record(record: WeightRecord, weights_dir: str | os.PathLike | None = None) -> nn.Module:
    """Build the record's architecture and load its file after checking the sha256.

    Raises:
        FileNotFoundError: the file is missing.
        ChecksumError: the file's sha256 differs from the record's.
    """
    from safetensors.torch import load_file

    path = resolve_weights_dir(weights_dir) / record.file
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} listed in the manifest is missing")
    digest = sha256_file(path)
    if digest != record.sha256:
        raise ChecksumError(
            f"weights file {path} is corrupted or was replaced: sha256 {digest[:12]}... "
            f"but the manifest records {record.sha256[:12]}..."
        )
    model = build_model(record.arch, num_classes=record.num_classes, **options_to_kwargs(record.arch_options))
    load_state_strict(model, load_file(str(path)), path)
    return model.eval()


def recast_record(weights_dir: str | os.PathLike, name: str, *,
                  dtype: torch.dtype | None = torch.float16) -> WeightRecord:
    """Re-write one record's file with floating tensors stored as ``dtype``; update its sha256.

    For files exported as float32 (45 MB for a ResNet-18) that must ship under 25 MB. The file
    is checked against its old sha256 first, re-written atomically, and the manifest record's
    ``sha256`` replaced; everything else in the record (metrics included) is kept, so re-run
    ``python -m cbam_viz evaluate --update-manifest`` to measure the file as it now ships.
    """
    data = read_manifest(weights_dir)
    if name not in data["models"]:
        raise KeyError(f"no model {name!r} in {Path(weights_dir) / MANIFEST_NAME}")
    record = WeightRecord(**data["models"][name])
    model = load_record(record, weights_dir)
    record.sha256 = save_safetensors(model, Path(weights_dir) / record.file, dtype=dtype)
    update_manifest(weights_dir, record=record)
    return record


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """``model.load_state_dict(state, strict=True)`` with a message naming the file and the first
    missing, unexpected or mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}")
        if shape:
            parts.append(f"shape mismatches {shape[:5]}")
        raise RuntimeError(f"checkpoint {source} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
