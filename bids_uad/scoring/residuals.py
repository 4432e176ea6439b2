"""Residual-based anomaly scores."""
from __future__ import annotations

import numpy as np


def channel_sum_residual(x: np.ndarray, recon: np.ndarray, channel_axis: int = 0) -> np.ndarray:
    """DAE score |sum_c (x_hat_c - x_c)|: channels summed first, then the absolute value."""
    return np.abs(np.sum(np.asarray(recon, np.float32) - np.asarray(x, np.float32), axis=channel_axis))
