"""Numbers shown under each anomaly map: threshold, volumes and, with a ground truth, metrics."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from bids_uad.bids.outputs import THRESHOLD, THRESHOLD_METHOD


def _flatten(prefix: str, value: Any, out: list[tuple[str, Any]]) -> None:
    if isinstance(value, Mapping):
        for key, sub in value.items():
            _flatten(f"{prefix} {key}".strip(), sub, out)
    else:
        out.append((prefix, value))


def anomaly_metrics(score: np.ndarray, binary: np.ndarray | None, truth: np.ndarray | None,
                    amask: np.ndarray, affine: np.ndarray, meta: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Rows (name, value): what the sidecar records, volumes, and metrics against ``truth``.

    Metrics recorded by the anomaly stage (``Metrics``/``Evaluation`` in the sidecar) are
    shown as they are; AUROC/AUPRC/Dice are computed here only when a ground-truth mask in
    dwi space is among the derivatives.
    """
    from bids_uad.algorithms.masking import dice
    from bids_uad.scoring.metrics import auprc, auroc

    voxel_ml = float(abs(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
    rows: list[tuple[str, Any]] = []

    for label, key in (("model", "Model"), ("model file", "ModelFile"), ("threshold method", THRESHOLD_METHOD),
                       ("threshold", THRESHOLD), ("ensemble of folds", "Ensemble"), ("folds", "Folds"),
                       ("ensemble scale", "EnsembleScale"), ("opening size", "OpeningSize"), ("target FPR", "FPR"),
                       ("FDR q", "FDRq")):
        value = meta.get(key)
        if value not in (None, ""):
            rows.append((label, value))
    rows.append(("analysis mask volume (mL)", round(float(amask.sum()) * voxel_ml, 2)))
    if binary is not None:
        rows.append(("anomaly volume (mL)", round(float(binary.sum()) * voxel_ml, 2)))
    for key in ("Metrics", "Evaluation"):
        if isinstance(meta.get(key), Mapping):
            _flatten(f"{key}:", meta[key], rows)
    if truth is not None:
        y = truth[amask]
        rows.append(("ground-truth lesion volume (mL)", round(float(truth.sum()) * voxel_ml, 2)))
        rows.append(("AUROC (in analysis mask)", auroc(score[amask], y)))
        rows.append(("AUPRC (in analysis mask)", auprc(score[amask], y)))
        if binary is not None:
            rows.append(("Dice (anomaly mask vs ground truth)", dice(binary & amask, truth & amask)))
    else:
        rows.append(("ground truth", "none in the derivatives (no metrics)"))
    return rows
