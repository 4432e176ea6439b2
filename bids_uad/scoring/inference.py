"""Inference for one subject and evaluation against a lesion mask.

* :func:`infer` — raw preprocessed dwi (with b0s) + gradient table + masks in diffusion
  space -> score map, p-value map (if calibrated), binary mask, all in the input's shape.
* :func:`infer_prepared` — the same from a :class:`~bids_uad.models.inputs.Prepared` subject.
* :func:`evaluate` — per-subject AUROC, AUPRC and Dice per threshold method, with and
  without opening, plus oracle thresholds (reported apart).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from bids_uad.algorithms.masking import dice
from bids_uad.errors import InputValidationError
from bids_uad.models.bundle import ModelBundle, score_volume
from bids_uad.models.calibration import Calibration
from bids_uad.models.inputs import Prepared, from_grid, prepare_subject, to_grid
from bids_uad.models.settings import THRESHOLD_METHODS, ScoringSettings
from bids_uad.scoring.metrics import auprc, auroc, dice_optimal_threshold, youden_threshold
from bids_uad.scoring.morphology import opening
from bids_uad.scoring.thresholds import threshold_map


@dataclass
class InferenceResult:
    """Outputs in the input array's shape (diffusion space)."""

    score: np.ndarray  # float32, 0 outside the analysis mask
    pvalues: np.ndarray | None  # conformal p-values (1 outside the mask), None if uncalibrated
    mask: np.ndarray  # bool, thresholded, opened, inside the analysis mask
    mask_unopened: np.ndarray  # bool, before opening
    threshold: float
    method: str
    info: dict = field(default_factory=dict)  # provenance for the JSON sidecar


def score_grid(bundle: ModelBundle, data: np.ndarray, ensemble: bool = False, fold: int | None = None) -> np.ndarray:
    """Score map on the grid: one fold (default: best validation loss) or the mean over folds."""
    folds = bundle.folds if ensemble else [bundle.folds[bundle.best_fold() if fold is None else fold]]
    torch.set_num_threads(max(1, bundle.settings.training.threads))
    return np.mean([score_volume(f.model, data) for f in folds], axis=0).astype(np.float32)


def infer_prepared(bundle: ModelBundle, prepared: Prepared, analysis_mask: np.ndarray | None = None,
                   method: str | None = None, ensemble: bool = False, fold: int | None = None,
                   scoring: ScoringSettings | None = None) -> InferenceResult:
    """Score, threshold and open one prepared subject; map results back to its original shape.

    ``analysis_mask`` is in the original (diffusion-space) shape; default: the brain mask.
    ``scoring`` overrides the bundle's scoring settings (threshold method, FPR, q, opening).
    """
    scoring = scoring or bundle.settings.scoring
    method = method or scoring.threshold_method
    gm = prepared.grid_map
    amask = prepared.mask if analysis_mask is None else to_grid(np.asarray(analysis_mask) > 0, gm.grid)[0]
    score = np.where(amask, score_grid(bundle, prepared.data, ensemble, fold), 0).astype(np.float32)
    cal: Calibration | None = bundle.calibration(ensemble=ensemble, fold=fold)
    pvals = None if cal is None else np.where(amask, cal.pvalues(score), 1).astype(np.float32)
    binary, t = threshold_map(score, amask, method, bundle.name, scoring, cal, pvals)
    opened = opening(binary, scoring.opening_size) & amask
    info = {"model": bundle.name, "model_file": None if bundle.path is None else str(bundle.path),
            "model_sha256": bundle.file_hash, "threshold_method": method, "threshold": t,
            "opening_size": scoring.opening_size, "ensemble": ensemble,
            "folds": [f.fold for f in bundle.folds] if ensemble else [bundle.best_fold() if fold is None else fold],
            "gradient_reconciliation": prepared.method, "grid_map": gm.to_dict(),
            "fpr": scoring.fpr if method == "healthy-fpr" else None,
            "fdr_q": scoring.fdr_q if method == "fdr" else None}
    return InferenceResult(from_grid(score, gm), None if pvals is None else from_grid(pvals, gm, fill=1.0),
                           from_grid(opened, gm), from_grid(binary, gm), t, method, info)


def infer(bundle: ModelBundle, dwi: np.ndarray, bvals: np.ndarray, bvecs: np.ndarray, brain_mask: np.ndarray,
          analysis_mask: np.ndarray | None = None, method: str | None = None, ensemble: bool = False,
          fold: int | None = None, scoring: ScoringSettings | None = None) -> InferenceResult:
    """Full inference from a preprocessed dwi (X, Y, Z, N with b0s) in diffusion space."""
    prepared = prepare_subject(dwi, bvals, bvecs, brain_mask, bundle.settings.model.grid,
                               bundle.ref_bvals, bundle.ref_bvecs)
    if analysis_mask is not None and np.shape(analysis_mask) != np.shape(brain_mask):
        raise InputValidationError("analysis mask and brain mask differ in shape")
    return infer_prepared(bundle, prepared, analysis_mask, method, ensemble, fold, scoring)


def evaluate(score: np.ndarray, truth: np.ndarray, analysis_mask: np.ndarray, model_name: str,
             scoring: ScoringSettings, calibration: Calibration | None = None,
             methods: tuple[str, ...] = THRESHOLD_METHODS) -> dict:
    """Per-subject metrics inside ``analysis_mask``.

    Returns ``{"auroc", "auprc", "dice": {method: .}, "dice_opened": {method: .},
    "thresholds": {method: .}, "fpr": {method: fraction of non-lesion voxels flagged before
    opening}}``; oracle methods (``oracle-youden``, ``oracle-dice``) use the
    ground truth and appear under the same keys with their ``oracle-`` prefix.
    """
    amask = np.asarray(analysis_mask, bool)
    truth = np.asarray(truth, bool) & amask
    s, y = score[amask], truth[amask]
    out = {"auroc": auroc(s, y), "auprc": auprc(s, y), "dice": {}, "dice_opened": {}, "thresholds": {},
           "fpr": {}}
    pvals = None if calibration is None else calibration.pvalues(score)
    for m in methods:
        if m in ("healthy-fpr", "fdr") and calibration is None:
            continue
        binary, t = threshold_map(score, amask, m, model_name, scoring, calibration, pvals)
        _record(out, m, binary, t, truth, amask, scoring.opening_size)
    if y.any() and (~y).any():
        for m, fn in (("oracle-youden", youden_threshold), ("oracle-dice", dice_optimal_threshold)):
            t = fn(s, y)
            _record(out, m, (score > t) & amask, t, truth, amask, scoring.opening_size)
    return out


def _record(out, name, binary, t, truth, amask, size):
    healthy = amask & ~truth
    out["fpr"][name] = float(binary[healthy].mean()) if healthy.any() else float("nan")
    out["dice"][name] = dice(binary, truth)
    out["dice_opened"][name] = dice(opening(binary, size) & amask, truth)
    out["thresholds"][name] = float(t)
