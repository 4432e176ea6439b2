"""Seeded k-fold splits of control subjects."""
from __future__ import annotations

import logging

import numpy as np

from bids_uad.errors import InputValidationError

LOG = logging.getLogger(__name__)
MIN_CONTROLS = 3


def make_folds(n_subjects: int, n_folds: int, seed: int, repeat: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """List of (train indices, held-out indices); k is reduced to n when fewer subjects.  ``repeat``
    r > 0 draws another split of the same subjects (an independent k-fold run; 0 is the first)."""
    if n_subjects < MIN_CONTROLS:
        raise InputValidationError(
            f"training needs at least {MIN_CONTROLS} control subjects, got {n_subjects}")
    k = min(n_folds, n_subjects)
    if k < n_folds and repeat == 0:
        LOG.warning("only %d controls: using %d folds instead of %d", n_subjects, k, n_folds)
    perm = np.random.default_rng([seed, 7919] if repeat == 0 else [seed, 7919, repeat]).permutation(n_subjects)
    parts = np.array_split(perm, k)
    return [(np.sort(np.concatenate(parts[:i] + parts[i + 1:])), np.sort(parts[i])) for i in range(k)]
