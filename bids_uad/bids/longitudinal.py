"""The longitudinal statistics tables: one TSV per subject and the group TSV built from them.

``OUTPUT_DIR/sub-X/sub-X_desc-longitudinal_stats.tsv`` holds one row per follow-up session
and model; ``OUTPUT_DIR/group/desc-longitudinal_stats.tsv`` is rebuilt from every subject's
table under a file lock (subjects may run in parallel) and written atomically, so a reader
never sees a half-written table.  Both carry a JSON sidecar describing their columns.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from bids_uad.algorithms.longitudinal import STAT_COLUMNS
from bids_uad.bids import outputs
from bids_uad.bids.derivatives import read_tsv, safe_join, validate_label, write_json, write_tsv

#: identifier columns of the longitudinal TSVs (then algorithms.longitudinal.STAT_COLUMNS)
ID_COLUMNS = ("participant_id", "baseline_session", "followup_session", "model",
              "baseline_lesion_source", "followup_lesion_source")
GROUP_TSV = Path(outputs.GROUP_OUTPUTS["longitudinal_group_tsv"]).name


@contextmanager
def _locked(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def rebuild_group_table(output_dir: str | Path) -> Path:
    """``OUTPUT_DIR/group/desc-longitudinal_stats.tsv`` from every subject's TSV (locked, atomic).

    The lock serialises concurrent rebuilds (subjects running in parallel); the atomic
    rename means a reader never sees a half-written table.  The last rebuild sees every
    subject TSV written before it, so no subject is lost.
    """
    output_dir = Path(output_dir)
    target = outputs.group_path(output_dir, "longitudinal_group_tsv")
    # the lock lives with the logs, not among the derivatives (it stays: removing a flock file races)
    with _locked(output_dir / "logs" / "locks" / f"{GROUP_TSV}.lock"):
        rows: list[dict] = []
        for path in sorted(p for p in output_dir.glob("sub-*/sub-*.tsv")
                           if outputs.matches(p.name, "longitudinal_subject_tsv")):
            rows.extend(read_tsv(path))
        rows.sort(key=lambda r: (r.get("participant_id", ""), r.get("followup_session", ""), r.get("model", "")))
        columns = list(ID_COLUMNS) + list(STAT_COLUMNS)
        columns += [c for c in dict.fromkeys(k for r in rows for k in r) if c not in columns]
        write_tsv(target, rows, columns)
        _write_columns_sidecar(target)
    return target


#: TSV column descriptions (written as the tables' JSON sidecars)
COLUMN_DESCRIPTIONS = {
    "participant_id": "subject",
    "baseline_session": "baseline session (first with dwi by acq_time, or --baseline-session)",
    "followup_session": "follow-up session compared with the baseline",
    "model": "anomaly model",
    "baseline_lesion_source": "'given' (--lesion-masks) or 'estimate' (FLAIR hyperintensity estimate)",
    "followup_lesion_source": "'given' or 'estimate'",
    "baseline_anomaly_ml": "anomalous volume at baseline (mL)",
    "baseline_lesion_ml": "baseline lesion volume in baseline dwi space (mL)",
    "followup_lesion_ml": "follow-up lesion volume carried into baseline dwi space (mL)",
    "new_lesion_ml": "follow-up lesion outside the baseline lesion (mL)",
    "mismatch_ml": "anomalous at baseline, outside the baseline lesion, in the analysis mask (mL)",
    "mismatch_components": "connected components of the mismatch (26-connectivity)",
    "mismatch_growth_ml": "mismatch volume that is lesion at follow-up (mL)",
    "overlap_fraction": "mismatch_growth_ml / mismatch_ml",
    "overlap_fraction_random_mean": "mean overlap fraction of random regions of the same size "
                                    "(analysis mask minus baseline lesion)",
    "overlap_fraction_random_std": "standard deviation of the random overlap fractions",
    "overlap_fraction_random_p": "one-sided permutation p-value: P(random >= observed), (1+k)/(1+n)",
    "overlap_fraction_perilesional_mean": "mean random overlap when the random regions are drawn within "
                                          "perilesional_mm of the baseline lesion (n/a when not asked for)",
    "overlap_fraction_perilesional_p": "one-sided p-value against the perilesional random regions",
    "new_lesion_in_mismatch_fraction": "part of the new lesion that was mismatch at baseline",
    "followup_anomaly_ml": "anomalous volume at follow-up, in baseline dwi space (mL; follow-up dwi only)",
    "anomaly_change_ml": "followup_anomaly_ml - baseline_anomaly_ml",
    "score_change_mean": "mean follow-up minus baseline anomaly score in the analysis mask",
    "score_change_mismatch_mean": "mean score change within the mismatch",
    "n_permutations": "random regions drawn",
    "null_method": "components (shifted/flipped copies of the mismatch components) or blobs",
}


def _write_columns_sidecar(tsv: Path) -> None:
    write_json(tsv.with_suffix(".json"), {c: {"Description": d} for c, d in COLUMN_DESCRIPTIONS.items()})


def write_subject_table(output_dir: str | Path, subject: str, rows: list[dict]) -> Path:
    """``OUTPUT_DIR/sub-X/sub-X_desc-longitudinal_stats.tsv`` and its JSON sidecar (atomic)."""
    subject = validate_label(subject, "sub")
    path = safe_join(output_dir, *outputs.relpath_for("longitudinal_subject_tsv", {"sub": subject}).parts)
    write_tsv(path, rows, list(ID_COLUMNS) + list(STAT_COLUMNS))
    _write_columns_sidecar(path)
    return path
