"""Diffusion tensor maps (FA, MD, AD, RD, S0) by weighted least squares (dipy ``TensorModel``)."""
from __future__ import annotations

import numpy as np

from bids_uad.bids.gradients import B0_THRESHOLD

#: Maps written by the workflow, in this order.
TENSOR_MAPS = ("fa", "md", "ad", "rd", "s0")


def fit_tensor(data: np.ndarray, bvals: np.ndarray, bvecs: np.ndarray, mask: np.ndarray | None = None,
               b0_threshold: float = B0_THRESHOLD, fit_method: str = "WLS") -> dict[str, np.ndarray]:
    """Fit a tensor per voxel; returns float32 maps ``fa md ad rd s0`` (zero outside the mask).

    b-values at or below ``b0_threshold`` count as b0s (scanners write 0.001 or 5); MD/AD/RD are
    in mm²/s.  Non-finite results (degenerate voxels) become 0.
    """
    if mask is None:
        mask = np.ones(np.shape(data)[:3], bool)
    fit = _tensor_fit(data, bvals, bvecs, mask, b0_threshold, fit_method)
    maps = {"fa": fit.fa, "md": fit.md, "ad": fit.ad, "rd": fit.rd, "s0": fit.S0_hat}
    out = {}
    for key in TENSOR_MAPS:
        arr = np.asarray(maps[key], dtype=np.float32)
        arr[~np.isfinite(arr)] = 0.0
        arr[~np.asarray(mask, bool)] = 0.0
        if key == "fa":
            arr = np.clip(arr, 0.0, 1.0)
        out[key] = arr
    return out


def _tensor_fit(data, bvals, bvecs, mask, b0_threshold: float = B0_THRESHOLD, fit_method: str = "WLS"):
    """dipy's tensor fit of ``data`` in ``mask`` (b-values at or below ``b0_threshold`` are b0s)."""
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    bvals = np.asarray(bvals, float).copy()
    bvecs = np.asarray(bvecs, float).copy()
    b0 = bvals <= b0_threshold
    bvals[b0] = 0.0
    bvecs[b0] = 0.0
    gtab = gradient_table(bvals, bvecs=bvecs, b0_threshold=b0_threshold)
    model = TensorModel(gtab, fit_method=fit_method, return_S0_hat=True)
    return model.fit(np.clip(np.asarray(data, dtype=np.float32), 0, None), mask=np.asarray(mask, bool))


def direction_coloured_fa(data: np.ndarray, bvals: np.ndarray, bvecs: np.ndarray, affine: np.ndarray,
                          mask: np.ndarray | None = None, b0_threshold: float = B0_THRESHOLD) -> np.ndarray:
    """Direction-encoded colour FA ``(X, Y, Z, 3)`` in [0, 1]: FA times the absolute world
    (RAS) components of the principal eigenvector: red left-right, green anterior-posterior,
    blue inferior-superior.

    The quality check for b-vectors: the corpus callosum must be red, the corticospinal tract
    blue, the cingulum green; a wrong flip or axis order of the ``.bvec`` shows as wrong
    colours.  ``bvecs`` in FSL's convention (voxel axes, the first flipped when the affine's
    determinant is positive).
    """
    if mask is None:
        mask = np.ones(np.shape(data)[:3], bool)
    fit = _tensor_fit(data, bvals, bvecs, mask, b0_threshold)
    v1 = np.nan_to_num(np.asarray(fit.evecs[..., :, 0], dtype=np.float64))
    lin = np.asarray(affine, float)[:3, :3]
    rot = lin / np.linalg.norm(lin, axis=0, keepdims=True)  # voxel axes -> world directions
    if np.linalg.det(lin) > 0:
        rot = rot @ np.diag([-1.0, 1.0, 1.0])  # FSL's flip of the first voxel axis
    rgb = np.abs(v1 @ rot.T) * np.clip(np.nan_to_num(fit.fa), 0.0, 1.0)[..., None]
    rgb[~np.asarray(mask, bool)] = 0.0
    return rgb.astype(np.float32)


def tensor_metrics_from_ratios(ratios: np.ndarray, bvals: np.ndarray, bvecs: np.ndarray,
                               mask: np.ndarray | None = None, floor: float = 1e-3) -> dict[str, np.ndarray]:
    """FA, MD (mm²/s) and mean diffusion-weighted signal ratio from normalised signals.

    ``ratios`` (C, X, Y, Z) are diffusion-weighted signals divided by the mean b0 (the models'
    input, b0s removed) with ``bvals`` (C,) and ``bvecs`` (C, 3); the tensor is the ordinary
    least-squares fit of ``-ln(ratio) = b gᵀDg`` (ratios clipped to ``[floor, 1]``), fast enough
    to run inside a model's scoring.  Outside ``mask`` (default: voxels with a positive mean
    ratio) every map is 0.  Keys: ``fa``, ``md``, ``mdw``.
    """
    ratios = np.asarray(ratios, np.float32)
    bvals = np.asarray(bvals, float).ravel()
    g = np.asarray(bvecs, float).reshape(-1, 3)
    g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    mdw = ratios.mean(0)
    mask = mdw > 0 if mask is None else np.asarray(mask, bool) & (mdw > 0)
    design = bvals[:, None] * np.stack([g[:, 0] ** 2, g[:, 1] ** 2, g[:, 2] ** 2, 2 * g[:, 0] * g[:, 1],
                                        2 * g[:, 0] * g[:, 2], 2 * g[:, 1] * g[:, 2]], 1)
    y = -np.log(np.clip(ratios[:, mask], floor, 1.0)).T  # (N, C)
    d = y @ np.linalg.pinv(design).T  # (N, 6): xx yy zz xy xz yz
    tensors = np.empty((d.shape[0], 3, 3))
    for (i, j), k in zip(((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)), range(6)):
        tensors[:, i, j] = tensors[:, j, i] = d[:, k]
    ev = np.linalg.eigvalsh(tensors) if len(d) else np.zeros((0, 3))
    md = ev.mean(1)
    num = np.sqrt(((ev - md[:, None]) ** 2).sum(1))
    den = np.sqrt((ev ** 2).sum(1))
    fa = np.sqrt(1.5) * np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    out = {}
    for key, values in (("fa", np.clip(fa, 0, 1)), ("md", md), ("mdw", mdw[mask])):
        arr = np.zeros(mask.shape, np.float32)
        arr[mask] = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        out[key] = arr
    return out
