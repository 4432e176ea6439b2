"""Top-level orchestration of the two analysis levels: collect inputs, build, run.

The nipype graph of one participant run is assembled from the stage builders in this
package (``dwi``, ``anat``, ``anomaly``, ``longitudinal``); a stage whose builder is not
there yet is reported as not implemented (exit 70) after the available stages have run,
never skipped silently.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

from bids_uad.bids.layout import BIDSInputs, SessionInputs
from bids_uad.bids.lesions import find_lesion_mask
from bids_uad.bids.preprocessed import find_preprocessed_dwi_runs
from bids_uad.bids.validate import validate_anatomical, validate_dwi_run
from bids_uad.config import Settings
from bids_uad.errors import BidsUadError, InputMissingError, PipelineCrashError, NoFilesSelectedError, StageNotImplementedError

LOGGER = logging.getLogger("bids_uad.workflows")

#: stage name -> (module, builder function, issue that builds it)
STAGES = {
    "dwi": ("bids_uad.workflows.dwi", "init_dwi_preproc_wf", "diffusion preprocessing"),
    "anat": ("bids_uad.workflows.anat", "init_anat_wf", "anatomical processing and registration"),
    "anomaly": ("bids_uad.workflows.anomaly", "init_anomaly_wf", "anomaly inference"),
    "longitudinal": ("bids_uad.workflows.longitudinal", "init_longitudinal_wf", "longitudinal comparison"),
    "reports": ("bids_uad.reports.build", "build_participant_report", "HTML reports"),
    "training": ("bids_uad.workflows.group", "run_group_training", "group-level training"),
}


def stage_builder(stage: str):
    """The builder function of a stage, or None when that stage is not implemented yet."""
    module, func, _ = STAGES[stage]
    if importlib.util.find_spec(module) is None:
        return None
    return getattr(importlib.import_module(module), func, None)


@dataclass(frozen=True)
class ParticipantPlan:
    """Validated inputs of one participant run."""

    sessions: tuple[SessionInputs, ...]


def collect_participant_inputs(settings: Settings, bids: BIDSInputs, subjects: list[str]) -> ParticipantPlan:
    """Gather and validate the files each selected subject/session will use."""
    sessions: list[SessionInputs] = []
    for subject in subjects:
        subj = bids.subject_inputs(subject, settings.session_labels)
        for ses in subj.sessions:
            if not ses.dwi and not ses.t1w:
                LOGGER.warning("sub-%s%s: no dwi and no T1w, skipped", subject,
                               f" ses-{ses.session}" if ses.session else "")
                continue
            for run in ses.dwi:
                validate_dwi_run(run)
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
    if not sessions:
        raise NoFilesSelectedError(
            "no dwi or T1w images selected for "
            + ", ".join(f"sub-{s}" for s in subjects)
            + (f" (sessions {', '.join(settings.session_labels)})" if settings.session_labels else ""),
            settings.bids_dir,
        )
    return ParticipantPlan(sessions=tuple(sessions))


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
    """Build the nipype workflow of all selected sessions; returns (workflow, missing stages).

    Every dwi run is preprocessed and (with ``--model``) scored on its own, its derivatives
    named with its entities (acq, dir, run, ...); two runs whose outputs would share a name are
    refused before anything runs.  With ``--model``, a session whose preprocessed derivatives
    already exist in OUTPUT_DIR is scored from them, every run of it (the derivatives are the
    interface between levels); otherwise preprocessing runs first and feeds inference directly.
    """
    from nipype.pipeline import engine as pe

    from bids_uad.bids.outputs import check_unique

    check_unique(planned_outputs(settings, plan))
    workflow = pe.Workflow(name="bids_uad_participant_wf")
    builders = {stage: stage_builder(stage) for stage in ("dwi", "anat", "anomaly")}
    wanted = ["dwi", "anat"] + (["anomaly"] if settings.model is not None else [])
    missing = [stage for stage in wanted if builders[stage] is None]
    finished: dict[tuple[str, str | None], list[tuple[object, str]]] = {}
    for ses in plan.sessions:
        signals = finished.setdefault((ses.subject, ses.session), [])
        done = find_preprocessed_dwi_runs(settings.output_dir, ses.subject, ses.session) if settings.model else []
        if any(run.analysis_mask is not None for run in done):
            LOGGER.info("sub-%s%s: preprocessed derivatives of %d dwi run(s) found, scoring them", ses.subject,
                        f" ses-{ses.session}" if ses.session else "", len(done))
            if builders["anomaly"] is not None:
                for index, run in enumerate(done):
                    if run.analysis_mask is None:
                        LOGGER.warning("%s: no analysis mask for this run: anomalies scored in the whole "
                                       "brain mask", run.dwi.name)
                    awf = builders["anomaly"](settings, name=f"anomaly_{_session_name(ses)}_{index}")
                    awf.inputs.inputnode.dwi_preproc = str(run.dwi)
                    awf.inputs.inputnode.bval = str(run.bval)
                    awf.inputs.inputnode.bvec = str(run.bvec)
                    awf.inputs.inputnode.brain_mask = str(run.brain_mask)
                    awf.inputs.inputnode.analysis_mask = str(run.analysis_mask or "")
                    awf.inputs.inputnode.source_file = str(run.dwi)
                    workflow.add_nodes([awf])
                    signals.append((awf, "outputnode.masks"))
            continue
        dwi_wfs = _add_dwi_stage(workflow, builders["dwi"], settings, ses)
        series = _add_pair_combination(workflow, settings, ses, dwi_wfs)
        first_dwi, first_source = series[0] if series else (None, None)
        anat_wf = _add_anat_stage(workflow, builders["anat"], settings, ses, first_dwi, first_source)
        signals += [(wf, "outputnode.dwi_preproc") for wf in dwi_wfs]
        signals += [(wf, "outputnode.dwi_preproc") for wf, _ in series if wf not in dwi_wfs]
        signals += [(anat_wf, "outputnode.t1w_preproc")] if anat_wf is not None else []
        tissue_wfs = _add_dwi_tissue_stage(workflow, settings, ses, series) if anat_wf is None else {}
        signals += [(twf, "outputnode.analysis_mask") for twf in tissue_wfs.values()]
        if builders["anomaly"] is None or settings.model is None:
            continue
        for index, (dwi_wf, source) in enumerate(series):
            awf = builders["anomaly"](settings, name=f"anomaly_{_session_name(ses)}_{index}")
            awf.inputs.inputnode.source_file = str(source)
            workflow.connect([(dwi_wf, awf, [("outputnode.dwi_preproc", "inputnode.dwi_preproc"),
                                             ("outputnode.bval", "inputnode.bval"),
                                             ("outputnode.bvec", "inputnode.bvec"),
                                             ("outputnode.brain_mask", "inputnode.brain_mask")])])
            if anat_wf is not None and dwi_wf is first_dwi:
                workflow.connect([(anat_wf, awf, [("outputnode.dwi_analysis_mask", "inputnode.analysis_mask")])])
            elif dwi_wf in tissue_wfs:
                workflow.connect([(tissue_wfs[dwi_wf], awf, [("outputnode.analysis_mask", "inputnode.analysis_mask")])])
            else:
                LOGGER.warning("%s: no anatomical analysis mask (%s): anomalies scored in the whole brain mask",
                               Path(source).name, "no T1w" if anat_wf is None else "the T1w is registered to "
                               + Path(first_source).name)
                awf.inputs.inputnode.analysis_mask = ""
            signals.append((awf, "outputnode.masks"))
    if settings.model is not None:
        _add_longitudinal_stage(workflow, settings, plan, finished)
    return workflow, missing


def _add_longitudinal_stage(workflow, settings: Settings, plan: ParticipantPlan,
                            finished: dict[tuple[str, str | None], list[tuple[object, str]]]) -> None:
    """Baseline vs follow-up comparison for each subject with several sessions (after scoring)."""
    from nipype.interfaces import utility as niu

    builder = stage_builder("longitudinal")
    by_subject: dict[str, list[str]] = {}
    for ses in plan.sessions:
        if ses.session:
            by_subject.setdefault(ses.subject, []).append(ses.session)
    for subject, sessions in by_subject.items():
        if len(sessions) < 2:
            continue
        if builder is None:
            raise StageNotImplementedError("the longitudinal comparison is not implemented yet")
        from bids_uad.workflows.longitudinal import plan_sessions

        try:
            baseline, followups = plan_sessions(settings, subject, sessions)
        except InputMissingError as exc:
            LOGGER.warning("sub-%s: longitudinal comparison skipped: %s", subject, exc.one_line())
            continue
        lwf = builder(settings, subject, sessions, name=f"longitudinal_sub_{subject}")
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


def _add_dwi_stage(workflow, builder, settings: Settings, ses: SessionInputs) -> list:
    """One preprocessing workflow per dwi run (in ``ses.dwi`` order); the first one's b0
    reference anchors the anatomical registration."""
    if builder is None:
        return []
    wfs = []
    for index, run in enumerate(ses.dwi):
        wf = builder(settings, name=f"dwi_{_session_name(ses)}_{index}")
        wf.inputs.inputnode.dwi_file = str(run.path)
        wf.inputs.inputnode.bval_file = str(run.bval)
        wf.inputs.inputnode.bvec_file = str(run.bvec)
        wf.inputs.inputnode.dwi_metadata = dict(run.metadata)
        wf.inputs.inputnode.rpe_file = str(run.reverse_pe.path) if run.reverse_pe else ""
        wf.inputs.inputnode.rpe_metadata = dict(run.reverse_pe.metadata) if run.reverse_pe else {}
        wf.inputs.inputnode.source_file = str(run.path)
        workflow.add_nodes([wf])
        wfs.append(wf)
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
    """A name for a series made from several runs: the entities all runs share (e.g. without ``dir-``)."""
    from bids_uad.bids.derivatives import bids_name
    from bids_uad.bids.outputs import source_entities

    entities = [source_entities(Path(p).name) for p in paths]
    common = {k: v for k, v in entities[0].items() if all(e.get(k) == v for e in entities[1:])}
    return Path(paths[0]).with_name(bids_name(common, "dwi", ".nii.gz"))


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
                           ("b0_refs", "b0_ref"), ("run_reports", "backend_report")):
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
        workflow.connect([(dwi_wf, twf, [("outputnode.fa", "inputnode.fa"), ("outputnode.md", "inputnode.md"),
                                         ("outputnode.brain_mask", "inputnode.brain_mask")])])
        out[dwi_wf] = twf
    return out


def _add_anat_stage(workflow, builder, settings: Settings, ses: SessionInputs, first_dwi, first_source=None):
    """The anatomical workflow of a session, registered to its first dwi series when there is one."""
    if builder is None:
        return None
    if not ses.t1w:
        if ses.dwi:
            LOGGER.warning("sub-%s: no T1w in this session: anatomical stage skipped (tissue classes and the "
                           "analysis mask come from the diffusion data)", ses.subject)
        return None
    awf = builder(settings, name=f"anat_{_session_name(ses)}")
    awf.inputs.inputnode.t1w_file = str(ses.t1w[0])
    awf.inputs.inputnode.flair_file = str(ses.flair[0]) if ses.flair else ""
    lesion = find_lesion_mask(settings.lesion_masks, ses.subject, ses.session)
    awf.inputs.inputnode.lesion_mask = str(lesion) if lesion else ""
    awf.inputs.inputnode.dwi_source_file = str(first_source or ses.dwi[0].path) if first_dwi is not None else ""
    if first_dwi is not None:
        workflow.connect([(first_dwi, awf, [("outputnode.b0_ref", "inputnode.dwi_ref"),
                                            ("outputnode.brain_mask", "inputnode.dwi_mask")])])
    else:
        LOGGER.warning("sub-%s: no dwi in this session: T1w processed without dwi registration", ses.subject)
        awf.inputs.inputnode.dwi_ref = ""
        awf.inputs.inputnode.dwi_mask = ""
        workflow.add_nodes([awf])
    return awf


#: How MultiProc starts its workers.  Not "fork": a process that has already run torch with
#: several threads (the group level, or calibration, in the same Python process as a later
#: participant run: ``make demo``, the end-to-end test) leaves an OpenMP thread pool that a
#: forked child cannot use; its first multi-threaded torch call then waits for ever.
MULTIPROC_START_METHOD = "forkserver"
#: Imported once by the fork server, before it forks the workers: see that module.
WORKER_PRELOAD = ("bids_uad.workflows.worker",)


def nipype_plugin(settings: Settings) -> tuple[str, dict]:
    """The ``--use-plugin`` file when given; else Linear for one process, MultiProc otherwise."""
    if settings.use_plugin is not None:
        from bids_uad.cli.run import load_plugin_settings

        plugin, args = load_plugin_settings(settings.use_plugin)
        if plugin == "MultiProc":  # the command line (already merged into settings) wins
            args = {"mp_context": MULTIPROC_START_METHOD, **args, "n_procs": settings.nprocs}
            if settings.mem_gb:
                args["memory_gb"] = settings.mem_gb
        return plugin, args
    if settings.nprocs <= 1:
        return "Linear", {}
    args: dict = {"n_procs": settings.nprocs, "raise_insufficient": False, "mp_context": MULTIPROC_START_METHOD}
    if settings.mem_gb:
        args["memory_gb"] = settings.mem_gb
    return "MultiProc", args


class NodeProgress:
    """nipype status callback: one log line per finished node, ``[done/total] name (seconds)``."""

    def __init__(self, workflow):
        try:
            self.total: int | str = sum(1 for _ in workflow._get_all_nodes())
        except AttributeError:  # not a nipype workflow (tests use stand-ins)
            self.total = "?"
        self.done = 0
        self.started: dict[str, float] = {}

    def __call__(self, node, status: str) -> None:
        import time

        if node.name.startswith("_"):  # the per-item children of a MapNode: counted with their parent
            return
        if status == "start":
            self.started[node.fullname] = time.monotonic()
            return
        self.done += 1
        started = self.started.pop(node.fullname, None)
        name = node.fullname.removeprefix("bids_uad_participant_wf.")
        # nodes reused from the work folder, and small ones nipype runs in the scheduler itself,
        # end without a "start": no duration to report for them
        seconds = None if started is None else time.monotonic() - started
        if status == "exception":
            took = "" if seconds is None else f" after {seconds:.1f} s"
            LOGGER.error("[%d/%s] %s failed%s", self.done, self.total, name, took)
        else:
            took = "" if seconds is None else f" ({seconds:.1f} s)"
            LOGGER.info("[%d/%s] %s%s", self.done, self.total, name, took)


#: Seconds the local nipype scheduler sleeps between checks for finished nodes.
LOCAL_POLL_SLEEP_S = 0.05


def run_workflow(workflow, settings: Settings, run_id: str) -> None:
    """Run a nipype workflow in the work folder with crash files in the output logs."""
    from nipype import config as nipype_config

    crash_dir = settings.output_dir / "logs" / f"crash-{run_id}"
    workflow.base_dir = str(settings.work_dir)
    workflow.config["execution"].update({
        "crashdump_dir": str(crash_dir),
        "crashfile_format": "txt",
        "stop_on_first_crash": settings.stop_on_first_crash,
        "hash_method": "content",
        "remove_unnecessary_outputs": False,
        "create_report": False,
    })
    nipype_config.set("execution", "check_version", "false")
    plugin, args = nipype_plugin(settings)
    if plugin in ("Linear", "MultiProc", "LegacyMultiProc"):
        args = {**args, "status_callback": NodeProgress(workflow)}
        # nipype's scheduler sleeps poll_sleep_duration (default 2 s) per loop, so each node of a
        # chain waited up to 2 s to start: with ~80 nodes per session that dominated small runs.
        # Batch plugins (SLURM, SGE) keep nipype's default: they query the scheduler each loop.
        workflow.config["execution"]["poll_sleep_duration"] = LOCAL_POLL_SLEEP_S
    if plugin == "MultiProc" and args.get("mp_context") == "forkserver":
        import multiprocessing

        multiprocessing.get_context("forkserver").set_forkserver_preload(list(WORKER_PRELOAD))
    LOGGER.info("running %s with the %s plugin", workflow.name, plugin)
    try:
        workflow.run(plugin=plugin, plugin_args=args)
    except (BidsUadError, KeyboardInterrupt):
        raise
    except Exception as exc:  # nipype raises RuntimeError / NodeExecutionError on crashed nodes
        crashes = sorted(crash_dir.glob("crash-*")) if crash_dir.is_dir() else []
        LOGGER.debug("workflow failure", exc_info=True)
        raise PipelineCrashError(
            f"{len(crashes) or 'some'} processing step(s) failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no message'}); "
            f"crash files in {crash_dir}"
        ) from exc


def run_participant(settings: Settings, bids: BIDSInputs, subjects: list[str], run_id: str) -> None:
    """Participant level: preprocess (and with --model, map anomalies) for the selected subjects.

    The HTML reports are built from the derivatives on disk after the workflow ran, also when
    it crashed (the report then shows the crash files); ``--reports-only`` builds only them.
    """
    if settings.reports_only:
        from bids_uad.reports.build import build_reports

        for path in build_reports(settings, subjects, run_id, group=False):
            LOGGER.info("report: %s", path)
        return
    plan = collect_participant_inputs(settings, bids, subjects)
    LOGGER.info("%d session(s) of %d subject(s) selected", len(plan.sessions), len(subjects))
    workflow, missing = init_participant_wf(settings, plan)
    try:
        if workflow.list_node_names():
            run_workflow(workflow, settings, run_id)
    finally:
        _build_participant_reports(settings, subjects, run_id)
    if missing:
        names = "; ".join(STAGES[m][2] for m in missing)
        raise StageNotImplementedError(
            f"input validation{' and the available stages' if workflow.list_node_names() else ''} "
            f"completed, but these stages are not implemented yet: {names}"
        )


def _build_participant_reports(settings: Settings, subjects: list[str], run_id: str) -> None:
    """One HTML report per subject; a failing report is logged, never hides the run's own error."""
    builder = stage_builder("reports")
    if builder is None:
        return
    for subject in subjects:
        try:
            LOGGER.info("report: %s", builder(settings, subject, run_id))
        except Exception:  # noqa: BLE001 - a report must not mask the pipeline's outcome
            LOGGER.exception("sub-%s: the HTML report could not be built", subject)


def _require_stage(stage: str):
    builder = stage_builder(stage)
    if builder is None:
        raise StageNotImplementedError(f"{STAGES[stage][2]} is not implemented yet")
    return builder


def run_group(settings: Settings, bids: BIDSInputs, run_id: str) -> None:
    """Group level: train and calibrate the models on the controls, evaluate, group report."""
    from bids_uad.workflows.group import select_controls

    controls = select_controls(settings, bids)
    LOGGER.info("%d controls available for training: %s", len(controls), ", ".join(controls))
    training = _require_stage("training")
    training(settings, bids, controls, run_id)
    from bids_uad.reports.build import build_group_report

    LOGGER.info("group report: %s", build_group_report(settings, run_id))
