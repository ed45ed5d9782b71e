"""The library-run CAMs (Score-CAM, Ablation-CAM, FullGrad) equal pytorch-grad-cam's own objects run
on a copy of the model, for two different targets per image, and the target changes the map."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from cbam_viz.engine.cam import compute_cams
from cbam_viz.engine.cam_library import ABLATION_BATCH, SCORECAM_BATCH, math_object, quiet_progress, run_library_cam
from conftest import assert_no_hooks, make_model

pytestmark = pytest.mark.usefixtures("one_thread")

LAYER = "layer2.1"  # 128 channels: a quarter of layer4's perturbation passes
METHODS = {"scorecam": "ScoreCAM", "ablationcam": "AblationCAM", "fullgrad": "FullGrad"}


@pytest.fixture(scope="module")
def model():
    return make_model("resnet18_cbam", seed=2)


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def _library(model, x, class_name, targets):
    """The library's own object on a copy of the model, its documented call, nothing of ours."""
    import pytorch_grad_cam
    from pytorch_grad_cam.ablation_layer import AblationLayer
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    m = copy.deepcopy(model).eval()
    layer = m.get_submodule(LAYER)
    cls = getattr(pytorch_grad_cam, class_name)
    if class_name == "FullGrad":
        cam = cls(m, [])
    elif class_name == "AblationCAM":
        cam = cls(m, [layer], ablation_layer=AblationLayer(), batch_size=ABLATION_BATCH)
    else:
        cam = cls(m, [layer])
        cam.batch_size = SCORECAM_BATCH
    with quiet_progress():
        out = cam(input_tensor=x.clone(), targets=[ClassifierOutputTarget(t) for t in targets])
    cam.activations_and_grads.release()
    return out


@pytest.mark.parametrize("method", list(METHODS))
def test_library_run_methods_equal_the_librarys_objects_for_each_target(model, x, method):
    maps = {}
    for targets in ([0, 2], [2, 1]):
        ours = compute_cams(model, x, method=method, layer=LAYER, targets=targets)
        assert ours.targets == targets
        expected = _library(model, x, METHODS[method], targets)
        for i in range(2):
            assert ours.cams[i].shape == (32, 32)
            np.testing.assert_allclose(ours.cams[i], expected[i], atol=2e-5, err_msg=f"{method} {targets} image {i}")
            maps[(i, targets[i])] = ours.cams[i]
    # The class asked for changes the map: 0 vs 2 on the first image, 2 vs 1 on the second.
    assert np.abs(maps[(0, 0)] - maps[(0, 2)]).max() > 1e-3
    assert np.abs(maps[(1, 2)] - maps[(1, 1)]).max() > 1e-3
    assert_no_hooks(model)


def test_run_library_cam_takes_one_target_per_image_and_releases_its_hooks(model, x):
    layer = model.get_submodule(LAYER)
    with torch.enable_grad():
        a = run_library_cam(model, x, "ScoreCAM", layer, [1, 0])
        b = run_library_cam(model, x[[1, 0]], "ScoreCAM", layer, [0, 1])
    assert a.shape == (2, 32, 32)
    np.testing.assert_allclose(a, b[[1, 0]], atol=1e-5)  # each image keeps its own class
    assert_no_hooks(model)


def test_quiet_progress_swaps_tqdm_while_any_user_is_inside_and_restores_it():
    from pytorch_grad_cam import ablation_cam, score_cam

    originals = (score_cam.tqdm, ablation_cam.tqdm)
    with quiet_progress():
        silent = score_cam.tqdm
        assert silent is not originals[0] and ablation_cam.tqdm is silent
        assert list(silent.tqdm(range(3), total=3)) == [0, 1, 2]
        with quiet_progress():
            assert score_cam.tqdm is silent
        assert score_cam.tqdm is silent and ablation_cam.tqdm is silent  # the outer user is still inside
    assert (score_cam.tqdm, ablation_cam.tqdm) == originals
    with pytest.raises(RuntimeError):
        with quiet_progress():
            raise RuntimeError("boom")
    assert (score_cam.tqdm, ablation_cam.tqdm) == originals


def test_math_objects_are_shared_and_record_nothing():
    obj = math_object("GradCAM")
    assert math_object("GradCAM") is obj
    assert obj.activations_and_grads.handles == [] or all(
        h.id not in getattr(obj.model.layer, "_forward_hooks", {}) for h in obj.activations_and_grads.handles)
    assert_no_hooks(obj.model)
