"""Figure helpers that choose what a figure shows."""
from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pytest

from bids_uad.reports.figures import canonical_slices_in_grid, pick_slices


@pytest.mark.parametrize("perm", list(itertools.permutations(range(3))))
def test_canonical_slices_found_on_the_image_grid(perm):
    """The slices a figure shows (chosen on the RAS-reoriented mask) and the voxels of those
    slices back on the image's own grid, for every axis order and flip."""
    rng = np.random.default_rng(0)
    shape = (20, 24, 28)
    mask = np.zeros(shape, bool)
    mask[3:15, 5:20, 2:25] = rng.random((12, 15, 23)) > 0.3
    for flips in itertools.product([1, -1], repeat=3):
        affine = np.eye(4)
        affine[:3, :3] = 0
        for axis, (row, sign) in enumerate(zip(perm, flips)):
            affine[row, axis] = sign * (1.5 + axis)
        shown, slices = canonical_slices_in_grid(mask, affine, 5, "z")
        canonical = np.asarray(nib.as_closest_canonical(nib.Nifti1Image(mask.astype(np.uint8), affine)).dataobj) > 0
        assert slices == pick_slices(canonical.shape, canonical, 5, ("z",))
        assert len(slices["z"]) == 5
        expected = np.zeros(canonical.shape, bool)
        expected[:, :, slices["z"]] = True
        back = nib.as_closest_canonical(nib.Nifti1Image(shown.astype(np.uint8), affine))
        assert np.array_equal(np.asarray(back.dataobj) > 0, expected)
