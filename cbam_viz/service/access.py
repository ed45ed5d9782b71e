"""Which lineup a request uses, and what the page says about it before any photo is explained.

:func:`get_lineup` is the one door from the service to the loaded models (the process's one model
cache, :mod:`cbam_viz.engine.loading`); every failure becomes one sentence. Members are titled by
their architecture ("ResNet-18 + CBAM"), never by a role.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from cbam_viz.engine.attention import attention_gates
from cbam_viz.engine.controls import AUTO_LAYER, AUTO_TARGET, block_names
from cbam_viz.engine.lineup import (
    UNTRAINED_LINEUP, Lineup, default_lineup_name, lineup_names, lineup_unavailable_reason, load_lineup,
)
from cbam_viz.messages import UserFacingError, first_sentence
from cbam_viz.models import backbone_of

__all__ = ["MemberInfo", "LineupInfo", "get_lineup", "describe_lineup", "member_title", "lineup_names"]

log = logging.getLogger(__name__)

_ATTENTION_TITLES = {"_cbam": "CBAM", "_se": "SE", "_bam": "BAM"}
_GATE_KINDS = {"channel": "channel", "channel_branch": "channel", "spatial": "spatial",
               "spatial_branch": "spatial", "joint": "spatial"}


def member_title(arch: str) -> str:
    """``resnet18_cbam`` -> ``"ResNet-18 + CBAM"``; ``resnet50`` -> ``"ResNet-50"``."""
    backbone = backbone_of(arch)
    title = backbone.replace("resnet", "ResNet-") if backbone.startswith("resnet") else backbone
    attention = _ATTENTION_TITLES.get(arch[len(backbone):])
    return f"{title} + {attention}" if attention else title


@dataclass(frozen=True)
class MemberInfo:
    """One member as the page titles it: its record name, architecture, title and which gates it has."""

    name: str
    arch: str
    title: str
    trained: bool
    gates: tuple[str, ...]   # from {"channel", "spatial"}; () for a plain ResNet


@dataclass(frozen=True)
class LineupInfo:
    """What the UI shows about a lineup before any image is explained."""

    name: str
    members: tuple[MemberInfo, ...]
    reference: str
    classes: tuple[str, ...]
    layers: tuple[str, ...]
    default_layer: str
    device: str
    warnings: tuple[str, ...]

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    def member(self, name: str) -> MemberInfo:
        return next(m for m in self.members if m.name == name)

    @property
    def gated(self) -> tuple[MemberInfo, ...]:
        """The members with attention gates, in order."""
        return tuple(m for m in self.members if m.gates)

    @property
    def targets(self) -> list[str]:
        """Choices of the target control: auto, then every class."""
        return [AUTO_TARGET, *self.classes]

    @property
    def layer_choices(self) -> list[str]:
        """Choices of the layer control: auto (the last block), then every block."""
        return [AUTO_LAYER, *self.layers]


def get_lineup(name: str | None = None) -> Lineup:
    """The :class:`~cbam_viz.engine.lineup.Lineup` called ``name`` (None: the default manifest lineup, else
    the untrained one: never a lineup whose files this machine may lack).

    Its models come from the one model cache: loaded once, not per request.

    Raises:
        UserFacingError: unknown lineup, missing or corrupted weights file.
    """
    name = name or default_lineup_name() or UNTRAINED_LINEUP
    reason = lineup_unavailable_reason(name)
    if reason:  # a file this machine lacks: expected, said as it is, not logged as a failure
        raise UserFacingError(reason)
    try:
        return load_lineup(name)
    except KeyError as err:
        known = ", ".join(lineup_names())
        raise UserFacingError(f"There is no lineup called {name!r} (known lineups: {known}).") from err
    except Exception as err:  # noqa: BLE001  checksum, missing file, strict-load mismatch
        log.exception("loading lineup %r failed", name)
        raise UserFacingError(f"The lineup could not be loaded: {first_sentence(err)}") from err


def _untrained_warning(m) -> str:
    return (f"{member_title(m.arch)} ({m.name}) is untrained: no weights were found, so its predictions, "
            "heatmaps and attention maps are random; train and export models with "
            "`python -m cbam_viz train --data DIR --export weights`.")


def describe_lineup(lineup: Lineup) -> LineupInfo:
    """Members, classes, layer choices and plain warnings (e.g. untrained models) of a loaded lineup."""
    layers = tuple(block_names(lineup.members[-1].model))
    warnings = [_untrained_warning(m) for m in lineup.members if not m.trained]
    reference = lineup.reference_model
    if any(tuple(m.classes) != tuple(reference.classes) for m in lineup.members):
        warnings.append("The models of this lineup were trained on different class lists; "
                        "their predictions cannot be compared directly.")
    members = tuple(MemberInfo(name=m.name, arch=m.arch, title=member_title(m.arch), trained=bool(m.trained),
                               gates=tuple(sorted({_GATE_KINDS[k] for _, k, _ in attention_gates(m.model)})))
                    for m in lineup.members)
    return LineupInfo(name=lineup.name, members=members, reference=lineup.reference,
                      classes=tuple(reference.classes), layers=layers, default_layer=layers[-1] if layers else "",
                      device=str(reference.device), warnings=tuple(warnings))
