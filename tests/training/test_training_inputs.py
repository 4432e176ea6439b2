"""Normalisation, grid padding/cropping and gradient-table reconciliation."""
import numpy as np
import pytest

from bids_uad.errors import InputValidationError
from bids_uad.models.inputs import (from_grid, grid_affine, match_directions, normalise_dwi,
                                      prepare_subject, reconcile_gradients, to_grid)
from bids_uad.training.toydata import fibonacci_directions, random_rotation, tensor_signal


def test_normalise_divides_by_mean_b0_clips_and_masks():
    rng = np.random.default_rng(0)
    b0 = rng.uniform(500, 1000, (4, 4, 3))
    ratio = rng.uniform(0, 1.2, (4, 4, 3, 5))
    dwi = np.concatenate([b0[..., None] * 0.9, ratio * b0[..., None], b0[..., None] * 1.1], -1)
    bvals = np.array([0, 1000, 1000, 1000, 1000, 1000, 5])
    bvecs = np.vstack([[0, 0, 0], fibonacci_directions(5), [0, 0, 0]])
    mask = np.ones((4, 4, 3), bool)
    mask[0] = False
    out, bv, bvec = normalise_dwi(dwi, bvals, bvecs.T, mask)
    assert out.shape == (4, 4, 3, 5) and out.dtype == np.float32
    np.testing.assert_allclose(out[1:], np.clip(ratio[1:], 0, 1), rtol=1e-5)
    assert np.all(out[0] == 0)
    np.testing.assert_array_equal(bv, [1000] * 5)
    np.testing.assert_allclose(bvec, fibonacci_directions(5))
    with pytest.raises(InputValidationError):
        normalise_dwi(dwi[..., 1:6], bvals[1:6], bvecs[1:6], mask)  # no b0


@pytest.mark.parametrize("shape", [(90, 90, 54), (13, 20, 7), (96, 100, 64)])
def test_pad_crop_round_trip_exact(shape):
    rng = np.random.default_rng(1)
    arr = rng.random(shape + (2,)).astype(np.float32)
    grid = (96, 96, 64) if shape[0] > 50 else (16, 16, 8)
    g, gm = to_grid(arr, grid)
    assert g.shape == grid + (2,)
    back = from_grid(g, gm)
    assert back.shape == arr.shape
    kept = tuple(slice(s, s + n) for s, n in zip(gm.src_start, gm.length))
    np.testing.assert_array_equal(back[kept], arr[kept])
    if all(n <= g_ for n, g_ in zip(shape, grid)):
        np.testing.assert_array_equal(back, arr)  # pure padding: exact everywhere
    # the grid affine puts every copied voxel at the same world position
    aff = np.diag([2.0, 2.0, 2.5, 1.0])
    aff[:3, 3] = [-90, -100, -60]
    gaff = grid_affine(aff, gm)
    i = np.array(gm.src_start) + 1
    j = np.array(gm.dst_start) + 1
    np.testing.assert_allclose(aff @ np.r_[i, 1], gaff @ np.r_[j, 1])
    np.testing.assert_array_equal(g[tuple(j)], arr[tuple(i)])


def _signal(bvecs, bval=1000.0):
    e1 = np.array([[0.6, 0.64, 0.48]])
    e1 /= np.linalg.norm(e1)
    return tensor_signal(np.array([[1.7e-3, 0.3e-3]]), e1, bvecs, bval)[0].astype(np.float32)


def test_permuted_and_flipped_directions_are_reordered():
    rng = np.random.default_rng(2)
    ref = fibonacci_directions(30)
    perm = rng.permutation(30)
    flip = np.where(rng.random(30) > 0.5, -1.0, 1.0)[:, None]
    bvecs = ref[perm] * flip  # antipodal = same direction
    data = rng.random((3, 2, 2, 30)).astype(np.float32)
    out, method = reconcile_gradients(data, np.full(30, 1000.0), bvecs, np.full(30, 1000.0), ref)
    assert method == "permutation"
    inv = np.argsort(perm)
    np.testing.assert_array_equal(out, data[..., inv])
    assert np.array_equal(match_directions(bvecs, ref), inv)
    same, method = reconcile_gradients(data, np.full(30, 1000.0), ref, np.full(30, 1000.0), ref)
    assert method == "identity" and same is data


def test_rotated_directions_resampled_by_sh_reproduce_tensor_signal():
    ref = fibonacci_directions(64)
    bvecs = fibonacci_directions(60, random_rotation(np.random.default_rng(3)))
    data = _signal(bvecs)[None, None, None]
    out, method = reconcile_gradients(data, np.full(60, 1000.0), bvecs, np.full(64, 1000.0), ref)
    assert method == "sh"
    truth = _signal(ref)
    err = np.abs(out[0, 0, 0] - truth)
    assert err.max() < 0.03 and err.mean() < 0.01


def test_multishell_and_bvalue_mismatch():
    ref = np.vstack([fibonacci_directions(20), fibonacci_directions(20)])
    ref_b = np.r_[np.full(20, 1000.0), np.full(20, 2000.0)]
    data = np.random.default_rng(4).random((2, 2, 2, 40)).astype(np.float32)
    order = np.r_[20:40, 0:20]
    out, method = reconcile_gradients(data[..., order], ref_b[order] + 5, ref[order], ref_b, ref)
    np.testing.assert_array_equal(out, data)
    with pytest.raises(InputValidationError, match="b-values"):
        reconcile_gradients(data[..., :20], np.full(20, 3000.0), ref[:20], ref_b[:20], ref[:20])
    with pytest.raises(InputValidationError, match="lack"):
        reconcile_gradients(data[..., :20], ref_b[:20], ref[:20], ref_b, ref)


def test_prepare_subject_channels_first_on_grid():
    rng = np.random.default_rng(5)
    dirs = fibonacci_directions(8)
    dwi = rng.uniform(100, 200, (10, 12, 6, 9))
    mask = np.ones((10, 12, 6), bool)
    p = prepare_subject(dwi, np.r_[0, np.full(8, 1000)], np.vstack([[0, 0, 0], dirs]), mask, (16, 16, 8),
                        np.full(8, 1000.0), dirs[::-1])
    assert p.data.shape == (8, 16, 16, 8) and p.mask.shape == (16, 16, 8) and p.method == "permutation"
