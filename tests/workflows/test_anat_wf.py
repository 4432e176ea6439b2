"""The anatomical workflow end to end on a tiny synthetic head (Linear plugin, 4 mm)."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from bids_uad.algorithms.masking import dice
from bids_uad.algorithms.templates import NILEARN_NAME, phantom_head
from bids_uad.config import Settings


def _pose(deg, shift):
    rot = np.deg2rad(deg)
    pose = np.eye(4)
    pose[:3, :3] = [[np.cos(rot), -np.sin(rot), 0], [np.sin(rot), np.cos(rot), 0], [0, 0, 1]]
    pose[:3, 3] = shift
    return pose


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    root = tmp_path_factory.mktemp("anatwf")
    bids = root / "bids"
    anat = bids / "sub-pat01" / "ses-pre" / "anat"
    anat.mkdir(parents=True)
    head = phantom_head(4.0, warp_mm=2.0, lesion_radius_mm=12.0, seed=1)
    t1w = anat / "sub-pat01_ses-pre_T1w.nii.gz"
    nib.save(head["t1w"], t1w)
    flair = anat / "sub-pat01_ses-pre_FLAIR.nii.gz"
    moved = phantom_head(4.0, pose=_pose(4, [2, 1, 0]), warp_mm=2.0, seed=2)
    nib.save(moved["t1w"], flair)
    # a "b0": same head moved by a known rigid pose, CSF bright, 4 mm grid
    dwi_head = phantom_head(4.0, pose=_pose(-5, [3, -2, 2]), warp_mm=2.0, bias=0.0, seed=3)
    dseg = dwi_head["dseg"].get_fdata()
    b0 = np.select([dseg == 1, dseg == 2, dseg == 3], [1.0, 0.6, 0.4], 0.0).astype(np.float32)
    b0 *= 1000
    dwi_dir = root / "dwi"
    dwi_dir.mkdir()
    nib.save(nib.Nifti1Image(b0, dwi_head["dseg"].affine), dwi_dir / "b0.nii.gz")
    nib.save(dwi_head["brain_mask"], dwi_dir / "mask.nii.gz")
    nib.save(dwi_head["dseg"], dwi_dir / "truth_dseg.nii.gz")
    lesion = root / "lesion.nii.gz"
    nib.save(head["lesion"], lesion)
    return {"root": root, "bids": bids, "t1w": t1w, "flair": flair, "dwi": dwi_dir, "lesion": lesion,
            "truth": head}


def _settings(session, name):
    return Settings(bids_dir=session["bids"], output_dir=session["root"] / f"out_{name}",
                    analysis_level="participant", work_dir=session["root"] / f"work_{name}",
                    preproc_backend="python", omp_nthreads=1, seed=0)


def test_anat_wf_runs_and_writes_derivatives(session):
    from bids_uad.workflows.anat import init_anat_wf

    settings = _settings(session, "full")
    wf = init_anat_wf(settings, reg_iterations=(20, 10, 0), template_reg_mm=4.0)
    wf.base_dir = str(settings.work_dir)
    wf.inputs.inputnode.t1w_file = str(session["t1w"])
    wf.inputs.inputnode.flair_file = str(session["flair"])
    wf.inputs.inputnode.dwi_ref = str(session["dwi"] / "b0.nii.gz")
    wf.inputs.inputnode.dwi_mask = str(session["dwi"] / "mask.nii.gz")
    wf.inputs.inputnode.lesion_mask = str(session["lesion"])
    # the dwi run the T1w is registered to names the dwi-space outputs and the T1w<->dwi transforms
    wf.inputs.inputnode.dwi_source_file = str(session["bids"] / "sub-pat01" / "ses-pre" / "dwi"
                                              / "sub-pat01_ses-pre_acq-hb_dwi.nii.gz")
    wf.config["execution"]["remove_unnecessary_outputs"] = False
    graph = wf.run(plugin="Linear")
    out = settings.output_dir / "sub-pat01" / "ses-pre"
    expected_anat = [
        "desc-preproc_T1w.nii.gz", "desc-brain_mask.nii.gz", "dseg.nii.gz", "dseg.tsv",
        "label-GM_probseg.nii.gz", "label-WM_probseg.nii.gz", "label-CSF_probseg.nii.gz",
        "desc-ventricles_mask.nii.gz", "space-T1w_desc-preproc_FLAIR.nii.gz",
        "acq-hb_from-T1w_to-dwi_mode-image_xfm.h5", "acq-hb_from-dwi_to-T1w_mode-image_xfm.h5",
        f"from-T1w_to-{NILEARN_NAME}_mode-image_xfm.h5", f"from-{NILEARN_NAME}_to-T1w_mode-image_xfm.h5",
        f"space-{NILEARN_NAME}_desc-brain_T1w.nii.gz",
    ]
    for suffix in expected_anat:
        assert (out / "anat" / f"sub-pat01_ses-pre_{suffix}").is_file(), suffix
    expected_dwi = ["space-dwi_dseg.nii.gz", "space-dwi_label-GM_probseg.nii.gz",
                    "space-dwi_label-WM_probseg.nii.gz", "space-dwi_label-CSF_probseg.nii.gz",
                    "space-dwi_desc-ventricles_mask.nii.gz", "space-dwi_desc-analysis_mask.nii.gz"]
    for suffix in expected_dwi:
        assert (out / "dwi" / f"sub-pat01_ses-pre_acq-hb_{suffix}").is_file(), suffix
    dwi_dseg = nib.load(out / "dwi" / "sub-pat01_ses-pre_acq-hb_space-dwi_dseg.nii.gz")
    truth = nib.load(session["dwi"] / "truth_dseg.nii.gz")
    assert dwi_dseg.shape == truth.shape and np.allclose(dwi_dseg.affine, truth.affine)
    assert set(np.unique(dwi_dseg.get_fdata())) <= {0, 1, 2, 3}
    assert dice(dwi_dseg.get_fdata() == 3, truth.get_fdata() == 3) > 0.6
    analysis = nib.load(out / "dwi" / "sub-pat01_ses-pre_acq-hb_space-dwi_desc-analysis_mask.nii.gz").get_fdata()
    vent = nib.load(out / "dwi" / "sub-pat01_ses-pre_acq-hb_space-dwi_desc-ventricles_mask.nii.gz").get_fdata()
    assert analysis.sum() > 0 and not (analysis.astype(bool) & vent.astype(bool)).any()
    meta = json.loads((out / "anat" / "sub-pat01_ses-pre_desc-brain_mask.json").read_text())
    assert meta["Template"] == NILEARN_NAME
    brain = nib.load(out / "anat" / "sub-pat01_ses-pre_desc-brain_mask.nii.gz").get_fdata()
    assert dice(brain, session["truth"]["brain_mask"].get_fdata()) > 0.9
    # outputnode contract
    nodes = {n.fullname: n for n in graph.nodes()}
    reg = [n for name, n in nodes.items() if name.endswith("t1w_to_dwi")][0]
    assert reg.result.outputs.forward_transforms[0].endswith("Composite.h5")


def test_anat_wf_without_flair_or_dwi(session):
    from bids_uad.workflows.anat import init_anat_wf

    settings = _settings(session, "nodwi")
    wf = init_anat_wf(settings, skullstrip_method="morph", reg_iterations=(10, 0, 0), template_reg_mm=6.0)
    wf.base_dir = str(settings.work_dir)
    wf.inputs.inputnode.t1w_file = str(session["t1w"])
    wf.inputs.inputnode.flair_file = ""
    wf.inputs.inputnode.dwi_ref = ""
    wf.inputs.inputnode.dwi_mask = ""
    wf.inputs.inputnode.lesion_mask = ""
    wf.inputs.inputnode.dwi_source_file = ""
    wf.run(plugin="Linear")
    out = settings.output_dir / "sub-pat01" / "ses-pre"  # named after the T1w source file
    assert (out / "anat" / "sub-pat01_ses-pre_dseg.nii.gz").is_file()
    assert not (out / "anat" / "sub-pat01_ses-pre_space-T1w_desc-preproc_FLAIR.nii.gz").exists()
    assert not (out / "dwi").exists()


def test_outputnode_fields_match_contract():
    from bids_uad.workflows.anat import OUTPUT_FIELDS

    for field in ("t1w_preproc", "t1w_brain_mask", "t1w_dseg", "t1w_probsegs", "flair_t1w",
                  "dwi_dseg", "dwi_probsegs", "dwi_ventricles", "dwi_analysis_mask", "t1w2dwi_xfm",
                  "t1w2mni_xfm", "mni2t1w_xfm", "template_name", "template_file"):
        assert field in OUTPUT_FIELDS
