"""A lineup: one to four loaded models shown side by side, one of them the reference.

A lineup names its members by their records (ResNet-18 | SE | BAM | CBAM, or one model of a
user's own); one of them is the reference the others are compared with (the plain ResNet where
there is one). Nothing downstream knows roles such as "baseline" or "cbam": what a member shows
is what its gates record (:mod:`cbam_viz.engine.attention`).

A manifest lists lineups under ``lineups`` (``add-lineup`` writes them); its ``pairs`` (the
on-disk form of earlier versions) are lineups of two, so a manifest that knows only pairs still
loads. Lineups are found in every weights folder (:func:`cbam_viz.models.weights.weights_dirs`,
first wins); their members load through the one model cache
(:func:`cbam_viz.engine.loading.load_model`). Two more are always offered: the paper's own
ResNet-50 pair on ImageNet (:data:`IMAGENET_LINEUP`, where its files are) and a seeded
:data:`UNTRAINED_LINEUP` that runs without any file.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbam_viz.engine import imagenet as inet
from cbam_viz.engine.loading import (
    LoadedModel, ModelLoadError, imagenet_models, load_model, select_device, untrained_model,
)
from cbam_viz.models.weights import read_manifest, weights_dirs

__all__ = ["Lineup", "MAX_MEMBERS", "UNTRAINED_LINEUP", "IMAGENET_LINEUP", "lineup_specs", "lineup_names",
           "default_lineup_name", "load_lineup", "lineup_unavailable_reason", "load_available_lineups"]

log = logging.getLogger(__name__)

MAX_MEMBERS = 4
#: A seeded, untrained ResNet-18 and ResNet-18-CBAM: runs without any file, and beside a trained
#: lineup shows what training taught the gates.
UNTRAINED_LINEUP = "untrained"
UNTRAINED_MEMBERS = ("resnet18", "resnet18_cbam")
#: The paper's own ResNet-50 pair on ImageNet (:mod:`cbam_viz.engine.imagenet`), where its files are.
IMAGENET_LINEUP = inet.PAIR_NAME


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
    def trained(self) -> bool:
        return all(m.trained for m in self.members)

    @property
    def others(self) -> tuple[LoadedModel, ...]:
        """The members compared with the reference, in order."""
        return tuple(m for m in self.members if m.name != self.reference)


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
    """What a person can pick: the manifests' lineups (the default first), then :data:`IMAGENET_LINEUP`
    and :data:`UNTRAINED_LINEUP`. Never raises: a broken manifest is logged and leaves the last two."""
    try:
        names = list(lineup_specs(weights_dir))
        default = default_lineup_name(weights_dir)
    except Exception as err:  # noqa: BLE001  a broken manifest must not stop the app from starting
        log.warning("cannot list lineups: %s", err)
        names, default = [], None
    names = ([default] if default else []) + [n for n in names if n != default]
    return [n for n in names if n not in (IMAGENET_LINEUP, UNTRAINED_LINEUP)] + [IMAGENET_LINEUP, UNTRAINED_LINEUP]


def lineup_unavailable_reason(name: str, weights_dir: str | os.PathLike | None = None) -> str | None:
    """One sentence when lineup ``name`` cannot load on this machine for want of a file; else None.

    Only the ImageNet lineup depends on files the project cannot ship (:mod:`cbam_viz.engine.imagenet`).
    """
    if name != IMAGENET_LINEUP or name in lineup_specs(weights_dir):
        return None
    return inet.unavailable_reason(weights_dir)


def load_lineup(name: str | None = None, *, weights_dir: str | os.PathLike | None = None, device=None) -> Lineup:
    """Load lineup ``name`` (default: :func:`default_lineup_name`), every member through the model cache.

    With no manifest lineup (a fresh checkout, before training) and ``name`` None, the untrained
    lineup, whose members say ``trained=False``.

    Raises:
        KeyError: no such lineup (the message lists the known ones).
        ModelLoadError: a member cannot load; the message names the lineup and the file.
    """
    device = select_device(device)
    specs = lineup_specs(weights_dir)
    name = name or default_lineup_name(weights_dir) or UNTRAINED_LINEUP
    if name not in specs:
        if name == UNTRAINED_LINEUP:
            members = tuple(untrained_model(arch, device=device) for arch in UNTRAINED_MEMBERS)
            return Lineup(name=name, members=members, reference=members[0].name)
        if name == IMAGENET_LINEUP:
            members = imagenet_models(weights_dir=weights_dir, device=device)
            return Lineup(name=name, members=members, reference=members[0].name)
        where = ", ".join(str(f / "manifest.json") for f in weights_dirs(weights_dir))
        raise KeyError(f"no lineup {name!r} in {where}; known lineups: {', '.join(lineup_names(weights_dir))}")
    folder, spec = specs[name]
    members = []
    for member in spec["members"]:
        try:
            members.append(load_model(member, weights_dir=folder, device=device))
        except ModelLoadError as err:
            raise ModelLoadError(f"lineup {name!r}: {err}", model_name=err.model_name, file=err.file,
                                 pair=name) from err.__cause__
    return Lineup(name=name, members=tuple(members), reference=spec.get("reference") or members[0].name)


def load_available_lineups(*, weights_dir: str | os.PathLike | None = None, device=None
                           ) -> tuple[dict[str, Lineup], dict[str, str]]:
    """Load every manifest lineup that can load, so the app stays up when one file is broken.

    Returns:
        ``(lineups, errors)``: name -> :class:`Lineup` for those that loaded (default first; the
        untrained lineup when no manifest lists any), and name -> error message for the others.
    """
    loaded: dict[str, Lineup] = {}
    errors: dict[str, str] = {}
    names = [n for n in lineup_names(weights_dir) if n not in (IMAGENET_LINEUP, UNTRAINED_LINEUP)]
    for name in names:
        try:
            loaded[name] = load_lineup(name, weights_dir=weights_dir, device=device)
        except (ModelLoadError, KeyError, ValueError) as err:  # ValueError: an entry that is no lineup
            errors[name] = str(err)
    if not names:
        loaded[UNTRAINED_LINEUP] = load_lineup(UNTRAINED_LINEUP, device=device)
    return loaded, errors
