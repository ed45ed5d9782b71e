"""Localization and faithfulness metrics on hand-made CAMs with known answers."""
import numpy as np
import pytest
import torch
from torch import nn

from cbam_viz.boxes import Box
from cbam_viz.localization import (
    DEFAULT_THRESHOLDS, blur_fill_image, box_hits_over_thresholds, box_iou, cam_to_box, confidence_drop, energy_in_boxes,
    max_box_acc, perturbation_scores, pointing_game, remove_by_cam, removal_mask,
)

BOX = Box(10, 20, 30, 40)  # 20 x 20 px in a 64 x 64 image: area share 400 / 4096


def peaked(y, x, shape=(64, 64)):
    cam = np.zeros(shape, np.float32)
    cam[y, x] = 1.0
    return cam


def blob(x0, y0, x1, y1, shape=(64, 64), value=1.0):
    cam = np.zeros(shape, np.float32)
    cam[y0:y1, x0:x1] = value
    return cam


def test_pointing_game_inside_outside_uniform_empty():
    assert pointing_game(peaked(25, 15), [BOX]) == 1.0
    assert pointing_game(peaked(5, 5), [BOX]) == 0.0
    assert pointing_game(peaked(5, 5), [BOX, Box(0, 0, 8, 8)]) == 1.0  # any box of the class
    assert pointing_game(peaked(40, 15), [BOX]) == 0.0  # ymax is exclusive
    assert pointing_game(peaked(39, 29), [BOX]) == 1.0
    assert pointing_game(peaked(45, 15), [BOX], tolerance=6) == 1.0
    # A flat CAM points nowhere in particular: chance = the box's share of the image.
    assert pointing_game(np.full((64, 64), 0.3, np.float32), [BOX]) == pytest.approx(400 / 4096)
    assert pointing_game(np.zeros((64, 64), np.float32), [BOX]) == pytest.approx(400 / 4096)
    assert np.isnan(pointing_game(peaked(25, 15), []))


def test_energy_inside_outside_uniform_empty():
    assert energy_in_boxes(blob(12, 22, 28, 38), [BOX]) == pytest.approx(1.0)
    assert energy_in_boxes(blob(40, 40, 60, 60), [BOX]) == 0.0
    half = blob(0, 20, 20, 40)  # columns 0-19: half of it (10-19) inside
    assert energy_in_boxes(half, [BOX]) == pytest.approx(0.5)
    assert energy_in_boxes(np.ones((64, 64), np.float32), [BOX]) == pytest.approx(400 / 4096)
    assert energy_in_boxes(np.zeros((64, 64), np.float32), [BOX]) == pytest.approx(400 / 4096)
    assert np.isnan(energy_in_boxes(half, []))


def test_bad_cams_rejected():
    with pytest.raises(ValueError, match="2-D"):
        energy_in_boxes(np.zeros((1, 8, 8)), [BOX])
    with pytest.raises(ValueError, match=">= 0"):
        pointing_game(-np.ones((8, 8)), [BOX])
    with pytest.raises(ValueError, match="NaN"):
        pointing_game(np.full((8, 8), np.nan), [BOX])


def test_cam_to_box_takes_largest_component():
    cam = blob(10, 20, 30, 40)
    cam[50:52, 50:52] = 1.0  # a small second component
    assert cam_to_box(cam, 0.5) == BOX
    assert cam_to_box(cam, 1.5) is None
    assert cam_to_box(np.ones((8, 6), np.float32), 0.0) == Box(0, 0, 6, 8)


def test_box_iou():
    assert box_iou(BOX, BOX) == 1.0
    assert box_iou(BOX, Box(30, 20, 50, 40)) == 0.0  # touching edges share no pixel
    assert box_iou(Box(0, 0, 10, 10), Box(5, 0, 15, 10)) == pytest.approx(50 / 150)


def test_box_hits_and_max_box_acc():
    good = blob(10, 20, 30, 40) * 0.8 + blob(14, 24, 26, 36) * 0.2  # peak inside, body = the box
    ious = box_hits_over_thresholds(good, [BOX])
    assert ious.shape == DEFAULT_THRESHOLDS.shape
    assert ious[0] == pytest.approx(400 / 4096)  # threshold 0: the whole image
    assert ious[50] == pytest.approx(1.0)  # 0.5 of the min-max range: exactly the box
    assert ious[99] == pytest.approx(144 / 400)  # only the bright core
    wrong = blob(40, 40, 60, 60)
    assert (box_hits_over_thresholds(wrong, [BOX])[1:] == 0).all()  # threshold 0 is the whole image
    flat = box_hits_over_thresholds(np.zeros((64, 64), np.float32), [BOX])
    assert flat[0] == pytest.approx(400 / 4096) and (flat[1:] == 0).all()
    assert np.isnan(box_hits_over_thresholds(good, [])).all()
    acc, best = max_box_acc(np.stack([ious, box_hits_over_thresholds(wrong, [BOX]), np.full(100, np.nan)]))
    assert acc == 0.5 and ious[best] >= 0.5


def test_removal_mask_exact_share_even_with_ties():
    cam = np.zeros((10, 10), np.float32)
    cam[:2] = 1.0  # 20 % high, 80 % tied at zero
    keep = removal_mask(cam, 0.2)
    assert keep.sum() == 80 and (keep[:2] == 0).all()
    keep = removal_mask(cam, 0.2, most_relevant=False)
    assert keep.sum() == 80 and (keep[:2] == 1).all()
    with pytest.raises(ValueError):
        removal_mask(cam, 1.0)


class _RedDetector(nn.Module):
    """Class 1's logit is the mean of channel 0 inside a fixed square; class 0 is constant."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        s = x[:, 0, 8:16, 8:16].mean(dim=(1, 2)) * 1.5
        return torch.stack([torch.zeros_like(s), s], dim=1) + self.w


def test_faithfulness_prefers_the_cam_on_the_evidence():
    model = _RedDetector().eval()
    image = torch.zeros(3, 32, 32)
    image[0, 8:16, 8:16] = 2.0  # the evidence, on a mean (0) background
    right = blob(8, 8, 16, 16, shape=(32, 32)) + 0.01
    wrong = blob(20, 20, 28, 28, shape=(32, 32)) + 0.01
    for imputer in ("mean", "blur"):
        assert remove_by_cam(image, right, 0.1, imputer=imputer)[0, 8:16, 8:16].mean() < 1.5
        good = confidence_drop(model, image, right, 1, fraction=0.2, imputer=imputer)
        bad = confidence_drop(model, image, wrong, 1, fraction=0.2, imputer=imputer)
        assert good.prob_before == pytest.approx(bad.prob_before)
        assert abs(bad.drop) < 0.05 and good.drop > bad.drop + 0.05 and good.relative_drop > bad.relative_drop
    assert confidence_drop(model, image, right, 1, imputer="mean").drop > 0.3
    # A known probability before skips that forward and changes nothing else.
    full = confidence_drop(model, image, right, 1, imputer="blur")
    known = confidence_drop(model, image, right, 1, imputer="blur", prob_before=full.prob_before)
    assert (known.prob_before, known.prob_after) == pytest.approx((full.prob_before, full.prob_after), abs=1e-6)
    s_right = perturbation_scores(model, image, right, 1, fractions=(0.1, 0.5), imputer="mean")
    s_wrong = perturbation_scores(model, image, wrong, 1, fractions=(0.1, 0.5), imputer="mean")
    road = lambda s: float(np.mean((s["lerf"] - s["morf"]) / 2))  # noqa: E731
    assert road(s_right) > 0.1 and road(s_right) > road(s_wrong)
    # A known original probability and a precomputed blur give the same numbers as computing them.
    a = perturbation_scores(model, image, right, 1, fractions=(0.3,))
    b = perturbation_scores(model, image, right, 1, fractions=(0.3,), p_original=a["p"], fill=blur_fill_image(image))
    assert a["p"] == b["p"] and np.allclose(a["morf"], b["morf"], atol=1e-6) and np.allclose(a["lerf"], b["lerf"], atol=1e-6)
    # A CAM at another size is resized to the input.
    assert confidence_drop(model, image, blob(4, 4, 8, 8, shape=(16, 16)), 1, imputer="mean").drop > 0.3


def test_road_imputer_runs():
    out = remove_by_cam(torch.rand(3, 16, 16), np.random.default_rng(0).random((16, 16)), 0.2, imputer="road")
    assert out.shape == (3, 16, 16) and torch.isfinite(out).all()
