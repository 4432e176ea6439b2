"""Anatomical workflow: N4 → skull strip + T1w→template SyN → tissues → T1w→dwi SyN → outputs.

With the default (python) backend one registration of the first-guess brain to the template
gives both the brain mask and the T1w → template transform (node ``skull_strip``); with FSL's
``bet``, or another skull-strip method, the brain is registered afterwards (``t1w_to_template``).

Wiring only; numerics live in :mod:`bids_uad.algorithms` behind :mod:`bids_uad.interfaces.anat`.
The FSL backend (``settings.resolved_backend() == "fsl"``) swaps skull stripping for
``bet`` and segmentation for ``fast``; everything downstream sees the same file kinds.
"""
from __future__ import annotations


from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from bids_uad.algorithms.templates import template_for_output_spaces
from bids_uad.bids.outputs import OUTPUTS
from bids_uad.interfaces.anat import (
    AnalysisMask,
    ApplyMask,
    ApplyTransforms,
    FASTToDseg,
    FlairToT1w,
    N4BiasFieldCorrection,
    RegisterImages,
    SkullStrip,
    SkullStripToTemplate,
    TissueSegmentation,
    VentricleMask,
    fsl_bet,
    fsl_fast,
)
from bids_uad.interfaces.derivatives import DerivativesDataSink

#: ``dwi_source_file``: the raw dwi run that ``dwi_ref`` belongs to: dwi-space outputs and the
#: T1w↔dwi transforms inherit its entities (acq, dir, run, ...); T1w-space outputs the T1w's
INPUT_FIELDS = ["t1w_file", "flair_file", "dwi_ref", "dwi_mask", "lesion_mask", "dwi_source_file", "dwi_fov_mask"]
OUTPUT_FIELDS = [
    "t1w_preproc", "t1w_brain_mask", "t1w_dseg", "t1w_probsegs", "flair_t1w", "t1w_ventricles",
    "dwi_dseg", "dwi_probsegs", "dwi_ventricles", "dwi_analysis_mask",
    "t1w2dwi_xfm", "dwi2t1w_xfm", "t1w2mni_xfm", "mni2t1w_xfm", "template_name", "template_file",
    "dwi2t1w_composite", "t1w2mni_composite", "t1w2dwi_composite", "mni2t1w_composite",
]
#: resolution (mm) the T1w→template registration runs at (transforms are physical: any grid)
TEMPLATE_REG_MM = 2.0
#: SyN iterations at the dwi resolution after the rigid T1w→dwi fit
DWI_SYN_ITERATIONS = 20
#: voxel size (mm) of the T1w brain in the T1w→dwi registration: its result is used on the dwi
#: grid (voxels of 2 mm or more), and a 1 mm moving image only made the pyramid dearer
#: (benchmarks/anat.py, paper subject: 17.5 vs 24.7 s CPU, T1w→dwi error 0.47 vs 0.47 mm mean,
#: 1.09 vs 1.04 mm p95)
DWI_REG_MOVING_MM = 2.0


def _first(items):
    return items[0] if items else ""


def _pick(items, index):
    return items[index] if items and len(items) > index else ""


def _list3(a, b, c):
    return [a, b, c]


#: peak memory (GB) per node kind for a 1 mm T1w, measured with benchmarks/anat.py (rounded up)
MEM_GB = {"t1w_n4": 1.0, "skull_strip": 2.0, "t1w_to_template": 2.0, "priors_to_t1w": 1.5,
          "atropos": 2.0, "flair_to_t1w": 2.0, "t1w_to_dwi": 2.0}


def _ants_node(interface, name, settings, **kw):
    kw.setdefault("mem_gb", MEM_GB.get(name, 1.0))
    node = pe.Node(interface, name=name, n_procs=max(1, int(settings.omp_nthreads)), **kw)
    if "num_threads" in node.inputs.copyable_trait_names():
        node.inputs.num_threads = max(1, int(settings.omp_nthreads))
    if "seed" in node.inputs.copyable_trait_names():
        node.inputs.seed = int(settings.seed)
    return node


def init_anat_wf(settings, name: str = "anat_wf", skullstrip_method: str = "template",
                 reg_iterations=(40, 20, 0), dwi_transform: str = "Rigid+SyN",
                 template_reg_mm: float = TEMPLATE_REG_MM) -> pe.Workflow:
    """The anatomical stage of one session (see module docstring); writes its derivatives.

    inputnode: ``t1w_file``, ``flair_file`` ('' when none), ``dwi_ref`` (b0 reference in dwi
    space; '' when the session has no dwi), ``dwi_mask``, ``lesion_mask`` ('' when none),
    ``dwi_source_file`` (the raw dwi run of ``dwi_ref``; '' when none).
    outputnode: see :data:`OUTPUT_FIELDS`; transform outputs are lists in antspyx order
    (one composite ``.h5`` each); probseg lists are ordered GM, WM, CSF.
    Keyword arguments exist for tests and benchmarks (coarser, faster registrations).
    """
    template = template_for_output_spaces(getattr(settings, "output_spaces", ()))
    backend = settings.resolved_backend()
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=INPUT_FIELDS), name="inputnode")
    inputnode.inputs.dwi_fov_mask = ""  # no field-of-view restriction unless the dwi workflow gives one
    outputnode = pe.Node(niu.IdentityInterface(fields=OUTPUT_FIELDS), name="outputnode")
    outputnode.inputs.template_name = template.name
    outputnode.inputs.template_file = template.t1w

    n4 = _ants_node(N4BiasFieldCorrection(), "t1w_n4", settings)
    workflow.connect(inputnode, "t1w_file", n4, "in_file")

    # -- skull stripping -------------------------------------------------------------
    brain = pe.Node(niu.IdentityInterface(fields=["mask", "brain"]), name="brain")
    one_registration = backend != "fsl" and skullstrip_method == "template"
    if backend == "fsl":
        bet = pe.Node(fsl_bet(), name="fsl_bet")
        apply_mask = pe.Node(ApplyMask(), name="bet_apply_mask")
        workflow.connect([
            (n4, bet, [("out_file", "in_file")]),
            (bet, apply_mask, [("mask_file", "mask_file")]),
            (n4, apply_mask, [("out_file", "in_file")]),
            (bet, brain, [("mask_file", "mask")]),
            (apply_mask, brain, [("out_file", "brain")]),
        ])
    elif one_registration:
        # one SyN gives the brain mask and the T1w → template transform (algorithms.skullstrip)
        strip = _ants_node(SkullStripToTemplate(template_t1w=template.t1w, template_mask=template.brain_mask,
                                                resolution=template_reg_mm, reg_iterations=list(reg_iterations)),
                           "skull_strip", settings)
        workflow.connect([
            (n4, strip, [("out_file", "in_file")]),
            (inputnode, strip, [("lesion_mask", "lesion_mask")]),
            (strip, brain, [("out_mask", "mask"), ("out_file", "brain")]),
        ])
    else:
        strip = _ants_node(SkullStrip(method=skullstrip_method, template_t1w=template.t1w,
                                      template_mask=template.brain_mask), "skull_strip", settings)
        workflow.connect([
            (n4, strip, [("out_file", "in_file")]),
            (strip, brain, [("out_mask", "mask"), ("out_file", "brain")]),
        ])

    # -- T1w → template (lesion-aware), priors back to T1w ---------------------------
    if one_registration:
        t1w2tpl = strip  # the skull strip's registration
    else:
        t1w2tpl = _ants_node(RegisterImages(fixed_file=template.t1w, transform_type="SyN",
                                            resolution=template_reg_mm, composite=True,
                                            reg_iterations=list(reg_iterations)),
                             "t1w_to_template", settings)
        workflow.connect([
            (brain, t1w2tpl, [("brain", "moving_file")]),
            (inputnode, t1w2tpl, [("lesion_mask", "lesion_mask")]),
        ])
    priors = _ants_node(ApplyTransforms(
        in_files=[template.priors["CSF"], template.priors["GM"], template.priors["WM"],
                  template.ventricles],
        interpolation="probability"), "priors_to_t1w", settings)
    workflow.connect([
        (n4, priors, [("out_file", "reference")]),
        (t1w2tpl, priors, [("reverse_transforms", "transforms"),
                           ("reverse_invert_flags", "invert_flags")]),
    ])

    # -- tissue segmentation -----------------------------------------------------------
    seg = pe.Node(niu.IdentityInterface(fields=["dseg", "dseg_tsv", "probsegs", "gm", "wm", "csf"]),
                  name="segmentation")
    if backend == "fsl":
        fast = pe.Node(fsl_fast(), name="fsl_fast")
        fast2dseg = pe.Node(FASTToDseg(), name="fast_to_dseg")
        workflow.connect([
            (brain, fast, [(("brain", _as_list), "in_files")]),
            (fast, fast2dseg, [("tissue_class_map", "tissue_class_map"),
                               ("partial_volume_files", "partial_volume_files")]),
        ])
        seg_src = fast2dseg
    else:
        atropos = _ants_node(TissueSegmentation(), "atropos", settings)
        prior3 = pe.Node(niu.Function(input_names=["values"], output_names=["out"],
                                      function=_first3), name="tissue_priors")
        workflow.connect([
            (n4, atropos, [("out_file", "in_file")]),
            (brain, atropos, [("mask", "mask_file")]),
            (priors, prior3, [("out_files", "values")]),
            (prior3, atropos, [("out", "prior_files")]),
        ])
        seg_src = atropos
    workflow.connect(seg_src, "dseg", seg, "dseg")
    workflow.connect(seg_src, "dseg_tsv", seg, "dseg_tsv")
    workflow.connect(seg_src, "probsegs", seg, "probsegs")
    workflow.connect(seg_src, "gm_probseg", seg, "gm")
    workflow.connect(seg_src, "wm_probseg", seg, "wm")
    workflow.connect(seg_src, "csf_probseg", seg, "csf")

    ventricles = pe.Node(VentricleMask(), name="ventricles_t1w")
    workflow.connect([
        (seg, ventricles, [("dseg", "dseg")]),
        (priors, ventricles, [(("out_files", _pick, 3), "prior")]),
    ])

    # -- FLAIR → T1w ---------------------------------------------------------------------
    flair = _ants_node(FlairToT1w(), "flair_to_t1w", settings)
    workflow.connect([
        (inputnode, flair, [("flair_file", "flair_file")]),
        (n4, flair, [("out_file", "t1w_file")]),
        (brain, flair, [("mask", "t1w_mask")]),
    ])

    # -- T1w → dwi (lesion-aware), tissue maps into dwi space -------------------------
    # rigid, then SyN at the dwi resolution only; no brain masks in the metric (they were
    # measured to destabilise the rigid fit), only the lesion is excluded (docs/anat.md)
    t1w2dwi = _ants_node(RegisterImages(transform_type=dwi_transform, composite=True,
                                        reg_iterations=[DWI_SYN_ITERATIONS],
                                        moving_resolution=DWI_REG_MOVING_MM),
                         "t1w_to_dwi", settings)
    workflow.connect([
        (inputnode, t1w2dwi, [("dwi_ref", "fixed_file"), ("lesion_mask", "lesion_mask")]),
        (brain, t1w2dwi, [("brain", "moving_file")]),
    ])
    dwi_labels = _ants_node(ApplyTransforms(interpolation="label"), "labels_to_dwi", settings)
    dwi_probs = _ants_node(ApplyTransforms(interpolation="probability"), "probsegs_to_dwi", settings)
    label_list = pe.Node(niu.Function(input_names=["a", "b", "c"], output_names=["out"],
                                      function=_list3), name="label_list")
    workflow.connect([
        (seg, label_list, [("dseg", "a")]),
        (ventricles, label_list, [("out_file", "b")]),
        (brain, label_list, [("mask", "c")]),
        (label_list, dwi_labels, [("out", "in_files")]),
        (seg, dwi_probs, [("probsegs", "in_files")]),
    ])
    for node in (dwi_labels, dwi_probs):
        workflow.connect([
            (inputnode, node, [("dwi_ref", "reference")]),
            (t1w2dwi, node, [("forward_transforms", "transforms"),
                             ("forward_invert_flags", "invert_flags")]),
        ])
    dwi_tsv = pe.Node(niu.Function(input_names=["value", "gate"], output_names=["out"],
                                   function=_gate), name="dwi_dseg_tsv")
    workflow.connect([
        (seg, dwi_tsv, [("dseg_tsv", "value")]),
        (dwi_labels, dwi_tsv, [(("out_files", _pick, 0), "gate")]),
    ])
    analysis = pe.Node(AnalysisMask(), name="analysis_mask_dwi")
    workflow.connect([
        (dwi_labels, analysis, [(("out_files", _pick, 0), "dseg"), (("out_files", _pick, 1), "ventricles")]),
        (inputnode, analysis, [("dwi_mask", "brain_mask"), ("dwi_fov_mask", "fov_mask")]),
    ])

    # -- outputnode ------------------------------------------------------------------------
    workflow.connect([
        (n4, outputnode, [("out_file", "t1w_preproc")]),
        (brain, outputnode, [("mask", "t1w_brain_mask")]),
        (seg, outputnode, [("dseg", "t1w_dseg"), ("probsegs", "t1w_probsegs")]),
        (ventricles, outputnode, [("out_file", "t1w_ventricles")]),
        (flair, outputnode, [("out_file", "flair_t1w")]),
        (dwi_labels, outputnode, [(("out_files", _pick, 0), "dwi_dseg"),
                                  (("out_files", _pick, 1), "dwi_ventricles")]),
        (dwi_probs, outputnode, [("out_files", "dwi_probsegs")]),
        (analysis, outputnode, [("out_file", "dwi_analysis_mask")]),
        (t1w2dwi, outputnode, [("forward_transforms", "t1w2dwi_xfm"),
                               ("reverse_transforms", "dwi2t1w_xfm"), ("reverse_xfm", "dwi2t1w_composite"),
                               ("forward_xfm", "t1w2dwi_composite")]),
        (t1w2tpl, outputnode, [("forward_transforms", "t1w2mni_xfm"),
                               ("reverse_transforms", "mni2t1w_xfm"), ("forward_xfm", "t1w2mni_composite"),
                               ("reverse_xfm", "mni2t1w_composite")]),
    ])

    # -- derivatives ------------------------------------------------------------------------
    tpl = template.name
    method_meta = {
        "SkullStripped": True,
        "SkullStripping": "fsl bet" if backend == "fsl" else f"bids_uad {skullstrip_method}",
        "Segmentation": "fsl fast" if backend == "fsl" else "ANTs Atropos (antspyx), template priors",
        "Template": tpl,
    }
    outputs = [
        # (source node, field, key of bids_uad.bids.outputs.OUTPUTS, meta)
        (n4, "out_file", "t1w_preproc", {"BiasCorrected": "N4 (antspyx)"}),
        (brain, "mask", "t1w_mask", {"Type": "Brain", **method_meta}),
        (seg, "dseg", "t1w_dseg", method_meta),
        (seg, "dseg_tsv", "t1w_dseg_tsv", None),
        (seg, "gm", "t1w_gm", method_meta),
        (seg, "wm", "t1w_wm", method_meta),
        (seg, "csf", "t1w_csf", method_meta),
        (ventricles, "out_file", "t1w_ventricles",
         {"Description": f"lateral ventricles: CSF within the warped {tpl} ventricle prior"}),
        (flair, "out_file", "flair_t1w",
         {"Registration": "ANTs rigid (Mattes MI) to the T1w", "BiasCorrected": "N4 (antspyx)"}),
        (t1w2tpl, "warped_file", "t1w_template",
         {"Registration": "ANTs SyN (antspyx)", "Template": tpl, "Resampling": "linear"}),
        (t1w2tpl, "forward_xfm", "xfm_t1w_to_template",
         {"Registration": "ANTs SyN (antspyx), lesion excluded from the metric", "Template": tpl}),
        (t1w2tpl, "reverse_xfm", "xfm_template_to_t1w", {"Template": tpl}),
        (t1w2dwi, "forward_xfm", "xfm_t1w_to_dwi",
         {"Registration": f"ANTs {dwi_transform} (antspyx) onto the b0 reference, "
                         "lesion excluded from the metric"}),
        (t1w2dwi, "reverse_xfm", "xfm_dwi_to_t1w", None),
        (dwi_labels, ("out_files", _pick, 0), "dwi_dseg", {"Resampling": "genericLabel"}),
        (dwi_tsv, "out", "dwi_dseg_tsv", None),
        (dwi_probs, ("out_files", _pick, 0), "dwi_gm", {"Resampling": "linear"}),
        (dwi_probs, ("out_files", _pick, 1), "dwi_wm", {"Resampling": "linear"}),
        (dwi_probs, ("out_files", _pick, 2), "dwi_csf", {"Resampling": "linear"}),
        (dwi_labels, ("out_files", _pick, 1), "dwi_ventricles", {"Resampling": "genericLabel"}),
        (analysis, "out_file", "analysis_mask",
         {"Description": "GM and WM minus the lateral ventricles, within the dwi brain mask's interior (its "
                         "boundary layer, partial volume with CSF and skull, left out) and the part of the field "
                         "of view every dwi volume covers after correction (HeadMotionCorrection's "
                         "FieldOfViewCoverage); where anomalies are scored"}),
    ]
    for node, field, key, meta in outputs:
        sink = pe.Node(DerivativesDataSink(
            output_dir=str(settings.output_dir), bids_dir=str(settings.bids_dir), output=key,
            params={"template": tpl}, skip_empty=True), name=f"ds_{key}", run_without_submitting=True)
        if meta:
            sink.inputs.meta = meta
        # T1w-space outputs inherit the T1w's entities, dwi-space ones (and T1w<->dwi) the dwi run's
        source = "t1w_file" if OUTPUTS[key].source == "t1w" else "dwi_source_file"
        workflow.connect([
            (inputnode, sink, [(source, "source_file"), (("t1w_file", _as_list), "source_files")]),
            (node, sink, [(field, "in_file")]),
        ])
    return workflow


def _gate(value, gate):
    """``value`` when ``gate`` is a non-empty string, else '' (optional outputs)."""
    return value if gate else ""


def _as_list(value):
    return [value] if value else []


def _first3(values):
    return list(values[:3])
