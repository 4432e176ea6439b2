"""EPI susceptibility/eddy distortion model as plain array functions (used by tests too).

Convention (also in the truth README): a field ``f`` in Hz on the *undistorted* grid moves
the signal of voxel ``y`` to ``x = y + d(y)`` along the phase-encoding voxel axis, with
``d = f * TotalReadoutTime * polarity`` voxels; polarity is +1 for ``j`` and -1 for ``j-``.
Intensities are modulated by the Jacobian so that total signal is conserved:
``I_dist(y + d(y)) * (1 + d'(y)) = I(y)``.
"""
from __future__ import annotations

import numpy as np
from scipy.ndimage import map_coordinates

__all__ = [
    "displacement_voxels", "distort", "undistort", "polarity_of", "rigid_matrix", "source_positions",
    "interp_along", "voxel_motion_map",
]


def polarity_of(pe_direction: str) -> int:
    """+1 for ``i``/``j``/``k``, -1 for ``i-``/``j-``/``k-``."""
    return -1 if pe_direction.endswith("-") else 1


def displacement_voxels(field_hz: np.ndarray, total_readout_time: float,
                        pe_direction: str = "j-") -> np.ndarray:
    """Displacement in voxels along the PE axis: ``field_Hz * TRT * polarity``."""
    return (np.asarray(field_hz, dtype=np.float64) * total_readout_time
            * polarity_of(pe_direction)).astype(np.float32)


def _grid(shape):
    return np.indices(shape, dtype=np.float32)


def interp_along(arr: np.ndarray, pos: np.ndarray, axis: int, outside: float | None = None) -> np.ndarray:
    """Linear interpolation of ``arr`` at fractional indices ``pos`` along one axis.

    ``pos`` has the shape of ``arr``: every line along ``axis`` is sampled at its own positions
    (the other indices stay).  Outside the line the edge value is used (``outside=None``) or
    ``outside``.  A 1D gather per line, much cheaper than a 3D ``map_coordinates``.
    """
    n = arr.shape[axis]
    clipped = np.clip(pos, 0, n - 1)
    lo = np.minimum(np.floor(clipped).astype(np.intp), max(n - 2, 0))
    w = (clipped - lo).astype(np.float32)
    a0 = np.take_along_axis(arr, lo, axis)
    a1 = np.take_along_axis(arr, np.minimum(lo + 1, n - 1), axis)
    out = a0 + w * (a1 - a0)
    if outside is not None:
        out[(pos < -0.5) | (pos > n - 0.5)] = outside
    return out.astype(np.float32)


def source_positions(displacement: np.ndarray, axis: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Undistorted positions ``y`` (along ``axis``) and Jacobians of every distorted voxel.

    With ``d`` linear between voxels, ``y + d(y)`` is piecewise linear along each line; its
    inverse at the integer positions ``x`` is found by one sorted search over all lines (slopes
    ``1 + d'`` kept at 0.1 or more: no fold-over; beyond the ends of a line the edge displacement
    continues).  The Jacobian is ``1 + d'(y)`` with ``d'`` the central difference, clipped at 0.1.
    """
    disp = np.moveaxis(np.asarray(displacement, dtype=np.float32), axis, -1)
    n = disp.shape[-1]
    d = disp.reshape(-1, n).astype(np.float64)
    n_lines = d.shape[0]
    k = np.arange(n, dtype=np.float64)
    slope = np.maximum(np.diff(k + d, axis=1), 0.1)
    fwd = np.concatenate([d[:, :1], d[:, :1] + np.cumsum(slope, axis=1)], axis=1)  # x of voxel k
    span = 2.0 * (np.abs(fwd).max() + n) + 2.0  # lines (and their queries 0..n-1) never overlap
    offset = np.arange(n_lines, dtype=np.float64)[:, None] * span
    flat = (fwd + offset).ravel()
    hit = np.searchsorted(flat, (k[None, :] + offset).ravel(), side="right") - 1
    line = np.repeat(np.arange(n_lines), n)
    seg = hit - line * n  # segment start within the line (-1: before its first voxel)
    inner = np.clip(seg, 0, n - 2) + line * n
    fwd = fwd.ravel()
    q = np.tile(k, n_lines)
    y = np.clip(seg, 0, n - 2) + (q - fwd[inner]) / (fwd[inner + 1] - fwd[inner])
    before, after = seg < 0, seg >= n - 1
    y[before] = q[before] - d[:, 0][line[before]]
    y[after] = q[after] - d[:, -1][line[after]]
    y = np.moveaxis(y.reshape(disp.shape).astype(np.float32), -1, axis)
    dprime = np.gradient(np.asarray(displacement, dtype=np.float32), axis=axis).astype(np.float32)
    jac = np.clip(1.0 + interp_along(dprime, y, axis), 0.1, None)
    return y, jac


def distort(image: np.ndarray, displacement: np.ndarray, axis: int = 1,
            jacobian: bool = True, order: int = 1) -> np.ndarray:
    """Apply a displacement field (voxels, defined on the undistorted grid) to a 3D image.

    For every distorted voxel ``x`` solves ``y + d(y) = x`` (:func:`source_positions`) and
    returns ``I(y) / (1 + d'(y))``.
    """
    image = np.asarray(image, dtype=np.float32)
    y, jac = source_positions(displacement, axis)
    if order == 1:
        out = interp_along(image, y, axis, outside=0.0)
    else:
        coords = _grid(image.shape)
        coords[axis] = y
        out = map_coordinates(image, coords, order=order, mode="constant", cval=0.0, prefilter=True)
    if jacobian:
        out = out / jac
    return out.astype(np.float32)


def undistort(distorted: np.ndarray, displacement: np.ndarray, axis: int = 1,
              jacobian: bool = True, order: int = 1) -> np.ndarray:
    """Invert :func:`distort`: ``I(y) = I_dist(y + d(y)) * (1 + d'(y))``."""
    distorted = np.asarray(distorted, dtype=np.float32)
    disp = np.asarray(displacement, dtype=np.float32)
    coords = _grid(distorted.shape)
    coords[axis] += disp
    out = map_coordinates(distorted, coords, order=order, mode="constant", cval=0.0,
                          prefilter=order > 1)
    if jacobian:
        out = out * np.clip(1.0 + np.gradient(disp, axis=axis), 0.0, None)
    return out.astype(np.float32)


def rotation_matrix(rx: float, ry: float, rz: float) -> np.ndarray:
    """3x3 rotation ``Rz @ Ry @ Rx`` (radians, right-handed about the world axes)."""
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rot_z @ rot_y @ rot_x


def rigid_matrix(params, centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 world transform ``x -> R (x - c) + c + t`` from (tx, ty, tz, rx, ry, rz)."""
    tx, ty, tz, rx, ry, rz = [float(p) for p in params]
    mat = np.eye(4)
    rot = rotation_matrix(rx, ry, rz)
    c = np.asarray(centre, dtype=float)
    mat[:3, :3] = rot
    mat[:3, 3] = c - rot @ c + np.array([tx, ty, tz])
    return mat


def voxel_motion_map(params, shape, zooms) -> np.ndarray:
    """4x4 map from a voxel of a moved volume to the reference voxel showing the same anatomy.

    ``params`` (tx, ty, tz mm, rx, ry, rz rad) move the head by ``q -> R q + t`` in the
    grid-centred voxel-mm frame (axes along the voxel axes i, j, k, scaled by ``zooms``): the
    frame of FSL's and this project's motion parameters for an image stored with a negative
    determinant (LAS, as dcm2niix writes).
    """
    centre = (np.asarray(shape[:3], float) - 1) / 2.0
    to_mm = np.diag([*np.asarray(zooms, float)[:3], 1.0])
    to_mm[:3, 3] = -np.asarray(zooms, float)[:3] * centre
    return np.linalg.inv(to_mm) @ np.linalg.inv(rigid_matrix(params)) @ to_mm
