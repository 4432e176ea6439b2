"""Robust statistics of a sample: the spread as 1.4826 × the median absolute deviation."""
from __future__ import annotations

import numpy as np

#: the median absolute deviation of a normal sample times this is its standard deviation
MAD_TO_SD = 1.4826


def robust_spread(values: np.ndarray, centre: float | None = None) -> float:
    """1.4826 × the median absolute deviation of ``values`` (float64) from ``centre`` (default:
    their median): the standard deviation of a normal sample; 0 for an empty one."""
    values = np.asarray(values, np.float64)
    if not values.size:
        return 0.0
    centre = float(np.median(values)) if centre is None else centre
    return MAD_TO_SD * float(np.median(np.abs(values - centre)))
