"""Threshold methods turning a score map into a binary anomaly mask (flag ``score > t``).

``fixed`` (0.3 DAE / 0.5 RecDiscNet), ``otsu`` (on scores in the mask), ``meanpool``
(maximum of the local 16^3 mean of the score, the reference's eq. 3), ``healthy-fpr``
(calibrated on held-out controls for the written map, see
:meth:`~bids_uad.models.calibration.Calibration.threshold_for`), ``fdr`` (Benjamini-Hochberg on conformal p-values).
Oracle thresholds live in :mod:`bids_uad.scoring.metrics` (evaluation only).
"""
from __future__ import annotations

import numpy as np

from scipy import ndimage

from bids_uad.algorithms.histogram import otsu_threshold

from bids_uad.errors import UsageError
from bids_uad.models import FIXED_THRESHOLDS
from bids_uad.models.calibration import Calibration
from bids_uad.models.settings import ScoringSettings


def meanpool_threshold(score: np.ndarray, mask: np.ndarray, size: int = 16) -> float:
    """Maximum over the mask of the ``size``^3 local mean of the (masked) score."""
    mask = np.asarray(mask, bool)
    local = ndimage.uniform_filter(np.where(mask, score, 0).astype(np.float64), size=size, mode="constant")
    return float(local[mask].max()) if mask.any() else float("inf")


def benjamini_hochberg(pvalues: np.ndarray, q: float) -> np.ndarray:
    """Boolean discoveries of the BH step-up procedure at level ``q`` (any shape)."""
    p = np.asarray(pvalues, float).ravel()
    m = p.size
    if m == 0:
        return np.zeros(np.shape(pvalues), bool)
    order = np.argsort(p, kind="mergesort")
    passed = p[order] <= q * np.arange(1, m + 1) / m
    out = np.zeros(m, bool)
    if passed.any():
        out[order[: np.flatnonzero(passed)[-1] + 1]] = True
    return out.reshape(np.shape(pvalues))


def fixed_threshold(model_name: str, value: float | None = None) -> float:
    """The setting's value, or the reference paper's default for the model."""
    if value is not None:
        return float(value)
    if model_name not in FIXED_THRESHOLDS:
        raise UsageError(f"no default fixed threshold for model {model_name!r}; set fixed_threshold")
    return FIXED_THRESHOLDS[model_name]


def threshold_map(score: np.ndarray, mask: np.ndarray, method: str, model_name: str,
                  settings: ScoringSettings, calibration: Calibration | None = None,
                  pvalues: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Binary mask (inside ``mask``) and the threshold used (for ``fdr``: the lowest flagged score)."""
    mask = np.asarray(mask, bool)
    inside = score[mask]
    if method == "fixed":
        t = fixed_threshold(model_name, settings.fixed_threshold)
    elif method == "otsu":
        t = otsu_threshold(inside) if inside.size else float("inf")
    elif method == "meanpool":
        t = meanpool_threshold(score, mask, settings.meanpool_size)
    elif method in ("healthy-fpr", "fdr"):
        if calibration is None:
            raise UsageError(f"threshold method {method!r} needs a calibrated model")
        if method == "healthy-fpr":
            t = calibration.threshold_for(settings.fpr)
        else:
            p = calibration.pvalues(score) if pvalues is None else pvalues
            found = np.zeros(score.shape, bool)
            found[mask] = benjamini_hochberg(p[mask], settings.fdr_q)
            t = float(score[found].min()) if found.any() else float("inf")
            return found, t
    else:
        raise UsageError(f"unknown threshold method {method!r}")
    return (score > t) & mask, float(t)
