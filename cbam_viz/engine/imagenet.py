"""The paper's own pair, where the files can be had: ResNet-50 vs ResNet-50-CBAM on ImageNet's 1000 classes.

The shipped pair (:mod:`cbam_viz.training.train`) is trained here on Imagenette's 10 classes. CBAM's
authors trained ResNet-50-CBAM on the full ImageNet for 100 epochs (77.62 % top-1) and published
the checkpoint from their repository; torchvision publishes the matching baseline
(``ResNet50_Weights.IMAGENET1K_V1``, 76.13 %). Neither file may ship with this project, so:

* the baseline comes through torchvision's own weights API, which downloads it once into the
  torch hub cache (``$TORCH_HOME``) on a machine with network, and reads it from there after;
* the CBAM checkpoint is fetched by the user from the official repository's README link and found
  at ``$CBAM_VIZ_OFFICIAL_CBAM50`` or as ``weights/RESNET50_CBAM_new_name_wrap.pth``.

Without the CBAM file (or offline, before the baseline is cached) the pair is *unavailable* and
:func:`unavailable_reason` says in one sentence what to fetch and from where; the default pair
is unaffected. The 1000 class names come from torchvision's weights metadata (no download).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from cbam_viz.models.checkpoints import load_any
from cbam_viz.models.factory import create_model
from cbam_viz.models.weights import WeightRecord, load_state_strict, resolve_weights_dir

__all__ = ["PAIR_NAME", "OFFICIAL_ENV", "OFFICIAL_FILE", "OFFICIAL_SOURCE", "official_checkpoint",
           "unavailable_reason", "imagenet_classes", "baseline_state_dict", "build_models", "records"]

PAIR_NAME = "resnet50-imagenet"
#: Environment variable naming the official ResNet-50-CBAM checkpoint file.
OFFICIAL_ENV = "CBAM_VIZ_OFFICIAL_CBAM50"
#: The checkpoint's name as the official repository publishes it (looked for in the weights folder).
OFFICIAL_FILE = "RESNET50_CBAM_new_name_wrap.pth"
OFFICIAL_SOURCE = "the 'ResNet50+CBAM' checkpoint link in the README of github.com/Jongchan/attention-module"
INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: ImageNet val top-1 as each file's authors report it (torchvision's weights table; the official README).
REPORTED_TOP1 = {"resnet50": 0.76130, "resnet50_cbam": 0.77622}


def official_checkpoint(weights_dir: str | os.PathLike | None = None) -> Path | None:
    """The official ResNet-50-CBAM file: ``$CBAM_VIZ_OFFICIAL_CBAM50``, else in the weights folder; None if absent."""
    env = os.environ.get(OFFICIAL_ENV, "").strip()
    candidates = [Path(env)] if env else []
    candidates.append(resolve_weights_dir(weights_dir) / OFFICIAL_FILE)
    return next((p for p in candidates if p.is_file()), None)


def _torchvision_weights():
    from torchvision.models import ResNet50_Weights

    return ResNet50_Weights.IMAGENET1K_V1


def _baseline_cached() -> bool:
    name = os.path.basename(_torchvision_weights().url)
    return (Path(torch.hub.get_dir()) / "checkpoints" / name).is_file()


def unavailable_reason(weights_dir: str | os.PathLike | None = None) -> str | None:
    """None when the pair can load here; otherwise one sentence saying what to fetch and from where."""
    if official_checkpoint(weights_dir) is None:
        found = " (the file it names does not exist)" if os.environ.get(OFFICIAL_ENV, "").strip() else ""
        return (f"The {PAIR_NAME} lineup needs the official ResNet-50-CBAM checkpoint: download {OFFICIAL_FILE} "
                f"from {OFFICIAL_SOURCE}, then set {OFFICIAL_ENV}=<file>{found} or put it in the weights folder.")
    return None


def imagenet_classes() -> tuple[str, ...]:
    """ImageNet's 1000 class names, in index order, from torchvision's weights metadata (no download)."""
    return tuple(_torchvision_weights().meta["categories"])


def baseline_state_dict() -> dict[str, torch.Tensor]:
    """torchvision's ResNet-50 ImageNet weights, through its weights API (cached after one download).

    Raises:
        RuntimeError: not cached and the download failed (offline): the message says what to do.
    """
    weights = _torchvision_weights()
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError, ValueError) as err:  # URLError is an OSError; a bad hash a RuntimeError
        cached = "" if _baseline_cached() else " (not in the torch hub cache yet)"
        raise RuntimeError(
            f"torchvision's ResNet-50 ImageNet weights could not be loaded{cached}: {err}. Run once on a "
            f"machine with network (torchvision downloads {weights.url} into {torch.hub.get_dir()}), or copy "
            "that file there."
        ) from err


def build_models(weights_dir: str | os.PathLike | None = None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(resnet50, resnet50_cbam)`` in eval mode, loaded strictly from the two files.

    Raises:
        FileNotFoundError: the official checkpoint is missing (:func:`unavailable_reason` says why).
        RuntimeError: the baseline could not be fetched, or a file does not fit the architecture.
    """
    reason = unavailable_reason(weights_dir)
    if reason:
        raise FileNotFoundError(reason)
    baseline = create_model("resnet50", num_classes=1000)
    load_state_strict(baseline, baseline_state_dict(), _torchvision_weights().url)
    cbam = load_any("resnet50_cbam", official_checkpoint(weights_dir), num_classes=1000)
    return baseline.eval(), cbam.eval()


def records(baseline: torch.nn.Module, cbam: torch.nn.Module,
            weights_dir: str | os.PathLike | None = None) -> tuple[WeightRecord, WeightRecord]:
    """Weight records for the two foreign files, so the app's model card describes them like ours."""
    classes = [{"id": str(i), "name": name} for i, name in enumerate(imagenet_classes())]
    url = _torchvision_weights().url
    common = dict(classes=classes, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), input_size=INPUT_SIZE)
    base = WeightRecord(
        name="resnet50 (torchvision IMAGENET1K_V1)", file=url, arch="resnet50",
        sha256=os.path.basename(url).split("-")[-1].split(".")[0], num_params=sum(p.numel() for p in baseline.parameters()),
        training={"source": "torchvision", "data": "ImageNet-1k train (1.28 M images)"},
        metrics={"reported_imagenet_top1": REPORTED_TOP1["resnet50"]}, **common)
    official = official_checkpoint(weights_dir)
    cb = WeightRecord(
        name="resnet50_cbam (official, Woo et al.)", file=str(official), arch="resnet50_cbam", sha256="",
        num_params=sum(p.numel() for p in cbam.parameters()),
        training={"source": "Jongchan/attention-module", "data": "ImageNet-1k train, 100 epochs"},
        metrics={"reported_imagenet_top1": REPORTED_TOP1["resnet50_cbam"]}, **common)
    return base, cb
