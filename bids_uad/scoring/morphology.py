"""Morphological post-processing of binary anomaly masks.

:func:`postprocess` is the one step between a thresholded score map and the binary map that is
written; calibration (:func:`bids_uad.models.calibration.calibrate_written`) runs the same
function so the calibrated false-positive rate is that of the written map.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def opening(mask: np.ndarray, size: int = 3) -> np.ndarray:
    """Binary opening with a ``size``^3 cube; size 0 or 1 returns the mask unchanged."""
    mask = np.asarray(mask, bool)
    if size <= 1:
        return mask.copy()
    return ndimage.binary_opening(mask, structure=np.ones((size,) * mask.ndim, bool))


def label_clusters(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """The 26-connected clusters of ``mask`` (8-connected in 2-D): label image (0 = none) and count."""
    mask = np.asarray(mask, bool)
    labels, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, bool))
    return labels, int(n)


def remove_small_clusters(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """Keep the 26-connected clusters of at least ``min_voxels`` voxels (1 keeps everything)."""
    mask = np.asarray(mask, bool)
    if min_voxels <= 1 or not mask.any():
        return mask.copy()
    labels, n = label_clusters(mask)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels]


def postprocess(mask: np.ndarray, scoring) -> np.ndarray:
    """The written binary map: ``scoring.postprocess`` (``cluster`` or ``opening``) of ``mask``.

    ``scoring`` is a :class:`~bids_uad.models.settings.ScoringSettings`.
    """
    if scoring.postprocess == "opening":
        return opening(mask, scoring.opening_size)
    return remove_small_clusters(mask, scoring.min_cluster_voxels)


def postprocess_description(scoring) -> str:
    """One line for sidecars and reports."""
    if scoring.postprocess == "opening":
        return f"binary opening with a {scoring.opening_size}^3 cube"
    return f"26-connected clusters smaller than {scoring.min_cluster_voxels} voxels removed"
