"""Write a synthetic BIDS dataset and its ground truth (``derivatives/synthetic-truth``).

One subject at a time: draw the anatomy, pose, susceptibility field and (for patients) the
lesions (a glioma, or graded lesion types) that grow by the follow-up; simulate T1w, FLAIR and the distorted dwi series with
:mod:`bids_uad.synthetic.simulate`; write raw BIDS files and the truth.  Every subject has its
own random stream (seeded from ``seed`` and its index), so the dataset is identical for a seed
whatever the number of worker processes.
"""
from __future__ import annotations

import json
import logging
import os
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_uad import __version__
from bids_uad.errors import UsageError

from .anatomy import SubjectAnatomy, load_template
from .lesion_types import (DEFAULT_GENERATOR, LESION_GENERATORS, is_glioma, lesion_info, lesion_severity,
                           lesion_type, patient_lesions)
from .lesions import Lesion
from .presets import Preset, get_preset
from .simulate import Susceptibility, dseg_labels, random_pose, simulate_anat, simulate_dwi
from .distortion import rigid_matrix
from .output import discard, prepare_output, publish

LOGGER = logging.getLogger("bids_uad.synthetic")
GENERATOR_NAME = "bids_uad-synth"
TRUTH_NAME = "synthetic-truth"
LESION_CLASSES = ("tumor", "core", "solid", "oedema", "infiltration")
_BASE_DATE = datetime(2024, 1, 8, 9, 30)
#: the necrotic core of every glioma is at least this many voxels of the preset's dwi grid
MIN_CORE_DWI_VOXELS = 4
#: the smallest tumour mass is this many dwi voxels across (radius 6 mm or more)
MIN_LESION_DWI_DIAMETER = 5


@dataclass(frozen=True)
class SubjectPlan:
    """Who a subject is and what gets written for them."""

    index: int
    label: str
    group: str
    sessions: tuple[str, ...]
    reverse_pe: bool
    dwi_sessions: tuple[str, ...]


def plan_subjects(preset: Preset, seed: int) -> list[SubjectPlan]:
    """Labels, groups, sessions and which subjects lack a reverse-PE image (seeded)."""
    rng = np.random.default_rng([seed, 999])
    n_total = preset.n_controls + preset.n_patients
    n_no_rpe = int(round(preset.no_reverse_pe_fraction * n_total))
    no_rpe = set(rng.permutation(n_total)[:n_no_rpe].tolist()) if n_no_rpe else set()
    plans = []
    for i in range(n_total):
        patient = i >= preset.n_controls
        label = f"pat{i - preset.n_controls + 1:02d}" if patient else f"ctrl{i + 1:02d}"
        two = patient or i < preset.n_controls_two_sessions
        sessions = ("pre", "followup") if two else ("pre",)
        dwi_sessions = sessions if preset.followup_dwi else ("pre",)
        plans.append(SubjectPlan(i, label, "patient" if patient else "control", sessions,
                                 i not in no_rpe, dwi_sessions))
    return plans


# -- writing helpers ------------------------------------------------------------------------
def _json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray, dtype=np.float32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.asarray(data)
    img = nib.Nifti1Image(data.astype(np.uint8) if data.dtype == bool else data, affine)
    img.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def _fsl_gradients(stem: Path, bvals: np.ndarray, bvecs: np.ndarray) -> None:
    stem.with_suffix(".bval").write_text(" ".join(f"{b:g}" for b in bvals) + "\n")
    stem.with_suffix(".bvec").write_text(
        "\n".join(" ".join(f"{v:.6f}" for v in row) for row in np.asarray(bvecs).T) + "\n")


MOTION_DESCRIPTION = (
    "volume i shows the head of volume 0 moved by q -> R q + t, with q in mm in the grid-centred voxel "
    "frame of the dwi (axes along the voxel axes i, j, k; the grid is LAS, so q_x = -(world x - centre x)), "
    "R = Rz Ry Rx: the convention of this project's head-motion estimates (bids_uad.algorithms.hmc); "
    "for this LAS grid its axes are those of FSL's scaled-voxel frame. Rotating the head rotates the gradient it sees: its signal is that of the "
    "b-vector R^T g. Eddy terms (diffusion-weighted volumes) add a displacement along j (voxels): "
    "translation + shear_x*(i-ci) + scale_y*(j-cj) + shear_z*(k-ck), (ci, cj, ck) the grid centre.")


def _motion_tsv(path: Path, motion: np.ndarray, eddy: np.ndarray | None = None) -> None:
    """Per-volume rigid motion (and eddy terms) as a TSV with its JSON sidecar."""
    columns = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
    table = np.asarray(motion, float)
    if eddy is not None:
        columns += ["eddy_translation", "eddy_shear_x", "eddy_scale_y", "eddy_shear_z"]
        table = np.hstack([table, np.asarray(eddy, float)])
    rows = ["\t".join(columns)] + ["\t".join(f"{v:.6f}" for v in row) for row in table]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")
    _json(path.with_suffix(".json"), {"trans_x": {"Units": "mm"}, "rot_x": {"Units": "rad"},
                                      "Description": MOTION_DESCRIPTION})


def _truth_masks(folder: Path, prefix: str, t: dict, shape, affine, lesions: list,
                 table: bool = False) -> None:
    """Tissue labels, brain mask and, for a session with lesions, the lesion truth.

    ``desc-tumor`` is the union of every lesion's voxels, ``desc-lesions_dseg`` numbers them
    per lesion (its TSV: index, name, type, severity, volume in this space); the glioma's
    regions (core, solid, oedema, infiltration) are written when the session has a glioma.
    """
    _nifti(folder / f"{prefix}_dseg.nii.gz", dseg_labels(t).reshape(shape), affine, np.uint8)
    _nifti(folder / f"{prefix}_desc-brain_mask.nii.gz", (t["brain"] >= 0.5).reshape(shape), affine, np.uint8)
    if not lesions:
        return
    _nifti(folder / f"{prefix}_desc-tumor_mask.nii.gz", t["tumor"].reshape(shape), affine, np.uint8)
    _nifti(folder / f"{prefix}_desc-lesions_dseg.nii.gz", t["lesion_id"].reshape(shape), affine, np.uint8)
    if table:
        voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
        counts = np.bincount(t["lesion_id"].ravel(), minlength=len(lesions) + 1)
        rows = ["index\tname\ttype\tseverity\tvolume_ml"]
        for index, les in enumerate(lesions, start=1):
            sev = lesion_severity(les)
            rows.append(f"{index}\tlesion{index:02d}\t{lesion_type(les)}\t"
                        f"{'n/a' if sev is None else f'{sev:.3f}'}\t{counts[index] * voxel_ml:.3f}")
        (folder / f"{prefix}_desc-lesions_dseg.tsv").write_text("\n".join(rows) + "\n")
    if any(isinstance(les, Lesion) for les in lesions):
        for name in LESION_CLASSES[1:]:
            _nifti(folder / f"{prefix}_desc-{name}_mask.nii.gz", t[name].reshape(shape), affine, np.uint8)


def _acq_date(rng: np.random.Generator, index: int) -> tuple[datetime, datetime]:
    pre = _BASE_DATE + timedelta(days=int(7 * index + rng.integers(0, 5)), minutes=int(rng.integers(0, 480)))
    follow = pre + timedelta(days=int(rng.integers(6 * 30, 24 * 30)))
    return pre, follow


# -- one subject -------------------------------------------------------------------------------
def simulate_subject(plan: SubjectPlan, preset: Preset, seed: int, lesion_generator: str,
                     write_clean_dwi: bool, root: str, severity: float | None = None) -> dict:
    """Simulate and write one subject (raw files and truth); returns its participants row."""
    rng = np.random.default_rng([seed, plan.index])
    tpl_src, tpl2 = load_template(preset.t1w_source_mm), load_template(2)
    root_path = Path(root)
    truth_root = root_path / "derivatives" / TRUTH_NAME
    subj = SubjectAnatomy.random(rng)
    suscept = Susceptibility.random(rng)
    skull_scale = float(rng.uniform(0.9, 1.15))
    lesions: dict[str, list] = {s: [] for s in plan.sessions}
    info: dict[str, dict] = {}
    if plan.group == "patient":
        lesions.update(patient_lesions(
            tpl2, rng, lesion_generator, plan.sessions, severity,
            min_core_mm3=MIN_CORE_DWI_VOXELS * preset.dwi_voxel_mm ** 3,
            min_radius_mm=max(6.0, MIN_LESION_DWI_DIAMETER / 2 * preset.dwi_voxel_mm)))
        info = {ses: {"lesions": [lesion_info(les, k) for k, les in enumerate(lesions[ses], start=1)]}
                for ses in plan.sessions}
    dates = dict(zip(("pre", "followup"), _acq_date(rng, plan.index)))
    sub = f"sub-{plan.label}"
    session_rows = []
    for ses in plan.sessions:
        prefix = f"{sub}_ses-{ses}"
        raw = root_path / sub / f"ses-{ses}"
        truth = truth_root / sub / f"ses-{ses}"
        head_t1 = random_pose(rng)
        # the head moves a little between the anatomical and the diffusion scan
        head_dwi = rigid_matrix(np.concatenate([rng.normal(scale=1.0, size=3),
                                                np.deg2rad(rng.normal(scale=1.0, size=3))])) @ head_t1
        anat = simulate_anat(tpl_src, tpl2, subj, lesions[ses], head_t1, preset, rng, skull_scale)
        anat_meta = {"Manufacturer": "bids_uad synthetic phantom", "MagneticFieldStrength": 3,
                     "AcquisitionDuration": 300}
        _nifti(raw / "anat" / f"{prefix}_T1w.nii.gz", anat["t1w"] * 1000, anat["affine"], np.int16)
        _json(raw / "anat" / f"{prefix}_T1w.json", {**anat_meta, "RepetitionTime": 2.3, "EchoTime": 0.00298,
                                                    "InversionTime": 0.9, "FlipAngle": 9})
        _nifti(raw / "anat" / f"{prefix}_FLAIR.nii.gz", anat["flair"] * 1000, anat["affine"], np.int16)
        _json(raw / "anat" / f"{prefix}_FLAIR.json", {**anat_meta, "RepetitionTime": 5.0, "EchoTime": 0.387,
                                                      "InversionTime": 1.8})
        _truth_masks(truth / "anat", f"{prefix}_space-T1w", anat["truth"], anat["shape"], anat["affine"],
                     lesions[ses], table=True)
        del anat  # written: free it before the next simulation (halves the peak memory at 1 mm)
        session_rows.append({"session_id": f"ses-{ses}", "acq_time": dates[ses].strftime("%Y-%m-%dT%H:%M:%S")})
        if ses not in plan.dwi_sessions:
            continue
        want_rpe = plan.reverse_pe
        dwi = simulate_dwi(tpl_src, tpl2, subj, lesions[ses], suscept, head_dwi, preset, rng,
                           skull_scale, want_rpe)
        shape, aff = dwi["shape"], dwi["affine"]
        dwi_name = f"{prefix}_dir-AP_dwi"
        field_id = f"pepolar{plan.label}{ses}"
        _nifti(raw / "dwi" / f"{dwi_name}.nii.gz", dwi["raw"], aff, np.int16)
        _fsl_gradients(raw / "dwi" / f"{dwi_name}.nii", dwi["bvals"], dwi["bvecs"])
        dwi_meta = {"PhaseEncodingDirection": "j-", "TotalReadoutTime": preset.total_readout_time,
                    "EchoTime": preset.echo_time, "RepetitionTime": 8.0,
                    "Manufacturer": "bids_uad synthetic phantom", "MagneticFieldStrength": 3}
        if want_rpe:
            dwi_meta["B0FieldSource"] = field_id
        _json(raw / "dwi" / f"{dwi_name}.json", dwi_meta)
        if want_rpe:
            _nifti(raw / "fmap" / f"{prefix}_dir-PA_epi.nii.gz", dwi["fmap"], aff, np.int16)
            _json(raw / "fmap" / f"{prefix}_dir-PA_epi.json", {
                "PhaseEncodingDirection": "j", "TotalReadoutTime": preset.total_readout_time,
                "EchoTime": preset.echo_time, "RepetitionTime": 8.0, "B0FieldIdentifier": field_id,
                "IntendedFor": [f"bids::{sub}/ses-{ses}/dwi/{dwi_name}.nii.gz"]})
        tdir = truth / "dwi"
        _truth_masks(tdir, f"{prefix}_space-dwi", dwi["truth"], shape, aff, lesions[ses], table=True)
        _nifti(tdir / f"{prefix}_space-dwi_model-tensor_param-fa_dwimap.nii.gz", dwi["fa"], aff)
        _nifti(tdir / f"{prefix}_space-dwi_model-tensor_param-md_dwimap.nii.gz", dwi["md"], aff)
        _nifti(tdir / f"{prefix}_desc-susceptibility_fieldmap.nii.gz", dwi["field"], aff)
        _json(tdir / f"{prefix}_desc-susceptibility_fieldmap.json", {
            "Units": "Hz", "Description": "true off-resonance field on the undistorted dwi grid; "
            "displacement along j in voxels = field * TotalReadoutTime * polarity (j: +1, j-: -1)"})
        _nifti(tdir / f"{prefix}_space-dwi_desc-fibre_dwimap.nii.gz", dwi["fibre"], aff)
        _motion_tsv(tdir / f"{prefix}_desc-motion_timeseries.tsv", dwi["motion"], dwi["eddy"])
        if want_rpe:
            _motion_tsv(tdir / f"{prefix}_dir-PA_desc-motion_timeseries.tsv", dwi["fmap_motion"][None, :])
        if write_clean_dwi:
            # int16 with a scale factor (about 1e-4 of the b0): half the size, much faster to compress
            _nifti(tdir / f"{prefix}_space-dwi_desc-clean_dwi.nii.gz", dwi["clean"], aff, np.int16)
            _fsl_gradients(tdir / f"{prefix}_space-dwi_desc-clean_dwi.nii", dwi["bvals"], dwi["bvecs"])
        del dwi
        t1_to_dwi = head_dwi @ np.linalg.inv(head_t1)
        (truth / "anat").mkdir(parents=True, exist_ok=True)
        np.savetxt(truth / "anat" / f"{prefix}_from-T1w_to-dwi_mode-image_xfm.txt", t1_to_dwi, fmt="%.8f")
    sessions_tsv = root_path / sub / f"{sub}_sessions.tsv"
    sessions_tsv.parent.mkdir(parents=True, exist_ok=True)
    sessions_tsv.write_text("session_id\tacq_time\n" + "".join(
        f"{r['session_id']}\t{r['acq_time']}\n" for r in session_rows))
    if info:
        _json(truth_root / sub / f"{sub}_desc-lesion_info.json", info)
    return {"participant_id": sub, "group": plan.group, "age": int(rng.integers(25, 80)),
            "sex": "F" if rng.random() < 0.5 else "M"}


# -- the dataset -------------------------------------------------------------------------------
def _is_previous_synthetic(path: Path) -> bool:
    try:
        desc = json.loads((path / "dataset_description.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return any(g.get("Name") == GENERATOR_NAME for g in desc.get("GeneratedBy", []))


def _dataset_files(root: Path, preset: Preset, seed: int, generator: str, rows: list[dict],
                   severity: float | None = None) -> None:
    described = f"preset {preset.name}, seed {seed}, lesion generator {generator}"
    if severity is not None:
        described += f", severity {severity:g}"
    generated_by = [{"Name": GENERATOR_NAME, "Version": __version__, "Description": described}]
    _json(root / "dataset_description.json", {
        "Name": f"bids_uad synthetic dataset ({preset.name})", "BIDSVersion": "1.9.0", "DatasetType": "raw",
        "License": "CC0", "Authors": ["bids_uad synthetic generator", "bids_uad developers"], "GeneratedBy": generated_by})
    (root / "README").write_text(
        f"Synthetic diffusion MRI dataset made by {GENERATOR_NAME} {__version__} (preset {preset.name}, "
        f"seed {seed}).\nHealthy controls and patients (lesion generator {generator}) built from the MNI152 "
        f"2009a template; the ground truth is in derivatives/{TRUTH_NAME}/ (see its README).\n")
    (root / ".bidsignore").write_text("derivatives/\n")
    columns = ["participant_id", "group", "age", "sex"]
    (root / "participants.tsv").write_text("\t".join(columns) + "\n" + "".join(
        "\t".join(str(r[c]) for c in columns) + "\n" for r in rows))
    _json(root / "participants.json", {
        "group": {"Description": "cohort",
                  "Levels": {"control": "healthy control", "patient": f"patient ({generator} lesions)"}},
        "age": {"Description": "age at the first session", "Units": "year"},
        "sex": {"Description": "sex", "Levels": {"F": "female", "M": "male"}}})
    truth = root / "derivatives" / TRUTH_NAME
    _json(truth / "dataset_description.json", {
        "Name": "Ground truth of the synthetic dataset", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
        "GeneratedBy": generated_by})
    (truth / "dseg.tsv").write_text("index\tname\n1\tCSF\n2\tGM\n3\tWM\n")
    (truth / "README").write_text(TRUTH_README)


TRUTH_README = """Ground truth of the synthetic dataset (all in BIDS-derivatives naming)

Orientation: T1w and FLAIR are stored RAS; the dwi series, the reverse phase-encoding b0
(fmap/*_dir-PA_epi) and every dwi-space truth file are stored LAS (first voxel axis right->left,
negative determinant), as dcm2niix writes scanner data, all on the same grid.  The .bvec files
hold voxel-frame vectors, which for an LAS image is exactly FSL's b-vector convention.  Phase
encoding is along the second voxel axis j (posterior->anterior): AP = "j-", PA = "j".

sub-X/ses-Y/anat/  (T1w grid of that session)
  *_space-T1w_dseg.nii.gz                tissue labels 1=CSF 2=GM 3=WM (dseg.tsv)
  *_space-T1w_desc-brain_mask.nii.gz
  *_space-T1w_desc-tumor_mask.nii.gz     patients only: the union of every lesion's voxels
        (for a glioma: core | solid | oedema, what FLAIR shows)
  *_space-T1w_desc-lesions_dseg.nii.gz   patients only: one integer per lesion (0 = none, 1, 2, ...;
        a lesion keeps its index in every session); the nonzero voxels are exactly desc-tumor
  *_space-T1w_desc-lesions_dseg.tsv      its table: index, name, type (glioma, infiltration, oedema,
        restricted, mass-effect), severity (0-1; n/a for a glioma), volume_ml (in this space)
  *_space-T1w_desc-{core,solid,oedema,infiltration}_mask.nii.gz   sessions with a glioma only;
        infiltration (the zone around a glioma) changes diffusion only and is not in desc-tumor.
        Every glioma has all four regions: the core is the deepest 15-35 % of the tumour mass
        (at least four dwi voxels' volume, at most 60 % of the mass), the solid part the rest of
        the mass, then oedema and infiltration shells around it.  Radii are 6-24 mm, and at
        least 2.5 dwi voxels (10 mm for the 4 mm tiny preset) so that the regions are resolved.
        Graded lesion types (volumes log-uniform in 1.5-60 mL; severity 0 = mild end, 1 = strong
        end; the region is its tissue: brain, CSF fraction < 0.6; an infiltration is drawn in WM):
          infiltration  along a WM tract: anisotropy loss at near-constant MD (+-3 %)
          oedema        MD +10-30 % (an isotropic diffusivity added), FA mildly lower, b0/FLAIR brighter
          restricted    cellular tumour: MD -20-40 %, mild FA loss, brighter diffusion-weighted signal
          mass-effect   tissue displaced from the centre with its scalars (near normal), tract
                        directions carried by the deformation (bent around the centre); the
                        region is the ball of radius 2 sigma of the displacement kernel
  *_from-T1w_to-dwi_mode-image_xfm.txt  4x4 world(mm)->world(mm): a point of the T1w world maps
        to the same anatomy in the dwi world (undistorted grid)
sub-X/ses-Y/dwi/   (undistorted grid of the raw dwi: same shape and affine)
  *_space-dwi_dseg.nii.gz, *_space-dwi_desc-brain_mask.nii.gz, *_space-dwi_desc-<class>_mask.nii.gz,
  *_space-dwi_desc-lesions_dseg.nii.gz and .tsv (volume_ml in dwi space): as in anat/, on the dwi grid
  *_space-dwi_desc-clean_dwi.nii.gz (+ .bval .bvec)   artefact-free noise-free series (what perfect
        preprocessing would give; head at the position of volume 0, nominal gradients)
  *_space-dwi_model-tensor_param-{fa,md}_dwimap.nii.gz   tensor fit of the clean series
  *_space-dwi_desc-fibre_dwimap.nii.gz   4D (x, y, z, 3): unit WM fibre direction the simulator
        used, in world (RAS mm) axes, where the WM fraction is >= 0.5 (else 0)
  *_desc-susceptibility_fieldmap.nii.gz  off-resonance field (Hz) on the undistorted grid, head at
        the position of volume 0 (the field moves with the head);
        displacement along j (voxels) = field * TotalReadoutTime * polarity (j: +1, j-: -1);
        intensities are modulated by the Jacobian (1 + d displacement / dj)
  *_desc-motion_timeseries.tsv           per-volume rigid motion (trans mm, rot rad) and eddy
        terms, see its JSON; volume 0 has no motion and defines the reference position.
        Parameters are in the grid-centred voxel-mm frame of the (LAS) dwi grid (the axes of
        FSL's scaled-voxel frame; the convention of bids_uad's head-motion estimates); a rotated
        head sees the rotated gradient R^T g
  *_dir-PA_desc-motion_timeseries.tsv    head position of the reverse phase-encoding b0 (one row,
        same frame, relative to dwi volume 0)
sub-X/sub-X_desc-lesion_info.json        lesion parameters per session (patients): {session: {"lesions":
        [{index, type, severity, ...}]}}, index as in desc-lesions_dseg
"""


def generate_dataset(output_dir: str | Path, preset: str = "tiny", n_controls: int | None = None,
                     n_patients: int | None = None, seed: int = 0, lesion_generator: str = DEFAULT_GENERATOR,
                     no_reverse_pe_fraction: float | None = None, write_clean_dwi: bool = True,
                     progress: bool = True, n_jobs: int | None = None, severity: float | None = None,
                     n_controls_two_sessions: int | None = None) -> Path:
    """Write a synthetic BIDS dataset (and its truth) to ``output_dir``; returns the path.

    The dataset is built in a hidden staging folder inside ``output_dir`` and moved into place
    at the end (:mod:`bids_uad.synthetic.output`): ``output_dir`` itself is never removed, so it
    may be a mount point, and a killed generation leaves only the staging folder.  An existing
    ``output_dir`` must be empty or a previous synthetic dataset (whose content is replaced).
    Folders are written 0755 and files 0644, readable by a container running under another uid.

    ``lesion_generator``: the patients' lesions (see :mod:`bids_uad.synthetic.lesion_types`);
    ``severity`` (0-1) fixes the severity of the graded types (default: drawn per lesion).
    ``n_controls_two_sessions``: how many controls also get a follow-up session (default: the
    preset's).
    """
    if lesion_generator not in LESION_GENERATORS:
        raise UsageError(f"--lesion-generator must be one of {', '.join(LESION_GENERATORS)}")
    if severity is not None and not 0 <= severity <= 1:
        raise UsageError("--severity must lie in [0, 1]")
    if severity is not None and is_glioma(lesion_generator):
        raise UsageError("--severity applies to the graded lesion types (infiltration, oedema, restricted, "
                         "mass-effect, mixed-hard), not to the glioma")
    if no_reverse_pe_fraction is not None and not 0 <= no_reverse_pe_fraction <= 1:
        raise UsageError("--no-reverse-pe-fraction must lie in [0, 1]")
    for name, value in (("--controls", n_controls), ("--patients", n_patients),
                        ("n_controls_two_sessions", n_controls_two_sessions)):
        if value is not None and value < 0:
            raise UsageError(f"{name} must not be negative")
    spec = get_preset(preset, n_controls=n_controls, n_patients=n_patients,
                      no_reverse_pe_fraction=no_reverse_pe_fraction)
    spec = get_preset(preset, n_controls=spec.n_controls, n_patients=spec.n_patients,
                      no_reverse_pe_fraction=spec.no_reverse_pe_fraction,
                      n_controls_two_sessions=min(spec.n_controls_two_sessions if n_controls_two_sessions is None
                                                  else n_controls_two_sessions, spec.n_controls))
    out = Path(output_dir).resolve()
    tmp = prepare_output(out, _is_previous_synthetic)
    try:
        plans = plan_subjects(spec, seed)
        jobs = max(1, n_jobs or min(2, os.cpu_count() or 1, len(plans)))
        load_template(spec.t1w_source_mm), load_template(2)  # once, before the workers fork
        args = [(p, spec, seed, lesion_generator, write_clean_dwi, str(tmp), severity) for p in plans]
        rows = _run_all(args, jobs, progress)
        _dataset_files(tmp, spec, seed, lesion_generator, rows, severity)
        publish(tmp, out)
    except BaseException:
        discard(tmp)
        raise
    return out


def _simulate_star(args) -> dict:
    return simulate_subject(*args)


def _workload(plan: SubjectPlan) -> int:
    """Relative cost of a subject (sessions simulated) for scheduling the longest first."""
    return len(plan.sessions) + 2 * len(plan.dwi_sessions) + (plan.group == "patient")


def _run_all(args: list, jobs: int, progress: bool) -> list[dict]:
    """Simulate every subject (in ``jobs`` processes) with a progress bar; rows in plan order.

    Workers are forked after the templates are loaded, so they share them instead of each
    loading its own copy (and before the progress bar starts its thread); the costliest
    subjects start first to keep both cores busy.
    """
    from tqdm import tqdm

    def bar():
        return tqdm(total=len(args), desc="synthetic subjects", unit="subject", disable=not progress)

    if jobs <= 1:
        rows = []
        with bar() as pbar:
            for a in args:
                rows.append(_simulate_star(a))
                pbar.update()
        return rows
    order = sorted(range(len(args)), key=lambda k: -_workload(args[k][0]))
    rows: list[dict | None] = [None] * len(args)
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {pool.submit(_simulate_star, args[k]): k for k in order}
        with bar() as pbar:
            for future in as_completed(futures):
                rows[futures[future]] = future.result()
                pbar.update()
    return rows
