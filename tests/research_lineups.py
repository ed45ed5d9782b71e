"""Tiny synthetic lineups for the research commands' tests (no weights, no manifest).

``make_lineup()`` is the issue's lineup of three: a plain ResNet-18 (the reference, no gates), an
SE member (channel gates only) and a CBAM member (channel + spatial gates); a BAM member (gates
at the stage transitions) is one argument away. Members are the seeded tiny models of
:func:`tests.conftest.make_loaded`, named ``"tiny <arch>"``.
"""
from __future__ import annotations

from cbam_viz.engine.lineup import Lineup
from tests.conftest import make_loaded

THREE = ("resnet18", "resnet18_se", "resnet18_cbam")


def make_lineup(archs=THREE, *, input_size: int = 32, name: str = "tiny-three", reference: str | None = None) -> Lineup:
    """A lineup of the tiny ``archs`` (each seeded differently), the first the reference unless named."""
    members = tuple(make_loaded(arch, input_size=input_size, seed=i) for i, arch in enumerate(archs))
    return Lineup(name=name, members=members, reference=reference or members[0].name)

