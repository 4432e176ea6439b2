"""Run one analysis level: build its graph, execute it, build its reports.

The level runners sit above workflows and reports (they call both), so they live with the
command line, as fMRIPrep's ``cli/workflow.py`` does.
"""
from __future__ import annotations

import logging

from bids_uad.bids.layout import BIDSInputs
from bids_uad.config import Settings
from bids_uad.reports.batch import build_participant_reports, build_reports
from bids_uad.reports.build import build_group_report
from bids_uad.workflows.base import collect_participant_inputs, init_participant_wf
from bids_uad.workflows.execution import run_workflow
from bids_uad.workflows.group import run_group_training, select_controls

LOGGER = logging.getLogger("bids_uad.workflows")


def run_participant(settings: Settings, bids: BIDSInputs, subjects: list[str], run_id: str) -> None:
    """Participant level: preprocess (and with --model, map anomalies) for the selected subjects.

    The HTML reports are built from the derivatives on disk after the workflow ran, also when
    it crashed (the report then shows the crash files); ``--reports-only`` builds only them.
    """
    if settings.reports_only:
        for path in build_reports(settings, subjects, run_id, group=False):
            LOGGER.info("report: %s", path)
        return
    plan = collect_participant_inputs(settings, bids, subjects)
    LOGGER.info("%d session(s) of %d subject(s) selected", len(plan.sessions), len(subjects))
    workflow = init_participant_wf(settings, plan)
    try:
        if workflow.list_node_names():
            run_workflow(workflow, settings, run_id)
    finally:
        _build_participant_reports(settings, subjects, run_id)


def _build_participant_reports(settings: Settings, subjects: list[str], run_id: str) -> None:
    """One HTML report per subject, in ``--nprocs`` processes; a failing report is logged, never
    hides the run's own error."""
    for path in build_participant_reports(settings, subjects, run_id):
        LOGGER.info("report: %s", path)


def run_group(settings: Settings, bids: BIDSInputs, run_id: str) -> None:
    """Group level: train and calibrate the models on the controls, evaluate, group report."""
    controls = select_controls(settings, bids)
    LOGGER.info("%d controls available for training: %s", len(controls), ", ".join(controls))
    run_group_training(settings, bids, controls, run_id)
    LOGGER.info("group report: %s", build_group_report(settings, run_id))
