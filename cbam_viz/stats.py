"""Bootstrap confidence intervals for per-image metrics, single and paired.

A mean over 134 images moves by several points from one sample of images to the next; the
question "is CBAM's Grad-CAM better?" is only answered by the *paired* difference: both models
are scored on the same images, so resampling images (not models) and recomputing
``stat(cbam) - stat(baseline)`` on each resample gives an interval for the difference that
accounts for the images being shared (Efron & Tibshirani 1993, ch. 13; the percentile method).

A statistic is a function of a resampled batch: it takes ``(B, n, ...)`` (B resamples of the n
images' values) and returns ``(B,)``. :func:`mean_stat` is the plain mean; MaxBoxAcc, whose
threshold is chosen over the whole set, is :func:`max_box_acc_stat` on ``(n, n_thresholds)``
IoUs, so its interval includes the threshold's own variability.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import math

import numpy as np

__all__ = ["Interval", "bootstrap", "paired_bootstrap", "mean_stat", "max_box_acc_stat", "pearson", "to_json_list",
           "from_json_list"]

Statistic = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval, over ``n`` images."""

    value: float
    low: float
    high: float
    n: int
    level: float = 0.95

    def excludes_zero(self) -> bool:
        return bool(self.low > 0 or self.high < 0)

    def to_json(self) -> dict:
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict) -> "Interval":
        return cls(**{k: (float("nan") if v is None else v) for k, v in d.items()})


def mean_stat(samples: np.ndarray) -> np.ndarray:
    """Mean over images: ``(B, n)`` -> ``(B,)``."""
    return samples.mean(axis=1)


def max_box_acc_stat(iou_threshold: float = 0.5) -> Statistic:
    """MaxBoxAcc of resampled ``(B, n, T)`` IoUs: the best threshold's accuracy, per resample."""

    def stat(samples: np.ndarray) -> np.ndarray:
        return (samples >= iou_threshold).mean(axis=1).max(axis=-1)

    return stat


def _valid_rows(*arrays: np.ndarray) -> np.ndarray:
    ok = np.ones(len(arrays[0]), dtype=bool)
    for a in arrays:
        ok &= ~np.isnan(a.reshape(len(a), -1)).any(axis=1)
    return ok


def _resampled_stats(
    stat: Statistic, arrays: tuple[np.ndarray, ...], n_boot: int, seed: int, chunk_bytes: int = 64 << 20
) -> list[np.ndarray]:
    """``stat`` of each array over the same ``n_boot`` resamples of its rows (the pairing).

    The resample indices are drawn a chunk of rows at a time from one generator, which gives the
    same draws as one ``(n_boot, n)`` matrix (10,000 x 3,925 indices would be 314 MB) while
    holding only ``chunk_bytes`` of gathered values at once.
    """
    n = len(arrays[0])
    rng = np.random.default_rng(seed)
    per = max(1, max(a[0].nbytes for a in arrays) * n)
    step = max(1, chunk_bytes // per)
    out: list[list[np.ndarray]] = [[] for _ in arrays]
    for start in range(0, n_boot, step):
        idx = rng.integers(0, n, size=(min(step, n_boot - start), n))
        for parts, a in zip(out, arrays):
            parts.append(stat(a[idx]))
    return [np.concatenate(parts) for parts in out]


def _interval(point: float, boots: np.ndarray, n: int, level: float) -> Interval:
    alpha = (1 - level) / 2
    low, high = np.quantile(boots, [alpha, 1 - alpha])
    # The percentile interval of a skewed statistic can miss its own point estimate by a hair;
    # widen to include it so a table never prints a value outside its interval.
    return Interval(float(point), float(min(low, point)), float(max(high, point)), n, level)


def bootstrap(
    values: np.ndarray, *, stat: Statistic = mean_stat, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> Interval:
    """Point estimate and percentile-bootstrap interval of ``stat`` over images (axis 0).

    Rows holding ``nan`` (an image the metric does not apply to) are dropped first; with no row
    left the result is all ``nan`` and ``n=0``.
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[_valid_rows(values)]
    n = len(values)
    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0, level)
    point = float(stat(values[None])[0])
    (boots,) = _resampled_stats(stat, (values,), n_boot, seed)
    return _interval(point, boots, n, level)


def paired_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    *,
    stat: Statistic = mean_stat,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """``stat(a) - stat(b)`` with a paired bootstrap interval: the same image draws for both.

    ``a[i]`` and ``b[i]`` must be the same image; pairs where either holds ``nan`` are dropped.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same shape, got {a.shape} and {b.shape}")
    ok = _valid_rows(a, b)
    a, b = a[ok], b[ok]
    n = len(a)
    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0, level)
    point = float(stat(a[None])[0] - stat(b[None])[0])
    boots_a, boots_b = _resampled_stats(stat, (a, b), n_boot, seed)
    boots = boots_a - boots_b
    return _interval(point, boots, n, level)

def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two maps, defined for flat maps too.

    A flat map has no pattern to agree with, so the correlation of a flat map with a varying one
    is 0 (e.g. an ablation that leaves the CAM empty has changed it completely); two equal flat
    maps correlate 1, two different flat maps 0. Never nan, so means over images stay means.
    """
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    da, db = a - a.mean(), b - b.mean()
    saa, sbb = float(da @ da), float(db @ db)
    flat_a, flat_b = saa <= 1e-12 * max(1, len(a)), sbb <= 1e-12 * max(1, len(b))
    if flat_a or flat_b:
        return 1.0 if flat_a and flat_b and np.allclose(a, b, atol=1e-6) else 0.0
    return float(da @ db / np.sqrt(saa * sbb))


def to_json_list(values, digits: int = 4) -> list:
    """Per-image numbers -> a JSON list, rounded, with ``None`` for NaN or infinity (strict JSON has neither)."""
    return [None if not math.isfinite(v) else round(v, digits) for v in np.asarray(values, np.float64).tolist()]


def from_json_list(values) -> np.ndarray:
    """A JSON list of :func:`to_json_list` -> float64 array, ``None`` back to NaN."""
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)
