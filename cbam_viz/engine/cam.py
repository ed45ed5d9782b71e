"""Class activation maps with pytorch-grad-cam's maths, at the cost of one forward + one backward.

``pytorch_grad_cam.GradCAM(model, layers)(x)`` runs its own forward and backward, calls
``model.eval()`` in its constructor without restoring it, fills every parameter's ``.grad`` and
leaves hooks registered until it is garbage-collected. The app also needs the predictions and
the CBAM attention of the same pass, so for every gradient (and activation-only) method this
module does the pass itself:

1. one forward with a hook on the target layer and the CBAM gates (:mod:`cbam_viz.engine.attention`);
   the forward up to the target layer runs under ``no_grad`` and the hook turns the layer's
   output into a fresh leaf that requires grad, so autograd only records the head of the network;
2. logits -> softmax predictions, from that same forward;
3. ``torch.autograd.grad(scores.sum(), activation)``: gradients down to the target layer only,
   no parameter ``.grad`` touched;
4. the library's own ``get_cam_image`` / ``get_cam_weights`` for the chosen method, called on a
   method object that never saw the model (:mod:`cbam_viz.engine.cam_library`, the one adapter to the
   library), then the library's ``scale_cam_image`` post-processing.

Perturbation methods (Score-CAM, Ablation-CAM) and FullGrad / Shapley-CAM need passes of their
own; they run the library's classes (:func:`cbam_viz.engine.cam_library.run_library_cam`) inside
:func:`preserved_state`, which restores
train/eval flags, ``requires_grad`` and ``.grad``, puts back a layer Ablation-CAM swapped out, and
releases the library's hooks.

All of it runs under the model's one lock (:func:`cbam_viz.engine.locks.model_lock`): hooks live on
modules, so two threads explaining with one model must take turns, and then get exactly what they
would have got sequentially.
"""
from __future__ import annotations

import contextlib
import difflib
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cbam_viz.engine.attention import AttentionMaps, record_attention
from cbam_viz.engine.cam_library import math_object, run_library_cam
from cbam_viz.engine.locks import model_lock

__all__ = [
    "CamResult", "list_methods", "method_kind", "resolve_layer", "default_layer", "compute_cams",
    "model_lock", "preserved_state", "normalize_cam",
]

# name -> (pytorch_grad_cam class name, kind). Kinds:
#   "gradient":   one forward + autograd.grad to the target layer, library maths on (A, dA)
#   "activation": one forward, library maths on A only (no backward at all)
#   "library":    the library's own class runs its passes (perturbation / whole-network methods)
_METHODS: dict[str, tuple[str, str]] = {
    "gradcam": ("GradCAM", "gradient"),
    "gradcam++": ("GradCAMPlusPlus", "gradient"),
    "xgradcam": ("XGradCAM", "gradient"),
    "hirescam": ("HiResCAM", "gradient"),
    "layercam": ("LayerCAM", "gradient"),
    "eigengradcam": ("EigenGradCAM", "gradient"),
    "gradcamelementwise": ("GradCAMElementWise", "gradient"),
    "eigencam": ("EigenCAM", "activation"),
    "kpcacam": ("KPCA_CAM", "activation"),
    "fem": ("FEM", "activation"),
    "scorecam": ("ScoreCAM", "library"),
    "ablationcam": ("AblationCAM", "library"),
    "fullgrad": ("FullGrad", "library"),
    "shapleycam": ("ShapleyCAM", "library"),
}

def list_methods() -> list[str]:
    """Every CAM method :func:`compute_cams` (and :func:`cbam_viz.engine.explain.explain`) accepts."""
    return list(_METHODS)


def method_kind(method: str) -> str:
    """``"gradient"``, ``"activation"`` or ``"library"`` (see the module docstring)."""
    return _METHODS[_check_method(method)][1]


def _check_method(method: str) -> str:
    from cbam_viz.method_names import canonical_method

    key = (canonical_method(method, list(_METHODS)) or method) if isinstance(method, str) else method
    if key not in _METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose one of: {', '.join(_METHODS)}")
    return key


# ---------------------------------------------------------------------------- layers & state


def default_layer(model: nn.Module) -> str:
    """The last residual block of ``layer4`` (e.g. ``"layer4.1"`` for a resnet18)."""
    stage = getattr(model, "layer4", None)
    if isinstance(stage, nn.Sequential) and len(stage) > 0:
        return f"layer4.{len(stage) - 1}"
    raise ValueError(f"{type(model).__name__} has no layer4; pass the CAM layer by name")


def resolve_layer(model: nn.Module, layer: str | nn.Module | None) -> tuple[str, nn.Module]:
    """A dotted module name (or the module itself) -> ``(name, module)``, through ``named_modules()``.

    Raises:
        ValueError: no module has that name (the message suggests close and typical names).
    """
    if layer is None:
        layer = default_layer(model)
    modules = dict(model.named_modules())
    if isinstance(layer, nn.Module):
        for name, module in modules.items():
            if module is layer and name:
                return name, module
        raise ValueError(f"the given {type(layer).__name__} is not a submodule of {type(model).__name__}")
    if not isinstance(layer, str) or layer not in modules or layer == "":
        close = difflib.get_close_matches(str(layer), [n for n in modules if n], n=5, cutoff=0.5)
        typical = [n for n in modules if n.count(".") == 1 and n.startswith("layer")]
        raise ValueError(
            f"unknown layer {layer!r} for {type(model).__name__}"
            + (f"; did you mean {', '.join(close)}?" if close else "")
            + f" Valid names include: {', '.join(typical[-6:] or list(modules)[1:7])}"
            " (any dotted name from model.named_modules())."
        )
    return layer, modules[layer]


def _layer_slots(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    return [(parent, name, child) for parent in model.modules() for name, child in parent._modules.items()]


@contextlib.contextmanager
def preserved_state(model: nn.Module, *, eval_mode: bool = True) -> Iterator[nn.Module]:
    """Run with ``model`` in eval mode; afterwards restore every module's train/eval flag, every
    parameter's ``requires_grad`` and ``.grad``, and any submodule a method swapped out."""
    training = [(m, m.training) for m in model.modules()]
    params = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    slots = _layer_slots(model)
    try:
        if eval_mode:
            model.eval()
        yield model
    finally:
        for parent, name, child in slots:
            if parent._modules.get(name) is not child:
                parent._modules[name] = child
        for m, flag in training:
            m.training = flag
        for p, requires_grad, grad in params:
            p.requires_grad_(requires_grad)
            p.grad = grad


# ------------------------------------------------------------------------------------ maths


def _projection(batch: np.ndarray) -> np.ndarray:
    """``pytorch_grad_cam.utils.svd_on_activations.get_2d_projection`` with a thin SVD.

    The library asks for ``full_matrices=True``, which builds a C x C basis it never reads
    (0.5 s per image for 512 channels on a small CPU); the thin SVD gives the same first
    right-singular vector from the same LAPACK routine (tests compare against the library).
    """
    batch = np.nan_to_num(np.asarray(batch, dtype=np.float32), nan=0.0)
    out = []
    with _single_blas_thread():
        for a in batch:
            flat = a.reshape(a.shape[0], -1).T
            flat = flat - flat.mean(axis=0)
            vt = np.linalg.svd(flat, full_matrices=False)[2]
            out.append((flat @ vt[0]).reshape(a.shape[1:]))
    return np.float32(out)


_blas_lock = threading.Lock()


@contextlib.contextmanager
def _single_blas_thread():
    """One BLAS thread for tiny SVDs: OpenBLAS threads spinning against a busy CPU make a 2 ms
    49x512 SVD take 50-700 ms. The limit is process-wide, hence the lock."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn (grad-cam needs it)
        yield
        return
    with _blas_lock, threadpool_limits(limits=1, user_api="blas"):
        yield


# Methods whose whole maths is one projection: (activations, gradients) -> input of _projection.
_PROJECTIONS = {
    "EigenCAM": lambda acts, grads: acts,
    "EigenGradCAM": lambda acts, grads: grads * acts,
}


def _gradcam_image(activations: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """Grad-CAM's map (Selvaraju et al., 2017): each channel weighted by its mean gradient, summed.

    The same numbers as ``pytorch_grad_cam.GradCAM``'s ``get_cam_image`` (a test compares them),
    computed here because importing the library pulls in torchvision, scipy and matplotlib:
    about 4 s of the app's cold start, for the method nearly every request uses.
    """
    weights = grads.mean(axis=(2, 3))
    return (weights[:, :, None, None] * activations).sum(axis=1)


# Methods computed without importing pytorch-grad-cam (same maths; tests compare them).
_NATIVE = {"GradCAM": _gradcam_image}


def _min_max(cam: np.ndarray) -> np.ndarray:
    cam = cam - cam.min()
    return cam / (1e-7 + cam.max())


def normalize_cam(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A raw ``(h, w)`` CAM -> float32 ``(H, W)`` in [0, 1] at ``size = (W, H)``.

    Exactly the library's post-processing for one target layer (ReLU, ``scale_cam_image`` to the
    target size, then ``scale_cam_image`` again as ``aggregate_multi_layers`` does: min-max,
    bilinear ``cv2.resize``, min-max), written out so that the default method never imports
    the library (tests compare it with ``scale_cam_image``); a constant map becomes all zeros,
    never NaN.
    """
    import cv2

    cam = np.nan_to_num(np.asarray(cam, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    cam = _min_max(np.maximum(cam, 0))
    cam = _min_max(np.float32(cv2.resize(np.float32(cam), tuple(int(s) for s in size))))
    return np.clip(cam, 0.0, 1.0, out=cam)


# ------------------------------------------------------------------------------------- pass


@dataclass
class CamResult:
    """What one pass over one model produced, for a batch of B images."""

    logits: torch.Tensor             # (B, K), detached, on the CPU
    targets: list[int]               # class explained for each image
    cams: list[np.ndarray]           # float32 (H_i, W_i) in [0, 1], at each image's own size
    attention: AttentionMaps         # CBAM gates, detached, on the CPU (empty for a baseline)
    layer: str
    timings: dict[str, float]        # seconds


def _forward(model: nn.Module, x: torch.Tensor, layer: nn.Module, *, need_grad: bool):
    """One forward: logits, the target layer's output (a grad-requiring leaf when needed), attention."""
    captured: dict[str, torch.Tensor] = {}

    def hook(module, args, output):
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"the CAM layer returns {type(output).__name__}, not a tensor")
        if need_grad:
            # Everything before this layer ran without autograd; record from here on only.
            torch.set_grad_enabled(True)
            output = output.detach().requires_grad_(True)
        captured["activation"] = output  # a module called twice keeps its last output
        return output

    handle = layer.register_forward_hook(hook)
    try:
        with record_attention(model) as attention, torch.no_grad():
            logits = model(x)
    finally:
        handle.remove()
    if "activation" not in captured:
        raise RuntimeError("the CAM layer did not run during the forward pass; choose another layer")
    return logits, captured["activation"], attention


def compute_cams(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    method: str = "gradcam",
    layer: str | nn.Module | None = None,
    targets: Sequence[int | None] | None = None,
    sizes: Sequence[tuple[int, int]] | None = None,
) -> CamResult:
    """Predictions, CBAM attention and a CAM per image, from one batched pass over ``model``.

    Args:
        model: a classifier returning logits ``(B, K)``.
        inputs: ``(B, 3, S, S)`` normalised batch, moved to the model's device here.
        method: one of :func:`list_methods`.
        layer: dotted module name, the module itself, or None for :func:`default_layer`.
        targets: class index per image, None entries (or None) for the predicted class.
        sizes: ``(W, H)`` per image for the CAMs; default the input size.

    Raises:
        ValueError: unknown method or layer, a target out of range, a layer whose output is not
            a 4-D feature map.
    """
    method = _check_method(method)
    class_name, kind = _METHODS[method]
    layer_name, layer_module = resolve_layer(model, layer)
    b = inputs.shape[0]
    targets = [None] * b if targets is None else list(targets)
    if len(targets) != b:
        raise ValueError(f"{len(targets)} targets for {b} images")
    sizes = [(inputs.shape[-1], inputs.shape[-2])] * b if sizes is None else list(sizes)
    if len(sizes) != b:
        raise ValueError(f"{len(sizes)} sizes for {b} images")
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    # A caller inside torch.inference_mode() must still get gradients: leave it for this pass,
    # and never feed autograd an inference tensor.
    with torch.inference_mode(False):
        x = inputs.to(device, torch.float32)
        if x.is_inference():
            x = x.clone()
        return _compute(model, x, class_name, kind, layer_name, layer_module, targets, sizes)


def _compute(model, x, class_name, kind, layer_name, layer_module, targets, sizes) -> CamResult:
    b = x.shape[0]
    device = x.device
    timings: dict[str, float] = {}
    with model_lock(model), preserved_state(model):
        t0 = time.perf_counter()
        logits, activation, attention = _forward(model, x, layer_module, need_grad=kind == "gradient")
        if activation.ndim != 4:
            raise ValueError(
                f"layer {layer_name!r} outputs shape {tuple(activation.shape)}; CAMs need a 4-D "
                "(B, C, H, W) feature map, e.g. a residual block such as 'layer4.1'"
            )
        num_classes = logits.shape[1]
        resolved = []
        predicted = logits.detach().argmax(dim=1).tolist()
        for i, t in enumerate(targets):
            if t is None:
                resolved.append(int(predicted[i]))
            elif isinstance(t, bool) or not (-num_classes <= int(t) < num_classes):
                raise ValueError(f"target class {t!r} out of range for {num_classes} classes")
            else:
                resolved.append(int(t) % num_classes)

        grads = None
        if kind == "gradient":
            index = torch.tensor(resolved, device=logits.device).view(-1, 1)
            score = logits.gather(1, index).sum()
            (grads,) = torch.autograd.grad(score, activation, allow_unused=True)
            if grads is None:  # the layer does not reach the logits
                grads = torch.zeros_like(activation)
        if device.type == "cuda":  # honest timings: wait for the kernels
            torch.cuda.synchronize(device)
        t1 = time.perf_counter()
        timings["forward_backward" if kind == "gradient" else "forward"] = t1 - t0

        if kind == "library":
            with torch.enable_grad():  # the library backpropagates even if the caller is in no_grad
                raw = run_library_cam(model, x, class_name, layer_module, resolved)
        else:
            acts = activation.detach().float().cpu().numpy()
            grad_np = grads.detach().float().cpu().numpy() if grads is not None else None
            if class_name in _PROJECTIONS:
                raw = _projection(_PROJECTIONS[class_name](acts, grad_np))
            elif class_name in _NATIVE:
                raw = _NATIVE[class_name](acts, grad_np)
            else:
                # BaseCAM.compute_cam_per_layer's call, minus the pass it would have run itself.
                raw = math_object(class_name).get_cam_image(x, layer_module, None, acts, grad_np, False)
        cams = [normalize_cam(raw[i], sizes[i]) for i in range(b)]
        t2 = time.perf_counter()
        timings["cam"] = t2 - t1

        attention = {
            block: {kind_: t.float().cpu() for kind_, t in maps.items()} for block, maps in attention.items()
        }
        timings["attention"] = time.perf_counter() - t2
        logits = logits.detach().float().cpu()
        del activation, grads
    timings["total"] = time.perf_counter() - t0
    return CamResult(logits=logits, targets=resolved, cams=cams, attention=attention,
                     layer=layer_name, timings=timings)
