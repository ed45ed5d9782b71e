"""Checkpoints in foreign layouts: torchvision, the official CBAM code, the simplified snippet.

Our own files (:mod:`cbam_viz.models.weights`) are safetensors with a manifest record. Everything else a
user may bring — a torchvision ``.pth``, the paper's Jongchan/attention-module checkpoint, the popular
``resnet_cbam.py`` snippet's — is read here safely (``weights_only=True``; safetensors as such),
unwrapped, renamed to our keys and loaded strictly, with the layout detected from the key names.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cbam_viz.models._registry import build_model
from cbam_viz.models.bam import BAMConfig
from cbam_viz.models.cbam import OFFICIAL, SIMPLIFIED
from cbam_viz.models.se import se_hidden
from cbam_viz.models.weights import load_state_strict

__all__ = [
    "UnsafeCheckpointError", "LAYOUTS", "read_state_dict", "detect_layout", "convert_state_dict",
    "infer_model_kwargs", "load_checkpoint_into", "load_any",
]


class UnsafeCheckpointError(RuntimeError):
    """A ``.pth`` file holds pickled objects beyond tensors and containers (it could run code)."""


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

#   "official_bam" the official BAM code (same repository, MODELS/bam.py): "bamN.channel_att.gate_c.
#                gate_c_fc_0", "...gate_c_bn_1", "...gate_c_fc_final", "bamN.spatial_att.gate_s.
#                gate_s_conv_reduce0" ... "gate_s_conv_final". It joins the branches by a product.
# SE-ResNets in timm's layout ("layerX.Y.se.fc1/fc2") are "native".
# --------------------------------------------------------------------------------------------

LAYOUTS = ("native", "official", "simplified", "official_bam")

_OFFICIAL_RENAMES = (
    (".cbam.ChannelGate.mlp.1.", ".cbam.channel.mlp.0."),
    (".cbam.ChannelGate.mlp.3.", ".cbam.channel.mlp.2."),
    (".cbam.SpatialGate.spatial.conv.", ".cbam.spatial.conv."),
    (".cbam.SpatialGate.spatial.bn.", ".cbam.spatial.bn."),
)
_OFFICIAL_BAM_RENAMES = (
    (".channel_att.gate_c.gate_c_fc_0.", ".channel.fc1."),
    (".channel_att.gate_c.gate_c_bn_1.", ".channel.bn."),
    (".channel_att.gate_c.gate_c_fc_final.", ".channel.fc2."),
    (".spatial_att.gate_s.gate_s_conv_reduce0.", ".spatial.reduce."),
    (".spatial_att.gate_s.gate_s_bn_reduce0.", ".spatial.reduce_bn."),
    (".spatial_att.gate_s.gate_s_conv_di_0.", ".spatial.dilated1."),
    (".spatial_att.gate_s.gate_s_bn_di_0.", ".spatial.dilated1_bn."),
    (".spatial_att.gate_s.gate_s_conv_di_1.", ".spatial.dilated2."),
    (".spatial_att.gate_s.gate_s_bn_di_1.", ".spatial.dilated2_bn."),
    (".spatial_att.gate_s.gate_s_conv_final.", ".spatial.final."),
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

        with open(path, "rb") as f:
            magic = f.read(4)
        # torch.save writes a zip (PK..) or, before torch 1.6, a binary pickle (protocol 2+: 0x80).
        # Anything else is no checkpoint, even where it happens to parse as a text-protocol pickle.
        if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):
            raise ValueError(f"{path} is not a PyTorch checkpoint (neither a torch.save zip nor a pickle)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            # torch's message is long; keep its one informative line.
            import re

            text = str(e)
            # torch words it "Unsupported global: GLOBAL x.y" or, for a blocked module such as os,
            # "Trying to load unsupported GLOBAL posix.system whose module posix is blocked".
            found = re.search(r"unsupported global[^\n]*", text, re.IGNORECASE)
            detail = found.group(0).strip().rstrip(".") if found else ""
            if not found:
                unsupported = re.search(r"Unsupported [^.\n]*", text)
                raise ValueError(f"{path} is not a readable PyTorch checkpoint (weights_only unpickler: "
                                 f"{unsupported.group(0).strip() if unsupported else 'rejected'})") from None
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
        if ".channel_att.gate_c." in k or ".spatial_att.gate_s." in k:
            return "official_bam"
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
    renames = {"official": _OFFICIAL_RENAMES, "official_bam": _OFFICIAL_BAM_RENAMES}.get(layout, _SIMPLIFIED_RENAMES)
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
    """Builder options a converted-or-not state dict implies: ``num_classes``, ``cbam_config``,
    ``se_reduction`` / ``se_divisor``, ``bam_config`` and ``stem`` (``"cifar"`` for a 3x3 first conv).

    The CBAM reduction ratio is read from the first channel MLP (``C // hidden``), so a
    checkpoint made with a ratio other than 16 still loads.
    """
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
    if conv.get("conv1.weight") is not None and conv["conv1.weight"].shape[-1] == 3:
        kwargs["stem"] = "cifar"
    se = _se_options(conv)
    if se:
        kwargs["se_reduction"], kwargs["se_divisor"] = se
    bam = conv.get("bam1.channel.fc1.weight")
    if bam is not None:

        kwargs["bam_config"] = BAMConfig(reduction=max(1, bam.shape[1] // bam.shape[0]),
                                         join="product" if layout == "official_bam" else "sum")
    return kwargs


def _se_options(conv: dict[str, torch.Tensor]) -> tuple[int, int] | None:
    """(reduction, divisor) that give every SE block of ``conv`` its hidden width, or None without SE.

    The paper's ``C // r`` is tried first, then timm's rounding to multiples of 8 (``make_divisible``).
    """

    shapes = [v.shape[:2] for k, v in conv.items() if k.endswith(".se.fc1.weight")]
    if not shapes:
        return None
    hidden, channels = shapes[0]
    for reduction, divisor in ((max(1, channels // hidden), 1), (16, 8), (max(1, channels // hidden), 8)):
        if all(se_hidden(c, reduction, divisor) == h for h, c in shapes):
            return reduction, divisor
    raise ValueError(f"the SE blocks' hidden widths {[int(h) for h, _ in shapes]} follow no reduction ratio "
                     f"this loader knows (C // r, or timm's multiples of 8)")


def _layout_hint(model: nn.Module, layout: str) -> str:
    cfg = getattr(model, "cbam_config", None)
    if layout == "simplified" and (cfg is None or cfg.spatial_bn or cfg.mlp_bias):
        return (" (this is a checkpoint of the simplified resnet_cbam.py snippet: build the *_cbam model "
                "with cbam_config=SIMPLIFIED, or use cbam_viz.models.checkpoints.load_any)")
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
        load_state_strict(model, state, path)
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

    raw = read_state_dict(path)
    inferred = infer_model_kwargs(raw)
    if num_classes is not None:
        inferred["num_classes"] = num_classes
    for suffix, option in (("_cbam", "cbam_config"), ("_se", "se_reduction"), ("_se", "se_divisor"),
                           ("_bam", "bam_config")):
        if not arch.endswith(suffix):
            inferred.pop(option, None)
    inferred.update(kwargs)
    model = build_model(arch, **inferred)
    load_checkpoint_into(model, path)
    return model.eval()
