"""The participant reports of a run, built in ``--nprocs`` processes.

A report is tens of seconds of matplotlib for a subject with several sessions (tens of figures;
~10 CPU s per demo subject), and the reports of a run are independent, so they are built side by
side in worker processes, forked where the system allows (a spawned worker first spent ~3 s
importing what this process has loaded; the workers start with no log handlers of their own).
Each worker's log records are collected and handed back with its result, then
re-emitted in the parent through the same loggers, so the run log reads as if one process had
built them.  A report that fails is logged with its traceback and never stops the others (nor
hides the run's own outcome).  When worker processes cannot be started, or one dies (killed for
memory), the reports it did not deliver are built in this process instead.

A run of one subject (one HPC job per subject, ``make bench``) with ``--nprocs`` 2 or more
forks one helper that draws the anatomical section's figures while this process draws the
others; the report is then assembled from the figure files, which are cached and written
atomically, so whatever the helper did not deliver is drawn then.  On the ``paper`` subject the
sections took 2.8 s (anatomical), 1.9 s (diffusion) and 1.9 s (anomaly) one after the other.
"""
from __future__ import annotations

import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Iterable

from bids_uad.errors import PipelineCrashError
from bids_uad.reports.build import build_group_report, build_participant_report, make_section_figures
from bids_uad.reports.participant import SECTION_BUILDERS

LOGGER = logging.getLogger("bids_uad.reports")
#: resident memory of one report worker (GB): the peak measured on the demo's patients is ~0.8 GB
WORKER_MEM_GB = 1.0
#: the sections a one-subject run's forked helper draws (the others are drawn in this process)
HELPER_SECTIONS = ("anatomical",)
#: seconds this process waits for that helper before drawing what it left (it took ~3 s)
HELPER_TIMEOUT_S = 300.0


def report_processes(settings, n_subjects: int) -> int:
    """How many worker processes: ``--nprocs``, at most one per subject and what ``--mem`` allows."""
    n = min(max(1, settings.nprocs), max(1, n_subjects))
    if settings.mem_gb:
        n = min(n, max(1, int(settings.mem_gb // WORKER_MEM_GB)))
    return n


class _Collect(logging.Handler):
    """Keeps a worker's records, flattened so that they pickle (message formatted, traceback as text)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        record.msg, record.args = record.getMessage(), None
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        record.stack_info = None
        self.records.append(record)


def _report_cost(settings, subject: str) -> int:
    """How much drawing a subject's report takes, roughly: its images in OUTPUT_DIR (a demo
    control with one session has 54 and took ~3 s, a patient with a follow-up 122 and ~7 s)."""
    from bids_uad.bids.derivatives import validate_label

    try:
        folder = Path(settings.output_dir) / f"sub-{validate_label(subject, 'sub')}"
    except Exception:  # noqa: BLE001 - a bad label fails in its worker, with its message
        return 0
    return sum(1 for _ in folder.rglob("*.nii.gz")) if folder.is_dir() else 0


def _fork_context():
    """The fork start method (no interpreter start, no imports), or None where there is none."""
    try:
        return multiprocessing.get_context("fork")
    except ValueError:
        return None


def _worker_context():
    """fork where there is one, else spawn."""
    return _fork_context() or multiprocessing.get_context("spawn")


def _without_handlers() -> None:
    """A report worker's start: a forked one inherits this process's log handlers (console, run
    log), through which its records would appear twice, directly and replayed by the parent."""
    logger = logging.getLogger("bids_uad")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)


def _one_report(settings, subject: str, run_id: str | None, level: int) -> tuple[str | None, list]:
    """Worker: build one report, logging what the parent would have; returns (path or None, records)."""
    collect = _Collect()
    root = logging.getLogger("bids_uad")
    root.addHandler(collect)
    root.setLevel(level)
    path = None
    try:
        path = str(build_participant_report(settings, subject, run_id))
    except Exception:  # noqa: BLE001 - a report must not stop the others
        LOGGER.exception("sub-%s: the HTML report could not be built", subject)
    finally:
        root.removeHandler(collect)
    return path, collect.records


def _replay(records: Iterable[logging.LogRecord]) -> None:
    for record in records:
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)


def build_participant_reports(settings, subjects: Iterable[str], run_id: str | None = None,
                              processes: int | None = None) -> list[Path]:
    """Build ``sub-<label>.html`` for each of ``subjects``; the paths of those that were written,
    in the order of ``subjects``.  ``processes`` defaults to :func:`report_processes`."""
    subjects = list(subjects)
    n = report_processes(settings, len(subjects)) if processes is None else max(1, min(processes, len(subjects)))
    if len(subjects) == 1 and report_processes(settings, 2) >= 2 and (processes is None or processes >= 2):
        return _one_subject_with_helper(settings, subjects[0], run_id)
    if n <= 1:
        return _in_this_process(settings, subjects, run_id)
    LOGGER.info("building %d participant reports in %d processes", len(subjects), n)
    level = logging.getLogger("bids_uad").getEffectiveLevel()
    done: dict[str, Path | None] = {}
    try:
        with ProcessPoolExecutor(n, mp_context=_worker_context(), initializer=_without_handlers) as pool:
            # the dearest first (longest processing time first): a heavy report left for last
            # kept one worker busy alone at the end
            order = sorted(subjects, key=lambda subject: -_report_cost(settings, subject))
            futures = dict(zip(order, (pool.submit(_one_report, settings, subject, run_id, level) for subject in order)))
            for subject, future in ((subject, futures[subject]) for subject in subjects):
                try:
                    path, records = future.result()
                except Exception:  # noqa: BLE001 - a worker died (or its result could not come back):
                    continue  # what it did not deliver is built below
                _replay(records)
                done[subject] = Path(path) if path else None
    except (OSError, BrokenProcessPool) as exc:  # no worker could start (no semaphores, no memory)
        LOGGER.warning("report worker processes failed (%s): building the remaining reports in this process", exc)
    missing = [s for s in subjects if s not in done]
    if missing:
        LOGGER.warning("%d report(s) not delivered by a worker process, built in this process: %s", len(missing),
                       ", ".join(f"sub-{s}" for s in missing))
        done.update(zip(missing, _in_this_process(settings, missing, run_id, keep_failures=True)))
    return [done[s] for s in subjects if done.get(s) is not None]


def _draw_quietly(settings, subject: str, run_id: str | None, sections) -> None:
    """The forked helper: draws ``sections``' figures without logging (the parent's assembly
    tries a failed figure again and logs it once)."""
    logging.getLogger("bids_uad").disabled = True
    try:
        make_section_figures(settings, subject, sections, run_id)
    except Exception:  # noqa: BLE001 - the parent draws what is missing
        pass


def _one_subject_with_helper(settings, subject: str, run_id: str | None) -> list[Path]:
    """One subject's report, a forked helper drawing :data:`HELPER_SECTIONS` meanwhile (fork: no
    interpreter start or imports, which took longer than the figures).  Without fork (not Linux),
    or when the helper cannot start, everything is drawn here."""
    fork, helper = _fork_context(), None
    if fork is not None:
        try:
            helper = fork.Process(target=_draw_quietly, args=(settings, subject, run_id, HELPER_SECTIONS),
                                  daemon=True)
            helper.start()
        except OSError as exc:
            LOGGER.debug("report helper process not started (%s): drawing every section here", exc)
            helper = None
    if helper is not None:
        try:
            make_section_figures(settings, subject, [k for k in SECTION_BUILDERS if k not in HELPER_SECTIONS], run_id)
        except Exception:  # noqa: BLE001 - the assembly below draws it again and logs why it fails
            pass
        helper.join(HELPER_TIMEOUT_S)
        if helper.is_alive():
            LOGGER.warning("sub-%s: the report's helper process did not finish in %.0f s; drawing its figures here",
                           subject, HELPER_TIMEOUT_S)
            helper.terminate()
            helper.join()
    return _in_this_process(settings, [subject], run_id)


def _in_this_process(settings, subjects: list[str], run_id: str | None, keep_failures: bool = False) -> list:
    """The reports built one after another here; a failure is logged (None in its place with
    ``keep_failures``, else left out)."""
    results = []
    for subject in subjects:
        try:
            results.append(build_participant_report(settings, subject, run_id))
        except Exception:  # noqa: BLE001 - a report must not stop the others
            LOGGER.exception("sub-%s: the HTML report could not be built", subject)
            if keep_failures:
                results.append(None)
    return results


def build_reports(settings, subjects=None, run_id: str | None = None, group: bool | None = None) -> list[Path]:
    """Build the participant reports of ``subjects`` (default: every ``sub-*`` in OUTPUT_DIR; in
    ``--nprocs`` processes) and the group report (default: when ``models/`` exists).  What
    ``--reports-only`` runs; a report that could not be built makes it fail (exit 1)."""
    from bids_uad.reports.collect import list_subjects

    output_dir = Path(settings.output_dir)
    subjects = list(subjects) if subjects else list_subjects(output_dir)
    paths = build_participant_reports(settings, subjects, run_id)
    if len(paths) < len(subjects):  # each failure is in the log with its traceback
        raise PipelineCrashError(f"{len(subjects) - len(paths)} of {len(subjects)} participant report(s) could not "
                                 f"be built (see the log in {output_dir / 'logs'})")
    if group or (group is None and (output_dir / "models").is_dir()):
        paths.append(build_group_report(settings, run_id))
    return paths
