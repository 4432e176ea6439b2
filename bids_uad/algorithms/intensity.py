"""Intensity non-uniformity correction (N4, antspyx in-process) and simple intensity helpers."""
from __future__ import annotations

import logging

import nibabel as nib
import numpy as np

from bids_uad.algorithms.histogram import otsu_threshold as otsu
from bids_uad.algorithms.registration import configure_ants, from_ants, to_ants

LOGGER = logging.getLogger(__name__)


def head_mask(data: np.ndarray) -> np.ndarray:
    """Foreground (head) mask: Otsu threshold of the smoothed image, largest component, filled."""
    from scipy import ndimage as ndi

    smooth = ndi.gaussian_filter(np.asarray(data, dtype=np.float32), 1.0)
    positive = smooth[smooth > 0]
    if positive.size == 0:
        return np.zeros(data.shape, dtype=bool)
    thr = otsu(positive) * 0.5
    fg = smooth > thr
    labels, n = ndi.label(fg)
    if n > 1:
        sizes = ndi.sum(fg, labels, range(1, n + 1))
        fg = labels == (int(np.argmax(sizes)) + 1)
    fg = ndi.binary_closing(fg, iterations=2)
    return ndi.binary_fill_holes(fg)


def otsu_multi(values: np.ndarray, classes: int = 3, bins: int = 128) -> list[float]:
    """Thresholds of a multi-class Otsu split (exhaustive over a histogram; 2 or 3 classes)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if classes == 2:
        return [otsu(values, bins)]
    if classes != 3:
        raise ValueError("only 2 or 3 classes")
    hist, edges = np.histogram(values, bins=bins)
    p = hist / max(hist.sum(), 1)
    centres = 0.5 * (edges[1:] + edges[:-1])
    cw = np.concatenate([[0.0], np.cumsum(p)])
    cm = np.concatenate([[0.0], np.cumsum(p * centres)])
    best, best_ij = -1.0, (1, 2)
    for i in range(1, bins - 1):
        for j in range(i + 1, bins):
            score = 0.0
            for lo, hi in ((0, i), (i, j), (j, bins)):
                w = cw[hi] - cw[lo]
                if w > 0:
                    score += (cm[hi] - cm[lo]) ** 2 / w
            if score > best:
                best, best_ij = score, (i, j)
    return [float(edges[best_ij[0]]), float(edges[best_ij[1]])]


#: spacing (mm) of the grid N4 fits the bias field on (:func:`n4_shrink_factor`)
N4_FIT_SPACING_MM = 6.0


def n4_shrink_factor(zooms) -> int:
    """N4's shrink factor for voxels of ``zooms`` mm: a fit grid of about :data:`N4_FIT_SPACING_MM`
    (1 mm: 6; 2 mm: 3; never below 1).  The field is smooth (100 mm splines), so a coarser grid
    loses little, and the fit's time grows with the number of grid points."""
    return max(1, int(round(N4_FIT_SPACING_MM / float(min(zooms)))))


def n4_correct(
    img: nib.Nifti1Image,
    mask: np.ndarray | None = None,
    shrink_factor: int | None = None,
    iterations: tuple[int, ...] = (50, 50, 30),
    spline_distance_mm: float = 100.0,
    threads: int = 1,
    seed: int | None = 0,
) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """N4 bias-field correction; returns (corrected image, estimated bias field).

    The mask (default: the head mask) restricts the field fit; the correction is applied
    everywhere.  Intensities are kept positive (N4 works on log intensities).

    ``shrink_factor`` (default: :func:`n4_shrink_factor`, a fit grid of about
    :data:`N4_FIT_SPACING_MM`): the field is fitted on the image shrunk by this factor.  A fixed
    factor of 4 fitted a 1 mm T1w on a 4 mm grid in 14 s and a 2 mm one on an 8 mm grid; the
    6 mm grid fits the 1 mm T1w in 5 s (2 cores) with a white-matter coefficient of variation
    0.0494 instead of 0.0482 (raw 0.104) on the paper-geometry synthetic head.
    """
    import ants

    configure_ants(threads, seed)
    data = np.asarray(img.dataobj, dtype=np.float32)
    offset = float(min(0.0, data.min()))
    shifted = data - offset + 1e-3 * max(float(np.abs(data).max()), 1.0)
    if mask is None:
        mask = head_mask(data)
    aimg = to_ants(nib.Nifti1Image(shifted, img.affine))
    amask = to_ants(nib.Nifti1Image(np.asarray(mask, dtype=np.float32), img.affine))
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    if shrink_factor is None:
        shrink_factor = n4_shrink_factor(zooms)
    extent = np.asarray(data.shape[:3]) * zooms
    spline_param = [max(1, int(round(e / spline_distance_mm))) for e in extent]
    res = ants.n4_bias_field_correction(
        aimg, mask=amask, shrink_factor=int(shrink_factor),
        convergence={"iters": list(iterations), "tol": 1e-7},
        spline_param=spline_param, return_bias_field=True,
    )
    bias = res.numpy().astype(np.float32)
    bias = np.where(bias > 0, bias, 1.0)
    corrected = (shifted / bias) + offset
    corrected = np.where(data == 0, 0.0, corrected).astype(np.float32)
    out = nib.Nifti1Image(corrected, img.affine, img.header)
    out.set_data_dtype(np.float32)
    bias_img = nib.Nifti1Image(bias, img.affine)
    return out, bias_img


def normalise(data: np.ndarray, mask: np.ndarray | None = None, pct: float = 99.0) -> np.ndarray:
    """Scale so the ``pct`` percentile inside ``mask`` is 1 (robust to bright outliers)."""
    data = np.asarray(data, dtype=np.float32)
    ref = data[mask > 0] if mask is not None else data[data > 0]
    scale = float(np.percentile(ref, pct)) if ref.size else 1.0
    return data / (scale if scale > 0 else 1.0)
