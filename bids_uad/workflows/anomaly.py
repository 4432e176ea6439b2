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
from bids_uad.interfaces.findings import ControlsReference, Findings
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
#: the anatomical workflow's composite transforms ('' when not along the graph's edges: from OUTPUT_DIR)
TRANSFORM_INPUTS = ("dwi2t1w_xfm", "t1w2template_xfm", "t1w2dwi_xfm", "template2t1w_xfm")
#: output of AnomalyInference -> key of the outputs table (dwi space)
OUTPUTS = {"score": "anomaly_score", "pvalue": "anomaly_pvalue", "mask": "anomaly_mask"}
#: output of AnomalyInference -> (key of the outputs table in template space, resampling kind)
TEMPLATE_OUTPUTS = {"score": ("anomaly_score_template", "image"), "mask": ("anomaly_mask_template", "mask")}


def _model_file_settings(path: str | Path):
    """The ``settings.model`` of a model file's JSON, as attributes (name, normative_space, ...)."""
    import json
    from types import SimpleNamespace

    model = json.loads(Path(path).read_text()).get("settings", {}).get("model", {})
    return SimpleNamespace(name=model.get("name"), normative_space=model.get("normative_space"),
                           normative_template=model.get("normative_template", ""))


def template_models(settings: Settings) -> dict[str, str]:
    """{model: template} of the ``--model`` files that work in a template space (the template-space
    normative model, and networks whose score is referred to their controls' there): they need
    each run's transforms to the template and back."""
    from bids_uad.models.settings import needs_template

    found = {}
    for path in resolve_model_files(settings.model):
        model = _model_file_settings(path)
        if needs_template(model):
            found[model_name(path)] = model.normative_template
    return found


def template_normative_file(settings: Settings) -> Path | None:
    """The ``--model`` file of the template-space normative model (the findings' reference), or None."""
    from bids_uad.models.settings import is_template_normative

    return next((m for m in resolve_model_files(settings.model) if is_template_normative(_model_file_settings(m))),
                None)


def unscorable_models(settings: Settings, source_file: str | Path, edges: str = "") -> dict[str, str]:
    """{model: why} for the template-space models that cannot score the dwi run ``source_file``:
    its transforms to the template and back are not in OUTPUT_DIR, and do not come along the graph's
    edges (``edges``: the template of this graph's anatomical workflow, '' when none feeds this run).
    The participant level skips those models for the run with a warning (no fallback to another space)."""
    import numpy as np

    from bids_uad.interfaces.anomaly import template_route

    out = {}
    for model, template in template_models(settings).items():
        if edges and edges == template:
            continue
        route, missing = template_route(settings.output_dir, source_file, template, np.eye(4))
        if route is None:
            out[model] = "no transforms " + ", ".join(missing)
    return out


def init_anomaly_wf(settings: Settings, name: str = "anomaly_wf", skip: tuple[str, ...] = ()):
    """Inference for every model in ``settings.model`` (but those named in ``skip``), maps written
    in diffusion space.

    inputnode: dwi_preproc, bval, bvec, brain_mask, analysis_mask ('' when none), source_file
    (the raw dwi run or its preprocessed derivative: the maps inherit its entities), dwi2t1w_xfm,
    t1w2template_xfm, t1w2dwi_xfm and template2t1w_xfm (the anatomical workflow's composites, for
    template-space maps and template-space models; unset: read from OUTPUT_DIR through the outputs
    table), fa, md, ad, rd (tensor maps) and dseg (dwi-space tissue classes; '' when none) for the
    findings' deviation signature (whose reference, the controls' values from a template-space
    normative model where there is one, one node computes for the findings of every model).
    outputnode: scores, masks, findings (the stored finding label images; lists, one per model).
    """
    models = [m for m in resolve_model_files(settings.model) if model_name(m) not in skip]
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["dwi_preproc", "bval", "bvec", "brain_mask",
                                                      "analysis_mask", "source_file", *TRANSFORM_INPUTS,
                                                      *SIGNATURE_INPUTS]),
                        name="inputnode")
    for field in SIGNATURE_INPUTS + TRANSFORM_INPUTS:
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
    controls = _add_controls_reference(workflow, settings, inputnode)
    for index, model_file in enumerate(models, start=1):
        model = model_name(model_file)
        infer = pe.Node(AnomalyInference(model_file=str(model_file), threshold_method=settings.threshold or "",
                                         ensemble={True: "yes", False: "no"}.get(settings.ensemble, ""),
                                         device="cpu" if settings.device == "auto" else settings.device,
                                         threads=settings.omp_nthreads, output_dir=str(settings.output_dir)),
                        name=f"infer_{model}", mem_gb=2.0)
        workflow.connect([(inputnode, infer, [("dwi_preproc", "dwi_file"), ("bval", "bval_file"),
                                              ("bvec", "bvec_file"), ("brain_mask", "brain_mask"),
                                              ("analysis_mask", "analysis_mask"), ("source_file", "source_file"),
                                              *((f, f) for f in TRANSFORM_INPUTS)])])
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
        findings = _add_findings(workflow, settings, inputnode, infer, common, template, model, controls)
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
                                       template_mask=template.brain_mask, kind=kind),
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


def _add_controls_reference(workflow, settings: Settings, inputnode):
    """One node per run carrying the controls' values of the template-space normative model among
    the ``--model`` files (if any) back to the run's dwi grid: the deviation signature's reference
    for the findings of every model (:class:`~bids_uad.interfaces.findings.ControlsReference`; a run
    without the transforms, for which the model is skipped, gets the subject's tissue, and its
    sidecar says why)."""
    normative = template_normative_file(settings)
    node = pe.Node(ControlsReference(model_file=str(normative) if normative is not None else "",
                                     output_dir=str(settings.output_dir)),
                   name="controls_reference", mem_gb=1.0)
    workflow.connect([(inputnode, node, [("dwi_preproc", "dwi_file"), ("source_file", "source_file"),
                                         *((f, f) for f in TRANSFORM_INPUTS)])])
    return node


def _add_findings(workflow, settings: Settings, inputnode, infer, common: dict, template, model: str,
                  controls=None):
    """The findings table of one model's written map (with its sidecar) and the finding label image;
    ``controls``: the run's ControlsReference node (the deviation signature's reference);
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
        *([(controls, node, [("out_file", "controls_reference"), ("meta", "controls_meta")])] if controls else []),
        (node, sink, [("out_table", "in_file"), ("meta", "meta")]),
        (inputnode, sink, [("source_file", "source_file"), (("dwi_preproc", _as_list), "source_files")]),
        (node, labels, [("out_labels", "in_file"), ("labels_meta", "meta")]),
        (inputnode, labels, [("source_file", "source_file"), (("dwi_preproc", _as_list), "source_files")]),
    ])
    return labels


def _as_list(value):
    return [value]
