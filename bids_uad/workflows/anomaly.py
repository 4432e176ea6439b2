"""Participant-level anomaly inference workflow: score, p-value and binary maps per model."""
from __future__ import annotations

from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from bids_uad.config import Settings
from bids_uad.interfaces.anomaly import AnomalyInference, ToTemplateSpace
from bids_uad.interfaces.derivatives import DerivativesDataSink
from bids_uad.models.validate import model_files


def resolve_model_files(path: str | Path) -> list[Path]:
    """``--model``: one ``model-<name>.json`` or a folder holding several (each with its tensors)."""
    return model_files(path)


#: output key -> (extra entities, BIDS suffix)
OUTPUTS = {
    "score": ({"space": "dwi", "stat": "score"}, "anomaly"),
    "pvalue": ({"space": "dwi", "stat": "pvalue"}, "anomaly"),
    "mask": ({"space": "dwi", "desc": "anomaly"}, "mask"),
}


def init_anomaly_wf(settings: Settings, name: str = "anomaly_wf"):
    """Inference for every model in ``settings.model``, maps written in diffusion space.

    inputnode: dwi_preproc, bval, bvec, brain_mask, analysis_mask ('' when none), source_entities,
    dwi2t1w_xfm and t1w2template_xfm (the anatomical workflow's composites, for template-space
    maps; unset: read from OUTPUT_DIR).
    outputnode: scores, masks (lists, one per model).
    """
    models = resolve_model_files(settings.model)
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["dwi_preproc", "bval", "bvec", "brain_mask",
                                                      "analysis_mask", "source_entities", "dwi2t1w_xfm",
                                                      "t1w2template_xfm"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["scores", "masks"]), name="outputnode")
    infer = pe.MapNode(AnomalyInference(threshold_method=settings.threshold or "", ensemble=settings.ensemble,
                                        device="cpu" if settings.device == "auto" else settings.device,
                                        threads=settings.omp_nthreads),
                       iterfield=["model_file"], name="infer", mem_gb=2.0)
    infer.inputs.model_file = [str(m) for m in models]
    common = {"output_dir": str(settings.output_dir), "bids_dir": str(settings.bids_dir), "datatype": "dwi"}
    sinks = {}
    for key, (extra, suffix) in OUTPUTS.items():
        sink = pe.MapNode(DerivativesDataSink(suffix=suffix, skip_empty=(key == "pvalue"), extra_entities=extra,
                                              **common),
                          iterfield=["in_file", "entities", "meta"], name=f"ds_{key}", run_without_submitting=True)
        workflow.connect([
            (infer, sink, [(key, "in_file"), ("meta", "meta"), ("out_entities", "entities")]),
            (inputnode, sink, [(("dwi_preproc", _as_list), "source_files")]),
        ])
        sinks[key] = sink
    if any(space.startswith("MNI") for space in settings.output_spaces):
        _add_template_outputs(workflow, settings, inputnode, infer, common)
    workflow.connect([
        (inputnode, infer, [("source_entities", "source_entities"), ("dwi_preproc", "dwi_file"), ("bval", "bval_file"), ("bvec", "bvec_file"),
                            ("brain_mask", "brain_mask"), ("analysis_mask", "analysis_mask")]),
        (sinks["score"], outputnode, [("out_file", "scores")]),
        (sinks["mask"], outputnode, [("out_file", "masks")]),
    ])
    return workflow


def _add_template_outputs(workflow, settings: Settings, inputnode, infer, common: dict) -> None:
    """Score and mask maps also in the MNI template actually available (named as such)."""
    from bids_uad.algorithms.templates import template_for_output_spaces

    template = template_for_output_spaces(settings.output_spaces)
    for key, kind, extra, suffix in (("score", "image", {"stat": "score"}, "anomaly"),
                                     ("mask", "mask", {"desc": "anomaly"}, "mask")):
        warp = pe.MapNode(ToTemplateSpace(output_dir=str(settings.output_dir), template_name=template.name,
                                          template_file=template.t1w, kind=kind),
                          iterfield=["in_file", "in_meta"], name=f"to_template_{key}", mem_gb=1.5)
        sink = pe.MapNode(DerivativesDataSink(suffix=suffix, skip_empty=True,
                                              extra_entities={**extra, "space": template.name}, **common),
                          iterfield=["in_file", "entities", "meta"], name=f"ds_template_{key}",
                          run_without_submitting=True)
        workflow.connect([
            (inputnode, warp, [("source_entities", "source_entities"), ("dwi2t1w_xfm", "dwi2t1w_xfm"),
                               ("t1w2template_xfm", "t1w2template_xfm")]),
            (infer, warp, [(key, "in_file"), ("meta", "in_meta")]),
            (infer, sink, [("out_entities", "entities")]),
            (warp, sink, [("out_file", "in_file"), ("meta", "meta")]),
            (inputnode, sink, [(("dwi_preproc", _as_list), "source_files")]),
        ])


def _as_list(value):
    return [value]
