"""Sections of the participant report, built from one subject's derivatives on disk.

Each ``*_section`` function returns a list of items (see :mod:`bids_uad.reports.reportlets`)
for all sessions of the subject; a figure whose inputs are missing becomes a
"not available: <why>" note instead.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from bids_uad.reports import figures as F
from bids_uad.reports.collect import (LOOKUP, SessionDerivatives, SubjectDerivatives, meta_value,
                                      read_json, read_tsv, sidecar_of, to_float)
from bids_uad.reports.methods import steps_of, warnings_of
from bids_uad.reports.reportlets import FigureMaker, heading, kv, note, pre, table, text, warning

TISSUES = (("CSF", 1), ("GM", 2), ("WM", 3))


def load(path: Path | None):
    """(RAS data, affine) of a NIfTI file, or None."""
    import nibabel as nib

    if path is None:
        return None
    return F.to_canonical(nib.load(str(path)))


def missing(ses: SessionDerivatives, what: str, *keys: str) -> dict:
    """A note naming which derivative was not found and where it was looked for."""
    absent = [k for k in keys if ses.get(k) is None]
    looked = []
    for key in absent:
        folders, candidates = LOOKUP[key]
        spec = candidates[0]
        ents = "_".join(f"{k}-{v}" for k, v in spec["entities"].items() if v not in (None, "*"))
        looked.append(f"{'|'.join(folders)}/{ses.prefix}_*{ents}_{spec['suffix']}{spec['ext']}")
    return note(f"Not available: {what} — no " + ", ".join(looked) + " in the derivatives.")


def _same_grid(*arrays) -> bool:
    shapes = {a.shape for a in arrays if a is not None}
    return len(shapes) <= 1


def _tissue_contours(seg: np.ndarray) -> list[tuple[np.ndarray, str, str]]:
    return [(seg == value, F.COLORS[name], name) for name, value in TISSUES]


LEGEND = "Contours: " + ", ".join(f"{n} ({F.COLORS[n]})" for n, _ in TISSUES) + "."


# ---------------------------------------------------------------- summary
def _protocol(ses: SessionDerivatives) -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = []
    path = ses.get("dwi_preproc")
    if path is not None:
        import nibabel as nib

        img = nib.load(str(path))
        zooms = img.header.get_zooms()[:3]
        rows.append(("dwi matrix", " × ".join(str(s) for s in img.shape)))
        rows.append(("dwi voxel size (mm)", " × ".join(f"{z:.2f}" for z in zooms)))
        bval = path.with_name(path.name.replace(".nii.gz", ".bval"))
        if bval.is_file():
            values = np.rint(np.loadtxt(bval, ndmin=1) / 50) * 50
            shells = ", ".join(f"b={int(b)}: {int((values == b).sum())}" for b in np.unique(values))
            rows.append(("b-values (volumes)", shells))
        meta = ses.sidecar("dwi_preproc")
        backend = meta_value(meta, "PreprocessingBackend", "Backend")
        if backend:
            rows.insert(0, ("preprocessing backend", backend))
        for key in ("PhaseEncodingDirection", "TotalReadoutTime", "EchoTime", "RepetitionTime"):
            if key in meta:
                rows.append((key, meta[key]))
    t1 = ses.get("t1w")
    if t1 is not None:
        import nibabel as nib

        img = nib.load(str(t1))
        rows.append(("T1w voxel size (mm)", " × ".join(f"{z:.2f}" for z in img.header.get_zooms()[:3])))
    return rows


def summary_section(subj: SubjectDerivatives) -> list[dict]:
    items: list[dict] = []
    if not subj.sessions:
        return [note(f"Not available: no derivatives found under sub-{subj.subject}/.")]
    items.append(kv([("Subject", subj.subject),
                     ("Sessions", ", ".join(s.session or "(none)" for s in subj.sessions)),
                     ("Anomaly models", ", ".join(sorted({m for s in subj.sessions for m in s.anomaly}))
                      or "none (run with --model)")]))
    all_warnings = list(subj.log_warnings)
    for ses in subj.sessions:
        items.append(heading(f"{ses.title}"))
        found = [(k, ses.files[k]) for k in LOOKUP if k in ses.files]  # the table's (pipeline) order
        inputs = [(key, path.name) for key, path in found]
        inputs += [(f"T1w in {space}", p.name) for space, p in ses.template_t1w.items()]
        inputs += [(f"anomaly {model} {kind}", p.name) for model, files in ses.anomaly.items()
                   for kind, p in files.items()]
        sources: list[str] = []
        steps_rows = []
        extra = [(f"T1w in {s}", p) for s, p in ses.template_t1w.items()]
        extra += [(f"T1w to {s} transform", p) for s, p in ses.template_xfm.items()]
        inputs += [(k, p.name) for k, p in extra if k.endswith("transform")]
        for key, path in list(found) + extra:
            meta = read_json(sidecar_of(path))
            for src in meta.get("Sources", []) if isinstance(meta.get("Sources"), list) else []:
                if str(src) not in sources:
                    sources.append(str(src))
            for step in steps_of(meta):
                row = [step.name, step.backend or "n/a", step.status, step.detail, path.name]
                if row[:3] not in [r[:3] for r in steps_rows]:
                    steps_rows.append(row)
            all_warnings.extend(w for w in warnings_of(meta) if w not in all_warnings)
        if ses.get("dwi_preproc") and not ses.get("fieldmap") and not ses.get("b0_uncorrected"):
            sdc = [s for s in steps_rows if "suscept" in s[0].lower() or "sdc" in s[0].lower()]
            if not sdc or all(s[2].lower().startswith("skip") for s in sdc):
                msg = "no susceptibility field found: susceptibility distortion correction was not applied"
                if not any("suscept" in w.lower() for w in all_warnings):
                    all_warnings.append(msg)
        found_table = table(["derivative", "file"], inputs, caption=f"Derivatives found ({len(inputs)} files)")
        found_table["collapsed"] = True
        items.append(found_table)
        if sources:
            items.append(table(["source"], [[s] for s in sources], caption="Input files (from the sidecars)"))
        protocol = _protocol(ses)
        if protocol:
            items.append(kv(protocol))
        if steps_rows:
            steps_table = table(["step", "backend", "status", "detail", "recorded in"], steps_rows,
                                caption="Processing steps and the backend that ran them")
            steps_table["css"] = "steps"
            items.append(steps_table)
        else:
            items.append(note("Not available: processing steps — no sidecar records its steps."))
    # a step skipped for a reason the run log already states is one warning, not two
    all_warnings = [w for w in all_warnings if not (" skipped: " in w and any(
        w.split(" skipped: ", 1)[1] in other for other in all_warnings if other != w))]
    if all_warnings:
        items.insert(1, heading("Warnings"))
        for i, w in enumerate(all_warnings):
            items.insert(2 + i, warning(w))
    return items


# ---------------------------------------------------------------- anatomical
def anatomical_section(subj: SubjectDerivatives, maker: FigureMaker) -> list[dict]:
    items: list[dict] = []
    sessions = [s for s in subj.sessions if s.get("t1w") or s.template_t1w]
    if not sessions:
        return [note("Not available: no preprocessed T1w (anat/*_desc-preproc_T1w.nii.gz) in the derivatives.")]
    for ses in sessions:
        items.append(heading(ses.title))
        t1 = load(ses.get("t1w"))
        if t1 is None:
            items.append(missing(ses, "T1w figures", "t1w"))
        else:
            data, aff = t1
            mask = load(ses.get("t1w_mask"))
            if mask is not None and _same_grid(data, mask[0]):
                sl = F.pick_slices(data.shape, mask[0])
                items.append(maker.figure(
                    f"{ses.prefix}_desc-brain_T1w.svg", [ses.get("t1w"), ses.get("t1w_mask")],
                    lambda: F.mosaic(data, aff, contours=[(mask[0] > 0.5, F.COLORS["brain"], "brain")], slices=sl),
                    "Brain mask (red contour) on the preprocessed T1w image.", "Brain mask on T1w"))
            else:
                items.append(missing(ses, "brain mask on T1w", "t1w_mask"))
            seg = load(ses.get("t1w_dseg"))
            inputs = [ses.get("t1w"), ses.get("t1w_dseg")]
            if seg is None and all(ses.get(k) for k in ("t1w_gm", "t1w_wm", "t1w_csf")):
                probs = [load(ses.get(k))[0] for k in ("t1w_csf", "t1w_gm", "t1w_wm")]
                seg = ((np.argmax(probs, axis=0) + 1) * (np.max(probs, axis=0) > 0.5), aff)
                inputs = [ses.get("t1w"), ses.get("t1w_gm"), ses.get("t1w_wm"), ses.get("t1w_csf")]
            if seg is not None and _same_grid(data, seg[0]):
                labels = np.rint(seg[0]).astype(int)
                sl = F.pick_slices(data.shape, labels > 0)
                items.append(maker.figure(
                    f"{ses.prefix}_desc-seg_T1w.svg", inputs,
                    lambda: F.mosaic(data, aff, contours=_tissue_contours(labels), slices=sl),
                    "Tissue segmentation of the T1w image. " + LEGEND, "Tissue segmentation on T1w"))
            else:
                items.append(missing(ses, "tissue segmentation", "t1w_dseg"))
        spaces = sorted(set(ses.template_t1w) | (set(ses.template_xfm) if ses.get("t1w") else set()))
        if not spaces:
            items.append(note("Not available: T1w ↔ template registration — neither anat/"
                              f"{ses.prefix}_space-<template>_desc-preproc_T1w.nii.gz nor anat/"
                              f"{ses.prefix}_from-T1w_to-<template>_mode-image_xfm.h5 in the derivatives."))
        for space in spaces:
            items.append(_template_flicker(ses, space, maker))
    return items


def _template_flicker(ses: SessionDerivatives, space: str, maker: FigureMaker) -> dict:
    """Flicker of the T1w in template space and the template (the warp is applied if needed)."""
    import nibabel as nib

    from bids_uad.reports import registration as R

    path, xfm = ses.template_t1w.get(space), ses.template_xfm.get(space)
    inputs = [path] if path is not None else [ses.get("t1w"), xfm, ses.get("t1w_mask")]
    cache: dict = {}

    def images():
        if not cache:
            if path is not None:
                moving, aff = load(path)
                found = R.reference_on(space, nib.as_closest_canonical(nib.load(str(path))))
                if found is None:
                    raise RuntimeError(f"no {space} template on disk to compare with")
                cache.update(moving=moving, aff=aff, ref=found[0], what=found[1])
            else:
                found = R.warp_to_template(ses.get("t1w"), xfm, space, ses.get("t1w_mask"))
                if found is None:
                    raise RuntimeError(f"no {space} template on disk to warp onto")
                cache.update(moving=found[0], aff=found[1], ref=found[2], what=found[3])
            from scipy import ndimage as ndi

            ref = cache["ref"]
            brain = ref > 0.15 * ref.max() if ref.max() > 0 else ref > 0
            cache["outline"] = [(ndi.binary_fill_holes(ndi.binary_closing(brain, iterations=2)),
                                 F.COLORS["edges"], "template")]
            cache["slices"] = F.pick_slices(ref.shape, cache["outline"][0][0])
        return cache

    def layer(key):
        def render():
            c = images()
            return F.mosaic(c[key], c["aff"], slices=c["slices"], contours=c["outline"])
        return render

    stem = f"{ses.prefix}_space-{space}_desc-"
    return maker.flicker(
        (stem + "reg_T1w.svg", stem + "regtemplate_T1w.svg"), inputs, (layer("moving"), layer("ref")),
        (f"T1w in {space}", f"{space} template"),
        f"Spatial normalisation of the T1w image to {space}: hover over the figure to alternate the "
        "normalised T1w and the template (red: template brain outline).",
        f"T1w to {space} registration")


# ---------------------------------------------------------------- diffusion
def diffusion_section(subj: SubjectDerivatives, maker: FigureMaker) -> list[dict]:
    items: list[dict] = []
    sessions = [s for s in subj.sessions if s.get("b0") or s.get("dwi_preproc") or s.get("fa")]
    if not sessions:
        return [note("Not available: no preprocessed diffusion derivatives "
                     "(dwi/*_space-dwi_desc-preproc_dwi.nii.gz, *_desc-b0_dwiref.nii.gz) found.")]
    for ses in sessions:
        items.append(heading(ses.title))
        b0 = load(ses.get("b0"))
        if b0 is None and ses.get("dwi_preproc") is not None:
            b0 = load(ses.get("dwi_preproc"))  # volume 0 is a b0 in BIDS order
            ses.files.setdefault("b0", ses.get("dwi_preproc"))
        mask = load(ses.get("dwi_mask"))
        mask_arr = mask[0] > 0.5 if mask is not None and b0 is not None and _same_grid(b0[0], mask[0]) else None
        sl = F.pick_slices(b0[0].shape, mask_arr) if b0 is not None else None
        contour = [(mask_arr, F.COLORS["brain"], "brain")] if mask_arr is not None else []
        # susceptibility distortion correction
        before, before_src, what = load(ses.get("b0_uncorrected")), ses.get("b0_uncorrected"), "the b0 reference"
        if before is None and b0 is not None and ses.get("fieldmap") is not None:
            raw = _raw_b0(ses, subj.bids_dir, b0)
            if raw is not None:
                before, before_src = raw[:2], raw[2]
                what = f"the first b0 volume of the raw series ({raw[2].name})"
        if b0 is not None and before is not None and _same_grid(b0[0], before[0]):
            win_after = F.robust_range(b0[0], mask_arr)
            win_before = F.robust_range(before[0], mask_arr)
            items.append(maker.flicker(
                (f"{ses.prefix}_desc-sdcbefore_dwi.svg", f"{ses.prefix}_desc-sdc_dwi.svg"),
                [ses.get("b0"), before_src, ses.get("dwi_mask")],
                (lambda: F.mosaic(before[0], before[1], slices=sl, contours=contour, window=win_before),
                 lambda: F.mosaic(b0[0], b0[1], slices=sl, contours=contour, window=win_after)),
                ("before correction", "after correction"),
                f"Susceptibility distortion correction: hover to alternate {what} before correction and the "
                "corrected b0 reference (red: brain mask of the corrected data).", "b0 before/after SDC"))
        elif b0 is not None and ses.get("fieldmap") is None and ses.get("dwi_preproc") is not None:
            items.append(note("Not available: b0 before/after susceptibility correction — no correction was "
                              "applied (no estimated field; see the warnings in the Summary)."))
        else:
            items.append(missing(ses, "b0 before/after susceptibility correction", "b0_uncorrected", "b0"))
        field = load(ses.get("fieldmap"))
        if field is not None and b0 is not None and _same_grid(b0[0], field[0]):
            lim = float(np.percentile(np.abs(field[0]), 99.5)) or 1.0
            items.append(maker.figure(
                f"{ses.prefix}_desc-fieldmap_dwi.svg", [ses.get("fieldmap")],
                lambda: F.mosaic(field[0], field[1], slices=sl, cmap="RdBu_r", window=(-lim, lim),
                                 contours=contour),
                f"Estimated susceptibility field (blue to red: −{lim:.3g} to +{lim:.3g}, "
                f"{read_json(sidecar_of(ses.get('fieldmap'))).get('Units', 'Hz')}).", "Susceptibility field"))
        # motion
        motion = ses.get("motion")
        if motion is not None:
            rows = read_tsv(motion)
            cols = {k: [to_float(r.get(k)) for r in rows] for k in (rows[0] if rows else {})}
            fd = np.asarray(cols.get("framewise_displacement", []), float)
            stats = (f" Mean FD {np.nanmean(fd):.3f} mm, maximum {np.nanmax(fd):.3f} mm over {fd.size} volumes."
                     if fd.size and np.isfinite(fd).any() else "")
            items.append(maker.figure(
                f"{ses.prefix}_desc-motion_dwi.svg", [motion], lambda: F.motion_figure(cols),
                "Head motion per volume: translations, rotations and framewise displacement (FD)." + stats,
                "Motion parameters and framewise displacement"))
        else:
            items.append(missing(ses, "motion and framewise displacement", "motion"))
        if b0 is None:
            items.append(missing(ses, "b0 reference figures", "b0"))
        elif mask_arr is not None:
            items.append(maker.figure(
                f"{ses.prefix}_desc-brain_dwiref.svg", [ses.get("b0"), ses.get("dwi_mask")],
                lambda: F.mosaic(b0[0], b0[1], slices=sl, contours=contour),
                "Brain mask (red contour) on the b0 reference.", "Brain mask on b0"))
        else:
            items.append(missing(ses, "brain mask on b0", "dwi_mask"))
        for key, label in (("fa", "Fractional anisotropy (FA)"), ("md", "Mean diffusivity (MD)")):
            img = load(ses.get(key))
            if img is None:
                items.append(missing(ses, label, key))
                continue
            window = (0.0, 1.0) if key == "fa" else (0.0, F.robust_range(img[0], high=99.0)[1])
            slz = {"z": F.pick_slices(img[0].shape, mask_arr if mask_arr is not None and _same_grid(
                img[0], mask_arr) else img[0] != 0, 8, ("z",))["z"]}
            items.append(maker.figure(
                f"{ses.prefix}_model-tensor_param-{key}_dwimap.svg", [ses.get(key)],
                lambda img=img, slz=slz, window=window: F.mosaic(img[0], img[1], slices=slz, window=window),
                f"{label} map of the tensor fit, axial slices.", label))
        items.append(_dwi_registration(ses, b0, sl, maker))
    return items


def _raw_b0(ses: SessionDerivatives, bids_dir: Path | None, b0) -> tuple | None:
    """(RAS data, affine, path) of the first b0 of the raw dwi named in the sidecar's Sources.

    The raw series is read from the input dataset (never written); it is resampled onto the
    corrected grid when the grids differ.  None when it cannot be found.
    """
    import nibabel as nib

    if bids_dir is None:
        return None
    sources = ses.sidecar("dwi_preproc").get("Sources", [])
    raw = next((Path(bids_dir) / s[len("bids:raw:"):] for s in sources if isinstance(s, str)
                and s.startswith("bids:raw:") and s.endswith(("_dwi.nii.gz", "_dwi.nii"))), None)
    if raw is None or not raw.is_file():
        return None
    img = nib.load(str(raw))
    index = 0
    bval = raw.with_name(raw.name.split(".")[0] + ".bval")
    if bval.is_file():
        try:
            index = int(np.argmin(np.loadtxt(bval, ndmin=1)))
        except ValueError:
            index = 0
    vol = img.slicer[..., index] if len(img.shape) == 4 else img
    target = nib.Nifti1Image(b0[0], b0[1])
    vol = nib.as_closest_canonical(vol)
    if vol.shape != target.shape or not np.allclose(vol.affine, target.affine, atol=1e-3):
        from nilearn.image import resample_to_img

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vol = resample_to_img(vol, target, interpolation="continuous", force_resample=True, copy_header=True)
    data, affine = F.to_canonical(vol)
    return data, affine, raw


def _dwi_registration(ses: SessionDerivatives, b0, sl, maker: FigureMaker) -> dict:
    if b0 is None:
        return missing(ses, "T1w ↔ dwi registration", "b0")
    seg = load(ses.get("dwi_dseg"))
    contours = _tissue_contours(np.rint(seg[0]).astype(int)) if seg is not None and _same_grid(b0[0], seg[0]) else []
    wm = [c for c in contours if c[2] == "WM"]
    t1 = load(ses.get("t1w_dwi"))
    label = "T1w in dwi space"
    if (t1 is None or not _same_grid(b0[0], t1[0])) and contours:
        # no T1w resampled into dwi space: a T1-like contrast from the mapped tissue classes
        seg_i = np.rint(seg[0]).astype(int)
        t1 = (np.select([seg_i == 1, seg_i == 2, seg_i == 3], [0.25, 0.6, 1.0], 0.0), b0[1])
        label = "T1w tissue classes in dwi space"
    if t1 is not None and _same_grid(b0[0], t1[0]):
        return maker.flicker(
            (f"{ses.prefix}_space-dwi_desc-reg_dwiref.svg", f"{ses.prefix}_space-dwi_desc-reg_T1w.svg"),
            [ses.get("b0"), ses.get("t1w_dwi"), ses.get("dwi_dseg")],
            (lambda: F.mosaic(b0[0], b0[1], slices=sl, contours=wm),
             lambda: F.mosaic(t1[0], t1[1], slices=sl, contours=wm)),
            ("b0 reference", label),
            "Registration of the T1w image to diffusion space: hover to alternate the b0 reference and the "
            + ("T1w resampled into dwi space" if label == "T1w in dwi space" else
               "T1w tissue classes (CSF dark, GM grey, WM bright) mapped into dwi space")
            + (" (magenta: white-matter boundary from the T1w segmentation)." if wm else "."),
            "T1w to dwi registration")
    if contours:
        return maker.figure(
            f"{ses.prefix}_space-dwi_desc-seg_dwiref.svg", [ses.get("b0"), ses.get("dwi_dseg")],
            lambda: F.mosaic(b0[0], b0[1], slices=sl, contours=contours),
            "T1w segmentation mapped into diffusion space, on the b0 reference (registration check). " + LEGEND,
            "Segmentation in dwi space on b0")
    return missing(ses, "T1w ↔ dwi registration", "t1w_dwi", "dwi_dseg")


# ---------------------------------------------------------------- anomaly
def anomaly_section(subj: SubjectDerivatives, maker: FigureMaker) -> list[dict]:
    from bids_uad.reports.metrics import anomaly_metrics

    items: list[dict] = []
    sessions = [s for s in subj.sessions if s.anomaly]
    if not sessions:
        return [note("Not available: no anomaly maps (dwi/*_space-dwi_model-<name>_stat-score_anomaly.nii.gz); "
                     "run the participant level with --model to make them.")]
    for ses in sessions:
        for model, files in sorted(ses.anomaly.items()):
            items.append(heading(f"{ses.title} — model {model}"))
            score_path = files.get("score")
            score = load(score_path)
            if score is None:
                items.append(note(f"Not available: score map of model {model} (only {', '.join(files)} found)."))
                continue
            meta = read_json(sidecar_of(score_path)) or read_json(sidecar_of(files.get("mask")))
            binary = load(files.get("mask"))
            binary = binary[0] > 0.5 if binary is not None and _same_grid(score[0], binary[0]) else None
            truth = load(ses.get("truth"))
            truth = truth[0] > 0.5 if truth is not None and _same_grid(score[0], truth[0]) else None
            amask = load(ses.get("analysis_mask")) or load(ses.get("dwi_mask"))
            amask = amask[0] > 0.5 if amask is not None and _same_grid(score[0], amask[0]) else score[0] != 0
            bg_key = next((k for k in ("md", "fa", "b0") if ses.get(k)), None)
            bg = load(ses.get(bg_key)) if bg_key else None
            if bg is None or not _same_grid(bg[0], score[0]):
                # no map to show underneath: the analysis mask in dark grey, scores in colour
                bg, bg_key = ((amask * 0.35).astype(np.float32), score[1]), "score"
            threshold = to_float(meta_value(meta, "Threshold", "threshold"))
            method = str(meta_value(meta, "ThresholdMethod", "threshold_method", default="threshold"))
            values = score[0][amask]
            lo = threshold if np.isfinite(threshold) else float(np.percentile(values, 95)) if values.size else 0.0
            hi = float(np.percentile(values, 99.9)) if values.size else lo + 1
            hi = hi if hi > lo else lo + 1e-6
            contours = []
            if binary is not None:
                contours.append((binary, F.COLORS["anomaly"], "anomaly mask"))
            if truth is not None:
                contours.append((truth, F.COLORS["truth"], "ground truth"))
            focus = binary if binary is not None and binary.any() else amask
            sl = F.pick_slices(score[0].shape, focus, 7, ("y", "z"))
            items.append(maker.figure(
                f"{ses.prefix}_space-dwi_model-{model}_stat-score_anomaly.svg",
                [score_path, files.get("mask"), ses.get(bg_key) if bg_key != "score" else None, ses.get("truth")],
                lambda: F.mosaic(bg[0], bg[1], overlay=score[0] * amask, overlay_range=(lo, hi), slices=sl,
                                 contours=contours, window=(0.0, 1.0) if bg_key == "score" else
                                 (0.0, F.robust_range(bg[0], high=99.0)[1])),
                f"Anomaly score of model {model} (hot colours, shown from {lo:.3g} to {hi:.3g}) on "
                f"{bg_key.upper() if bg_key != 'score' else 'the analysis mask (grey)'}; cyan: anomaly mask"
                + ("; yellow: ground-truth lesion." if truth is not None else "."),
                f"Anomaly score map of {model}"))
            thresholds = {method: threshold} if np.isfinite(threshold) else {}
            tvals = truth[amask] if truth is not None else None
            items.append(maker.figure(
                f"{ses.prefix}_space-dwi_model-{model}_desc-histogram_anomaly.svg", [score_path, ses.get("truth")],
                lambda: F.histogram_figure(values, thresholds, f"{model}: scores in the analysis mask", tvals),
                f"Distribution of the anomaly scores of {model} inside the analysis mask"
                + (f"; dashed line: {method} threshold {threshold:.4g}." if thresholds else
                   "; no threshold recorded in the sidecar."), f"Histogram of {model} scores", wide=False))
            rows = anomaly_metrics(score[0], binary, truth, amask, bg[1], meta)
            items.append(kv(rows))
    return items


# ---------------------------------------------------------------- longitudinal, errors
#: key columns of the longitudinal stats table (bids_uad.interfaces.longitudinal), with labels
LONGITUDINAL_COLUMNS = (
    ("followup_session", "follow-up"), ("model", "model"), ("baseline_anomaly_ml", "anomaly (mL)"),
    ("baseline_lesion_ml", "baseline lesion (mL)"), ("followup_lesion_ml", "follow-up lesion (mL)"),
    ("mismatch_ml", "mismatch (mL)"), ("mismatch_growth_ml", "mismatch → lesion (mL)"),
    ("overlap_fraction", "overlap"), ("overlap_fraction_random_mean", "random overlap"),
    ("overlap_fraction_random_p", "p (one-sided)"))


def _longitudinal_table(path: Path) -> list[dict]:
    rows = read_tsv(path)
    cols = list(rows[0]) if rows else []
    items: list[dict] = []
    if any("estimate" in (r.get("baseline_lesion_source", ""), r.get("followup_lesion_source", "")) for r in rows):
        items.append(warning("Lesion masks are estimates (FLAIR hyperintensity, not a manual segmentation): "
                             "volumes and overlaps are approximate."))
    key = [(c, label) for c, label in LONGITUDINAL_COLUMNS if c in cols]
    if len(key) >= 4:
        def fmt(v: str) -> str:
            f = to_float(v)
            return f"{f:.3g}" if np.isfinite(f) and v.strip() not in ("",) and not v.isalpha() else v
        items.append(table([label for _, label in key], [[fmt(r.get(c, "")) for c, _ in key] for r in rows],
                           caption="Baseline anomalies against the lesion at follow-up"))
        items.append(text("Mismatch: anomalous at baseline, outside the baseline lesion. Overlap: the part of "
                          "the mismatch that is lesion at follow-up, against randomly placed regions of the "
                          "same size in the analysis mask (baseline lesion excluded)."))
    full = table(cols, [[r.get(c, "") for c in cols] for r in rows], caption=f"{path.name}: all columns")
    full["collapsed"] = bool(key) or len(cols) > 10
    items.append(full)
    return items


def longitudinal_section(subj: SubjectDerivatives, maker: FigureMaker) -> list[dict]:
    """Tables and figures the longitudinal stage wrote (``*desc-longitudinal*``), shown natively.

    HTML fragments written by other stages are not embedded: everything goes through the
    escaping templates.
    """
    from bids_uad.reports.collect import parse_name

    if not subj.longitudinal:
        n = len([s for s in subj.sessions if s.session])
        why = ("fewer than two sessions" if n < 2 else "no longitudinal outputs (*desc-longitudinal*) found")
        return [note(f"Not available: {why}.")]
    items: list[dict] = []
    for path in subj.longitudinal:
        if path.suffix == ".tsv":
            items.extend(_longitudinal_table(path))
            continue
        meta = read_json(path.with_suffix(".json"))
        entities = (parse_name(path.name) or ({}, "", ""))[0]
        follow = entities.get("desc", "")[len("longitudinal"):]
        follow = follow[:1].lower() + follow[1:]
        default = ("Longitudinal comparison" + (f", model {entities['model']}" if "model" in entities else "")
                   + (f", follow-up session {follow}" if follow else "") + ".")
        items.append({"type": "figure", "src": maker.rel(path), "alt": "Longitudinal comparison", "wide": True,
                      "caption": str(meta.get("Caption") or meta.get("Description") or default)})
    return items


def errors_section(subj: SubjectDerivatives, figure_errors: list[str]) -> list[dict]:
    items: list[dict] = []
    for path in subj.crashes:
        try:
            body = path.read_text(errors="replace")
        except OSError as exc:
            body = f"(unreadable: {exc})"
        node = next((ln.split(":", 1)[1].strip() for ln in body.splitlines() if ln.lower().startswith("node:")), "")
        items.append(pre(f"{path.parent.name}/{path.name}" + (f" — node {node}" if node else ""), body[-20000:]))
    if figure_errors:
        items.append(pre("Report figures that could not be made", "\n".join(figure_errors), True))
    if not items:
        items.append(text("No errors to report: no crash files for this subject in logs/crash-*/."))
    return items


SECTION_BUILDERS: dict[str, Callable] = {
    "anatomical": anatomical_section, "diffusion": diffusion_section,
    "anomaly": anomaly_section, "longitudinal": longitudinal_section,
}
