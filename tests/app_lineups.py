"""Tiny lineups for the page's tests (test_app*.py), and reading the page's answers by component.

Members are seeded 64 px models on three Imagenette names, as ``conftest.make_service_lineup``'s;
``trio`` is ResNet-18 | + SE | + CBAM (reference ResNet-18): one member without gates, one with
channel gates only, one with both.
"""
from __future__ import annotations


import torch

from cbam_viz.engine.lineup import Lineup
from cbam_viz.engine.loading import LoadedModel
from cbam_viz.models import create_model
from tests.conftest import SERVICE_CLASSES

TRIO = ("resnet18", "resnet18_se", "resnet18_cbam")


def tiny_member(arch: str, seed: int = 0, *, trained: bool = False) -> LoadedModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model(arch, num_classes=len(SERVICE_CLASSES)).eval()
    return LoadedModel(
        name=f"{arch}-tiny", arch=arch, model=model, classes=SERVICE_CLASSES,
        class_ids=tuple(f"n{i}" for i in range(len(SERVICE_CLASSES))), mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225), input_size=64, trained=trained, record=None, device=torch.device("cpu"),
    )


def tiny_lineup(name: str, archs: tuple[str, ...] = TRIO) -> Lineup:
    members = tuple(tiny_member(arch, seed=i) for i, arch in enumerate(archs))
    return Lineup(name=name, members=members, reference=members[0].name)


def member_names(lineup: Lineup) -> list[str]:
    return [m.name for m in lineup.members]


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


__all__ = ["TRIO", "tiny_member", "tiny_lineup", "member_names", "val", "prop"]
