"""Entry points: the participant report (``sub-<label>.html``) and the group report (``group.html``).

Both read only the derivatives on disk, so they run as the last stage of a run or alone with
``--reports-only``.  Figures missing (or older than their inputs) are made; the rest are reused.
"""
from __future__ import annotations

import logging
import shlex
import traceback
from pathlib import Path
from typing import Callable

from bids_uad.bids.derivatives import validate_label, write_text
from bids_uad.reports import group as G
from bids_uad.reports import participant as P
from bids_uad.reports.collect import collect_subject
from bids_uad.reports.html import Section, render_report
from bids_uad.reports.methods import build_group_methods, build_methods
from bids_uad.reports.reportlets import FigureMaker, kv, note, table, warning

LOGGER = logging.getLogger("bids_uad.reports")


def _safe(name: str, build: Callable[[], list[dict]]) -> list[dict]:
    """Run a section builder; a bug in one section becomes a warning, not a missing report."""
    try:
        return build()
    except Exception as exc:
        LOGGER.warning("report section %s failed: %s", name, exc)
        LOGGER.debug("%s", traceback.format_exc())
        return [warning(f"This section could not be built ({type(exc).__name__}: {exc}); see the log.")]


def about_items(settings, run_id: str | None) -> list[dict]:
    """Version, command line and settings of the run that built the report."""
    rows = [("bids_uad version", settings.version)]
    if run_id:
        rows.append(("run", run_id))
    rows.append(("command line", shlex.join(settings.command_line) if settings.command_line else "n/a"))
    logs = Path(settings.output_dir) / "logs"
    runs = sorted(p.name[4:-len("_settings.json")] for p in logs.glob("run-*_settings.json")) if logs.is_dir() else []
    if runs:
        rows.append(("runs recorded in logs/", f"{len(runs)} (latest {runs[-1]})"))
    settings_rows = [[k, v] for k, v in sorted(settings.to_dict().items())]
    item = table(["setting", "value"], settings_rows, caption="Settings")
    item["collapsed"] = True
    return [kv(rows), item]


def _subject_figures(settings, subject: str, run_id: str | None):
    """(label, OUTPUT_DIR, the subject's derivatives, its figure maker) for a participant report."""
    subject = validate_label(subject, "sub")
    output_dir = Path(settings.output_dir)
    subj = collect_subject(output_dir, subject, run_id, getattr(settings, "lesion_masks", None),
                           getattr(settings, "bids_dir", None))
    return subject, output_dir, subj, FigureMaker(output_dir, subj.figures_dir)


def _section_items(key: str, subj, maker) -> list[dict]:
    """The items of participant section ``key`` (its figures drawn unless up to date)."""
    return _safe(key, lambda: P.SECTION_BUILDERS[key](subj, maker))


def build_participant_report(settings, subject: str, run_id: str | None = None) -> Path:
    """Write ``OUTPUT_DIR/sub-<label>.html`` (figures in ``sub-<label>/figures/``); return its path."""
    subject, output_dir, subj, maker = _subject_figures(settings, subject, run_id)
    sections = [Section("summary", "Summary", _safe("summary", lambda: P.summary_section(subj)))]
    for key, title in (("anatomical", "Anatomical"), ("diffusion", "Diffusion"), ("anomaly", "Anomaly"),
                       ("longitudinal", "Longitudinal")):
        sections.append(Section(key, title, _section_items(key, subj, maker)))
    sections.append(Section("about", "About", about_items(settings, run_id)))
    errors = P.errors_section(subj, maker.errors)
    sections.append(Section("errors", "Errors", errors, flag=bool(subj.crashes or maker.errors)))
    try:
        methods = build_methods(subj, settings.version)
    except Exception as exc:  # the methods text must not cost the report
        LOGGER.warning("methods text failed: %s", exc)
        methods = None
    # subj.sessions holds one entry per dwi series (run, or combination of runs) of each session
    n_ses, n_series = len({ses.session for ses in subj.sessions}), len(subj.sessions)
    links = [("group.html", "Group report")] if (output_dir / "group.html").is_file() else []
    html = render_report(links=links,
        title=f"sub-{subject}", heading=f"Participant sub-{subject}", version=settings.version,
        subtitle=f"{n_ses} session(s)" + (f", {n_series} dwi series" if n_series > n_ses else "")
        + " · quality control of preprocessing and anomaly detection",
        sections=sections, methods=methods)
    path = write_text(output_dir / f"sub-{subject}.html", html)
    LOGGER.debug("participant report written: %s", path)
    return path


def make_section_figures(settings, subject: str, sections, run_id: str | None = None) -> None:
    """Draw the figures of ``sections`` (keys of the participant sections' builders) into the
    subject's figure folder, and nothing else: a later :func:`build_participant_report` finds
    them up to date and only assembles them.  A section that fails is logged and left to that
    build, which tries it again."""
    _, _, subj, maker = _subject_figures(settings, subject, run_id)
    for key in sections:
        _section_items(key, subj, maker)


def build_group_report(settings, run_id: str | None = None) -> Path:
    """Write ``OUTPUT_DIR/group.html`` from ``models/*.json`` and ``group/*.tsv``; return its path."""
    output_dir = Path(settings.output_dir)
    models = G.load_models(output_dir / "models")
    group_dir = output_dir / "group"
    maker = FigureMaker(output_dir, group_dir / "figures")
    bids_dir = Path(settings.bids_dir) if settings.bids_dir else None
    sections = [
        Section("cohort", "Cohort", _safe("cohort", lambda: G.cohort_section(output_dir, bids_dir, models))),
        Section("training", "Training", _safe("training", lambda: G.training_section(models, maker))),
        Section("calibration", "Calibration", _safe("calibration", lambda: G.calibration_section(models, group_dir, maker))),
        Section("detection", "Detection: models and baselines",
                _safe("detection", lambda: G.detection_section(group_dir, maker))),
        Section("evaluation", "Evaluation", _safe("evaluation", lambda: G.evaluation_section(group_dir))),
        Section("about", "About", about_items(settings, run_id)),
    ]
    errors = [note("No errors while building this report.")]
    if maker.errors:
        errors = [warning(e) for e in maker.errors]
    sections.append(Section("errors", "Errors", errors, flag=bool(maker.errors)))
    html = render_report(title="group", heading="Group report", version=settings.version,
                         subtitle=f"{len(models)} model(s) · training, cross-validation, calibration, evaluation",
                         sections=sections, methods=build_group_methods(models, settings.version))
    path = write_text(output_dir / "group.html", html)
    LOGGER.debug("group report written: %s", path)
    return path
