"""Optional denoising / Gibbs removal run and reduce noise on a small series."""
from __future__ import annotations

import numpy as np
import pytest

from bids_uad.algorithms.denoise import denoise_series, remove_gibbs


def _series(seed=0):
    rng = np.random.default_rng(seed)
    clean = np.ones((12, 12, 8, 10), np.float32) * 100
    clean[3:9, 3:9, 2:6] *= 2.0
    clean *= np.linspace(1, 0.5, 10)[None, None, None, :]
    return clean, clean + rng.normal(0, 5, clean.shape).astype(np.float32)


def test_mppca_reduces_noise():
    clean, noisy = _series()
    out = denoise_series(noisy, np.r_[0, np.full(9, 1000.0)], "mppca", patch_radius=1)
    assert np.abs(out - clean).mean() < np.abs(noisy - clean).mean()


def test_unknown_method():
    with pytest.raises(ValueError):
        denoise_series(np.zeros((4, 4, 4, 3)), np.zeros(3), "bm4d")


def test_gibbs_runs_and_keeps_shape():
    _, noisy = _series()
    out = remove_gibbs(noisy)
    assert out.shape == noisy.shape and np.isfinite(out).all()
