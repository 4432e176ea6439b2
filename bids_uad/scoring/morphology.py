"""Morphological post-processing of binary anomaly masks."""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def opening(mask: np.ndarray, size: int = 3) -> np.ndarray:
    """Binary opening with a ``size``^3 cube; size 0 or 1 returns the mask unchanged."""
    mask = np.asarray(mask, bool)
    if size <= 1:
        return mask.copy()
    return ndimage.binary_opening(mask, structure=np.ones((size,) * mask.ndim, bool))
