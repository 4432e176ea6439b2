"""Sections of the group report: cohort, training curves, cross-validation, calibration, evaluation.

Inputs (see docs/reports.md):

* ``OUTPUT_DIR/models/model-<name>.json`` — the JSON half of a trained model bundle
  (:meth:`bids_uad.models.bundle.ModelBundle.metadata`): ``folds`` with ``history``
  (epoch, train_loss, val_loss), ``best_epoch``, ``best_val_loss``, ``train_subjects``,
  ``heldout_subjects`` and ``calibration`` (n_healthy_voxels, threshold_at_fpr, fpr).
* ``OUTPUT_DIR/group/*.tsv`` — evaluation tables; a table with a ``model`` column, a
  threshold-method column (``threshold_method``/``method``) and numeric metric columns is
  also summarised as models × methods (mean over rows).  A table whose name contains
  ``calibration`` with ``nominal_fpr`` and ``observed_fpr`` columns is drawn as a
  calibration plot.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from bids_uad.bids.derivatives import read_tsv
from bids_uad.reports import figures as F
from bids_uad.reports.collect import list_subjects, to_float
from bids_uad.reports.reportlets import FigureMaker, heading, kv, note, table, text

METHOD_COLUMNS = ("threshold_method", "method", "threshold")


def load_models(models_dir: Path) -> dict[str, dict]:
    """Model name -> bundle metadata, for every readable ``models/*.json`` with folds."""
    models: dict[str, dict] = {}
    for path in sorted(models_dir.glob("*.json")) if models_dir.is_dir() else []:
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and isinstance(meta.get("folds"), list):
            name = str(meta.get("architecture", {}).get("name") or path.stem.replace("model-", ""))
            meta["_file"] = path.name
            models[name] = meta
    return models


def cohort_section(output_dir: Path, bids_dir: Path | None, models: dict[str, dict]) -> list[dict]:
    items: list[dict] = []
    subjects = list_subjects(output_dir)
    rows: list[tuple[str, Any]] = [("subjects with derivatives", len(subjects))]
    participants = read_tsv(bids_dir / "participants.tsv") if bids_dir else []
    if participants:
        rows.append(("participants in participants.tsv", len(participants)))
        for column in ("group", "sex"):
            values = [r.get(column, "n/a") for r in participants]
            if column in participants[0]:
                counts = {v: values.count(v) for v in sorted(set(values))}
                rows.append((f"by {column}", ", ".join(f"{k}: {n}" for k, n in counts.items())))
        ages = np.array([to_float(r.get("age")) for r in participants])
        if np.isfinite(ages).any():
            rows.append(("age (years)", f"{np.nanmean(ages):.1f} ± {np.nanstd(ages):.1f} "
                                        f"(range {np.nanmin(ages):.0f}–{np.nanmax(ages):.0f})"))
    for name, meta in models.items():
        rows.append((f"training controls ({name})", ", ".join(meta.get("training_subjects", []))))
    items.append(kv(rows))
    links = [(f"sub-{s}.html", f"sub-{s}") for s in subjects if (output_dir / f"sub-{s}.html").is_file()]
    if links:
        items.append(text("Participant reports:"))
        items.append({"type": "links", "links": links})
    return items


def training_section(models: dict[str, dict], maker: FigureMaker) -> list[dict]:
    if not models:
        return [note("Not available: no trained models (models/model-<name>.json); run the group level.")]
    items: list[dict] = []
    for name, meta in models.items():
        items.append(heading(f"model {name}"))
        series, marks = [], []
        for fold in meta["folds"]:
            hist = [h for h in fold.get("history", []) if isinstance(h, dict)]
            epochs = [h.get("epoch", i) for i, h in enumerate(hist)]
            k = fold.get("fold", "?")
            series.append((f"fold{k} train", epochs, [to_float(h.get("train_loss")) for h in hist], "-"))
            series.append((f"fold{k} validation", epochs, [to_float(h.get("val_loss")) for h in hist], "--"))
            if fold.get("best_epoch") is not None:
                marks.append((fold["best_epoch"], f"fold{k}"))
        items.append(maker.figure(
            f"model-{name}_desc-training_loss.svg", [maker.output_dir / "models" / meta["_file"]],
            lambda series=series, marks=marks: F.curves_figure(series, f"{name}: loss per epoch", marks=marks),
            f"Training (solid) and validation (dashed) loss per fold of {name}; dotted: best epoch of each fold.",
            f"Training curves of {name}", wide=False))
        rows = []
        for fold in meta["folds"]:
            rows.append([fold.get("fold"), len(fold.get("train_subjects", [])),
                         ", ".join(fold.get("heldout_subjects", [])), fold.get("best_epoch"),
                         to_float(fold.get("best_val_loss")),
                         "best" if fold.get("fold") == meta.get("best_fold") else ""])
        items.append(table(["fold", "training subjects", "held-out subjects", "best epoch",
                            "best validation loss", ""], rows, caption=f"Cross-validation of {name}"))
    return items


def calibration_section(models: dict[str, dict], group_dir: Path, maker: FigureMaker) -> list[dict]:
    items: list[dict] = []
    for name, meta in models.items():
        rows = [[fold.get("fold"), (fold.get("calibration") or {}).get("n_healthy_voxels"),
                 (fold.get("calibration") or {}).get("fpr"),
                 to_float((fold.get("calibration") or {}).get("threshold_at_fpr"))] for fold in meta["folds"]]
        if any(r[1] is not None for r in rows):
            items.append(table(["fold", "healthy voxels (null sample)", "target FPR", "threshold at FPR"], rows,
                               caption=f"Calibration of {name} on held-out controls"))
    for path in sorted(group_dir.glob("*calibration*.tsv")) if group_dir.is_dir() else []:
        rows = read_tsv(path)
        if rows and {"nominal_fpr", "observed_fpr"} <= set(rows[0]):
            points = [(r.get("model", "model"), to_float(r["nominal_fpr"]), to_float(r["observed_fpr"]))
                      for r in rows]
            points = [p for p in points if np.isfinite(p[1]) and np.isfinite(p[2])]
            items.append(maker.figure(
                f"desc-{path.stem.replace('_', '').replace('-', '')}_calibration.svg", [path],
                lambda points=points: F.scatter_figure(points, "calibration", "nominal FPR", "observed FPR"),
                f"Observed against nominal false-positive rate on held-out healthy voxels ({path.name}).",
                "Calibration plot", wide=False))
    return items or [note("Not available: no calibration recorded in the model files or group/*calibration*.tsv.")]


def _pivot(rows: list[dict[str, str]]) -> tuple[list[str], list[list[Any]], str] | None:
    if not rows:
        return None
    cols = list(rows[0])
    method = next((c for c in METHOD_COLUMNS if c in cols), None)
    if "model" not in cols or method is None:
        return None
    metric = next((c for c in ("dice", "dice_written", "auroc", "auprc") if c in cols), None)
    if metric is None:
        metric = next((c for c in cols if c not in ("model", method) and
                       np.isfinite([to_float(r[c]) for r in rows]).any()), None)
    if metric is None:
        return None
    models = sorted({r["model"] for r in rows})
    methods = sorted({r[method] for r in rows})
    table_rows = []
    for model in models:
        row: list[Any] = [model]
        for m in methods:
            vals = np.array([to_float(r[metric]) for r in rows if r["model"] == model and r[method] == m])
            vals = vals[np.isfinite(vals)]
            row.append(f"{vals.mean():.3f} ± {vals.std():.3f} (n={vals.size})" if vals.size else "n/a")
        table_rows.append(row)
    return ["model"] + methods, table_rows, metric


def _mean_sd(values: list[float]) -> str:
    arr = np.array([v for v in values if np.isfinite(v)])
    if not arr.size:
        return "n/a"
    sd = f" ± {arr.std(ddof=1):.3f}" if arr.size > 1 else ""
    return f"{arr.mean():.3f}{sd} (n={arr.size})"


def wide_evaluation(tables: dict[str, list[dict[str, str]]]) -> list[dict]:
    """Models × threshold methods from per-subject tables with ``dice_<method>`` columns.

    ``tables``: model name -> rows of ``group/model-<name>_evaluation.tsv`` (as written by
    the group level: participant_id, session, auroc, auprc, dice_<method>, dice_written_<method>).
    """
    items: list[dict] = []
    for prefix, title in (("dice_", "Dice before post-processing"),
                          ("dice_written_", "Dice of the written map (after post-processing)")):
        methods: list[str] = []
        for rows in tables.values():
            for col in (rows[0] if rows else {}):
                if col.startswith(prefix) and not (prefix == "dice_" and col.startswith("dice_written_")):
                    if col[len(prefix):] not in methods:
                        methods.append(col[len(prefix):])
        # oracle thresholds look at the ground truth: an upper bound, reported apart
        for group, caption in (([m for m in methods if not m.startswith("oracle")],
                                f"{title}: models × threshold methods (mean ± SD over subjects)"),
                               ([m for m in methods if m.startswith("oracle")],
                                f"{title} with oracle thresholds (chosen with the ground truth: upper bounds, "
                                "not achievable in practice)")):
            if not group:
                continue
            body = [[model] + [_mean_sd([to_float(r.get(prefix + m)) for r in rows]) for m in group]
                    for model, rows in tables.items()]
            items.append(table(["model"] + group, body, caption=caption))
    body = [[model, _mean_sd([to_float(r.get("auroc")) for r in rows]),
             _mean_sd([to_float(r.get("auprc")) for r in rows]), len(rows)] for model, rows in tables.items()]
    items.append(table(["model", "AUROC", "AUPRC", "subjects"], body,
                       caption="Voxel-wise detection in the analysis mask (mean ± SD over subjects)"))
    return items


def _fmt(value: Any, sd: Any = None) -> str:
    v = to_float(value)
    if not np.isfinite(v):
        return "n/a"
    s = to_float(sd)
    return f"{v:.3f}" + (f" ± {s:.3f}" if np.isfinite(s) else "")


def detection_section(group_dir: Path, maker: FigureMaker) -> list[dict]:
    """Every model next to the baselines (``group/detection_*.tsv``, see
    :mod:`bids_uad.workflows.group_evaluation`): the table, per-group tables, precision-recall
    curves per detector and score histograms (lesion vs healthy tissue)."""
    summary = read_tsv(group_dir / "detection_summary.tsv") if group_dir.is_dir() else []
    if not summary:
        return [note("Not available: no group/detection_summary.tsv; it is written when patients have dwi-space "
                     "lesion masks (--lesion-masks).")]
    items: list[dict] = [text(
        "Every detector on the same voxels (each patient's analysis mask). AUPRC is the primary figure (lesions "
        "are a few percent of the voxels); Dice is that of the written map (the model file's threshold, after "
        "post-processing); the oracle Dice uses the truth (an upper bound, not a method). Subject AUROC: patients "
        "against the controls scored out of fold, from the 99th-percentile score. Each control's written map, "
        "false-positive rate and findings use a threshold calibrated without it (on the other controls the "
        "model's calibration pools), as a new healthy subject's would. 1-FA and MD are one-line detectors "
        "without a calibrated threshold.")]
    rows = [[r["detector"], _fmt(r.get("auprc"), r.get("auprc_sd")), _fmt(r.get("auroc"), r.get("auroc_sd")),
             _fmt(r.get("dice_calibrated"), r.get("dice_calibrated_sd")),
             _fmt(r.get("dice_oracle"), r.get("dice_oracle_sd")),
             _fmt(r.get("subject_auroc")), _fmt(r.get("heldout_control_fpr"), r.get("heldout_control_fpr_sd")),
             _fmt(r.get("lesion_detection_rate")) + (f" of {r.get('n_lesions')}" if r.get("n_lesions") not in
                                                     (None, "", "n/a", "0") else ""),
             _fmt(r.get("false_findings_per_patient")), _fmt(r.get("false_findings_per_control")),
             r.get("n_patients"), r.get("n_controls")]
            for r in summary]
    items.append(table(["detector", "AUPRC", "AUROC", "Dice (written map)", "oracle Dice", "subject AUROC",
                        "held-out controls' FPR (written map; ± SD over controls)", "lesions found (lesion-wise)", "false findings per patient",
                        "findings per control", "patients", "controls"], rows,
                       caption="Detection: models and baselines (mean ± SD over patients). Lesion-wise: a lesion is "
                               "found when a finding (a cluster of the written map of at least the model's minimum "
                               "volume) overlaps it; every finding of a held-out control is false"))
    groups = read_tsv(group_dir / "detection_groups.tsv")
    for grouping, title in (("volume", "lesion-volume stratum"), ("type", "lesion type")):
        sel = [r for r in groups if r.get("grouping") == grouping]
        names = list(dict.fromkeys(r["group"] for r in sel))
        if not names:
            continue
        body = []
        for det in dict.fromkeys(r["detector"] for r in sel):
            cells = []
            for g in names:
                r = next((x for x in sel if x["detector"] == det and x["group"] == g), None)
                cells.append("" if r is None else f"{_fmt(r.get('auprc'))} / {_fmt(r.get('auroc'))} / "
                             f"{_fmt(r.get('detection_rate'))} (n={r.get('n_lesions')})")
            body.append([det] + cells)
        items.append(table(["detector"] + names, body, caption=f"AUPRC / AUROC / detection rate (the written map "
                                                               f"touches the lesion) per {title}"))
    curves = read_tsv(group_dir / "detection_prcurves.tsv")
    if curves:
        series = []
        for det in dict.fromkeys(r["detector"] for r in curves):
            pts = [(to_float(r["recall"]), to_float(r["precision"])) for r in curves if r["detector"] == det]
            series.append((det, [p[0] for p in pts], [p[1] for p in pts], "-"))
        items.append(maker.figure(
            "desc-detection_prcurves.svg", [group_dir / "detection_prcurves.tsv"],
            lambda series=series: F.curves_figure(series, "precision-recall (patients' voxels pooled)",
                                                  xlabel="recall", ylabel="precision"),
            "Precision against recall of every detector, all patients' analysis-mask voxels pooled.",
            "Precision-recall curves", wide=False))
    hists = read_tsv(group_dir / "detection_histograms.tsv")
    for det in dict.fromkeys(r["detector"] for r in hists):
        rows_d = [r for r in hists if r["detector"] == det]
        x = [to_float(r["score"]) for r in rows_d]
        series = [("lesion", x, [to_float(r["lesion_density"]) for r in rows_d], "-"),
                  ("healthy", x, [to_float(r["healthy_density"]) for r in rows_d], "--")]
        safe = "".join(ch for ch in det if ch.isalnum())
        items.append(maker.figure(
            f"desc-detection{safe}_histogram.svg", [group_dir / "detection_histograms.tsv"],
            lambda series=series, det=det: F.curves_figure(series, f"{det}: score density", xlabel="score",
                                                           ylabel="density"),
            f"Score densities of {det} in lesion (solid) and healthy (dashed) analysis-mask voxels of the patients.",
            f"Score histogram of {det}", wide=False))
    return items


def evaluation_section(group_dir: Path) -> list[dict]:
    paths = [p for p in sorted(group_dir.glob("*.tsv")) if "calibration" not in p.name
             and not p.name.startswith("detection_")] if group_dir.is_dir() else []
    wide = {p.name[len("model-"):-len("_evaluation.tsv")]: read_tsv(p) for p in paths
            if p.name.startswith("model-") and p.name.endswith("_evaluation.tsv")}
    wide = {m: rows for m, rows in wide.items() if rows}
    derived = [p for p in paths if p.name.endswith(("_evaluation_summary.tsv", "_folds.tsv"))]
    others = [p for p in paths if p not in derived and not (p.name.startswith("model-")
                                                             and p.name.endswith("_evaluation.tsv"))]
    if not wide and not others:
        return [note("Not available: no evaluation tables (group/model-<name>_evaluation.tsv); they are "
                     "written when patients have dwi-space lesion masks (--lesion-masks).")]
    items: list[dict] = wide_evaluation(wide) if wide else []
    for model, rows in wide.items():
        cols = list(rows[0])
        item = table(cols, [[r.get(c, "") for c in cols] for r in rows],
                     caption=f"model-{model}_evaluation.tsv: per subject")
        item["collapsed"] = True
        items.append(item)
    for path in others:
        rows = read_tsv(path)
        items.append(heading(path.name))
        pivot = _pivot(rows)
        if pivot is not None:
            columns, prow, metric = pivot
            items.append(table(columns, prow, caption=f"{metric}: models × threshold methods (mean ± SD)"))
        cols = list(rows[0]) if rows else []
        item = table(cols, [[r.get(c, "") for c in cols] for r in rows], caption=f"{path.name}: all rows")
        item["collapsed"] = pivot is not None or len(rows) > 20
        items.append(item)
    return items
