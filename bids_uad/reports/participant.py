"""Sections of the participant report, built from one subject's derivatives on disk.

Each ``*_section`` function returns a list of items (see :mod:`bids_uad.reports.reportlets`)
for all sessions of the subject; a figure whose inputs are missing becomes a
"not available: <why>" note instead.
"""
from __future__ import annotations

from typing import Callable

from bids_uad.reports.sections_anat import anatomical_section
from bids_uad.reports.sections_anomaly import anomaly_section
from bids_uad.reports.sections_dwi import diffusion_section
from bids_uad.reports.sections_longitudinal import longitudinal_section
from bids_uad.reports.sections_summary import errors_section, summary_section

__all__ = ["SECTION_BUILDERS", "summary_section", "errors_section"]

SECTION_BUILDERS: dict[str, Callable] = {
    "anatomical": anatomical_section, "diffusion": diffusion_section,
    "anomaly": anomaly_section, "longitudinal": longitudinal_section,
}
