"""Execution of a built nipype graph: plugin choice, progress lines, crash handling, console format.

Building the graph is :mod:`bids_uad.workflows.base`'s job; this module only runs one in
the work folder, with crash files under ``OUTPUT_DIR/logs/crash-<run>/`` turned into one
:class:`~bids_uad.errors.PipelineCrashError`.
"""
from __future__ import annotations

import logging

from bids_uad.config import Settings, load_plugin_settings
from bids_uad.errors import BidsUadError, PipelineCrashError

LOGGER = logging.getLogger("bids_uad.workflows")


class FirstLineFormatter(logging.Formatter):
    """Console format: first line of the message only (tracebacks go to the run log and crash files)."""

    def format(self, record: logging.LogRecord) -> str:
        record = logging.makeLogRecord(record.__dict__)
        record.msg, record.args = record.getMessage().splitlines()[0] if record.getMessage() else "", None
        record.exc_info = record.exc_text = None
        return super().format(record)


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
