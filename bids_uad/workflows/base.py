"""The participant level's nipype graph: collect and validate the inputs, wire the stages.

One graph for all selected sessions, assembled from the stage builders of this package
(:mod:`~bids_uad.workflows.dwi`, :mod:`~bids_uad.workflows.anat`,
:mod:`~bids_uad.workflows.anomaly`, :mod:`~bids_uad.workflows.longitudinal`).  Running it is
:mod:`bids_uad.workflows.execution`'s job; :mod:`bids_uad.cli.levels` does both.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from bids_uad.bids.layout import BIDSInputs, SessionInputs
from bids_uad.bids.lesions import find_lesion_mask
from bids_uad.bids.preprocessed import find_preprocessed_dwi_runs
from bids_uad.bids.validate import validate_anatomical, validate_dwi_run
from bids_uad.config import Settings
from bids_uad.errors import InputMissingError, InputValidationError, NoFilesSelectedError
from bids_uad.workflows.anat import init_anat_wf
from bids_uad.workflows.anomaly import init_anomaly_wf
from bids_uad.workflows.dwi import init_dwi_preproc_wf
from bids_uad.workflows.longitudinal import init_longitudinal_wf, plan_sessions

LOGGER = logging.getLogger("bids_uad.workflows")

@dataclass(frozen=True)
class ParticipantPlan:
    """Validated inputs of one participant run."""

    sessions: tuple[SessionInputs, ...]


def collect_participant_inputs(settings: Settings, bids: BIDSInputs, subjects: list[str]) -> ParticipantPlan:
    """Gather and validate the files each selected subject/session will use."""
    sessions: list[SessionInputs] = []
    fsl = settings.resolved_backend() == "fsl"
    for subject in subjects:
        subj = bids.subject_inputs(subject, settings.session_labels)
        for ses in subj.sessions:
            if not ses.dwi and not ses.t1w:
                LOGGER.warning("sub-%s%s: no dwi and no T1w, skipped", subject,
                               f" ses-{ses.session}" if ses.session else "")
                continue
            for run in ses.dwi:
                # the sidecar is needed where its fields are: SDC (a reverse-PE image) and FSL's eddy
                validate_dwi_run(run, require_sidecar=True if fsl else None)
                if run.reverse_pe is None:
                    LOGGER.warning("%s: no reverse phase-encoding image%s: susceptibility correction "
                                   "will be skipped", run.path.name,
                                   "" if run.metadata.get("PhaseEncodingDirection") else
                                   " (phase-encoding polarity unknown: "
                                   f"{run.metadata.get('PhaseEncodingDirectionSource', 'no sidecar')})")
            for t1w in ses.t1w[:1]:
                validate_anatomical(t1w, "T1w")
            for flair in ses.flair[:1]:
                validate_anatomical(flair, "FLAIR")
            sessions.append(ses)
    _check_filters_selected(bids, sessions)
    if not sessions:
        raise NoFilesSelectedError(
            "no dwi or T1w images selected for "
            + ", ".join(f"sub-{s}" for s in subjects)
            + (f" (sessions {', '.join(settings.session_labels)})" if settings.session_labels else ""),
            settings.bids_dir,
        )
    return ParticipantPlan(sessions=tuple(sessions))


def _check_filters_selected(bids: BIDSInputs, sessions: list[SessionInputs]) -> None:
    """A ``--bids-filter-file`` entry that matched nothing in any selected session exits 18.

    Otherwise a filter removing every dwi would silently turn the run into a T1w-only run.
    """
    found = {"dwi": any(s.dwi for s in sessions), "T1w": any(s.t1w for s in sessions),
             "FLAIR": any(s.flair for s in sessions)}
    for suffix, query in bids.filters.items():
        if suffix in found and not found[suffix]:
            raise NoFilesSelectedError(
                f"the --bids-filter-file entry for {suffix} ({query}) selected no {suffix} image "
                "in the selected subjects", bids.bids_dir)


def _session_name(ses: SessionInputs) -> str:
    return f"sub_{ses.subject}" + (f"_ses_{ses.session}" if ses.session else "")


def planned_outputs(settings: Settings, plan: ParticipantPlan) -> list[tuple[Path, Path]]:
    """(derivative path, input it is made from) of every per-run and per-T1w output of the plan,
    named through the outputs table as the sinks will name them."""
    from bids_uad.algorithms.templates import template_for_output_spaces
    from bids_uad.bids import outputs

    params = {"model": "model", "template": template_for_output_spaces(settings.output_spaces).name}
    planned = []
    for ses in plan.sessions:
        for key, output in outputs.OUTPUTS.items():
            combined = [shared_source_name([ses.dwi[i].path, ses.dwi[j].path]) for i, j in opposite_pe_pairs(ses.dwi)]
            sources = [run.path for run in ses.dwi] + combined if output.source == "dwi" else \
                list(ses.t1w[:1]) if output.source == "t1w" else []
            planned += [(outputs.path_for(settings.output_dir, key, src, **params), src) for src in sources]
    return planned


def init_participant_wf(settings: Settings, plan: ParticipantPlan):
    """Build the nipype workflow of all selected sessions.

    Every dwi run is preprocessed and (with ``--model``) scored on its own, its derivatives
    named with its entities (acq, dir, run, ...); two runs whose outputs would share a name are
    refused before anything runs.  With ``--model``, a session whose preprocessed derivatives
    already exist in OUTPUT_DIR is scored from them, every run of it (the derivatives are the
    interface between levels); otherwise preprocessing runs first and feeds inference directly.
    """
    from nipype.pipeline import engine as pe

    from bids_uad.bids.outputs import check_unique

    check_unique(planned_outputs(settings, plan))
    if settings.model is not None:
        check_model_shells(settings, plan)
    workflow = pe.Workflow(name="bids_uad_participant_wf")
    finished: dict[tuple[str, str | None], list[tuple[object, str]]] = {}
    for ses in plan.sessions:
        signals = finished.setdefault((ses.subject, ses.session), [])
        done = find_preprocessed_dwi_runs(settings.output_dir, ses.subject, ses.session) if settings.model else []
        if any(run.analysis_mask is not None for run in done):
            LOGGER.info("sub-%s%s: preprocessed derivatives of %d dwi run(s) found, scoring them", ses.subject,
                        f" ses-{ses.session}" if ses.session else "", len(done))
            for index, run in enumerate(done):
                if run.analysis_mask is None:
                    LOGGER.warning("%s: no analysis mask for this run: anomalies scored in the whole "
                                   "brain mask", run.dwi.name)
                skip = _skipped_models(settings, run.dwi)
                if skip is None:
                    continue
                awf = init_anomaly_wf(settings, name=f"anomaly_{_session_name(ses)}_{index}", skip=skip)
                awf.inputs.inputnode.dwi_preproc = str(run.dwi)
                awf.inputs.inputnode.bval = str(run.bval)
                awf.inputs.inputnode.bvec = str(run.bvec)
                awf.inputs.inputnode.brain_mask = str(run.brain_mask)
                awf.inputs.inputnode.analysis_mask = str(run.analysis_mask or "")
                awf.inputs.inputnode.source_file = str(run.dwi)
                for field, path in signature_maps(settings.output_dir, run).items():
                    setattr(awf.inputs.inputnode, field, path)
                workflow.add_nodes([awf])
                signals += _written(awf)
            continue
        dwi_wfs = _add_dwi_stage(workflow, settings, ses)
        series = _add_pair_combination(workflow, settings, ses, dwi_wfs)
        first_dwi, first_source = series[0] if series else (None, None)
        anat_wf = _add_anat_stage(workflow, settings, ses, first_dwi, first_source)
        signals += [sig for wf in dwi_wfs for sig in _written(wf)]
        signals += [sig for wf, _ in series if wf not in dwi_wfs for sig in _written(wf)]
        signals += _written(anat_wf) if anat_wf is not None else []
        tissue_wfs = _add_dwi_tissue_stage(workflow, settings, ses, series) if anat_wf is None else {}
        signals += [sig for twf in tissue_wfs.values() for sig in _written(twf)]
        if settings.model is None:
            continue
        for index, (dwi_wf, source) in enumerate(series):
            edges = anat_wf is not None and dwi_wf is first_dwi
            skip = _skipped_models(settings, source, _anat_template(settings) if edges else "")
            if skip is None:
                continue
            awf = init_anomaly_wf(settings, name=f"anomaly_{_session_name(ses)}_{index}", skip=skip)
            awf.inputs.inputnode.source_file = str(source)
            workflow.connect([(dwi_wf, awf, [("outputnode.dwi_preproc", "inputnode.dwi_preproc"),
                                             ("outputnode.bval", "inputnode.bval"),
                                             ("outputnode.bvec", "inputnode.bvec"),
                                             ("outputnode.brain_mask", "inputnode.brain_mask"),
                                             *((f"outputnode.{k}", f"inputnode.{k}") for k in ("fa", "md", "ad", "rd"))
                                             ])])
            if anat_wf is not None and dwi_wf is first_dwi:
                # data along edges: the template-space maps use this graph's transforms, so they wait
                # for them (reading them from OUTPUT_DIR had no declared order after the anat sinks)
                workflow.connect([(anat_wf, awf, [("outputnode.dwi_analysis_mask", "inputnode.analysis_mask"),
                                                  ("outputnode.dwi_dseg", "inputnode.dseg"),
                                                  ("outputnode.dwi2t1w_composite", "inputnode.dwi2t1w_xfm"),
                                                  ("outputnode.t1w2mni_composite", "inputnode.t1w2template_xfm"),
                                                  ("outputnode.t1w2dwi_composite", "inputnode.t1w2dwi_xfm"),
                                                  ("outputnode.mni2t1w_composite", "inputnode.template2t1w_xfm")])])
            elif dwi_wf in tissue_wfs:
                workflow.connect([(tissue_wfs[dwi_wf], awf, [("outputnode.analysis_mask", "inputnode.analysis_mask"),
                                                             ("outputnode.dseg", "inputnode.dseg")])])
            else:
                LOGGER.warning("%s: no anatomical analysis mask (%s): anomalies scored in the whole brain mask",
                               Path(source).name, "no T1w" if anat_wf is None else "the T1w is registered to "
                               + Path(first_source).name)
                awf.inputs.inputnode.analysis_mask = ""
            signals += _written(awf)
    if settings.model is not None:
        _add_longitudinal_stage(workflow, settings, plan, finished)
    return workflow


def _written(wf) -> list[tuple[object, str]]:
    """``(wf, "<sink>.out_file")`` for every derivatives sink of ``wf``: what a later stage that
    reads a session's derivatives from OUTPUT_DIR (the longitudinal comparison) waits for.  The
    workflows' outputnode fields come from the processing nodes, before the sinks have written
    anything: waiting on them let the comparison read the baseline's score maps before their
    sink wrote them, once the scheduler ran deep chains first."""
    from bids_uad.interfaces.derivatives import DerivativesDataSink

    return [(wf, f"{name}.out_file") for name in wf.list_node_names()
            if isinstance(wf.get_node(name).interface, DerivativesDataSink)]


def _anat_template(settings: Settings) -> str:
    """The template the anatomical workflow registers the T1w to (its transforms' to-<template>)."""
    from bids_uad.algorithms.templates import template_for_output_spaces

    return template_for_output_spaces(settings.output_spaces).name


def _skipped_models(settings: Settings, source, edges: str = "") -> tuple[str, ...] | None:
    """The ``--model`` models this dwi run cannot be scored with (a template-space model without the
    run's transforms: warned, not fallen back on); None when that leaves no model for the run."""
    from bids_uad.workflows.anomaly import resolve_model_files, unscorable_models

    skip = unscorable_models(settings, source, edges)
    for model, why in skip.items():
        LOGGER.warning("%s: model %s not scored: it works in template space and the run has %s", Path(source).name,
                       model, why)
    return tuple(skip) if len(skip) < len(resolve_model_files(settings.model)) else None


def check_model_shells(settings: Settings, plan: ParticipantPlan) -> None:
    """With ``--model``: every dwi run must have the b-value shells of every model, else it
    cannot be scored; refused at start-up (exit 16, naming the run's .bval and the model)
    rather than as a crash of the inference step after preprocessing."""
    import json

    import numpy as np

    from bids_uad.bids.gradients import B0_THRESHOLD, read_bvals
    from bids_uad.models.inputs import shell_mismatch
    from bids_uad.models.validate import model_files

    references = {f.name: np.asarray(json.loads(f.read_text())["reference_gradients"]["bvals"], float)
                  for f in model_files(settings.model)}
    for ses in plan.sessions:
        for run in ses.dwi:
            bvals = read_bvals(run.bval)
            for name, ref in references.items():
                problem = shell_mismatch(bvals[bvals > B0_THRESHOLD], ref)
                if problem:
                    raise InputValidationError(f"{problem} of {name}: this run cannot be scored with that model "
                                               "(train one on controls with these shells)", run.bval)


def signature_maps(output_dir, run) -> dict[str, str]:
    """The tensor maps and dwi-space segmentation of a preprocessed run in OUTPUT_DIR (the inputs of
    the findings' deviation signature), by anomaly-workflow field; missing ones are left out."""
    from bids_uad.bids import outputs

    found = {}
    run_ents = outputs.run_entities(run.dwi.name)
    for field, key in (("fa", "fa"), ("md", "md"), ("ad", "ad"), ("rd", "rd"), ("dseg", "dwi_dseg")):
        hits = outputs.find_run(output_dir, key, run.subject, run.session, run_ents)
        if hits:
            found[field] = str(hits[0])
    return found


def _add_longitudinal_stage(workflow, settings: Settings, plan: ParticipantPlan,
                            finished: dict[tuple[str, str | None], list[tuple[object, str]]]) -> None:
    """Baseline vs follow-up comparison for each subject with several sessions (after scoring)."""
    from nipype.interfaces import utility as niu

    by_subject: dict[str, list[str]] = {}
    for ses in plan.sessions:
        if ses.session:
            by_subject.setdefault(ses.subject, []).append(ses.session)
    for subject, sessions in by_subject.items():
        if len(sessions) < 2:
            continue
        try:
            baseline, followups = plan_sessions(settings, subject, sessions)
        except InputMissingError as exc:
            LOGGER.warning("sub-%s: longitudinal comparison skipped: %s", subject, exc.one_line())
            continue
        lwf = init_longitudinal_wf(settings, subject, sessions, name=f"longitudinal_sub_{subject}")
        for field, labels in (("wait_baseline", [baseline]), ("wait_followups", followups)):
            signals = [sig for label in labels for sig in finished.get((subject, label), [])]
            if not signals:
                setattr(lwf.inputs.inputnode, field, [])
                continue
            merge = niu.Merge(len(signals))
            node = _merge_node(merge, f"{field}_sub_{subject}")
            for index, (source, output) in enumerate(signals, start=1):
                workflow.connect(source, output, node, f"in{index}")
            workflow.connect(node, "out", lwf, f"inputnode.{field}")


def _merge_node(interface, name: str):
    from nipype.pipeline import engine as pe

    return pe.Node(interface, name=name, run_without_submitting=True)


def _add_dwi_stage(workflow, settings: Settings, ses: SessionInputs) -> list:
    """One preprocessing workflow per dwi run (in ``ses.dwi`` order)."""
    wfs = []
    # the second run of an opposite-PE full-DTI pair reuses the field fitted for the first
    # (python backend; FSL's topup+eddy node of each run fits its own)
    partner_of = {j: i for i, j in opposite_pe_pairs(ses.dwi)} if settings.resolved_backend() == "python" else {}
    for index, run in enumerate(ses.dwi):
        wf = init_dwi_preproc_wf(settings, name=f"dwi_{_session_name(ses)}_{index}",
                                 sdc_from_partner=index in partner_of)
        wf.inputs.inputnode.dwi_file = str(run.path)
        wf.inputs.inputnode.bval_file = str(run.bval)
        wf.inputs.inputnode.bvec_file = str(run.bvec)
        wf.inputs.inputnode.dwi_metadata = dict(run.metadata)
        wf.inputs.inputnode.rpe_file = str(run.reverse_pe.path) if run.reverse_pe else ""
        wf.inputs.inputnode.rpe_metadata = dict(run.reverse_pe.metadata) if run.reverse_pe else {}
        wf.inputs.inputnode.source_file = str(run.path)
        workflow.add_nodes([wf])
        wfs.append(wf)
    for j, i in partner_of.items():
        workflow.connect(wfs[i], "outputnode.sdc_partner", wfs[j], "inputnode.sdc_partner")
    return wfs


def opposite_pe_pairs(runs) -> list[tuple[int, int]]:
    """Indices of dwi runs that are each other's reverse phase-encoding partner (full-DTI pairs)."""
    index = {run.path: i for i, run in enumerate(runs)}
    pairs = []
    for i, run in enumerate(runs):
        rpe = run.reverse_pe
        j = index.get(rpe.path) if rpe is not None and rpe.kind == "dwi" else None
        if j is not None and j > i and runs[j].reverse_pe is not None and runs[j].reverse_pe.path == run.path:
            pairs.append((i, j))
    return pairs


def shared_source_name(paths) -> Path:
    """The source a series made from several runs is named from (:func:`outputs.common_source`), next to them."""
    from bids_uad.bids.outputs import common_source

    return Path(paths[0]).with_name(common_source([Path(p).name for p in paths]))


def _add_pair_combination(workflow, settings: Settings, ses: SessionInputs, dwi_wfs: list) -> list:
    """(workflow, source name) of each preprocessed series of a session: every run on its own,
    except opposite-PE full-DTI pairs, which are also combined into one series that replaces
    them for the anatomical registration and anomaly scoring (``docs/dwi.md``)."""
    from nipype.interfaces import utility as niu

    from bids_uad.workflows.dwi import init_dwi_combine_wf

    if not dwi_wfs:
        return []
    pairs = opposite_pe_pairs(ses.dwi)
    paired = {i for pair in pairs for i in pair}
    series = [(wf, ses.dwi[i].path) for i, wf in enumerate(dwi_wfs) if i not in paired]
    for n, (i, j) in enumerate(pairs):
        runs = [ses.dwi[i], ses.dwi[j]]
        source = shared_source_name([r.path for r in runs])
        LOGGER.info("%s + %s: opposite phase-encoding runs, corrected on their own and combined into %s",
                    runs[0].path.name, runs[1].path.name, source.name)
        cwf = init_dwi_combine_wf(settings, name=f"dwi_{_session_name(ses)}_pair{n}")
        cwf.inputs.inputnode.run_names = [r.path.name for r in runs]
        cwf.inputs.inputnode.source_file = str(source)
        cwf.inputs.inputnode.source_files = [str(r.path) for r in runs]
        for field, out in (("dwi_files", "dwi_preproc"), ("bval_files", "bval"), ("bvec_files", "bvec"),
                           ("b0_refs", "b0_ref"), ("run_reports", "backend_report"), ("fov_masks", "fov_mask")):
            merge = _merge_node(niu.Merge(2), f"{field}_{_session_name(ses)}_pair{n}")
            workflow.connect([(dwi_wfs[i], merge, [(f"outputnode.{out}", "in1")]),
                              (dwi_wfs[j], merge, [(f"outputnode.{out}", "in2")]),
                              (merge, cwf, [("out", f"inputnode.{field}")])])
        workflow.connect(dwi_wfs[i], "outputnode.brain_mask", cwf, "inputnode.brain_mask")
        series.insert(0, (cwf, source))
    return series


def _add_dwi_tissue_stage(workflow, settings: Settings, ses: SessionInputs, series: list) -> dict:
    """Without a T1w: tissue classes and the analysis mask from each series' own tensor maps."""
    from bids_uad.workflows.dwi import init_dwi_tissue_wf

    out = {}
    for index, (dwi_wf, source) in enumerate(series):
        LOGGER.info("%s: no T1w: tissue classes and analysis mask from the diffusion data (FA, MD)",
                    Path(source).name)
        twf = init_dwi_tissue_wf(settings, name=f"dwi_tissue_{_session_name(ses)}_{index}")
        twf.inputs.inputnode.source_file = str(source)
        twf.inputs.inputnode.source_files = [str(ses.dwi[k].path) for pair in opposite_pe_pairs(ses.dwi) for k in pair
                                             if shared_source_name([ses.dwi[i].path for i in pair]) == Path(source)]
        workflow.connect([(dwi_wf, twf, [("outputnode.fa", "inputnode.fa"), ("outputnode.md", "inputnode.md"),
                                         ("outputnode.brain_mask", "inputnode.brain_mask"),
                                         ("outputnode.fov_mask", "inputnode.fov_mask")])])
        out[dwi_wf] = twf
    return out


def _add_anat_stage(workflow, settings: Settings, ses: SessionInputs, first_dwi, first_source=None):
    """The anatomical workflow of a session, registered to its first dwi series when there is one."""
    if not ses.t1w:
        if ses.dwi:
            LOGGER.warning("sub-%s: no T1w in this session: anatomical stage skipped (tissue classes and the "
                           "analysis mask come from the diffusion data)", ses.subject)
        return None
    awf = init_anat_wf(settings, name=f"anat_{_session_name(ses)}")
    awf.inputs.inputnode.t1w_file = str(ses.t1w[0])
    awf.inputs.inputnode.flair_file = str(ses.flair[0]) if ses.flair else ""
    lesion = find_lesion_mask(settings.lesion_masks, ses.subject, ses.session)
    awf.inputs.inputnode.lesion_mask = str(lesion) if lesion else ""
    awf.inputs.inputnode.dwi_source_file = str(first_source or ses.dwi[0].path) if first_dwi is not None else ""
    if first_dwi is not None:
        workflow.connect([(first_dwi, awf, [("outputnode.b0_ref", "inputnode.dwi_ref"),
                                            ("outputnode.brain_mask", "inputnode.dwi_mask"),
                                            ("outputnode.fov_mask", "inputnode.dwi_fov_mask")])])
    else:
        LOGGER.warning("sub-%s: no dwi in this session: T1w processed without dwi registration", ses.subject)
        awf.inputs.inputnode.dwi_ref = ""
        awf.inputs.inputnode.dwi_mask = ""
        awf.inputs.inputnode.dwi_fov_mask = ""
        workflow.add_nodes([awf])
    return awf
