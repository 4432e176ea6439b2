"""Histogram thresholds shared by masking, segmentation and anomaly scoring."""
from __future__ import annotations

import numpy as np


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1-D sample: the class boundary maximising between-class variance.

    Non-finite values are ignored; a constant sample returns its value.  Where the optimum is
    flat (well-separated classes), the middle of the flat run is taken.  Flag ``value > t``.

    Examples
    --------
    >>> import numpy as np
    >>> otsu_threshold(np.r_[np.zeros(50), np.full(50, 10.0)])
    5.0
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return hi
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = 0.5 * (edges[1:] + edges[:-1])
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = (w0 * w1 * (mu0 - mu1) ** 2)[:-1]
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    return float(edges[int(best[len(best) // 2]) + 1])
