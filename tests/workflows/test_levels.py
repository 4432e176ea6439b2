"""Group training and participant inference wired end to end through derivatives on disk.

Preprocessing is not run here: the participant-level derivatives of the controls and one
patient are written directly (toy diffusion brains), which is exactly the interface the
group level reads.  Preprocessing itself is tested with its own workflow.
"""
from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from bids_uad.cli.run import main
from bids_uad.training.toydata import fibonacci_directions, make_toy_subject
from tests.conftest import build_small_bids

SHAPE = (16, 16, 12)
N_DIRS = 12


def _write_derivatives(out, lesions, label, seed, lesion, runs=("",)):
    for index, run in enumerate(runs):
        _write_run(out, lesions, label, seed + index, lesion and index == 0, run)


def _write_run(out, lesions, label, seed, lesion, run):
    bvecs = fibonacci_directions(N_DIRS)
    toy = make_toy_subject(SHAPE, bvecs, seed=seed, lesion=lesion, lesion_radius=0.3)
    s0 = 1000.0
    dwi = np.concatenate([np.where(toy.mask, s0, 0)[..., None], toy.data * s0], axis=-1).astype(np.float32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    folder = out / f"sub-{label}" / "ses-pre" / "dwi"
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"sub-{label}_ses-pre{'_' + run if run else ''}_space-dwi"
    nib.save(nib.Nifti1Image(dwi, affine), folder / f"{stem}_desc-preproc_dwi.nii.gz")
    (folder / f"{stem}_desc-preproc_dwi.bval").write_text(" ".join(["0"] + ["1000"] * N_DIRS))
    full = np.vstack([[0, 0, 0], bvecs])
    (folder / f"{stem}_desc-preproc_dwi.bvec").write_text("\n".join(" ".join(map(str, r)) for r in full.T))
    nib.save(nib.Nifti1Image(toy.mask.astype(np.uint8), affine), folder / f"{stem}_desc-brain_mask.nii.gz")
    if lesion or "PA" not in run:  # the T1w was registered to the first run only
        analysis = np.isin(toy.dseg, (2, 3)).astype(np.uint8)
        nib.save(nib.Nifti1Image(analysis, affine), folder / f"{stem}_desc-analysis_mask.nii.gz")
        _write_transforms(out, label, run)
    if lesion:
        lfolder = lesions / f"sub-{label}" / "ses-pre" / "dwi"
        lfolder.mkdir(parents=True)
        nib.save(nib.Nifti1Image(toy.lesion.astype(np.uint8), affine), lfolder / f"{stem}_desc-tumor_mask.nii.gz")


def _write_transforms(out, label, run):
    """Identity transforms dwi <-> T1w <-> template, as the anatomical workflow names them (the
    template-space normative model needs them both ways)."""
    import ants

    from bids_uad.algorithms.templates import find_template
    from bids_uad.bids import outputs

    identity = ants.create_ants_transform(transform_type="AffineTransform", dimension=3)
    dwi = f"sub-{label}_ses-pre{'_' + run if run else ''}_dwi.nii.gz"
    t1w = f"sub-{label}_ses-pre_T1w.nii.gz"
    for key, source in (("xfm_dwi_to_t1w", dwi), ("xfm_t1w_to_dwi", dwi), ("xfm_t1w_to_template", t1w),
                        ("xfm_template_to_t1w", t1w)):
        path = outputs.path_for(out, key, source, template=find_template().name)
        path.parent.mkdir(parents=True, exist_ok=True)
        ants.write_transform(identity, str(path))


@pytest.fixture()
def levels_setup(tmp_path):
    bids = build_small_bids(tmp_path / "bids", n_controls=4, n_patients=1)
    out, lesions = tmp_path / "out", tmp_path / "lesions"
    for i, label in enumerate(["ctrl01", "ctrl02", "ctrl03", "ctrl04"]):
        _write_derivatives(out, lesions, label, seed=i, lesion=False)
    # two full-DTI runs in opposite phase encoding, as sub-canon61: each is scored on its own
    _write_derivatives(out, lesions, "pat01", seed=10, lesion=True, runs=("dir-AP", "dir-PA"))
    return bids, out, lesions, tmp_path / "work"


def _tsv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def test_group_then_participant_inference(levels_setup, capsys):
    bids, out, lesions, work = levels_setup
    code = main([str(bids), str(out), "group", "--train-preset", "quick", "-w", str(work),
                 "--lesion-masks", str(lesions), "--seed", "3"])
    assert code == 0, capsys.readouterr().err
    for model in ("dae", "recdisc", "normative", "meansignal"):
        meta = json.loads((out / "models" / f"model-{model}.json").read_text())
        assert (out / "models" / f"model-{model}.safetensors").is_file()
        assert meta["training_subjects"] == ["ctrl01", "ctrl02", "ctrl03", "ctrl04"]
        assert len(meta["folds"]) == 3 and all(f["calibration"] for f in meta["folds"])
        folds = _tsv(out / "group" / f"model-{model}_folds.tsv")
        assert len(folds) == 3
        rows = _tsv(out / "group" / f"model-{model}_evaluation.tsv")
        assert [r["participant_id"] for r in rows] == ["sub-pat01"]
        assert 0.0 <= float(rows[0]["auroc"]) <= 1.0
        assert "dice_oracle-dice" in rows[0]
        summary = {r["metric"]: r for r in _tsv(out / "group" / f"model-{model}_evaluation_summary.tsv")}
        assert summary["auroc"]["n"] == "1"
    detection = {r["detector"]: r for r in _tsv(out / "group" / "detection_summary.tsv")}
    assert set(detection) == {"cdae", "dae", "recdisc", "normative", "meansignal", "1-FA", "MD"}
    assert all(0 <= float(r["auprc"]) <= 1 for r in detection.values())
    assert detection["MD"]["dice_calibrated"] == "n/a" and detection["dae"]["dice_calibrated"] != "n/a"
    # lesion-wise: models with a written map have a detection rate and false findings; 1-FA and MD none
    assert 0 <= float(detection["dae"]["lesion_detection_rate"]) <= 1 and int(detection["dae"]["n_lesions"]) >= 1
    assert float(detection["normative"]["false_findings_per_control"]) >= 0
    assert detection["MD"]["lesion_detection_rate"] == "n/a"
    assert "findings per control" in (out / "group.html").read_text()
    assert "Detection: models and baselines" in (out / "group.html").read_text()
    assert not list((out / "models").glob(".*"))  # no temporaries left behind
    assert "Cross-validation" in (out / "group.html").read_text() or "cross-validation" in (out / "group.html").read_text()

    code = main([str(bids), str(out), "participant", "--model", str(out / "models"), "--participant-label",
                 "pat01", "-w", str(work)])  # no --threshold: the model file's healthy-fpr
    err = capsys.readouterr().err
    assert code == 0, err
    html = (out / "sub-pat01.html").read_text()
    assert "model-dae" in html or "dae" in html
    folder = out / "sub-pat01" / "ses-pre" / "dwi"
    for run in ("dir-AP", "dir-PA"):
        stem = f"sub-pat01_ses-pre_{run}_space-dwi"
        # the T1w was registered to dir-AP only: dir-PA has no transforms to the template, so the
        # template-space models (the normative model; the dae, whose score is referred to the controls'
        # there) skip it (with a warning), the others score it
        for model in ("normative", "dae"):
            assert (f"{stem}_desc-preproc_dwi.nii.gz: model {model} not scored" in err) == (run == "dir-PA")
            assert (folder / f"{stem}_model-{model}_stat-score_anomaly.nii.gz").is_file() == (run == "dir-AP")
        for model in ("dae", "recdisc", "normative", "meansignal"):
            if model in ("normative", "dae") and run == "dir-PA":
                continue
            score = folder / f"{stem}_model-{model}_stat-score_anomaly.nii.gz"
            mask = folder / f"{stem}_model-{model}_desc-anomaly_mask.nii.gz"
            pvalue = folder / f"{stem}_model-{model}_stat-pvalue_anomaly.nii.gz"
            assert score.is_file() and mask.is_file() and pvalue.is_file()
            table = folder / f"sub-pat01_ses-pre_{run}_model-{model}_desc-findings_table.tsv"
            rows, sidecar = _tsv(table), json.loads(table.with_suffix(".json").read_text())
            with open(table) as handle:
                columns = handle.readline().rstrip("\n").split("\t")
            assert all(sidecar[c]["Description"] for c in columns)   # the sidecar describes every column
            assert sidecar["Findings"] == len(rows) and sidecar["Atlases"][0]["Key"] == "harvard_oxford"
            # the deviation signature's reference, the same for every model of a run: the controls (the
            # template-space normative model, carried back) where the run has the transforms, else the
            # subject's tissue, and the sidecar says why
            if run == "dir-AP":
                assert "healthy controls at the same template locations" in sidecar["DeviationReference"]
                # (these derivatives hold no tensor maps: FA/MD/AD/RD n/a, the mean DW ratio from the dwi)
                assert all(r["dwratio_reference"] == "controls" for r in rows)
                assert all(r[f"{k}_reference"] != "controls" for r in rows for k in ("ad", "rd"))  # not in the model
            else:
                assert "this run has no transforms" in sidecar["DeviationReference"]
                assert all(r["dwratio_reference"] == "subject" for r in rows)
            written = np.asarray(nib.load(mask).dataobj) > 0
            assert sum(int(r["n_voxels"]) for r in rows) <= written.sum()
            assert (not written.any()) or sidecar["MinimumVolumeMl"] > 0 or rows
            img = nib.load(score)
            assert img.shape == SHAPE
            meta = json.loads(score.with_name(score.name.replace(".nii.gz", ".json")).read_text())
            assert meta["ThresholdMethod"] == "healthy-fpr" and meta["ModelSHA256"]
            assert meta["ThresholdSource"].startswith("model file") and "written map" in meta["ThresholdReason"]
            assert "threshold_method" not in meta  # one spelling: BIDS CamelCase
            assert meta["Sources"][0].endswith(f"{run}_space-dwi_desc-preproc_dwi.nii.gz")
            # the report shows every run's maps
            assert f"sub-pat01_ses-pre_{run}_space-dwi_model-{model}_stat-score_anomaly.svg" in html
            if run == "dir-AP":  # scored in the analysis mask of the run the T1w was registered to
                analysis = np.asarray(nib.load(folder / f"{stem}_desc-analysis_mask.nii.gz").dataobj) > 0
                assert np.all(np.asarray(img.dataobj)[~analysis] == 0)
                assert np.all(np.asarray(nib.load(mask).dataobj)[~analysis] == 0)
            else:  # no analysis mask for this run: the brain mask
                assert meta["AnalysisMask"] == "brain mask"
    assert not list(folder.glob("sub-pat01_ses-pre_space-dwi_model-*"))


def test_group_refuses_normative_without_transforms(tmp_path, capsys):
    """The template-space normative model needs every control's transforms: exit 66 naming the
    controls without them, no fallback to the dwi grid."""
    bids = build_small_bids(tmp_path / "bids", n_controls=3, n_patients=0)
    out = tmp_path / "out"
    for i, label in enumerate(["ctrl01", "ctrl02", "ctrl03"]):
        _write_derivatives(out, tmp_path / "lesions", label, seed=i, lesion=False)
    for path in (out / "sub-ctrl02").rglob("*_xfm.h5"):
        path.unlink()
    code = main([str(bids), str(out), "group", "-w", str(tmp_path / "w"), "--train-preset", "quick",
                 "--models", "normative"])
    err = capsys.readouterr().err
    assert code == 66, err
    assert "sub-ctrl02: from-dwi_to-T1w" in err and "sub-ctrl01" not in err.split("missing for")[1]
    assert "--models without normative" in err


def test_group_without_participant_derivatives(tmp_path, capsys):
    bids = build_small_bids(tmp_path / "bids", n_controls=3, n_patients=0)
    code = main([str(bids), str(tmp_path / "out"), "group", "-w", str(tmp_path / "w"), "--train-preset", "quick"])
    assert code == 18
    assert "run the participant level first" in capsys.readouterr().err


def test_a_network_without_every_controls_transforms_keeps_its_raw_score(levels_setup, capsys):
    """A control without transforms to the template: the network's score cannot be referred to the
    controls' there, so it is trained with its preset's raw (magnitude) score, not the signed one a
    referred network gets, and the log says so."""
    bids, out, lesions, work = levels_setup
    for path in (out / "sub-ctrl04").rglob("*xfm.*"):
        path.unlink()
    code = main([str(bids), str(out), "group", "--train-preset", "quick", "-w", str(work), "--models", "cdae"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "not every control has transforms" in err
    model = json.loads((out / "models" / "model-cdae.json").read_text())["settings"]["model"]
    assert (model["normative_space"], model["score_reduction"]) == ("dwi", "abs-sum")
    # and on each subject's own dwi grid (no route to the template grid either)
    assert model["network_space"] == "dwi" and model["grid"] == [16, 16, 12]


def test_group_and_participant_with_cdae(levels_setup, capsys):
    bids, out, lesions, work = levels_setup
    code = main([str(bids), str(out), "group", "--train-preset", "quick", "-w", str(work), "--models", "cdae",
                 "--lesion-masks", str(lesions)])
    assert code == 0, capsys.readouterr().err
    meta = json.loads((out / "models" / "model-cdae.json").read_text())
    assert meta["architecture"]["class"] == "CoarseDAE" and len(meta["folds"]) == 3
    # the default: the network on the template grid, cut to where the controls' brains land (identity
    # transforms here: the 16x16x12 brains at 2 mm), not the template's whole field of view
    model = meta["settings"]["model"]
    assert model["network_space"] == "template" and model["grid"] == model["normative_template_shape"]
    assert all(g <= 24 for g in model["grid"]) and all(g % 2 ** model["depth"] == 0 for g in model["grid"])
    assert not (out / "models" / "model-dae.json").exists()
    code = main([str(bids), str(out), "participant", "--model", str(out / "models" / "model-cdae.json"),
                 "--participant-label", "pat01", "-w", str(work), "--threshold", "fixed"])
    assert code == 0, capsys.readouterr().err
    folder = out / "sub-pat01" / "ses-pre" / "dwi"
    score = folder / "sub-pat01_ses-pre_dir-AP_space-dwi_model-cdae_stat-score_anomaly.nii.gz"
    assert score.is_file()
    side = json.loads(score.with_name(score.name.replace(".nii.gz", ".json")).read_text())
    assert side["ThresholdMethod"] == "healthy-fpr"  # no reference fixed value: the model file's method
