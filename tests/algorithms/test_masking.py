"""Brain mask from a mean b0: Dice against the truth on a phantom."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from bids_uad.algorithms.masking import brain_mask, dice, otsu_threshold


def test_otsu_two_classes():
    vals = np.r_[np.full(100, 1.0), np.full(100, 10.0)]
    assert 1.0 < otsu_threshold(vals) < 10.0


def test_mask_dice_on_phantom():
    rng = np.random.default_rng(0)
    shape = (40, 48, 30)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    r = np.sqrt((g[0] / 0.7) ** 2 + (g[1] / 0.8) ** 2 + (g[2] / 0.75) ** 2)
    truth = r < 0.85
    skull = (r > 0.9) & (r < 1.0)
    img = truth * (800 + 200 * ndimage.gaussian_filter(rng.standard_normal(shape), 2))
    img = img + skull * 150 + rng.normal(0, 20, shape)
    img[(r < 0.3)] = 1500  # bright ventricles (CSF in b0)
    mask = brain_mask(np.clip(img, 0, None))
    assert dice(mask, truth) > 0.93
    assert dice(brain_mask(np.clip(img, 0, None), method="median_otsu"), truth) > 0.85


def test_coverage_cut_only_where_the_brain_is_cut():
    """A slab cut through the brain is cut; a brain that only touches a face (the brainstem
    leaving through the bottom slice) is not."""
    from bids_uad.algorithms.masking import coverage_summary

    g = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in (30, 34, 30)], indexing="ij"))
    ball = ((g / np.array([12.0, 15.0, 12.0])[:, None, None, None]) ** 2).sum(0) <= 1
    whole = ball.copy()
    whole[14:16, 16:18, :15] = True  # a 2x2 "brainstem" down to the bottom slice
    cov = coverage_summary(whole, (2.0, 2.0, 2.0))
    assert cov["WholeBrain"] and cov["CutAxes"] == [] and cov["TouchedAxes"] == ["k"]
    slab = whole[:, :, 8:22]
    cov = coverage_summary(slab, (2.0, 2.0, 3.0))
    assert not cov["WholeBrain"] and cov["CutAxes"] == ["k"] and cov["FieldOfViewMm"][2] == 42.0
    empty = coverage_summary(np.zeros((4, 4, 4), bool), (1, 1, 1))
    assert empty["WholeBrain"] is False and empty["BrainExtentMm"] == [0.0, 0.0, 0.0]
