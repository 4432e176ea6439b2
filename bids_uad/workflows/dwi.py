"""Diffusion preprocessing workflow: SDC → head motion/eddy → brain mask → tensor maps.

Wiring only; numerics are in :mod:`bids_uad.algorithms`, file handling in
:mod:`bids_uad.interfaces.dwi` (Python backend) and :mod:`bids_uad.interfaces.fsl` (FSL).
The backend is chosen once, by :meth:`Settings.resolved_backend`.
"""
from __future__ import annotations

from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from bids_uad.interfaces.dwi import (
    BrainMask,
    CombineRuns,
    DiffusionTissues,
    FAToTemplate,
    DenoiseDWI,
    EstimateSDC,
    MergeReports,
    MotionCorrect,
    TensorFit,
    TransferSDC,
)
from bids_uad.interfaces.derivatives import DerivativesDataSink

#: ``source_file``: the name whose entities the derivatives inherit (the raw dwi's path; for a
#: series made from several runs, a name carrying only what they share)
INPUT_FIELDS = ["dwi_file", "bval_file", "bvec_file", "dwi_metadata", "rpe_file", "rpe_metadata",
                "source_file", "sdc_partner"]
#: ``sdc_partner``: the field fitted for an opposite-PE full-DTI pair, handed from the first run's
#: workflow to the second's (python backend; see ``sdc_from_partner``)
OUTPUT_FIELDS = ["dwi_preproc", "bval", "bvec", "b0_ref", "brain_mask", "fa", "md", "ad", "rd", "s0",
                 "fieldmap_hz", "motion_tsv", "b0_pair_raw", "b0_pair_corrected", "backend_report",
                 "sdc_partner", "fov_mask"]
#: (output field, key of the outputs table bids_uad.bids.outputs.OUTPUTS, sidecar field of
#: MergeReports or None); every name inherits the raw dwi's entities (acq, dir, run, ...)
DERIVATIVES = (
    ("dwi_preproc", "dwi_preproc", "dwi_meta"),
    ("bval", "dwi_bval", None),
    ("bvec", "dwi_bvec", None),
    ("b0_ref", "b0_ref", "ref_meta"),
    ("brain_mask", "brain_mask", "mask_meta"),
    ("fieldmap_hz", "fieldmap", "field_meta"),
    ("motion_tsv", "motion", "motion_meta"),
) + tuple((key, key, "tensor_meta") for key in ("fa", "md", "ad", "rd", "s0"))

def init_dwi_preproc_wf(settings, name: str = "dwi_preproc_wf", denoise: str | None = None,
                        gibbs: bool = False, sdc_from_partner: bool = False) -> pe.Workflow:
    """Build the diffusion preprocessing workflow for one dwi series.

    ``denoise``: None, ``"mppca"`` or ``"patch2self"``; ``gibbs``: Gibbs-ringing removal.
    ``sdc_from_partner`` (python backend): this run is the second of an opposite-PE full-DTI pair;
    its field is not fitted again but taken from ``inputnode.sdc_partner`` (the first run's
    ``outputnode.sdc_partner``: one fit for the pair, moved into this run's frame).
    Inputs/outputs: see ``INPUT_FIELDS``/``OUTPUT_FIELDS``; derivatives are written through
    sink nodes into ``settings.output_dir``.
    """
    backend = settings.resolved_backend()
    threads = max(1, int(getattr(settings, "omp_nthreads", 1) or 1))
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(IdentityInterface(fields=INPUT_FIELDS), name="inputnode")
    inputnode.inputs.rpe_file = ""
    inputnode.inputs.rpe_metadata = {}
    inputnode.inputs.sdc_partner = {}
    outputnode = pe.Node(IdentityInterface(fields=OUTPUT_FIELDS), name="outputnode")

    den = pe.Node(DenoiseDWI(denoise=denoise or "none", gibbs=bool(gibbs)), name="denoise")
    tensor = pe.Node(TensorFit(), name="tensor")
    merge = pe.Node(MergeReports(backend=backend), name="merge_reports")
    wf.connect([
        (inputnode, den, [("dwi_file", "in_file"), ("bval_file", "bval_file")]),
        (den, merge, [("report", "denoise")]),
        (tensor, merge, [("report", "tensor")]),
        (tensor, outputnode, [(k, k) for k in ("fa", "md", "ad", "rd", "s0")]),
        (merge, outputnode, [("backend_report", "backend_report")]),
    ])

    if backend == "fsl":
        from bids_uad.interfaces.fsl import FSLDWIPreproc

        fslp = pe.Node(FSLDWIPreproc(num_threads=threads), name="fsl_preproc", n_procs=threads)
        outputnode.inputs.fov_mask = ""  # eddy's output has no field-of-view coverage: nothing left out
        wf.connect([
            (den, fslp, [("out_file", "dwi_file")]),
            (inputnode, fslp, [("bval_file", "bval_file"), ("bvec_file", "bvec_file"),
                               ("dwi_metadata", "dwi_metadata"), ("rpe_file", "rpe_file"),
                               ("rpe_metadata", "rpe_metadata")]),
            (fslp, tensor, [("out_file", "dwi_file"), ("out_bval", "bval_file"), ("out_bvec", "bvec_file"),
                            ("brain_mask", "mask_file")]),
            (fslp, merge, [("sdc_report", "sdc"), ("hmc_report", "hmc"), ("mask_report", "mask")]),
            (fslp, outputnode, [("out_file", "dwi_preproc"), ("out_bval", "bval"), ("out_bvec", "bvec"),
                                ("b0_ref", "b0_ref"), ("brain_mask", "brain_mask"),
                                ("fieldmap_hz", "fieldmap_hz"), ("motion_tsv", "motion_tsv"),
                                ("b0_pair_raw", "b0_pair_raw"), ("b0_pair_corrected", "b0_pair_corrected")]),
        ])
    else:
        hmc = pe.Node(MotionCorrect(num_threads=threads), name="hmc", n_procs=threads)
        mask = pe.Node(BrainMask(), name="brain_mask")
        if sdc_from_partner:
            sdc = pe.Node(TransferSDC(num_threads=threads), name="sdc", n_procs=threads)
            wf.connect([(den, sdc, [("out_file", "dwi_file")]), (inputnode, sdc, [("sdc_partner", "partner")])])
        else:
            sdc = pe.Node(EstimateSDC(num_threads=threads), name="sdc", n_procs=threads)
            wf.connect([
                (den, sdc, [("out_file", "dwi_file")]),
                (inputnode, sdc, [("bval_file", "bval_file"), ("bvec_file", "bvec_file"),
                                  ("dwi_metadata", "dwi_metadata"), ("rpe_file", "rpe_file"),
                                  ("rpe_metadata", "rpe_metadata")]),
                (sdc, outputnode, [("partner", "sdc_partner")]),
            ])
        wf.connect([
            (den, hmc, [("out_file", "dwi_file")]),
            (inputnode, hmc, [("bval_file", "bval_file"), ("bvec_file", "bvec_file")]),
            (sdc, hmc, [("fieldmap_hz", "fieldmap_hz"), ("pe_direction", "pe_direction"),
                        ("readout_scale", "readout_scale")]),
            (hmc, mask, [("b0_ref", "in_file")]),
            (hmc, tensor, [("out_file", "dwi_file"), ("out_bval", "bval_file"), ("out_bvec", "bvec_file")]),
            (mask, tensor, [("out_mask", "mask_file")]),
            (sdc, merge, [("report", "sdc")]),
            (hmc, merge, [("report", "hmc")]),
            (mask, merge, [("report", "mask")]),
            (hmc, outputnode, [("out_file", "dwi_preproc"), ("out_bval", "bval"), ("out_bvec", "bvec"),
                               ("b0_ref", "b0_ref"), ("motion_tsv", "motion_tsv"), ("fov_mask", "fov_mask")]),
            (mask, outputnode, [("out_mask", "brain_mask")]),
            (sdc, outputnode, [("fieldmap_hz", "fieldmap_hz"), ("b0_pair_raw", "b0_pair_raw"),
                               ("b0_pair_corrected", "b0_pair_corrected")]),
        ])

    connect_sinks(wf, settings, DERIVATIVES, outputnode, inputnode, merge, ("source_file",))
    return wf


def connect_sinks(wf: pe.Workflow, settings, derivatives, outputnode, inputnode, merge,
                  source_fields: tuple[str, ...]) -> None:
    """One derivatives sink per ``(field, outputs-table key, report key)``, named from the
    ``source_fields`` of ``inputnode``; bval/bvec get no sidecar."""
    for field, key, meta in derivatives:
        sink = pe.Node(
            DerivativesDataSink(output_dir=str(settings.output_dir), bids_dir=str(settings.bids_dir),
                                output=key, skip_empty=True),
            name=f"ds_{field}", run_without_submitting=True)
        if field in ("bval", "bvec"):
            sink.inputs.write_sidecar = False
        wf.connect([
            (outputnode, sink, [(field, "in_file")]),
            (inputnode, sink, [(f, f) for f in source_fields]),
        ])
        if meta:
            wf.connect(merge, meta, sink, "meta")


#: inputs of the combination of opposite-PE runs: lists with one item per run (first = reference)
COMBINE_INPUT_FIELDS = ["dwi_files", "bval_files", "bvec_files", "b0_refs", "brain_mask", "run_reports",
                        "run_names", "source_file", "source_files", "fov_masks"]
COMBINE_OUTPUT_FIELDS = ["dwi_preproc", "bval", "bvec", "b0_ref", "brain_mask", "fa", "md", "ad", "rd", "s0",
                         "fov_mask"]
#: the combined series' derivatives (no field map or motion table of its own: each run has them)
COMBINED_DERIVATIVES = tuple(d for d in DERIVATIVES if d[0] in COMBINE_OUTPUT_FIELDS)


def init_dwi_combine_wf(settings, name: str = "dwi_combine_wf") -> pe.Workflow:
    """Combine corrected opposite phase-encoding runs into one series (``algorithms.combine``),
    then brain mask and tensor maps of the combination; derivatives are named from
    ``source_file``, a name that carries only what the runs share (no ``dir-``)."""
    threads = max(1, int(getattr(settings, "omp_nthreads", 1) or 1))
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(IdentityInterface(fields=COMBINE_INPUT_FIELDS), name="inputnode")
    outputnode = pe.Node(IdentityInterface(fields=COMBINE_OUTPUT_FIELDS), name="outputnode")
    combine = pe.Node(CombineRuns(num_threads=threads), name="combine", n_procs=threads)
    mask = pe.Node(BrainMask(), name="brain_mask")
    tensor = pe.Node(TensorFit(), name="tensor")
    merge = pe.Node(MergeReports(backend=settings.resolved_backend()), name="merge_reports")
    wf.connect([
        (inputnode, combine, [(f, f) for f in ("dwi_files", "bval_files", "bvec_files", "b0_refs", "brain_mask",
                                               "run_reports", "run_names", "fov_masks")]),
        (combine, mask, [("b0_ref", "in_file")]),
        (combine, tensor, [("out_file", "dwi_file"), ("out_bval", "bval_file"), ("out_bvec", "bvec_file")]),
        (mask, tensor, [("out_mask", "mask_file")]),
        (combine, merge, [("report", "combine")]),
        (mask, merge, [("report", "mask")]),
        (tensor, merge, [("report", "tensor")]),
        (combine, outputnode, [("out_file", "dwi_preproc"), ("out_bval", "bval"), ("out_bvec", "bvec"),
                               ("b0_ref", "b0_ref"), ("fov_mask", "fov_mask")]),
        (mask, outputnode, [("out_mask", "brain_mask")]),
        (tensor, outputnode, [(k, k) for k in ("fa", "md", "ad", "rd", "s0")]),
    ])
    connect_sinks(wf, settings, COMBINED_DERIVATIVES, outputnode, inputnode, merge,
                  ("source_file", "source_files"))
    return wf


def init_dwi_tissue_wf(settings, name: str = "dwi_tissue_wf") -> pe.Workflow:
    """Tissue classes and analysis mask from the tensor maps, for a session without a T1w.

    inputnode: fa, md, brain_mask, source_file, fov_mask (optional); outputnode: dseg, analysis_mask (dwi grid),
    written as the same derivatives the anatomical workflow writes (``dwi_dseg``,
    ``analysis_mask``), their sidecars saying they come from the diffusion data.
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(IdentityInterface(fields=["fa", "md", "brain_mask", "source_file", "source_files", "fov_mask"]),
                        name="inputnode")
    inputnode.inputs.source_files = []  # the raw runs of a combined series ([]: source_file)
    inputnode.inputs.fov_mask = ""
    outputnode = pe.Node(IdentityInterface(fields=["dseg", "analysis_mask"]), name="outputnode")
    tissues = pe.Node(DiffusionTissues(), name="tissues")
    # the analysis mask is handed on once the template transform is on disk too (anomaly maps
    # in template space read it from the derivatives)
    ready = pe.Node(IdentityInterface(fields=["analysis_mask", "xfm"]), name="ready")
    ready.inputs.xfm = ""
    wf.connect([
        (inputnode, tissues, [("fa", "fa"), ("md", "md"), ("brain_mask", "brain_mask"), ("fov_mask", "fov_mask")]),
        (tissues, outputnode, [("dseg", "dseg")]),
        (tissues, ready, [("analysis_mask", "analysis_mask")]),
        (ready, outputnode, [("analysis_mask", "analysis_mask")]),
    ])
    for field, key, meta in (("dseg", "dwi_dseg", "dseg_meta"), ("dseg_tsv", "dwi_dseg_tsv", None),
                             ("analysis_mask", "analysis_mask", "analysis_meta")):
        sink = pe.Node(DerivativesDataSink(output_dir=str(settings.output_dir), bids_dir=str(settings.bids_dir),
                                           output=key, skip_empty=True),
                       name=f"ds_{field}", run_without_submitting=True)
        if meta is None:
            sink.inputs.write_sidecar = False
        else:
            wf.connect(tissues, meta, sink, "meta")
        wf.connect([(tissues, sink, [(field, "in_file")]),
                    (inputnode, sink, [("source_file", "source_file"), ("source_files", "source_files")])])
    if any(space.startswith("MNI") for space in getattr(settings, "output_spaces", ())):
        from bids_uad.algorithms.templates import template_for_output_spaces

        template = template_for_output_spaces(settings.output_spaces).name
        threads = max(1, int(getattr(settings, "omp_nthreads", 1) or 1))
        reg = pe.Node(FAToTemplate(output_spaces=list(settings.output_spaces), seed=int(settings.seed or 0),
                                   num_threads=threads), name="fa_to_template", n_procs=threads, mem_gb=2.0)
        wf.connect([(inputnode, reg, [("fa", "fa"), ("brain_mask", "brain_mask")])])
        for field, key in (("xfm", "xfm_dwi_to_template"), ("fa_template", "fa_template")):
            sink = pe.Node(DerivativesDataSink(output_dir=str(settings.output_dir), bids_dir=str(settings.bids_dir),
                                               output=key, params={"template": template}),
                           name=f"ds_{key}", run_without_submitting=True)
            wf.connect([(reg, sink, [(field, "in_file"), ("meta", "meta")]),
                        (inputnode, sink, [("source_file", "source_file"), ("source_files", "source_files")])])
            if key == "xfm_dwi_to_template":
                wf.connect(sink, "out_file", ready, "xfm")
    return wf
