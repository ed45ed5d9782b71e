"""Model registry: thin builders register themselves under a unique name (timm/torchvision style)."""
from __future__ import annotations

from typing import Callable

from torch import nn

__all__ = ["register_model", "list_models", "build_model", "is_model", "backbone_of"]

_ATTENTION_SUFFIXES = ("_cbam", "_se", "_bam")


def backbone_of(arch: str) -> str:
    """``resnet18_se`` -> ``resnet18``: the plain network an attention twin is built on."""
    for suffix in _ATTENTION_SUFFIXES:
        if arch.endswith(suffix):
            return arch[: -len(suffix)]
    return arch

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its function name. A duplicate name raises ``ValueError``."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    """Names of every registered architecture, sorted."""
    return sorted(_MODELS)


def is_model(name: str) -> bool:
    return name in _MODELS


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a registered architecture with fresh weights (:func:`cbam_viz.models.create_model` also loads a file).

    Args:
        name: a name from :func:`list_models`.
        **kwargs: builder options, e.g. ``num_classes=10`` or ``cbam_config=SIMPLIFIED``.

    Raises:
        KeyError: unknown name (the message lists the known ones).
    """
    if name not in _MODELS:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _MODELS[name](**kwargs)
