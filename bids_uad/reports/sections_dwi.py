"""Diffusion section: SDC, field, motion, mask, tensor maps, T1w-to-dwi registration."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from bids_uad.bids.derivatives import read_tsv
from bids_uad.bids.layout import sidecar_of
from bids_uad.reports import figures as F
from bids_uad.reports.collect import SessionDerivatives, SubjectDerivatives, read_json, to_float
from bids_uad.reports.common import LEGEND, load, missing, same_grid, tissue_contours
from bids_uad.reports.reportlets import FigureMaker, heading, note


def _rpe_movement_text(field_meta: dict) -> str:
    """Caption sentence: the reverse-PE b0's head movement relative to the dwi b0 (SDC sidecar)."""
    moves = (field_meta.get("SDCSettings") or {}).get("movement") or []
    parts = []
    for mv in moves:
        try:
            trans = ", ".join(f"{float(mv[k]):+.2f}" for k in ("trans_x", "trans_y", "trans_z"))
            rot = ", ".join(f"{float(v):+.2f}" for v in mv["rot_deg"])
        except (KeyError, TypeError, ValueError):
            continue
        fixed = f"; {', '.join(mv['not_estimated'])} not estimated (confounded with the field's mean)" \
            if mv.get("not_estimated") else ""
        parts.append(f"translation ({trans}) mm, rotation ({rot}) deg{fixed}")
    if not parts:
        return ""
    return (" Head movement of the reverse phase-encoding b0 relative to the dwi b0, estimated with the field: "
            + "; ".join(parts) + ".")


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
        mask_arr = mask[0] > 0.5 if mask is not None and b0 is not None and same_grid(b0[0], mask[0]) else None
        sl = F.pick_slices(b0[0].shape, mask_arr) if b0 is not None else None
        contour = [(mask_arr, F.COLORS["brain"], "brain")] if mask_arr is not None else []
        # a combination of opposite-PE runs has no field or motion table of its own (its runs have)
        combined = list(ses.sidecar("dwi_preproc").get("CombinedRuns") or [])
        # susceptibility distortion correction
        before, before_src, what = load(ses.get("b0_uncorrected")), ses.get("b0_uncorrected"), "the b0 reference"
        if before is None and b0 is not None and ses.get("fieldmap") is not None:
            raw = _raw_b0(ses, subj.bids_dir, b0)
            if raw is not None:
                before, before_src = raw[:2], raw[2]
                what = f"the first b0 volume of the raw series ({raw[2].name})"
        if b0 is not None and before is not None and same_grid(b0[0], before[0]):
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
        elif combined:
            items.append(note(f"This series combines the corrected runs {' and '.join(combined)}: their "
                              "susceptibility correction, field and head motion are shown with each run below."))
        elif b0 is not None and ses.get("fieldmap") is None and ses.get("dwi_preproc") is not None:
            items.append(note("Not available: b0 before/after susceptibility correction — no correction was "
                              "applied (no estimated field; see the warnings in the Summary)."))
        else:
            items.append(missing(ses, "b0 before/after susceptibility correction", "b0_uncorrected", "b0"))
        field = load(ses.get("fieldmap"))
        if field is not None and b0 is not None and same_grid(b0[0], field[0]):
            lim = float(np.percentile(np.abs(field[0]), 99.5)) or 1.0
            items.append(maker.figure(
                f"{ses.prefix}_desc-fieldmap_dwi.svg", [ses.get("fieldmap")],
                lambda: F.mosaic(field[0], field[1], slices=sl, cmap="RdBu_r", window=(-lim, lim),
                                 contours=contour),
                f"Estimated susceptibility field (blue to red: −{lim:.3g} to +{lim:.3g}, "
                f"{read_json(sidecar_of(ses.get('fieldmap'))).get('Units', 'Hz')})."
                + _rpe_movement_text(read_json(sidecar_of(ses.get("fieldmap")))), "Susceptibility field"))
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
        elif not combined:
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
            slz = {"z": F.pick_slices(img[0].shape, mask_arr if mask_arr is not None and same_grid(
                img[0], mask_arr) else img[0] != 0, 8, ("z",))["z"]}
            items.append(maker.figure(
                f"{ses.prefix}_model-tensor_param-{key}_dwimap.svg", [ses.get(key)],
                lambda img=img, slz=slz, window=window: F.mosaic(img[0], img[1], slices=slz, window=window),
                f"{label} map of the tensor fit, axial slices.", label))
        colour = _colour_fa(ses, maker)
        if colour is not None:
            items.append(colour)
        items.append(_dwi_registration(ses, b0, sl, maker))
        template_fig = _fa_template_registration(ses, maker)
        if template_fig is not None:
            items.append(template_fig)
    return items


def _colour_fa(ses: SessionDerivatives, maker: FigureMaker) -> dict | None:
    """Direction-coloured FA from the preprocessed series (a tensor fit in the brain mask): the
    check that the b-vectors are right.  None when the series or its gradients are missing."""
    dwi = ses.get("dwi_preproc")
    if dwi is None:
        return None
    stem = str(dwi).replace(".nii.gz", "")
    bval, bvec = Path(stem + ".bval"), Path(stem + ".bvec")
    mask_path = ses.get("dwi_mask")
    if not (bval.is_file() and bvec.is_file()):
        return None

    def render():
        import nibabel as nib

        from bids_uad.algorithms.tensor import direction_coloured_fa
        from bids_uad.bids.gradients import load_gradients

        img = nib.load(str(dwi))
        gt = load_gradients(bval, bvec, n_volumes=img.shape[3], image_path=dwi)
        mask = (np.asarray(nib.load(str(mask_path)).dataobj) > 0 if mask_path is not None
                else np.ones(img.shape[:3], bool))
        # the axial slices shown are chosen first, and the tensor is fitted on them only
        # (a whole paper-geometry series took 2.4 s of the report's 7)
        shown, slz = F.canonical_slices_in_grid(mask, img.affine, 8, "z")
        rgb = direction_coloured_fa(np.asarray(img.dataobj, np.float32), gt.bvals, gt.bvecs, img.affine,
                                    mask & shown)
        canonical = nib.as_closest_canonical(nib.Nifti1Image(rgb, img.affine))
        return F.mosaic(np.asarray(canonical.dataobj, np.float32), canonical.affine, slices=slz, window=(0.0, 0.7))

    return maker.figure(
        f"{ses.prefix}_model-tensor_param-colourfa_dwimap.svg", [dwi, bval, bvec, mask_path], render,
        "FA coloured by the direction of the tensor's principal eigenvector (red left-right, green "
        "anterior-posterior, blue inferior-superior), from the preprocessed series and its rotated b-vectors: "
        "the corpus callosum should be red, the corticospinal tracts blue, the cingulum green; other colours "
        "there mean a flipped or permuted .bvec.", "Direction-coloured FA")


def _fa_template_registration(ses: SessionDerivatives, maker: FigureMaker) -> dict | None:
    """dwi-only sessions: the FA registered to the template, with the template's white matter
    (from its FA-like target) as contours; None when the session has no such registration."""
    fa_path = ses.get("fa")
    if fa_path is None:
        return None
    stem = fa_path.name.split("_space-")[0]
    found = [p for p in sorted(fa_path.parent.glob(f"{stem}_space-*_model-tensor_param-fa_dwimap.nii.gz"))
             if "_space-dwi_" not in p.name]
    if not found:
        return None
    from bids_uad.algorithms.templates import fa_like_template, find_template

    warped = load(found[0])
    target, _ = fa_like_template(find_template())
    target = F.to_canonical(target)
    if warped is None or not same_grid(warped[0], target[0]):
        return None
    wm = target[0] > 0.3
    meta = read_json(sidecar_of(found[0]))
    quality = (meta.get("TemplateRegistrationQuality") or {}).get("FACorrelationWithTemplate")
    slices = F.pick_slices(warped[0].shape, wm)
    return maker.figure(
        f"{ses.prefix}_space-template_desc-fareg_dwimap.svg", [found[0]],
        lambda: F.mosaic(warped[0], warped[1], slices=slices, window=(0.0, 1.0),
                         contours=[(wm, F.COLORS["WM"], "template WM")]),
        f"No T1w: FA registered to the {meta.get('Template', 'template')} template through an FA-like target "
        f"(affine + SyN, mutual information); magenta: the template's white matter"
        + (f"; correlation with the target {quality:.2f}." if isinstance(quality, (int, float)) else "."),
        "FA to template registration")


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
    contours = tissue_contours(np.rint(seg[0]).astype(int)) if seg is not None and same_grid(b0[0], seg[0]) else []
    wm = [c for c in contours if c[2] == "WM"]
    from_dwi = ses.sidecar("dwi_dseg").get("TissueClasses")
    if from_dwi and contours:  # no T1w: the classes come from FA/MD, there is no registration to check
        fa = load(ses.get("fa"))
        background = fa if fa is not None and same_grid(b0[0], fa[0]) else b0
        return maker.figure(
            f"{ses.prefix}_space-dwi_desc-dwiseg_dwiref.svg", [ses.get("b0"), ses.get("fa"), ses.get("dwi_dseg")],
            lambda: F.mosaic(background[0], background[1], slices=sl, contours=contours),
            f"No T1w: {from_dwi}; the classes on the {'FA map' if background is fa else 'b0 reference'}. " + LEGEND,
            "Tissue classes from the diffusion data")
    t1 = load(ses.get("t1w_dwi"))
    label = "T1w in dwi space"
    if (t1 is None or not same_grid(b0[0], t1[0])) and contours:
        # no T1w resampled into dwi space: a T1-like contrast from the mapped tissue classes
        seg_i = np.rint(seg[0]).astype(int)
        t1 = (np.select([seg_i == 1, seg_i == 2, seg_i == 3], [0.25, 0.6, 1.0], 0.0), b0[1])
        label = "T1w tissue classes in dwi space"
    if t1 is not None and same_grid(b0[0], t1[0]):
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
