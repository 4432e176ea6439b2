"""Brain mask from a mean b0: Dice against the truth on a phantom."""
from __future__ import annotations

import numpy as np
import pytest
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


def test_bounding_box_and_its_affine():
    import numpy as np

    from bids_uad.algorithms.masking import bounding_box, subgrid_affine

    mask = np.zeros((10, 12, 14), bool)
    mask[2:5, 3, 7:9] = True
    assert bounding_box(mask) == (slice(2, 5), slice(3, 4), slice(7, 9))
    assert bounding_box(mask, margin=3) == (slice(0, 8), slice(0, 7), slice(4, 12))
    assert bounding_box(np.zeros((4, 5, 6), bool)) == (slice(0, 4), slice(0, 5), slice(0, 6))
    affine = np.array([[-2.0, 0, 0, 90], [0, 2, 0, -100], [0, 0, 3, -60], [0, 0, 0, 1]])
    box = bounding_box(mask)
    sub = subgrid_affine(affine, box)
    # voxel (0, 0, 0) of the sub-grid is voxel (2, 3, 7) of the grid
    assert np.allclose(sub @ [0, 0, 0, 1], affine @ [2, 3, 7, 1])
    assert np.allclose(sub[:3, :3], affine[:3, :3])
    assert np.allclose(subgrid_affine(affine, [(2, 5), (3, 4), (7, 9)]), sub)


@pytest.mark.parametrize("zooms", [(1.0, 1.0, 1.0), (2.0, 2.0, 2.0), (1.2, 0.9, 2.5)])
def test_dilate_ball_is_the_ball_structure_dilation(zooms):
    import numpy as np
    from scipy import ndimage

    from bids_uad.algorithms.masking import ball, dilate_ball

    rng = np.random.default_rng(3)
    mask = ndimage.binary_opening(rng.random((40, 36, 30)) > 0.7)
    mask[0, 5:9, 3] = True  # voxels on the grid's edge
    for radius in (2.0, 3.0, 5.0, 6.0):
        expected = ndimage.binary_dilation(mask, structure=ball(radius / np.asarray(zooms)))
        assert np.array_equal(dilate_ball(mask, zooms, radius), expected), radius
    assert not dilate_ball(np.zeros((4, 4, 4), bool), zooms, 3.0).any()
