"""Builder options as JSON, so a weights record can rebuild a model that is not the default variant.

A record names its architecture (``resnet18_cbam``); a model a user brings may be a variant of it:
the simplified snippet's CBAM, another reduction ratio, timm's SE widths, the official BAM code's
product join, a CIFAR stem. Those choices travel in the record's ``arch_options`` as plain JSON
(``{"stem": "cifar", "cbam": {...}, "se": {...}, "bam": {...}}``) and become builder keyword
arguments here. An empty dict is the default variant, which is what every shipped record holds.
"""
from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

from .bam import BAMConfig
from .cbam import CBAMConfig

__all__ = ["options_to_kwargs", "kwargs_to_options"]


def _dataclass_from(cls, values: Any, what: str):
    if not isinstance(values, dict):
        raise ValueError(f"arch_options.{what} must be an object, got {type(values).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"arch_options.{what} has unknown keys {unknown}; known: {sorted(known)}")
    return cls(**values)


def options_to_kwargs(options: dict[str, Any] | None) -> dict[str, Any]:
    """``arch_options`` of a record -> keyword arguments of the registered builder.

    Raises:
        ValueError: an unknown option or a malformed value (one sentence naming it).
    """
    options = dict(options or {})
    kwargs: dict[str, Any] = {}
    if "stem" in options:
        kwargs["stem"] = options.pop("stem")
    if "cbam" in options:
        kwargs["cbam_config"] = _dataclass_from(CBAMConfig, options.pop("cbam"), "cbam")
    if "se" in options:
        se = options.pop("se")
        if not isinstance(se, dict) or not set(se) <= {"reduction", "divisor"}:
            raise ValueError(f"arch_options.se must be {{'reduction': r, 'divisor': d}}, got {se!r}")
        kwargs["se_reduction"] = int(se.get("reduction", 16))
        kwargs["se_divisor"] = int(se.get("divisor", 1))
    if "bam" in options:
        kwargs["bam_config"] = _dataclass_from(BAMConfig, options.pop("bam"), "bam")
    if options:
        raise ValueError(f"unknown arch_options {sorted(options)}; known: stem, cbam, se, bam")
    return kwargs


def kwargs_to_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`options_to_kwargs`; ``num_classes`` and defaults are left out."""
    options: dict[str, Any] = {}
    if kwargs.get("stem", "imagenet") != "imagenet":
        options["stem"] = kwargs["stem"]
    if kwargs.get("cbam_config") is not None and kwargs["cbam_config"] != CBAMConfig():
        options["cbam"] = asdict(kwargs["cbam_config"])
    if kwargs.get("se_reduction") is not None and (kwargs["se_reduction"], kwargs.get("se_divisor", 1)) != (16, 1):
        options["se"] = {"reduction": kwargs["se_reduction"], "divisor": kwargs.get("se_divisor", 1)}
    if kwargs.get("bam_config") is not None and kwargs["bam_config"] != BAMConfig():
        options["bam"] = asdict(kwargs["bam_config"])
    return options
