"""CAM method names as people write them -> the registered names of :func:`cbam_viz.engine.cam.list_methods`.

Why: papers, the README and pytorch-grad-cam's classes spell the methods ``Grad-CAM++``,
``GradCAMPlusPlus``, ``Score-CAM`` or ``HiResCAM``, while the registry keys are ``gradcam++``,
``scorecam``, ``hirescam``. Every entry point (the CLI, the app, :func:`cbam_viz.engine.explain.explain`)
resolves a name through :func:`canonical_method`, so all these spellings mean the same method.
Pure string work: no import beyond the standard library.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

__all__ = ["squash", "canonical_method", "close_methods"]

_SEPARATORS = re.compile(r"[\s\-_.]+")


def squash(name: str) -> str:
    """``"Grad-CAM++"``, ``"grad_cam plus plus"``, ``"GradCAMPlusPlus"`` -> ``"gradcam++"``."""
    key = _SEPARATORS.sub("", str(name).strip().lower())
    return key.replace("plusplus", "++").replace("pp", "++") if key.endswith(("plusplus", "campp")) else key


def canonical_method(name: str, known: Sequence[str]) -> str | None:
    """The registered name among ``known`` that ``name`` spells, or None."""
    key = squash(name)
    for method in known:
        if squash(method) == key:
            return method
    return None


def close_methods(name: str, known: Sequence[str]) -> list[str]:
    """Up to three registered names close to ``name`` (for "did you mean ...?")."""
    by_key = {squash(m): m for m in known}
    return [by_key[k] for k in difflib.get_close_matches(squash(name), list(by_key), n=3, cutoff=0.6)]
