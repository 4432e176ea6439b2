"""Anomaly section: findings tables first, then score maps, masks, score histograms, metrics
against a ground truth."""
from __future__ import annotations

import numpy as np

from bids_uad.bids.outputs import THRESHOLD, THRESHOLD_METHOD
from bids_uad.reports import figures as F
from bids_uad.bids.layout import sidecar_of
from bids_uad.reports.collect import SubjectDerivatives, meta_value, read_json, to_float
from bids_uad.reports.common import load, same_grid
from bids_uad.reports.reportlets import FigureMaker, heading, kv, note


def anomaly_section(subj: SubjectDerivatives, maker: FigureMaker) -> list[dict]:
    from bids_uad.reports.metrics import anomaly_metrics

    items: list[dict] = []
    sessions = [s for s in subj.sessions if s.anomaly]
    if not sessions:
        return [note("Not available: no anomaly maps (dwi/*_space-dwi_model-<name>_stat-score_anomaly.nii.gz); "
                     "run the participant level with --model to make them.")]
    from bids_uad.reports.sections_findings import findings_items

    items += findings_items(sessions, maker)
    for ses in sessions:
        for model, files in sorted(ses.anomaly.items()):
            items.append(heading(f"{ses.title} — model {model}"))
            score_path = files.get("score")
            score = load(score_path)
            if score is None:
                items.append(note(f"Not available: score map of model {model} (only {', '.join(files)} found)."))
                continue
            meta = read_json(sidecar_of(score_path)) or read_json(sidecar_of(files.get("mask")))
            binary = load(files.get("mask"))
            binary = binary[0] > 0.5 if binary is not None and same_grid(score[0], binary[0]) else None
            truth = load(ses.get("truth"))
            truth = truth[0] > 0.5 if truth is not None and same_grid(score[0], truth[0]) else None
            amask = load(ses.get("analysis_mask")) or load(ses.get("dwi_mask"))
            amask = amask[0] > 0.5 if amask is not None and same_grid(score[0], amask[0]) else score[0] != 0
            bg_key = next((k for k in ("md", "fa", "b0") if ses.get(k)), None)
            bg = load(ses.get(bg_key)) if bg_key else None
            if bg is None or not same_grid(bg[0], score[0]):
                # no map to show underneath: the analysis mask in dark grey, scores in colour
                bg, bg_key = ((amask * 0.35).astype(np.float32), score[1]), "score"
            threshold = to_float(meta.get(THRESHOLD))
            method = str(meta_value(meta, THRESHOLD_METHOD, default="threshold"))
            values = score[0][amask]
            lo = threshold if np.isfinite(threshold) else float(np.percentile(values, 95)) if values.size else 0.0
            hi = float(np.percentile(values, 99.9)) if values.size else lo + 1
            hi = hi if hi > lo else lo + 1e-6
            contours = []
            if binary is not None:
                contours.append((binary, F.COLORS["anomaly"], "anomaly mask"))
            if truth is not None:
                contours.append((truth, F.COLORS["truth"], "ground truth"))
            focus = binary if binary is not None and binary.any() else amask
            sl = F.pick_slices(score[0].shape, focus, 7, ("y", "z"))
            items.append(maker.figure(
                f"{ses.prefix}_space-dwi_model-{model}_stat-score_anomaly.svg",
                [score_path, files.get("mask"), ses.get(bg_key) if bg_key != "score" else None, ses.get("truth")],
                lambda: F.mosaic(bg[0], bg[1], overlay=score[0] * amask, overlay_range=(lo, hi), slices=sl,
                                 contours=contours, window=(0.0, 1.0) if bg_key == "score" else
                                 (0.0, F.robust_range(bg[0], high=99.0)[1])),
                f"Anomaly score of model {model} (hot colours, shown from {lo:.3g} to {hi:.3g}) on "
                f"{bg_key.upper() if bg_key != 'score' else 'the analysis mask (grey)'}; cyan: anomaly mask"
                + ("; yellow: ground-truth lesion." if truth is not None else "."),
                f"Anomaly score map of {model}"))
            thresholds = {method: threshold} if np.isfinite(threshold) else {}
            tvals = truth[amask] if truth is not None else None
            items.append(maker.figure(
                f"{ses.prefix}_space-dwi_model-{model}_desc-histogram_anomaly.svg", [score_path, ses.get("truth")],
                lambda: F.histogram_figure(values, thresholds, f"{model}: scores in the analysis mask", tvals),
                f"Distribution of the anomaly scores of {model} inside the analysis mask"
                + (f"; dashed line: {method} threshold {threshold:.4g}." if thresholds else
                   "; no threshold recorded in the sidecar."), f"Histogram of {model} scores", wide=False))
            rows = anomaly_metrics(score[0], binary, truth, amask, bg[1], meta)
            items.append(kv(rows))
    return items
