"""N4 bias-field correction on a template-derived head with a known multiplicative bias."""
from __future__ import annotations

import numpy as np

from bids_uad.algorithms.intensity import head_mask, n4_correct, normalise, otsu
from bids_uad.algorithms.templates import phantom_head


def _cv(values: np.ndarray) -> float:
    return float(np.std(values) / np.mean(values))


def test_otsu_splits_two_modes():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(10, 1, 1000), rng.normal(50, 2, 1000)])
    assert 15 < otsu(values) < 45


def test_head_mask_covers_head():
    head = phantom_head(4.0, bias=0.0, noise=0.0)
    mask = head_mask(head["t1w"].get_fdata())
    brain = head["brain_mask"].get_fdata() > 0
    assert (mask & brain).sum() / brain.sum() > 0.98


def test_n4_reduces_known_bias():
    head = phantom_head(4.0, bias=0.4, noise=0.0)
    wm = head["dseg"].get_fdata() == 3
    biased = head["t1w"].get_fdata()
    corrected, field = n4_correct(head["t1w"], shrink_factor=2, spline_distance_mm=80)
    before, after = _cv(biased[wm]), _cv(corrected.get_fdata()[wm])
    assert after < 0.75 * before, (before, after)
    # the estimated field follows the true one inside the head
    true_field = head["bias"].get_fdata()[wm]
    assert np.corrcoef(true_field, field.get_fdata()[wm])[0, 1] > 0.6
    assert corrected.get_fdata().dtype == np.float64 or corrected.get_data_dtype() == np.float32


def test_n4_fit_grid_follows_the_voxel_size():
    from bids_uad.algorithms.intensity import FLAIR_N4_FIT_SPACING_MM, n4_shrink_factor

    assert [n4_shrink_factor(z, 6.0) for z in ((1, 1, 1), (0.8, 0.8, 1.2), (2, 2, 2), (4, 4, 4), (8, 8, 8))] == [6, 8, 3, 2, 1]
    assert n4_shrink_factor((2, 2, 2), FLAIR_N4_FIT_SPACING_MM) == 4  # 2 mm FLAIRs: as the T1w
    head = phantom_head(1.5, bias=0.4, noise=0.0)  # the FLAIR's 8 mm grid still removes a known bias
    wm = head["dseg"].get_fdata() == 3
    corrected, field = n4_correct(head["t1w"], shrink_factor=n4_shrink_factor((1.5,) * 3, FLAIR_N4_FIT_SPACING_MM))
    assert _cv(corrected.get_fdata()[wm]) < 0.75 * _cv(head["t1w"].get_fdata()[wm])
    assert np.corrcoef(head["bias"].get_fdata()[wm], field.get_fdata()[wm])[0, 1] > 0.6


def test_normalise_percentile():
    data = np.arange(101, dtype=np.float32)
    out = normalise(data, data > 0, pct=100)
    assert np.isclose(out.max(), 1.0)
