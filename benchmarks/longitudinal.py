"""Benchmark: does baseline mismatch predict follow-up lesion growth better than random regions?

Uses the synthetic generator's own glioma model (``bids_uad.synthetic.lesions``) on the 2 mm
MNI template: per patient a tumour (core + solid + oedema, the visible lesion) with an
infiltration zone, and its follow-up growth into part of that zone.  A simulated detector
flags the tumour, ~80 % of the infiltration (spatially smooth misses) and a few false
positive blobs.  For each patient: the observed overlap of the mismatch (anomalous,
outside the baseline lesion) with the follow-up lesion, against randomly placed copies of
the mismatch components inside the brain minus the baseline lesion.  Controls (no tumour,
false positives only, identical sessions) give the mismatch growth, which should be zero.

No registration here (both sessions on the template grid): this measures the statistic, the
workflow test measures the registration path.  With ``--dataset DIR`` (or ``--generate DIR``)
it uses a generated synthetic BIDS dataset instead: its T1w images (follow-up registered to
baseline as in the workflow) and its truth masks.  Prints a table; the last line is one JSON object.

    .venv/bin/python benchmarks/longitudinal.py [--patients 6] [--controls 3] [--permutations 100]
    .venv/bin/python benchmarks/longitudinal.py --generate /tmp/synth   # needs generate_dataset
    .venv/bin/python benchmarks/longitudinal.py --dataset /tmp/synth --workflow [--lesions estimate]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from bids_uad.bids import outputs


def simulate_detector(tumour, infiltration, brain, rng, sensitivity=0.8, n_fp=3):
    """Anomaly mask: tumour, most of the infiltration (smooth misses), false-positive blobs."""
    field = ndi.gaussian_filter(rng.standard_normal(brain.shape).astype(np.float32), 1.5)
    thr = np.quantile(field[infiltration], 1 - sensitivity) if infiltration.any() else 0.0
    anomaly = tumour | (infiltration & (field >= thr))
    inside = np.argwhere(brain & ~tumour & ~infiltration)
    idx = np.indices(brain.shape, dtype=np.float32)
    for _ in range(n_fp):
        c = inside[rng.integers(len(inside))]
        r = rng.uniform(1.5, 3.0)
        anomaly |= (sum((idx[i] - c[i]) ** 2 for i in range(3)) <= r * r) & brain
    return anomaly


def _truth(folder: Path, prefix: str, desc: str):
    """A truth mask of one session in T1w space (``space-T1w`` or no space entity), or None."""
    for pattern in (f"{prefix}_*space-T1w_desc-{desc}_mask.nii*", f"{prefix}_desc-{desc}_mask.nii*"):
        hits = sorted(folder.glob(pattern))
        if hits:
            return hits[0]
    return None


def dataset_rows(root: Path, args, work: Path) -> list[dict]:
    """Patients and controls of a generated dataset: truth masks + the real registration path.

    Per subject with two sessions (ordered by ``acq_time``): the follow-up T1w is registered to
    the baseline T1w (rigid + SyN, lesions masked, as in the workflow) and its tumour truth is
    carried onto the baseline T1w grid; the anomaly mask is the simulated detector on the
    baseline tumour + infiltration truth; everything is compared in baseline T1w space.
    """
    import nibabel as nib
    from nibabel.processing import resample_from_to

    from bids_uad.algorithms.longitudinal import compare_sessions
    from bids_uad.algorithms.registration import apply_transforms
    from bids_uad.bids.preprocessed import order_sessions
    from bids_uad.algorithms.registration import register_followup
    from bids_uad.bids.derivatives import read_tsv

    truth_root = root / "derivatives" / "synthetic-truth"
    if not truth_root.is_dir():
        raise SystemExit(f"{truth_root}: no synthetic truth (is {root} a generated dataset?)")
    groups = {}
    if (root / "participants.tsv").is_file():
        groups = {r["participant_id"]: r.get("group", "") for r in read_tsv(root / "participants.tsv")}
    rows = []
    for sub_dir in sorted(p for p in truth_root.glob("sub-*") if p.is_dir()):
        sub = sub_dir.name[4:]
        sessions = sorted(p.name[4:] for p in sub_dir.glob("ses-*") if p.is_dir())
        table = root / f"sub-{sub}" / f"sub-{sub}_sessions.tsv"
        sessions = order_sessions(sessions, read_tsv(table) if table.is_file() else [])
        if len(sessions) < 2:
            continue
        base, fu = sessions[0], sessions[1]
        files = {}
        for ses in (base, fu):
            prefix = f"sub-{sub}_ses-{ses}"
            anat = sub_dir / f"ses-{ses}" / "anat"
            t1w = sorted((root / f"sub-{sub}" / f"ses-{ses}" / "anat").glob(f"{prefix}*_T1w.nii*"))
            brain = _truth(anat, prefix, "brain")
            if not t1w or brain is None:
                print(f"sub-{sub} ses-{ses}: no T1w or no brain-mask truth, skipped", file=sys.stderr)
                break
            files[ses] = {"t1w": t1w[0], "brain": brain, "tumor": _truth(anat, prefix, "tumor"),
                          "infiltration": _truth(anat, prefix, "infiltration")}
        if len(files) < 2:
            continue
        ref = nib.load(str(files[base]["t1w"]))
        shape = ref.shape[:3]

        def load(path):
            if path is None:
                return np.zeros(shape, bool)
            img = nib.load(str(path))
            if img.shape[:3] != shape or not np.allclose(img.affine, ref.affine, atol=1e-3):
                img = resample_from_to(img, (shape, ref.affine), order=0)
            return np.asarray(img.dataobj).reshape(shape) > 0

        t0 = time.time()
        _, reg = register_followup(files[base]["t1w"], files[base]["brain"], files[base]["tumor"] or "",
                                   files[fu]["t1w"], files[fu]["brain"], files[fu]["tumor"] or "",
                                   str(work / f"sub-{sub}_"), seed=args.seed)
        if files[fu]["tumor"] is not None:
            fu_tumour = np.asarray(apply_transforms(str(files[fu]["tumor"]), ref, reg.forward, "mask",
                                                    invert=reg.forward_invert).dataobj) > 0
        else:
            fu_tumour = np.zeros(shape, bool)
        reg_s = time.time() - t0
        brain = load(files[base]["brain"])
        tumour, infil = load(files[base]["tumor"]), load(files[base]["infiltration"])
        rng = np.random.default_rng(args.seed + len(rows))
        anomaly = simulate_detector(tumour, infil, brain, rng) & brain
        stats, _ = compare_sessions(anomaly, tumour, fu_tumour, brain, ref.header.get_zooms()[:3],
                                    n_permutations=args.permutations, seed=args.seed + len(rows),
                                    null_method=args.method, perilesional_mm=args.perilesional_mm)
        group = groups.get(f"sub-{sub}", "") or ("patient" if tumour.any() else "control")
        rows.append({"subject": sub, "group": "control" if group == "control" else "patient",
                     "registration_s": round(reg_s, 1), **stats})
    return rows


def _ants_affine(ras: np.ndarray, path: Path) -> None:
    """Write a RAS world→world 4x4 as the ANTs transform that resamples along it (fixed→moving, LPS)."""
    import ants

    flip = np.diag([-1.0, -1.0, 1.0])
    inv = np.linalg.inv(ras)
    ants.write_transform(ants.create_ants_transform(transform_type="AffineTransform", dimension=3,
                                                    matrix=flip @ inv[:3, :3] @ flip,
                                                    translation=flip @ inv[:3, 3]), str(path))


def fake_participant_derivatives(root: Path, out: Path, args) -> list[tuple[str, list[str]]]:
    """OUTPUT_DIR as the participant level would leave it, made from the dataset's truth.

    anat: raw T1w/FLAIR as ``desc-preproc`` (same grid), truth brain mask, the truth T1w→dwi
    rigid as ANTs ``.h5``; dwi: truth brain mask ∩ tissue as the analysis mask and, as the
    ``model-oracle`` anomaly maps, the simulated detector on the dwi-space tumour and
    infiltration truth.  Returns (subject, sessions) of subjects with two or more sessions.
    """
    import shutil

    import nibabel as nib

    truth_root = root / "derivatives" / "synthetic-truth"
    subjects = []
    for sub_dir in sorted(p for p in truth_root.glob("sub-*") if p.is_dir()):
        sub = sub_dir.name[4:]
        sessions = sorted(p.name[4:] for p in sub_dir.glob("ses-*") if p.is_dir())
        for k, ses in enumerate(sessions):
            prefix = f"sub-{sub}_ses-{ses}"
            raw, tru = root / f"sub-{sub}" / f"ses-{ses}", sub_dir / f"ses-{ses}"
            anat, dwi = out / f"sub-{sub}" / f"ses-{ses}" / "anat", out / f"sub-{sub}" / f"ses-{ses}" / "dwi"
            anat.mkdir(parents=True, exist_ok=True)
            dwi.mkdir(parents=True, exist_ok=True)
            source = {"sub": sub, "ses": ses}  # the truth stands in for a session without run entities
            shutil.copyfile(raw / "anat" / f"{prefix}_T1w.nii.gz", anat / outputs.name_for("t1w_preproc", source))
            shutil.copyfile(tru / "anat" / f"{prefix}_space-T1w_desc-brain_mask.nii.gz",
                            anat / outputs.name_for("t1w_mask", source))
            if (raw / "anat" / f"{prefix}_FLAIR.nii.gz").is_file():
                shutil.copyfile(raw / "anat" / f"{prefix}_FLAIR.nii.gz",
                                anat / outputs.name_for("flair_t1w", source))
            xfm = tru / "anat" / f"{prefix}_from-T1w_to-dwi_mode-image_xfm.txt"
            if not xfm.is_file():
                continue
            ras = np.loadtxt(xfm)
            _ants_affine(ras, anat / outputs.name_for("xfm_t1w_to_dwi", source))
            _ants_affine(np.linalg.inv(ras), anat / outputs.name_for("xfm_dwi_to_t1w", source))
            brain_img = nib.load(str(tru / "dwi" / f"{prefix}_space-dwi_desc-brain_mask.nii.gz"))
            dseg = np.asarray(nib.load(str(tru / "dwi" / f"{prefix}_space-dwi_dseg.nii.gz")).dataobj)
            analysis = (np.asarray(brain_img.dataobj) > 0) & (dseg >= 2)

            def truth_dwi(desc):
                path = tru / "dwi" / f"{prefix}_space-dwi_desc-{desc}_mask.nii.gz"
                return np.asarray(nib.load(str(path)).dataobj) > 0 if path.is_file() else np.zeros_like(analysis)

            rng = np.random.default_rng(args.seed + 17 * k + len(subjects))
            anomaly = simulate_detector(truth_dwi("tumor"), truth_dwi("infiltration"), analysis, rng) & analysis
            score = anomaly * 3.0 + 0.3 * rng.random(anomaly.shape)
            for data, key, dtype in ((analysis, "analysis_mask", np.uint8), (anomaly, "anomaly_mask", np.uint8),
                                     (score * analysis, "anomaly_score", np.float32)):
                name = outputs.name_for(key, source, model="oracle")
                nib.save(nib.Nifti1Image(data.astype(dtype), brain_img.affine), str(dwi / name))
        if len(sessions) > 1:
            subjects.append((sub, sessions))
    return subjects


def workflow_rows(root: Path, args, work: Path) -> list[dict]:
    """Run ``init_longitudinal_wf`` on every two-session subject of a generated dataset."""
    from bids_uad.config import Settings
    from bids_uad.bids.derivatives import read_tsv
    from bids_uad.workflows.longitudinal import init_longitudinal_wf

    out = work / "derivatives"
    subjects = fake_participant_derivatives(root, out, args)
    lesions = root / "derivatives" / "synthetic-truth" if args.lesions == "truth" else None
    settings = Settings(bids_dir=root, output_dir=out, analysis_level="participant", work_dir=work / "work",
                        lesion_masks=lesions, seed=args.seed)
    rows = []
    for sub, sessions in subjects:
        t0 = time.time()
        wf = init_longitudinal_wf(settings, sub, sessions, name=f"longitudinal_{sub}",
                                  n_permutations=args.permutations, perilesional_mm=args.perilesional_mm,
                                  check_inputs=True)
        wf.base_dir = str(settings.work_dir)
        wf.run(plugin="Linear")
        for row in read_tsv(out / f"sub-{sub}" / f"sub-{sub}_desc-longitudinal_stats.tsv"):
            row = {k: (float(v) if v not in ("n/a",) and k.endswith(("_ml", "_mean", "_p", "_std", "fraction"))
                       else (float("nan") if v == "n/a" else v)) for k, v in row.items()}
            rows.append({"subject": sub, "group": "control" if sub.startswith("ctrl") else "patient",
                         "workflow_s": round(time.time() - t0, 1), **row})
    if args.keep:
        import shutil

        shutil.copytree(out, args.keep, dirs_exist_ok=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=6)
    parser.add_argument("--controls", type=int, default=3)
    parser.add_argument("--permutations", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--method", default="components", choices=("components", "blobs"))
    parser.add_argument("--perilesional-mm", type=float, default=20.0,
                        help="also a stricter null: random regions within this distance of the lesion (0 = off)")
    parser.add_argument("--dataset", type=Path, help="a generated synthetic BIDS dataset: use its "
                        "truth and T1w images (registration included) instead of the template model")
    parser.add_argument("--generate", type=Path, help="generate the tiny synthetic dataset here first "
                        "(bids_uad.synthetic.generate_dataset), then use it as --dataset")
    parser.add_argument("--workflow", action="store_true", help="with --dataset/--generate: run the "
                        "nipype workflow on derivatives made from the truth (model-oracle anomaly maps)")
    parser.add_argument("--lesions", default="truth", choices=("truth", "estimate"),
                        help="--workflow: truth masks as --lesion-masks, or FLAIR estimates")
    parser.add_argument("--keep", type=Path, help="--workflow: copy the derivatives here")
    args = parser.parse_args(argv)

    from bids_uad.algorithms.longitudinal import compare_sessions
    from bids_uad.synthetic.anatomy import load_template
    from bids_uad.synthetic.lesions import grow_lesion, lesion_fields, make_lesion

    t0 = time.time()
    if args.generate is not None:
        from bids_uad.synthetic import generate_dataset

        generate_dataset(args.generate, preset="tiny", seed=args.seed)
        args.dataset = args.generate
    if args.dataset is not None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="bids_uad_long_") as work:
            rows = (workflow_rows if args.workflow else dataset_rows)(Path(args.dataset), args, Path(work))
        source = str(args.dataset) + (f" (workflow, lesions: {args.lesions})" if args.workflow else "")
        return report(rows, args, t0, source=source)
    tpl = load_template(2)
    brain = tpl.brain > 0.5
    csf = np.clip(tpl.brain - tpl.gm - tpl.wm, 0, 1)
    analysis = brain & (tpl.gm + tpl.wm > 0.5)
    pts = np.indices(brain.shape, dtype=np.float32).reshape(3, -1)
    m = (tpl.affine[:3, :3] @ pts + tpl.affine[:3, 3:4]).astype(np.float32)
    flat = lambda a: a.reshape(-1)  # noqa: E731
    zooms = (2.0, 2.0, 2.0)

    def labels(lesion):
        f = lesion_fields(tpl, lesion, m, flat(tpl.wm), flat(csf), flat(tpl.brain))
        return {k: f[k].reshape(brain.shape) for k in ("tumor", "infiltration")}

    rows = []
    for i in range(args.patients):
        rng = np.random.default_rng(args.seed + i)
        lesion = make_lesion(tpl, rng)
        grown = grow_lesion(tpl, lesion, rng)
        base, follow = labels(lesion), labels(grown)
        anomaly = simulate_detector(base["tumor"], base["infiltration"], analysis, rng) & analysis
        stats, _ = compare_sessions(anomaly, base["tumor"], follow["tumor"], analysis, zooms,
                                    n_permutations=args.permutations, seed=args.seed + i,
                                    null_method=args.method, perilesional_mm=args.perilesional_mm)
        rows.append({"subject": f"pat{i + 1:02d}", "group": "patient", **stats})
    for i in range(args.controls):
        rng = np.random.default_rng(1000 + args.seed + i)
        none = np.zeros(brain.shape, bool)
        anomaly = simulate_detector(none, none, analysis, rng) & analysis
        stats, _ = compare_sessions(anomaly, none, none, analysis, zooms,
                                    n_permutations=args.permutations, seed=args.seed + i,
                                    null_method=args.method)
        rows.append({"subject": f"ctl{i + 1:02d}", "group": "control", **stats})
    return report(rows, args, t0, source="template glioma model")


def report(rows: list[dict], args, t0: float, source: str) -> int:
    """Print the table and the final JSON line."""
    cols = ("subject", "baseline_lesion_ml", "new_lesion_ml", "mismatch_ml", "mismatch_growth_ml",
            "overlap_fraction", "overlap_fraction_random_mean", "overlap_fraction_random_p",
            "overlap_fraction_perilesional_mean", "overlap_fraction_perilesional_p")
    short = {c: c.replace("overlap_fraction", "ovl").replace("perilesional", "peri")[:16] for c in cols}
    print("  ".join(f"{short[c]:>16s}" for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]:>16.4g}" if isinstance(r[c], float) else f"{r[c]:>16s}" for c in cols))
    pats = [r for r in rows if r["group"] == "patient"]
    ctls = [r for r in rows if r["group"] == "control"]
    summary = {
        "benchmark": "longitudinal",
        "source": source,
        "null_method": args.method,
        "n_patients": len(pats),
        "n_controls": len(ctls),
        "permutations": args.permutations,
        "overlap_observed_median": round(float(np.median([r["overlap_fraction"] for r in pats])), 4) if pats else None,
        "overlap_random_median": round(float(np.median([r["overlap_fraction_random_mean"] for r in pats])), 4) if pats else None,
        "patients_p_below_0.05": int(sum(r["overlap_fraction_random_p"] < 0.05 for r in pats)),
        "perilesional_mm": args.perilesional_mm,
        "overlap_perilesional_median": (round(float(np.nanmedian([r["overlap_fraction_perilesional_mean"]
                                                                  for r in pats])), 4)
                                        if pats and args.perilesional_mm > 0 else None),
        "patients_perilesional_p_below_0.05": int(sum(r["overlap_fraction_perilesional_p"] < 0.05 for r in pats)),
        "control_mismatch_growth_ml_max": max((r["mismatch_growth_ml"] for r in ctls), default=None),
        "wall_s": round(time.time() - t0, 1),
        # CPU of this process (the null is single-threaded): comparable across machine loads
        "cpu_s": round(time.process_time(), 1),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
