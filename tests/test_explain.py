import dataclasses

import numpy as np
import pytest
from PIL import Image

from cbam_viz.engine.controls import check_controls, check_target
from cbam_viz.engine.explain import Explanation, explain, explain_checked, explain_model, list_methods
from cbam_viz.engine.lineup import Lineup
from conftest import TINY_CLASSES, assert_no_hooks, make_image, run_on_threads


def _ref(e):
    """The plain reference member's explanation (the lineup's first member)."""
    return e.models[e.reference]


def _cbam(e):
    """The CBAM member's explanation (the lineup's last member)."""
    return list(e.models.values())[-1]


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


def test_non_square_image(tiny_lineup):
    img = make_image(90, 50)
    (e,) = explain(img, tiny_lineup, topk=2)
    assert isinstance(e, Explanation)
    assert e.image_size == (90, 50) and e.method == "gradcam" and e.layer == "layer4.1"
    assert e.reference == tiny_lineup.members[0].name and list(e.models) == tiny_lineup.names
    assert e.reference_model is e.models[e.reference]
    _check_model_explanation(_ref(e), (90, 50), cbam=False)
    _check_model_explanation(_cbam(e), (90, 50), cbam=True)
    assert len(_cbam(e).predictions) == 2
    assert _cbam(e).target == _cbam(e).predictions[0].index  # default target: predicted class
    assert _cbam(e).cam.max() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        _cbam(e).cam[0, 0] = 0.5  # results are frozen, arrays included
    assert_no_hooks(tiny_lineup.members[-1].model)
    assert_no_hooks(tiny_lineup.members[0].model)


def test_constant_image_and_odd_modes(tiny_lineup):
    for img in (Image.new("RGB", (40, 30), (128, 128, 128)), Image.new("L", (1, 1), 0), make_image(33, 70, mode="RGBA")):
        (e,) = explain(img, tiny_lineup)
        for m in (_ref(e), _cbam(e)):
            assert m.cam.shape == (img.height, img.width)
            assert np.isfinite(m.cam).all() and 0 <= m.cam.min() and m.cam.max() <= 1


def test_target_by_index_and_name(tiny_lineup, image):
    by_index = explain(image, tiny_lineup, target=2)[0]
    by_name = explain(image, tiny_lineup, target="bird")[0]
    by_case = explain(image, tiny_lineup, target=" Bird ")[0]
    assert _cbam(by_index).target == _cbam(by_name).target == _cbam(by_case).target == 2
    assert _ref(by_name).target_label == "bird"
    np.testing.assert_array_equal(_cbam(by_index).cam, _cbam(by_name).cam)
    other = explain(image, tiny_lineup, target=0)[0]
    assert not np.allclose(_cbam(other).cam, _cbam(by_index).cam)  # the target matters


@pytest.mark.parametrize("target, match", [
    ("birb", "did you mean 'bird'"), ("zebra", "classes are: cat, dog, bird"), (3, "out of range"),
    (-1, "out of range"), (True, "class index or name"), (1.5, "class index or name"),
])
def test_target_errors(tiny_lineup, image, target, match):
    with pytest.raises(ValueError, match=match):
        explain(image, tiny_lineup, target=target)


def test_resolve_target_by_id(tiny_lineup, image):
    assert check_target("c1", TINY_CLASSES, ("c0", "c1", "c2")) == 1
    assert check_target(None, TINY_CLASSES) is None
    assert _cbam(explain(image, tiny_lineup, target="c1")[0]).target == 1


def test_layer_and_other_argument_errors(tiny_lineup, image):
    (e,) = explain(image, tiny_lineup, layer="layer3.1")
    assert e.layer == "layer3.1" and _cbam(e).cam.shape == (60, 80)
    with pytest.raises(ValueError, match="layer4.1"):
        explain(image, tiny_lineup, layer="layer9")
    with pytest.raises(ValueError, match="(?i)unknown CAM method"):
        explain(image, tiny_lineup, method="magic")
    with pytest.raises(ValueError, match="topk"):
        explain(image, tiny_lineup, topk=0)
    with pytest.raises(ValueError, match="no images"):
        explain([], tiny_lineup)
    with pytest.raises(ValueError, match="2 targets given for 1 images"):
        explain([image], tiny_lineup, target=[0, 1])


def test_batched_equals_per_image(tiny_lineup):
    images = [make_image(80, 60, seed=1), make_image(30, 90, seed=2), make_image(64, 64, seed=3)]
    batched = explain(images, tiny_lineup, target=[None, "dog", 0])
    for img, t, b in zip(images, [None, "dog", 0], batched):
        (single,) = explain(img, tiny_lineup, target=t)
        assert b.image_size == img.size
        assert list(b.models) == list(single.models) == tiny_lineup.names
        for name in tiny_lineup.names:
            mb, ms = b.models[name], single.models[name]
            assert mb.target == ms.target
            np.testing.assert_allclose(mb.cam, ms.cam, atol=1e-4)
            np.testing.assert_allclose([p.prob for p in mb.predictions], [p.prob for p in ms.predictions], atol=1e-5)
            for block in ms.spatial_attention:
                np.testing.assert_allclose(mb.spatial_attention[block], ms.spatial_attention[block], atol=1e-4)
                np.testing.assert_allclose(mb.channel_attention[block], ms.channel_attention[block], atol=1e-4)


def test_threads_give_sequential_results(tiny_lineup):
    images = [make_image(48 + i, 40 + 2 * i, seed=i) for i in range(16)]
    sequential = [explain(img, tiny_lineup)[0] for img in images]
    threaded = run_on_threads(lambda img: explain(img, tiny_lineup)[0], images, threads=8)
    for s, t in zip(sequential, threaded):
        for name in tiny_lineup.names:
            np.testing.assert_allclose(t.models[name].cam, s.models[name].cam, atol=1e-6)
            assert t.models[name].predictions == s.models[name].predictions
    assert_no_hooks(tiny_lineup.members[-1].model)


@pytest.mark.parametrize("method", list_methods())
def test_every_method_runs(micro_lineup, method):
    layer = "layer2.1" if method in ("scorecam", "ablationcam") else None  # 128 channels to perturb, not 512
    (e,) = explain(make_image(40, 24, seed=5), micro_lineup, method=method, layer=layer)
    assert e.method == method
    for m in (_ref(e), _cbam(e)):
        assert m.cam.shape == (24, 40) and np.isfinite(m.cam).all()
        assert 0 <= m.cam.min() and m.cam.max() <= 1
    assert_no_hooks(micro_lineup.members[-1].model)
    assert all(not m.training for m in micro_lineup.members[-1].model.modules())


def test_explain_model_single(tiny_lineup, image):
    (m,) = explain_model(image, tiny_lineup.members[-1], target="cat", topk=3)
    assert m.target == 0 and len(m.predictions) == 3
    assert m.model_name == "tiny resnet18_cbam"


def test_each_model_pass_holds_its_model_lock(tiny_lineup, image):
    """Every forward over a model runs while its thread holds that model's one lock."""
    from cbam_viz.engine.locks import model_lock

    unlocked = []

    def spy(module, args):
        if not model_lock(module)._is_owned():  # the RLock's own "held by this thread?" check
            unlocked.append(module)

    handles = [m.model.register_forward_pre_hook(spy) for m in (tiny_lineup.members[0], tiny_lineup.members[-1])]
    try:
        explain(image, tiny_lineup)
        explain_model(image, tiny_lineup.members[0])
    finally:
        for h in handles:
            h.remove()
    assert not unlocked
    assert_no_hooks(tiny_lineup.members[-1].model)


# ------------------------------------------------------------------ lineups of more than two


def test_family_lineup_explains_every_member_with_its_own_gates(family_lineup, image):
    """Three members, one per gate kind: each explanation holds what that member's gates recorded."""
    (e,) = explain(image, family_lineup, topk=2)
    plain, se, cbam = family_lineup.names
    assert list(e.models) == [plain, se, cbam] and e.reference == plain
    for name, m in e.models.items():
        assert m.model_name == name and m.cam.shape == (60, 80) and len(m.predictions) == 2
    _check_model_explanation(e.models[plain], (80, 60), cbam=False)
    _check_model_explanation(e.models[cbam], (80, 60), cbam=True)
    assert e.models[se].spatial_attention == {}  # SE: channel gates only, one per block
    assert len(e.models[se].channel_attention) == 8 and e.models[se].channel_attention["layer4.1"].shape == (512,)
    assert not np.allclose(e.models[se].cam, e.models[cbam].cam)  # three different models
    for m in family_lineup.members:
        assert_no_hooks(m.model)


def test_explain_checked_equals_explain_on_three_members(family_lineup):
    images = [make_image(80, 60, seed=1), make_image(30, 44, seed=2)]
    controls = check_controls(family_lineup, method="gradcam++", target="dog", layer="layer3.1")
    assert dict(controls.targets) == {name: 1 for name in family_lineup.names}
    checked = explain_checked(images, family_lineup, controls, topk=2)
    plain = explain(images, family_lineup, method="gradcam++", target="dog", layer="layer3.1", topk=2)
    for c, p in zip(checked, plain):
        assert (c.method, c.layer, c.reference, list(c.models)) == (p.method, p.layer, p.reference, list(p.models))
        for name in family_lineup.names:
            assert c.models[name].target == 1 and c.models[name].target_label == "dog"
            np.testing.assert_allclose(c.models[name].cam, p.models[name].cam, atol=1e-5)
            assert c.models[name].predictions == p.models[name].predictions
    auto = explain_checked(images[:1], family_lineup, check_controls(family_lineup))[0]
    for m in auto.models.values():
        assert m.target == m.predictions[0].index  # auto: each member explains its own top-1


def _reversed_classes(lineup: Lineup) -> Lineup:
    """``lineup`` with its last member knowing the same classes in the reverse order."""
    last = lineup.members[-1]
    flipped = dataclasses.replace(last, classes=tuple(reversed(last.classes)), class_ids=tuple(reversed(last.class_ids)))
    return Lineup(name="flipped", members=(*lineup.members[:-1], flipped), reference=lineup.reference)


def test_check_controls_resolves_the_target_per_member(tiny_lineup, image):
    lineup = _reversed_classes(tiny_lineup)
    ref, other = lineup.names
    controls = check_controls(lineup, target=" bird ")
    assert dict(controls.targets) == {ref: 2, other: 0}  # each member's own index of "bird"
    assert (controls.target, controls.target_index, controls.target_label) == ("bird", 2, "bird")
    assert dict(check_controls(lineup, target="c0").targets) == {ref: 0, other: 2}  # by class id too
    assert dict(check_controls(lineup, target=1).targets) == {ref: 1, other: 1}  # an index is an index
    assert dict(check_controls(lineup).targets) == {ref: None, other: None}
    (e,) = explain_checked([image], lineup, controls)
    assert (e.models[ref].target, e.models[other].target) == (2, 0)
    assert e.models[ref].target_label == e.models[other].target_label == "bird"
    (same,) = explain(image, lineup, target="bird")
    assert (same.models[ref].target, same.models[other].target) == (2, 0)
    np.testing.assert_allclose(same.models[other].cam, e.models[other].cam, atol=1e-6)


def test_check_controls_refuses_a_class_one_member_lacks(tiny_lineup):
    last = tiny_lineup.members[-1]
    fish = dataclasses.replace(last, classes=("cat", "dog", "fish"))
    lineup = Lineup(name="mixed", members=(tiny_lineup.members[0], fish), reference=tiny_lineup.reference)
    with pytest.raises(ValueError, match="Unknown target class 'bird'"):
        check_controls(lineup, target="bird")
    assert dict(check_controls(lineup, target="dog").targets) == {n: 1 for n in lineup.names}


def test_npz_arrays_of_a_three_member_explanation_are_keyed_by_member(family_lineup, image, tmp_path):
    from cbam_viz.outputs import npz_arrays, write_npz

    (e,) = explain(image, family_lineup)
    plain, se, cbam = family_lineup.names
    path = write_npz(npz_arrays(e, image), tmp_path / "maps.npz")
    with np.load(path) as z:
        keys = set(z.files)
        blocks = list(e.models[cbam].spatial_attention)
        assert keys == ({"image"} | {f"{n}/cam" for n in (plain, se, cbam)}
                        | {f"{n}/channel/{b}" for n in (se, cbam) for b in blocks} | {f"{cbam}/spatial/{b}" for b in blocks})
        assert z["image"].shape == (60, 80, 3) and z["image"].dtype == np.uint8
        for name, m in e.models.items():
            np.testing.assert_array_equal(z[f"{name}/cam"], m.cam)
            for b, v in m.channel_attention.items():
                np.testing.assert_array_equal(z[f"{name}/channel/{b}"], v)
            for b, v in m.spatial_attention.items():
                np.testing.assert_array_equal(z[f"{name}/spatial/{b}"], v)
