"""The whole chain on a tiny synthetic dataset: participant → group → participant --model.

This is the one end-to-end run kept in the default (CI) suite: 3 controls (one session each: a
control's follow-up would repeat the patient's longitudinal path) and 1 patient with two
sessions, every stage for real (SDC, motion/eddy correction, tensor, N4, skull strip,
segmentation, SyN, training with the quick preset, calibration, inference, longitudinal
comparison, reports), then a check of the derivative files a user relies on.

The group level trains the default list's first network (the cdae) and the two baselines, which
keeps the suite inside its time budget (issue 21): the DAE and RecDiscNet add two minutes of
training here, and their group training and inference are tested through derivatives on disk
(tests/workflows/test_levels.py).  ``test_every_default_model`` (slow) runs the group level and
inference with the whole default list on the same participant derivatives.
"""
from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from bids_uad.cli.run import main
from bids_uad.config import DEFAULT_MODELS
from bids_uad.synthetic import generate_dataset

#: the models the fast chain trains: the default network and the baselines it is compared with
MODELS = ["cdae", "normative", "meansignal"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    bids = generate_dataset(root / "bids", preset="tiny", n_controls=3, n_patients=1, seed=1, progress=False,
                            no_reverse_pe_fraction=0.0, n_controls_two_sessions=0)
    out, work = root / "out", root / "work"
    truth = bids / "derivatives" / "synthetic-truth"
    common = ["-w", str(work), "--nprocs", "2", "--lesion-masks", str(truth), "--seed", "0"]
    codes = {"participant": main([str(bids), str(out), "participant", *common])}
    codes["group"] = main([str(bids), str(out), "group", "--train-preset", "quick", "--models", *MODELS, *common])
    codes["inference"] = main([str(bids), str(out), "participant", "--model", str(out / "models"), *common])
    return bids, out, codes


def test_every_level_succeeds(tiny_run):
    assert tiny_run[2] == {"participant": 0, "group": 0, "inference": 0}
    bids = tiny_run[0]
    assert [p.name for p in sorted(bids.glob("sub-ctrl*/ses-*"))] == ["ses-pre"] * 3  # n_controls_two_sessions=0
    assert [p.name for p in sorted(bids.glob("sub-pat01/ses-*"))] == ["ses-followup", "ses-pre"]


@pytest.mark.parametrize("name", [
    "dataset_description.json",
    "sub-ctrl01/ses-pre/dwi/sub-ctrl01_ses-pre_dir-AP_space-dwi_desc-preproc_dwi.nii.gz",
    "sub-ctrl01/ses-pre/dwi/sub-ctrl01_ses-pre_dir-AP_space-dwi_desc-preproc_dwi.bval",
    "sub-ctrl01/ses-pre/dwi/sub-ctrl01_ses-pre_dir-AP_space-dwi_desc-preproc_dwi.bvec",
    "sub-ctrl01/ses-pre/dwi/sub-ctrl01_ses-pre_dir-AP_space-dwi_desc-brain_mask.nii.gz",
    "sub-ctrl01/ses-pre/dwi/sub-ctrl01_ses-pre_dir-AP_space-dwi_model-tensor_param-fa_dwimap.nii.gz",
    "sub-ctrl01/ses-pre/dwi/sub-ctrl01_ses-pre_dir-AP_space-dwi_model-tensor_param-md_dwimap.nii.gz",
    "sub-ctrl01/ses-pre/dwi/sub-ctrl01_ses-pre_dir-AP_space-dwi_desc-susceptibility_fieldmap.nii.gz",
    "sub-ctrl01/ses-pre/dwi/sub-ctrl01_ses-pre_dir-AP_desc-motion_timeseries.tsv",
    "sub-ctrl01/ses-pre/dwi/sub-ctrl01_ses-pre_dir-AP_space-dwi_dseg.nii.gz",
    "sub-ctrl01/ses-pre/dwi/sub-ctrl01_ses-pre_dir-AP_space-dwi_desc-analysis_mask.nii.gz",
    "sub-ctrl01/ses-pre/anat/sub-ctrl01_ses-pre_desc-preproc_T1w.nii.gz",
    "sub-ctrl01/ses-pre/anat/sub-ctrl01_ses-pre_desc-brain_mask.nii.gz",
    "sub-ctrl01/ses-pre/anat/sub-ctrl01_ses-pre_dseg.nii.gz",
    "models/model-cdae.json", "models/model-cdae.safetensors",
    "models/model-normative.json", "models/model-normative.safetensors",
    "models/model-meansignal.json", "models/model-meansignal.safetensors",
    "group/detection_summary.tsv", "group/detection_groups.tsv",
    "group/model-cdae_evaluation.tsv", "group/model-normative_evaluation_summary.tsv",
    "sub-pat01/ses-pre/dwi/sub-pat01_ses-pre_dir-AP_space-dwi_model-cdae_stat-score_anomaly.nii.gz",
    "sub-pat01/ses-pre/dwi/sub-pat01_ses-pre_dir-AP_space-dwi_model-cdae_desc-anomaly_mask.nii.gz",
    "sub-pat01/ses-pre/dwi/sub-pat01_ses-pre_dir-AP_space-dwi_model-normative_stat-score_anomaly.nii.gz",
    "sub-pat01/sub-pat01_desc-longitudinal_stats.tsv",
    "group/desc-longitudinal_stats.tsv",
    "sub-ctrl01.html", "sub-pat01.html", "group.html",
])
def test_expected_derivatives(tiny_run, name):
    assert (tiny_run[1] / name).is_file(), name


def test_input_untouched_and_no_temporaries(tiny_run):
    bids, out, _ = tiny_run
    assert not (bids / "derivatives" / "bids_uad").exists()
    assert not [p for p in out.rglob(".*") if p.is_file() and p.name != ".bidsignore"]


def test_outputs_are_consistent(tiny_run):
    bids, out, _ = tiny_run
    dwi = out / "sub-pat01/ses-pre/dwi"
    score = nib.load(dwi / "sub-pat01_ses-pre_dir-AP_space-dwi_model-cdae_stat-score_anomaly.nii.gz")
    preproc = nib.load(dwi / "sub-pat01_ses-pre_dir-AP_space-dwi_desc-preproc_dwi.nii.gz")
    assert score.shape == preproc.shape[:3] and np.allclose(score.affine, preproc.affine)
    analysis = np.asarray(nib.load(dwi / "sub-pat01_ses-pre_dir-AP_space-dwi_desc-analysis_mask.nii.gz").dataobj) > 0
    assert np.all(np.asarray(score.dataobj)[~analysis] == 0)
    meta = json.loads((dwi / "sub-pat01_ses-pre_dir-AP_space-dwi_model-cdae_stat-score_anomaly.json").read_text())
    assert meta["ModelSHA256"] and meta["ThresholdMethod"] == "healthy-fpr"
    # the referred network's fold ensemble is put back on one fold's null scale
    assert meta["Ensemble"] is True and 0 < meta["EnsembleScale"][0] <= 1.5
    assert meta["ThresholdSource"].startswith("model file")
    with open(out / "group/model-cdae_evaluation.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert [r["participant_id"] for r in rows] == ["sub-pat01"]
    assert 0 <= float(rows[0]["auroc"]) <= 1


@pytest.mark.slow
def test_every_default_model(tiny_run, tmp_path):
    """The group level and inference with the whole default model list, on the fast chain's
    participant derivatives (a hard-linked copy)."""
    import os
    import shutil

    bids, out, _ = tiny_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy, copy_function=os.link, ignore=shutil.ignore_patterns("models", "group*"))
    common = ["-w", str(tmp_path / "work"), "--nprocs", "2", "--seed", "0",
              "--lesion-masks", str(bids / "derivatives" / "synthetic-truth")]
    assert main([str(bids), str(copy), "group", "--train-preset", "quick", *common]) == 0
    assert main([str(bids), str(copy), "participant", "--model", str(copy / "models"), "--participant-label",
                 "pat01", *common]) == 0
    dwi = copy / "sub-pat01/ses-pre/dwi"
    for model in DEFAULT_MODELS:
        assert (copy / "models" / f"model-{model}.safetensors").is_file(), model
        assert (dwi / f"sub-pat01_ses-pre_dir-AP_space-dwi_model-{model}_stat-score_anomaly.nii.gz").is_file(), model
        assert (copy / "group" / f"model-{model}_evaluation.tsv").is_file(), model
