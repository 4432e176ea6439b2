"""The longitudinal workflow on derivatives built in the test (4 mm phantom heads, Linear plugin)."""
from __future__ import annotations

import csv
import json
import multiprocessing as mp
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_uad.config import Settings
from bids_uad.errors import InputMissingError, UsageError

MODEL = "dae"
CENTRE = np.array([26.0, -10.0, 22.0])  # phantom_head's lesion centre (template world, mm)


def _pose(deg, shift):
    rot = np.deg2rad(deg)
    pose = np.eye(4)
    pose[:3, :3] = [[np.cos(rot), -np.sin(rot), 0], [np.sin(rot), np.cos(rot), 0], [0, 0, 1]]
    pose[:3, 3] = shift
    return pose


def _identity_xfm(path: Path) -> None:
    import ants

    ants.write_transform(ants.create_ants_transform(transform_type="AffineTransform", dimension=3), str(path))


def _save(data, affine, path: Path, dtype=np.float32):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data).astype(dtype), affine), str(path))


def _world_distance(shape, affine, centre):
    ijk = np.indices(shape).reshape(3, -1).astype(float)
    xyz = affine[:3, :3] @ ijk + affine[:3, 3:4]
    return np.linalg.norm(xyz - centre[:, None], axis=0).reshape(shape)


def _flair(head, rng):
    dseg = np.asarray(head["dseg"].dataobj)
    flair = np.select([dseg == 1, dseg == 2, dseg == 3], [25.0, 110.0, 100.0], 0.0)
    flair = flair + 4.0 * rng.standard_normal(flair.shape) * (dseg > 0)
    flair[np.asarray(head["lesion"].dataobj) > 0] = 190.0
    return flair


def _session(out: Path, bids: Path, sub: str, ses: str, head: dict, rng, *, pose=None,
             anomaly_radius: float | None = None, false_positives=(), dwi=True, lesion_dir=None):
    """Write the derivatives one session would have after participant (--model) runs."""
    prefix = f"sub-{sub}_ses-{ses}"
    anat, dwid = out / f"sub-{sub}" / f"ses-{ses}" / "anat", out / f"sub-{sub}" / f"ses-{ses}" / "dwi"
    t1w = head["t1w"]
    _save(t1w.get_fdata(), t1w.affine, anat / f"{prefix}_desc-preproc_T1w.nii.gz")
    _save(head["brain_mask"].get_fdata(), t1w.affine, anat / f"{prefix}_desc-brain_mask.nii.gz", np.uint8)
    _save(_flair(head, rng), t1w.affine, anat / f"{prefix}_space-T1w_desc-preproc_FLAIR.nii.gz")
    raw = bids / f"sub-{sub}" / f"ses-{ses}"
    (raw / "anat").mkdir(parents=True, exist_ok=True)
    (raw / "anat" / f"{prefix}_T1w.nii.gz").write_bytes(b"")
    if lesion_dir is not None:
        _save(head["lesion"].get_fdata(), t1w.affine,
              lesion_dir / f"sub-{sub}" / f"ses-{ses}" / "anat" / f"{prefix}_desc-tumor_mask.nii.gz", np.uint8)
    if not dwi:
        return
    (raw / "dwi").mkdir(parents=True, exist_ok=True)
    (raw / "dwi" / f"{prefix}_dwi.nii.gz").write_bytes(b"")
    _identity_xfm(anat / f"{prefix}_from-T1w_to-dwi_mode-image_xfm.h5")
    _identity_xfm(anat / f"{prefix}_from-dwi_to-T1w_mode-image_xfm.h5")
    # dwi grid: 4 mm, shifted by half a voxel from the T1w grid, a little smaller
    shape = tuple(s - 2 for s in t1w.shape)
    affine = t1w.affine.copy()
    affine[:3, 3] += 2.0
    from nibabel.processing import resample_from_to

    brain = np.asarray(resample_from_to(head["brain_mask"], (shape, affine), order=0).dataobj) > 0
    _save(brain, affine, dwid / f"{prefix}_space-dwi_desc-analysis_mask.nii.gz", np.uint8)
    centre = CENTRE if pose is None else (pose @ np.append(CENTRE, 1.0))[:3]
    anomaly = np.zeros(shape, bool)
    if anomaly_radius:
        anomaly |= _world_distance(shape, affine, centre) <= anomaly_radius
    for fp in false_positives:
        anomaly |= _world_distance(shape, affine, np.asarray(fp, float)) <= 6.0
    anomaly &= brain
    score = anomaly * 3.0 + 0.2 * rng.random(shape)
    _save(anomaly, affine, dwid / f"{prefix}_space-dwi_model-{MODEL}_desc-anomaly_mask.nii.gz", np.uint8)
    _save(score * brain, affine, dwid / f"{prefix}_space-dwi_model-{MODEL}_stat-score_anomaly.nii.gz")
    from bids_uad.scoring.findings import find_findings

    labels, _ = find_findings(anomaly, score, affine)   # what the anomaly workflow writes beside its table
    _save(labels, affine, dwid / f"{prefix}_space-dwi_model-{MODEL}_desc-findings_dseg.nii.gz", np.uint8)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from bids_uad.algorithms.templates import phantom_head

    root = tmp_path_factory.mktemp("longitudinal")
    bids, out, lesions = root / "bids", root / "out", root / "lesions"
    rng = np.random.default_rng(0)
    # patient: tumour 8 mm, model flags it and the infiltration out to 16 mm; at follow-up the
    # head has moved and the tumour has grown to 14 mm (into the infiltration)
    pose = _pose(4.0, [3.0, -2.0, 1.0])
    base = phantom_head(4.0, seed=1, lesion_radius_mm=8.0)
    follow = phantom_head(4.0, pose=pose, seed=2, lesion_radius_mm=14.0)
    _session(out, bids, "pat01", "pre", base, rng, anomaly_radius=16.0,
             false_positives=[(-30.0, 10.0, 20.0)], lesion_dir=lesions)
    _session(out, bids, "pat01", "followup", follow, rng, pose=pose, anomaly_radius=20.0, lesion_dir=lesions)
    # sessions.tsv lists the follow-up first: the order must come from acq_time
    (bids / "sub-pat01" / "sub-pat01_sessions.tsv").write_text(
        "session_id\tacq_time\nses-followup\t2021-06-01T10:00:00\nses-pre\t2021-01-10T09:00:00\n")
    # control: two identical sessions, no lesion masks (FLAIR estimate), a false positive
    ctl = phantom_head(4.0, seed=3)
    for ses in ("pre", "followup"):
        _session(out, bids, "ctl01", ses, ctl, np.random.default_rng(7), false_positives=[(20.0, 20.0, 10.0)],
                 dwi=(ses == "pre"))
    (bids / "sub-ctl01" / "sub-ctl01_sessions.tsv").write_text(
        "session_id\tacq_time\nses-pre\t2021-01-10T09:00:00\nses-followup\t2021-06-01T10:00:00\n")
    return {"root": root, "bids": bids, "out": out, "lesions": lesions}


def _settings(dataset, lesions: bool, output_dir=None, **kw):
    return Settings(bids_dir=dataset["bids"], output_dir=output_dir or dataset["out"],
                    analysis_level="participant", work_dir=dataset["root"] / "work",
                    lesion_masks=dataset["lesions"] if lesions else None, seed=0, **kw)


def _run(dataset, subject, lesions, output_dir=None):
    from bids_uad.workflows.longitudinal import init_longitudinal_wf

    settings = _settings(dataset, lesions, output_dir)
    wf = init_longitudinal_wf(settings, subject, ["pre", "followup"], name=f"long_{subject}",
                              n_permutations=60, reg_iterations=(20, 10, 0))
    wf.base_dir = str(settings.work_dir)
    wf.config["execution"]["remove_unnecessary_outputs"] = False
    wf.run(plugin="Linear")


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


@pytest.fixture(scope="module")
def ran(dataset):
    import shutil

    # the same patient without lesion masks (FLAIR estimate), in a copy of the derivatives
    shutil.copytree(dataset["out"], dataset["root"] / "out_estimate")
    _run(dataset, "pat01", lesions=False, output_dir=dataset["root"] / "out_estimate")
    _run(dataset, "pat01", lesions=True)
    _run(dataset, "ctl01", lesions=False)
    return dataset


def test_plan_sessions_orders_by_acq_time_and_honours_baseline(dataset):
    from bids_uad.workflows.longitudinal import plan_sessions

    assert plan_sessions(_settings(dataset, True), "pat01", ["followup", "pre"]) == ("pre", ["followup"])
    with pytest.raises(UsageError):
        plan_sessions(_settings(dataset, True, baseline_session="nope"), "pat01", ["followup", "pre"])
    # ctl01's follow-up has no dwi: it cannot be the baseline
    with pytest.raises(InputMissingError):
        plan_sessions(_settings(dataset, True, baseline_session="followup"), "ctl01", ["pre", "followup"])
    with pytest.raises(InputMissingError):
        plan_sessions(_settings(dataset, True), "pat01", ["pre"])


def _report_warnings(tsv) -> str:
    """The warnings the subject report shows for a longitudinal table (the estimate flag)."""
    from bids_uad.reports.sections_longitudinal import _longitudinal_table

    return " ".join(item["text"] for item in _longitudinal_table(tsv) if item["type"] == "warning")


def test_patient_outputs_and_overlap_above_random(ran):
    out = ran["out"]
    rows = _rows(out / "sub-pat01" / "sub-pat01_desc-longitudinal_stats.tsv")
    assert len(rows) == 1
    row = rows[0]
    assert (row["baseline_session"], row["followup_session"], row["model"]) == ("ses-pre", "ses-followup", MODEL)
    assert row["baseline_lesion_source"] == "given" and row["followup_lesion_source"] == "given"
    overlap, random_mean = float(row["overlap_fraction"]), float(row["overlap_fraction_random_mean"])
    assert overlap > 0.4
    assert random_mean < 0.1
    assert float(row["overlap_fraction_random_p"]) < 0.05
    assert float(row["mismatch_ml"]) > 5.0
    assert float(row["baseline_anomaly_ml"]) > float(row["mismatch_ml"])
    assert row["score_change_mean"] != "n/a"  # the follow-up has dwi: score change made
    ses_pre = out / "sub-pat01" / "ses-pre" / "dwi"
    ses_fu = out / "sub-pat01" / "ses-followup"
    mism = ses_pre / f"sub-pat01_ses-pre_space-dwi_model-{MODEL}_desc-mismatch_mask.nii.gz"
    assert mism.is_file() and mism.with_name(mism.name.replace(".nii.gz", ".json")).is_file()
    mism_img = nib.load(mism)
    assert mism_img.shape == nib.load(ses_pre / "sub-pat01_ses-pre_space-dwi_desc-analysis_mask.nii.gz").shape
    assert float(np.asarray(mism_img.dataobj).sum()) * 0.064 == pytest.approx(float(row["mismatch_ml"]), rel=1e-3)
    assert (ses_pre / "sub-pat01_ses-pre_space-dwi_desc-lesion_mask.nii.gz").is_file()
    assert (ses_fu / "dwi" / "sub-pat01_ses-followup_space-dwibaseline_desc-lesion_mask.nii.gz").is_file()
    assert (ses_fu / "dwi" / f"sub-pat01_ses-followup_space-dwibaseline_model-{MODEL}_stat-scorechange_anomaly.nii.gz").is_file()
    assert (ses_fu / "anat" / "sub-pat01_ses-followup_from-T1w_to-T1wbaseline_mode-image_xfm.h5").is_file()
    assert (ses_fu / "dwi" / "sub-pat01_ses-followup_space-dwibaseline_desc-preproc_FLAIR.nii.gz").is_file()
    fu_t1w = ses_fu / "anat" / "sub-pat01_ses-followup_space-T1wbaseline_desc-preproc_T1w.nii.gz"
    assert nib.load(fu_t1w).shape == nib.load(
        ran["out"] / "sub-pat01" / "ses-pre" / "anat" / "sub-pat01_ses-pre_desc-preproc_T1w.nii.gz").shape
    meta = json.loads((ses_fu / "dwi" / "sub-pat01_ses-followup_space-dwibaseline_desc-lesion_mask.json").read_text())
    assert meta["BrainMaskDiceAfterRegistration"] > 0.9
    fig = out / "sub-pat01" / "figures" / f"sub-pat01_model-{MODEL}_desc-longitudinalFollowup_anomaly.svg"
    assert fig.is_file() and fig.read_text().lstrip().startswith("<?xml")
    html = _report_warnings(out / "sub-pat01" / "sub-pat01_desc-longitudinal_stats.tsv")
    assert "estimate" not in html.lower()
    # the baseline's findings matched to the follow-up's: the tumour grew, the false positive went away
    match = ses_fu / "dwi" / f"sub-pat01_ses-followup_model-{MODEL}_desc-findingsmatch_table.tsv"
    found = {r["baseline_finding"]: r for r in _rows(match)}
    assert found["1"]["status"] == "matched" and found["1"]["followup_findings"] == "1"
    assert float(found["1"]["volume_change_ml"]) > 5 and float(found["1"]["dice"]) > 0.5
    assert found["2"]["status"] == "not found at follow-up"
    assert json.loads(match.with_suffix(".json").read_text())["dice"]["Description"]
    from bids_uad.reports.collect import collect_subject
    from bids_uad.reports.sections_longitudinal import _findings_matches

    shown = _findings_matches(collect_subject(out, "pat01"))
    assert shown and shown[0]["rows"][0][:3] == ["1", "1", "matched"]


def test_patient_with_flair_estimate_still_beats_random(ran):
    out = ran["root"] / "out_estimate"
    row = _rows(out / "sub-pat01" / "sub-pat01_desc-longitudinal_stats.tsv")[0]
    assert row["baseline_lesion_source"] == "estimate" == row["followup_lesion_source"]
    assert float(row["baseline_lesion_ml"]) > 0 and float(row["followup_lesion_ml"]) > float(row["baseline_lesion_ml"])
    assert float(row["overlap_fraction"]) > 0.3 > float(row["overlap_fraction_random_mean"])
    assert float(row["overlap_fraction_random_p"]) < 0.05
    dwi = out / "sub-pat01" / "ses-followup" / "dwi"
    assert (dwi / "sub-pat01_ses-followup_space-dwibaseline_desc-flairhyperEstimate_mask.nii.gz").is_file()
    assert "estimate" in _report_warnings(out / "sub-pat01" / "sub-pat01_desc-longitudinal_stats.tsv")


def test_control_estimate_labelled_and_no_mismatch_growth(ran):
    out = ran["out"]
    row = _rows(out / "sub-ctl01" / "sub-ctl01_desc-longitudinal_stats.tsv")[0]
    assert row["baseline_lesion_source"] == "estimate" == row["followup_lesion_source"]
    assert float(row["mismatch_growth_ml"]) < 0.2
    assert float(row["new_lesion_ml"]) < 0.5
    assert row["score_change_mean"] == "n/a"  # no follow-up dwi
    est = out / "sub-ctl01" / "ses-pre" / "dwi" / "sub-ctl01_ses-pre_space-dwi_desc-flairhyperEstimate_mask.nii.gz"
    assert est.is_file()
    meta = json.loads(est.with_name(est.name.replace(".nii.gz", ".json")).read_text())
    assert "ESTIMATE" in meta["Description"]
    assert (out / "sub-ctl01" / "ses-followup" / "anat" /
            "sub-ctl01_ses-followup_desc-flairhyperEstimate_mask.nii.gz").is_file()
    html = _report_warnings(out / "sub-ctl01" / "sub-ctl01_desc-longitudinal_stats.tsv")
    assert "estimates" in html


def test_group_table_has_both_subjects(ran):
    rows = _rows(ran["out"] / "group" / "desc-longitudinal_stats.tsv")
    assert [r["participant_id"] for r in rows] == ["sub-ctl01", "sub-pat01"]
    assert "overlap_fraction_random_p" in rows[0]
    sidecar = json.loads((ran["out"] / "group" / "desc-longitudinal_stats.json").read_text())
    assert "Description" in sidecar["overlap_fraction_random_p"]


def test_missing_derivatives_are_clear_errors(dataset, tmp_path):
    from bids_uad.interfaces.longitudinal import session_derivatives
    from bids_uad.workflows.longitudinal import check_longitudinal_inputs, init_longitudinal_wf

    found = check_longitudinal_inputs(_settings(dataset, True), "pat01", ["pre", "followup"])
    assert found["baseline"]["models"] == [MODEL] and found["baseline"]["lesion_space"] == "T1w"
    assert list(found["followups"]) == ["followup"]
    with pytest.raises(InputMissingError, match="preprocessed T1w"):
        check_longitudinal_inputs(_settings(dataset, True, output_dir=tmp_path), "pat01", ["pre", "followup"])
    wf = init_longitudinal_wf(_settings(dataset, True), "pat01", ["pre", "followup"], check_inputs=True)
    assert "register_followup" in wf.list_node_names()
    with pytest.raises(InputMissingError, match="preprocessed T1w"):  # at build time, not in a node
        init_longitudinal_wf(_settings(dataset, True, output_dir=tmp_path), "pat01", ["pre", "followup"],
                             check_inputs=True)
    with pytest.raises(InputMissingError, match="anomaly"):
        session_derivatives(dataset["out"], "ctl01", "followup", require_anomaly=True)
    with pytest.raises(InputMissingError, match="preprocessed T1w"):
        session_derivatives(tmp_path, "pat01", "pre")


def _writer(args):
    out, subject, n = args
    from bids_uad.bids.longitudinal import rebuild_group_table, write_subject_table

    row = {"participant_id": f"sub-{subject}", "baseline_session": "ses-pre", "followup_session": "ses-followup",
           "model": MODEL, "overlap_fraction": 0.5}
    for _ in range(n):
        write_subject_table(out, subject, [row])
        rebuild_group_table(out)
    return subject


def test_concurrent_group_table_writes_stay_valid(tmp_path):
    from bids_uad.bids.derivatives import read_tsv

    subjects = [f"s{i:02d}" for i in range(6)]
    ctx = mp.get_context("fork")
    with ctx.Pool(4) as pool:
        pool.map(_writer, [(tmp_path, s, 5) for s in subjects])
    table = tmp_path / "group" / "desc-longitudinal_stats.tsv"
    rows = read_tsv(table)
    assert sorted(r["participant_id"] for r in rows) == [f"sub-{s}" for s in subjects]
    header = table.read_text().splitlines()[0].split("\t")
    assert all(len(line.split("\t")) == len(header) for line in table.read_text().splitlines())
    assert not [p for p in (tmp_path / "group").iterdir() if p.name.endswith(".tsv") and p.name != table.name]


@pytest.mark.slow
def test_generated_dataset_mismatch_predicts_growth(tmp_path):
    """The synthetic generator's patients (infiltration becomes lesion at follow-up): the follow-up
    T1w registered to the baseline as in the workflow, truth masks as lesion masks, a detector that
    flags the tumour and the infiltration; overlap above random regions.  Its two-session control:
    no mismatch growth."""
    from bids_uad.algorithms.longitudinal import compare_sessions
    from bids_uad.algorithms.registration import apply_transforms
    from bids_uad.algorithms.registration import register_followup
    from bids_uad.synthetic import generate_dataset

    root = generate_dataset(tmp_path / "synth", preset="tiny", n_controls=1, n_patients=1, seed=0,
                            progress=False, write_clean_dwi=False)
    truth = Path(root) / "derivatives" / "synthetic-truth"
    results = {}
    for sub in ("pat01", "ctrl01"):
        def files(ses):
            prefix = f"sub-{sub}_ses-{ses}"
            anat = truth / f"sub-{sub}" / f"ses-{ses}" / "anat"
            tumour = anat / f"{prefix}_space-T1w_desc-tumor_mask.nii.gz"
            return {"t1w": Path(root) / f"sub-{sub}" / f"ses-{ses}" / "anat" / f"{prefix}_T1w.nii.gz",
                    "brain": anat / f"{prefix}_space-T1w_desc-brain_mask.nii.gz",
                    "tumor": str(tumour) if tumour.is_file() else "",
                    "infiltration": anat / f"{prefix}_space-T1w_desc-infiltration_mask.nii.gz"}

        base, fu = files("pre"), files("followup")
        _, reg = register_followup(base["t1w"], base["brain"], base["tumor"], fu["t1w"], fu["brain"], fu["tumor"],
                                   str(tmp_path / f"{sub}_"), reg_iterations=(20, 10, 0))
        ref = nib.load(base["t1w"])

        def load(path):
            if not path or not Path(path).is_file():
                return np.zeros(ref.shape, bool)
            return np.asarray(nib.load(str(path)).dataobj) > 0

        brain, tumour, infil = load(base["brain"]), load(base["tumor"]), load(base["infiltration"])
        fu_tumour = (np.asarray(apply_transforms(fu["tumor"], ref, reg.forward, "mask",
                                                 invert=reg.forward_invert).dataobj) > 0
                     if fu["tumor"] else np.zeros(ref.shape, bool))
        anomaly = (tumour | infil) & brain
        fp = np.zeros(ref.shape, bool)
        fp[tuple(np.argwhere(brain & ~tumour & ~infil)[::997][:5].T)] = True  # a few false positives
        stats, _ = compare_sessions(anomaly | fp, tumour, fu_tumour, brain, ref.header.get_zooms()[:3],
                                    n_permutations=60, seed=0)
        results[sub] = stats
    pat, ctl = results["pat01"], results["ctrl01"]
    assert pat["new_lesion_ml"] > 1.0
    assert pat["overlap_fraction"] > 0.2 > pat["overlap_fraction_random_mean"]
    assert pat["overlap_fraction"] > 5 * pat["overlap_fraction_random_mean"]
    assert pat["overlap_fraction_random_p"] < 0.05
    assert ctl["mismatch_growth_ml"] == 0.0 and ctl["new_lesion_ml"] == 0.0
