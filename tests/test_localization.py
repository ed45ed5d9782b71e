"""Localization metrics (cbam_viz.research.quality.metrics) on hand-made CAMs with known answers."""
import numpy as np
import pytest
import torch
from torchvision.ops import box_iou as tv_box_iou

from cbam_viz.research.quality.boxes import Box
from cbam_viz.research.quality.metrics import (
    DEFAULT_THRESHOLDS, box_hits_over_thresholds, box_iou, cam_to_box, energy_in_boxes, max_box_acc, pointing_game,
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


def test_box_iou_is_torchvisions_with_exclusive_max():
    """``xmax``/``ymax`` are exclusive pixel edges: a box's area is (xmax - xmin) * (ymax - ymin)."""
    whole = Box(0, 0, 224, 224)  # covers a whole 224 x 224 image
    cases = [
        (whole, Box(0, 0, 112, 224), 0.5),                       # the left half
        (Box(0, 0, 10, 10), Box(10, 0, 20, 10), 0.0),            # touching edges share no pixel
        (Box(0, 0, 10, 10), Box(9, 9, 20, 20), 1 / (100 + 121 - 1)),  # one shared pixel
        (Box(2, 2, 6, 6), Box(0, 0, 8, 8), 16 / 64),              # contained
        (Box(0.5, 0, 2.5, 1), Box(1.5, 0, 3.5, 1), 1 / 3),       # fractional edges
        (Box(0, 0, 4, 4), Box(10, 10, 12, 12), 0.0),             # disjoint
    ]
    for a, b, expected in cases:
        ref = float(tv_box_iou(torch.tensor([a.as_list()], dtype=torch.float64),
                               torch.tensor([b.as_list()], dtype=torch.float64))[0, 0])
        assert box_iou(a, b) == pytest.approx(expected) == pytest.approx(ref)
        assert box_iou(b, a) == box_iou(a, b)


def test_box_hits_take_the_best_box_at_each_threshold():
    """Several true boxes: each threshold's CAM box scores its best IoU with any of them."""
    # A bright small blob on the first box, a dim larger one on the second.
    cam = blob(10, 20, 30, 40) * 0.6 + blob(36, 36, 64, 64) * 0.4 + 0.05
    boxes = [BOX, Box(36, 36, 64, 64), Box(0, 0, 4, 4)]
    ious = box_hits_over_thresholds(cam, boxes)
    norm = (cam - cam.min()) / (cam.max() - cam.min())
    for i, t in enumerate(DEFAULT_THRESHOLDS):
        pred = cam_to_box(norm, float(t))
        expected = 0.0 if pred is None else max(box_iou(pred, b) for b in boxes)
        assert ious[i] == pytest.approx(expected, abs=1e-6)
    assert ious.dtype == np.float32
    assert ious[10] == pytest.approx(1.0) and ious[90] == pytest.approx(1.0)  # the large blob, then the bright one
