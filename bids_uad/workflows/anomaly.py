"""Participant-level anomaly inference workflow: score, p-value and binary maps per model.

One inference node per trained model; every map is named through the outputs table
(:mod:`bids_uad.bids.outputs`) with the entities of the dwi run it scores (``source_file``)
and ``model-<name>``, so each dwi run of a session gets its own maps.
"""
from __future__ import annotations

from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from bids_uad.config import Settings
from bids_uad.interfaces.anomaly import AnomalyInference, ToTemplateSpace
from bids_uad.interfaces.derivatives import DerivativesDataSink
from bids_uad.interfaces.findings import Findings
from bids_uad.models.validate import model_files


def resolve_model_files(path: str | Path) -> list[Path]:
    """``--model``: one ``model-<name>.json`` or a folder holding several (each with its tensors)."""
    return model_files(path)


def model_name(model_file: str | Path) -> str:
    """``dae`` for ``model-dae.json``: the ``model-`` entity of every map the model makes."""
    stem = Path(model_file).name.removesuffix(".json")
    return stem.removeprefix("model-")


#: inputs of the findings' deviation signature ('' when not available)
SIGNATURE_INPUTS = ("fa", "md", "ad", "rd", "dseg")
#: output of AnomalyInference -> key of the outputs table (dwi space)
OUTPUTS = {"score": "anomaly_score", "pvalue": "anomaly_pvalue", "mask": "anomaly_mask"}
#: output of AnomalyInference -> (key of the outputs table in template space, resampling kind)
TEMPLATE_OUTPUTS = {"score": ("anomaly_score_template", "image"), "mask": ("anomaly_mask_template", "mask")}


def init_anomaly_wf(settings: Settings, name: str = "anomaly_wf"):
    """Inference for every model in ``settings.model``, maps written in diffusion space.

    inputnode: dwi_preproc, bval, bvec, brain_mask, analysis_mask ('' when none), source_file
    (the raw dwi run or its preprocessed derivative: the maps inherit its entities), dwi2t1w_xfm
    and t1w2template_xfm (the anatomical workflow's composites, for template-space maps; unset:
    read from OUTPUT_DIR through the outputs table), fa, md, ad, rd (tensor maps) and dseg (dwi-space
    tissue classes; '' when none) for the findings' deviation signature.
    outputnode: scores, masks, findings (the stored finding label images; lists, one per model).
    """
    models = resolve_model_files(settings.model)
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["dwi_preproc", "bval", "bvec", "brain_mask",
                                                      "analysis_mask", "source_file", "dwi2t1w_xfm",
                                                      "t1w2template_xfm", *SIGNATURE_INPUTS]),
                        name="inputnode")
    for field in SIGNATURE_INPUTS:
        setattr(inputnode.inputs, field, "")
    outputnode = pe.Node(niu.IdentityInterface(fields=["scores", "masks", "findings"]), name="outputnode")
    scores = pe.Node(niu.Merge(len(models)), name="merge_scores", run_without_submitting=True)
    masks = pe.Node(niu.Merge(len(models)), name="merge_masks", run_without_submitting=True)
    tables = pe.Node(niu.Merge(len(models)), name="merge_findings", run_without_submitting=True)
    template = None
    if any(space.startswith("MNI") for space in settings.output_spaces):
        from bids_uad.algorithms.templates import template_for_output_spaces

        template = template_for_output_spaces(settings.output_spaces)
    common = {"output_dir": str(settings.output_dir), "bids_dir": str(settings.bids_dir)}
    for index, model_file in enumerate(models, start=1):
        model = model_name(model_file)
        infer = pe.Node(AnomalyInference(model_file=str(model_file), threshold_method=settings.threshold or "",
                                         ensemble={True: "yes", False: "no"}.get(settings.ensemble, ""),
                                         device="cpu" if settings.device == "auto" else settings.device,
                                         threads=settings.omp_nthreads),
                        name=f"infer_{model}", mem_gb=2.0)
        workflow.connect([(inputnode, infer, [("dwi_preproc", "dwi_file"), ("bval", "bval_file"),
                                              ("bvec", "bvec_file"), ("brain_mask", "brain_mask"),
                                              ("analysis_mask", "analysis_mask")])])
        for field, key in OUTPUTS.items():
            sink = pe.Node(DerivativesDataSink(output=key, params={"model": model}, skip_empty=(field == "pvalue"),
                                               **common), name=f"ds_{key}_{model}", run_without_submitting=True)
            workflow.connect([
                (infer, sink, [(field, "in_file"), ("meta", "meta")]),
                (inputnode, sink, [("source_file", "source_file"), (("dwi_preproc", _as_list), "source_files")]),
            ])
            if field == "score":
                workflow.connect(sink, "out_file", scores, f"in{index}")
            elif field == "mask":
                workflow.connect(sink, "out_file", masks, f"in{index}")
        if template is not None:
            _add_template_outputs(workflow, settings, inputnode, infer, common, template, model)
        findings = _add_findings(workflow, settings, inputnode, infer, common, template, model)
        workflow.connect(findings, "out_file", tables, f"in{index}")
    workflow.connect([
        (scores, outputnode, [("out", "scores")]),
        (masks, outputnode, [("out", "masks")]),
        (tables, outputnode, [("out", "findings")]),
    ])
    return workflow


def _add_template_outputs(workflow, settings: Settings, inputnode, infer, common: dict, template,
                          model: str) -> None:
    """Score and mask maps also in the MNI template actually available (named as such)."""
    for field, (key, kind) in TEMPLATE_OUTPUTS.items():
        warp = pe.Node(ToTemplateSpace(output_dir=str(settings.output_dir), template_name=template.name,
                                       template_file=template.t1w, kind=kind),
                       name=f"to_template_{field}_{model}", mem_gb=1.5)
        sink = pe.Node(DerivativesDataSink(output=key, params={"model": model, "template": template.name},
                                           skip_empty=True, **common),
                       name=f"ds_{key}_{model}", run_without_submitting=True)
        workflow.connect([
            (inputnode, warp, [("source_file", "source_file"), ("dwi2t1w_xfm", "dwi2t1w_xfm"),
                               ("t1w2template_xfm", "t1w2template_xfm")]),
            (infer, warp, [(field, "in_file"), ("meta", "in_meta")]),
            (warp, sink, [("out_file", "in_file"), ("meta", "meta")]),
            (inputnode, sink, [("source_file", "source_file"), (("dwi_preproc", _as_list), "source_files")]),
        ])


def _add_findings(workflow, settings: Settings, inputnode, infer, common: dict, template, model: str):
    """The findings table of one model's written map (with its sidecar) and the finding label image;
    returns the label image's sink (what the longitudinal stage reads, so it waits for it)."""
    node = pe.Node(Findings(output_dir=str(settings.output_dir),
                            template_name=template.name if template is not None else "",
                            template_file=str(template.t1w) if template is not None else "",
                            min_volume_ml=-1.0 if getattr(settings, "findings_min_volume", None) is None
                            else float(settings.findings_min_volume)),
                   name=f"findings_{model}", mem_gb=1.0)
    sink = pe.Node(DerivativesDataSink(output="findings_table", params={"model": model}, **common),
                   name=f"ds_findings_table_{model}", run_without_submitting=True)
    labels = pe.Node(DerivativesDataSink(output="findings_dseg", params={"model": model}, **common),
                     name=f"ds_findings_dseg_{model}", run_without_submitting=True)
    workflow.connect([
        (infer, node, [("mask", "mask"), ("score", "score"), ("pvalue", "pvalue"), ("scoring", "scoring"),
                       ("meta", "in_meta")]),
        (inputnode, node, [("brain_mask", "brain_mask"), ("analysis_mask", "analysis_mask"),
                           ("dwi_preproc", "dwi_file"), ("bval", "bval_file"), ("bvec", "bvec_file"),
                           ("source_file", "source_file"), ("dwi2t1w_xfm", "dwi2t1w_xfm"),
                           ("t1w2template_xfm", "t1w2template_xfm"), *((f, f) for f in SIGNATURE_INPUTS)]),
        (node, sink, [("out_table", "in_file"), ("meta", "meta")]),
        (inputnode, sink, [("source_file", "source_file"), (("dwi_preproc", _as_list), "source_files")]),
        (node, labels, [("out_labels", "in_file"), ("labels_meta", "meta")]),
        (inputnode, labels, [("source_file", "source_file"), (("dwi_preproc", _as_list), "source_files")]),
    ])
    return labels


def _as_list(value):
    return [value]
