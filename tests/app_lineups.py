"""Tiny lineups for the page's tests (test_app*.py), and reading the page's answers by component.

Members are seeded 64 px models on three Imagenette names, as ``conftest.make_service_lineup``'s;
``trio`` is ResNet-18 | + SE | + CBAM (reference ResNet-18): one member without gates, one with
channel gates only, one with both.
"""
from __future__ import annotations

from cbam_viz.engine.lineup import Lineup
from tests.conftest import make_service_lineup

TRIO = ("resnet18", "resnet18_se", "resnet18_cbam")


def tiny_lineup(name: str, archs: tuple[str, ...] = TRIO) -> Lineup:
    """Seeded 64 px members, one per arch (the first the reference): conftest's service lineup."""
    return make_service_lineup(name, archs=archs)


def val(out: dict, component):
    """The value an event's answer gives ``component`` (a plain value, or a ``gr.update``'s)."""
    v = out[component]
    if isinstance(v, dict) and v.get("__type__") == "update":
        return v.get("value")
    return v


def prop(out: dict, component, name: str):
    """A property (visible, label, choices...) an event's ``gr.update`` gives ``component``."""
    v = out[component]
    assert isinstance(v, dict) and v.get("__type__") == "update", (component, v)
    return v.get(name)


__all__ = ["TRIO", "tiny_lineup", "val", "prop"]
