import numpy as np
import pytest
from PIL import Image

from cbam_viz.controls import check_target
from cbam_viz.explain import Explanation, explain, explain_model, list_methods
from conftest import TINY_CLASSES, assert_no_hooks, make_image, run_on_threads


def _check_model_explanation(m, size, cbam: bool):
    w, h = size
    assert m.cam.shape == (h, w) and m.cam.dtype == np.float32
    assert np.isfinite(m.cam).all() and 0 <= m.cam.min() and m.cam.max() <= 1
    probs = [p.prob for p in m.predictions]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-5
    assert m.target_label == TINY_CLASSES[m.target]
    assert {"forward_backward", "cam", "total"} <= set(m.timings)
    if cbam:
        assert len(m.spatial_attention) == 8 and set(m.spatial_attention) == set(m.channel_attention)
        assert m.spatial_attention["layer1.0"].shape == (16, 16)  # 64 px input
        assert m.channel_attention["layer4.1"].shape == (512,)
        for a in m.spatial_attention.values():
            assert a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    else:
        assert m.spatial_attention == {} and m.channel_attention == {}


def test_non_square_image(tiny_pair):
    img = make_image(90, 50)
    (e,) = explain(img, tiny_pair, topk=2)
    assert isinstance(e, Explanation)
    assert e.image_size == (90, 50) and e.method == "gradcam" and e.layer == "layer4.1"
    _check_model_explanation(e.baseline, (90, 50), cbam=False)
    _check_model_explanation(e.cbam, (90, 50), cbam=True)
    assert len(e.cbam.predictions) == 2
    assert e.cbam.target == e.cbam.predictions[0].index  # default target: predicted class
    assert e.cbam.cam.max() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        e.cbam.cam[0, 0] = 0.5  # results are frozen, arrays included
    assert_no_hooks(tiny_pair.cbam.model)
    assert_no_hooks(tiny_pair.baseline.model)


def test_constant_image_and_odd_modes(tiny_pair):
    for img in (Image.new("RGB", (40, 30), (128, 128, 128)), Image.new("L", (1, 1), 0), make_image(33, 70, mode="RGBA")):
        (e,) = explain(img, tiny_pair)
        for m in (e.baseline, e.cbam):
            assert m.cam.shape == (img.height, img.width)
            assert np.isfinite(m.cam).all() and 0 <= m.cam.min() and m.cam.max() <= 1


def test_target_by_index_and_name(tiny_pair, image):
    by_index = explain(image, tiny_pair, target=2)[0]
    by_name = explain(image, tiny_pair, target="bird")[0]
    by_case = explain(image, tiny_pair, target=" Bird ")[0]
    assert by_index.cbam.target == by_name.cbam.target == by_case.cbam.target == 2
    assert by_name.baseline.target_label == "bird"
    np.testing.assert_array_equal(by_index.cbam.cam, by_name.cbam.cam)
    other = explain(image, tiny_pair, target=0)[0]
    assert not np.allclose(other.cbam.cam, by_index.cbam.cam)  # the target matters


@pytest.mark.parametrize("target, match", [
    ("birb", "did you mean 'bird'"), ("zebra", "classes are: cat, dog, bird"), (3, "out of range"),
    (-1, "out of range"), (True, "class index or name"), (1.5, "class index or name"),
])
def test_target_errors(tiny_pair, image, target, match):
    with pytest.raises(ValueError, match=match):
        explain(image, tiny_pair, target=target)


def test_resolve_target_by_id(tiny_pair, image):
    assert check_target("c1", TINY_CLASSES, ("c0", "c1", "c2")) == 1
    assert check_target(None, TINY_CLASSES) is None
    assert explain(image, tiny_pair, target="c1")[0].cbam.target == 1


def test_layer_and_other_argument_errors(tiny_pair, image):
    (e,) = explain(image, tiny_pair, layer="layer3.1")
    assert e.layer == "layer3.1" and e.cbam.cam.shape == (60, 80)
    with pytest.raises(ValueError, match="layer4.1"):
        explain(image, tiny_pair, layer="layer9")
    with pytest.raises(ValueError, match="(?i)unknown CAM method"):
        explain(image, tiny_pair, method="magic")
    with pytest.raises(ValueError, match="topk"):
        explain(image, tiny_pair, topk=0)
    with pytest.raises(ValueError, match="no images"):
        explain([], tiny_pair)
    with pytest.raises(ValueError, match="2 targets given for 1 images"):
        explain([image], tiny_pair, target=[0, 1])


def test_batched_equals_per_image(tiny_pair):
    images = [make_image(80, 60, seed=1), make_image(30, 90, seed=2), make_image(64, 64, seed=3)]
    batched = explain(images, tiny_pair, target=[None, "dog", 0])
    for img, t, b in zip(images, [None, "dog", 0], batched):
        (single,) = explain(img, tiny_pair, target=t)
        assert b.image_size == img.size
        for role in ("baseline", "cbam"):
            mb, ms = getattr(b, role), getattr(single, role)
            assert mb.target == ms.target
            np.testing.assert_allclose(mb.cam, ms.cam, atol=1e-4)
            np.testing.assert_allclose([p.prob for p in mb.predictions], [p.prob for p in ms.predictions], atol=1e-5)
            for block in ms.spatial_attention:
                np.testing.assert_allclose(mb.spatial_attention[block], ms.spatial_attention[block], atol=1e-4)
                np.testing.assert_allclose(mb.channel_attention[block], ms.channel_attention[block], atol=1e-4)


def test_threads_give_sequential_results(tiny_pair):
    images = [make_image(48 + i, 40 + 2 * i, seed=i) for i in range(16)]
    sequential = [explain(img, tiny_pair)[0] for img in images]
    threaded = run_on_threads(lambda img: explain(img, tiny_pair)[0], images, threads=8)
    for s, t in zip(sequential, threaded):
        for role in ("baseline", "cbam"):
            np.testing.assert_allclose(getattr(t, role).cam, getattr(s, role).cam, atol=1e-6)
            assert getattr(t, role).predictions == getattr(s, role).predictions
    assert_no_hooks(tiny_pair.cbam.model)


@pytest.mark.parametrize("method", list_methods())
def test_every_method_runs(micro_pair, method):
    layer = "layer2.1" if method in ("scorecam", "ablationcam") else None  # 128 channels to perturb, not 512
    (e,) = explain(make_image(40, 24, seed=5), micro_pair, method=method, layer=layer)
    assert e.method == method
    for m in (e.baseline, e.cbam):
        assert m.cam.shape == (24, 40) and np.isfinite(m.cam).all()
        assert 0 <= m.cam.min() and m.cam.max() <= 1
    assert_no_hooks(micro_pair.cbam.model)
    assert all(not m.training for m in micro_pair.cbam.model.modules())


def test_explain_model_single(tiny_pair, image):
    (m,) = explain_model(image, tiny_pair.cbam, target="cat", topk=3)
    assert m.target == 0 and len(m.predictions) == 3
    assert m.model_name == "tiny resnet18_cbam"


def test_each_model_pass_holds_its_model_lock(tiny_pair, image):
    """Every forward over a model runs while its thread holds that model's one lock."""
    from cbam_viz.pair import model_lock

    unlocked = []

    def spy(module, args):
        if not model_lock(module)._is_owned():  # the RLock's own "held by this thread?" check
            unlocked.append(module)

    handles = [m.model.register_forward_pre_hook(spy) for m in (tiny_pair.baseline, tiny_pair.cbam)]
    try:
        explain(image, tiny_pair)
        explain_model(image, tiny_pair.baseline)
    finally:
        for h in handles:
            h.remove()
    assert not unlocked
    assert_no_hooks(tiny_pair.cbam.model)
