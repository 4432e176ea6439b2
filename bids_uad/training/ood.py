"""Synthetic just-out-of-distribution patches for RecDiscNet, drawn on the fly.

Per sample: 0/1/2 ellipsoids (probabilities from the settings) with random size,
orientation and axes, centred inside the brain and cut to it.  Values inside come from a
normal or uniform distribution with mean = brain mean (or a fraction of it) and spread =
brain std, in mode ``random`` (per voxel and channel), ``directional`` (one value per
channel), ``isotropic`` (one value per voxel, all channels); several modes = mix.
"""
from __future__ import annotations

import numpy as np

from bids_uad.models.settings import OODSettings


def random_ellipsoid(shape: tuple[int, int, int], centre: np.ndarray, radii: np.ndarray,
                     rotation: np.ndarray) -> np.ndarray:
    """Boolean ellipsoid with semi-axes ``radii`` (voxels) along the columns of ``rotation``."""
    coords = np.indices(shape, dtype=np.float32).reshape(3, -1).T - centre
    local = coords @ rotation.astype(np.float32)
    return ((local / radii.astype(np.float32)) ** 2).sum(1).reshape(shape) <= 1.0


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _draw(rng, dist, mean, std, size):
    if dist == "normal":
        return rng.normal(mean, std, size)
    half = np.sqrt(3.0) * std  # uniform with the same standard deviation
    return rng.uniform(mean - half, mean + half, size)


def add_ood_patches(x: np.ndarray, brain: np.ndarray, rng: np.random.Generator,
                    settings: OODSettings, info: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (corrupted copy of x (C,X,Y,Z) clipped to [0,1], anomaly mask (X,Y,Z) float32).

    ``info``, when given, receives what was drawn (``n_ellipsoids``, ``modes``, ``distributions``).
    """
    shape = x.shape[1:]
    out = x.copy()
    anomaly = np.zeros(shape, bool)
    n = int(rng.choice(3, p=np.asarray(settings.count_probabilities, float)))
    if info is not None:
        info.update(n_ellipsoids=n, modes=[], distributions=[])
    inside = np.argwhere(brain)
    if n == 0 or len(inside) == 0:
        return out, anomaly.astype(np.float32)
    vals = x[:, brain]
    mean, std = float(vals.mean()), float(vals.std())
    for _ in range(n):
        centre = inside[rng.integers(len(inside))].astype(np.float32)
        radii = rng.uniform(settings.min_radius, settings.max_radius, 3) * np.array(shape)
        radii = np.maximum(radii, 1.0)
        region = random_ellipsoid(shape, centre, radii, _rotation(rng)) & brain
        k = int(region.sum())
        if k == 0:
            continue
        dist = settings.distribution
        if dist == "both":
            dist = ("normal", "uniform")[rng.integers(2)]
        mode = settings.modes[rng.integers(len(settings.modes))]
        mu = mean * settings.mean_scales[rng.integers(len(settings.mean_scales))]
        c = x.shape[0]
        if info is not None:
            info["modes"].append(mode)
            info["distributions"].append(dist)
        if mode == "random":
            values = _draw(rng, dist, mu, std, (c, k))
        elif mode == "directional":
            values = np.repeat(_draw(rng, dist, mu, std, (c, 1)), k, axis=1)
        else:  # isotropic
            values = np.repeat(_draw(rng, dist, mu, std, (1, k)), c, axis=0)
        out[:, region] = np.clip(values, 0.0, 1.0).astype(x.dtype)
        anomaly |= region
    return out, anomaly.astype(np.float32)
