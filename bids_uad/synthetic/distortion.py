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
    "displacement_voxels", "distort", "undistort", "polarity_of", "rigid_matrix",
]


def polarity_of(pe_direction: str) -> int:
    """+1 for ``i``/``j``/``k``, -1 for ``i-``/``j-``/``k-``."""
    return -1 if pe_direction.endswith("-") else 1


def axis_of(pe_direction: str) -> int:
    """Voxel axis index (0, 1, 2) of a BIDS PhaseEncodingDirection."""
    return "ijk".index(pe_direction[0])


def displacement_voxels(field_hz: np.ndarray, total_readout_time: float,
                        pe_direction: str = "j-") -> np.ndarray:
    """Displacement in voxels along the PE axis: ``field_Hz * TRT * polarity``."""
    return (np.asarray(field_hz, dtype=np.float64) * total_readout_time
            * polarity_of(pe_direction)).astype(np.float32)


def _grid(shape):
    return np.indices(shape, dtype=np.float32)


def _sample_along(vol: np.ndarray, coords: np.ndarray, order: int = 1) -> np.ndarray:
    return map_coordinates(vol, coords, order=order, mode="nearest", prefilter=False)


def distort(image: np.ndarray, displacement: np.ndarray, axis: int = 1,
            n_iter: int = 6, jacobian: bool = True, order: int = 1) -> np.ndarray:
    """Apply a displacement field (voxels, defined on the undistorted grid) to a 3D image.

    For every distorted voxel ``x`` solves ``y + d(y) = x`` by fixed-point iteration (valid
    while ``|d'| < 1``, i.e. no fold-over) and returns ``I(y) / (1 + d'(y))``.
    """
    image = np.asarray(image, dtype=np.float32)
    disp = np.asarray(displacement, dtype=np.float32)
    grid = _grid(image.shape)
    x = grid[axis].copy()
    y = x - disp
    coords = grid.copy()
    for _ in range(n_iter):
        coords[axis] = y
        y = x - _sample_along(disp, coords)
    coords[axis] = y
    out = map_coordinates(image, coords, order=order, mode="constant", cval=0.0,
                          prefilter=order > 1)
    if jacobian:
        dprime = np.gradient(disp, axis=axis).astype(np.float32)
        jac = 1.0 + _sample_along(dprime, coords)
        out = out / np.clip(jac, 0.1, None)
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
