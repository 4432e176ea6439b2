"""Longitudinal section: what the longitudinal stage wrote, rendered by the report templates."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bids_uad.bids.derivatives import read_tsv
from bids_uad.reports.collect import SubjectDerivatives, read_json, to_float
from bids_uad.reports.reportlets import FigureMaker, note, table, text, warning


LONGITUDINAL_COLUMNS = (
    ("followup_session", "follow-up"), ("model", "model"), ("baseline_anomaly_ml", "anomaly (mL)"),
    ("baseline_lesion_ml", "baseline lesion (mL)"), ("followup_lesion_ml", "follow-up lesion (mL)"),
    ("mismatch_ml", "mismatch (mL)"), ("mismatch_growth_ml", "mismatch → lesion (mL)"),
    ("overlap_fraction", "overlap"), ("overlap_fraction_random_mean", "random overlap"),
    ("overlap_fraction_random_p", "p (one-sided)"))


def _longitudinal_table(path: Path) -> list[dict]:
    rows = read_tsv(path)
    cols = list(rows[0]) if rows else []
    items: list[dict] = []
    if any("estimate" in (r.get("baseline_lesion_source", ""), r.get("followup_lesion_source", "")) for r in rows):
        items.append(warning("Lesion masks are estimates (FLAIR hyperintensity, not a manual segmentation): "
                             "volumes and overlaps are approximate."))
    key = [(c, label) for c, label in LONGITUDINAL_COLUMNS if c in cols]
    if len(key) >= 4:
        def fmt(v: str) -> str:
            f = to_float(v)
            return f"{f:.3g}" if np.isfinite(f) and v.strip() not in ("",) and not v.isalpha() else v
        items.append(table([label for _, label in key], [[fmt(r.get(c, "")) for c, _ in key] for r in rows],
                           caption="Baseline anomalies against the lesion at follow-up"))
        items.append(text("Mismatch: anomalous at baseline, outside the baseline lesion. Overlap: the part of "
                          "the mismatch that is lesion at follow-up, against randomly placed regions of the "
                          "same size in the analysis mask (baseline lesion excluded)."))
    full = table(cols, [[r.get(c, "") for c in cols] for r in rows], caption=f"{path.name}: all columns")
    full["collapsed"] = bool(key) or len(cols) > 10
    items.append(full)
    return items


MATCH_COLUMNS = (("baseline_finding", "baseline finding"), ("followup_findings", "follow-up finding(s)"),
                 ("status", "status"), ("dice", "Dice"), ("baseline_volume_ml", "baseline (mL)"),
                 ("followup_volume_ml", "follow-up (mL)"), ("volume_change_percent", "change (%)"))


def _findings_matches(subj: SubjectDerivatives) -> list[dict]:
    """The baseline findings matched at each follow-up (``*_desc-findingsmatch_table.tsv``), per model."""
    from bids_uad.bids import outputs
    from bids_uad.bids.outputs import parse_name

    items: list[dict] = []
    for session in sorted({s.session for s in subj.sessions if s.session}):
        for path in outputs.find(subj.output_dir, "findings_matches", subj.subject, session):
            model = (parse_name(path.name) or ({}, "", ""))[0].get("model", "?")
            rows = read_tsv(path)

            def fmt(v: str) -> str:
                f = to_float(v)
                return f"{f:.3g}" if np.isfinite(f) else (v or "n/a")
            items.append(table([label for _, label in MATCH_COLUMNS],
                               [[fmt(r.get(c, "")) for c, _ in MATCH_COLUMNS] for r in rows],
                               caption=f"Findings of model {model} at baseline matched at follow-up ses-{session} "
                                       "(numbers of each session's findings table; follow-up carried to the "
                                       "baseline dwi grid)"))
    return items


def longitudinal_section(subj: SubjectDerivatives, maker: FigureMaker) -> list[dict]:
    """Tables and figures the longitudinal stage wrote (``*desc-longitudinal*``), shown natively.

    HTML fragments written by other stages are not embedded: everything goes through the
    escaping templates.
    """
    from bids_uad.reports.collect import parse_name

    if not subj.longitudinal:
        n = len({s.session for s in subj.sessions if s.session})
        why = ("fewer than two sessions" if n < 2 else "no longitudinal outputs (*desc-longitudinal*) found")
        return [note(f"Not available: {why}.")]
    items: list[dict] = _findings_matches(subj)
    for path in subj.longitudinal:
        if path.suffix == ".tsv":
            items.extend(_longitudinal_table(path))
            continue
        meta = read_json(path.with_suffix(".json"))
        entities = (parse_name(path.name) or ({}, "", ""))[0]
        follow = entities.get("desc", "")[len("longitudinal"):]
        follow = follow[:1].lower() + follow[1:]
        default = ("Longitudinal comparison" + (f", model {entities['model']}" if "model" in entities else "")
                   + (f", follow-up session {follow}" if follow else "") + ".")
        items.append({"type": "figure", "src": maker.rel(path), "alt": "Longitudinal comparison", "wide": True,
                      "caption": str(meta.get("Caption") or meta.get("Description") or default)})
    return items
