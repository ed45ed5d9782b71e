"""The one place that touches pytorch-grad-cam's objects (the library adapter of :mod:`cbam_viz.engine.cam`).

Two uses, both careful to leave the library, the user's model and the process as they were:

* **Maths objects.** For the gradient and activation methods :mod:`cbam_viz.engine.cam` runs the pass
  itself and only borrows each class's ``get_cam_image``. A library object is built through its
  own constructor, on a one-parameter placeholder model (``BaseCAM.__init__`` switches its model
  to eval and hooks its target layers: on the placeholder that harms nothing), its hooks are
  released at once, and one object per class is shared: ``get_cam_image`` only reads its inputs.
* **Library-run methods** (Score-CAM, Ablation-CAM, FullGrad, Shapley-CAM) run the library's
  class on the real model. Their loops print tqdm bars, which a server log does not want: the
  two modules' ``tqdm`` is swapped for a silent stand-in only while such a method runs (counted,
  so overlapping runs on different models share one swap) and put back afterwards.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["math_object", "run_library_cam", "quiet_progress", "SCORECAM_BATCH", "ABLATION_BATCH"]

SCORECAM_BATCH = 32
ABLATION_BATCH = 32


class _Placeholder(nn.Module):
    """The smallest model a library constructor accepts: it needs one parameter (for its device)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(1, 1)


@functools.lru_cache(maxsize=None)
def math_object(class_name: str):
    """A pytorch-grad-cam method object, constructed normally but bound to no real model."""
    import pytorch_grad_cam

    cls = getattr(pytorch_grad_cam, class_name)
    placeholder = _Placeholder()
    obj = cls(placeholder, [placeholder.layer])
    obj.activations_and_grads.release()  # nothing should ever record through it
    return obj


class _SilentTqdm:
    """Stands in for the ``tqdm`` module inside the library's perturbation modules."""

    @staticmethod
    def tqdm(iterable, *args, **kwargs):
        return iterable


_quiet_lock = threading.Lock()
_quiet_users = 0
_saved_tqdm: dict[object, object] = {}


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """No tqdm bars from Score-CAM / Ablation-CAM while inside; the modules restored afterwards."""
    global _quiet_users
    from pytorch_grad_cam import ablation_cam, score_cam

    with _quiet_lock:
        if _quiet_users == 0:
            for module in (score_cam, ablation_cam):
                _saved_tqdm[module] = module.tqdm
                module.tqdm = _SilentTqdm
        _quiet_users += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_users -= 1
            if _quiet_users == 0:
                for module, original in _saved_tqdm.items():
                    module.tqdm = original
                _saved_tqdm.clear()


def run_library_cam(model: nn.Module, x: torch.Tensor, class_name: str, layer_module: nn.Module,
                    targets: Sequence[int]) -> np.ndarray:
    """Run a pytorch-grad-cam class on ``model`` itself; its ``(B, S, S)`` CAMs in [0, 1].

    The caller restores the model's flags and gradients (:func:`cbam_viz.engine.cam.preserved_state`);
    the library's hooks are released here, also after an exception.
    """
    import pytorch_grad_cam
    from pytorch_grad_cam.ablation_layer import AblationLayer
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = getattr(pytorch_grad_cam, class_name)
    if class_name == "FullGrad":
        cam = cls(model, [])  # FullGrad uses every bias layer, not a target layer
    elif class_name == "AblationCAM":
        # A fresh AblationLayer: the library's default argument is one object shared by all calls.
        cam = cls(model, [layer_module], ablation_layer=AblationLayer(), batch_size=ABLATION_BATCH)
    else:
        cam = cls(model, [layer_module])
        if class_name == "ScoreCAM":
            cam.batch_size = SCORECAM_BATCH
    try:
        with quiet_progress():
            # FullGrad / Shapley-CAM make the input require grad: give them their own copy.
            return cam(input_tensor=x.detach().clone(), targets=[ClassifierOutputTarget(t) for t in targets])
    finally:
        cam.activations_and_grads.release()
        cam.outputs = None
