"""Thin nipype interface around anomaly inference (files in → scoring → files out)."""
from __future__ import annotations

import os
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)

import numpy as np

from bids_uad.bids import outputs
from bids_uad.bids.outputs import sidecar_fields
from bids_uad.interfaces.workfiles import work_nifti


class _AnomalyInferenceInputSpec(BaseInterfaceInputSpec):
    dwi_file = File(exists=True, mandatory=True, desc="preprocessed dwi in diffusion space (with b0s)")
    bval_file = File(exists=True, mandatory=True)
    bvec_file = File(exists=True, mandatory=True)
    brain_mask = File(exists=True, mandatory=True)
    analysis_mask = traits.Str("", usedefault=True, desc="WM ∪ GM minus ventricles; '' = brain mask")
    model_file = File(exists=True, mandatory=True, desc="model-<name>.json (with its .safetensors)")
    threshold_method = traits.Str("", usedefault=True, desc="'' = the method stored in the model file")
    ensemble = traits.Enum("", "yes", "no", usedefault=True,
                           desc="mean score of all fold models: '' = the model file's choice")
    device = traits.Str("cpu", usedefault=True)
    threads = traits.Int(1, usedefault=True)
    # a template-space model (the template-space normative model) needs the run's transforms both ways
    output_dir = traits.Str("", usedefault=True, desc="OUTPUT_DIR holding the transforms (template-space models)")
    source_file = traits.Str("", usedefault=True, desc="the dwi run (its entities find its transforms)")
    dwi2t1w_xfm = traits.Str("", usedefault=True, desc="dwi → T1w composite ('' : from OUTPUT_DIR)")
    t1w2template_xfm = traits.Str("", usedefault=True, desc="T1w → template composite ('' : from OUTPUT_DIR)")
    t1w2dwi_xfm = traits.Str("", usedefault=True, desc="T1w → dwi composite ('' : from OUTPUT_DIR)")
    template2t1w_xfm = traits.Str("", usedefault=True, desc="template → T1w composite ('' : from OUTPUT_DIR)")


class _AnomalyInferenceOutputSpec(TraitedSpec):
    score = File(desc="anomaly score map")
    pvalue = traits.Either(File, traits.Str, desc="conformal p-value map ('' when uncalibrated)")
    mask = File(desc="binary anomaly mask (thresholded, opened)")
    model_name = traits.Str()
    meta = traits.Dict(desc="provenance for the sidecars (BIDS CamelCase keys)")
    scoring = traits.Dict(desc="the model's scoring settings the findings use: fdr_q, min_cluster_ml")


class AnomalyInference(SimpleInterface):
    """Score one subject with a trained model and threshold the map."""

    input_spec = _AnomalyInferenceInputSpec
    output_spec = _AnomalyInferenceOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib
        import numpy as np
        import torch

        from bids_uad.bids.gradients import load_gradients
        from bids_uad.scoring.inference import infer
        from bids_uad.models.bundle import load_bundle
        from bids_uad.models.settings import needs_template

        torch.set_num_threads(max(1, self.inputs.threads))
        img = nib.load(self.inputs.dwi_file)
        dwi = np.asarray(img.dataobj, dtype=np.float32)
        table = load_gradients(self.inputs.bval_file, self.inputs.bvec_file, dwi.shape[3], image_path=self.inputs.dwi_file)
        brain = np.asarray(nib.load(self.inputs.brain_mask).dataobj) > 0
        analysis = None
        if self.inputs.analysis_mask:
            analysis = (np.asarray(nib.load(self.inputs.analysis_mask).dataobj) > 0) & brain
        bundle = load_bundle(self.inputs.model_file, device=self.inputs.device)
        route = None
        if needs_template(bundle.settings.model):
            from bids_uad.errors import InputMissingError

            template = bundle.settings.model.normative_template
            route, missing = template_route(self.inputs.output_dir, self.inputs.source_file or self.inputs.dwi_file,
                                            template, img.affine, self._given_transforms())
            if route is None:
                raise InputMissingError(f"{bundle.name} works in {template}: transforms missing for "
                                        f"{Path(self.inputs.source_file or self.inputs.dwi_file).name}: "
                                        + ", ".join(missing), self.inputs.dwi_file)
        result = infer(bundle, dwi, table.bvals, table.bvecs, brain, analysis,
                       method=self.inputs.threshold_method or None,
                       ensemble={"yes": True, "no": False}.get(self.inputs.ensemble), route=route)
        header = img.header.copy()
        header.set_data_dtype(np.float32)
        out = Path(runtime.cwd)

        def save(array, stem, dtype):
            path = work_nifti(out, stem)
            nib.save(nib.Nifti1Image(array.astype(dtype), img.affine), path)
            return path

        self._results["score"] = save(result.score, "score", np.float32)
        self._results["mask"] = save(result.mask, "mask", np.uint8)
        self._results["pvalue"] = save(result.pvalues, "pvalue", np.float32) if result.pvalues is not None else ""
        self._results["model_name"] = bundle.name
        info = dict(result.info)
        info["model_file"] = os.path.basename(self.inputs.model_file)
        info["analysis_mask"] = "WM ∪ GM minus ventricles" if self.inputs.analysis_mask else "brain mask"
        info["n_anomalous_voxels"] = int(result.mask.sum())
        info["voxel_volume_mm3"] = float(np.prod(img.header.get_zooms()[:3]))
        self._results["meta"] = sidecar_fields(info)
        scoring = bundle.settings.scoring
        self._results["scoring"] = {"fdr_q": float(scoring.fdr_q), "min_cluster_ml": float(scoring.min_cluster_ml),
                                    "finding_min_ml": result.info.get("finding_min_volume_ml"),
                                    "calibrated": result.pvalues is not None}
        return runtime

    def _given_transforms(self) -> dict:
        """The composites that came along the graph's edges, by outputs-table key."""
        return {"xfm_dwi_to_t1w": self.inputs.dwi2t1w_xfm, "xfm_t1w_to_template": self.inputs.t1w2template_xfm,
                "xfm_t1w_to_dwi": self.inputs.t1w2dwi_xfm, "xfm_template_to_t1w": self.inputs.template2t1w_xfm}


class _ToTemplateInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="a map in diffusion space")
    output_dir = traits.Str(mandatory=True, desc="OUTPUT_DIR holding the anatomical transforms")
    source_file = traits.Str(mandatory=True, desc="the dwi run the map belongs to (its name gives the entities)")
    template_name = traits.Str(mandatory=True)
    template_mask = File(exists=True, mandatory=True,
                         desc="the template's brain mask: the output grid covers it at the map's resolution")
    kind = traits.Enum("image", "mask", usedefault=True, desc="image: linear; mask: nearest label")
    in_meta = traits.Dict(desc="provenance of the diffusion-space map, carried into the sidecar")
    dwi2t1w_xfm = traits.Str(desc="dwi → T1w composite from the anatomical workflow ('' or unset: "
                                  "the session's from-dwi_to-T1w transform in OUTPUT_DIR)")
    t1w2template_xfm = traits.Str(desc="T1w → template composite from the anatomical workflow ('' or "
                                       "unset: the session's from-T1w_to-<template> transform in OUTPUT_DIR)")


class _ToTemplateOutputSpec(TraitedSpec):
    out_file = traits.Str(desc="the map in template space ('' when the transforms are missing)")
    meta = traits.Dict()


def template_transforms(output_dir: str | Path, source_file: str | Path, template: str) -> tuple[Path, Path] | None:
    """(T1w→template, dwi→T1w) transforms of the dwi run ``source_file``, found through the
    outputs table; None when either is missing (no T1w, or the T1w was registered to another run)."""
    ents = outputs.source_entities(source_file)
    subject, session = ents["sub"], ents.get("ses")
    dwi2t1w = outputs.find_run(output_dir, "xfm_dwi_to_t1w", subject, session, outputs.run_entities(ents))
    t1w2tpl = outputs.find(output_dir, "xfm_t1w_to_template", subject, session, template=template)
    if not (dwi2t1w and t1w2tpl):
        # no T1w: the run's own FA -> template registration (dwi-only sessions)
        direct = [p for p in outputs.find(output_dir, "xfm_dwi_to_template", subject, session, template=template)
                  if outputs.run_entities(p.name) == outputs.run_entities(ents)]
        return (direct[0],) if direct else None
    return t1w2tpl[0], dwi2t1w[0]


#: the transforms a template-space model needs per dwi run: (outputs-table key, what the file is)
ROUTE_TRANSFORMS = (("xfm_dwi_to_t1w", "from-dwi_to-T1w"), ("xfm_t1w_to_template", "from-T1w_to-{template}"),
                    ("xfm_t1w_to_dwi", "from-T1w_to-dwi"), ("xfm_template_to_t1w", "from-{template}_to-T1w"))


def template_route(output_dir: str | Path, source_file: str | Path, template: str, dwi_affine,
                   given: dict | None = None):
    """(the :class:`~bids_uad.algorithms.registration.TemplateRoute` of the dwi run ``source_file``
    to ``template`` and back, or None; the missing transforms, named) for a template-space model.

    Both directions are needed: ``from-dwi_to-T1w`` + ``from-T1w_to-<template>`` to the template,
    ``from-<template>_to-T1w`` + ``from-T1w_to-dwi`` back (the anatomical workflow writes all four).
    ``given``: {outputs-table key: path} from the graph's edges (the same run's anatomical
    workflow), used before OUTPUT_DIR.  A dwi-only run (``from-dwi_to-<template>``, no inverse
    written) has no route back: refused, named as missing.
    """
    from bids_uad.algorithms.registration import TemplateRoute

    given = {k: v for k, v in (given or {}).items() if v}
    ents = outputs.source_entities(source_file)
    subject, session, run = ents["sub"], ents.get("ses"), outputs.run_entities(ents)
    found = {}
    for key, _ in ROUTE_TRANSFORMS:
        if key in given:
            found[key] = Path(given[key])
            continue
        if key in ("xfm_dwi_to_t1w", "xfm_t1w_to_dwi"):
            hits = outputs.find_run(output_dir, key, subject, session, run)
        else:
            hits = outputs.find(output_dir, key, subject, session, template=template)
        if hits:
            found[key] = Path(hits[0])
    missing = [label.format(template=template) for key, label in ROUTE_TRANSFORMS if key not in found]
    if missing:
        direct = template_transforms(output_dir, source_file, template)
        if direct is not None and len(direct) == 1:
            missing.append(f"from-{template}_to-dwi (this run registers its FA to the template without a T1w; "
                           "that route writes no inverse)")
        return None, missing
    route = TemplateRoute(template, tuple(np.asarray(dwi_affine, float).ravel()),
                          (str(found["xfm_t1w_to_template"]), str(found["xfm_dwi_to_t1w"])),
                          (str(found["xfm_t1w_to_dwi"]), str(found["xfm_template_to_t1w"])))
    return route, []


def warp_to_template(img, source_file: str, output_dir: str, template_name: str, template_file,
                     dwi2t1w_xfm: str = "", t1w2template_xfm: str = "", kind: str = "image"):
    """(``img`` resampled onto the template in one step, the transforms used), or (None, None) with a
    warning when the run has no transforms to the template.

    The transforms given (the anatomical workflow's composites) are used when both are set;
    otherwise they are found in OUTPUT_DIR (:func:`template_transforms`).  ``kind``: ``image``
    (linear) or ``label`` (nearest label, integer output).  ``template_file``: the output grid (a
    path or an image).
    """
    import logging

    import nibabel as nib

    from bids_uad.algorithms.registration import apply_transforms, dwi_to_template

    if dwi2t1w_xfm and t1w2template_xfm:
        found = (Path(t1w2template_xfm), Path(dwi2t1w_xfm))
    else:
        found = template_transforms(output_dir, source_file, template_name)
    if found is None:
        logging.getLogger("bids_uad.anomaly").warning(
            "%s: no anatomical transforms (from-dwi_to-T1w of this run, from-T1w_to-%s): %s map not written",
            Path(source_file).name, template_name, template_name)
        return None, None
    reference = template_file if isinstance(template_file, nib.Nifti1Image) else nib.load(template_file)
    if len(found) == 2:
        warped = dwi_to_template(img, reference, [str(found[1])], [str(found[0])], kind)
    else:  # dwi-only: the FA -> template registration of this run
        warped = apply_transforms(img, reference, [str(found[0])], kind)
    return warped, found


class ToTemplateSpace(SimpleInterface):
    """Carry a diffusion-space map to the template in one resampling (dwi → T1w → template).

    The transforms come along the graph's edges from the session's anatomical workflow when it
    runs in the same graph (``dwi2t1w_xfm``, ``t1w2template_xfm``); otherwise they are found in
    the derivatives (:func:`template_transforms`: the run's ``from-dwi_to-T1w`` and the session's
    ``from-T1w_to-<template>``, or, without a T1w, the run's own ``from-dwi_to-<template>``).
    Without any it writes nothing and says so in the log.

    The output grid covers the template's brain at the map's own resolution (the isotropic voxel of
    the same volume, :func:`~bids_uad.algorithms.templates.native_resolution_mm`; fMRIPrep's
    ``res-native``), not the template's 1 mm: a 2 mm map carried to 1 mm has 8x the voxels and no
    more information.
    """

    input_spec = _ToTemplateInputSpec
    output_spec = _ToTemplateOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib

        from nipype.interfaces.base import isdefined

        from bids_uad.algorithms.templates import native_resolution_mm, native_template_reference

        given = [x if isdefined(x) else "" for x in (self.inputs.dwi2t1w_xfm, self.inputs.t1w2template_xfm)]
        kind = "label" if self.inputs.kind == "mask" else "image"
        img = nib.load(self.inputs.in_file)
        resolution = native_resolution_mm(img.header.get_zooms()[:3])
        reference = native_template_reference(str(self.inputs.template_mask), resolution)
        warped, found = warp_to_template(img, self.inputs.source_file, self.inputs.output_dir,
                                         self.inputs.template_name, reference, given[0], given[1], kind)
        self._results["meta"] = {}
        if warped is None:
            self._results["out_file"] = ""
            return runtime
        out = work_nifti(runtime.cwd, "warped_mask" if kind == "label" else "warped")
        if kind == "label":
            warped = nib.Nifti1Image(warped.get_fdata().astype("uint8"), warped.affine)
        nib.save(warped, out)
        self._results["out_file"] = out
        self._results["meta"] = {**(self.inputs.in_meta or {}), "Transforms": [t.name for t in found],
                                 "Template": self.inputs.template_name,
                                 "Resolution": f"{resolution:g} mm isotropic: the diffusion map's own voxel "
                                               "volume, on a grid covering the template brain (res-native)",
                                 "Interpolation": "nearest label" if kind == "label" else "linear"}
        return runtime
