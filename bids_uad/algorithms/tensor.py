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
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    bvals = np.asarray(bvals, float).copy()
    bvecs = np.asarray(bvecs, float).copy()
    b0 = bvals <= b0_threshold
    bvals[b0] = 0.0
    bvecs[b0] = 0.0
    gtab = gradient_table(bvals, bvecs=bvecs, b0_threshold=b0_threshold)
    data = np.asarray(data, dtype=np.float32)
    if mask is None:
        mask = np.ones(data.shape[:3], bool)
    model = TensorModel(gtab, fit_method=fit_method, return_S0_hat=True)
    fit = model.fit(np.clip(data, 0, None), mask=np.asarray(mask, bool))
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
