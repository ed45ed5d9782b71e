"""A lineup: one to four loaded models shown side by side, one of them the reference.

The step past :class:`cbam_viz.pair.ModelPair` (a plain ResNet and its CBAM twin, as roles): a
lineup names its members by their records (ResNet-18 | SE | BAM | CBAM, or one model of a
user's own), and one of them is the reference the others are compared with (the plain ResNet
where there is one). A manifest lists them under ``lineups`` (``add-lineup`` writes them); its
``pairs`` are lineups of two, so a manifest that knows only pairs still loads.

Lineups are found in every weights folder (:func:`cbam_viz.weights.weights_dirs`, first wins);
their members load through the one model cache (:func:`cbam_viz.pair.load_model`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbam_viz.pair import LoadedModel, ModelLoadError, ModelPair, load_model, select_device
from cbam_viz.weights import read_manifest, weights_dirs

__all__ = ["Lineup", "MAX_MEMBERS", "lineup_specs", "lineup_names", "default_lineup_name", "load_lineup",
           "lineup_of_pair"]

MAX_MEMBERS = 4


@dataclass(frozen=True)
class Lineup:
    """Loaded members in display order and the name of the reference member."""

    name: str
    members: tuple[LoadedModel, ...]
    reference: str

    def __post_init__(self) -> None:
        names = self.names
        if not 1 <= len(names) <= MAX_MEMBERS or len(set(names)) != len(names):
            raise ValueError(f"lineup {self.name!r}: 1 to {MAX_MEMBERS} different models, got {names}")
        if self.reference not in names:
            raise ValueError(f"lineup {self.name!r}: the reference {self.reference!r} is not a member of {names}")

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    def member(self, name: str) -> LoadedModel:
        for m in self.members:
            if m.name == name:
                return m
        raise KeyError(f"no member {name!r} in lineup {self.name!r}; members: {', '.join(self.names)}")

    @property
    def reference_model(self) -> LoadedModel:
        return self.member(self.reference)

    @property
    def others(self) -> tuple[LoadedModel, ...]:
        """The members compared with the reference, in order."""
        return tuple(m for m in self.members if m.name != self.reference)


def lineup_of_pair(pair: ModelPair) -> Lineup:
    """The pair as a lineup of two: baseline (the reference), then the CBAM model."""
    return Lineup(name=pair.name, members=(pair.baseline, pair.cbam), reference=pair.baseline.name)


def _spec_of_pair(spec: Any) -> dict[str, Any] | None:
    if not isinstance(spec, dict) or not spec.get("baseline") or not spec.get("cbam"):
        return None
    return {"members": [spec["baseline"], spec["cbam"]], "reference": spec["baseline"],
            "default": bool(spec.get("default"))}


def lineup_specs(weights_dir: str | os.PathLike | None = None) -> dict[str, tuple[Path, dict[str, Any]]]:
    """lineup name -> (its folder, ``{"members", "reference", "default"}``) over every weights folder.

    A folder's ``lineups`` come first, then its ``pairs`` not already listed as lineups; a name in
    an earlier folder hides the same name in a later one.
    """
    specs: dict[str, tuple[Path, dict[str, Any]]] = {}
    for folder in weights_dirs(weights_dir):
        manifest = read_manifest(folder)
        for name, spec in (manifest.get("lineups") or {}).items():
            if isinstance(spec, dict) and spec.get("members"):
                specs.setdefault(name, (folder, spec))
        for name, spec in manifest["pairs"].items():
            converted = _spec_of_pair(spec)
            if converted is not None:
                specs.setdefault(name, (folder, converted))
    return specs


def default_lineup_name(weights_dir: str | os.PathLike | None = None) -> str | None:
    """The first lineup marked default (folders in order), else the first; None without any."""
    specs = lineup_specs(weights_dir)
    for name, (_, spec) in specs.items():
        if spec.get("default"):
            return name
    return next(iter(specs), None)


def lineup_names(weights_dir: str | os.PathLike | None = None) -> list[str]:
    """Every lineup, the default first."""
    names = list(lineup_specs(weights_dir))
    default = default_lineup_name(weights_dir)
    return ([default] if default else []) + [n for n in names if n != default]


def load_lineup(name: str | None = None, *, weights_dir: str | os.PathLike | None = None, device=None) -> Lineup:
    """Load lineup ``name`` (default: :func:`default_lineup_name`), every member through the model cache.

    Raises:
        KeyError: no such lineup (the message lists the known ones).
        ModelLoadError: a member cannot load; the message names the lineup and the file.
    """
    device = select_device(device)
    specs = lineup_specs(weights_dir)
    name = name or default_lineup_name(weights_dir)
    if name is None or name not in specs:
        raise KeyError(f"no lineup {name!r}; known lineups: {', '.join(specs) or 'none'}")
    folder, spec = specs[name]
    members = []
    for member in spec["members"]:
        try:
            members.append(load_model(member, weights_dir=folder, device=device))
        except ModelLoadError as err:
            raise ModelLoadError(f"lineup {name!r}: {err}", model_name=err.model_name, file=err.file,
                                 pair=name) from err.__cause__
    return Lineup(name=name, members=tuple(members), reference=spec.get("reference") or members[0].name)
