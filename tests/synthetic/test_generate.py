"""The synthetic dataset: BIDS validity, truth consistency, determinism, speed."""
from __future__ import annotations

import json
import shutil
import subprocess
import time

import nibabel as nib
import numpy as np
import pytest

from bids_uad.bids.layout import BIDSInputs
from bids_uad.bids.validate import validate_anatomical, validate_dwi_run
from bids_uad.errors import UsageError
from bids_uad.synthetic import generate_dataset
from bids_uad.synthetic.cli import main as synth_main
from bids_uad.synthetic.distortion import displacement_voxels, distort, undistort

TRUTH = "derivatives/synthetic-truth"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "ds"
    start = time.monotonic()
    generate_dataset(out, preset="tiny", n_controls=2, n_patients=1, seed=0, progress=False, n_jobs=1,
                     no_reverse_pe_fraction=0.0)
    return out, time.monotonic() - start


def _load(path):
    return np.asarray(nib.load(str(path)).dataobj)


def test_layout_loads_and_validates(tiny):
    root, _ = tiny
    bids = BIDSInputs(root)
    assert bids.subjects() == ["ctrl01", "ctrl02", "pat01"]
    assert bids.controls() == ["ctrl01", "ctrl02"]
    assert bids.sessions("pat01") == ["followup", "pre"]
    assert bids.sessions("ctrl02") == ["pre"]
    ses = bids.session_inputs("pat01", "pre")
    assert len(ses.dwi) == 1 and ses.t1w and ses.flair
    run = ses.dwi[0]
    assert run.reverse_pe is not None and run.reverse_pe.kind == "fmap-epi"
    table = validate_dwi_run(run)
    assert table.n_volumes == 33 and table.b0_mask.sum() == 1 and table.shells == (1000.0,)
    validate_anatomical(ses.t1w[0])
    validate_anatomical(ses.flair[0], "FLAIR")
    rows = (root / "sub-pat01" / "sub-pat01_sessions.tsv").read_text().splitlines()
    assert rows[0] == "session_id\tacq_time" and len(rows) == 3
    desc = json.loads((root / TRUTH / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"


def test_pybids_indexes_with_validation(tiny):
    import bids

    layout = bids.BIDSLayout(str(tiny[0]), validate=True)
    # ctrl01 (the control with two sessions) and pat01 have dwi in both sessions
    assert len(layout.get(suffix="dwi", extension=".nii.gz")) == 5
    assert len(layout.get(suffix="epi", extension=".nii.gz")) == 5


def test_bids_validator_when_installed(tiny):
    exe = shutil.which("bids-validator")
    if exe is None:
        pytest.skip("bids-validator (npm) is not installed")
    proc = subprocess.run([exe, str(tiny[0]), "--json"], capture_output=True, text=True, timeout=300)
    report = json.loads(proc.stdout or "{}")
    errors = report.get("issues", {}).get("errors", []) if isinstance(report.get("issues"), dict) else []
    assert not errors, errors


def test_truth_tissue_and_fa(tiny):
    root, _ = tiny
    d = root / TRUTH / "sub-ctrl01" / "ses-pre" / "dwi"
    dseg = _load(d / "sub-ctrl01_ses-pre_space-dwi_dseg.nii.gz")
    fa = _load(d / "sub-ctrl01_ses-pre_space-dwi_model-tensor_param-fa_dwimap.nii.gz")
    md = _load(d / "sub-ctrl01_ses-pre_space-dwi_model-tensor_param-md_dwimap.nii.gz")
    from scipy import ndimage

    wm_core = ndimage.binary_erosion(dseg == 3)
    assert 0.45 <= np.median(fa[wm_core]) <= 0.85
    assert 0.6e-3 <= np.median(md[wm_core]) <= 0.9e-3
    gm_core = ndimage.binary_erosion(dseg == 2)
    assert np.median(fa[gm_core]) < 0.3
    assert np.median(md[dseg == 1]) > 1.5e-3


def test_lesions_inside_brain_and_growth_into_infiltration(tiny):
    root, _ = tiny
    for space, folder in (("T1w", "anat"), ("dwi", "dwi")):
        pre = root / TRUTH / "sub-pat01" / "ses-pre" / folder
        brain = _load(pre / f"sub-pat01_ses-pre_space-{space}_desc-brain_mask.nii.gz") > 0
        tumor = _load(pre / f"sub-pat01_ses-pre_space-{space}_desc-tumor_mask.nii.gz") > 0
        infil = _load(pre / f"sub-pat01_ses-pre_space-{space}_desc-infiltration_mask.nii.gz") > 0
        assert tumor.sum() > 10 and infil.sum() > 10
        assert np.all(brain[tumor]) and np.all(brain[infil])
        assert not np.any(tumor & infil)
    # follow-up lesion covers part of the baseline infiltration zone (same subject anatomy; compare in
    # template-independent terms: the follow-up T1w grid equals the baseline's, poses differ, so use
    # the lesion parameters recorded by the generator)
    info = json.loads((root / TRUTH / "sub-pat01" / "sub-pat01_desc-lesion_info.json").read_text())
    pre, follow = info["pre"]["lesions"][0], info["followup"]["lesions"][0]
    assert pre["type"] == follow["type"] == "glioma" and pre["severity"] is None
    assert follow["mass_volume_ml"] > pre["mass_volume_ml"]


def test_distortion_round_trip_with_true_field(tiny):
    root, _ = tiny
    d = root / TRUTH / "sub-ctrl01" / "ses-pre" / "dwi"
    field = _load(d / "sub-ctrl01_ses-pre_desc-susceptibility_fieldmap.nii.gz").astype(np.float32)
    clean = _load(d / "sub-ctrl01_ses-pre_space-dwi_desc-clean_dwi.nii.gz")[..., 0].astype(np.float32)
    brain = _load(d / "sub-ctrl01_ses-pre_space-dwi_desc-brain_mask.nii.gz") > 0
    assert np.abs(field[brain]).max() > 20  # a real distortion, in Hz
    disp = displacement_voxels(field, 0.0265, "j-")
    warped = distort(clean, disp, axis=1)
    assert np.abs(warped - clean)[brain].mean() > 0.02 * clean[brain].mean()
    back = undistort(warped, disp, axis=1)
    err = np.abs(back - clean)[brain].mean() / clean[brain].mean()
    assert err < 0.03


def test_raw_dwi_is_distorted_against_clean(tiny):
    root, _ = tiny
    raw = _load(root / "sub-ctrl01/ses-pre/dwi/sub-ctrl01_ses-pre_dir-AP_dwi.nii.gz")[..., 0].astype(float)
    rpe = _load(root / "sub-ctrl01/ses-pre/fmap/sub-ctrl01_ses-pre_dir-PA_epi.nii.gz").astype(float)
    brain = _load(root / TRUTH / "sub-ctrl01/ses-pre/dwi/sub-ctrl01_ses-pre_space-dwi_desc-brain_mask.nii.gz") > 0
    # opposite phase encoding: the two b0s disagree where the field is strong
    assert np.corrcoef(raw[brain], rpe[brain])[0, 1] < 0.99
    meta = json.loads((root / "sub-ctrl01/ses-pre/fmap/sub-ctrl01_ses-pre_dir-PA_epi.json").read_text())
    assert meta["PhaseEncodingDirection"] == "j" and meta["IntendedFor"][0].startswith("bids::sub-ctrl01/")


def test_dwi_files_are_las_on_one_grid(tiny):
    """dwi, reverse-PE b0 and every dwi-space truth file share one LAS grid (as dcm2niix writes);
    the anatomical images stay RAS; phase encoding stays along j (AP = j-, PA = j)."""
    root, _ = tiny
    ses = root / "sub-pat01" / "ses-pre"
    dwi = nib.load(str(ses / "dwi" / "sub-pat01_ses-pre_dir-AP_dwi.nii.gz"))
    assert nib.aff2axcodes(dwi.affine) == ("L", "A", "S") and np.linalg.det(dwi.affine[:3, :3]) < 0
    others = [ses / "fmap" / "sub-pat01_ses-pre_dir-PA_epi.nii.gz",
              *sorted((root / TRUTH / "sub-pat01" / "ses-pre" / "dwi").glob("*.nii.gz"))]
    assert len(others) >= 12
    for path in others:
        img = nib.load(str(path))
        assert img.shape[:3] == dwi.shape[:3] and np.allclose(img.affine, dwi.affine), path.name
    t1w = nib.load(str(ses / "anat" / "sub-pat01_ses-pre_T1w.nii.gz"))
    assert nib.aff2axcodes(t1w.affine) == ("R", "A", "S")
    assert json.loads((ses / "dwi" / "sub-pat01_ses-pre_dir-AP_dwi.json").read_text())["PhaseEncodingDirection"] == "j-"
    assert json.loads((ses / "fmap" / "sub-pat01_ses-pre_dir-PA_epi.json").read_text())["PhaseEncodingDirection"] == "j"


def _world_directions(vectors: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """FSL b-vector frame -> world (RAS) directions: voxel frame if det < 0, x flipped if det > 0."""
    axes = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    if np.linalg.det(affine[:3, :3]) > 0:
        axes = axes @ np.diag([-1.0, 1.0, 1.0])
    return vectors @ axes.T


def test_bvecs_follow_the_fsl_convention(tiny):
    """A tensor fitted to the raw dwi with the written bval/bvec read by FSL's rule points along
    the fibres the simulator used (a wrong x flip fails on oblique fibres)."""
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    root, _ = tiny
    stem = root / "sub-ctrl02" / "ses-pre" / "dwi" / "sub-ctrl02_ses-pre_dir-AP_dwi"
    img = nib.load(f"{stem}.nii.gz")
    bvals = np.loadtxt(f"{stem}.bval")
    bvecs = np.loadtxt(f"{stem}.bvec").T
    truth = root / TRUTH / "sub-ctrl02" / "ses-pre" / "dwi"
    fibre = _load(truth / "sub-ctrl02_ses-pre_space-dwi_desc-fibre_dwimap.nii.gz")
    fa = _load(truth / "sub-ctrl02_ses-pre_space-dwi_model-tensor_param-fa_dwimap.nii.gz")
    sel = (fa > 0.5) & (np.linalg.norm(fibre, axis=-1) > 0.5)
    oblique = sel & (fibre[..., 0] ** 2 > 0.25) & (fibre[..., 0] ** 2 < 0.75)
    assert oblique.sum() > 100
    fit = TensorModel(gradient_table(bvals, bvecs=bvecs)).fit(np.asarray(img.dataobj, np.float32)[sel])
    principal = _world_directions(fit.evecs[..., 0], img.affine)
    cos = np.abs((principal * fibre[sel]).sum(-1))
    assert np.median(cos) > 0.95
    assert np.median(cos[oblique[sel]]) > 0.9
    flipped = principal * np.array([-1.0, 1.0, 1.0])  # what the opposite convention would give
    assert np.median(np.abs((flipped * fibre[sel]).sum(-1))[oblique[sel]]) < 0.6


def test_reverse_pe_b0_has_its_own_head_position(tiny):
    root, _ = tiny
    d = root / TRUTH / "sub-pat01" / "ses-pre" / "dwi"
    lines = (d / "sub-pat01_ses-pre_dir-PA_desc-motion_timeseries.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"] and len(lines) == 2
    pose = np.array([float(v) for v in lines[1].split("\t")])
    assert np.any(pose != 0) and np.abs(pose[:3]).max() < 3 and np.rad2deg(np.abs(pose[3:])).max() < 3
    meta = json.loads((d / "sub-pat01_ses-pre_dir-PA_desc-motion_timeseries.json").read_text())
    assert "voxel" in meta["Description"]


def test_patient_truth_has_every_lesion_region(tiny):
    root, _ = tiny
    for ses in ("pre", "followup"):
        d = root / TRUTH / "sub-pat01" / f"ses-{ses}" / "dwi"
        masks = {k: _load(d / f"sub-pat01_ses-{ses}_space-dwi_desc-{k}_mask.nii.gz") > 0
                 for k in ("core", "solid", "oedema", "infiltration", "tumor")}
        assert masks["core"].sum() >= 3 and masks["solid"].sum() >= masks["core"].sum() * 0.4
        assert masks["oedema"].sum() > 0 and masks["infiltration"].sum() > 0
        assert np.array_equal(masks["tumor"], masks["core"] | masks["solid"] | masks["oedema"])


def test_glioma_is_the_default_and_one_lesion_in_the_truth(tiny):
    """The default dataset's patient has one glioma: desc-lesions_dseg holds id 1 exactly where
    desc-tumor is, its TSV names the glioma (no severity) with its dwi-space volume."""
    root, _ = tiny
    assert "lesion generator glioma" in (root / "dataset_description.json").read_text()
    for ses in ("pre", "followup"):
        stem = root / TRUTH / "sub-pat01" / f"ses-{ses}" / "dwi" / f"sub-pat01_ses-{ses}_space-dwi"
        ids = _load(f"{stem}_desc-lesions_dseg.nii.gz")
        assert np.array_equal(ids > 0, _load(f"{stem}_desc-tumor_mask.nii.gz") > 0) and set(np.unique(ids)) == {0, 1}
        rows = [r.split("\t") for r in (stem.parent / f"{stem.name}_desc-lesions_dseg.tsv").read_text().splitlines()]
        assert rows[0] == ["index", "name", "type", "severity", "volume_ml"]
        assert rows[1][:4] == ["1", "lesion01", "glioma", "n/a"]
        assert abs(float(rows[1][4]) - (ids == 1).sum() * 4.0 ** 3 / 1000) < 1e-3
    assert not list((root / TRUTH / "sub-ctrl01").rglob("*desc-lesions_dseg*"))
    assert not list((root / TRUTH / "sub-ctrl01").rglob("*desc-tumor_mask*"))


def test_deterministic_by_seed(tmp_path):
    a = generate_dataset(tmp_path / "a", preset="tiny", n_controls=1, n_patients=0, seed=5, progress=False,
                         n_jobs=1)
    b = generate_dataset(tmp_path / "b", preset="tiny", n_controls=1, n_patients=0, seed=5, progress=False,
                         n_jobs=2)  # a worker process gives the same bytes
    for rel in ("sub-ctrl01/ses-pre/dwi/sub-ctrl01_ses-pre_dir-AP_dwi.nii.gz",
                "sub-ctrl01/ses-pre/anat/sub-ctrl01_ses-pre_T1w.nii.gz"):
        assert np.array_equal(_load(a / rel), _load(b / rel))
    c = generate_dataset(tmp_path / "c", preset="tiny", n_controls=1, n_patients=0, seed=6, progress=False,
                         n_jobs=1)
    rel = "sub-ctrl01/ses-pre/anat/sub-ctrl01_ses-pre_T1w.nii.gz"
    assert not np.array_equal(_load(a / rel), _load(c / rel))


def test_refuses_foreign_folder_and_bad_options(tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        generate_dataset(foreign, preset="tiny")
    assert (foreign / "keep.txt").read_text() == "mine"
    assert synth_main([str(tmp_path / "x"), "--preset", "huge"]) == 64
    assert synth_main([str(tmp_path / "x"), "--no-reverse-pe-fraction", "2"]) == 64
    assert "no-reverse-pe-fraction" in capsys.readouterr().err


def test_tiny_generation_time(tiny):
    # 3 subjects (two with two sessions) in one process, template load included: about 7 s on an
    # idle core; the bound only guards against gross slowdowns on a loaded machine
    assert tiny[1] < 60
