"""Faithfulness scores (cbam_viz.engine.faithfulness): removal, imputers, confidence drop, and the model lock."""
import threading

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from cbam_viz.engine.faithfulness import (
    blur_fill_image, confidence_drop, perturbation_scores, remove_by_cam, removal_mask,
)
from cbam_viz.engine.locks import model_lock


def blob(x0, y0, x1, y1, shape=(64, 64), value=1.0):
    cam = np.zeros(shape, np.float32)
    cam[y0:y1, x0:x1] = value
    return cam


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


@pytest.mark.parametrize("shape", [(3, 32, 32), (3, 37, 53), (1, 8, 12), (3, 200, 120)])
def test_blur_fill_is_opencvs_gaussian_blur(shape):
    """The blur background is cv2.GaussianBlur, sigma = max(1, short side / 16), replicated borders."""
    image = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    c, h, w = shape
    sigma = max(1.0, min(h, w) / 16)
    k = int(2 * round(3 * sigma) + 1)
    hwc = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
    ref = cv2.GaussianBlur(hwc, (k, k), sigma, borderType=cv2.BORDER_REPLICATE).reshape(h, w, c)
    out = blur_fill_image(image)
    assert out.shape == image.shape and out.dtype == image.dtype
    assert np.allclose(out.permute(1, 2, 0).numpy(), ref, atol=1e-6)
    # Separable Gaussian, as hand-written before the move: the same numbers up to float32 rounding.
    x = torch.arange(k, dtype=torch.float32) - k // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = (g / g.sum()).numpy()
    rows = np.pad(image.numpy(), ((0, 0), (0, 0), (k // 2, k // 2)), mode="edge")
    rows = np.stack([np.convolve(r, g, mode="valid") for r in rows.reshape(-1, rows.shape[-1])]).reshape(c, h, w)
    cols = np.pad(rows, ((0, 0), (k // 2, k // 2), (0, 0)), mode="edge").transpose(0, 2, 1)
    sep = np.stack([np.convolve(r, g, mode="valid") for r in cols.reshape(-1, cols.shape[-1])]).reshape(c, w, h)
    assert np.allclose(out.numpy(), sep.transpose(0, 2, 1), atol=1e-5)


class _LockProbe(nn.Module):
    """A two-class model that records, at every forward, whether its model lock is held.

    Another thread tries the lock without blocking: it fails exactly when the forward's own
    thread holds it (the lock is re-entrant, so the forward's thread itself always could).
    """

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.held: list[bool] = []

    def forward(self, x):
        lock, free = model_lock(self), []

        def probe():
            got = lock.acquire(blocking=False)
            if got:
                lock.release()
            free.append(got)

        t = threading.Thread(target=probe)
        t.start()
        t.join()
        self.held.append(not free[0])
        s = x[:, 0].mean(dim=(1, 2))
        return torch.stack([torch.zeros_like(s), s], dim=1) + self.w


def test_every_forward_holds_the_model_lock():
    """Another thread's CAM hooks may sit on the same modules: the scores' forwards take their turn."""
    model = _LockProbe().eval()
    image = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(0))
    cam = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    confidence_drop(model, image, cam, 1)
    confidence_drop(model, image, cam, 1, prob_before=0.5, imputer="mean")
    perturbation_scores(model, image, cam, 1, fractions=(0.2, 0.5))
    perturbation_scores(model, image, cam, 1, p_original=0.5, fill=blur_fill_image(image))
    assert model.held == [True] * 4

