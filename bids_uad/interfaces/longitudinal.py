"""Nipype interfaces of the longitudinal comparison (files in → algorithms → files out).

* :class:`SessionDerivatives` — finds one session's derivatives in ``OUTPUT_DIR`` (and its
  lesion mask in ``--lesion-masks``) at run time; a missing file is a clear
  :class:`~bids_uad.errors.InputMissingError`, never a silent skip.
* :class:`SessionLesionMask` — the given lesion mask, or a FLAIR-hyperintensity *estimate*,
  in the session's T1w space (and, for the baseline, in its dwi space).
* :class:`FollowupToBaseline` — follow-up T1w → baseline T1w (rigid, then SyN with both
  lesions excluded from the metric), everything of the follow-up carried into baseline dwi
  space in one resampling (composed with the baseline T1w→dwi transform).
* :class:`LongitudinalCompare` — per model: mismatch, volumes, overlap, random-region null,
  score change, the side-by-side figure; lists of files + entities for the sink.
* :class:`LongitudinalTables` — the per-subject TSV and the group TSV (rebuilt from every
  subject's TSV under a file lock, written atomically: :mod:`bids_uad.bids.longitudinal`).

The registration is :func:`bids_uad.algorithms.registration.register_followup`, the figure
:func:`bids_uad.reports.figures.plot_longitudinal`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import BaseInterfaceInputSpec, SimpleInterface, TraitedSpec, traits

from bids_uad.algorithms.registration import set_itk_threads
from bids_uad.bids import outputs
from bids_uad.errors import InputMissingError, InputValidationError
from bids_uad.interfaces.workfiles import work_nifti

LOGGER = logging.getLogger("bids_uad.longitudinal")

#: ``desc-`` of lesion masks made here: given masks vs the FLAIR-hyperintensity estimate
GIVEN_DESC = "lesion"
ESTIMATE_DESC = "flairhyperEstimate"
#: ``space-`` label of follow-up images resampled onto the baseline's dwi / T1w grid
BASELINE_DWI_SPACE = "dwibaseline"
BASELINE_T1W_SPACE = "T1wbaseline"


def _given(value) -> bool:
    return value is not None and value is not traits.Undefined and str(value) != ""


def _load_bool(path: str) -> np.ndarray:
    data = np.asarray(nib.load(path).dataobj)
    if data.ndim > 3:
        data = data[..., 0]
    return data > 0


def _load_float(path: str) -> np.ndarray:
    data = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    if data.ndim > 3:
        data = data[..., 0]
    return data


def _save(array: np.ndarray, like: nib.Nifti1Image, path: Path, dtype) -> str:
    img = nib.Nifti1Image(np.asarray(array).astype(dtype), like.affine)
    img.set_qform(like.affine, code=1)
    img.set_sform(like.affine, code=1)
    nib.save(img, str(path))
    return str(path)



# ============================================================================ finding inputs

def _one(found: list[Path], what: str, required: bool, where: Path) -> str:
    if found:
        return str(found[0])
    if required:
        raise InputMissingError(
            f"longitudinal comparison needs the {what}, not found; run the participant "
            "level (preprocessing, and --model for anomaly maps) on this session first", where)
    return ""


def session_derivatives(output_dir: str | Path, subject: str, session: str, *,
                        lesion_dir: str | Path | None = None, require_dwi: bool = False,
                        models: list[str] | tuple[str, ...] = (), require_anomaly: bool = False,
                        ) -> dict:
    """The files of one session the comparison reads, found in ``output_dir`` through the
    outputs table (:mod:`bids_uad.bids.outputs`).

    Returns a dict of paths ('' when absent and optional): ``t1w``, ``brain_mask``,
    ``flair`` (T1w space), ``csf`` (CSF probseg), ``t1w2dwi``/``dwi2t1w`` (composite .h5),
    ``analysis_mask`` (dwi), ``models`` and per model ``anomaly_masks``/``anomaly_scores``/``findings``
    (the finding label images; '' when absent),
    ``lesion``/``lesion_space`` from ``lesion_dir``.  The dwi files are those of the dwi run
    the T1w was registered to (the run with an analysis mask).  Raises
    :class:`InputMissingError` naming the missing derivative.  ``models=()`` means every model
    found for this session.
    """
    from bids_uad.bids.derivatives import validate_label
    from bids_uad.bids.lesions import find_lesion_mask
    from bids_uad.bids.preprocessed import find_preprocessed_dwi

    subject = validate_label(subject, "sub")
    session = validate_label(session, "ses")
    root = Path(output_dir) / f"sub-{subject}" / f"ses-{session}"
    anat, dwi = root / "anat", root / "dwi"

    def first(key: str, **params) -> list[Path]:
        return outputs.find(output_dir, key, subject, session, **params)

    registered = find_preprocessed_dwi(output_dir, subject, session)
    run = outputs.run_entities(registered.dwi.name) if registered is not None else None

    def of_run(key: str, **params) -> list[Path]:
        if run is None:  # no preprocessed dwi: whatever this session holds
            return first(key, **params)
        return outputs.find_run(output_dir, key, subject, session, run, **params)

    out = {
        "subject": subject, "session": session,
        "t1w": _one(first("t1w_preproc"), "preprocessed T1w", True, anat),
        "brain_mask": _one(first("t1w_mask"), "T1w brain mask", True, anat),
        "flair": _one(first("flair_t1w"), "FLAIR in T1w space", False, anat),
        "csf": _one(first("t1w_csf"), "CSF probability map", False, anat),
        "t1w2dwi": _one(of_run("xfm_t1w_to_dwi"), "T1w→dwi transform", require_dwi, anat),
        "dwi2t1w": _one(of_run("xfm_dwi_to_t1w"), "dwi→T1w transform", False, anat),
        "analysis_mask": _one(of_run("analysis_mask"), "analysis mask in dwi space", require_dwi, dwi),
    }
    if require_dwi and not out["analysis_mask"]:
        raise InputMissingError("no analysis mask in dwi space", dwi)
    found = sorted({outputs.parse_name(p.name)[0]["model"] for p in of_run("anomaly_mask")})
    names = list(models) if models else found
    if require_anomaly and not names:
        raise InputMissingError(
            f"no anomaly maps ({outputs.name_for('anomaly_mask', {'sub': subject, 'ses': session}, model='NAME')}"
            ", with the dwi run's entities) for the baseline session; run the participant level with --model first",
            dwi)
    masks, scores, findings = [], [], []
    for name in names:
        mask, score = of_run("anomaly_mask", model=name), of_run("anomaly_score", model=name)
        labels = of_run("findings_dseg", model=name)
        findings.append(str(labels[0]) if labels else "")
        if require_anomaly and not (mask and score):
            raise InputMissingError(f"anomaly maps of model {name!r} missing for sub-{subject} "
                                    f"ses-{session}; run the participant level with --model", dwi)
        masks.append(str(mask[0]) if mask else "")
        scores.append(str(score[0]) if score else "")
    out.update(models=names, anomaly_masks=masks, anomaly_scores=scores, findings=findings)
    lesion, space = "", ""
    if lesion_dir:
        for candidate in ("T1w", "dwi"):
            found_mask = find_lesion_mask(lesion_dir, subject, session, space=candidate)
            if found_mask is not None:
                lesion, space = str(found_mask), candidate
                break
        if lesion and space == "dwi" and not out["dwi2t1w"]:
            raise InputMissingError("lesion mask given in dwi space but the dwi→T1w transform of "
                                    "this session is missing", lesion)
    out.update(lesion=lesion, lesion_space=space)
    return out


class _SessionDerivativesInputSpec(BaseInterfaceInputSpec):
    output_dir = traits.Str(mandatory=True)
    lesion_dir = traits.Str("", usedefault=True, desc="--lesion-masks folder ('' = none)")
    subject = traits.Str(mandatory=True)
    session = traits.Str(mandatory=True)
    models = traits.List(traits.Str, desc="model names; empty = those found")
    require_dwi = traits.Bool(False, usedefault=True)
    require_anomaly = traits.Bool(False, usedefault=True)
    wait = traits.Any(desc="connect an upstream output here to run after it (value unused)")


class _SessionDerivativesOutputSpec(TraitedSpec):
    t1w = traits.Str()
    brain_mask = traits.Str()
    flair = traits.Str()
    csf = traits.Str()
    t1w2dwi = traits.List(traits.Str)
    dwi2t1w = traits.List(traits.Str)
    analysis_mask = traits.Str()
    models = traits.List(traits.Str)
    anomaly_masks = traits.List(traits.Str)
    anomaly_scores = traits.List(traits.Str)
    findings = traits.List(traits.Str, desc="finding label images per model ('' = none)")
    lesion = traits.Str()
    lesion_space = traits.Str()


class SessionDerivatives(SimpleInterface):
    """Find a session's derivatives at run time (see :func:`session_derivatives`)."""

    input_spec = _SessionDerivativesInputSpec
    output_spec = _SessionDerivativesOutputSpec
    _always_run = True  # the files on disk may have changed since the last run

    def _run_interface(self, runtime):
        found = session_derivatives(
            self.inputs.output_dir, self.inputs.subject, self.inputs.session,
            lesion_dir=self.inputs.lesion_dir or None, require_dwi=self.inputs.require_dwi,
            models=list(self.inputs.models) if _given(self.inputs.models) else (),
            require_anomaly=self.inputs.require_anomaly)
        for key in ("t1w", "brain_mask", "flair", "csf", "analysis_mask", "lesion", "lesion_space"):
            self._results[key] = found[key]
        for key in ("t1w2dwi", "dwi2t1w"):
            self._results[key] = [found[key]] if found[key] else []
        for key in ("models", "anomaly_masks", "anomaly_scores", "findings"):
            self._results[key] = list(found[key])
        return runtime


# ============================================================================ lesion masks

class _SessionLesionInputSpec(BaseInterfaceInputSpec):
    lesion_file = traits.Str("", usedefault=True, desc="given lesion mask ('' = estimate from FLAIR)")
    lesion_space = traits.Str("T1w", usedefault=True, desc="T1w or dwi (the given mask's space)")
    dwi2t1w = traits.List(traits.Str, desc="dwi→T1w transforms (for a dwi-space given mask)")
    t1w = traits.Str(mandatory=True, desc="preprocessed T1w (the T1w grid)")
    brain_mask = traits.Str(mandatory=True)
    flair = traits.Str("", usedefault=True, desc="FLAIR in T1w space ('' = none)")
    csf = traits.Str("", usedefault=True, desc="CSF probseg in T1w space ('' = none)")
    z_threshold = traits.Float(3.0, usedefault=True)
    min_volume_ml = traits.Float(0.1, usedefault=True)
    t1w2dwi = traits.List(traits.Str, desc="T1w→dwi transforms; with dwi_reference: also a dwi-space mask")
    dwi_reference = traits.Str("", usedefault=True, desc="dwi grid ('' = no dwi-space outputs)")
    num_threads = traits.Int(1, usedefault=True, nohash=True)


class _SessionLesionOutputSpec(TraitedSpec):
    mask_t1w = traits.Str(desc="lesion mask (given or estimated) on the T1w grid")
    mask_dwi = traits.Str(desc="the same on the dwi grid ('' without dwi_reference)")
    background_dwi = traits.Str(desc="FLAIR (or T1w) on the dwi grid, for figures")
    source = traits.Str(desc="'given' or 'estimate'")
    desc = traits.Str(desc=f"'{GIVEN_DESC}' or '{ESTIMATE_DESC}'")
    meta = traits.Dict()


class SessionLesionMask(SimpleInterface):
    """The session's lesion mask on its T1w grid: given (resampled), or a FLAIR estimate."""

    input_spec = _SessionLesionInputSpec
    output_spec = _SessionLesionOutputSpec

    def _run_interface(self, runtime):
        from bids_uad.algorithms.longitudinal import flair_hyperintensity_estimate, volume_ml
        from bids_uad.algorithms.registration import apply_transforms

        set_itk_threads(self.inputs.num_threads)
        t1w = nib.load(self.inputs.t1w)
        zooms = t1w.header.get_zooms()[:3]
        cwd = Path(runtime.cwd)
        if _given(self.inputs.lesion_file):
            xfms = list(self.inputs.dwi2t1w) if self.inputs.lesion_space == "dwi" else []
            if self.inputs.lesion_space == "dwi" and not xfms:
                raise InputMissingError("a dwi-space lesion mask needs the dwi→T1w transform",
                                        self.inputs.lesion_file)
            img = apply_transforms(self.inputs.lesion_file, t1w, xfms, "mask")
            mask = np.asarray(img.dataobj) > 0
            source, desc = "given", GIVEN_DESC
            meta = {"Description": "lesion mask from --lesion-masks, resampled to the T1w grid",
                    "LesionMaskSource": "given", "Sources": [os.path.basename(self.inputs.lesion_file)]}
        else:
            if not _given(self.inputs.flair):
                LOGGER.warning("%s: no lesion mask and no FLAIR: the lesion estimate is empty",
                               os.path.basename(self.inputs.t1w))
                image, contrast = None, "none"
            else:
                image, contrast = _load_float(self.inputs.flair), "FLAIR"
            brain = _load_bool(self.inputs.brain_mask)
            csf = _load_float(self.inputs.csf) > 0.5 if _given(self.inputs.csf) else None
            if image is None:
                mask, info = np.zeros(brain.shape, bool), {"Method": "no FLAIR: empty estimate"}
            else:
                mask, info = flair_hyperintensity_estimate(
                    image, brain, csf, zooms=zooms, z_threshold=self.inputs.z_threshold,
                    min_volume_ml=self.inputs.min_volume_ml)
            source, desc = "estimate", ESTIMATE_DESC
            meta = {"Description": "ESTIMATE of the lesion as FLAIR hyperintensity (robust z-score "
                                   "within the brain, minus CSF, cleaned morphologically); not a "
                                   "manual segmentation", "LesionMaskSource": "estimate",
                    "Contrast": contrast, **info}
        meta["VolumeMl"] = volume_ml(mask, zooms)
        self._results["mask_t1w"] = _save(mask, t1w, work_nifti(cwd, "lesion_t1w"), np.uint8)
        self._results["mask_dwi"] = ""
        self._results["background_dwi"] = ""
        if _given(self.inputs.dwi_reference):
            xfms = list(self.inputs.t1w2dwi)
            ref = nib.load(self.inputs.dwi_reference)
            if _given(self.inputs.lesion_file) and self.inputs.lesion_space == "dwi":
                # given in this session's dwi space: resample once (grid only), not through T1w
                dwi_mask = apply_transforms(self.inputs.lesion_file, ref, [], "mask")
            else:
                dwi_mask = apply_transforms(self._results["mask_t1w"], ref, xfms, "mask")
            self._results["mask_dwi"] = _save(np.asarray(dwi_mask.dataobj) > 0, ref,
                                              work_nifti(cwd, "lesion_dwi"), np.uint8)
            bg_src = self.inputs.flair if _given(self.inputs.flair) else self.inputs.t1w
            bg = apply_transforms(bg_src, ref, xfms, "image")
            self._results["background_dwi"] = _save(np.asarray(bg.dataobj), ref,
                                                    work_nifti(cwd, "background_dwi"), np.float32)
        self._results.update(source=source, desc=desc, meta=meta)
        return runtime


# ============================================================================ registration

class _FollowupInputSpec(BaseInterfaceInputSpec):
    baseline_t1w = traits.Str(mandatory=True)
    baseline_brain_mask = traits.Str(mandatory=True)
    baseline_lesion = traits.Str("", usedefault=True, desc="baseline lesion on its T1w grid")
    followup_t1w = traits.Str(mandatory=True)
    followup_brain_mask = traits.Str(mandatory=True)
    followup_lesion = traits.Str("", usedefault=True, desc="follow-up lesion on its T1w grid")
    followup_flair = traits.Str("", usedefault=True, desc="follow-up FLAIR in its T1w space")
    baseline_t1w2dwi = traits.List(traits.Str, mandatory=True)
    dwi_reference = traits.Str(mandatory=True, desc="baseline dwi grid (its analysis mask)")
    followup_dwi2t1w = traits.List(traits.Str, desc="follow-up dwi→T1w (for its score maps)")
    followup_scores = traits.List(traits.Str, desc="follow-up score maps (dwi), '' entries allowed")
    followup_masks = traits.List(traits.Str, desc="follow-up anomaly masks (dwi), '' entries allowed")
    followup_findings = traits.List(traits.Str, desc="follow-up finding label images (dwi), '' entries allowed")
    resolution = traits.Float(2.0, usedefault=True, desc="registration grid (mm); 0 = native")
    syn = traits.Bool(True, usedefault=True, desc="SyN after the rigid stage")
    reg_iterations = traits.List(traits.Int, [40, 20, 0], usedefault=True)
    seed = traits.Int(0, usedefault=True)
    num_threads = traits.Int(1, usedefault=True, nohash=True)


class _FollowupOutputSpec(TraitedSpec):
    xfm = traits.Str(desc="follow-up T1w → baseline T1w (composite .h5)")
    inverse_xfm = traits.Str(desc="baseline T1w → follow-up T1w (composite .h5)")
    t1w_baseline = traits.Str(desc="follow-up T1w on the baseline T1w grid")
    lesion_dwi = traits.Str(desc="follow-up lesion on the baseline dwi grid")
    background_dwi = traits.Str(desc="follow-up FLAIR (or T1w) on the baseline dwi grid")
    background_contrast = traits.Str(desc="FLAIR or T1w: what background_dwi is")
    scores_dwi = traits.List(traits.Str, desc="follow-up score maps on the baseline dwi grid ('' = none)")
    masks_dwi = traits.List(traits.Str, desc="follow-up anomaly masks on the baseline dwi grid")
    findings_dwi = traits.List(traits.Str, desc="follow-up finding labels on the baseline dwi grid ('' = none)")
    meta = traits.Dict()


class FollowupToBaseline(SimpleInterface):
    """Register the follow-up to the baseline T1w and carry its images into baseline dwi space."""

    input_spec = _FollowupInputSpec
    output_spec = _FollowupOutputSpec

    def _run_interface(self, runtime):
        from bids_uad.algorithms.masking import dice
        from bids_uad.algorithms.registration import apply_transforms, register_followup

        set_itk_threads(self.inputs.num_threads)
        cwd = Path(runtime.cwd)
        rigid, result = register_followup(
            self.inputs.baseline_t1w, self.inputs.baseline_brain_mask, self.inputs.baseline_lesion or "",
            self.inputs.followup_t1w, self.inputs.followup_brain_mask, self.inputs.followup_lesion or "",
            str(cwd / "fu2base_"), resolution=self.inputs.resolution, syn=self.inputs.syn,
            reg_iterations=list(self.inputs.reg_iterations), seed=self.inputs.seed,
            threads=self.inputs.num_threads)
        fwd, fwd_inv = list(result.forward), list(result.forward_invert)
        base_t1w = nib.load(self.inputs.baseline_t1w)
        ref = nib.load(self.inputs.dwi_reference)
        to_dwi = list(self.inputs.baseline_t1w2dwi) + fwd
        to_dwi_inv = [False] * len(self.inputs.baseline_t1w2dwi) + fwd_inv
        t1w_base = apply_transforms(self.inputs.followup_t1w, base_t1w, fwd, "image", invert=fwd_inv)
        self._results["t1w_baseline"] = _save(np.asarray(t1w_base.dataobj), base_t1w,
                                              work_nifti(cwd, "followup_t1w_on_baseline"), np.float32)
        warped_mask = apply_transforms(self.inputs.followup_brain_mask, base_t1w, fwd, "mask", invert=fwd_inv)
        brain_dice = dice(np.asarray(warped_mask.dataobj), _load_bool(self.inputs.baseline_brain_mask))
        if _given(self.inputs.followup_lesion):
            les = apply_transforms(self.inputs.followup_lesion, ref, to_dwi, "mask", invert=to_dwi_inv)
            les = np.asarray(les.dataobj) > 0
        else:
            les = np.zeros(ref.shape[:3], bool)
        self._results["lesion_dwi"] = _save(les, ref, work_nifti(cwd, "followup_lesion_dwi"), np.uint8)
        bg_src = self.inputs.followup_flair if _given(self.inputs.followup_flair) else self.inputs.followup_t1w
        bg = apply_transforms(bg_src, ref, to_dwi, "image", invert=to_dwi_inv)
        self._results["background_dwi"] = _save(np.asarray(bg.dataobj), ref, work_nifti(cwd, "followup_bg_dwi"),
                                                np.float32)
        self._results["background_contrast"] = "FLAIR" if _given(self.inputs.followup_flair) else "T1w"
        from_dwi = to_dwi + list(self.inputs.followup_dwi2t1w)
        from_dwi_inv = to_dwi_inv + [False] * len(self.inputs.followup_dwi2t1w)
        scores, masks = [], []
        for i, (score, mask) in enumerate(zip(list(self.inputs.followup_scores or []),
                                              list(self.inputs.followup_masks or []))):
            if not (_given(score) and self.inputs.followup_dwi2t1w):
                scores.append("")
                masks.append("")
                continue
            s = apply_transforms(score, ref, from_dwi, "image", invert=from_dwi_inv)
            scores.append(_save(np.asarray(s.dataobj), ref, work_nifti(cwd, f"followup_score_{i}"), np.float32))
            if _given(mask):
                m = apply_transforms(mask, ref, from_dwi, "mask", invert=from_dwi_inv)
                masks.append(_save(np.asarray(m.dataobj) > 0, ref, work_nifti(cwd, f"followup_mask_{i}"), np.uint8))
            else:
                masks.append("")
        self._results["scores_dwi"] = scores
        self._results["masks_dwi"] = masks
        findings = []
        for i, labels in enumerate(list(self.inputs.followup_findings or [])):
            if not (_given(labels) and self.inputs.followup_dwi2t1w):
                findings.append("")
                continue
            warped = apply_transforms(labels, ref, from_dwi, "label", invert=from_dwi_inv)
            findings.append(_save(np.asarray(warped.dataobj), ref, work_nifti(cwd, f"followup_findings_{i}"), np.int16))
        self._results["findings_dwi"] = findings
        self._results["xfm"] = result.forward[0] if self.inputs.syn else rigid.forward[0]
        # rigid only: the inverse is the same .mat applied inverted, not a file of its own
        self._results["inverse_xfm"] = result.inverse[0] if self.inputs.syn else ""
        self._results["meta"] = {
            "Registration": ("ANTs rigid then SyN (antspyx), follow-up onto baseline T1w; both lesions "
                             "excluded from the metric" if self.inputs.syn else
                             "ANTs rigid (antspyx), follow-up onto baseline T1w; lesions excluded"),
            "RegistrationResolutionMm": float(self.inputs.resolution),
            "BrainMaskDiceAfterRegistration": round(float(brain_dice), 4),
        }
        return runtime


# ============================================================================ comparison

class _CompareInputSpec(BaseInterfaceInputSpec):
    subject = traits.Str(mandatory=True)
    baseline_session = traits.Str(mandatory=True)
    followup_session = traits.Str(mandatory=True)
    models = traits.List(traits.Str, mandatory=True)
    anomaly_masks = traits.List(traits.Str, mandatory=True, desc="baseline anomaly masks, per model")
    anomaly_scores = traits.List(traits.Str, mandatory=True, desc="baseline score maps, per model")
    analysis_mask = traits.Str(mandatory=True)
    baseline_lesion = traits.Str(mandatory=True, desc="baseline lesion, dwi grid")
    baseline_lesion_t1w = traits.Str("", usedefault=True)
    baseline_lesion_source = traits.Str("given", usedefault=True)
    baseline_lesion_meta = traits.Dict()
    baseline_background = traits.Str("", usedefault=True)
    followup_lesion = traits.Str(mandatory=True, desc="follow-up lesion, baseline dwi grid")
    followup_lesion_t1w = traits.Str("", usedefault=True, desc="follow-up lesion, its own T1w grid")
    followup_lesion_source = traits.Str("given", usedefault=True)
    followup_lesion_meta = traits.Dict()
    followup_background = traits.Str("", usedefault=True)
    followup_background_contrast = traits.Str("FLAIR", usedefault=True)
    followup_t1w_baseline = traits.Str("", usedefault=True, desc="follow-up T1w on the baseline T1w grid")
    followup_scores = traits.List(traits.Str, desc="follow-up scores on the baseline dwi grid")
    followup_masks = traits.List(traits.Str, desc="follow-up anomaly masks on the baseline dwi grid")
    baseline_findings = traits.List(traits.Str, desc="baseline finding label images per model ('' = none)")
    followup_findings = traits.List(traits.Str, desc="follow-up finding labels on the baseline dwi grid")
    xfm = traits.Str("", usedefault=True, desc="follow-up T1w → baseline T1w transform, to store")
    inverse_xfm = traits.Str("", usedefault=True)
    registration_meta = traits.Dict()
    n_permutations = traits.Int(200, usedefault=True)
    null_method = traits.Str("components", usedefault=True)
    perilesional_mm = traits.Float(0.0, usedefault=True, desc="> 0: also a null within this distance of the lesion")
    seed = traits.Int(0, usedefault=True)


class _CompareOutputSpec(TraitedSpec):
    rows = traits.List(traits.Dict, desc="one statistics row per model")
    out_files = traits.List(traits.Str, desc="files to store (parallel lists below)")
    out_entities = traits.List(traits.Dict)
    out_suffixes = traits.List(traits.Str)
    out_datatypes = traits.List(traits.Str)
    out_meta = traits.List(traits.Dict)


def _json_number(value):
    """A plain float for a sidecar, None for NaN (JSON has no NaN)."""
    value = float(value)
    return None if np.isnan(value) else value


def figure_desc(followup: str) -> str:
    """``desc-`` of a figure: ``longitudinal`` + the follow-up label (figures/ has no session folder)."""
    return "longitudinal" + followup[:1].upper() + followup[1:]


def _desc(source: str) -> str:
    return ESTIMATE_DESC if source == "estimate" else GIVEN_DESC


class LongitudinalCompare(SimpleInterface):
    """Per model: mismatch, volumes, overlap with the follow-up lesion, null, score change, figure."""

    input_spec = _CompareInputSpec
    output_spec = _CompareOutputSpec

    def _run_interface(self, runtime):
        from bids_uad.algorithms.longitudinal import compare_sessions
        from bids_uad.reports.figures import plot_longitudinal

        cwd = Path(runtime.cwd)
        sub, base, fu = self.inputs.subject, self.inputs.baseline_session, self.inputs.followup_session
        ref = nib.load(self.inputs.analysis_mask)
        zooms = ref.header.get_zooms()[:3]
        analysis = _load_bool(self.inputs.analysis_mask)
        for path in list(self.inputs.anomaly_masks) + [self.inputs.baseline_lesion, self.inputs.followup_lesion]:
            if _given(path) and nib.load(path).shape[:3] != analysis.shape:
                raise InputValidationError(
                    f"not on the baseline dwi grid of the analysis mask {analysis.shape}: "
                    f"{nib.load(path).shape[:3]}", path)
        base_les = _load_bool(self.inputs.baseline_lesion)
        fu_les = _load_bool(self.inputs.followup_lesion)
        base_bg = (_load_float(self.inputs.baseline_background) if _given(self.inputs.baseline_background)
                   else analysis.astype(np.float32))
        fu_bg = (_load_float(self.inputs.followup_background) if _given(self.inputs.followup_background)
                 else analysis.astype(np.float32))
        base_src, fu_src = self.inputs.baseline_lesion_source, self.inputs.followup_lesion_source
        estimate = "estimate" in (base_src, fu_src)
        files: list[tuple[str, dict, str, str, dict]] = []

        def store(path, key: str, session: str, meta: dict, **params) -> None:
            """One file to store, named through the outputs table (sub/ses of ``session``)."""
            source = {"sub": sub, "ses": session}
            files.append((path, outputs.entities_for(key, source, **params), outputs.suffix_of(key, **params),
                          outputs.OUTPUTS[key].datatype, meta))

        est_note = ({"LesionMaskNote": "at least one lesion mask is a FLAIR-hyperintensity ESTIMATE"}
                    if estimate else {})
        # lesion masks and the registration, stored once per pair
        store(self.inputs.baseline_lesion, "lesion_dwi", base,
              {**self.inputs.baseline_lesion_meta, "Space": "baseline dwi"}, lesion=_desc(base_src))
        if _given(self.inputs.baseline_lesion_t1w) and base_src == "estimate":
            store(self.inputs.baseline_lesion_t1w, "lesion_t1w", base, dict(self.inputs.baseline_lesion_meta),
                  lesion=ESTIMATE_DESC)
        if _given(self.inputs.followup_lesion_t1w) and fu_src == "estimate":
            store(self.inputs.followup_lesion_t1w, "lesion_t1w", fu, dict(self.inputs.followup_lesion_meta),
                  lesion=ESTIMATE_DESC)
        space_meta = {"SpaceDescription": f"diffusion space of the baseline session ses-{base}"}
        store(self.inputs.followup_lesion, "lesion_baseline", fu,
              {**self.inputs.followup_lesion_meta, **space_meta, **self.inputs.registration_meta},
              lesion=_desc(fu_src))
        if _given(self.inputs.followup_background):
            store(self.inputs.followup_background, "background_baseline", fu,
                  {**space_meta, **self.inputs.registration_meta, "Resampling": "linear"},
                  contrast=self.inputs.followup_background_contrast)
        if _given(self.inputs.followup_t1w_baseline):
            store(self.inputs.followup_t1w_baseline, "t1w_baseline", fu,
                  {"SpaceDescription": f"T1w space of the baseline session ses-{base}",
                   **self.inputs.registration_meta, "Resampling": "linear"})
        if _given(self.inputs.xfm):
            store(self.inputs.xfm, "xfm_t1w_to_baseline", fu,
                  {**self.inputs.registration_meta,
                   "SpaceDescription": f"T1w space of the baseline session ses-{base}"})
        if _given(self.inputs.inverse_xfm):
            store(self.inputs.inverse_xfm, "xfm_baseline_to_t1w", fu, {})
        rows = []
        fu_scores = list(self.inputs.followup_scores or [])
        fu_masks = list(self.inputs.followup_masks or [])
        for i, model in enumerate(self.inputs.models):
            anomaly = _load_bool(self.inputs.anomaly_masks[i])
            score0 = _load_float(self.inputs.anomaly_scores[i]) if _given(self.inputs.anomaly_scores[i]) else None
            score1 = _load_float(fu_scores[i]) if i < len(fu_scores) and _given(fu_scores[i]) else None
            mask1 = _load_bool(fu_masks[i]) if i < len(fu_masks) and _given(fu_masks[i]) else None
            stats, maps = compare_sessions(
                anomaly, base_les, fu_les, analysis, zooms, followup_anomaly=mask1,
                baseline_score=score0 if score1 is not None else None, followup_score=score1,
                n_permutations=self.inputs.n_permutations, seed=self.inputs.seed,
                null_method=self.inputs.null_method, perilesional_mm=self.inputs.perilesional_mm)
            row = {"participant_id": f"sub-{sub}", "baseline_session": f"ses-{base}",
                   "followup_session": f"ses-{fu}", "model": model,
                   "baseline_lesion_source": base_src, "followup_lesion_source": fu_src, **stats}
            rows.append(row)
            summary = {k: _json_number(stats[k]) for k in ("mismatch_ml", "overlap_fraction",
                                                            "overlap_fraction_random_mean",
                                                            "overlap_fraction_random_p")}
            mism_path = _save(maps["mismatch"], ref, work_nifti(cwd, f"mismatch_{model}"), np.uint8)
            store(mism_path, "mismatch", base,
                  {"Description": "anomalous at baseline, outside the baseline lesion mask "
                                  f"({_desc(base_src)}), within the analysis mask",
                   "BaselineLesionSource": base_src, **est_note, **summary}, model=model)
            if "score_change" in maps:
                path = _save(maps["score_change"], ref, work_nifti(cwd, f"scorechange_{model}"), np.float32)
                store(path, "score_change", fu,
                      {"Description": f"anomaly score at ses-{fu} minus ses-{base}, on the baseline "
                                      "dwi grid (0 outside the analysis mask)", **space_meta}, model=model)
            label = "lesion estimate" if estimate else "lesion"
            title = (f"sub-{sub} · model {model} · ses-{base} → ses-{fu} · mismatch {stats['mismatch_ml']:.2f} mL,"
                     f" overlap {stats['overlap_fraction']:.2f} (random {stats['overlap_fraction_random_mean']:.2f})")
            svg = plot_longitudinal(base_bg, fu_bg, anomaly, base_les, fu_les, maps["mismatch"], zooms,
                                    title, lesion_label=label)
            fig = cwd / f"longitudinal_{model}.svg"
            fig.write_text(svg)
            store(str(fig), "longitudinal_figure", fu, {}, model=model,
                  followup=figure_desc(fu).removeprefix("longitudinal"))
            base_f = list(self.inputs.baseline_findings or [])
            fu_f = list(self.inputs.followup_findings or [])
            path = cwd / f"findings_match_{model}.tsv"
            if (i < len(base_f) and i < len(fu_f) and _given(base_f[i]) and _given(fu_f[i])
                    and match_findings_table(base_f[i], fu_f[i], ref, zooms, path)):
                store(str(path), "findings_matches", fu,
                      {**_match_findings_meta(base, fu), **space_meta, **self.inputs.registration_meta}, model=model)
        self._results["rows"] = rows
        self._results["out_files"] = [f[0] for f in files]
        self._results["out_entities"] = [f[1] for f in files]
        self._results["out_suffixes"] = [f[2] for f in files]
        self._results["out_datatypes"] = [f[3] for f in files]
        self._results["out_meta"] = [f[4] for f in files]
        return runtime


def _match_findings_meta(base: str, fu: str) -> dict:
    """The findings-match TSV's sidecar: what each column means."""
    from bids_uad.scoring.findings import MATCH_COLUMNS

    return {**{c: {"Description": d, **({"Units": u} if u else {})} for c, (d, u) in MATCH_COLUMNS.items()},
            "Description": f"each finding of ses-{base} matched to the findings of ses-{fu}: the follow-up's "
                           "finding label image carried to the baseline dwi grid (nearest label); numbers are "
                           "those of each session's findings table"}


def match_findings_table(baseline: str, followup: str, ref, zooms, out_path: Path) -> bool:
    """Write the baseline→follow-up findings match of two finding label images on the baseline dwi
    grid (``ref``) to ``out_path``; False (nothing written) when an image is not on that grid."""
    from bids_uad.bids.derivatives import write_tsv
    from bids_uad.scoring.findings import MATCH_COLUMNS, match_findings

    base_labels = np.asarray(nib.load(baseline).dataobj)
    fu_labels = np.asarray(nib.load(followup).dataobj)
    if base_labels.shape[:3] != ref.shape[:3] or fu_labels.shape[:3] != ref.shape[:3]:
        LOGGER.warning("finding label images not on the baseline dwi grid: findings not matched (%s, %s)",
                       Path(baseline).name, Path(followup).name)
        return False
    write_tsv(out_path, match_findings(base_labels, fu_labels, float(np.prod(zooms)) / 1000.0), list(MATCH_COLUMNS))
    return True


# ============================================================================ tables

class _TablesInputSpec(BaseInterfaceInputSpec):
    output_dir = traits.Str(mandatory=True)
    subject = traits.Str(mandatory=True)
    rows = traits.List(traits.Any, mandatory=True, desc="rows, or lists of rows (one per follow-up)")


class _TablesOutputSpec(TraitedSpec):
    subject_tsv = traits.Str()
    group_tsv = traits.Str()


def _flatten(items) -> list:
    out = []
    for item in items or []:
        if isinstance(item, (list, tuple)):
            out.extend(_flatten(item))
        elif item not in (None, "") and item is not traits.Undefined:
            out.append(item)
    return out


class LongitudinalTables(SimpleInterface):
    """Per-subject TSV and the group TSV rebuild (see :mod:`bids_uad.bids.longitudinal`)."""

    input_spec = _TablesInputSpec
    output_spec = _TablesOutputSpec

    def _run_interface(self, runtime):
        from bids_uad.bids.longitudinal import rebuild_group_table, write_subject_table

        rows = _flatten(self.inputs.rows)
        subject_tsv = write_subject_table(self.inputs.output_dir, self.inputs.subject, rows)
        group_tsv = rebuild_group_table(self.inputs.output_dir)
        self._results.update(subject_tsv=str(subject_tsv), group_tsv=str(group_tsv))
        return runtime
