"""The participant level on real scanner data, one quirk per test (slow: 1-6 min per subject).

- an opposite-PE full-DTI pair (Canon, ``dir-AP``/``dir-PA``) is corrected and combined;
- its polarity is missing (``PhaseEncodingAxis`` only) and recognised from ``dir-``;
- its readout time is missing and a nominal one is used, flagged;
- a single run with unknown polarity (Toshiba) skips susceptibility correction with a warning;
- a dwi-only subject gets tissue classes and an analysis mask from the diffusion data;
- a slab (Philips, 64 mm) is reported as partial coverage.
"""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_uad.cli.run import main

pytestmark = pytest.mark.slow


def _participant(bids: Path, out: Path, label: str, *extra: str) -> int:
    return main([str(bids), str(out), "participant", "--participant-label", label, "-w", str(out.parent / "work"),
                 *extra])


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def canon(realdata, tmp_path_factory):
    out = tmp_path_factory.mktemp("canon") / "out"
    assert _participant(realdata / "vendors_bids", out, "canon61") == 0
    return out / "sub-canon61" / "dwi"


def test_pair_is_corrected_and_combined(canon, realdata):
    combined = canon / "sub-canon61_space-dwi_desc-preproc_dwi.nii.gz"
    assert nib.load(str(combined)).shape[3] == 26  # 13 + 13 volumes
    meta = _json(canon / "sub-canon61_space-dwi_desc-preproc_dwi.json")
    assert meta["CombinedRuns"] == ["sub-canon61_dir-AP_dwi.nii.gz", "sub-canon61_dir-PA_dwi.nii.gz"]
    second = meta["RunCombinationSettings"]["runs"][1]
    assert second["b0_correlation_after_alignment"] > 0.8
    for label in ("AP", "PA"):  # each run corrected on its own, with the pair's field in its frame
        assert (canon / f"sub-canon61_dir-{label}_space-dwi_desc-susceptibility_fieldmap.nii.gz").is_file()
    pa = _json(canon / "sub-canon61_dir-PA_space-dwi_desc-susceptibility_fieldmap.json")["SDCSettings"]
    assert "one fit for the pair" in pa["FieldEstimatedWith"]  # fitted once, by the AP run
    assert pa["ReversePEImage"] == "sub-canon61_dir-AP_dwi.nii.gz"
    # the correction brings the two phase-encoding directions together
    mask = nib.load(str(canon / "sub-canon61_space-dwi_desc-brain_mask.nii.gz")).get_fdata() > 0
    raw = [nib.load(str(realdata / "vendors_bids" / "sub-canon61" / "dwi" / f"sub-canon61_dir-{d}_dwi.nii.gz"))
           .dataobj[..., 0] for d in ("AP", "PA")]
    before = np.corrcoef(np.asarray(raw[0])[mask], np.asarray(raw[1])[mask])[0, 1]
    assert second["b0_correlation_before_alignment"] > before + 0.2
    fa = nib.load(str(canon / "sub-canon61_space-dwi_model-tensor_param-fa_dwimap.nii.gz")).get_fdata()
    wm = nib.load(str(canon / "sub-canon61_space-dwi_dseg.nii.gz")).get_fdata() == 3
    assert 0.3 < np.median(fa[wm]) < 0.6


def test_missing_polarity_recognised_from_dir_entity(canon):
    sdc = _json(canon / "sub-canon61_dir-AP_space-dwi_desc-susceptibility_fieldmap.json")["SDCSettings"]
    assert sdc["PhaseEncodingDirection"] == "j-" and sdc["ReversePhaseEncodingDirection"] == "j"
    assert "dir-AP entity" in sdc["PhaseEncodingDirectionSource"]


def test_missing_readout_time_nominal_and_flagged(canon):
    sdc = _json(canon / "sub-canon61_dir-PA_space-dwi_desc-susceptibility_fieldmap.json")["SDCSettings"]
    assert sdc["TotalReadoutTime"] == pytest.approx(0.05)
    assert sdc["TotalReadoutTimeSource"].startswith("nominal")
    html = (canon.parents[1] / "sub-canon61.html").read_text()
    assert "nominal (missing from the sidecar)" in html


@pytest.fixture(scope="module")
def toshiba(realdata, tmp_path_factory):
    out = tmp_path_factory.mktemp("toshiba") / "out"
    assert _participant(realdata / "vendors_bids", out, "toshiba") == 0
    return out


def test_unknown_polarity_single_run_skips_sdc_without_crash(toshiba):
    dwi = toshiba / "sub-toshiba" / "dwi"
    assert not list(dwi.glob("*fieldmap*"))
    meta = _json(dwi / "sub-toshiba_space-dwi_desc-preproc_dwi.json")
    assert meta["SusceptibilityDistortionCorrection"].startswith("None")
    log = "\n".join(p.read_text() for p in (toshiba / "logs").glob("run-*.log"))
    assert "polarity unknown" in log


def test_dwi_only_tissue_classes_and_analysis_mask(toshiba):
    dwi = toshiba / "sub-toshiba" / "dwi"
    dseg = nib.load(str(dwi / "sub-toshiba_space-dwi_dseg.nii.gz")).get_fdata()
    fa = nib.load(str(dwi / "sub-toshiba_space-dwi_model-tensor_param-fa_dwimap.nii.gz")).get_fdata()
    md = nib.load(str(dwi / "sub-toshiba_space-dwi_model-tensor_param-md_dwimap.nii.gz")).get_fdata()
    assert np.median(fa[dseg == 3]) > np.median(fa[dseg == 2]) + 0.1  # WM more anisotropic than GM
    assert np.median(md[dseg == 1]) > 1.5 * np.median(md[dseg == 2])  # CSF diffuses faster
    analysis = nib.load(str(dwi / "sub-toshiba_space-dwi_desc-analysis_mask.nii.gz")).get_fdata() > 0
    tissue = np.isin(dseg, (2, 3))
    # GM and WM, less the brain mask's boundary layer and what a corrected volume left uncovered
    assert not (analysis & ~tissue).any() and analysis.sum() > 0.6 * tissue.sum()
    brain = nib.load(str(dwi / "sub-toshiba_space-dwi_desc-brain_mask.nii.gz")).get_fdata() > 0
    from scipy import ndimage
    assert not (analysis & ~ndimage.binary_erosion(brain, np.ones((3, 3, 3), bool))).any()
    assert "diffusion data" in _json(dwi / "sub-toshiba_space-dwi_desc-analysis_mask.json")["TissueClasses"]
    assert "Tissue classes from the diffusion data" in (toshiba / "sub-toshiba.html").read_text()
    # registered to the template through its FA (no T1w), and well: 0.65 measured
    xfm = _json(next(dwi.glob("sub-toshiba_from-dwi_to-MNI*_xfm.json")))
    assert xfm["TemplateRegistrationQuality"]["FACorrelationWithTemplate"] > 0.5


def test_slab_reported_as_partial_coverage(realdata, tmp_path):
    src = realdata / "philips_dti_b1000" / "701_DTI_Biobank_2mm_MB3S2_EPI"
    bids = tmp_path / "bids"
    (bids / "sub-slab" / "dwi").mkdir(parents=True)
    (bids / "dataset_description.json").write_text('{"Name": "slab", "BIDSVersion": "1.9.0"}')
    for ext in (".nii.gz", ".bval", ".bvec", ".json"):
        (bids / "sub-slab" / "dwi" / f"sub-slab_dwi{ext}").symlink_to(Path(f"{src}{ext}"))
    out = tmp_path / "out"
    assert _participant(bids, out, "slab") == 0
    coverage = _json(out / "sub-slab" / "dwi" / "sub-slab_space-dwi_desc-brain_mask.json")["Coverage"]
    assert coverage["WholeBrain"] is False and "k" in coverage["CutAxes"]
    assert coverage["FieldOfViewMm"][2] == pytest.approx(64.0)
    assert "partial" in (out / "sub-slab.html").read_text()
