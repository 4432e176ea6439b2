"""Combination of opposite phase-encoding runs after correction (``algorithms.combine``)."""
from __future__ import annotations

import numpy as np
import pytest

from bids_uad.algorithms.combine import combine_runs, masked_correlation, resample_rigid, rotate_bvecs
from bids_uad.algorithms.hmc import rotation_matrix


def _head(shape=(32, 36, 24)):
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    head = ((x / 0.8) ** 2 + (y / 0.9) ** 2 + (z / 0.8) ** 2 < 1).astype(np.float32) * 100
    head += 60 * ((x / 0.3) ** 2 + ((y - 0.2) / 0.4) ** 2 + (z / 0.5) ** 2 < 1)
    head += 40 * (((x + 0.4) / 0.15) ** 2 + ((y + 0.3) / 0.2) ** 2 + (z / 0.3) ** 2 < 1)
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(head, 1.5)  # smooth, as a real b0 at 3 mm: interpolation does not dominate


def test_second_run_moved_and_scaled_is_realigned_and_concatenated():
    zooms = (3.0, 3.0, 3.0)
    ref = _head()
    moved_params = np.array([2.0, -3.0, 1.5, 0.03, -0.02, 0.04])
    moved = resample_rigid(ref, moved_params, zooms) * 1.3
    s1 = np.stack([ref, ref * 0.5, ref * 0.4], -1)
    s2 = np.stack([moved, moved * 0.5, moved * 0.4], -1)
    bvals = np.array([0.0, 1000.0, 1000.0])
    bvecs = np.array([[0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]])
    mask = ref > 20
    res = combine_runs([s1, s2], [bvals, bvals], [bvecs, bvecs], [ref, moved], zooms, mask=mask)
    assert res.data.shape == ref.shape + (6,)
    assert res.bvals.tolist() == [0, 1000, 1000, 0, 1000, 1000]
    run2 = res.info["runs"][1]
    assert run2["b0_correlation_after_alignment"] > 0.97 > run2["b0_correlation_before_alignment"]
    assert run2["intensity_scale"] == pytest.approx(1 / 1.3, rel=0.05)
    assert masked_correlation(res.data[..., 3], ref, mask) > 0.97
    # the recovered motion is the inverse of the applied one
    recovered = rotation_matrix(*np.asarray(run2["params"][3:6]))
    applied = rotation_matrix(*moved_params[3:6])
    assert np.allclose(recovered @ applied, np.eye(3), atol=0.02)
    assert np.allclose(np.linalg.norm(res.bvecs[[1, 2, 4, 5]], axis=1), 1.0)


def test_rotate_bvecs_is_a_rotation_and_keeps_b0():
    bvecs = np.array([[0, 0, 0], [1.0, 0, 0], [0, 0.6, 0.8]])
    out = rotate_bvecs(bvecs, np.array([0, 0, 0, 0.0, 0.0, np.pi / 2]), affine_det_positive=False)
    assert np.allclose(out[0], 0)
    assert np.allclose(out[1], [0, -1, 0], atol=1e-9)  # R^T about z by 90 degrees
    assert np.allclose(np.linalg.norm(out[1:], axis=1), 1)


def test_combining_needs_two_runs_on_one_grid():
    with pytest.raises(ValueError):
        combine_runs([np.zeros((4, 4, 4, 2))], [np.zeros(2)], [np.zeros((2, 3))], [np.zeros((4, 4, 4))], (1, 1, 1))
    with pytest.raises(ValueError, match="grid"):
        combine_runs([np.zeros((4, 4, 4, 2)), np.zeros((5, 4, 4, 2))], [np.zeros(2)] * 2, [np.zeros((2, 3))] * 2,
                     [np.zeros((4, 4, 4)), np.zeros((5, 4, 4))], (1, 1, 1))


def test_combined_field_of_view_moves_the_later_runs_mask_with_their_alignment():
    from bids_uad.algorithms.combine import combined_fov

    first = np.ones((20, 20, 12), bool)
    first[..., 0] = False
    second = np.ones((20, 20, 12), bool)
    second[..., -1] = False
    still = combined_fov([first, second], [[0.0] * 6, [0.0] * 6], (2.0, 2.0, 2.0))
    np.testing.assert_array_equal(still, first & second)
    # the second run aligned by one voxel (2 mm) along z: its last covered slice moves with it
    moved = combined_fov([first, second], [[0.0] * 6, [0.0, 0.0, 2.0, 0.0, 0.0, 0.0]], (2.0, 2.0, 2.0))
    assert not moved[..., -2:].any() and moved[2:-2, 2:-2, 1:-2].all()
