"""Anatomical section: brain mask, tissue classes, T1w-to-template registration."""
from __future__ import annotations

import numpy as np

from bids_uad.reports import figures as F
from bids_uad.reports.collect import SessionDerivatives, SubjectDerivatives
from bids_uad.reports.common import LEGEND, load, missing, same_grid, tissue_contours
from bids_uad.reports.reportlets import FigureMaker, heading, note


def anatomical_section(subj: SubjectDerivatives, maker: FigureMaker) -> list[dict]:
    items: list[dict] = []
    sessions = [s for s in subj.sessions if s.get("t1w") or s.template_t1w]
    if not sessions:
        return [note("Not available: no preprocessed T1w (anat/*_desc-preproc_T1w.nii.gz) in the derivatives.")]
    for ses in sessions:
        items.append(heading(ses.session_title))
        t1 = load(ses.get("t1w"))
        if t1 is None:
            items.append(missing(ses, "T1w figures", "t1w"))
        else:
            data, aff = t1
            mask = load(ses.get("t1w_mask"))
            if mask is not None and same_grid(data, mask[0]):
                sl = F.pick_slices(data.shape, mask[0])
                items.append(maker.figure(
                    f"{ses.session_prefix}_desc-brain_T1w.svg", [ses.get("t1w"), ses.get("t1w_mask")],
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
            if seg is not None and same_grid(data, seg[0]):
                labels = np.rint(seg[0]).astype(int)
                sl = F.pick_slices(data.shape, labels > 0)
                items.append(maker.figure(
                    f"{ses.session_prefix}_desc-seg_T1w.svg", inputs,
                    lambda: F.mosaic(data, aff, contours=tissue_contours(labels), slices=sl),
                    "Tissue segmentation of the T1w image. " + LEGEND, "Tissue segmentation on T1w"))
            else:
                items.append(missing(ses, "tissue segmentation", "t1w_dseg"))
        spaces = sorted(set(ses.template_t1w) | (set(ses.template_xfm) if ses.get("t1w") else set()))
        if not spaces:
            items.append(note("Not available: T1w ↔ template registration — neither anat/"
                              f"{ses.session_prefix}_space-<template>_desc-brain_T1w.nii.gz nor anat/"
                              f"{ses.session_prefix}_from-T1w_to-<template>_mode-image_xfm.h5 in the derivatives."))
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

    stem = f"{ses.session_prefix}_space-{space}_desc-"
    return maker.flicker(
        (stem + "reg_T1w.svg", stem + "regtemplate_T1w.svg"), inputs, (layer("moving"), layer("ref")),
        (f"T1w in {space}", f"{space} template"),
        f"Spatial normalisation of the T1w image to {space}: hover over the figure to alternate the "
        "normalised T1w and the template (red: template brain outline).",
        f"T1w to {space} registration")
