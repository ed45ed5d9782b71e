"""Hugging Face ZeroGPU: the request's model work gets a GPU there, and stays a plain call elsewhere.

On a ZeroGPU Space the ``spaces`` package is installed and a GPU is attached only while a function
decorated with ``spaces.GPU`` runs (in a worker process: what it returns must be picklable and on
the CPU). :func:`gpu` applies that decorator when ``spaces`` can be imported and returns the
function unchanged otherwise, so the same code runs on a laptop, a CPU Space and a ZeroGPU Space.
The decorated functions are :func:`cbam_viz.service.analysis._model_work` (the forwards of one request) and
:func:`cbam_viz.service._ablation_work` (the gate ablation of a shown photo); decoding, drawing and
writing files stay on the CPU, outside the GPU's time slot. ``spaces`` pickles their arguments into
its GPU worker process, so they take the lineup's *name* and the worker uses its own (forked) cache,
whose models ``spaces`` has placed on the GPU; models passed as arguments would arrive as copies.

Choosing the hardware of a Space (Settings -> Space hardware): the shipped resnet18 lineup at
192 px answers in well under a second on the free "CPU basic" (2 vCPU), so that is the default;
pick "ZeroGPU" (add ``spaces`` to the Space's requirements: it is preinstalled there) for the
ImageNet ResNet-50 lineup or the many-pass methods (Score-CAM, Ablation-CAM), or a dedicated GPU
("T4 small" and up, no ``spaces`` needed: ``CBAM_VIZ_DEVICE=cuda``) for steady heavy use.

Environment:
    CBAM_VIZ_GPU_DURATION   seconds a ZeroGPU slot is asked for per request (default 60: Score-CAM
                            and Ablation-CAM run hundreds of forwards)
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import TypeVar

__all__ = ["DURATION_ENV", "gpu", "spaces_module"]

DURATION_ENV = "CBAM_VIZ_GPU_DURATION"
F = TypeVar("F", bound=Callable)


def spaces_module():
    """The ``spaces`` package if it can be imported (a Hugging Face Space), else None."""
    try:
        return importlib.import_module("spaces")
    except ImportError:
        return None


def gpu(fn: F) -> F:
    """``spaces.GPU(duration=...)(fn)`` on a Space with the ``spaces`` package; ``fn`` itself elsewhere.

    Decided when the decorated module is imported (as ``spaces`` wants: before the first request).
    """
    spaces = spaces_module()
    if spaces is None or not hasattr(spaces, "GPU"):
        return fn
    return spaces.GPU(duration=int(os.environ.get(DURATION_ENV, "60")))(fn)
