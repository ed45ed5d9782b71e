"""Weight records and checkpoint loading.

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

__all__ = [
    "WeightRecord", "ChecksumError", "sha256_file", "read_manifest", "update_manifest",
    "save_safetensors", "load_record", "load_checkpoint_into", "DEFAULT_WEIGHTS_DIR",
]

DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
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


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_manifest(weights_dir: str | os.PathLike = DEFAULT_WEIGHTS_DIR) -> dict[str, Any]:
    """The manifest as a dict ``{"models": {name: record}, "pairs": {...}}``; empty if absent."""
    path = Path(weights_dir) / MANIFEST_NAME
    if not path.exists():
        return {"models": {}, "pairs": {}}
    data = json.loads(path.read_text())
    data.setdefault("models", {})
    data.setdefault("pairs", {})
    return data


def update_manifest(weights_dir: str | os.PathLike, *, record: WeightRecord | None = None,
                    metrics: tuple[str, dict[str, Any]] | None = None,
                    pair: tuple[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Add or replace a record, merge metrics into one, or set a pair; written atomically."""
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
        data["pairs"][pair[0]] = pair[1]
    _atomic_write_text(weights_dir / MANIFEST_NAME, json.dumps(data, indent=2) + "\n")
    return data


def save_safetensors(model: nn.Module, path: str | os.PathLike) -> str:
    """Write the model's state_dict as safetensors (atomically); return the file's sha256."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
    return sha256_file(path)


def load_record(record: WeightRecord, weights_dir: str | os.PathLike = DEFAULT_WEIGHTS_DIR) -> nn.Module:
    """Build the record's architecture and load its file after checking the sha256.

    Raises:
        FileNotFoundError: the file is missing.
        ChecksumError: the file's sha256 differs from the record's.
    """
    from safetensors.torch import load_file

    from cbam_viz.models import create_model

    path = Path(weights_dir) / record.file
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} listed in the manifest is missing")
    digest = sha256_file(path)
    if digest != record.sha256:
        raise ChecksumError(
            f"weights file {path} is corrupted or was replaced: sha256 {digest[:12]}... "
            f"but the manifest records {record.sha256[:12]}..."
        )
    model = create_model(record.arch, num_classes=record.num_classes)
    _load_strict(model, load_file(str(path)), path)
    return model.eval()


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
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


def load_checkpoint_into(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a checkpoint file of any supported layout into ``model`` strictly."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    _load_strict(model, state, path)
    return model
