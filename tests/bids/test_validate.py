"""Image-level checks: unreadable, wrong dimensionality, NaNs, bad affine, missing sidecars."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from bids_uad.bids.layout import BIDSInputs
from bids_uad.bids.validate import check_affine, check_phase_encoding, validate_anatomical, validate_dwi_run
from bids_uad.errors import InputValidationError


def _run(bids_root, label="pat01"):
    return BIDSInputs(bids_root).session_inputs(label, "pre").dwi[0]


def test_valid_run_gives_gradients(small_bids):
    table = validate_dwi_run(_run(small_bids))
    assert table.n_volumes == 7 and table.b0_mask.sum() == 1


def test_unreadable_nifti(small_bids):
    run = _run(small_bids)
    run.path.write_bytes(b"this is not a nifti file")
    with pytest.raises(InputValidationError) as err:
        validate_dwi_run(run)
    assert "unreadable NIfTI" in err.value.one_line() and run.path.name in err.value.one_line()


def test_dwi_must_be_4d_and_anat_3d(small_bids, tmp_path):
    run = _run(small_bids)
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), run.path)
    with pytest.raises(InputValidationError, match="must be 4D"):
        validate_dwi_run(run)
    p = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4, 3), np.float32), np.eye(4)), p)
    with pytest.raises(InputValidationError, match="must be 3D"):
        validate_anatomical(p)


def test_nan_in_dwi_names_volume(small_bids):
    run = _run(small_bids)
    img = nib.load(run.path)
    data = np.asarray(img.dataobj).copy()
    data[1, 1, 1, 5] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), run.path)
    with pytest.raises(InputValidationError, match=r"NaN or infinite values \(volume 5\)"):
        validate_dwi_run(run)


def test_degenerate_affine(tmp_path):
    p = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.diag([1, 1, 80, 1.0])), p)
    with pytest.raises(InputValidationError, match="implausible voxel sizes"):
        validate_anatomical(p)
    with pytest.raises(InputValidationError, match="degenerate"):
        check_affine(np.diag([1.0, 1.0, 0.0, 1.0]), p)
    with pytest.raises(InputValidationError, match="finite"):
        check_affine(np.full((4, 4), np.nan), p)


def test_count_mismatch_with_image(small_bids):
    run = _run(small_bids)
    run.bval.write_text("0 1000 1000")
    with pytest.raises(InputValidationError, match="mismatch"):
        validate_dwi_run(run)


def test_missing_sidecar_and_gradients(small_bids):
    (small_bids / "sub-pat01/ses-pre/dwi/sub-pat01_ses-pre_dir-AP_dwi.json").unlink()
    # without its dwi sidecar the fmap still points at the run, and the run has no metadata
    with pytest.raises(InputValidationError, match="no JSON sidecar"):
        validate_dwi_run(_run(small_bids))
    (small_bids / "sub-pat01/ses-pre/dwi/sub-pat01_ses-pre_dir-AP_dwi.bvec").unlink()
    with pytest.raises(InputValidationError, match="no bvec file"):
        validate_dwi_run(_run(small_bids))


def test_phase_encoding_requirements(tmp_path):
    img = tmp_path / "x_epi.nii.gz"
    with pytest.raises(InputValidationError) as err:
        check_phase_encoding({"PhaseEncodingAxis": "j", "TotalReadoutTime": 0.05}, img, "reverse phase-encoding")
    assert "x_epi.json" in err.value.one_line() and "polarity" in err.value.one_line()
    with pytest.raises(InputValidationError, match="TotalReadoutTime"):
        check_phase_encoding({"PhaseEncodingDirection": "j", "TotalReadoutTime": 3.0}, img, "dwi")
    check_phase_encoding({"PhaseEncodingDirection": "j"}, img, "dwi")  # missing: a nominal time, flagged
    check_phase_encoding({"PhaseEncodingDirection": "k-", "TotalReadoutTime": 0.03}, img, "dwi")


def test_real_philips_dwi_validates(realdata, tmp_path):
    d = realdata / "philips_dti_b1000"
    stem = "701_DTI_Biobank_2mm_MB3S2_EPI"
    from bids_uad.bids.layout import DwiRun

    meta = json.loads((d / f"{stem}.json").read_text())
    run = DwiRun(path=d / f"{stem}.nii.gz", bval=d / f"{stem}.bval", bvec=d / f"{stem}.bvec",
                 metadata=meta, entities={"subject": "01"})
    table = validate_dwi_run(run)
    assert table.n_volumes == 17
    # its sidecar has PhaseEncodingAxis but no polarity: unusable for susceptibility correction
    with pytest.raises(InputValidationError, match="PhaseEncodingDirection"):
        check_phase_encoding(meta, run.path, "dwi")
