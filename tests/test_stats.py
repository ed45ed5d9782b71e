"""Bootstrap intervals: contain the estimate, shrink with n, pair images."""
import numpy as np
import pytest

from cbam_viz.stats import Interval, bootstrap, max_box_acc_stat, paired_bootstrap


def test_interval_contains_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (20, 200, 2000):
        x = rng.normal(0.5, 0.2, n)
        ci = bootstrap(x, n_boot=1000)
        assert ci.low <= ci.value <= ci.high
        assert ci.value == pytest.approx(x.mean())
        assert ci.n == n
        widths.append(ci.high - ci.low)
    assert widths[0] > widths[1] > widths[2]
    # ~ 2 * 1.96 * sd / sqrt(n)
    assert widths[2] == pytest.approx(2 * 1.96 * 0.2 / np.sqrt(2000), rel=0.2)


def test_nan_rows_dropped_and_all_nan():
    ci = bootstrap(np.array([1.0, np.nan, 3.0]), n_boot=200)
    assert ci.n == 2 and ci.value == 2.0
    empty = bootstrap(np.array([np.nan, np.nan]))
    assert empty.n == 0 and np.isnan(empty.value)
    assert Interval.from_json(empty.to_json()).n == 0
    assert empty.to_json()["value"] is None


def test_paired_bootstrap_sees_a_consistent_small_difference():
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 1, 100)  # large spread between images
    better = base + 0.02 + rng.normal(0, 0.005, 100)  # small but consistent gain per image
    diff = paired_bootstrap(better, base, n_boot=1000)
    assert diff.low > 0 and diff.excludes_zero()
    assert diff.value == pytest.approx(0.02, abs=0.003)
    # Unpaired intervals overlap: only pairing shows the difference is real.
    a, b = bootstrap(better, n_boot=1000), bootstrap(base, n_boot=1000)
    assert a.low < b.high
    same = paired_bootstrap(base, base, n_boot=200)
    assert same.value == same.low == same.high == 0.0
    with pytest.raises(ValueError):
        paired_bootstrap(base, base[:5])


def test_max_box_acc_stat_on_threshold_curves():
    # Image 0 is correct at thresholds 0-1, image 1 at 1-2: the best threshold (1) gets both.
    ious = np.array([[0.9, 0.6, 0.1], [0.2, 0.7, 0.8]])
    ci = bootstrap(ious, stat=max_box_acc_stat(0.5), n_boot=300)
    assert ci.value == 1.0 and ci.low <= 1.0
    worse = np.array([[0.9, 0.1, 0.1], [0.1, 0.1, 0.8]])
    d = paired_bootstrap(ious, worse, stat=max_box_acc_stat(0.5), n_boot=300)
    assert d.value == pytest.approx(0.5)


def test_resamples_drawn_in_chunks_match_one_index_matrix():
    """Chunking bounds memory only: every chunk size gives the draws of one (n_boot, n) matrix."""
    from cbam_viz.stats import _resampled_stats, mean_stat

    rng = np.random.default_rng(3)
    a, b = rng.random(101), rng.random(101)
    idx = np.random.default_rng(7).integers(0, 101, size=(250, 101))
    for chunk_bytes in (1, 8 * 101 * 3, 64 << 20):
        boots_a, boots_b = _resampled_stats(mean_stat, (a, b), 250, 7, chunk_bytes=chunk_bytes)
        np.testing.assert_array_equal(boots_a, a[idx].mean(axis=1))
        np.testing.assert_array_equal(boots_b, b[idx].mean(axis=1))
