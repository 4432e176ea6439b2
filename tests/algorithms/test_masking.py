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
