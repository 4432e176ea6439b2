"""Nipype interfaces of the anatomical stage: file in → algorithm → file out.

Each interface reads its inputs, calls one function of ``bids_uad.algorithms`` and writes
its results in the node's folder.  Optional file inputs are strings where ``""`` means
"none" (the base workflow passes ``""`` for a missing FLAIR, lesion mask or dwi reference);
outputs that could not be made are ``""`` too, and the sinks skip them.  The FSL
equivalents (``bet``, ``fast``) are built by :func:`fsl_bet` / :func:`fsl_fast` and converted
to the same outputs by :class:`FASTToDseg`.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from bids_uad.algorithms.registration import set_itk_threads
from bids_uad.algorithms.segmentation import CLASS_ORDER
from bids_uad.interfaces.workfiles import work_nifti

#: order of probseg lists in this stage's outputs (the workflow contract)
PROBSEG_ORDER = ("GM", "WM", "CSF")



def _save(img: nib.Nifti1Image, cwd: str, stem: str) -> str:
    path = work_nifti(cwd, stem)
    nib.save(img, path)
    return path


def _given(value) -> bool:
    return bool(value) and value is not traits.Undefined and str(value) != ""


class _AntsInputSpec(BaseInterfaceInputSpec):
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="ITK threads")
    seed = traits.Int(0, usedefault=True, desc="random seed (ANTs sampling)")


# --------------------------------------------------------------------------- N4
class _N4InputSpec(_AntsInputSpec):
    in_file = File(exists=True, mandatory=True)
    mask_file = traits.Str("", usedefault=True, desc="fit mask ('' = head mask)")
    shrink_factor = traits.Int(4, usedefault=True)


class _N4OutputSpec(TraitedSpec):
    out_file = File(exists=True)
    bias_file = File(exists=True)


class N4BiasFieldCorrection(SimpleInterface):
    """N4 bias-field correction (antspyx)."""

    input_spec = _N4InputSpec
    output_spec = _N4OutputSpec

    def _run_interface(self, runtime):
        from bids_uad.algorithms.intensity import n4_correct

        set_itk_threads(self.inputs.num_threads)
        img = nib.load(self.inputs.in_file)
        if img.ndim > 3:
            img = nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32)[..., 0], img.affine)
        mask = np.asarray(nib.load(self.inputs.mask_file).dataobj) > 0 if _given(self.inputs.mask_file) else None
        out, bias = n4_correct(img, mask=mask, shrink_factor=self.inputs.shrink_factor,
                               threads=self.inputs.num_threads, seed=self.inputs.seed)
        self._results["out_file"] = _save(out, runtime.cwd, "n4_corrected")
        self._results["bias_file"] = _save(bias, runtime.cwd, "n4_bias")
        return runtime


# --------------------------------------------------------------------------- skull strip
class _SkullStripInputSpec(_AntsInputSpec):
    in_file = File(exists=True, mandatory=True, desc="T1w with skull (bias corrected)")
    method = traits.Enum("template", "morph", "template-only", "deepbet", usedefault=True)
    template_t1w = traits.Str("", usedefault=True, desc="brain-only template T1w")
    template_mask = traits.Str("", usedefault=True, desc="template brain mask")


class _SkullStripOutputSpec(TraitedSpec):
    out_mask = File(exists=True)
    out_file = File(exists=True, desc="brain-extracted T1w")


class SkullStrip(SimpleInterface):
    """Brain mask of a T1w (threshold + template, see :mod:`bids_uad.algorithms.skullstrip`)."""

    input_spec = _SkullStripInputSpec
    output_spec = _SkullStripOutputSpec

    def _run_interface(self, runtime):
        from bids_uad.algorithms.skullstrip import skull_strip
        from bids_uad.algorithms.templates import Template, find_template

        set_itk_threads(self.inputs.num_threads)
        template = None
        if self.inputs.method in ("template", "template-only"):
            if _given(self.inputs.template_t1w) and _given(self.inputs.template_mask):
                template = Template(name="custom", t1w=self.inputs.template_t1w,
                                    brain_mask=self.inputs.template_mask)
            else:
                template = find_template()
        mask, brain = skull_strip(nib.load(self.inputs.in_file), self.inputs.method, template,
                                  seed=self.inputs.seed, threads=self.inputs.num_threads)
        self._results["out_mask"] = _save(mask, runtime.cwd, "brain_mask")
        self._results["out_file"] = _save(brain, runtime.cwd, "brain")
        return runtime


class _ApplyMaskInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    mask_file = File(exists=True, mandatory=True)


class _ApplyMaskOutputSpec(TraitedSpec):
    out_file = File(exists=True)


class ApplyMask(SimpleInterface):
    """Zero an image outside a mask (e.g. after FSL bet, whose mask is used)."""

    input_spec = _ApplyMaskInputSpec
    output_spec = _ApplyMaskOutputSpec

    def _run_interface(self, runtime):
        img = nib.load(self.inputs.in_file)
        mask = np.asarray(nib.load(self.inputs.mask_file).dataobj) > 0
        out = nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32) * mask, img.affine)
        self._results["out_file"] = _save(out, runtime.cwd, "masked")
        return runtime


# --------------------------------------------------------------------------- registration
class _RegisterInputSpec(_AntsInputSpec):
    fixed_file = traits.Str(mandatory=True, desc="fixed image ('' = skip: outputs are '')")
    moving_file = File(exists=True, mandatory=True)
    fixed_mask = traits.Str("", usedefault=True)
    moving_mask = traits.Str("", usedefault=True)
    lesion_mask = traits.Str("", usedefault=True, desc="lesion in moving space, excluded from the metric")
    transform_type = traits.Str("SyN", usedefault=True, desc="antspyx type_of_transform")
    resolution = traits.Float(0.0, usedefault=True,
                              desc="register on images resampled to this voxel size (mm); 0 = native")
    moving_resolution = traits.Float(0.0, usedefault=True,
                                     desc="resample the moving image (and its masks) to this voxel size (mm) "
                                          "instead; 0 = as ``resolution``")
    reg_iterations = traits.List(traits.Int, [40, 20, 0], usedefault=True)
    composite = traits.Bool(True, usedefault=True, desc="write Composite.h5 / InverseComposite.h5")


class _RegisterOutputSpec(TraitedSpec):
    forward_transforms = traits.List(traits.Str, desc="moving → fixed (antspyx order)")
    forward_invert_flags = traits.List(traits.Bool)
    reverse_transforms = traits.List(traits.Str, desc="fixed → moving")
    reverse_invert_flags = traits.List(traits.Bool)
    warped_file = traits.Str(desc="moving resampled on fixed")
    forward_xfm = traits.Str(desc="forward composite transform file ('' when not composite)")
    reverse_xfm = traits.Str(desc="reverse composite transform file")


class RegisterImages(SimpleInterface):
    """antsRegistration (antspyx) with brain masks and lesion exclusion."""

    input_spec = _RegisterInputSpec
    output_spec = _RegisterOutputSpec

    def _run_interface(self, runtime):
        from bids_uad.algorithms.registration import apply_transforms, coarse, register

        set_itk_threads(self.inputs.num_threads)
        if not _given(self.inputs.fixed_file):
            for key in ("forward_transforms", "forward_invert_flags", "reverse_transforms",
                        "reverse_invert_flags"):
                self._results[key] = []
            for key in ("warped_file", "forward_xfm", "reverse_xfm"):
                self._results[key] = ""
            return runtime

        moving_mm = self.inputs.moving_resolution or self.inputs.resolution

        def load(path, order=1, mm=self.inputs.resolution):
            return coarse(path, mm, order)

        def opt(path, order=0, mm=self.inputs.resolution):
            return load(path, order, mm) if _given(path) else None

        fixed = load(self.inputs.fixed_file)
        moving = load(self.inputs.moving_file, mm=moving_mm)
        result = register(
            fixed, moving, kind=self.inputs.transform_type,
            fixed_mask=opt(self.inputs.fixed_mask), moving_mask=opt(self.inputs.moving_mask, mm=moving_mm),
            lesion_mask=opt(self.inputs.lesion_mask, mm=moving_mm),
            out_prefix=Path(runtime.cwd) / "xfm_", composite=self.inputs.composite,
            seed=self.inputs.seed, threads=self.inputs.num_threads,
            reg_iterations=tuple(self.inputs.reg_iterations),
        )
        warped = result.warped
        if self.inputs.resolution > 0:  # warped on the native fixed grid
            warped = apply_transforms(self.inputs.moving_file, self.inputs.fixed_file,
                                      result.forward, "image", invert=result.forward_invert)
        _registration_outputs(self._results, result, _save(warped, runtime.cwd, "warped"),
                              self.inputs.composite)
        return runtime


def _registration_outputs(results: dict, reg, warped_file: str, composite: bool) -> None:
    """The outputs of :class:`_RegisterOutputSpec` from a RegistrationResult."""
    results["forward_transforms"] = reg.forward
    results["forward_invert_flags"] = reg.forward_invert
    results["reverse_transforms"] = reg.inverse
    results["reverse_invert_flags"] = reg.inverse_invert
    results["warped_file"] = warped_file
    results["forward_xfm"] = reg.forward[0] if composite else ""
    results["reverse_xfm"] = reg.inverse[0] if composite else ""


class _ApplyInputSpec(_AntsInputSpec):
    in_files = traits.List(traits.Str, mandatory=True, desc="images to resample ('' entries pass through)")
    reference = traits.Str(mandatory=True, desc="target grid ('' = skip: outputs are '')")
    transforms = traits.List(traits.Str, desc="antspyx order; empty = identity")
    invert_flags = traits.List(traits.Bool, desc="whichtoinvert; default: none inverted")
    interpolation = traits.Str("image", usedefault=True,
                               desc="image kind (label, mask, probability, image) or ANTs interpolator")
    threshold = traits.Float(-1.0, usedefault=True, desc=">= 0: binarise the result at this value")


class _ApplyOutputSpec(TraitedSpec):
    out_files = traits.List(traits.Str)
    out_file = traits.Str(desc="first of out_files")


class ApplyTransforms(SimpleInterface):
    """Resample images through ANTs transforms with the interpolation their kind needs."""

    input_spec = _ApplyInputSpec
    output_spec = _ApplyOutputSpec

    def _run_interface(self, runtime):
        from bids_uad.algorithms.registration import apply_transforms

        set_itk_threads(self.inputs.num_threads)
        outs = []
        skip = not _given(self.inputs.reference)
        for i, path in enumerate(self.inputs.in_files):
            if skip or not _given(path):
                outs.append("")
                continue
            flags = list(self.inputs.invert_flags) if _given(self.inputs.invert_flags) else None
            img = apply_transforms(path, self.inputs.reference, list(self.inputs.transforms or []),
                                   self.inputs.interpolation, invert=flags)
            if self.inputs.threshold >= 0:
                img = nib.Nifti1Image((np.asarray(img.dataobj) > self.inputs.threshold).astype(np.uint8),
                                      img.affine)
            name = Path(path).name.split(".")[0]
            outs.append(_save(img, runtime.cwd, f"{i:02d}_{name}_resampled"))
        self._results["out_files"] = outs
        self._results["out_file"] = outs[0] if outs else ""
        return runtime


# --------------------------------------------------------------------------- skull strip + T1w → template
class _StripNormaliseInputSpec(_AntsInputSpec):
    in_file = File(exists=True, mandatory=True, desc="T1w with skull (bias corrected)")
    template_t1w = File(exists=True, mandatory=True, desc="brain-only template T1w (the fixed image)")
    template_mask = File(exists=True, mandatory=True, desc="template brain mask")
    lesion_mask = traits.Str("", usedefault=True, desc="lesion in T1w space, excluded from the metric")
    resolution = traits.Float(2.0, usedefault=True, desc="register on images resampled to this voxel size (mm)")
    reg_iterations = traits.List(traits.Int, [40, 20, 0], usedefault=True)


class _StripNormaliseOutputSpec(_SkullStripOutputSpec, _RegisterOutputSpec):
    """The skull strip's outputs and :class:`RegisterImages`'s (moving: the T1w brain; fixed: the template)."""


class SkullStripToTemplate(SimpleInterface):
    """Skull stripping and T1w → template SyN from one registration
    (:func:`bids_uad.algorithms.skullstrip.strip_and_normalise`); its registration outputs are
    named as :class:`RegisterImages`'s, so it stands in for both nodes."""

    input_spec = _StripNormaliseInputSpec
    output_spec = _StripNormaliseOutputSpec

    def _run_interface(self, runtime):
        from bids_uad.algorithms.registration import apply_transforms
        from bids_uad.algorithms.skullstrip import strip_and_normalise
        from bids_uad.algorithms.templates import Template

        set_itk_threads(self.inputs.num_threads)
        template = Template(name="custom", t1w=self.inputs.template_t1w, brain_mask=self.inputs.template_mask)
        lesion = nib.load(self.inputs.lesion_mask) if _given(self.inputs.lesion_mask) else None
        mask, brain, reg = strip_and_normalise(
            nib.load(self.inputs.in_file), template, lesion, out_prefix=Path(runtime.cwd) / "xfm_",
            resolution_mm=self.inputs.resolution, reg_iterations=tuple(self.inputs.reg_iterations),
            seed=self.inputs.seed, threads=self.inputs.num_threads)
        self._results["out_mask"] = _save(mask, runtime.cwd, "brain_mask")
        self._results["out_file"] = _save(brain, runtime.cwd, "brain")
        warped = apply_transforms(brain, self.inputs.template_t1w, reg.forward, "image", invert=reg.forward_invert)
        _registration_outputs(self._results, reg, _save(warped, runtime.cwd, "warped"), composite=True)
        return runtime


# --------------------------------------------------------------------------- segmentation
class _SegmentInputSpec(_AntsInputSpec):
    in_file = File(exists=True, mandatory=True, desc="bias-corrected T1w")
    mask_file = File(exists=True, mandatory=True, desc="brain mask")
    prior_files = traits.List(traits.Str, desc="CSF, GM, WM priors on the T1w grid (optional)")
    prior_weight = traits.Float(0.5, usedefault=True)
    mrf = traits.Float(0.2, usedefault=True)
    iterations = traits.Int(3, usedefault=True)


class _SegmentOutputSpec(TraitedSpec):
    dseg = File(exists=True, desc="1 CSF, 2 GM, 3 WM")
    dseg_tsv = File(exists=True)
    probsegs = traits.List(File(exists=True), desc="GM, WM, CSF")
    gm_probseg = File(exists=True)
    wm_probseg = File(exists=True)
    csf_probseg = File(exists=True)


def _write_dseg_tsv(cwd: str) -> str:
    from bids_uad.algorithms.segmentation import dseg_tsv_rows

    path = Path(cwd) / "dseg.tsv"
    lines = ["index\tname"] + [f"{r['index']}\t{r['name']}" for r in dseg_tsv_rows()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


class TissueSegmentation(SimpleInterface):
    """Atropos CSF/GM/WM segmentation (with template priors when given)."""

    input_spec = _SegmentInputSpec
    output_spec = _SegmentOutputSpec

    def _run_interface(self, runtime):
        from bids_uad.algorithms.segmentation import segment_tissues

        set_itk_threads(self.inputs.num_threads)
        img = nib.load(self.inputs.in_file)
        mask = nib.load(self.inputs.mask_file)
        priors = None
        files = [p for p in (self.inputs.prior_files or []) if _given(p)]
        if len(files) == 3:
            priors = {name: nib.load(path) for name, path in zip(CLASS_ORDER, files)}
        dseg, probs = segment_tissues(img, mask, priors=priors, prior_weight=self.inputs.prior_weight,
                                      mrf=self.inputs.mrf, iterations=self.inputs.iterations,
                                      seed=self.inputs.seed, threads=self.inputs.num_threads)
        self._results["dseg"] = _save(dseg, runtime.cwd, "dseg")
        self._results["dseg_tsv"] = _write_dseg_tsv(runtime.cwd)
        paths = {k: _save(v, runtime.cwd, f"label-{k}_probseg") for k, v in probs.items()}
        self._results["probsegs"] = [paths[k] for k in PROBSEG_ORDER]
        self._results["gm_probseg"], self._results["wm_probseg"], self._results["csf_probseg"] = (
            paths["GM"], paths["WM"], paths["CSF"])
        return runtime


class _FASTToDsegInputSpec(BaseInterfaceInputSpec):
    tissue_class_map = File(exists=True, mandatory=True, desc="FAST *_seg (1 CSF, 2 GM, 3 WM)")
    partial_volume_files = traits.List(File(exists=True), mandatory=True, desc="FAST pve_0..2")


class FASTToDseg(SimpleInterface):
    """FSL FAST outputs → the same dseg / probseg files as :class:`TissueSegmentation`."""

    input_spec = _FASTToDsegInputSpec
    output_spec = _SegmentOutputSpec

    def _run_interface(self, runtime):
        from bids_uad.algorithms.segmentation import fast_to_dseg

        seg = nib.load(self.inputs.tissue_class_map)
        dseg = nib.Nifti1Image(fast_to_dseg(np.asarray(seg.dataobj)), seg.affine)
        self._results["dseg"] = _save(dseg, runtime.cwd, "dseg")
        self._results["dseg_tsv"] = _write_dseg_tsv(runtime.cwd)
        pves = sorted(self.inputs.partial_volume_files)  # pve_0 CSF, pve_1 GM, pve_2 WM
        paths = {}
        for name, path in zip(CLASS_ORDER, pves):
            img = nib.load(path)
            paths[name] = _save(nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine),
                                runtime.cwd, f"label-{name}_probseg")
        self._results["probsegs"] = [paths[k] for k in PROBSEG_ORDER]
        self._results["gm_probseg"], self._results["wm_probseg"], self._results["csf_probseg"] = (
            paths["GM"], paths["WM"], paths["CSF"])
        return runtime


def fsl_bet(**inputs):
    """FSL ``bet`` configured for a bias-corrected T1w (robust centre, mask written)."""
    from nipype.interfaces import fsl

    bet = fsl.BET(mask=True, robust=True, frac=0.5, output_type="NIFTI_GZ")
    for key, value in inputs.items():
        setattr(bet.inputs, key, value)
    return bet


def fsl_fast(**inputs):
    """FSL ``fast``: 3 classes on a T1w brain, hard segmentation and partial-volume maps."""
    from nipype.interfaces import fsl

    fast = fsl.FAST(number_classes=3, img_type=1, segments=False, probability_maps=False,
                    output_type="NIFTI_GZ", no_bias=False, output_biascorrected=False)
    for key, value in inputs.items():
        setattr(fast.inputs, key, value)
    return fast


# --------------------------------------------------------------------------- masks
class _VentriclesInputSpec(BaseInterfaceInputSpec):
    dseg = File(exists=True, mandatory=True)
    prior = File(exists=True, mandatory=True, desc="ventricle prior on the dseg grid")
    threshold = traits.Float(0.3, usedefault=True)


class _MaskOutputSpec(TraitedSpec):
    out_file = traits.Str()


class VentricleMask(SimpleInterface):
    """Lateral ventricles: CSF ∩ warped template ventricle prior (whole components)."""

    input_spec = _VentriclesInputSpec
    output_spec = _MaskOutputSpec

    def _run_interface(self, runtime):
        from bids_uad.algorithms.segmentation import ventricle_mask

        dseg = nib.load(self.inputs.dseg)
        prior = np.asarray(nib.load(self.inputs.prior).dataobj, dtype=np.float32)
        vent = ventricle_mask(np.asarray(dseg.dataobj), prior, self.inputs.threshold)
        out = nib.Nifti1Image(vent.astype(np.uint8), dseg.affine)
        self._results["out_file"] = _save(out, runtime.cwd, "ventricles_mask")
        return runtime


class _AnalysisInputSpec(BaseInterfaceInputSpec):
    dseg = traits.Str(mandatory=True, desc="dseg ('' = skip)")
    ventricles = traits.Str("", usedefault=True)
    brain_mask = traits.Str("", usedefault=True, desc="optional: restrict to this mask too")
    fov_mask = traits.Str("", usedefault=True, desc="optional: the dwi field-of-view mask (hmc.fov_coverage)")


class AnalysisMask(SimpleInterface):
    """The scoring mask: GM ∪ WM minus the ventricles, within the interior of the brain mask (its
    boundary layer left out, :func:`~bids_uad.algorithms.masking.interior`) and the dwi field of
    view when given."""

    input_spec = _AnalysisInputSpec
    output_spec = _MaskOutputSpec

    def _run_interface(self, runtime):
        from bids_uad.algorithms.masking import interior
        from bids_uad.algorithms.segmentation import analysis_mask

        if not _given(self.inputs.dseg):
            self._results["out_file"] = ""
            return runtime
        dseg = nib.load(self.inputs.dseg)
        vent = np.asarray(nib.load(self.inputs.ventricles).dataobj) if _given(self.inputs.ventricles) else None
        mask = analysis_mask(np.asarray(dseg.dataobj), vent)
        for restrict, keep in ((self.inputs.brain_mask, interior), (self.inputs.fov_mask, None)):
            if _given(restrict):
                img = nib.load(restrict)
                if img.shape[:3] == dseg.shape[:3]:
                    inside = np.asarray(img.dataobj).reshape(dseg.shape[:3]) > 0
                    mask &= inside if keep is None else keep(inside)
        out = nib.Nifti1Image(mask.astype(np.uint8), dseg.affine)
        self._results["out_file"] = _save(out, runtime.cwd, "analysis_mask")
        return runtime


# --------------------------------------------------------------------------- FLAIR
class _FlairInputSpec(_AntsInputSpec):
    flair_file = traits.Str(mandatory=True, desc="FLAIR ('' = none: outputs are '')")
    t1w_file = File(exists=True, mandatory=True, desc="bias-corrected T1w (fixed)")
    t1w_mask = traits.Str("", usedefault=True)


class _FlairOutputSpec(TraitedSpec):
    out_file = traits.Str(desc="FLAIR on the T1w grid ('' when no FLAIR)")
    transforms = traits.List(traits.Str)


class FlairToT1w(SimpleInterface):
    """N4 + rigid (mutual information) registration of the FLAIR onto the T1w."""

    input_spec = _FlairInputSpec
    output_spec = _FlairOutputSpec

    def _run_interface(self, runtime):
        from bids_uad.algorithms.intensity import n4_correct_flair
        from bids_uad.algorithms.registration import register_flair

        set_itk_threads(self.inputs.num_threads)
        if not _given(self.inputs.flair_file):
            self._results["out_file"] = ""
            self._results["transforms"] = []
            return runtime
        flair = nib.load(self.inputs.flair_file)
        if flair.ndim > 3:
            flair = nib.Nifti1Image(np.asarray(flair.dataobj, dtype=np.float32)[..., 0], flair.affine)
        flair_n4, _ = n4_correct_flair(flair, threads=self.inputs.num_threads, seed=self.inputs.seed)
        n4_path = _save(flair_n4, runtime.cwd, "flair_n4")
        mask = self.inputs.t1w_mask if _given(self.inputs.t1w_mask) else None
        out, result = register_flair(self.inputs.t1w_file, n4_path, mask, seed=self.inputs.seed,
                                     threads=self.inputs.num_threads,
                                     out_prefix=Path(runtime.cwd) / "flair2t1w_")
        self._results["out_file"] = _save(out, runtime.cwd, "flair_space-T1w")
        self._results["transforms"] = result.forward
        return runtime
