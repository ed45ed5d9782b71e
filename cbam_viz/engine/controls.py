"""One validator per control of an explanation: CAM method, target class, CAM layer, overlay opacity.

The app, the ``explain`` command, :mod:`cbam_viz.service` and :func:`cbam_viz.engine.explain.explain`
all check their controls here, so one value is accepted or refused the same way everywhere, with
the same sentence (a :class:`~cbam_viz.messages.UserFacingError`, which is a ``ValueError``).

* method: a name from :func:`list_methods`, any case; empty means ``"gradcam"``.
* target: None, ``"auto"`` or :data:`AUTO_TARGET` (each model's predicted class); a class index
  (an int, or a string of digits as a text box sends it); a class name (exact, else ignoring
  case); or a class id, e.g. the WordNet id ``n03028079`` of "church".
* layer: None, ``"auto"`` or :data:`AUTO_LAYER` (the last block of ``layer4``), else a dotted
  module name that every model has (``layer3.1``; see :func:`block_names` for the usual choices)
  whose output is a feature map: the stem, a stage or anything inside one, not ``avgpool`` / ``fc``.
* alpha: a number from 0 to 1.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
from torch import nn

from cbam_viz.engine.cam import default_layer, list_methods, resolve_layer
from cbam_viz.messages import SHOWN_CLASSES, UserFacingError
from cbam_viz.method_names import canonical_method, close_methods

__all__ = [
    "AUTO_TARGET", "AUTO_LAYER", "DEFAULT_METHOD", "Controls", "list_methods", "block_names", "check_method",
    "check_target", "check_layer", "check_alpha", "check_controls", "is_auto",
]

#: Value of the target control meaning "explain the class each model predicts".
AUTO_TARGET = "auto (predicted class)"
#: Value of the layer control meaning "the last residual block" (what Grad-CAM usually uses).
AUTO_LAYER = "auto (last block)"
DEFAULT_METHOD = "gradcam"
_BLOCK_RE = re.compile(r"^layer\d+\.\d+$")
#: Layers whose output is a feature map: the stem, the stages and everything inside them.
_MAP_LAYER_RE = re.compile(r"^(conv1|bn1|relu|maxpool|layer\d+(\..+)?)$")


def is_auto(value, sentinel: str) -> bool:
    """Whether a control asks for its automatic choice: None, "", "auto" or its dropdown label."""
    return value is None or (isinstance(value, str) and (value.strip().lower() in ("", "auto") or value == sentinel))


def block_names(model: nn.Module) -> list[str]:
    """Dotted names of every residual block (``layer1.0`` ... ``layer4.1``), in forward order."""
    return [n for n, _ in model.named_modules() if _BLOCK_RE.match(n)]


def check_method(method: str | None) -> str:
    """The CAM method's registered name (lower case); None or ``""`` -> :data:`DEFAULT_METHOD`.

    Raises:
        UserFacingError: not a method of :func:`list_methods`.
    """
    methods = list_methods()
    if method is None or (isinstance(method, str) and not method.strip()):
        return DEFAULT_METHOD
    key = canonical_method(str(method), methods)  # "Grad-CAM++", "GradCAMPlusPlus" -> "gradcam++"
    if key is None:
        close = close_methods(str(method), methods)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise UserFacingError(f"Unknown CAM method {method!r}; {hint}choose one of: {', '.join(methods)}.")
    return key


def check_target(target, classes: Sequence[str], class_ids: Sequence[str] = ()) -> int | None:
    """The class index a target names, or None for "each model's predicted class".

    Args:
        target: see the module docstring.
        classes: the model's readable class names.
        class_ids: the model's class ids (e.g. WordNet ids), accepted as well.

    Raises:
        UserFacingError: an index out of range, an unknown name (the sentence suggests close
            names, or lists the classes), or a value that is neither an index nor a name.
    """
    if is_auto(target, AUTO_TARGET):
        return None
    classes, n = list(classes), len(classes)
    if isinstance(target, (bool, np.bool_)) or not isinstance(target, (int, np.integer, str)):
        raise UserFacingError(f"The target must be a class index or name, not {target!r}.")
    if isinstance(target, str):
        name = target.strip()
        for pool in (classes, list(class_ids)):
            if name in pool:
                return pool.index(name)
        lowered = [c.lower() for c in classes]
        if name.lower() in lowered:
            return lowered.index(name.lower())
        if not name.isdigit():
            close = difflib.get_close_matches(name, classes, n=3, cutoff=0.6)
            hint = (f"did you mean {', '.join(repr(c) for c in close)}?" if close else
                    f"the classes are: {', '.join(classes[:SHOWN_CLASSES])}{', ...' if n > SHOWN_CLASSES else ''}.")
            raise UserFacingError(f"Unknown target class {target!r}; {hint}")
        target = int(name)
    index = int(target)
    if not 0 <= index < n:
        raise UserFacingError(f"Target class index {index} is out of range: the models know {n} classes "
                              f"(0 to {n - 1}).")
    return index


def check_layer(layer: str | nn.Module | None, *models: nn.Module) -> str:
    """The CAM layer's dotted name, the same in every model; auto -> the last block of ``layer4``.

    Raises:
        UserFacingError: a name some model does not have (the sentence lists the blocks).
    """
    if not models:
        raise TypeError("check_layer needs at least one model")
    if isinstance(layer, nn.Module):
        layer = resolve_layer(models[0], layer)[0]
    if is_auto(layer, AUTO_LAYER):
        return default_layer(models[0])
    name = str(layer).strip()
    blocks = block_names(models[0])
    accepted = (f"choose a residual block ({', '.join(blocks[:2])}, ..., {blocks[-1]}), a stage (layer1 ... layer4), "
                "a module inside a block by its dotted name (e.g. layer3.1.conv2) or the stem (conv1, bn1, relu, "
                "maxpool)") if blocks else "choose a module of the model by its dotted name"
    for model in models:
        if name not in dict(model.named_modules()):
            raise UserFacingError(f"Unknown layer {layer!r}; {accepted}.")
    if blocks and not _MAP_LAYER_RE.match(name):  # avgpool, fc: after the global pooling, no map to look at
        raise UserFacingError(f"Layer {name!r} has no spatial map (it comes after the global pooling); {accepted}.")
    return name


def check_alpha(alpha) -> float:
    """The overlay opacity as a float from 0 to 1.

    Raises:
        UserFacingError: not a number, or outside [0, 1].
    """
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise UserFacingError(f"The overlay opacity must be a number between 0 and 1, not {alpha!r}.") from None
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise UserFacingError(f"The overlay opacity must be between 0 and 1, not {alpha}.")
    return value


@dataclass(frozen=True)
class Controls:
    """The checked controls of one request: made once, up front, then passed along as they are.

    Nothing downstream re-checks or re-resolves them: :func:`cbam_viz.engine.explain.explain_checked`
    takes each member's resolved target index from :attr:`targets`.
    """

    method: str                  # a registered CAM method name
    target: int | str | None     # as asked (stripped), None for auto: what a shared link reopens
    layer: str                   # a dotted module name every member has
    alpha: float
    targets: Mapping[str, int | None] = field(default_factory=dict)  # member -> its class index (None: its own top-1)
    layer_auto: bool = True      # the layer was left to its default (the last block)
    target_index: int | None = None  # the target's index in the reference's classes (None: auto)
    target_label: str | None = None

    # Picklable (a ZeroGPU worker gets them pickled), read-only once rebuilt: a mappingproxy itself
    # cannot be pickled.
    def __getstate__(self) -> dict:
        return {**self.__dict__, "targets": dict(self.targets)}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, targets=MappingProxyType(dict(state["targets"])))


def check_controls(lineup, *, method=DEFAULT_METHOD, target=None, layer=None, alpha=0.5) -> Controls:
    """Every control checked against every member of ``lineup``, before any image is opened.

    A class name or id is resolved by each member against its own class list (which may differ);
    auto becomes None.

    Raises:
        UserFacingError: the first wrong control, naming the value and the valid choices.
    """
    method = check_method(method)
    targets = {m.name: check_target(target, m.classes, m.class_ids) for m in lineup.members}
    index = targets[lineup.reference]
    asked = None if index is None else (target.strip() if isinstance(target, str) else int(target))
    reference = lineup.reference_model
    return Controls(method=method, target=asked, layer=check_layer(layer, *(m.model for m in lineup.members)),
                    alpha=check_alpha(alpha), targets=MappingProxyType(targets),
                    layer_auto=is_auto(layer, AUTO_LAYER), target_index=index,
                    target_label=None if index is None else reference.classes[index])
