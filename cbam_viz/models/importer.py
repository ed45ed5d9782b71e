"""Bring your own model: a checkpoint file in, a weights record (ours) out, with what was found.

People arrive with a ResNet, CBAM, SE or BAM model trained by torchvision, timm, the official
CBAM/BAM code (Jongchan/attention-module, DataParallel checkpoints) or the popular
``resnet_cbam.py`` snippet. :func:`detect` reads the architecture from the keys and shapes alone
(depth from the block counts, basic or bottleneck blocks, the attention and its variant, the
ImageNet or CIFAR stem, the number of classes); :func:`add_model` loads the file strictly into that
architecture and writes our safetensors file and a manifest record, so every command and the page
can use it like a shipped model.

The file is read safely (:func:`cbam_viz.models.checkpoints.read_state_dict`: safetensors, or
``torch.load(weights_only=True)``, which refuses a pickle that would run code). The manifest is the
commit point: the new file is written first under a name of its own, then the manifest, atomically;
an interrupted ``add-model`` leaves the manifest as it was.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cbam_viz.models.checkpoints import convert_state_dict, detect_layout, infer_model_kwargs, read_state_dict
from cbam_viz.models import backbone_of, create_model, is_model
from cbam_viz.models.options import kwargs_to_options, options_to_kwargs
from cbam_viz.models.weights import (
    MANIFEST_NAME, WeightRecord, load_state_strict, read_manifest, save_safetensors, update_manifest,
)

__all__ = ["Detection", "detect", "read_classes", "add_model", "add_lineup", "MAX_LINEUP", "NAME_PATTERN", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Record names become file names and dropdown entries: keep them plain.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# block counts per stage -> depth, for basic and bottleneck blocks (He et al., 2016, Table 1)
_DEPTHS = {
    (False, (2, 2, 2, 2)): 18, (False, (3, 4, 6, 3)): 34,
    (True, (3, 4, 6, 3)): 50, (True, (3, 4, 23, 3)): 101, (True, (3, 8, 36, 3)): 152,
}
_LAYOUT_NAMES = {
    "native": "ours / torchvision / timm keys",
    "official": "the official CBAM code (Jongchan/attention-module)",
    "official_bam": "the official BAM code (Jongchan/attention-module)",
    "simplified": "the resnet_cbam.py snippet",
}


@dataclass(frozen=True)
class Detection:
    """What a checkpoint holds, read from its keys and shapes."""

    arch: str
    num_classes: int
    layout: str
    options: dict[str, Any] = field(default_factory=dict)  # record arch_options (JSON)
    blocks: tuple[int, ...] = ()
    bottleneck: bool = False

    def lines(self) -> list[str]:
        """What was found, a line each, for the CLI and the page."""
        opts = self.options
        attention = ("CBAM" if "_cbam" in self.arch else "SE" if "_se" in self.arch
                     else "BAM" if "_bam" in self.arch else "none (plain ResNet)")
        return [
            f"architecture: {self.arch} ({'bottleneck' if self.bottleneck else 'basic'} blocks "
            f"{'-'.join(map(str, self.blocks))})",
            f"attention: {attention}" + (f", options {json.dumps({k: v for k, v in opts.items() if k != 'stem'})}"
                                         if set(opts) - {"stem"} else ""),
            f"stem: {opts.get('stem', 'imagenet')}",
            f"classes: {self.num_classes}",
            f"key layout: {_LAYOUT_NAMES[self.layout]}",
        ]


def _block_counts(state: dict[str, torch.Tensor]) -> tuple[int, ...]:
    counts = []
    for stage in range(1, 5):
        found = {int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        counts.append(max(found) + 1 if found else 0)
    return tuple(counts)


def detect(state: dict[str, torch.Tensor]) -> Detection:
    """The registered architecture and options that fit an (unwrapped) state dict.

    Raises:
        ValueError: not a ResNet, a depth or attention this project does not build, or an unknown
            layout; the message names the first keys that did not fit.
    """
    layout = detect_layout(state)
    conv = convert_state_dict(state, layout=layout)
    needed = ["conv1.weight", "fc.weight", "layer1.0.conv1.weight", "layer4.0.conv1.weight"]
    if any(k not in conv for k in needed):
        missing = [k for k in needed if k not in conv]
        raise ValueError(f"not a ResNet checkpoint this tool reads: no {', '.join(missing)} "
                         f"(first keys: {', '.join(list(state)[:6])})")
    bottleneck = "layer1.0.conv3.weight" in conv
    blocks = _block_counts(conv)
    depth = _DEPTHS.get((bottleneck, blocks))
    if depth is None:
        raise ValueError(f"a ResNet with {'bottleneck' if bottleneck else 'basic'} blocks {list(blocks)} per stage "
                         f"is none of ResNet-18/34/50/101/152")
    kinds = [suffix for suffix, marker in (("_cbam", ".cbam.channel."), ("_se", ".se.fc1."), ("_bam", "bam1."))
             if any(marker in k or k.startswith(marker) for k in conv)]
    if len(kinds) > 1:
        raise ValueError(f"the checkpoint mixes attention modules ({', '.join(k[1:] for k in kinds)}); one per model")
    arch = f"resnet{depth}{kinds[0] if kinds else ''}"
    if not is_model(arch):
        raise ValueError(f"found {arch}, which this project does not build (SE and BAM: ResNet-18/34/50)")
    with torch.device("meta"):  # the key names only: no memory, no weight initialisation
        own_keys = set(create_model(arch, num_classes=1).state_dict())
    stray = [k for k in conv if k not in own_keys]
    if stray:
        raise ValueError(f"keys of an unknown layout: {', '.join(stray[:5])} (a {arch} has none of them)")
    kwargs = infer_model_kwargs(state, layout=layout)
    num_classes = int(kwargs.pop("num_classes"))
    return Detection(arch, num_classes, layout, kwargs_to_options(kwargs), blocks, bottleneck)


def read_classes(source: str | os.PathLike | None, num_classes: int) -> list[dict[str, str]]:
    """Class records ``[{"id", "name"}]`` from a text file, a JSON list or ``{index: name}``, or an ImageFolder.

    Without a source the classes are "class 0" .. "class N-1".

    Raises:
        ValueError: no such file or folder, an unreadable file, or a count other than ``num_classes``.
    """
    if source is None:
        return [{"id": str(i), "name": f"class {i}"} for i in range(num_classes)]
    path = Path(source)
    if path.is_dir():
        names = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        what = f"folder {path} (its sub-folders, sorted, as torchvision's ImageFolder numbers them)"
    elif path.is_file():
        names = _names_from_file(path)
        what = f"file {path}"
    else:
        raise ValueError(f"--classes {str(path)!r}: no such file or folder")
    if len(names) != num_classes:
        raise ValueError(f"the {what} gives {len(names)} classes but the checkpoint's fc layer has {num_classes} rows")
    return [{"id": str(n), "name": str(n)} for n in names]


def _names_from_file(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--classes {str(path)!r}: not a readable text file ({err})") from None
    if path.suffix.lower() == ".json" or text.lstrip()[:1] in ("[", "{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"--classes {str(path)!r}: not valid JSON ({err})") from None
        if isinstance(data, list) and all(isinstance(n, str) for n in data):
            return data
        if isinstance(data, dict):
            try:
                index = {int(k): str(v) for k, v in data.items()}
            except ValueError:
                index = {}
            if index and sorted(index) == list(range(len(index))):
                return [index[i] for i in range(len(index))]
        raise ValueError(f"--classes {str(path)!r}: want a JSON list of names or {{index: name}} with indices "
                         f"0..N-1")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _check_weights_dir(weights_dir: Path) -> None:
    if not weights_dir.is_dir():
        raise ValueError(f"weights folder {str(weights_dir)!r} does not exist; create it first")
    if not os.access(weights_dir, os.W_OK):
        raise ValueError(f"weights folder {str(weights_dir)!r} is not writable")


def add_model(checkpoint: str | os.PathLike, *, name: str, weights_dir: str | os.PathLike, arch: str = "auto",
              classes: str | os.PathLike | None = None, input_size: int | None = None,
              mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
              replace: bool = False) -> tuple[WeightRecord, Detection]:
    """Convert ``checkpoint`` into our safetensors file + a manifest record in ``weights_dir``.

    Raises:
        UnsafeCheckpointError: a pickle that would run code (nothing it holds is executed).
        FileNotFoundError: no such checkpoint.
        ValueError: every other refusal (not a checkpoint, not a ResNet, classes that do not match,
            a name already taken without ``replace``, a missing or read-only folder), one sentence.
    """
    weights_dir = Path(weights_dir)
    if not NAME_PATTERN.match(name):
        raise ValueError(f"--name {name!r}: use letters, digits, '_', '-' and '.', up to 64 characters")
    if input_size is not None and not 8 <= int(input_size) <= 2048:
        raise ValueError(f"--input-size wants a size in pixels from 8 to 2048, got {input_size}")
    _check_weights_dir(weights_dir)
    old = read_manifest(weights_dir)["models"].get(name)
    if old is not None and not replace:
        raise ValueError(f"a model named {name!r} is already in {weights_dir / MANIFEST_NAME}; "
                         f"choose another --name or pass --replace")
    raw = read_state_dict(checkpoint)
    found = detect(raw)
    if arch not in ("auto", found.arch):
        raise ValueError(f"--arch {arch}: the checkpoint is a {found.arch}")
    class_records = read_classes(classes, found.num_classes)
    model = create_model(found.arch, num_classes=found.num_classes, **options_to_kwargs(found.options))
    load_state_strict(model, convert_state_dict(raw, layout=found.layout), checkpoint)
    size = input_size or (32 if found.options.get("stem") == "cifar" else 224)
    mean, std = _stats(mean, IMAGENET_MEAN, "mean"), _stats(std, IMAGENET_STD, "std")
    # Written under a name of its own, so the file a current record points to is never touched.
    tmp = weights_dir / f".{name}.adding.safetensors"
    digest = save_safetensors(model.eval(), tmp, dtype=None)  # exact: the logits equal the source model's
    file = f"{name}-{digest[:8]}.safetensors"
    os.replace(tmp, weights_dir / file)
    record = WeightRecord(
        name=name, file=file, arch=found.arch, sha256=digest,
        num_params=sum(p.numel() for p in model.parameters()), classes=class_records,
        mean=list(mean), std=list(std), input_size=int(size), arch_options=found.options,
        source={"file": Path(checkpoint).name, "layout": found.layout, "added_with": "add-model"})
    update_manifest(weights_dir, record=record)
    if old is not None and old.get("file") != file and (weights_dir / old["file"]).is_file():
        (weights_dir / old["file"]).unlink()
    return record, found


def _stats(values, default, what: str) -> tuple[float, ...]:
    if values is None:
        return tuple(default)
    values = tuple(float(v) for v in values)
    if len(values) != 3 or (what == "std" and min(values) <= 0):
        raise ValueError(f"--{what} wants three numbers R,G,B{' > 0' if what == 'std' else ''}, got {values}")
    return values


MAX_LINEUP = 4


def add_lineup(name: str, members: list[str], *, weights_dir: str | os.PathLike, reference: str | None = None,
               default: bool = False) -> dict[str, Any]:
    """Write a lineup (1 to 4 models of one folder, one of them the reference) into the manifest.

    The reference defaults to the plain ResNet member, else the first. A lineup of one plain
    ResNet and one CBAM model is also written as a pair, so pages that know only pairs show it.

    Raises:
        ValueError: a bad name, an unknown or repeated member, too many, classes that differ.
    """
    weights_dir = Path(weights_dir)
    if not NAME_PATTERN.match(name):
        raise ValueError(f"lineup name {name!r}: use letters, digits, '_', '-' and '.', up to 64 characters")
    _check_weights_dir(weights_dir)
    models = read_manifest(weights_dir)["models"]
    if not 1 <= len(members) <= MAX_LINEUP or len(set(members)) != len(members):
        raise ValueError(f"a lineup holds 1 to {MAX_LINEUP} different models, got {members}")
    unknown = [m for m in members if m not in models]
    if unknown:
        raise ValueError(f"no model {', '.join(map(repr, unknown))} in {weights_dir / MANIFEST_NAME} "
                         f"(known: {', '.join(sorted(models)) or 'none'}; add one with add-model)")
    ids = {m: [c["id"] for c in models[m]["classes"]] for m in members}
    if len({tuple(v) for v in ids.values()}) > 1:
        raise ValueError(f"the models of a lineup must share their classes, in one order; "
                         f"{', '.join(f'{m}: {len(v)} classes' for m, v in ids.items())}")
    plain = [m for m in members if backbone_of(models[m]["arch"]) == models[m]["arch"]]
    reference = reference or (plain[0] if plain else members[0])
    if reference not in members:
        raise ValueError(f"--reference {reference!r} is not one of the lineup's models {members}")
    entry = {"members": list(members), "reference": reference, "default": bool(default)}
    update_manifest(weights_dir, lineup=(name, entry))
    cbam = [m for m in members if models[m]["arch"].endswith("_cbam")]
    if len(members) == 2 and len(plain) == 1 and len(cbam) == 1:
        update_manifest(weights_dir, pair=(name, {"baseline": plain[0], "cbam": cbam[0], "default": bool(default)}))
    return entry
