"""Participant reports built side by side in worker processes, their logs back in the parent's."""
from __future__ import annotations

import logging
import re

from bids_uad.reports.batch import build_participant_reports, report_processes
from tests.reports.fakes import make_derivatives, settings_for


def test_reports_in_two_processes_with_their_logs(tmp_path, caplog):
    out = tmp_path / "out"
    make_derivatives(out, subject="01", evil=False, with_anomaly=False)
    settings = settings_for(out, nprocs=2)
    assert report_processes(settings, 3) == 2
    with caplog.at_level(logging.INFO, logger="bids_uad"):
        paths = build_participant_reports(settings, ["../x", "01"])
    # the good subject written, the bad label reported, not fatal to the other
    assert [p.name for p in paths] == ["sub-01.html"]
    assert all(p.is_file() and "Participant sub-" in p.read_text() for p in paths)
    failed = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failed) == 1 and "sub-../x" in failed[0].getMessage()
    assert failed[0].exc_text and "label" in failed[0].exc_text  # the worker's traceback came along
    assert any("in 2 processes" in r.getMessage() for r in caplog.records)


def test_worker_records_reach_the_run_log_once(tmp_path):
    """Forked workers inherit the parent's handlers: each record must still be written once."""
    out = tmp_path / "out"
    make_derivatives(out, subject="01", evil=False, with_anomaly=False)
    log = tmp_path / "run.log"
    handler = logging.FileHandler(log)
    logger = logging.getLogger("bids_uad")
    logger.addHandler(handler)
    try:
        build_participant_reports(settings_for(out, nprocs=2), ["../x", "01"])
    finally:
        logger.removeHandler(handler)
        handler.close()
    lines = log.read_text().splitlines()
    assert sum("the HTML report could not be built" in line for line in lines) == 1, lines


def test_report_processes_follow_nprocs_subjects_and_memory(tmp_path):
    assert report_processes(settings_for(tmp_path, nprocs=8), 3) == 3
    assert report_processes(settings_for(tmp_path, nprocs=8, mem_gb=2.5), 10) == 2
    assert report_processes(settings_for(tmp_path), 10) == 1


def test_without_worker_processes_the_reports_are_built_here(tmp_path, caplog, monkeypatch):
    import bids_uad.reports.batch as batch

    def no_pool(*args, **kwargs):
        raise OSError("no semaphores here")

    monkeypatch.setattr(batch, "ProcessPoolExecutor", no_pool)
    out = tmp_path / "out"
    make_derivatives(out, subject="01", evil=False, with_anomaly=False)
    with caplog.at_level(logging.INFO, logger="bids_uad"):
        paths = build_participant_reports(settings_for(out, nprocs=2), ["01", "../x"])
    assert [p.name for p in paths] == ["sub-01.html"] and paths[0].is_file()
    messages = [r.getMessage() for r in caplog.records]
    assert any("no semaphores here" in m for m in messages)
    assert any("sub-01, sub-../x" in m for m in messages)  # named, and built in this process
    assert sum(r.levelno == logging.ERROR for r in caplog.records) == 1  # the bad label only


def test_one_subject_report_drawn_with_a_helper_is_the_one_process_report(tmp_path, monkeypatch):
    """One subject with --nprocs 2: a forked helper draws the anatomical figures; the report and
    its figures are those of a one-process build, and a helper that dies costs nothing."""
    import os

    import bids_uad.reports.batch as batch

    alone, helped = tmp_path / "alone", tmp_path / "helped"
    for out in (alone, helped):
        make_derivatives(out, subject="01", evil=False, with_anomaly=True)
    [one] = build_participant_reports(settings_for(alone, nprocs=2), ["01"], processes=1)  # no helper
    pids = tmp_path / "helper_pid"
    draw = batch._draw_quietly

    def recorded(*args):
        pids.write_text(str(os.getpid()))
        draw(*args)

    monkeypatch.setattr(batch, "_draw_quietly", recorded)
    [two] = build_participant_reports(settings_for(helped, nprocs=2), ["01"])
    assert int(pids.read_text()) != os.getpid()  # drawn in another process
    expected = one.read_text().replace(str(alone), "OUT")
    assert two.read_text().replace(str(helped), "OUT") == expected  # the settings table names the folder
    figures = sorted(p.relative_to(alone) for p in (alone / "sub-01" / "figures").rglob("*") if p.is_file())
    assert len(figures) > 5
    assert figures == sorted(p.relative_to(helped) for p in (helped / "sub-01" / "figures").rglob("*") if p.is_file())
    def drawn(path):  # without the signature of its input files (their times differ between the folders)
        return re.sub(rb"bids_uad-inputs:[0-9a-f]+", b"", path.read_bytes())

    for rel in figures:
        assert drawn(helped / rel) == drawn(alone / rel), rel

    def dies(*args):
        os._exit(3)

    monkeypatch.setattr(batch, "_draw_quietly", dies)
    for p in (helped / "sub-01" / "figures").rglob("*"):
        if p.is_file():
            p.unlink()
    [again] = build_participant_reports(settings_for(helped, nprocs=2), ["01"])
    assert again.read_text().replace(str(helped), "OUT") == expected


def test_the_dearest_report_is_started_first_and_results_keep_their_order(tmp_path, monkeypatch):
    """Longest processing time first: a subject with more images is submitted before a lighter
    one; the paths still come back in the order asked for."""
    from concurrent.futures import Future

    import bids_uad.reports.batch as batch

    out = tmp_path / "out"
    make_derivatives(out, subject="01", evil=False, with_anomaly=False)
    make_derivatives(out, subject="02", evil=False, with_anomaly=True)  # more images
    assert batch._report_cost(settings_for(out), "02") > batch._report_cost(settings_for(out), "01") > 0
    assert batch._report_cost(settings_for(out), "../x") == 0
    submitted = []

    class InOrder:  # runs each report here, in submission order
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, fn, settings, subject, *args):
            submitted.append(subject)
            future = Future()
            future.set_result(fn(settings, subject, *args))
            return future

    monkeypatch.setattr(batch, "ProcessPoolExecutor", InOrder)
    paths = build_participant_reports(settings_for(out, nprocs=2), ["01", "02"])
    assert submitted == ["02", "01"]
    assert [p.name for p in paths] == ["sub-01.html", "sub-02.html"]
