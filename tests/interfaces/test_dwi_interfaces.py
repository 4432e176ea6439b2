"""dwi interfaces: input validation (PE metadata, b0s, grids), FSL command lines, entities."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")

from bids_uad.bids.phase_encoding import NOMINAL_TOTAL_READOUT_TIME
from bids_uad.bids.validate import total_readout_time  # noqa: E402
from bids_uad.errors import InputValidationError  # noqa: E402
from bids_uad.interfaces import fsl as fsl_if  # noqa: E402
from bids_uad.interfaces.derivatives import DerivativesDataSink  # noqa: E402
from bids_uad.interfaces.workfiles import work_nifti  # noqa: E402
from bids_uad.interfaces.dwi import (  # noqa: E402
    EstimateSDC,
    TransferSDC,
)


def _write(tmp_path: Path, bvals, shape=(12, 14, 10), rpe_shape=None, rpe_affine=None):
    rng = np.random.default_rng(0)
    n = len(bvals)
    data = (rng.random(shape + (n,)) * 100 + 100).astype(np.float32)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    dwi = tmp_path / "sub-01_dir-AP_dwi.nii.gz"
    nib.save(nib.Nifti1Image(data, aff), str(dwi))
    bvecs = rng.standard_normal((n, 3))
    bvecs /= np.linalg.norm(bvecs, axis=1, keepdims=True)
    bvecs[np.asarray(bvals) == 0] = 0
    (tmp_path / "sub-01_dir-AP_dwi.bval").write_text(" ".join(str(b) for b in bvals))
    (tmp_path / "sub-01_dir-AP_dwi.bvec").write_text("\n".join(" ".join(map(str, r)) for r in bvecs.T))
    rpe = tmp_path / "sub-01_dir-PA_epi.nii.gz"
    rshape = rpe_shape or shape
    nib.save(nib.Nifti1Image((rng.random(rshape) * 100 + 100).astype(np.float32),
                             aff if rpe_affine is None else rpe_affine), str(rpe))
    return str(dwi), str(tmp_path / "sub-01_dir-AP_dwi.bval"), str(tmp_path / "sub-01_dir-AP_dwi.bvec"), str(rpe)


def _sdc(tmp_path, dwi, bval, bvec, rpe, meta, rmeta):
    node = EstimateSDC(dwi_file=dwi, bval_file=bval, bvec_file=bvec, dwi_metadata=meta, rpe_file=rpe,
                       rpe_metadata=rmeta)
    return node.run(cwd=str(tmp_path))


def test_series_without_b0_is_clear_error(tmp_path):
    dwi, bval, bvec, rpe = _write(tmp_path, [1000, 1000, 1000])
    with pytest.raises(InputValidationError, match="no b0"):
        _sdc(tmp_path, dwi, bval, bvec, "", {"PhaseEncodingDirection": "j-"}, {})


def test_same_polarity_names_sidecar(tmp_path):
    dwi, bval, bvec, rpe = _write(tmp_path, [0, 1000, 1000])
    meta = {"PhaseEncodingDirection": "j-", "TotalReadoutTime": 0.05}
    with pytest.raises(InputValidationError) as err:
        _sdc(tmp_path, dwi, bval, bvec, rpe, meta, dict(meta))
    assert "same polarity" in str(err.value)
    assert err.value.path.endswith("sub-01_dir-PA_epi.json")


def test_missing_readout_time_taken_from_partner_or_nominal_and_flagged(tmp_path):
    dwi, bval, bvec, rpe = _write(tmp_path, [0, 1000])
    res = _sdc(tmp_path, dwi, bval, bvec, rpe, {"PhaseEncodingDirection": "j-"},
               {"PhaseEncodingDirection": "j", "TotalReadoutTime": 0.04})
    sdc = res.outputs.report["SDCSettings"]
    assert sdc["TotalReadoutTime"] == pytest.approx(0.04)
    assert sdc["TotalReadoutTimeSource"].startswith("the other image")
    assert sdc["ReverseTotalReadoutTimeSource"] == "sidecar TotalReadoutTime"
    res = _sdc(tmp_path, dwi, bval, bvec, rpe, {"PhaseEncodingDirection": "j-"}, {"PhaseEncodingDirection": "j"})
    sdc = res.outputs.report["SDCSettings"]
    assert sdc["TotalReadoutTime"] == sdc["ReverseTotalReadoutTime"] == pytest.approx(NOMINAL_TOTAL_READOUT_TIME)
    assert sdc["TotalReadoutTimeSource"].startswith("nominal")
    assert res.outputs.readout_scale == pytest.approx(-NOMINAL_TOTAL_READOUT_TIME)


def test_missing_pe_direction_and_axis_mismatch(tmp_path):
    dwi, bval, bvec, rpe = _write(tmp_path, [0, 1000])
    with pytest.raises(InputValidationError, match="PhaseEncodingDirection"):
        _sdc(tmp_path, dwi, bval, bvec, rpe, {"TotalReadoutTime": 0.05},
             {"PhaseEncodingDirection": "j", "TotalReadoutTime": 0.05})
    with pytest.raises(InputValidationError, match="PE axis"):
        _sdc(tmp_path, dwi, bval, bvec, rpe, {"PhaseEncodingDirection": "j-", "TotalReadoutTime": 0.05},
             {"PhaseEncodingDirection": "i", "TotalReadoutTime": 0.05})


def test_readout_time_from_echo_spacing():
    assert total_readout_time({"EffectiveEchoSpacing": 0.0005}, 101, "x.json") == pytest.approx(0.05)
    with pytest.raises(InputValidationError):
        total_readout_time({"TotalReadoutTime": 5.0}, 10, "x.json")


def test_reverse_pe_on_other_grid_is_resampled(tmp_path):
    aff = np.diag([2.5, 2.5, 2.5, 1.0])
    dwi, bval, bvec, rpe = _write(tmp_path, [0, 1000], rpe_shape=(10, 11, 8), rpe_affine=aff)
    res = _sdc(tmp_path, dwi, bval, bvec, rpe, {"PhaseEncodingDirection": "j-", "TotalReadoutTime": 0.05},
               {"PhaseEncodingDirection": "j", "TotalReadoutTime": 0.05})
    assert res.outputs.report["SDCSettings"]["ReversePEResampledToDwiGrid"] is True
    assert nib.load(res.outputs.fieldmap_hz).shape == (12, 14, 10)
    assert len(res.outputs.b0_pair_raw) == 2 and len(res.outputs.b0_pair_corrected) == 2


def test_no_reverse_pe_skips_with_report(tmp_path):
    dwi, bval, bvec, _ = _write(tmp_path, [0, 1000])
    res = _sdc(tmp_path, dwi, bval, bvec, "", {"PhaseEncodingDirection": "j-", "TotalReadoutTime": 0.05}, {})
    assert res.outputs.fieldmap_hz == ""
    assert res.outputs.b0_pair_raw == []
    assert res.outputs.report["SusceptibilityDistortionCorrection"] == "None (no reverse phase-encoding image)"
    assert res.outputs.readout_scale == pytest.approx(-0.05)


def test_sink_skips_empty_and_names_file(tmp_path):
    res = DerivativesDataSink(in_file="", output_dir=str(tmp_path / "out"), output="fieldmap", skip_empty=True,
                              source_file="sub-01_dir-AP_dwi.nii.gz").run(cwd=str(tmp_path))
    assert res.outputs.out_file == ""
    f = tmp_path / "f.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), str(f))
    res = DerivativesDataSink(in_file=str(f), output_dir=str(tmp_path / "out"), output="fieldmap", skip_empty=True,
                              source_file="sub-01_dir-AP_dwi.nii.gz", meta={"Units": "Hz"}).run(cwd=str(tmp_path))
    out = Path(res.outputs.out_file)
    assert out.relative_to(tmp_path / "out").as_posix() == \
        "sub-01/dwi/sub-01_dir-AP_space-dwi_desc-susceptibility_fieldmap.nii.gz"
    assert json.loads(out.with_name(out.name.replace(".nii.gz", ".json")).read_text())["Units"] == "Hz"


def test_sink_compresses_work_images_as_nibabel_does(tmp_path):
    """A node's uncompressed work image becomes the same .nii.gz bytes that nibabel writes."""
    img = nib.Nifti1Image(np.random.default_rng(3).normal(size=(9, 8, 7)).astype(np.float32), np.diag([2, 2, 2, 1.0]))
    work = work_nifti(tmp_path, "field")
    assert work.endswith(".nii")
    nib.save(img, work)
    nib.save(img, str(tmp_path / "direct.nii.gz"))
    res = DerivativesDataSink(in_file=work, output_dir=str(tmp_path / "out"), output="fieldmap",
                              source_file="sub-01_dir-AP_dwi.nii.gz").run(cwd=str(tmp_path))
    out = Path(res.outputs.out_file)
    assert out.name.endswith("_fieldmap.nii.gz")
    assert out.read_bytes() == (tmp_path / "direct.nii.gz").read_bytes()
    # with no extension in the table, a work image is still stored compressed
    res = DerivativesDataSink(in_file=work, output_dir=str(tmp_path / "out"), suffix="probe",
                              source_file="sub-01_dir-AP_dwi.nii.gz").run(cwd=str(tmp_path))
    assert res.outputs.out_file.endswith("_probe.nii.gz")
    assert np.array_equal(nib.load(res.outputs.out_file).get_fdata(), img.get_fdata())


# ---------------------------------------------------------------- FSL command lines (no FSL)
@pytest.fixture
def fsl_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FSLOUTPUTTYPE", "NIFTI_GZ")
    for f in ("pair.nii.gz", "acqp.txt", "dwi.nii.gz", "dwi.bval", "dwi.bvec", "mask.nii.gz", "index.txt",
              "tu_fieldcoef.nii.gz", "tu_movpar.txt", "b0.nii.gz"):
        (tmp_path / f).write_text("")
    return tmp_path


def test_topup_cmdline(fsl_files):
    cmd = fsl_if.topup_interface("pair.nii.gz", "acqp.txt", out_base="tu").cmdline
    assert cmd.startswith("topup ")
    for part in ("--config=b02b0.cnf", "--datain=acqp.txt", "--imain=pair.nii.gz", "--out=tu",
                 "--fout=tu_field.nii.gz", "--iout=tu_corrected.nii.gz"):
        assert part in cmd


def test_applytopup_and_bet_cmdline(fsl_files):
    cmd = fsl_if.applytopup_interface(["b0.nii.gz"], "acqp.txt", "tu_fieldcoef.nii.gz", "tu_movpar.txt", [1]).cmdline
    assert cmd.startswith("applytopup ") and "--method=jac" in cmd and "--inindex=1" in cmd and "--topup=tu" in cmd
    bet = fsl_if.bet_interface("b0.nii.gz", 0.3).cmdline
    assert bet.startswith("bet b0.nii.gz") and "-f 0.30" in bet and "-m" in bet.split()


def test_eddy_cmdline_with_and_without_topup(fsl_files):
    cmd = fsl_if.eddy_interface("dwi.nii.gz", "dwi.bval", "dwi.bvec", "mask.nii.gz", "index.txt", "acqp.txt",
                                topup_base="tu", num_threads=2).cmdline
    assert cmd.split()[0].startswith("eddy")
    for part in ("--imain=dwi.nii.gz", "--bvals=dwi.bval", "--bvecs=dwi.bvec", "--mask=mask.nii.gz",
                 "--index=index.txt", "--acqp=acqp.txt", "--topup=tu", "--repol"):
        assert part in cmd
    cmd = fsl_if.eddy_interface("dwi.nii.gz", "dwi.bval", "dwi.bvec", "mask.nii.gz", "index.txt",
                                "acqp.txt").cmdline
    assert "--topup" not in cmd


def test_acqparams_any_axis_and_polarity():
    assert fsl_if.acqparams_lines(1, [-1, 1], [0.05, 0.05]) == "0 -1 0 0.050000\n0 1 0 0.050000\n"
    assert fsl_if.acqparams_lines(0, [1], [0.03]) == "1 0 0 0.030000\n"


def test_eddy_parameters_to_motion(tmp_path):
    p = tmp_path / "x.eddy_parameters"
    p.write_text("0.1 0.2 0.3 0.01 0.02 0.03 1 2 3 4\n0 0 0 0 0 0 0 0 0 0\n")
    m = fsl_if.eddy_parameters_to_motion(str(p))
    assert m.shape == (2, 6) and m[0, 5] == pytest.approx(0.03)


def test_second_run_of_a_pair_reuses_the_field(tmp_path):
    """The pair's field is fitted once; the other run gets it moved into its frame, its own PE
    direction and readout time, and settings with the two directions swapped."""
    dwi, bval, bvec, rpe = _write(tmp_path, [0, 1000])
    meta = {"PhaseEncodingDirection": "j-", "TotalReadoutTime": 0.05}
    first = _sdc(tmp_path, dwi, bval, bvec, rpe, meta, {"PhaseEncodingDirection": "j", "TotalReadoutTime": 0.04})
    partner = first.outputs.partner
    assert partner["readout_scale"] == pytest.approx(0.04) and partner["pe_direction"] == "j"
    (tmp_path / "second").mkdir()
    second = TransferSDC(dwi_file=rpe, partner=partner).run(cwd=str(tmp_path / "second"))
    assert second.outputs.pe_direction == "j" and second.outputs.readout_scale == pytest.approx(0.04)
    settings = second.outputs.report["SDCSettings"]
    assert settings["PhaseEncodingDirection"] == "j" and settings["ReversePhaseEncodingDirection"] == "j-"
    assert settings["TotalReadoutTime"] == pytest.approx(0.04)
    assert settings["ReversePEImage"] == "sub-01_dir-AP_dwi.nii.gz"
    assert "one fit for the pair" in settings["FieldEstimatedWith"]
    # the other run's movement as seen from this run: the inverse of the fitted pose
    from bids_uad.algorithms.hmc import params_to_matrix
    from bids_uad.algorithms.sdc import MOVEMENT_COLUMNS

    back = np.asarray([settings["movement"][0][k] for k in MOVEMENT_COLUMNS])
    assert np.allclose(params_to_matrix(back) @ params_to_matrix(np.asarray(partner["movement"])), np.eye(4),
                       atol=1e-3)
    field = nib.load(second.outputs.fieldmap_hz)
    assert field.shape == nib.load(rpe).shape
    from bids_uad.algorithms.sdc import field_in_moved_frame

    expected = field_in_moved_frame(nib.load(first.outputs.fieldmap_hz).get_fdata(), partner["movement"],
                                    (2.0, 2.0, 2.0))
    assert np.allclose(field.get_fdata(), expected, atol=1e-4)
    # nothing fitted for the pair: no correction, said so
    (tmp_path / "none").mkdir()
    none = TransferSDC(dwi_file=rpe, partner={}).run(cwd=str(tmp_path / "none"))
    assert none.outputs.fieldmap_hz == "" and none.outputs.report["SusceptibilityDistortionCorrection"].startswith("None")
