"""Longitudinal comparison of one subject: baseline anomalies against follow-up lesions.

Wiring only (numerics in :mod:`bids_uad.algorithms.longitudinal`, file handling in
:mod:`bids_uad.interfaces.longitudinal`).  Everything is read from the derivatives in
``OUTPUT_DIR`` when the nodes run (the baseline's anomaly maps come from
``participant --model``), so the workflow can run in the same graph as the stages that make
them (connect their outputs to ``inputnode.wait_*``) or on its own afterwards.

Per follow-up session: lesion masks (``--lesion-masks`` or a FLAIR-hyperintensity estimate)
→ follow-up T1w registered to the baseline T1w (rigid, then SyN with both lesions masked)
→ follow-up lesion/FLAIR/scores carried into baseline dwi space → per model: mismatch,
volumes, overlap, random-region null, score change, figure → derivatives.  Then the
subject TSV and the group TSV (rebuilt under a lock).
"""
from __future__ import annotations

import logging
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from bids_uad.bids import outputs
from bids_uad.bids.derivatives import validate_label
from bids_uad.bids.layout import read_sessions_table
from bids_uad.bids.preprocessed import find_preprocessed_dwi, order_sessions
from bids_uad.errors import InputMissingError, UsageError
from bids_uad.interfaces.derivatives import DerivativesDataSink
from bids_uad.interfaces.longitudinal import (
    FollowupToBaseline,
    LongitudinalCompare,
    LongitudinalTables,
    SessionDerivatives,
    SessionLesionMask,
)

LOGGER = logging.getLogger("bids_uad.workflows")

INPUT_FIELDS = ["wait_baseline", "wait_followups"]
OUTPUT_FIELDS = ["subject_tsv", "group_tsv", "rows", "figures"]


def _has(bids_dir: Path, output_dir: Path, subject: str, session: str, kind: str) -> bool:
    """Whether a session has dwi (raw or preprocessed) or a T1w (raw or preprocessed)."""
    raw = Path(bids_dir) / f"sub-{subject}" / f"ses-{session}"
    if kind == "dwi":
        return bool(list((raw / "dwi").glob("*_dwi.nii*"))) or \
            find_preprocessed_dwi(output_dir, subject, session) is not None
    return bool(list((raw / "anat").glob("*_T1w.nii*"))) or \
        bool(outputs.find(output_dir, "t1w_preproc", subject, session))


def plan_sessions(settings, subject: str, sessions: list[str]) -> tuple[str, list[str]]:
    """(baseline, follow-ups) of a subject.

    Sessions are ordered by ``acq_time`` in ``sub-X_sessions.tsv`` (name order without it);
    the baseline is ``settings.baseline_session`` when set, else the first session with dwi;
    follow-ups are the later sessions with a T1w.  Raises a clear error when there is no
    baseline or nothing to compare it with.
    """
    subject = validate_label(subject, "sub")
    labels = [validate_label(s, "ses") for s in sessions if s]
    ordered = [s for s in order_sessions(labels, read_sessions_table(settings.bids_dir, subject)) if s]
    requested = getattr(settings, "baseline_session", None)
    if requested:
        baseline = validate_label(requested, "ses")
        if baseline not in ordered:
            raise UsageError(f"--baseline-session {baseline} is not a session of sub-{subject} "
                             f"({', '.join(ordered) or 'none'})")
        if not _has(settings.bids_dir, settings.output_dir, subject, baseline, "dwi"):
            raise InputMissingError(f"sub-{subject} ses-{baseline} (--baseline-session) has no dwi",
                                    Path(settings.bids_dir) / f"sub-{subject}" / f"ses-{baseline}")
    else:
        with_dwi = [s for s in ordered if _has(settings.bids_dir, settings.output_dir, subject, s, "dwi")]
        if not with_dwi:
            raise InputMissingError(f"sub-{subject}: no session with dwi to serve as the longitudinal "
                                    "baseline", Path(settings.bids_dir) / f"sub-{subject}")
        baseline = with_dwi[0]
    later = ordered[ordered.index(baseline) + 1:]
    earlier = ordered[: ordered.index(baseline)]
    if earlier:
        LOGGER.warning("sub-%s: session(s) %s precede the baseline ses-%s and are not compared",
                       subject, ", ".join(earlier), baseline)
    followups = []
    for ses in later:
        if _has(settings.bids_dir, settings.output_dir, subject, ses, "T1w"):
            followups.append(ses)
        else:
            LOGGER.warning("sub-%s ses-%s: no T1w, cannot be registered to the baseline: not compared",
                           subject, ses)
    if not followups:
        raise InputMissingError(f"sub-{subject}: no follow-up session with a T1w after the baseline "
                                f"ses-{baseline}", Path(settings.bids_dir) / f"sub-{subject}")
    return baseline, followups


def check_longitudinal_inputs(settings, subject: str, sessions: list[str],
                              require_anomaly: bool = True) -> dict:
    """Find every derivative the workflow will read, now; raise the error the nodes would raise.

    For a run where the derivatives already exist (e.g. the comparison runs after the
    participant graph): failing here gives the CLI its exit code (66) instead of a nipype
    crash file.  Returns {"baseline": files, "followups": {session: files}}.
    """
    from bids_uad.interfaces.longitudinal import session_derivatives

    subject = validate_label(subject, "sub")
    baseline, followups = plan_sessions(settings, subject, sessions)
    lesion_dir = getattr(settings, "lesion_masks", None)
    base = session_derivatives(settings.output_dir, subject, baseline, lesion_dir=lesion_dir, require_dwi=True,
                               models=_model_names(settings), require_anomaly=require_anomaly)
    return {"baseline": base,
            "followups": {fu: session_derivatives(settings.output_dir, subject, fu, lesion_dir=lesion_dir,
                                                  models=base["models"]) for fu in followups}}


def _model_names(settings) -> list[str]:
    if getattr(settings, "model", None) is None:
        return []
    from bids_uad.workflows.anomaly import model_name, resolve_model_files

    return [model_name(p) for p in resolve_model_files(settings.model)]


def init_longitudinal_wf(settings, subject: str, sessions: list[str], name: str = "longitudinal_wf",
                         n_permutations: int = 200, null_method: str = "components",
                         registration_resolution: float = 2.0, reg_iterations=(40, 20, 0),
                         syn: bool = True, perilesional_mm: float = 0.0,
                         check_inputs: bool = False) -> pe.Workflow:
    """Compare the baseline session of ``subject`` with each later session (see module docstring).

    ``sessions``: the subject's session labels (any order, with or without ``ses-``); the
    baseline and follow-ups are chosen by :func:`plan_sessions` at build time.  Models:
    those of ``settings.model`` (every one must have maps at baseline), else every model
    whose anomaly maps exist for the baseline at run time.
    inputnode: ``wait_baseline``, ``wait_followups`` — ordering only; connect the ``out_file``
    of every derivatives sink of the sessions' workflows (:func:`bids_uad.workflows.base._written`)
    so that this runs after what it reads is written.
    ``check_inputs=True`` looks every derivative up at build time (use it when they already
    exist, i.e. when the comparison runs after the graph that made them): a missing one is
    then an :class:`InputMissingError` here instead of a nipype crash later.
    outputnode: ``subject_tsv``, ``group_tsv``, ``rows``
    (statistics dicts, one per follow-up and model), ``figures`` (every stored file of the
    comparison; the SVGs among them are the figures).
    """
    subject = validate_label(subject, "sub")
    baseline, followups = plan_sessions(settings, subject, sessions)
    LOGGER.info("sub-%s: longitudinal baseline ses-%s, follow-up(s) %s", subject, baseline,
                ", ".join(f"ses-{s}" for s in followups))
    if check_inputs:
        check_longitudinal_inputs(settings, subject, sessions)
    threads = max(1, int(getattr(settings, "omp_nthreads", 1) or 1))
    seed = int(getattr(settings, "seed", 0) or 0)
    lesion_dir = str(settings.lesion_masks) if getattr(settings, "lesion_masks", None) else ""
    output_dir = str(settings.output_dir)

    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=INPUT_FIELDS), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=OUTPUT_FIELDS), name="outputnode")

    base_files = pe.Node(SessionDerivatives(output_dir=output_dir, lesion_dir=lesion_dir, subject=subject,
                                            session=baseline, require_dwi=True, require_anomaly=True,
                                            models=_model_names(settings)), name="baseline_files")
    base_lesion = pe.Node(SessionLesionMask(num_threads=threads), name="baseline_lesion", n_procs=threads)
    workflow.connect([
        (inputnode, base_files, [("wait_baseline", "wait")]),
        (base_files, base_lesion, [("lesion", "lesion_file"), ("lesion_space", "lesion_space"),
                                   ("dwi2t1w", "dwi2t1w"), ("t1w", "t1w"), ("brain_mask", "brain_mask"),
                                   ("flair", "flair"), ("csf", "csf"), ("t1w2dwi", "t1w2dwi"),
                                   ("analysis_mask", "dwi_reference")]),
    ])
    rows = pe.Node(niu.Merge(len(followups)), name="merge_rows")
    figures = pe.Node(niu.Merge(len(followups)), name="merge_figures")
    for index, fu in enumerate(followups, start=1):
        fu_files = pe.Node(SessionDerivatives(output_dir=output_dir, lesion_dir=lesion_dir, subject=subject,
                                              session=fu), name=f"followup_files_{fu}")
        fu_lesion = pe.Node(SessionLesionMask(num_threads=threads), name=f"followup_lesion_{fu}",
                            n_procs=threads)
        register = pe.Node(FollowupToBaseline(resolution=registration_resolution, syn=syn,
                                              reg_iterations=list(reg_iterations), seed=seed,
                                              num_threads=threads),
                           name=f"register_{fu}", n_procs=threads, mem_gb=2.0)
        compare = pe.Node(LongitudinalCompare(subject=subject, baseline_session=baseline, followup_session=fu,
                                              n_permutations=n_permutations, null_method=null_method,
                                              perilesional_mm=perilesional_mm, seed=seed),
                          name=f"compare_{fu}")
        sink = pe.MapNode(DerivativesDataSink(output_dir=output_dir, bids_dir=str(settings.bids_dir)),
                          iterfield=["in_file", "entities", "suffix", "datatype", "meta"],
                          name=f"ds_{fu}", run_without_submitting=True)
        workflow.connect([
            (inputnode, fu_files, [("wait_followups", "wait")]),
            (base_files, fu_files, [("models", "models")]),
            (fu_files, fu_lesion, [("lesion", "lesion_file"), ("lesion_space", "lesion_space"),
                                   ("dwi2t1w", "dwi2t1w"), ("t1w", "t1w"), ("brain_mask", "brain_mask"),
                                   ("flair", "flair"), ("csf", "csf")]),
            (base_files, register, [("t1w", "baseline_t1w"), ("brain_mask", "baseline_brain_mask"),
                                    ("t1w2dwi", "baseline_t1w2dwi"), ("analysis_mask", "dwi_reference")]),
            (base_lesion, register, [("mask_t1w", "baseline_lesion")]),
            (fu_files, register, [("t1w", "followup_t1w"), ("brain_mask", "followup_brain_mask"),
                                  ("flair", "followup_flair"), ("dwi2t1w", "followup_dwi2t1w"),
                                  ("anomaly_scores", "followup_scores"), ("anomaly_masks", "followup_masks"),
                                  ("findings", "followup_findings")]),
            (fu_lesion, register, [("mask_t1w", "followup_lesion")]),
            (base_files, compare, [("models", "models"), ("anomaly_masks", "anomaly_masks"),
                                   ("findings", "baseline_findings"),
                                   ("anomaly_scores", "anomaly_scores"), ("analysis_mask", "analysis_mask")]),
            (base_lesion, compare, [("mask_dwi", "baseline_lesion"), ("mask_t1w", "baseline_lesion_t1w"),
                                    ("source", "baseline_lesion_source"), ("meta", "baseline_lesion_meta"),
                                    ("background_dwi", "baseline_background")]),
            (fu_lesion, compare, [("mask_t1w", "followup_lesion_t1w"), ("source", "followup_lesion_source"),
                                  ("meta", "followup_lesion_meta")]),
            (register, compare, [("lesion_dwi", "followup_lesion"), ("background_dwi", "followup_background"),
                                 ("background_contrast", "followup_background_contrast"),
                                 ("t1w_baseline", "followup_t1w_baseline"),
                                 ("scores_dwi", "followup_scores"), ("masks_dwi", "followup_masks"),
                                 ("findings_dwi", "followup_findings"),
                                 ("xfm", "xfm"), ("inverse_xfm", "inverse_xfm"),
                                 ("meta", "registration_meta")]),
            (compare, sink, [("out_files", "in_file"), ("out_entities", "entities"),
                             ("out_suffixes", "suffix"), ("out_datatypes", "datatype"), ("out_meta", "meta")]),
            (base_files, sink, [(("t1w", _as_list), "source_files")]),
            (compare, rows, [("rows", f"in{index}")]),
            (sink, figures, [("out_file", f"in{index}")]),
        ])
    tables = pe.Node(LongitudinalTables(output_dir=output_dir, subject=subject), name="tables",
                     run_without_submitting=True)
    workflow.connect([
        (rows, tables, [("out", "rows")]),
        (tables, outputnode, [("subject_tsv", "subject_tsv"), ("group_tsv", "group_tsv")]),
        (rows, outputnode, [("out", "rows")]),
        (figures, outputnode, [("out", "figures")]),
    ])
    return workflow


def _as_list(value):
    return [value] if value else []
