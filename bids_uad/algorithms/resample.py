"""Shared resampling helpers for diffusion preprocessing (torch ``grid_sample`` and scipy).

Conventions used throughout ``algorithms/``: a 3-D volume is a numpy array indexed
``[i, j, k]`` (voxel axes of the NIfTI), a 4-D series is ``[i, j, k, volume]``.  Sampling
coordinates are continuous voxel indices of the *input* image, shape ``(..., 3)`` in
``(i, j, k)`` order.  Everything here is pure array code (no files, no nipype).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

#: ``PhaseEncodingDirection`` letters mapped to voxel axes.
PE_AXES = {"i": 0, "j": 1, "k": 2}


def parse_phase_encoding(direction: str) -> tuple[int, int]:
    """``'j-'`` -> ``(1, -1)``: the voxel axis and the polarity of a BIDS PE direction.

    Examples
    --------
    >>> parse_phase_encoding("j-")
    (1, -1)
    >>> parse_phase_encoding("i")
    (0, 1)
    """
    text = str(direction).strip()
    if not text or text[0] not in PE_AXES or text[1:] not in ("", "-", "+"):
        raise ValueError(f"invalid PhaseEncodingDirection {direction!r} (expected i, j, k, i-, j-, k-)")
    return PE_AXES[text[0]], -1 if text.endswith("-") else 1


def voxel_grid(shape: tuple[int, int, int], dtype=torch.float32) -> torch.Tensor:
    """Continuous voxel indices of every voxel, shape ``(X, Y, Z, 3)``."""
    axes = [torch.arange(n, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def index_to_grid(coords: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Voxel indices ``(..., 3)`` in (i, j, k) -> the normalised, reversed ``grid_sample`` grid."""
    size = torch.tensor([max(n - 1, 1) for n in shape], dtype=coords.dtype, device=coords.device)
    norm = 2.0 * coords / size - 1.0
    return norm.flip(-1)


def sample_volumes(
    volumes: torch.Tensor,
    coords: torch.Tensor,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Sample ``(N, C, X, Y, Z)`` volumes at voxel coordinates ``(N|1, x, y, z, 3)``.

    Returns ``(N, C, x, y, z)``; trilinear (``bilinear`` in torch's 5-D naming) by default.
    """
    return sample_grid(volumes, index_to_grid(coords, tuple(volumes.shape[-3:])), mode, padding_mode)


def sample_grid(
    volumes: torch.Tensor,
    grid: torch.Tensor,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """:func:`sample_volumes` at points already in ``grid_sample``'s form (:func:`index_to_grid`)."""
    if grid.shape[0] == 1 and volumes.shape[0] > 1:
        grid = grid.expand(volumes.shape[0], *grid.shape[1:])
    return F.grid_sample(volumes, grid, mode=mode, padding_mode=padding_mode, align_corners=True)


def resample_to_grid(
    data: np.ndarray,
    src_affine: np.ndarray,
    dst_shape: tuple[int, int, int],
    dst_affine: np.ndarray,
    order: int = 1,
) -> np.ndarray:
    """Resample a 3-D or 4-D image from its grid onto another grid (world alignment by affines)."""
    data = np.asarray(data, dtype=np.float32)
    vox2vox = np.linalg.inv(src_affine) @ dst_affine
    if data.ndim == 3:
        return ndimage.affine_transform(
            data, vox2vox[:3, :3], vox2vox[:3, 3], output_shape=tuple(dst_shape), order=order, mode="nearest"
        ).astype(np.float32)
    out = np.empty(tuple(dst_shape) + (data.shape[3],), dtype=np.float32)
    for v in range(data.shape[3]):
        out[..., v] = resample_to_grid(data[..., v], src_affine, dst_shape, dst_affine, order)
    return out


def same_grid(shape_a, affine_a, shape_b, affine_b, atol: float = 1e-3) -> bool:
    """True when two images share shape (first 3 axes) and affine."""
    return tuple(shape_a[:3]) == tuple(shape_b[:3]) and np.allclose(affine_a, affine_b, atol=atol)


def smooth(vol: np.ndarray, sigma_vox: float) -> np.ndarray:
    """Gaussian smoothing in voxels (no-op for sigma <= 0)."""
    if sigma_vox <= 0:
        return np.asarray(vol, dtype=np.float32)
    return ndimage.gaussian_filter(np.asarray(vol, dtype=np.float32), sigma_vox, mode="nearest")
