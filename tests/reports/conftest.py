"""Fixtures of the report tests: fake derivatives with both reports built once per session."""
from __future__ import annotations

import pytest

from tests.reports.fakes import make_derivatives, make_group, make_logs, make_longitudinal, settings_for


@pytest.fixture(scope="session")
def built_reports(tmp_path_factory):
    """Derivatives + logs + group inputs, with both reports built once for the module."""
    from bids_uad.reports.build import build_group_report, build_participant_report

    root = tmp_path_factory.mktemp("reports")
    out = root / "derivatives"
    make_derivatives(out)
    make_logs(out)
    make_longitudinal(out)
    make_group(out)
    bids = root / "bids"
    bids.mkdir()
    (bids / "participants.tsv").write_text("participant_id\tgroup\tage\tsex\nsub-01\tpatient\t51\tF\n"
                                           "sub-ctrl01\tcontrol\t40\tM\n")
    settings = settings_for(out, bids)
    html = build_participant_report(settings, "01", run_id="20260101-000000_abcd1234")
    group = build_group_report(settings)
    html = build_participant_report(settings, "01", run_id="20260101-000000_abcd1234")  # now links group.html
    return {"out": out, "settings": settings, "html": html, "group": group}
