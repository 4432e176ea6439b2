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
    EstimateSDC,
    MergeReports,
    MotionCorrect,
    TensorFit,
)
from bids_uad.interfaces.derivatives import DerivativesDataSink

#: ``source_file``: the name whose entities the derivatives inherit (the raw dwi's path; for a
#: series made from several runs, a name carrying only what they share)
INPUT_FIELDS = ["dwi_file", "bval_file", "bvec_file", "dwi_metadata", "rpe_file", "rpe_metadata",
                "source_file"]
OUTPUT_FIELDS = ["dwi_preproc", "bval", "bvec", "b0_ref", "brain_mask", "fa", "md", "ad", "rd", "s0",
                 "fieldmap_hz", "motion_tsv", "b0_pair_raw", "b0_pair_corrected", "backend_report"]
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

    for field, key, meta in DERIVATIVES:
        sink = pe.Node(
            DerivativesDataSink(output_dir=str(settings.output_dir), bids_dir=str(settings.bids_dir),
                                output=key, skip_empty=True),
            name=f"ds_{field}", run_without_submitting=True)
        if field in ("bval", "bvec"):
            sink.inputs.write_sidecar = False
        wf.connect([
            (outputnode, sink, [(field, "in_file")]),
            (inputnode, sink, [("source_file", "source_file")]),
        ])
        if meta:
            wf.connect(merge, meta, sink, "meta")
    return wf
