"""Small synthetic diffusion "brains" (array level) for tests and benchmarks.

Each subject is a smooth ellipsoidal brain with CSF/GM/WM, a diffusion tensor per voxel
(WM fibres follow a smooth random orientation field) and the signal ratio
S/S0 = exp(-b g^T D g) plus noise.  A lesion is an irregular blob with raised mean
diffusivity and lowered anisotropy.  Independent of :mod:`bids_uad.synthetic` (BIDS files).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


def fibonacci_directions(n: int, rotation: np.ndarray | None = None) -> np.ndarray:
    """``n`` near-uniform unit vectors on the upper hemisphere (optionally rotated)."""
    i = np.arange(n) + 0.5
    z = 1 - i / n  # upper hemisphere only: antipodes are the same direction
    r = np.sqrt(1 - z**2)
    phi = i * np.pi * (3 - np.sqrt(5))
    v = np.stack([r * np.cos(phi), r * np.sin(phi), z], 1)
    return v if rotation is None else v @ np.asarray(rotation).T


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniform random 3D rotation matrix."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def tensor_signal(evals: np.ndarray, e1: np.ndarray, bvecs: np.ndarray, bval: float) -> np.ndarray:
    """Signal ratio (N, C) of axially symmetric tensors with eigenvalues (N,2) [l_par, l_perp]."""
    g = bvecs / np.linalg.norm(bvecs, axis=1, keepdims=True)
    cos2 = (e1 @ g.T) ** 2
    adc = evals[:, 1:2] + (evals[:, 0:1] - evals[:, 1:2]) * cos2
    return np.exp(-bval * adc)


def _smooth_noise(rng, shape, sigma):
    """Smooth Gaussian random field with zero mean and unit standard deviation."""
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma)
    return (field - field.mean()) / (field.std() + 1e-12)


@dataclass
class ToySubject:
    data: np.ndarray  # (X, Y, Z, C) float32 signal ratio in [0, 1], zero outside the mask
    mask: np.ndarray  # brain mask (bool)
    lesion: np.ndarray  # lesion mask (bool), empty for controls
    dseg: np.ndarray  # 0 background, 1 CSF, 2 GM, 3 WM


def make_toy_subject(shape: tuple[int, int, int], bvecs: np.ndarray, seed: int, lesion: bool = False,
                     bval: float = 1000.0, noise: float = 0.02, lesion_radius: float = 0.18,
                     severity: float = 1.0) -> ToySubject:
    """One synthetic subject; ``lesion_radius`` is a fraction of the smallest axis.

    ``severity`` in (0, 1] blends the lesion tensors between the local healthy tissue (0) and
    oedema / necrotic core (1); below 1 the contrast is subtler.
    """
    rng = np.random.default_rng(seed)
    shape = tuple(shape)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    s = min(shape) / 8
    scale = 0.9 + 0.04 * rng.normal(size=3)
    radius = np.linalg.norm(grid / scale, axis=-1) + 0.03 * _smooth_noise(rng, shape, s)
    mask = radius < 1.0
    vent = np.linalg.norm((grid - [0, 0.05, 0.05]) / [0.12, 0.3, 0.15], axis=-1) < 1.0
    dseg = np.zeros(shape, np.uint8)
    dseg[mask] = 3
    dseg[mask & (radius > 0.75 + 0.03 * _smooth_noise(rng, shape, s))] = 2
    dseg[mask & (radius > 0.93)] = 1
    dseg[mask & vent] = 1
    # smooth fibre orientation field
    e1 = np.stack([_smooth_noise(rng, shape, s) for _ in range(3)], -1)
    e1 /= np.linalg.norm(e1, axis=-1, keepdims=True) + 1e-12
    evals = np.zeros(shape + (2,))
    evals[dseg == 1] = [3.0e-3, 3.0e-3]
    evals[dseg == 2] = [0.9e-3, 0.75e-3]
    evals[dseg == 3] = [1.6e-3, 0.35e-3]
    wiggle = 1 + 0.05 * _smooth_noise(rng, shape, s)[..., None]
    evals *= wiggle
    les = np.zeros(shape, bool)
    if lesion:
        inner = np.argwhere(mask & (radius < 0.6) & ~vent)
        centre = inner[rng.integers(len(inner))]
        dist = np.linalg.norm((np.indices(shape).transpose(1, 2, 3, 0) - centre) / (lesion_radius * min(shape)), axis=-1)
        blob = dist + 0.5 * _smooth_noise(rng, shape, s / 2)
        les = (blob < 1.0) & mask
        core = (dist < 0.5) & les
        evals[les] = (1 - severity) * evals[les] + severity * np.array([1.4e-3, 1.1e-3])
        evals[core] = (1 - severity) * evals[core] + severity * np.array([2.2e-3, 2.0e-3])
    sig = np.zeros(shape + (len(bvecs),), np.float32)
    sig[mask] = tensor_signal(evals[mask], e1[mask], np.asarray(bvecs, float), bval)
    sig[mask] += noise * rng.normal(size=sig[mask].shape)
    np.clip(sig, 0, 1, out=sig)
    sig[~mask] = 0
    return ToySubject(sig, mask, les, dseg)
