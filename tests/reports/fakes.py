"""A small fake derivatives folder (what the dwi/anat/anomaly stages write) for report tests.

The images are tiny synthetic heads: an ellipsoid brain with ventricles, white matter and a
spherical "tumour" that the fake anomaly score lights up.  Several dataset strings carry
``<script>alert(1)</script>`` to check that the report escapes them.
"""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from bids_uad.config import Settings

EVIL = "<script>alert(1)</script>"
SPACE = "MNI152NLin2009cAsym"


def _grid(shape, zoom):
    affine = np.diag([zoom, zoom, zoom, 1.0])
    affine[:3, 3] = -np.array(shape) * zoom / 2
    ijk = np.indices(shape).reshape(3, -1).T
    xyz = (ijk * zoom + affine[:3, 3]).reshape(*shape, 3)
    return affine, xyz


def _head(shape, zoom, shift_y=0.0):
    """(dseg, tumour) on a grid: 1 CSF, 2 GM, 3 WM; tumour sphere in the right hemisphere."""
    affine, xyz = _grid(shape, zoom)
    x, y, z = xyz[..., 0], xyz[..., 1] - shift_y, xyz[..., 2]
    r = np.sqrt((x / 62) ** 2 + (y / 78) ** 2 + (z / 56) ** 2)
    seg = np.zeros(shape, np.int16)
    seg[r < 1.0] = 2
    seg[r < 0.82] = 3
    vent = ((np.abs(x) - 9) / 7) ** 2 + (y / 26) ** 2 + ((z - 6) / 12) ** 2 < 1
    seg[vent & (r < 1)] = 1
    tumour = (x - 28) ** 2 + (y + 10) ** 2 + (z - 10) ** 2 < 14 ** 2
    return affine, seg, tumour


def _save(img_data, affine, path: Path, sidecar: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(img_data), affine), str(path))
    if sidecar is not None:
        path.with_name(path.name.replace(".nii.gz", ".json")).write_text(json.dumps(sidecar))
    return path


def make_derivatives(out: Path, subject: str = "01", session: str = "pre", with_anomaly: bool = True,
                     evil: bool = True, template: bool = True) -> Path:
    """Write a plausible set of derivatives of one session under ``out``."""
    rng = np.random.default_rng(0)
    p = f"sub-{subject}_ses-{session}"
    dwi_dir = out / f"sub-{subject}" / f"ses-{session}" / "dwi"
    anat_dir = out / f"sub-{subject}" / f"ses-{session}" / "anat"
    shape, zoom = (44, 52, 40), 3.0
    affine, seg, tumour = _head(shape, zoom)
    brain = seg > 0
    b0 = np.select([seg == 1, seg == 2, seg == 3], [1500.0, 900.0, 700.0], 0.0)
    b0 = b0 * (1 + 0.6 * tumour * brain) + rng.normal(0, 20, shape) * brain
    _, seg_warp, tumour_w = _head(shape, zoom, shift_y=5.0)
    b0_before = np.select([seg_warp == 1, seg_warp == 2, seg_warp == 3], [1500.0, 900.0, 700.0], 0.0)
    fa = np.where(seg == 3, 0.55, np.where(seg == 2, 0.18, 0.05)) * brain * (1 - 0.6 * tumour)
    fa = np.clip(fa + rng.normal(0, 0.03, shape) * brain, 0, 1)
    md = np.where(seg == 1, 3.0e-3, 0.8e-3) * brain * (1 + 0.8 * tumour)
    # sidecars in the shapes the dwi workflow writes (bids_uad.interfaces.dwi.MergeReports)
    sidecar = {"Backend": "python", "PreprocessingBackend": "python", "Denoising": "None",
               "GibbsRingingRemoval": False,
               "SusceptibilityDistortionCorrection": "None (no reverse phase-encoding image)",
               "HeadMotionCorrection": "bids_uad python: per-volume rigid + eddy-current (affine along PE)",
               "Sources": [f"bids:raw:sub-{subject}/ses-{session}/dwi/{p}_dir-AP_dwi.nii.gz"],
               "PhaseEncodingDirection": "j-", "TotalReadoutTime": 0.05}
    if evil:
        sidecar["Sources"].append(f"bids:raw:{EVIL}.nii.gz")
        sidecar["Warnings"] = [f"sidecar warning {EVIL}"]
        sidecar["Steps"] = [{"Name": f"denoising {EVIL}", "Backend": f"fsl {EVIL}", "Status": "run"}]
    dwi = np.stack([b0] + [b0 * np.exp(-1000 * md) for _ in range(6)], axis=-1).astype(np.float32)
    pre = _save(dwi, affine, dwi_dir / f"{p}_space-dwi_desc-preproc_dwi.nii.gz", sidecar)
    pre.with_name(pre.name.replace(".nii.gz", ".bval")).write_text("0 1000 1000 1000 1000 1000 1000\n")
    _save(b0.astype(np.float32), affine, dwi_dir / f"{p}_space-dwi_desc-b0_dwiref.nii.gz", {})
    _save(b0_before.astype(np.float32), affine, dwi_dir / f"{p}_desc-uncorrected_dwiref.nii.gz", {})
    _save(brain.astype(np.uint8), affine, dwi_dir / f"{p}_space-dwi_desc-brain_mask.nii.gz",
          {"BrainMask": "bids_uad python (median_otsu on the corrected mean b0)", "Type": "Brain"})
    _save(brain.astype(np.uint8), affine, dwi_dir / f"{p}_space-dwi_desc-analysis_mask.nii.gz", {})
    _save(seg, affine, dwi_dir / f"{p}_space-dwi_dseg.nii.gz", {})
    tensor = {"TensorFit": "dipy TensorModel, weighted least squares (WLS)", "PreprocessingBackend": "python"}
    _save(fa.astype(np.float32), affine, dwi_dir / f"{p}_space-dwi_model-tensor_param-fa_dwimap.nii.gz", tensor)
    _save(md.astype(np.float32), affine, dwi_dir / f"{p}_space-dwi_model-tensor_param-md_dwimap.nii.gz", tensor)
    _save(tumour.astype(np.uint8), affine, dwi_dir / f"{p}_space-dwi_desc-tumor_mask.nii.gz", {})
    n = 20
    t = np.arange(n)
    motion = {"trans_x": 0.05 * t / n, "trans_y": 0.2 * np.sin(t / 3), "trans_z": 0.1 * t / n,
              "rot_x": 0.002 * np.cos(t / 4), "rot_y": 0.001 * t / n, "rot_z": -0.001 * t / n}
    fd = np.r_[np.nan, np.abs(np.diff(np.stack(list(motion.values())), axis=1)).sum(axis=0)]
    lines = ["\t".join(list(motion) + ["framewise_displacement"])]
    for i in range(n):
        lines.append("\t".join([f"{motion[k][i]:.6f}" for k in motion] + ["n/a" if i == 0 else f"{fd[i]:.6f}"]))
    (dwi_dir / f"{p}_desc-motion_timeseries.tsv").write_text("\n".join(lines) + "\n")
    if with_anomaly:
        for model, thr in (("dae", 0.3), ("recdisc", 0.5)):
            score = (rng.gamma(2.0, 0.05, shape) + 0.6 * tumour * rng.uniform(0.7, 1.0, shape)) * brain
            meta = {"Model": model, "ModelFile": f"model-{model}.json", "ThresholdMethod": "fixed",
                    "Threshold": thr, "OpeningSize": 3, "Ensemble": False, "Folds": [0]}
            _save(score.astype(np.float32), affine,
                  dwi_dir / f"{p}_space-dwi_model-{model}_stat-score_anomaly.nii.gz", meta)
            _save((score > thr).astype(np.uint8), affine,
                  dwi_dir / f"{p}_space-dwi_model-{model}_desc-anomaly_mask.nii.gz", meta)
            _findings_table(dwi_dir / f"{p}_model-{model}_desc-findings_table.tsv", score > thr, score, affine,
                            md, fa, brain, seg, meta, evil)
    # anatomical space: 2 mm grid of the same head
    a_shape, a_zoom = (64, 80, 60), 2.0
    a_aff, a_seg, _ = _head(a_shape, a_zoom)
    t1 = np.select([a_seg == 1, a_seg == 2, a_seg == 3], [300.0, 650.0, 900.0], 80.0 * (rng.random(a_shape) > 0.5))
    # sidecars in the shapes the anat workflow writes
    method_meta = {"SkullStripped": True, "SkullStripping": "bids_uad template", "Template": SPACE,
                   "Segmentation": "ANTs Atropos (antspyx), template priors"}
    _save(t1.astype(np.float32), a_aff, anat_dir / f"{p}_desc-preproc_T1w.nii.gz", {"BiasCorrected": "N4 (antspyx)"})
    _save((a_seg > 0).astype(np.uint8), a_aff, anat_dir / f"{p}_desc-brain_mask.nii.gz", method_meta)
    _save(a_seg, a_aff, anat_dir / f"{p}_dseg.nii.gz", method_meta)
    for label, value in (("CSF", 1), ("GM", 2), ("WM", 3)):
        _save((a_seg == value).astype(np.float32), a_aff, anat_dir / f"{p}_label-{label}_probseg.nii.gz", method_meta)
    if not template:
        return out
    # template space: the nilearn MNI template on a 4 mm grid stands in for the normalised T1w
    from nilearn.datasets import load_mni152_template
    from nilearn.image import resample_img

    mni_aff = np.diag([4.0, 4.0, 4.0, 1.0])
    mni_aff[:3, 3] = [-90, -126, -72]
    mni = resample_img(load_mni152_template(resolution=2), target_affine=mni_aff, target_shape=(46, 55, 46),
                       force_resample=True, copy_header=True)
    data = np.roll(np.asarray(mni.dataobj, np.float32), 1, axis=1)
    _save(data, mni_aff, anat_dir / f"{p}_space-{SPACE}_desc-brain_T1w.nii.gz",
          {"Registration": "ANTs SyN (antspyx), lesion excluded from the metric", "Template": SPACE})
    return out


def _findings_table(path: Path, mask, score, affine, md, fa, brain, seg, meta: dict, evil: bool) -> None:
    """A findings table as the anomaly workflow writes it (the real functions; an atlas name with
    markup in it when ``evil``: the report must escape it)."""
    from bids_uad.bids.derivatives import write_tsv
    from bids_uad.scoring.findings import COLUMNS, deviation_signature, find_findings

    labels, rows = find_findings(mask, score, affine, min_volume_ml=0.1)
    deviation_signature(rows, labels, {"md": md, "fa": fa}, brain & ~mask, seg)
    for row in rows:
        row["region_harvard_oxford"] = f"Right_Precentral_Gyrus (60%); {EVIL if evil else 'no label'} (40%)"
    write_tsv(path, rows, list(COLUMNS) + ["region_harvard_oxford"])
    sidecar = {c: {"Description": d} for c, (d, _) in COLUMNS.items()}
    sidecar.update(Findings=len(rows), MinimumVolumeMl=0.1, Threshold=meta["Threshold"],
                   ThresholdMethod=meta["ThresholdMethod"],
                   Atlases=[{"Key": "harvard_oxford", "Name": f"Harvard-Oxford {EVIL if evil else ''}",
                             "Citation": "Desikan 2006", "License": "FSL"}])
    path.with_suffix(".json").write_text(json.dumps(sidecar))


def make_logs(out: Path, subject: str = "01", run_id: str = "20260101-000000_abcd1234") -> None:
    """A run log with a warning for the subject and a nipype crash file with evil content."""
    logs = out / "logs"
    crash = logs / f"crash-{run_id}"
    crash.mkdir(parents=True, exist_ok=True)
    (crash / f"crash-20260101-000001-root-tensor-{subject}.txt").write_text(
        f"Node: bids_uad_participant_wf.dwi_sub_{subject}_ses_pre_0.tensor\n"
        "Working directory: /work/x\n\nTraceback (most recent call last):\n"
        f"  File \"x.py\", line 1\nValueError: bad value {EVIL}\n")
    (logs / f"run-{run_id}.log").write_text(
        f"2026-01-01 00:00:00 WARNING bids_uad.workflows: sub-{subject}_ses-pre_dir-AP_dwi.nii.gz: "
        "no reverse phase-encoding image: susceptibility correction will be skipped\n"
        "2026-01-01 00:00:00 WARNING bids_uad.workflows: sub-99: unrelated\n")


def make_group(out: Path) -> None:
    """Model JSON (the bundle metadata shape) and evaluation/calibration tables."""
    models = out / "models"
    models.mkdir(parents=True, exist_ok=True)
    for name, base in (("dae", 0.02), ("recdisc", 0.05)):
        folds = []
        for k in range(3):
            hist = [{"epoch": e, "train_loss": base * (1 + 3 * np.exp(-e / 4)) + 0.001 * k,
                     "val_loss": base * (1.1 + 3 * np.exp(-e / 5)) + 0.002 * k, "lr": 1e-3} for e in range(15)]
            folds.append({"fold": k, "train_subjects": ["ctrl01", "ctrl02"], "heldout_subjects": [f"ctrl0{k + 3}"],
                          "best_epoch": 12 - k, "best_val_loss": hist[12 - k]["val_loss"], "history": hist,
                          "calibration": {"n_healthy_voxels": 5000 + k, "threshold_at_fpr": 0.3 + 0.01 * k,
                                          "fpr": 0.01}})
        (models / f"model-{name}.json").write_text(json.dumps({
            "architecture": {"name": name}, "folds": folds, "best_fold": 0,
            "training_subjects": ["ctrl01", "ctrl02", "ctrl03", "ctrl04", f"{EVIL}"],
            "settings": {"training": {"epochs": 15, "seed": 0}}}))
    group = out / "group"
    group.mkdir(parents=True, exist_ok=True)
    rows = ["subject\tmodel\tthreshold_method\tdice\tauroc"]
    for s in ("pat01", "pat02"):
        for m in ("dae", "recdisc", EVIL):
            for t, d in (("fixed", 0.4), ("otsu", 0.5), ("healthy-fpr", 0.55)):
                rows.append(f"{s}\t{m}\t{t}\t{d:.3f}\t0.9")
    (group / "desc-evaluation_metrics.tsv").write_text("\n".join(rows) + "\n")
    for name in ("dae", "recdisc"):  # as bids_uad.workflows.group writes them
        wide = ["participant_id\tsession\tauroc\tauprc\tdice_fixed\tdice_otsu\tdice_healthy-fpr\t"
                "dice_written_fixed\tdice_written_otsu\tdice_written_healthy-fpr\tdice_oracle-dice"]
        for i, s in enumerate(("pat01", "pat02")):
            wide.append(f"sub-{s}\tpre\t0.9{i}\t0.6{i}\t0.4{i}\t0.5{i}\t0.6{i}\t0.45\tn/a\t0.65\t0.8")
        (group / f"model-{name}_evaluation.tsv").write_text("\n".join(wide) + "\n")
        (group / f"model-{name}_evaluation_summary.tsv").write_text("metric\tmean\tsd\tn\nauroc\t0.9\t0.01\t2\n")
        (group / f"model-{name}_folds.tsv").write_text("fold\tbest_epoch\n0\t12\n")
    cal = ["model\tnominal_fpr\tobserved_fpr"] + [f"{m}\t{f}\t{f * r}" for m, r in (("dae", 1.1), ("recdisc", 0.9))
                                                   for f in (0.001, 0.01, 0.05)]
    (group / "desc-calibration_fpr.tsv").write_text("\n".join(cal) + "\n")


def settings_for(out: Path, bids: Path | None = None, **kw) -> Settings:
    return Settings(bids_dir=bids or out.parent / "bids", output_dir=out, analysis_level="participant",
                    work_dir=out.parent / "work", command_line=("bids_uad", str(bids), str(out), "participant"),
                    **kw)


def make_longitudinal(out: Path, subject: str = "01") -> None:
    """Outputs in the shape of the longitudinal stage: stats TSV and a figure in figures/."""
    from matplotlib.figure import Figure

    root = out / f"sub-{subject}"
    (root / "figures").mkdir(parents=True, exist_ok=True)
    cols = ["participant_id", "baseline_session", "followup_session", "model", "baseline_lesion_source",
            "followup_lesion_source", "baseline_anomaly_ml", "baseline_lesion_ml", "followup_lesion_ml",
            "mismatch_ml", "mismatch_growth_ml", "overlap_fraction", "overlap_fraction_random_mean",
            "overlap_fraction_random_p"]
    row = [f"sub-{subject}", "ses-pre", "ses-followup", EVIL, "given", "estimate", "17.664", "0.768", "10.304",
           "16.896", "9.536", "0.564394", "0.00467172", "0.0163934"]
    (root / f"sub-{subject}_desc-longitudinal_stats.tsv").write_text("\t".join(cols) + "\n" + "\t".join(row) + "\n")
    fig = Figure(figsize=(4, 2))
    fig.subplots().plot([0, 1], [1, 0])
    fig.savefig(str(root / "figures" / f"sub-{subject}_model-dae_desc-longitudinalFollowup_anomaly.svg"))
    (root / "figures" / f"sub-{subject}_desc-longitudinal_reportlet.html").write_text(f"<p>{EVIL}</p>")
