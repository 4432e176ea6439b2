"""Execution of a built nipype graph: plugin choice, progress lines, crash handling, console format.

Building the graph is :mod:`bids_uad.workflows.base`'s job; this module only runs one in
the work folder, with crash files under ``OUTPUT_DIR/logs/crash-<run>/`` turned into one
:class:`~bids_uad.errors.PipelineCrashError`.
"""
from __future__ import annotations

import functools
import gc
import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

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


class _YoungGC:
    """Stands in for the ``gc`` module inside nipype's MultiProc while it runs: ``collect()``
    collects the young generations only (0 and 1)."""

    @staticmethod
    def collect(generation: int = 1) -> int:
        return gc.collect(min(generation, 1))


@functools.lru_cache(maxsize=None)
def multiproc_plugin_class():
    """nipype's MultiProc scheduler with its garbage-collector passes made cheap (built on first use).

    nipype's MultiProc calls ``gc.collect()`` in every polling loop that has a free process
    (every :data:`LOCAL_POLL_SLEEP_S`) and after every node it runs itself.  A full pass walks
    every object of the process, a few hundred thousand with the participant graph (which
    ``Workflow.run`` copies twice): a tenth of a second or more each time, so the scheduling
    process kept one of the cores the workers needed busy.  This subclass freezes the objects
    that exist when the scheduler starts (``gc.freeze``: the graph, the imported modules), so
    those passes only walk what the run creates, and unfreezes them at the end.  The objects the
    run creates (each finished node's result, traits and all) still made a full pass cost 68 ms
    by the end of a 260-node inference run (386 passes, 26 s of the scheduler's CPU, measured with
    cProfile): during the run nipype's passes are young-generation ones (:class:`_YoungGC`; Python's
    own thresholds still collect the older generations).

    Of the nodes ready to run it starts the one with the longest chain of nodes after it first
    (:func:`downstream_depth`; nipype's own order is the graph's topological order, kept for a
    plugin file that names ``scheduler: tsort``).  It keeps nipype's class name: nipype derives
    the plugin's name from it.

    The nodes nipype runs in this process (``run_without_submitting``: the derivative sinks, the
    small merges) run here as soon as they are ready, while the workers are busy; nipype runs one
    only in a free worker's slot, which the deeper nodes took first, so they waited for the end of
    the run.  This process stops running them when a worker has finished, so that worker is given
    its next node on the next loop.  The demo's inference level (756 nodes, 424 sinks): overhead
    12.7-13.3 s → 3.5-4.3 s of a 75-79 s graph; the node work grows by about as much (the sinks'
    gzip now shares the cores with the workers), so the wall time went 78.7 → 74.9 s in one pair of
    runs and 74.9 → 75.2 s in the next.
    """
    import sys
    from traceback import format_exception

    import numpy as np
    from nipype.pipeline.engine import MapNode
    from nipype.pipeline.plugins import multiproc
    from nipype.pipeline.plugins.multiproc import MultiProcPlugin as NipypeMultiProc

    class MultiProcPlugin(NipypeMultiProc):
        def run(self, graph, config, updatehash=False):
            gc.collect()
            gc.freeze()
            multiproc.gc = _YoungGC()
            try:
                return super().run(graph, config, updatehash=updatehash)
            finally:
                multiproc.gc = gc
                gc.unfreeze()

        def _send_procs_to_workers(self, updatehash=False, graph=None):
            super()._send_procs_to_workers(updatehash=updatehash, graph=graph)
            self._run_here_while_busy(updatehash, graph)

        def _run_here_while_busy(self, updatehash, graph):
            # nipype runs a run_without_submitting node (the derivative sinks) only when a
            # worker's slot is free for it, and the deepest ready node takes a free slot first:
            # the sinks waited for the end of the run, gzipping while the workers sat idle
            if not self.pending_tasks:
                return
            ready = np.flatnonzero(~self.proc_done & (self.depidx.sum(axis=0) == 0).__array__())
            here = [job for job in ready
                    if self.procs[job].run_without_submitting and not isinstance(self.procs[job], MapNode)]
            for jobid in self._sort_jobs(here, scheduler=self.plugin_args.get("scheduler")):
                if any(self._taskresult.get(taskid) is not None for taskid, _ in self.pending_tasks):
                    return  # a worker is free: back to the loop, which hands it the next node
                self._run_in_scheduler(jobid, updatehash, graph)

        def _run_in_scheduler(self, jobid, updatehash, graph):
            # what nipype's _send_procs_to_workers does with such a node
            self.proc_done[jobid] = True
            self.proc_pending[jobid] = True
            if self._local_hash_check(jobid, graph):
                return
            try:
                self.procs[jobid].run(updatehash=updatehash)
            except Exception:  # noqa: BLE001 - recorded as nipype records a failed node
                trace = format_exception(*sys.exc_info())
                self._run_errors.append(trace)
                self._clean_queue(jobid, graph, result={"result": None, "traceback": trace})
            self._task_finished_cb(jobid)
            self._remove_node_dirs()
            self._stats = None

        def _generate_dependency_list(self, graph):
            super()._generate_dependency_list(graph)
            depth = downstream_depth(graph)
            self._priority = [depth.get(node, 0) for node in self.procs]

        def _sort_jobs(self, jobids, scheduler="tsort"):
            if scheduler not in (None, "critical_path"):  # nipype's own ("tsort", "mem_thread") when asked for
                return super()._sort_jobs(jobids, scheduler=scheduler)
            return sorted(jobids, key=lambda job: (-self._job_priority(job), job))

        def _job_priority(self, job) -> int:
            # a MapNode's per-item jobs are appended after the graph's nodes: their parent's rank
            job = self.mapnodesubids.get(job, job)
            return self._priority[job] if job < len(self._priority) else 0

    MultiProcPlugin.__doc__ = multiproc_plugin_class.__doc__
    return MultiProcPlugin


def downstream_depth(graph) -> dict:
    """Per node of a nipype execution graph: the number of nodes on its longest path to a sink,
    itself included (1 for a node nothing depends on).

    :func:`multiproc_plugin_class`'s scheduler starts the ready node of greatest depth first
    ("highest level first" list scheduling): a node that a long chain of later steps waits on is
    not left queued behind one whose results only a sink reads.  nipype's own order (its graph's
    topological order) started the paper subject's tissue segmentation 14 s after it was ready,
    behind the FLAIR registration and the tensor fit, while the segmentation gates the analysis
    mask, the inference and the report: on 2 processes the graph took 98.7 s, and 93.3 s with
    this order (``benchmarks/run_all.py``).
    """
    import networkx as nx

    depth: dict = {}
    for node in reversed(list(nx.topological_sort(graph))):
        depth[node] = 1 + max((depth[child] for child in graph.successors(node)), default=0)
    return depth


def available_cores() -> int:
    """The CPUs this process may run on (its affinity: a batch job's allocation, not the node's)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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
    """nipype status callback: one log line per finished node, ``[done/total] name (seconds)``.

    It also notes each finished node's folder, where its result file says how long its own
    work took (:func:`summarize_run` reads them once the run is over, not while the
    scheduler waits on this callback).
    """

    def __init__(self, workflow):
        try:
            # nipype drops the plain IdentityInterface nodes (inputnode, outputnode) before running
            self.total: int | str = sum(1 for node in workflow._get_all_nodes()
                                        if type(node.interface).__name__ != "IdentityInterface"
                                        or getattr(node, "joinsource", None) is not None)
        except AttributeError:  # not a nipype workflow (tests use stand-ins)
            self.total = "?"
        self.done = 0
        self.started: dict[str, float] = {}
        self.finished: list[tuple[str, str]] = []  # (node folder, status)

    def __getstate__(self):
        # nipype hands the plugin arguments (this callback) to MapNodes, which are pickled
        # into their folders and sent to workers: they need no copy of the records
        return {**self.__dict__, "started": {}, "finished": []}

    def __call__(self, node, status: str) -> None:
        if node.name.startswith("_"):  # the per-item children of a MapNode: counted with their parent
            return
        if status == "start":
            self.started[node.fullname] = time.monotonic()
            return
        self.done += 1
        try:
            self.finished.append((node.output_dir(), status))
        except AttributeError:  # a stand-in node without a folder (tests)
            pass
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


@dataclass(frozen=True)
class RunSummary:
    """What one workflow run cost: its nodes, their own work, and the wall time around it.

    ``work_s`` sums each node's own run time (nipype's ``runtime.duration``, from its result
    file) over the nodes that ran in this run; nodes reused from the work folder are counted
    apart and add no work.  ``overhead_s`` is the wall time the work spread over the
    processes does not explain: scheduling, nipype's per-node files, waiting on dependencies.
    ``scheduler_cpu_s`` is the CPU time of the process that ran the scheduler (and the small
    nodes nipype runs in it).
    """

    workflow: str
    nodes: int
    reused: int
    work_s: float
    wall_s: float
    processes: int
    scheduler_cpu_s: float

    @property
    def overhead_s(self) -> float:
        return max(0.0, self.wall_s - self.work_s / max(1, self.processes))

    @property
    def overhead_pct(self) -> float:
        return 100.0 * self.overhead_s / self.wall_s if self.wall_s > 0 else 0.0

    def line(self) -> str:
        """The run log's closing line of a workflow run (:meth:`parse` reads it back)."""
        return (f"{self.workflow}: {self.nodes} nodes ({self.reused} reused), work {self.work_s:.1f} s, "
                f"wall {self.wall_s:.1f} s on {self.processes} process(es): overhead {self.overhead_s:.1f} s "
                f"({self.overhead_pct:.0f} % of wall), scheduler CPU {self.scheduler_cpu_s:.1f} s")

    _PATTERN = re.compile(
        r"(?P<workflow>\S+): (?P<nodes>\d+) nodes \((?P<reused>\d+) reused\), work (?P<work_s>[\d.]+) s, "
        r"wall (?P<wall_s>[\d.]+) s on (?P<processes>\d+) process\(es\): overhead [\d.]+ s \([\d.]+ % of wall\), "
        r"scheduler CPU (?P<scheduler_cpu_s>[\d.]+) s")

    @classmethod
    def parse(cls, text: str) -> "RunSummary | None":
        """The last summary line in ``text`` (e.g. a run log), or None."""
        found = list(cls._PATTERN.finditer(text))
        if not found:
            return None
        g = found[-1].groupdict()
        return cls(workflow=g["workflow"], nodes=int(g["nodes"]), reused=int(g["reused"]),
                   work_s=float(g["work_s"]), wall_s=float(g["wall_s"]), processes=int(g["processes"]),
                   scheduler_cpu_s=float(g["scheduler_cpu_s"]))


def _node_work(folder: str, run_started: datetime) -> float | None:
    """Seconds of work a finished node did in this run; None when it was reused (or left no result)."""
    from pathlib import Path

    from nipype.pipeline.engine.utils import load_resultfile

    path = Path(folder) / f"result_{Path(folder).name}.pklz"
    try:
        runtime = load_resultfile(str(path)).runtime
    except Exception:  # noqa: BLE001 - a crashed node may leave no (readable) result
        return None
    total, ran = 0.0, False
    for item in runtime if isinstance(runtime, list) else [runtime]:  # a MapNode: one per item
        started = getattr(item, "startTime", None)
        if started is None or datetime.fromisoformat(started) < run_started:
            continue
        total += float(getattr(item, "duration", 0.0) or 0.0)
        ran = True
    return total if ran else None


def summarize_run(workflow_name: str, progress: NodeProgress, run_started: datetime, wall_s: float,
                  processes: int, scheduler_cpu_s: float) -> RunSummary:
    """Nodes, work and overhead of a finished run, from the result files of its nodes."""
    work, reused = 0.0, 0
    for folder, _status in progress.finished:
        seconds = _node_work(folder, run_started)
        if seconds is None:
            reused += 1
        else:
            work += seconds
    return RunSummary(workflow=workflow_name, nodes=len(progress.finished), reused=reused, work_s=work,
                      wall_s=wall_s, processes=processes, scheduler_cpu_s=scheduler_cpu_s)


def run_workflow(workflow, settings: Settings, run_id: str) -> None:
    """Run a nipype workflow in the work folder with crash files in the output logs."""
    from nipype import config as nipype_config

    from bids_uad.algorithms.registration import set_itk_threads

    crash_dir = settings.output_dir / "logs" / f"crash-{run_id}"
    workflow.base_dir = str(settings.code_work_dir)
    others = sorted(p.name for p in Path(settings.work_dir).glob("bids_uad_*")
                    if p.is_dir() and p != settings.code_work_dir)
    if others:
        LOGGER.info("work folder %s: steps of this code are kept in %s; it also holds %d folder(s) of other code "
                    "versions, never reused (%s): remove them to free space", settings.work_dir,
                    settings.code_work_dir.name, len(others), ", ".join(others))
    workflow.config["execution"].update({
        "crashdump_dir": str(crash_dir),
        "crashfile_format": "txt",
        "stop_on_first_crash": settings.stop_on_first_crash,
        # nipype's default, as fMRIPrep: a file input's hash is its path, size and modification
        # time.  "content" read every input file again for every node that takes it (the 4-D dwi
        # for each model's nodes, each 1 mm template map): 37 s of the scheduler's CPU, and the
        # scheduler waits while it hashes, in a 260-node inference run (cProfile).  A node that
        # runs again writes new files (new times), so everything downstream still runs again.
        "hash_method": "timestamp",
        "remove_unnecessary_outputs": False,
        "create_report": False,
    })
    nipype_config.set("execution", "check_version", "false")
    # the workers inherit it: ITK fixes its thread count at its first use in a process, and a
    # worker's first ITK call may be a node that sets none (registration.set_itk_threads)
    set_itk_threads(settings.omp_nthreads)
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
    cores = available_cores()
    if plugin == "Linear" and cores > 1:
        # one paper-geometry subject: 173 s in one process, 108 s with --nprocs 2 --omp-nthreads 1 (2 cores)
        LOGGER.info("one process on a machine with %d cores: --nprocs %d runs independent steps side by side",
                    cores, cores)
    progress = args.get("status_callback")
    run_started = datetime.now(timezone.utc)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    try:
        if plugin == "MultiProc":
            workflow.run(plugin=multiproc_plugin_class()(plugin_args=args))
        else:
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
    finally:
        if isinstance(getattr(progress, "finished", None), list):  # a NodeProgress (benchmarks swap in their own)
            processes = 1 if plugin == "Linear" else int(args.get("n_procs", 1))
            try:
                summary = summarize_run(workflow.name, progress, run_started, time.perf_counter() - wall0,
                                        processes, time.process_time() - cpu0)
                LOGGER.info("%s", summary.line())
            except Exception:  # noqa: BLE001 - the figures must never hide the run's outcome
                LOGGER.warning("the run's node figures could not be summed", exc_info=True)
