"""Head-motion / eddy correction: recover known per-volume transforms; rotate b-vectors."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from bids_uad.algorithms.hmc import (
    correct_motion,
    framewise_displacement,
    matrix_to_params,
    params_to_matrix,
    relative_motion,
    loo_tensor_prediction,
    rotation_matrix,
)

ZOOMS = (2.5, 2.5, 2.5)
FAST = (((4, 20), (2, 25)), ((2, 15), (1, 10)))


def _phantom(shape=(36, 40, 26), seed=0):
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    r = np.sqrt((g[0] / 0.75) ** 2 + (g[1] / 0.8) ** 2 + (g[2] / 0.8) ** 2)
    tex = ndimage.gaussian_filter(rng.standard_normal(shape), 2.5) * 5
    return (ndimage.gaussian_filter((r < 1) * (1 + 0.4 * tex), 1) * 1000).astype(np.float32)


def _move(vol, params, eddy_pe=None, pe_axis=1):
    """What the scanner shows when the head moved by params (reference point p -> R p + t)."""
    shape = vol.shape
    c = (np.array(shape) - 1) / 2
    z = np.array(ZOOMS)[:, None]
    idx = np.indices(shape).reshape(3, -1).astype(float)
    rot = rotation_matrix(*params[3:])
    # inverse map: for a voxel y of the moved image find the reference point
    y = idx.copy()
    if eddy_pe is not None:  # y_pe = y'_pe + e . (y' - c)  -> invert the PE-affine first
        e = np.asarray(eddy_pe)
        y_lin = y.copy()
        others = [a for a in range(3) if a != pe_axis]
        y_lin[pe_axis] = (y[pe_axis] - sum(e[a] * (y[a] - c[a]) for a in others) + e[pe_axis] * c[pe_axis]) / (1 + e[pe_axis])
        y = y_lin
    p = rot.T @ ((y - c[:, None]) * z - np.asarray(params[:3])[:, None]) / z + c[:, None]
    out = ndimage.map_coordinates(vol, p, order=3).reshape(shape)
    if eddy_pe is not None:
        out = out / (1 + eddy_pe[pe_axis])
    return out


def test_rotation_matrix_torch_matches_numpy():
    torch = pytest.importorskip("torch")
    ang = np.array([0.1, -0.2, 0.3])
    a = rotation_matrix(*ang)
    b = rotation_matrix(*[torch.tensor([v]) for v in ang])[0].numpy()
    assert np.allclose(a, b, atol=1e-6)
    assert np.allclose(a @ a.T, np.eye(3), atol=1e-10)


def test_params_matrix_round_trip():
    p = np.array([1.0, -2.0, 0.5, 0.05, -0.1, 0.2])
    assert np.allclose(matrix_to_params(params_to_matrix(p)), p)


def test_framewise_displacement_power():
    motion = np.zeros((3, 6))
    motion[1, 0] = 1.0
    motion[2, 3] = 0.01
    fd = framewise_displacement(motion)
    assert np.isnan(fd[0])
    assert fd[1] == pytest.approx(1.0)
    assert fd[2] == pytest.approx(1.0 + 0.5)


def test_loo_prediction_exact_for_tensor_signal():
    rng = np.random.default_rng(1)
    g = rng.standard_normal((20, 3))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    b = np.r_[0, np.full(19, 1000.0)]
    d = np.diag([1.5e-3, 0.4e-3, 0.3e-3])
    sig = 900 * np.exp(-b * np.einsum("ni,ij,nj->n", g, d, g))
    pred = loo_tensor_prediction(sig[None], b, g)
    assert np.allclose(pred[0, 1:], sig[1:], rtol=1e-4)


def test_recovers_rigid_motion_of_b0_series():
    rng = np.random.default_rng(2)
    ref = _phantom()
    n = 8
    true = np.zeros((n, 6))
    true[1:, :3] = rng.uniform(-2, 2, (n - 1, 3))
    true[1:, 3:] = np.deg2rad(rng.uniform(-3, 3, (n - 1, 3)))
    data = np.stack([_move(ref, p) for p in true], -1)
    data += rng.normal(0, 5, data.shape).astype(np.float32)
    res = correct_motion(data, np.zeros(n), np.zeros((n, 3)), ZOOMS, pe_axis=None, schedule=FAST,
                         smooth_sigma=1.0)
    # the reference is the mean b0: compare transforms relative to volume 0
    rel = relative_motion(res.motion)
    assert np.abs(rel[:, :3] - true[:, :3]).max() < 0.2
    # the worst volume sits at 0.298-0.300 deg (float rounding of the sampling grid moves it by
    # a few thousandths of a degree), the mean at 0.083
    assert np.rad2deg(np.abs(rel[:, 3:] - true[:, 3:])).max() < 0.32
    assert np.rad2deg(np.abs(rel[:, 3:] - true[:, 3:])).mean() < 0.15
    assert np.corrcoef(res.corrected[..., 3].ravel(), res.corrected[..., 0].ravel())[0, 1] > 0.99


def test_recovers_eddy_along_pe():
    rng = np.random.default_rng(3)
    ref = _phantom()
    n = 6
    true = np.zeros((n, 6))
    true[1:, :3] = rng.uniform(-1, 1, (n - 1, 3))
    eddy = np.zeros((n, 3))
    eddy[1:] = rng.normal(0, [0.01, 0.02, 0.01], (n - 1, 3))
    data = np.stack([_move(ref, p, e) for p, e in zip(true, eddy)], -1)
    # all volumes are "b0-like" targets here, but flagged as diffusion-weighted to get eddy terms:
    bvals = np.r_[0, np.full(n - 1, 1000.0)]
    bvecs = np.r_[[[0, 0, 0]], np.eye(3), [[0.6, 0.8, 0]], [[0, 0.6, 0.8]]]
    import bids_uad.algorithms.hmc as hmc

    orig = hmc._targets
    hmc._targets = lambda c, b, g, is_b0, m, first_pass=False: (np.repeat(c[:1, 0].numpy(), n, 0), hmc._foreground_mask(c[0, 0].numpy()))
    try:
        res = correct_motion(data, bvals, bvecs, ZOOMS, pe_axis=1, schedule=FAST)
    finally:
        hmc._targets = orig
    rigid_t = res.motion[:, :3].copy()
    rigid_t[:, 1] += res.eddy[:, 0] * ZOOMS[1]  # recombine the split PE offset
    assert np.abs(rigid_t - true[:, :3]).max() < 0.2
    assert np.abs(res.eddy[1:, 1:] - eddy[1:]).max() < 0.006


def test_bvecs_rotated_by_rotation_part():
    n = 3
    rng = np.random.default_rng(4)
    ref = _phantom()
    true = np.zeros((n, 6))
    true[1, 5] = np.deg2rad(4.0)  # rotation about z
    data = np.stack([_move(ref, p) for p in true], -1)
    bvecs = np.array([[0, 0, 0], [1.0, 0, 0], [1.0, 0, 0]])
    bvals = np.array([0.0, 0.0, 1000.0])
    res = correct_motion(data, bvals, bvecs, ZOOMS, pe_axis=None, schedule=FAST, affine_det_positive=False)
    # volume 1 was a b0 with a zero vector: stays zero; volume 2 moved ~0: stays ~x
    assert np.allclose(res.bvecs[1], 0)
    # direct check of the formula on the estimated rotation of volume 1
    rot = rotation_matrix(*res.motion[1, 3:])
    assert np.rad2deg(res.motion[1, 5]) == pytest.approx(4.0, abs=0.3)
    v = rot.T @ np.array([1.0, 0, 0])
    assert v[1] < 0  # rotating the head by +z moves the head-frame gradient to -y
    _ = rng


def test_fov_coverage_falls_off_one_voxel_beyond_the_outer_voxel_centres():
    import torch

    from bids_uad.algorithms.hmc import fov_coverage

    coords = torch.tensor([[[[[0.0, 5.0, 5.0]], [[-0.25, 5.0, 5.0]], [[9.5, 5.0, 5.0]], [[4.0, 5.0, -1.5]]]]])
    cover = fov_coverage(coords, (10, 10, 10))  # one volume, four points
    np.testing.assert_allclose(cover.numpy().ravel(), [1.0, 0.75, 0.5, 0.0])
    two = torch.cat([coords, torch.zeros_like(coords) + 5.0])  # a second volume well inside
    np.testing.assert_allclose(fov_coverage(two, (10, 10, 10)).numpy().ravel(), [1.0, 0.75, 0.5, 0.0])


def test_edge_slices_a_volume_moved_out_of_are_not_covered():
    from bids_uad.algorithms.hmc import FOV_COVERAGE_MIN

    ref = _phantom()
    true = np.zeros((4, 6))
    true[2, 2] = 1.5 * ZOOMS[2]  # one volume moved 1.5 voxels along z
    data = np.stack([_move(ref, p) for p in true], -1)
    res = correct_motion(data, np.zeros(4), np.zeros((4, 3)), ZOOMS, pe_axis=None, schedule=FAST, smooth_sigma=1.0)
    covered = res.coverage >= FOV_COVERAGE_MIN
    assert res.coverage.shape == ref.shape
    assert covered[3:-3, 3:-3, :-2].all()  # covered by every volume
    # the moved volume holds the last 1.5 slices' anatomy nowhere: its samples there lie past the slab
    assert not covered[:, :, -2:].any()
