"""Gradient tables: FSL 3xN and Nx3 layouts, NaN b0 rows, odd b0 values, count mismatches."""
from __future__ import annotations

import numpy as np
import pytest

from bids_uad.bids.gradients import (
    GradientTable,
    load_gradients,
    read_bvecs,
    rotate_bvecs,
    round_bvals,
    write_fsl_gradients,
)
from bids_uad.errors import InputValidationError


def test_small_64d_nx3_with_nan_b0_row(realdata):
    d = realdata / "dipy_small"
    raw = np.loadtxt(d / "small_64D.bvec")
    assert raw.shape == (65, 3) and np.isnan(raw[0]).all()  # the quirk this test is about
    table = load_gradients(d / "small_64D.bval", d / "small_64D.bvec", n_volumes=65)
    assert table.n_volumes == 65
    assert table.b0_mask.sum() == 1 and table.b0_mask[0]
    assert np.allclose(table.bvecs[0], 0)
    assert np.allclose(np.linalg.norm(table.bvecs[1:], axis=1), 1, atol=1e-6)
    assert table.shells == (1000.0,)
    # the direction of volume 5 matches the file row, not a transposed column
    assert np.allclose(table.bvecs[5], raw[5] / np.linalg.norm(raw[5]))


def test_philips_b0_values_above_zero(realdata):
    d = realdata / "philips_dti_b1000"
    stem = "701_DTI_Biobank_2mm_MB3S2_EPI"
    table = load_gradients(d / f"{stem}.bval", d / f"{stem}.bvec", n_volumes=17)
    assert table.b0_mask.sum() == 5  # b = 0, 0.001, 0.002, 0.003, 0.004
    assert table.summary()["directions_per_shell"] == {"1000": 12}
    assert np.all(table.rounded_bvals[table.b0_mask] == 0)


def test_fsl_layout_3xn(tmp_path):
    bvecs = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
    (tmp_path / "a.bvec").write_text("\n".join(" ".join(map(str, r)) for r in bvecs))
    (tmp_path / "a.bval").write_text("0 1000 1000 1000")
    table = load_gradients(tmp_path / "a.bval", tmp_path / "a.bvec", n_volumes=4)
    assert np.allclose(table.bvecs, bvecs.T)


def test_three_volume_square_file_is_fsl_layout(tmp_path):
    (tmp_path / "a.bvec").write_text("0 1 0\n0 0 1\n0 0 0\n")
    assert np.allclose(read_bvecs(tmp_path / "a.bvec", 3)[1], [1, 0, 0])


@pytest.mark.parametrize("n_bvals,n_bvecs,n_vols", [(5, 4, 4), (4, 4, 5), (4, 5, 4)])
def test_count_mismatch_names_files_and_counts(tmp_path, n_bvals, n_bvecs, n_vols):
    (tmp_path / "x.bval").write_text(" ".join(["0"] + ["1000"] * (n_bvals - 1)))
    vecs = np.vstack([[0, 0, 0]] + [[1, 0, 0]] * (n_bvecs - 1)).T
    (tmp_path / "x.bvec").write_text("\n".join(" ".join(map(str, r)) for r in vecs))
    with pytest.raises(InputValidationError) as err:
        load_gradients(tmp_path / "x.bval", tmp_path / "x.bvec", n_volumes=n_vols, image_path=tmp_path / "x.nii.gz")
    msg = err.value.one_line()
    assert "x.bval" in msg and "x.bvec" in msg and "mismatch" in msg
    assert f"bval {n_bvals}" in msg and f"image volumes {n_vols}" in msg
    assert err.value.exit_code == 16


def test_wrong_bvec_shape(tmp_path):
    (tmp_path / "x.bval").write_text("0 1000 1000 1000 1000")
    (tmp_path / "x.bvec").write_text("0 1 0 0 1\n0 0 1 0 0\n")  # 2 rows
    with pytest.raises(InputValidationError, match="3xN"):
        load_gradients(tmp_path / "x.bval", tmp_path / "x.bvec", n_volumes=5)


def test_non_unit_and_nan_directions(tmp_path):
    (tmp_path / "x.bval").write_text("0 1000 1000")
    (tmp_path / "x.bvec").write_text("0 0.5 nan\n0 0 0\n0 0 0\n")
    with pytest.raises(InputValidationError, match="NaN"):
        load_gradients(tmp_path / "x.bval", tmp_path / "x.bvec", n_volumes=3)
    (tmp_path / "x.bvec").write_text("0 0.5 1\n0 0 0\n0 0 0\n")
    with pytest.raises(InputValidationError, match="unit length"):
        load_gradients(tmp_path / "x.bval", tmp_path / "x.bvec", n_volumes=3)


def test_no_b0_and_negative_bval(tmp_path):
    (tmp_path / "x.bval").write_text("1000 1000")
    (tmp_path / "x.bvec").write_text("1 0\n0 1\n0 0\n")
    with pytest.raises(InputValidationError, match="no b0"):
        load_gradients(tmp_path / "x.bval", tmp_path / "x.bvec")
    (tmp_path / "x.bval").write_text("-5 1000")
    with pytest.raises(InputValidationError, match="negative"):
        load_gradients(tmp_path / "x.bval", tmp_path / "x.bvec")


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(InputValidationError, match="does not exist"):
        load_gradients(tmp_path / "none.bval", tmp_path / "none.bvec")
    (tmp_path / "g.bval").write_text("0 abc")
    with pytest.raises(InputValidationError, match="non-numeric"):
        load_gradients(tmp_path / "g.bval", tmp_path / "g.bvec")


def test_round_bvals_and_shells():
    assert round_bvals(np.array([0.004, 5, 995, 1010, 1990, 3005])).tolist() == [0, 0, 1000, 1000, 2000, 3000]


def test_rotate_bvecs_keeps_unit_norm_and_zero_b0():
    theta = np.deg2rad(30)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    shear = rot @ np.array([[1, 0.05, 0], [0, 1.02, 0], [0, 0, 1]])  # non-rigid part removed
    out = rotate_bvecs(np.array([[0, 0, 0], [1, 0, 0]]), np.stack([rot, shear]))
    assert np.allclose(out[0], 0)
    assert np.isclose(np.linalg.norm(out[1]), 1)
    assert np.allclose(out[1], [np.cos(theta), np.sin(theta), 0], atol=0.03)


def test_write_round_trip(tmp_path):
    table = GradientTable(bvals=np.array([0.0, 1000, 2000]), bvecs=np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], float))
    write_fsl_gradients(table, tmp_path / "o.bval", tmp_path / "o.bvec")
    back = load_gradients(tmp_path / "o.bval", tmp_path / "o.bvec", n_volumes=3)
    assert np.allclose(back.bvals, table.bvals) and np.allclose(back.bvecs, table.bvecs)
