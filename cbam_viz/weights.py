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

from cbam_viz.outputs import atomic_write_bytes, atomic_write_text

__all__ = [
    "WeightRecord", "ChecksumError", "UnsafeCheckpointError", "sha256_file", "read_manifest",
    "update_manifest", "save_safetensors", "load_record", "load_checkpoint_into", "read_state_dict",
    "convert_state_dict", "detect_layout", "infer_model_kwargs", "load_any", "LAYOUTS",
    "recast_record", "DEFAULT_WEIGHTS_DIR", "WEIGHTS_DIR_ENV", "resolve_weights_dir",
]

DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
#: Folder of ``manifest.json`` and the weight files when none is passed (read at each call, so the
#: app, the CLI run from any folder, and tests can point elsewhere without code changes).
WEIGHTS_DIR_ENV = "CBAM_VIZ_WEIGHTS_DIR"


def resolve_weights_dir(weights_dir: str | os.PathLike | None = None) -> Path:
    """The one default of the weights folder, honoured by every loader and command.

    ``weights_dir`` if given, else ``$CBAM_VIZ_WEIGHTS_DIR``, else the repository's ``weights/``
    (found from this file, not from the current directory).
    """
    if weights_dir is not None:
        return Path(weights_dir)
    env = os.environ.get(WEIGHTS_DIR_ENV, "").strip()
    return Path(env) if env else DEFAULT_WEIGHTS_DIR
MANIFEST_NAME = "manifest.json"


class ChecksumError(RuntimeError):
    """A weights file does not match the sha256 its manifest records (corrupted or swapped)."""


class UnsafeCheckpointError(RuntimeError):
    """A ``.pth`` file holds pickled objects beyond tensors and containers (it could run code)."""


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
    atomic_write_bytes(path, save(state, metadata=meta))
    return sha256_file(path)


def load_record(record: WeightRecord, weights_dir: str | os.PathLike | None = None) -> nn.Module:
    """Build the record's architecture and load its file after checking the sha256.

    Raises:
        FileNotFoundError: the file is missing.
        ChecksumError: the file's sha256 differs from the record's.
    """
    from safetensors.torch import load_file

    from cbam_viz.models import create_model

    path = resolve_weights_dir(weights_dir) / record.file
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


# --------------------------------------------------------------------------------------------
# Foreign checkpoints
#
# Three layouts load into our models:
#   "native"     our keys (= torchvision's for the baselines, + "layerX.Y.cbam.{channel,spatial}")
#   "official"   Jongchan/attention-module (the paper's code): "...cbam.ChannelGate.mlp.{1,3}"
#                (index 0 is a Flatten), "...cbam.SpatialGate.spatial.{conv,bn}"
#   "simplified" the popular resnet_cbam.py snippet: "...ca.fc.{0,2}.weight" (1x1 convs without
#                bias; older copies name them fc1/fc2), "...sa.conv1.weight" (no BN, mean-then-max
#                input). It needs a model built with ``cbam_config=SIMPLIFIED``.
# --------------------------------------------------------------------------------------------

LAYOUTS = ("native", "official", "simplified")

_OFFICIAL_RENAMES = (
    (".cbam.ChannelGate.mlp.1.", ".cbam.channel.mlp.0."),
    (".cbam.ChannelGate.mlp.3.", ".cbam.channel.mlp.2."),
    (".cbam.SpatialGate.spatial.conv.", ".cbam.spatial.conv."),
    (".cbam.SpatialGate.spatial.bn.", ".cbam.spatial.bn."),
)
_SIMPLIFIED_RENAMES = (
    (".ca.fc.0.weight", ".cbam.channel.mlp.0.weight"),
    (".ca.fc.2.weight", ".cbam.channel.mlp.2.weight"),
    (".ca.fc1.weight", ".cbam.channel.mlp.0.weight"),
    (".ca.fc2.weight", ".cbam.channel.mlp.2.weight"),
    (".sa.conv1.weight", ".cbam.spatial.conv.weight"),
)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{key: tensor}`` dict, safely.

    safetensors files are read as such; anything else goes through
    ``torch.load(weights_only=True)``, which refuses pickles that would build arbitrary objects
    (and so run code). A ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is unwrapped and a
    DataParallel ``module.`` prefix stripped; key names are otherwise left as they are.

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the pickle holds something other than tensors and containers.
        ValueError: the file is not a checkpoint or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except SafetensorError as e:
            raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    else:
        import pickle

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            # torch's message is long; keep its one informative line.
            import re

            text = str(e)
            found = re.search(r"Unsupported [^.\n]*", text)
            detail = found.group(0).strip() if found else ""
            if "Unsupported global" not in text:
                raise ValueError(f"{path} is not a readable PyTorch checkpoint "
                                 f"(weights_only unpickler: {detail or 'rejected'})") from None
            raise UnsafeCheckpointError(
                f"refusing to load {path}: it is a pickle that would create arbitrary Python objects "
                f"(and could run code), so torch.load(weights_only=True) rejected it ({detail}). "
                f"Re-save it as a plain state_dict or as safetensors."
            ) from None
        except (RuntimeError, EOFError) as e:
            raise ValueError(f"{path} is not a readable PyTorch checkpoint: {e}") from e
    return _unwrap(state, path)


def _unwrap(state: Any, source: str | os.PathLike) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{source} holds no state_dict (got {type(state).__name__})")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != len(state):
        other = [k for k in state if k not in tensors][:5]
        raise ValueError(f"{source}: entries {other} are not tensors; is this a training checkpoint "
                         f"with an unknown wrapper key?")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def detect_layout(state: dict[str, torch.Tensor]) -> str:
    """Which of :data:`LAYOUTS` a (unwrapped) state dict uses; baselines are ``"native"``."""
    for k in state:
        if ".cbam.ChannelGate." in k or ".cbam.SpatialGate." in k:
            return "official"
        if ".ca.fc" in k or ".sa.conv1." in k:
            return "simplified"
    return "native"


def convert_state_dict(state: dict[str, torch.Tensor], *, layout: str | None = None) -> dict[str, torch.Tensor]:
    """Rename (and reshape) a foreign state dict to our key layout.

    Args:
        state: an unwrapped state dict (see :func:`read_state_dict`).
        layout: one of :data:`LAYOUTS`; detected when ``None``.

    Returns:
        A new dict with our keys; the simplified snippet's 1x1-conv MLP weights
        ``(C_out, C_in, 1, 1)`` become ``nn.Linear`` weights ``(C_out, C_in)``.
    """
    layout = layout or detect_layout(state)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; known: {LAYOUTS}")
    if layout == "native":
        return dict(state)
    renames = _OFFICIAL_RENAMES if layout == "official" else _SIMPLIFIED_RENAMES
    out = {}
    for k, v in state.items():
        new = k
        for old_part, new_part in renames:
            if old_part in k:
                new = k.replace(old_part, new_part)
                if layout == "simplified" and ".channel.mlp." in new and v.ndim == 4:
                    v = v.reshape(v.shape[0], v.shape[1])
                break
        out[new] = v
    return out


def infer_model_kwargs(state: dict[str, torch.Tensor], *, layout: str | None = None) -> dict[str, Any]:
    """Builder options a converted-or-not state dict implies: ``num_classes`` and ``cbam_config``.

    The CBAM reduction ratio is read from the first channel MLP (``C // hidden``), so a
    checkpoint made with a ratio other than 16 still loads.
    """
    from dataclasses import replace

    from cbam_viz.models import OFFICIAL, SIMPLIFIED

    layout = layout or detect_layout(state)
    conv = convert_state_dict(state, layout=layout)
    kwargs: dict[str, Any] = {}
    if "fc.weight" in conv:
        kwargs["num_classes"] = int(conv["fc.weight"].shape[0])
    first = next((k for k in conv if k.endswith(".cbam.channel.mlp.0.weight")), None)
    if first is not None:
        hidden, channels = conv[first].shape[:2]
        base = SIMPLIFIED if layout == "simplified" else OFFICIAL
        if layout == "native":
            # Our own files: recognise the simplified variant by its missing BN / MLP bias.
            if not any(k.endswith(".cbam.spatial.bn.weight") for k in conv):
                base = SIMPLIFIED
        kwargs["cbam_config"] = replace(base, reduction=max(1, channels // hidden))
    return kwargs


def _layout_hint(model: nn.Module, layout: str) -> str:
    cfg = getattr(model, "cbam_config", None)
    if layout == "simplified" and (cfg is None or cfg.spatial_bn or cfg.mlp_bias):
        return (" (this is a checkpoint of the simplified resnet_cbam.py snippet: build the *_cbam model "
                "with cbam_config=SIMPLIFIED, or use cbam_viz.weights.load_any)")
    if layout == "official" and (cfg is None or not cfg.spatial_bn):
        return (" (this is an official CBAM checkpoint: use the matching *_cbam architecture with "
                "the default (official) cbam_config)")
    return ""


def load_checkpoint_into(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a checkpoint file of any supported layout into ``model`` strictly.

    Reads our safetensors files, torchvision ``.pth`` state dicts and the official or
    simplified CBAM checkpoints (see :func:`convert_state_dict`); pickles are read with
    ``weights_only=True`` only.

    Raises:
        UnsafeCheckpointError: the pickle would build arbitrary objects.
        RuntimeError: keys or shapes do not fit ``model``; the message names the file and the
            first mismatching keys.
    """
    path = Path(path)
    raw = read_state_dict(path)
    layout = detect_layout(raw)
    state = convert_state_dict(raw, layout=layout)
    try:
        _load_strict(model, state, path)
    except RuntimeError as e:
        hint = _layout_hint(model, layout)
        if hint:
            raise RuntimeError(f"{e}{hint}") from None
        raise
    return model


def load_any(arch: str, path: str | os.PathLike, *, num_classes: int | None = None, **kwargs) -> nn.Module:
    """Build ``arch`` to fit the checkpoint at ``path`` and load it strictly; return it in eval mode.

    ``num_classes`` defaults to the rows of the file's ``fc.weight``; for a ``*_cbam``
    architecture the CBAM variant (official or simplified) and its reduction ratio come from the
    file too. Explicit ``kwargs`` win over what is inferred.

    Example:
        >>> model = load_any("resnet18_cbam", "resnet_cbam_seed.pth")  # doctest: +SKIP
    """
    from cbam_viz.models import create_model

    raw = read_state_dict(path)
    inferred = infer_model_kwargs(raw)
    if num_classes is not None:
        inferred["num_classes"] = num_classes
    if not arch.endswith("_cbam"):
        inferred.pop("cbam_config", None)
    inferred.update(kwargs)
    model = create_model(arch, **inferred)
    load_checkpoint_into(model, path)
    return model.eval()
