import copy

import numpy as np
import pytest
import torch

import pytorch_grad_cam
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from cbam_viz.engine.cam import compute_cams, list_methods, method_kind, normalize_cam, preserved_state, resolve_layer
from conftest import assert_no_hooks, make_model

FAST = [m for m in list_methods() if method_kind(m) != "library"]
SLOW = [m for m in list_methods() if method_kind(m) == "library"]
LIB_CLASS = {
    "gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "xgradcam": "XGradCAM", "hirescam": "HiResCAM",
    "layercam": "LayerCAM", "eigencam": "EigenCAM", "eigengradcam": "EigenGradCAM",
    "gradcamelementwise": "GradCAMElementWise", "kpcacam": "KPCA_CAM", "fem": "FEM",
}


@pytest.fixture(scope="module")
def model():
    return make_model("resnet18_cbam")


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))


def test_method_list():
    for name in ("gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam", "eigengradcam",
                 "gradcamelementwise", "scorecam", "ablationcam", "fullgrad"):
        assert name in list_methods()
    assert set(LIB_CLASS) == set(FAST)


@pytest.mark.parametrize("method", FAST)
def test_equals_pytorch_grad_cam(model, x, method):
    """Our one-pass CAM is the library's own output for the same model, input and targets."""
    ours = compute_cams(model, x, method=method, targets=[0, 2])
    reference_model = copy.deepcopy(model)
    cam = getattr(pytorch_grad_cam, LIB_CLASS[method])(reference_model, [reference_model.layer4[-1]])
    try:
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(0), ClassifierOutputTarget(2)])
    finally:
        cam.activations_and_grads.release()
    assert theirs.shape == (2, 96, 96)
    assert theirs.std() > 0.05  # a real map, not a degenerate constant
    np.testing.assert_allclose(np.stack(ours.cams), theirs, atol=2e-4)
    assert_no_hooks(model)


def test_state_hooks_and_grads_restored(x):
    model = make_model("resnet18_cbam")
    model.train()
    model.layer2.eval()  # a mixed state must come back exactly
    model.fc.weight.requires_grad_(False)
    sentinel = torch.full_like(model.conv1.weight, 7.0)
    model.conv1.weight.grad = sentinel
    flags = {n: m.training for n, m in model.named_modules()}
    req = {n: p.requires_grad for n, p in model.named_parameters()}
    result = compute_cams(model, x, method="gradcam")
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert {n: p.requires_grad for n, p in model.named_parameters()} == req
    assert model.conv1.weight.grad is sentinel
    assert all(p.grad is None for n, p in model.named_parameters() if n != "conv1.weight")
    assert_no_hooks(model)
    # ...and the CAM was computed in eval mode (BN running stats), as for an eval model.
    ref = compute_cams(make_model("resnet18_cbam").eval(), x, method="gradcam")
    np.testing.assert_allclose(np.stack(result.cams), np.stack(ref.cams), atol=1e-5)


def test_frozen_model_still_gets_gradients(x):
    model = make_model("resnet18_cbam").requires_grad_(False)
    cams = compute_cams(model, x, method="gradcam").cams
    assert max(c.max() for c in cams) == pytest.approx(1.0)
    assert not any(p.requires_grad for p in model.parameters())


def test_errors_after_the_pass_leave_no_hooks(model, x):
    with pytest.raises(ValueError, match="out of range"):
        compute_cams(model, x, targets=[0, 99])
    assert_no_hooks(model)
    with pytest.raises(ValueError, match="4-D"):
        compute_cams(model, x, layer="fc")
    assert_no_hooks(model)


@pytest.mark.parametrize("method", ["gradcam", "eigencam", "scorecam"])
def test_hooks_removed_after_an_exception_raised_while_they_are_attached(method):
    """The forward itself fails (in the classifier head, after the CAM layer and every CBAM gate
    ran with their hooks): the error propagates and no hook is left behind, for our own pass and
    for a library-run method."""
    model = make_model("resnet18_cbam")
    seen = {}

    def boom(module, args):
        seen["hooks"] = sum(len(m._forward_hooks) for m in model.modules())
        raise RuntimeError("boom inside the forward")

    handle = model.fc.register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            compute_cams(model, torch.randn(1, 3, 32, 32), method=method)
    finally:
        handle.remove()
    assert seen["hooks"] > 0  # hooks were attached when it raised
    assert_no_hooks(model)
    assert model.training is False


def test_library_methods_put_the_library_progress_bars_back(capsys):
    """Score-CAM's tqdm bars are silenced only while it runs; the library module is restored."""
    import tqdm
    from pytorch_grad_cam import ablation_cam, score_cam

    cams = compute_cams(make_model("resnet18_cbam"), torch.randn(1, 3, 32, 32), method="scorecam").cams
    assert cams[0].shape == (32, 32)
    assert score_cam.tqdm is tqdm and ablation_cam.tqdm is tqdm
    assert "it/s" not in capsys.readouterr().err


def test_maths_objects_come_from_the_library_constructor_on_a_placeholder():
    """Borrowed ``get_cam_image`` objects are built normally (no ``__new__``), on a model that is
    not the user's, and hold no hooks."""
    from cbam_viz.engine.cam_library import math_object

    obj = math_object("GradCAMPlusPlus")
    assert obj.uses_gradients is True and obj.reshape_transform is None  # set by BaseCAM.__init__
    assert sum(p.numel() for p in obj.model.parameters()) == 2
    assert_no_hooks(obj.model)
    assert math_object("KPCA_CAM").kernel == "sigmoid"  # the constructor's own defaults


def test_layer_by_dotted_name(model, x):
    r = compute_cams(model, x, layer="layer3.0.conv2", sizes=[(50, 30), (20, 40)])
    assert r.layer == "layer3.0.conv2"
    assert [c.shape for c in r.cams] == [(30, 50), (40, 20)]
    name, module = resolve_layer(model, model.layer2[1])
    assert name == "layer2.1" and module is model.layer2[1]


def test_unknown_layer_error_lists_names(model):
    with pytest.raises(ValueError) as err:
        resolve_layer(model, "layer4.7")
    msg = str(err.value)
    assert "'layer4.7'" in msg and "layer4.1" in msg
    with pytest.raises(ValueError, match="unknown layer"):
        resolve_layer(model, "__import__('os')")


def test_unknown_method(model, x):
    with pytest.raises(ValueError, match="gradcam"):
        compute_cams(model, x, method="nope")


def test_zero_gradient_gives_zeros_not_nan(x):
    model = make_model("resnet18")
    with torch.no_grad():
        model.fc.weight.zero_()
    for cam in compute_cams(model, x, method="gradcam").cams:
        assert np.isfinite(cam).all() and not cam.any()


def test_normalize_cam():
    out = normalize_cam(np.full((3, 3), 5.0), (7, 4))
    assert out.shape == (4, 7) and out.dtype == np.float32 and not out.any()
    out = normalize_cam(np.array([[np.nan, 1.0], [-2.0, 3.0]]), (4, 4))
    assert np.isfinite(out).all() and out.min() == 0 and out.max() == pytest.approx(1.0)


def test_normalize_cam_is_the_library_post_processing():
    from pytorch_grad_cam.utils.image import scale_cam_image

    raw = np.random.default_rng(0).normal(size=(7, 7)).astype(np.float32)
    theirs = scale_cam_image(scale_cam_image(np.maximum(raw, 0)[None], (50, 30)))[0]
    np.testing.assert_allclose(normalize_cam(raw, (50, 30)), theirs, atol=1e-6)


def test_gradcam_does_not_import_the_library():
    """The default method must not pay pytorch-grad-cam's imports (torchvision, scipy,
    matplotlib): they were most of the app's cold start."""
    import subprocess
    import sys

    code = ("import sys, torch; from cbam_viz.engine.cam import compute_cams; from conftest import make_model; "
            "compute_cams(make_model('resnet18_cbam'), torch.randn(1, 3, 64, 64), method='gradcam'); "
            "print(sorted(m for m in ('pytorch_grad_cam', 'torchvision', 'matplotlib', 'scipy') if m in sys.modules))")
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{root / 'tests'}"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("method", SLOW)
def test_library_methods_restore_everything(method):
    model = make_model("resnet18_cbam")
    model.train()
    layer4_last = model.layer4[-1]
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    # layer2.1 has 128 channels: 4x fewer perturbation passes than layer4 (FullGrad ignores it).
    r = compute_cams(model, x, method=method, layer="layer2.1", sizes=[(40, 24)])
    assert r.cams[0].shape == (24, 40) and np.isfinite(r.cams[0]).all()
    assert 0 <= r.cams[0].min() and r.cams[0].max() <= 1
    assert all(m.training for m in model.modules())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert model.layer4[-1] is layer4_last
    assert_no_hooks(model)


def test_preserved_state_restores_swapped_module():
    model = make_model("resnet18")
    original = model.layer1
    with pytest.raises(RuntimeError):
        with preserved_state(model):
            model.layer1 = torch.nn.Identity()
            raise RuntimeError("fail mid-way")
    assert model.layer1 is original


def test_works_inside_inference_mode(model):
    with torch.inference_mode():
        x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
        r = compute_cams(model, x, method="gradcam")
    ref = compute_cams(model, x.clone(), method="gradcam")
    np.testing.assert_allclose(r.cams[0], ref.cams[0], atol=1e-6)
    assert r.cams[0].max() == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["gradcam", "fullgrad"])
def test_works_inside_no_grad(method):
    model = make_model("resnet18")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))  # 2x2 at layer4: a 1x1 CAM normalises to 0
    with torch.no_grad():
        r = compute_cams(model, x, method=method)
        assert not torch.is_grad_enabled()  # the caller's mode is left as it was
    assert np.isfinite(r.cams[0]).all() and r.cams[0].max() == pytest.approx(1.0)
