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
    DenoiseDWI,
    DerivativeEntities,
    DwiDerivativesSink,
    EstimateSDC,
    MergeReports,
    MotionCorrect,
    TensorFit,
)

INPUT_FIELDS = ["dwi_file", "bval_file", "bvec_file", "dwi_metadata", "rpe_file", "rpe_metadata",
                "source_entities"]
OUTPUT_FIELDS = ["dwi_preproc", "bval", "bvec", "b0_ref", "brain_mask", "fa", "md", "ad", "rd", "s0",
                 "fieldmap_hz", "motion_tsv", "b0_pair_raw", "b0_pair_corrected", "backend_report"]
#: (output field, own entities, suffix, sidecar field of MergeReports or None)
DERIVATIVES = (
    ("dwi_preproc", {"space": "dwi", "desc": "preproc"}, "dwi", "dwi_meta"),
    ("bval", {"space": "dwi", "desc": "preproc"}, "dwi", None),
    ("bvec", {"space": "dwi", "desc": "preproc"}, "dwi", None),
    ("b0_ref", {"space": "dwi", "desc": "b0"}, "dwiref", "ref_meta"),
    ("brain_mask", {"space": "dwi", "desc": "brain"}, "mask", "mask_meta"),
    ("fieldmap_hz", {"space": "dwi", "desc": "susceptibility"}, "fieldmap", "field_meta"),
    ("motion_tsv", {"desc": "motion"}, "timeseries", "motion_meta"),
) + tuple(
    (key, {"space": "dwi", "model": "tensor", "param": key}, "dwimap", "tensor_meta")
    for key in ("fa", "md", "ad", "rd", "s0")
)


def init_dwi_preproc_wf(settings, name: str = "dwi_preproc_wf", denoise: str | None = None,
                        gibbs: bool = False) -> pe.Workflow:
    """Build the diffusion preprocessing workflow for one dwi series.

    ``denoise``: None, ``"mppca"`` or ``"patch2self"``; ``gibbs``: Gibbs-ringing removal.
    Inputs/outputs: see ``INPUT_FIELDS``/``OUTPUT_FIELDS``; derivatives are written through
    sink nodes into ``settings.output_dir``.
    """
    backend = settings.resolved_backend()
    threads = max(1, int(getattr(settings, "omp_nthreads", 1) or 1))
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(IdentityInterface(fields=INPUT_FIELDS), name="inputnode")
    inputnode.inputs.rpe_file = ""
    inputnode.inputs.rpe_metadata = {}
    outputnode = pe.Node(IdentityInterface(fields=OUTPUT_FIELDS), name="outputnode")

    entities = pe.Node(DerivativeEntities(), name="entities")
    den = pe.Node(DenoiseDWI(denoise=denoise or "none", gibbs=bool(gibbs)), name="denoise")
    tensor = pe.Node(TensorFit(), name="tensor")
    merge = pe.Node(MergeReports(backend=backend), name="merge_reports")
    wf.connect([
        (inputnode, entities, [("source_entities", "source_entities")]),
        (inputnode, den, [("dwi_file", "in_file"), ("bval_file", "bval_file")]),
        (den, merge, [("report", "denoise")]),
        (tensor, merge, [("report", "tensor")]),
        (tensor, outputnode, [(k, k) for k in ("fa", "md", "ad", "rd", "s0")]),
        (merge, outputnode, [("backend_report", "backend_report")]),
    ])

    if backend == "fsl":
        from bids_uad.interfaces.fsl import FSLDWIPreproc

        fslp = pe.Node(FSLDWIPreproc(num_threads=threads), name="fsl_preproc", n_procs=threads)
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
        sdc = pe.Node(EstimateSDC(num_threads=threads), name="sdc", n_procs=threads)
        hmc = pe.Node(MotionCorrect(num_threads=threads), name="hmc", n_procs=threads)
        mask = pe.Node(BrainMask(), name="brain_mask")
        wf.connect([
            (den, sdc, [("out_file", "dwi_file")]),
            (inputnode, sdc, [("bval_file", "bval_file"), ("bvec_file", "bvec_file"),
                              ("dwi_metadata", "dwi_metadata"), ("rpe_file", "rpe_file"),
                              ("rpe_metadata", "rpe_metadata")]),
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
                               ("b0_ref", "b0_ref"), ("motion_tsv", "motion_tsv")]),
            (mask, outputnode, [("out_mask", "brain_mask")]),
            (sdc, outputnode, [("fieldmap_hz", "fieldmap_hz"), ("b0_pair_raw", "b0_pair_raw"),
                               ("b0_pair_corrected", "b0_pair_corrected")]),
        ])

    for field, own, suffix, meta in DERIVATIVES:
        sink = pe.Node(
            DwiDerivativesSink(output_dir=str(settings.output_dir), bids_dir=str(settings.bids_dir),
                               entities=own, suffix=suffix, datatype="dwi"),
            name=f"ds_{field}", run_without_submitting=True)
        if field in ("bval", "bvec"):
            sink.inputs.write_sidecar = False
        wf.connect([
            (outputnode, sink, [(field, "in_file")]),
            (entities, sink, [("entities", "base_entities")]),
            (inputnode, sink, [("dwi_file", "source_file")]),
        ])
        if meta:
            wf.connect(merge, meta, sink, "meta")
    return wf
