"""Tensor maps on a known tensor and on real files with format quirks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bids_uad.algorithms.tensor import fit_tensor
from bids_uad.bids.gradients import load_gradients

REAL = Path(__file__).resolve().parents[2] / ".." / "shared" / "realdata"


def test_known_tensor_fa_md():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((30, 3))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    bvals = np.r_[0, 0, np.full(30, 1000.0)]
    bvecs = np.r_[np.zeros((2, 3)), g]
    evals = np.array([1.7e-3, 0.3e-3, 0.3e-3])
    sig = 1000 * np.exp(-bvals * (bvecs ** 2 @ evals))
    data = np.tile(sig, (2, 2, 2, 1)).astype(np.float32)
    maps = fit_tensor(data, bvals, bvecs)
    md = evals.mean()
    fa = np.sqrt(1.5 * ((evals - md) ** 2).sum() / (evals ** 2).sum())
    assert maps["md"][0, 0, 0] == pytest.approx(md, rel=1e-3)
    assert maps["fa"][0, 0, 0] == pytest.approx(fa, rel=1e-3)
    assert maps["ad"][0, 0, 0] == pytest.approx(1.7e-3, rel=1e-3)
    assert maps["rd"][0, 0, 0] == pytest.approx(0.3e-3, rel=1e-3)
    assert maps["s0"][0, 0, 0] == pytest.approx(1000, rel=1e-3)


@pytest.mark.skipif(not (REAL / "dipy_small").exists(), reason="real data not available")
def test_real_small_64d_nan_bvec():
    nib = pytest.importorskip("nibabel")
    base = REAL / "dipy_small" / "small_64D"
    img = nib.load(str(base) + ".nii")
    gt = load_gradients(str(base) + ".bval", str(base) + ".bvec", n_volumes=img.shape[3])
    data = np.asarray(img.dataobj, dtype=np.float32)
    mask = data[..., gt.b0_mask].mean(-1) > 0
    maps = fit_tensor(data, gt.bvals, gt.bvecs, mask)
    fa, md = maps["fa"][mask], maps["md"][mask]
    assert 0.05 < np.median(fa) < 0.9
    assert 2e-4 < np.median(md) < 3.5e-3


@pytest.mark.skipif(not (REAL / "philips_dti_b1000").exists(), reason="real data not available")
def test_real_philips_small_b0_values():
    nib = pytest.importorskip("nibabel")
    base = REAL / "philips_dti_b1000" / "701_DTI_Biobank_2mm_MB3S2_EPI"
    img = nib.load(str(base) + ".nii.gz")
    gt = load_gradients(str(base) + ".bval", str(base) + ".bvec", n_volumes=img.shape[3])
    data = np.asarray(img.dataobj, dtype=np.float32)[30:80, 30:80, 10:20]
    from bids_uad.algorithms.masking import brain_mask

    mask = brain_mask(data[..., gt.b0_mask].mean(-1))
    maps = fit_tensor(data, gt.bvals, gt.bvecs, mask)
    assert mask.sum() > 1000
    assert 0.1 < np.median(maps["fa"][mask]) < 0.7
    assert 4e-4 < np.median(maps["md"][mask]) < 3.2e-3  # slab crop includes CSF


def _fibre_series(axis: int):
    """A 4x4x4 series of one tensor with its long axis along voxel ``axis`` (FSL bvecs)."""
    rng = np.random.default_rng(0)
    g = rng.standard_normal((30, 3))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    evals = np.full(3, 0.3e-3)
    evals[axis] = 1.7e-3
    signal = np.r_[1000.0, 1000.0 * np.exp(-1000.0 * (g**2 @ evals))]
    bvals, bvecs = np.r_[0.0, np.full(30, 1000.0)], np.vstack([[0, 0, 0], g])
    return np.broadcast_to(signal, (4, 4, 4, 31)).astype(np.float32), bvals, bvecs


def test_direction_coloured_fa_is_in_world_axes():
    """Colours follow world (RAS) axes, whatever the voxel order: a fibre along the first voxel
    axis is red in an axial acquisition and blue when that axis is the superior one."""
    from bids_uad.algorithms.tensor import direction_coloured_fa

    data, bvals, bvecs = _fibre_series(0)
    flipped = bvecs * np.array([-1.0, 1.0, 1.0])  # FSL: first axis flipped for a positive determinant
    rgb = direction_coloured_fa(data, bvals, flipped, np.diag([2.0, 2.0, 2.0, 1.0]))
    assert rgb.shape == (4, 4, 4, 3) and np.argmax(rgb[1, 1, 1]) == 0 and rgb[1, 1, 1, 0] > 0.6
    sagittal_first = np.array([[0, 0, 2.0, 0], [0, 2.0, 0, 0], [2.0, 0, 0, 0], [0, 0, 0, 1]])  # det < 0
    rgb = direction_coloured_fa(data, bvals, bvecs, sagittal_first, mask=np.ones((4, 4, 4), bool))
    assert np.argmax(rgb[1, 1, 1]) == 2
