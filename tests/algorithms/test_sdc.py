"""Susceptibility distortion correction: recover a known field from a reverse-PE pair."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from bids_uad.algorithms.resample import parse_phase_encoding
from bids_uad.algorithms.sdc import apply_sdc, bspline_basis, distort, estimate_sdc

REAL = Path(__file__).resolve().parents[2] / ".." / "shared" / "realdata" / "xa30_dwi_apa"
FAST_LEVELS = ((3.0, 10.0, 1e-2, 25), (1.0, 5.0, 2e-3, 25))


def _phantom(shape=(36, 40, 24), seed=0):
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    r = np.sqrt((g[0] / 0.75) ** 2 + (g[1] / 0.8) ** 2 + (g[2] / 0.8) ** 2)
    texture = ndimage.gaussian_filter(rng.standard_normal(shape), 2) * 5
    img = ndimage.gaussian_filter((r < 1) * (1 + 0.5 * texture), 1.0)
    return img.astype(np.float32), g, r


def _field(g, axis):
    other = (axis + 1) % 3
    return 60 * np.exp(-((g[other] - 0.1) ** 2 + (g[axis] - 0.3) ** 2 + g[(axis + 2) % 3] ** 2) / 0.3) - 20 * g[axis]


def test_bspline_basis_partition_of_unity():
    b = bspline_basis(30, 5.0)
    assert np.allclose(b.sum(axis=1), 1.0, atol=1e-6)
    d = bspline_basis(30, 5.0, derivative=1)
    assert np.allclose(d.sum(axis=1), 0.0, atol=1e-6)


def test_parse_phase_encoding():
    assert parse_phase_encoding("j-") == (1, -1)
    assert parse_phase_encoding("i") == (0, 1)
    assert parse_phase_encoding("k+") == (2, 1)
    with pytest.raises(ValueError):
        parse_phase_encoding("y")


def test_distort_then_apply_is_identity():
    img, g, r = _phantom()
    field = _field(g, 1)
    back = apply_sdc(distort(img, field, 1, 0.04), field, 1, 0.04)
    m = r < 0.9
    assert np.corrcoef(back[m], img[m])[0, 1] > 0.995


@pytest.mark.parametrize("pe,polarity", [(1, 1), (0, -1), (2, 1)])
def test_recovers_field_any_axis(pe, polarity):
    img, g, r = _phantom()
    field = _field(g, pe).astype(np.float32)
    trt = 0.04
    a = distort(img, field, pe, trt * polarity)
    b = distort(img, field, pe, -trt * polarity)
    res = estimate_sdc([a, b], [trt * polarity, -trt * polarity], pe)
    m = r < 0.9
    err_vox = np.abs(res.field_hz - field)[m] * trt
    assert np.median(err_vox) < 0.1
    before = np.corrcoef(a[m], b[m])[0, 1]
    after = np.corrcoef(res.corrected[0][m], res.corrected[1][m])[0, 1]
    assert after > 0.95 and after > before + 0.3


def test_same_polarity_rejected():
    img, _, _ = _phantom((8, 8, 8))
    with pytest.raises(ValueError):
        estimate_sdc([img, img], [0.04, 0.04], 1)


@pytest.mark.skipif(not REAL.exists(), reason="real xa30 pair not available")
def test_real_xa30_pair_agrees_better():
    nib = pytest.importorskip("nibabel")
    ap = nib.load(str(REAL / "17_DWI_dir80_AP.nii.gz")).dataobj[..., 0].astype(np.float32)
    pa = nib.load(str(REAL / "10_DWI_dir80_PA.nii.gz")).dataobj[..., 0].astype(np.float32)
    trt = 0.0475693
    res = estimate_sdc([ap, pa], [-trt, trt], 1)
    mean = ndimage.gaussian_filter((ap + pa) / 2, 1)
    m = ndimage.binary_fill_holes(mean > np.percentile(mean, 60))
    before = np.corrcoef(ap[m], pa[m])[0, 1]
    after = np.corrcoef(res.corrected[0][m], res.corrected[1][m])[0, 1]
    assert after > before + 0.15
    assert after > 0.9
