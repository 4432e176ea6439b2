"""Calibration on held-out healthy tissue: FPR thresholds and conformal p-values.

The null sample is the score of held-out controls inside the analysis mask.  A voxel's
conformal p-value is (1 + #{null >= s}) / (n + 1), valid for exchangeable healthy voxels,
so Benjamini-Hochberg on these p-values controls the FDR; the healthy-fpr threshold is the
order statistic that flags at most a fraction ``fpr`` of healthy voxels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class Calibration:
    """Sorted healthy scores (null sample)."""

    null: np.ndarray

    def __post_init__(self) -> None:
        self.null = np.sort(np.asarray(self.null, dtype=np.float32).ravel())
        if self.null.size == 0:
            raise ValueError("calibration needs at least one healthy score")

    @property
    def n(self) -> int:
        return int(self.null.size)

    def threshold(self, fpr: float) -> float:
        """Threshold t such that P(healthy score > t) <= fpr (conformal order statistic)."""
        k = math.ceil((self.n + 1) * (1 - fpr))
        return float(self.null[min(max(k, 1), self.n) - 1])

    def pvalues(self, scores: np.ndarray) -> np.ndarray:
        """Conformal p-values, same shape as ``scores``."""
        s = np.asarray(scores, dtype=np.float32)
        n_ge = self.n - np.searchsorted(self.null, s.ravel(), side="left")
        return ((n_ge + 1) / (self.n + 1)).reshape(s.shape).astype(np.float32)


def calibrate(score_maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], max_samples: int = 200_000,
              seed: int = 0) -> Calibration:
    """Null sample from held-out healthy score maps inside their masks (subsampled, seeded)."""
    values = np.concatenate([np.asarray(s)[np.asarray(m) > 0].ravel() for s, m in zip(score_maps, masks)])
    if values.size > max_samples:
        values = np.random.default_rng([seed, 104729]).choice(values, max_samples, replace=False)
    return Calibration(values)


def pool(calibrations: Sequence[Calibration]) -> Calibration:
    """One null sample from several folds (used for the fold ensemble; approximate)."""
    return Calibration(np.concatenate([c.null for c in calibrations]))
