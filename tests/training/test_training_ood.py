"""Synthetic out-of-distribution ellipsoids."""
import numpy as np

from bids_uad.models.settings import OODSettings
from bids_uad.training.ood import add_ood_patches
from bids_uad.training.toydata import fibonacci_directions, make_toy_subject


def _subject():
    s = make_toy_subject((20, 20, 16), fibonacci_directions(8), 0)
    return np.moveaxis(s.data, -1, 0).copy(), s.mask


def test_patches_inside_mask_and_count_probabilities():
    x, mask = _subject()
    rng = np.random.default_rng(0)
    settings = OODSettings(min_radius=0.1, max_radius=0.25)
    counts, modes, dists = [], [], []
    n = 300
    for _ in range(n):
        info = {}
        y, a = add_ood_patches(x, mask, rng, settings, info)
        region = a.astype(bool)
        assert not np.any(region & ~mask)
        assert np.array_equal(y[:, ~region], x[:, ~region])
        assert y.min() >= 0 and y.max() <= 1
        assert region.any() == (info["n_ellipsoids"] > 0)
        counts.append(info["n_ellipsoids"])
        modes += info["modes"]
        dists += info["distributions"]
    freq = np.bincount(counts, minlength=3) / n
    np.testing.assert_allclose(freq, [0.2, 0.6, 0.2], atol=0.07)
    assert set(modes) == {"random", "directional", "isotropic"} and set(dists) == {"normal", "uniform"}


def test_modes():
    x, mask = _subject()
    rng = np.random.default_rng(1)
    always = (0.0, 1.0, 0.0)
    for mode in ("directional", "isotropic"):
        s = OODSettings(count_probabilities=always, modes=(mode,), distribution="normal",
                        mean_scales=(0.5,), min_radius=0.2, max_radius=0.3)
        y, a = add_ood_patches(x, mask, rng, s)
        vals = y[:, a.astype(bool)]  # (C, voxels)
        unclipped = (vals > 0) & (vals < 1)
        if mode == "directional":  # one value per channel
            for c in range(vals.shape[0]):
                assert np.unique(vals[c][unclipped[c]]).size <= 1
        else:  # one value per voxel for all channels
            for v in range(vals.shape[1]):
                assert np.unique(vals[:, v][unclipped[:, v]]).size <= 1
    s = OODSettings(count_probabilities=always, modes=("random",), distribution="uniform")
    y, a = add_ood_patches(x, mask, rng, s)
    assert np.unique(y[:, a.astype(bool)]).size > 10
