"""Faithfulness scores against answers known by construction: what each imputer puts where, which
pixels a mask removes, and every probability equal to a separate forward of the same input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cbam_viz.engine.faithfulness import (
    IMPUTERS, ConfidenceDrop, blur_fill_image, check_cam, confidence_drop, lineup_confidence_drop,
    perturbation_scores, remove_by_cam, removal_mask, resize_cam,
)
from cbam_viz.engine.preprocess import to_model_tensor
from conftest import make_image

pytestmark = pytest.mark.usefixtures("one_thread")


def _cam(shape=(12, 14), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def _image(shape=(3, 12, 14), seed=1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class _Linear(nn.Module):
    """Logits linear in the input: class 1 reads channel 0 of the top-left quarter, class 2 channel 1."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        h, w = x.shape[-2] // 2, x.shape[-1] // 2
        a = x[:, 0, :h, :w].mean((1, 2)) * 3
        b = x[:, 1].mean((1, 2)) * 2
        return torch.stack([torch.zeros_like(a), a, b], 1) + self.w


def _prob(model, x, target):
    with torch.no_grad():
        return float(model(x[None]).softmax(1)[0, target])


# ------------------------------------------------------------------------------- imputers


def test_road_imputer_keeps_kept_pixels_changes_removed_ones_and_is_the_librarys():
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    image, cam = _image(), _cam()
    keep = torch.from_numpy(removal_mask(cam, 0.3))
    torch.manual_seed(5)
    out = remove_by_cam(image, cam, 0.3, imputer="road")
    torch.manual_seed(5)
    expected = NoisyLinearImputer()(image, keep)
    assert torch.allclose(out, expected, atol=1e-6)
    kept, removed = keep.bool(), ~keep.bool()
    assert torch.equal(out[:, kept], image[:, kept])
    assert (out[:, removed] - image[:, removed]).abs().min() > 0  # every removed value replaced
    # Linear interpolation of the neighbours: the filled values stay inside the image's range.
    assert out[:, removed].min() > image.min() - 0.1 and out[:, removed].max() < image.max() + 0.1


def test_mean_imputer_sets_removed_pixels_to_the_dataset_mean_zero():
    image, cam = _image(), _cam()
    out = remove_by_cam(image, cam, 0.25, imputer="mean")
    keep = torch.from_numpy(removal_mask(cam, 0.25)).bool()
    assert torch.equal(out[:, keep], image[:, keep]) and (out[:, ~keep] == 0).all()
    assert int((~keep).sum()) == round(0.25 * cam.size)


def test_blur_imputer_fills_removed_pixels_from_the_blurred_image():
    image, cam = _image(), _cam()
    fill = blur_fill_image(image)
    out = remove_by_cam(image, cam, 0.4, imputer="blur", most_relevant=False)
    keep = torch.from_numpy(removal_mask(cam, 0.4, most_relevant=False)).bool()
    assert torch.equal(out[:, keep], image[:, keep])
    assert torch.allclose(out[:, ~keep], fill[:, ~keep], atol=1e-6)
    assert sorted(IMPUTERS) == ["blur", "mean", "road"]


def test_blur_sigma_and_kernel_follow_the_shorter_side():
    import cv2

    image = _image((2, 64, 96))
    hwc = image.permute(1, 2, 0).numpy().copy()
    expected = cv2.GaussianBlur(hwc, (25, 25), 4.0, borderType=cv2.BORDER_REPLICATE)  # sigma 64/16, k 2*12+1
    assert np.allclose(blur_fill_image(image).permute(1, 2, 0).numpy(), expected, atol=1e-6)
    small = _image((1, 8, 8))  # sigma floor 1.0, kernel 7
    ref = cv2.GaussianBlur(small[0].numpy().copy(), (7, 7), 1.0, borderType=cv2.BORDER_REPLICATE)
    assert np.allclose(blur_fill_image(small)[0].numpy(), ref, atol=1e-6)


# --------------------------------------------------------------------------------- masks


def test_removal_mask_removes_the_top_or_the_bottom_of_the_ranking():
    cam = np.arange(20, dtype=np.float32).reshape(4, 5)  # no ties: the answer is fixed
    morf = removal_mask(cam, 0.25)
    lerf = removal_mask(cam, 0.25, most_relevant=False)
    assert morf.dtype == np.float32 and morf.shape == (4, 5)
    assert set(np.flatnonzero(morf == 0)) == {15, 16, 17, 18, 19}
    assert set(np.flatnonzero(lerf == 0)) == {0, 1, 2, 3, 4}
    assert set(np.unique(morf)) == {0.0, 1.0}
    assert removal_mask(cam, 0.5, seed=3).sum() == 10 and removal_mask(cam, 0.01).sum() == 20
    assert removal_mask(cam, 0.03).sum() == 19  # round(0.6) = 1 pixel
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError):
            removal_mask(cam, bad)
    assert removal_mask(cam, 0.999).sum() == 0


def test_flat_cam_removes_a_seeded_random_set():
    cam = np.zeros((6, 6), np.float32)
    a, b, c = removal_mask(cam, 0.5, seed=0), removal_mask(cam, 0.5, seed=0), removal_mask(cam, 0.5, seed=1)
    assert np.array_equal(a, b) and not np.array_equal(a, c) and a.sum() == 18
    assert np.array_equal(removal_mask(cam, 0.5), a)  # the default seed is 0: published scores repeat


def test_check_cam_and_resize_cam():
    assert check_cam(np.zeros((2, 3))).dtype == np.float32
    for bad in (np.zeros(3), np.full((2, 2), np.nan), np.full((2, 2), np.inf), -np.ones((2, 2))):
        with pytest.raises(ValueError):
            check_cam(bad)
    assert check_cam(np.zeros((0, 0))).shape == (0, 0)
    cam = np.zeros((4, 4), np.float32)
    cam[1:3, 1:3] = 1
    big = resize_cam(cam, (8, 12))
    assert big.shape == (8, 12) and big.min() >= 0 and big[4, 6] == pytest.approx(1.0)
    neg = resize_cam(np.array([[0, 1], [1, 0]], np.float32) * 5 - 1, (5, 5))  # overshoot below 0 clipped
    assert neg.min() == 0
    with pytest.raises(ValueError):
        remove_by_cam(_image(), np.zeros((5, 5), np.float32), 0.2)
    with pytest.raises(ValueError):
        remove_by_cam(_image(), _cam(), 0.2, imputer="nope")


# ------------------------------------------------------------------------------ probabilities


@pytest.mark.parametrize("imputer", ["mean", "blur"])
def test_perturbation_scores_equal_separate_forwards(imputer):
    model, image, cam = _Linear().eval(), _image((3, 16, 16)), _cam((16, 16))
    fractions = (0.1, 0.3, 0.6)
    scores = perturbation_scores(model, image, cam, 1, fractions=fractions, imputer=imputer)
    assert scores["p"] == pytest.approx(_prob(model, image, 1), abs=1e-6)
    for key, most in (("morf", True), ("lerf", False)):
        expected = [_prob(model, remove_by_cam(image, cam, f, most_relevant=most, imputer=imputer), 1)
                    for f in fractions]
        assert scores[key].dtype == np.float32 and scores[key].shape == (3,)
        assert np.allclose(scores[key], expected, atol=1e-6), key
    assert not np.allclose(scores["morf"], scores["lerf"])
    known = perturbation_scores(model, image, cam, 2, fractions=fractions, imputer=imputer, p_original=0.25)
    assert known["p"] == 0.25
    assert np.allclose(known["morf"], [_prob(model, remove_by_cam(image, cam, f, imputer=imputer), 2)
                                       for f in fractions], atol=1e-6)


def test_perturbation_scores_with_road_imputer_and_a_given_fill():
    model, image, cam = _Linear().eval(), _image((3, 10, 10)), _cam((10, 10))
    torch.manual_seed(0)
    scores = perturbation_scores(model, image, cam, 1, fractions=(0.5,), imputer="road")
    torch.manual_seed(0)
    morf = _prob(model, remove_by_cam(image, cam, 0.5, imputer="road"), 1)
    assert scores["morf"][0] == pytest.approx(morf, abs=1e-5)
    fill = torch.full_like(image, 7.0)  # a given fill is used as it is
    given = perturbation_scores(model, image, cam, 1, fractions=(0.5,), fill=fill)
    keep = torch.from_numpy(removal_mask(cam, 0.5))
    assert given["morf"][0] == pytest.approx(_prob(model, image * keep + fill * (1 - keep), 1), abs=1e-6)


def test_confidence_drop_equals_separate_forwards():
    model, image = _Linear().eval(), _image((3, 16, 16))
    cam = _cam((16, 16))
    d = confidence_drop(model, image, cam, 1, fraction=0.3, imputer="mean")
    assert isinstance(d, ConfidenceDrop) and (d.target, d.fraction, d.imputer) == (1, 0.3, "mean")
    perturbed = remove_by_cam(image, cam, 0.3, imputer="mean")
    assert torch.equal(d.perturbed, perturbed)
    assert d.prob_before == pytest.approx(_prob(model, image, 1), abs=1e-6)
    assert d.prob_after == pytest.approx(_prob(model, perturbed, 1), abs=1e-6)
    assert d.drop == pytest.approx(d.prob_before - d.prob_after)
    assert d.relative_drop == pytest.approx(d.drop / d.prob_before)
    assert ConfidenceDrop(0, 0.0, 0.0, 0.2, "mean", image).relative_drop == 0.0
    known = confidence_drop(model, image, cam, 1, fraction=0.3, imputer="mean", prob_before=0.9)
    assert known.prob_before == 0.9 and known.prob_after == pytest.approx(d.prob_after, abs=1e-6)
    small = confidence_drop(model, image, cam[::2, ::2].copy(), 2, imputer="mean")  # resized to the input
    assert small.prob_after == pytest.approx(
        _prob(model, remove_by_cam(image, resize_cam(cam[::2, ::2], (16, 16)), 0.2, imputer="mean"), 2), abs=1e-6)


def _mixed_sizes():
    """A lineup whose members read different input sizes (64 px and 48 px)."""
    from cbam_viz.engine.lineup import Lineup
    from conftest import make_loaded

    members = (make_loaded("resnet18", input_size=64), make_loaded("resnet18_cbam", input_size=48, seed=1))
    return Lineup(name="mixed", members=members, reference=members[0].name)


@pytest.mark.parametrize("lineup_fixture", ["tiny_lineup", "family_lineup", "mixed"])
@pytest.mark.parametrize("target", [1, None])
def test_lineup_confidence_drop_scores_each_member_with_its_own_cam_and_class(lineup_fixture, target, request):
    from cbam_viz.engine.explain import explain

    lineup = _mixed_sizes() if lineup_fixture == "mixed" else request.getfixturevalue(lineup_fixture)
    image = make_image(80, 60, seed=4)
    explanation = explain([image], lineup, target=target)[0]
    drops = lineup_confidence_drop(image, explanation, lineup, fraction=0.3, imputer="mean")
    assert list(drops) == lineup.names  # every member, in the lineup's order
    for name, d in drops.items():
        loaded, me = lineup.member(name), explanation.models[name]
        x = to_model_tensor(image, loaded.input_size, loaded.mean, loaded.std)[0]
        ref = confidence_drop(loaded.model, x, me.cam, me.target, fraction=0.3, imputer="mean")
        assert d.target == me.target == (1 if target == 1 else me.predictions[0].index)
        assert d.perturbed.shape == (3, loaded.input_size, loaded.input_size)  # the member's own input
        assert d.prob_before == pytest.approx(ref.prob_before, abs=1e-5)
        assert d.prob_after == pytest.approx(ref.prob_after, abs=1e-6)
        assert torch.equal(d.perturbed, ref.perturbed)
    perturbed = [d.perturbed for d in drops.values()]
    assert all(not torch.equal(perturbed[0], p) for p in perturbed[1:] if p.shape == perturbed[0].shape)  # own CAMs
    default = lineup_confidence_drop(image, explanation, lineup)
    assert {(d.fraction, d.imputer) for d in default.values()} == {(0.2, "blur")}
