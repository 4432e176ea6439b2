"""Fit the networks' score references (:mod:`bids_uad.models.normaliser`) after k-fold training."""
from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np

from bids_uad.errors import InputMissingError
from bids_uad.models.bundle import FoldResult, brain_of, score_volume
from bids_uad.models.normaliser import normaliser_of, robust_scale

LOG = logging.getLogger(__name__)


def splits(folds: Sequence[FoldResult]) -> list[list[FoldResult]]:
    """The folds grouped by k-fold training (``training.repeats``): consecutive folds that hold out
    each control at most once (the trainer numbers the folds split after split)."""
    groups: list[list[FoldResult]] = []
    held: set[int] = set()
    for res in folds:
        if not groups or held & set(res.val_idx):
            groups.append([])
            held = set()
        groups[-1].append(res)
        held |= set(res.val_idx)
    return groups


def fit_score_normalisers(folds: Sequence[FoldResult], data: Sequence[np.ndarray],
                          routes: Sequence | None) -> dict[tuple[int, int], np.ndarray]:
    """Fit every fold's score reference from the controls' out-of-fold raw scores; returns those
    raw maps ({(fold, control index): map}, for the folds' calibration without a second forward pass).

    ``data``: every control's arrays on the model grid; ``routes``: their TemplateRoutes on that
    grid (all required).  Within each k-fold training (:func:`splits`; several with
    ``training.repeats``) each control is scored once, by the fold that held it out; a fold's scale
    is the median and robust spread of its held-out controls' scores inside their brains, and its
    per-voxel reference the scaled scores of the controls it trained on (scored by the other folds
    of its own split), carried to the template.
    """
    started = time.perf_counter()
    routes = list(routes) if routes is not None else []
    if len(routes) != len(data) or any(r is None for r in routes):
        raise InputMissingError("a network whose score is referred to its controls' in template space needs every "
                                "control's transforms to the template")
    brains = [brain_of(d) for d in data]
    raw: dict[tuple[int, int], np.ndarray] = {}
    for split in splits(folds):
        raw.update(_fit_split(split, data, brains, routes))
    LOG.info("score reference fitted for %d folds from %d controls' out-of-fold scores (%.1f s)", len(folds),
             len({i for _, i in raw}), time.perf_counter() - started)
    return raw


def _fit_split(folds: Sequence[FoldResult], data, brains, routes) -> dict[tuple[int, int], np.ndarray]:
    """:func:`fit_score_normalisers` for the folds of one k-fold training."""
    held_by: dict[int, FoldResult] = {}
    raw: dict[int, np.ndarray] = {}
    for res in folds:
        normaliser = normaliser_of(res.model)
        maps = [score_volume(res.model, data[i], raw=True) for i in res.val_idx]
        normaliser.set_scale(*robust_scale(maps, [brains[i] for i in res.val_idx]))
        for i, m in zip(res.val_idx, maps):
            held_by[i], raw[i] = res, m
    scaled = {}
    for i, res in held_by.items():
        values, support = normaliser_of(res.model).to_template(raw[i], brains[i], routes[i])
        scaled[i] = np.where(support, values, np.nan).astype(np.float32)
    for res in folds:
        peers = [i for i in res.train_idx if i in scaled]
        if len(peers) < 2:
            raise InputMissingError(f"fold {res.fold}: {len(peers)} of its training controls were scored out of "
                                    "fold; a score reference needs at least 2")
        normaliser_of(res.model).set_reference([scaled[i] for i in peers])
    return {(held_by[i].fold, i): m for i, m in raw.items()}
