"""Optional denoising and Gibbs-ringing removal (dipy): MP-PCA, Patch2Self, sub-voxel shifts.

Off by default (MP-PCA takes about 14 minutes for a whole 90x90x54 series here).
"""
from __future__ import annotations

import numpy as np

DENOISE_METHODS = ("mppca", "patch2self")


def denoise_series(data: np.ndarray, bvals: np.ndarray, method: str, patch_radius: int = 2) -> np.ndarray:
    """Denoise a 4-D series with dipy's ``mppca`` or ``patch2self``."""
    data = np.asarray(data, dtype=np.float32)
    if method == "mppca":
        from dipy.denoise.localpca import mppca

        return np.asarray(mppca(data, patch_radius=patch_radius), dtype=np.float32)
    if method == "patch2self":
        from dipy.denoise.patch2self import patch2self

        return np.asarray(patch2self(data, np.asarray(bvals, float), model="ols", shift_intensity=True,
                                     clip_negative_vals=False, verbose=False), dtype=np.float32)
    raise ValueError(f"unknown denoising method {method!r} (choose {', '.join(DENOISE_METHODS)})")


def remove_gibbs(data: np.ndarray, slice_axis: int = 2, n_points: int = 3) -> np.ndarray:
    """Gibbs-ringing removal (Kellner et al. 2016, dipy ``gibbs_removal``), single process."""
    from dipy.denoise.gibbs import gibbs_removal

    return np.asarray(gibbs_removal(np.asarray(data, dtype=np.float32), slice_axis=slice_axis,
                                    n_points=n_points, num_processes=1), dtype=np.float32)
