"""Threshold methods, calibration (FPR, conformal FDR) and opening."""
import numpy as np
import pytest
from scipy import ndimage

from bids_uad.errors import UsageError
from bids_uad.scoring.morphology import opening
from bids_uad.scoring.thresholds import (benjamini_hochberg, meanpool_threshold, otsu_threshold,
                                         threshold_map)
from bids_uad.models.calibration import Calibration, calibrate
from bids_uad.models.settings import ScoringSettings


@pytest.mark.parametrize("fpr", [0.01, 0.05])
def test_healthy_fpr_on_held_out_healthy_scores(fpr):
    rng = np.random.default_rng(0)
    cal = calibrate([rng.gamma(2.0, 1.0, (40, 40, 25))], [np.ones((40, 40, 25), bool)])
    t = cal.threshold(fpr)
    held_out = rng.gamma(2.0, 1.0, 400_000)
    assert abs(np.mean(held_out > t) - fpr) < 0.25 * fpr


def test_conformal_pvalues_uniform_under_null():
    rng = np.random.default_rng(1)
    cal = Calibration(rng.normal(size=5000))
    p = cal.pvalues(rng.normal(size=20000))
    assert p.min() > 0 and p.max() <= 1
    for a in (0.01, 0.1, 0.5):
        assert abs(np.mean(p <= a) - a) < 0.01 + 0.1 * a


def test_bh_controls_fdr_in_simulation():
    rng = np.random.default_rng(2)
    q, fdps, powers = 0.1, [], []
    for _ in range(40):
        cal = Calibration(rng.normal(size=4000))
        truth = rng.random(5000) < 0.1
        scores = rng.normal(size=5000) + 3.0 * truth
        found = benjamini_hochberg(cal.pvalues(scores), q)
        fdps.append(np.sum(found & ~truth) / max(found.sum(), 1))
        powers.append(np.mean(found[truth]))
    assert np.mean(fdps) <= q * 1.15
    assert np.mean(powers) > 0.3


def test_bh_matches_definition():
    p = np.array([0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205, 0.212, 0.216])
    found = benjamini_hochberg(p, 0.05)
    np.testing.assert_array_equal(found, [True, True] + [False] * 8)
    found = benjamini_hochberg(p, 0.2)
    assert found.sum() == 7


def test_otsu_separates_two_modes():
    rng = np.random.default_rng(3)
    v = np.r_[rng.normal(0, 0.3, 5000), rng.normal(4, 0.3, 2000)]
    assert 1.0 < otsu_threshold(v) < 3.0


def test_meanpool_is_max_of_local_mean():
    rng = np.random.default_rng(4)
    score = rng.random((20, 20, 20))
    mask = np.zeros((20, 20, 20), bool)
    mask[2:18, 3:17, 4:16] = True
    t = meanpool_threshold(score, mask, size=4)
    masked = np.where(mask, score, 0)
    brute = max(masked[i - 2:i + 2, j - 2:j + 2, k - 2:k + 2].sum() / 64
                for i, j, k in np.argwhere(mask))
    assert t == pytest.approx(brute)
    assert t == pytest.approx(ndimage.uniform_filter(masked, 4, mode="constant")[mask].max())


def test_threshold_map_methods_stay_in_mask():
    rng = np.random.default_rng(5)
    score = rng.random((12, 12, 12)).astype(np.float32)
    mask = np.zeros(score.shape, bool)
    mask[2:10, 2:10, 2:10] = True
    cal = Calibration(rng.random(1000))
    s = ScoringSettings(meanpool_size=4)
    for method in ("fixed", "otsu", "meanpool", "healthy-fpr", "fdr"):
        binary, t = threshold_map(score, mask, method, "recdisc", s, cal)
        assert not np.any(binary & ~mask)
        if method != "fdr":
            np.testing.assert_array_equal(binary, (score > t) & mask)
    assert threshold_map(score, mask, "fixed", "dae", s)[1] == 0.3
    assert threshold_map(score, mask, "fixed", "recdisc", s)[1] == 0.5
    with pytest.raises(UsageError):
        threshold_map(score, mask, "healthy-fpr", "dae", s, None)


def test_opening_removes_isolated_voxels_keeps_blobs():
    m = np.zeros((15, 15, 15), bool)
    m[2, 2, 2] = True  # isolated voxel
    m[8, 8, 2:6] = True  # thin line
    m[6:11, 6:11, 8:13] = True  # 5^3 blob
    out = opening(m, 3)
    assert not out[2, 2, 2] and not out[8, 8, 2:6].any()
    np.testing.assert_array_equal(out[6:11, 6:11, 8:13], True)
    np.testing.assert_array_equal(opening(m, 1), m)
