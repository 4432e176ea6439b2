"""Combine dwi runs acquired with opposite phase encoding into one series, after correction.

Canon, UIH and HCP-style protocols acquire the whole DTI twice, once per phase-encoding
polarity (``dir-AP`` / ``dir-PA``).  Each run is corrected on its own (susceptibility field
estimated from both runs' b0s, head motion and eddy currents, one interpolation); this module
then does what QSIPrep does after correction: the later runs are aligned rigidly to the first
one's b0 reference (the head moves between runs), scaled to the first run's b0 intensity and
**concatenated**, their b-vectors rotated with the alignment.

Why concatenation and not averaging matching directions: it needs no assumption that both runs
used the same gradient table (HCP's do not), it keeps every measurement for the tensor fit
(WLS weights each volume by its own signal) and it is what QSIPrep does.  With identical tables
(Canon, UIH here) the tensor fit of the concatenation equals, up to the weighting, a fit to the
average, so nothing is lost.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from bids_uad.algorithms.hmc import FOV_COVERAGE_MIN, ROT_SCALE, _Warper, mi_rigid, rotation_matrix
from bids_uad.algorithms.resample import sample_volumes


@dataclass
class CombinedSeries:
    """The concatenated series and what was done to each run."""

    data: np.ndarray          # (X, Y, Z, sum of N)
    bvals: np.ndarray
    bvecs: np.ndarray         # (sum of N, 3), FSL frame of the first run
    b0_ref: np.ndarray        # mean of every b0 after alignment
    info: dict = field(default_factory=dict)


def masked_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Pearson correlation of two images inside ``mask`` (everywhere when None)."""
    sel = np.ones(a.shape, bool) if mask is None else np.asarray(mask, bool)
    x, y = np.asarray(a, float)[sel], np.asarray(b, float)[sel]
    if x.size < 3 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def rotate_bvecs(bvecs: np.ndarray, params: np.ndarray, affine_det_positive: bool = True) -> np.ndarray:
    """b-vectors of a series resampled with rigid ``params`` (p -> R p + t), FSL convention.

    As in :func:`bids_uad.algorithms.hmc.correct_motion`: FSL flips the first axis when the
    affine's determinant is positive, so the voxel-frame rotation is conjugated by that flip.
    """
    rot = rotation_matrix(*np.asarray(params[3:6], float))
    flip = np.diag([-1.0, 1.0, 1.0]) if affine_det_positive else np.eye(3)
    out = np.zeros_like(np.asarray(bvecs, float))
    for i, vec in enumerate(np.asarray(bvecs, float)):
        if np.any(vec):
            v = flip @ rot.T @ flip @ vec
            out[i] = v / np.linalg.norm(v)
    return out


def resample_rigid(series: np.ndarray, params: np.ndarray, zooms) -> np.ndarray:
    """Resample a 3-D or 4-D image with rigid ``params`` (trilinear; outside the FOV: 0)."""
    data = np.asarray(series, np.float32)
    squeeze = data.ndim == 3
    vols = torch.from_numpy(np.ascontiguousarray(np.moveaxis(data[..., None] if squeeze else data, -1, 0)))[:, None]
    warper = _Warper(data.shape[:3], zooms, None, None)
    theta = torch.zeros(1, 9)
    theta[0, :3] = torch.as_tensor(np.asarray(params[:3], np.float32))
    theta[0, 3:6] = torch.as_tensor(np.asarray(params[3:6], np.float32) / ROT_SCALE)
    pts, _, _ = warper.level(1)
    with torch.no_grad():
        coords = warper.coords(theta, pts, None)
        out = torch.cat([sample_volumes(vols[i:i + 1], coords) for i in range(vols.shape[0])])
    arr = np.moveaxis(out[:, 0].numpy(), 0, -1)
    return arr[..., 0] if squeeze else arr


def combine_runs(series: list[np.ndarray], bvals: list[np.ndarray], bvecs: list[np.ndarray],
                 b0_refs: list[np.ndarray], zooms, mask: np.ndarray | None = None,
                 b0_threshold: float = 50.0, affine_det_positive: bool = True) -> CombinedSeries:
    """Align runs 2.. to run 1 (mutual information on the b0 references), scale, concatenate.

    ``mask``: brain mask of run 1 (alignment metric and intensity scaling); all runs on one grid.
    """
    if len(series) < 2:
        raise ValueError("combining needs at least two runs")
    shape = series[0].shape[:3]
    if any(s.shape[:3] != shape for s in series):
        raise ValueError("the runs to combine must share one grid")
    sel = np.ones(shape, bool) if mask is None else np.asarray(mask, bool)
    ref0 = np.asarray(b0_refs[0], np.float32)
    level0 = float(np.median(ref0[sel]))
    data, all_bvals, all_bvecs, runs = [series[0].astype(np.float32)], [bvals[0]], [bvecs[0]], []
    runs.append({"params": [0.0] * 6, "intensity_scale": 1.0})
    for k in range(1, len(series)):
        ref = np.asarray(b0_refs[k], np.float32)
        before = masked_correlation(ref, ref0, sel)
        params = mi_rigid(ref, ref0, zooms, mask=sel)
        aligned_ref = resample_rigid(ref, params, zooms)
        scale = level0 / max(float(np.median(aligned_ref[sel])), 1e-6)
        data.append(resample_rigid(series[k], params, zooms) * scale)
        all_bvals.append(bvals[k])
        all_bvecs.append(rotate_bvecs(bvecs[k], params, affine_det_positive))
        runs.append({"params": np.round(params, 5).tolist(), "intensity_scale": round(scale, 4),
                     "b0_correlation_before_alignment": round(before, 4),
                     "b0_correlation_after_alignment": round(masked_correlation(aligned_ref, ref0, sel), 4)})
    combined = np.concatenate(data, axis=-1)
    b = np.concatenate(all_bvals)
    g = np.concatenate(all_bvecs)
    is_b0 = b <= b0_threshold
    return CombinedSeries(data=combined, bvals=b, bvecs=g, b0_ref=combined[..., is_b0].mean(-1),
                          info={"method": "rigid alignment of each run's b0 reference to the first run's "
                                          "(mutual information), b0 intensity scaling, concatenation",
                                "runs": runs, "volumes": [int(s.shape[3]) for s in series]})


def combined_fov(fov_masks: list[np.ndarray], run_params: list, zooms) -> np.ndarray:
    """Field-of-view mask of a combined series: the first run's, and every later run's moved by its
    alignment (``run_params``: :func:`combine_runs`' per-run ``params``), where the moved mask keeps
    :data:`~bids_uad.algorithms.hmc.FOV_COVERAGE_MIN` of its interpolation weight."""
    out = np.asarray(fov_masks[0], bool).copy()
    for mask, params in zip(fov_masks[1:], run_params[1:]):
        moved = resample_rigid(np.asarray(mask, np.float32), np.asarray(params, float), zooms)
        out &= moved >= FOV_COVERAGE_MIN
    return out
