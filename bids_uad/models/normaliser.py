"""A network's score referred to its controls' in template space: a normative model of the score.

A reconstruction network's raw score is high wherever reconstruction is hard, lesion or not
(ventricle borders, the cortex, the brain's edge, the skull-stripping rim), so on healthy tissue it
varies more by *where* than by *whether* it is normal.  The controls' own scores tell where: each
control is scored by the fold network that held it out (out of fold, as a new subject would be),
and the per-voxel robust centre and spread of those scores, in the template the anatomical
workflow registers to, give the network's normal range at each location.  The model's score is
then the robust z of its raw score against that range, computed in the template and carried back
to the subject's grid (the template-space normative model's route, one resampling each way): the
positive z of a magnitude score, or |z| of a signed one (``score_reduction`` ``"sum"``, the signed
channel sum of the residual, which the group level uses for networks on dw inputs: a network's
residual has a sign that is the same in every healthy brain at a place, and a lesion can move it
either way; folding it to a magnitude first hid lesions that moved it towards 0 —
measured in docs/models.md).

Per fold: the raw scores are first put on a common scale (each fold's median and robust spread
of its held-out controls' scores inside their brains: separately trained networks do not share a
scale), and fold ``f``'s per-voxel statistics come from the controls *it trained on*, which the
other folds scored out of fold.  Fold ``f``'s held-out controls thus took part in neither its
training nor its reference, so its calibration on them stays held-out, and the folds' scores
share one scale (the robust z), so the out-of-fold calibration can pool them.

Fitted at the group level by :func:`bids_uad.training.normalise.fit_score_normalisers`; applied by
:func:`bids_uad.models.bundle.score_volume`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from bids_uad.algorithms.robust import robust_spread
from bids_uad.errors import InputValidationError
from bids_uad.models.baselines import TemplateGrid, robust_voxel_stats
from bids_uad.models.settings import ModelSettings


class ScoreNormaliser(TemplateGrid, nn.Module):
    """Buffers of one fold: its raw-score scale (location, spread) and the per-voxel centre,
    spread and validity of its training controls' scaled out-of-fold scores on the template grid.

    A signed score of inputs ``"both"`` has two raw maps (the residual's signed sum over the dw
    volumes and over the features: ``ModelSettings.n_score_maps``), each with its own scale and
    per-voxel statistics (buffers with a leading axis of 2), the score being the larger |z|, as the
    normative model's over its metrics.  One map keeps the buffers' original shapes."""

    def __init__(self, settings: ModelSettings):
        super().__init__()
        self.settings = settings
        self.n_maps = settings.n_score_maps
        lead = () if self.n_maps == 1 else (self.n_maps,)
        shape = tuple(self.template_shape)
        self.register_buffer("scale", torch.zeros(lead + (2,)))  # (location, spread); spread 0: not fitted
        self.register_buffer("centre", torch.zeros(lead + shape))
        self.register_buffer("spread", torch.ones(lead + shape))
        self.register_buffer("valid", torch.zeros(shape))

    def _per_map(self, array: np.ndarray) -> np.ndarray:
        """``array`` with a leading axis of the raw maps: (M, X, Y, Z)."""
        array = np.asarray(array)
        return array.reshape((self.n_maps,) + array.shape[-3:])

    @property
    def fitted(self) -> bool:
        return bool((self.scale.reshape(-1, 2)[:, 1] > 0).all())

    def set_scale(self, location, spread) -> None:
        """Each raw map's (location, spread): numbers, or one per map."""
        location = np.atleast_1d(np.asarray(location, float)).ravel()
        spread = np.atleast_1d(np.asarray(spread, float)).ravel()
        if (location.size != self.n_maps or spread.size != self.n_maps or not np.isfinite(location).all()
                or not np.isfinite(spread).all() or not (spread > 0).all()):
            raise InputValidationError(f"a score scale needs a finite location and a positive spread per raw map "
                                       f"({self.n_maps}), got {location.tolist()}, {spread.tolist()}")
        pairs = torch.as_tensor(np.stack([location, spread], -1), dtype=torch.float32)
        self.scale.copy_(pairs.reshape(self.scale.shape))

    def scaled(self, raw: np.ndarray) -> np.ndarray:
        """``raw`` on the fold's common scale, (raw − location) / spread, each map by its own (the
        shape of ``raw``)."""
        scale = self.scale.reshape(-1, 2).cpu().numpy().astype(np.float32)
        location, spread = scale[:, 0, None, None, None], scale[:, 1, None, None, None]
        raw = np.asarray(raw, np.float32)
        return ((self._per_map(raw) - location) / spread).astype(np.float32).reshape(raw.shape)

    def to_template(self, raw: np.ndarray, brain: np.ndarray, route) -> tuple[np.ndarray, np.ndarray]:
        """(the scaled score carried to the template grid, with ``raw``'s leading axis if it has one;
        where it is defined there)."""
        scaled = np.where(brain, self._per_map(self.scaled(raw)), 0).astype(np.float32)
        maps, support = route.forward(scaled, brain, self.template_shape, self.template_affine)
        return (maps if np.ndim(raw) == 4 else maps[0]), support

    def set_reference(self, maps: Sequence[np.ndarray]) -> None:
        """Per-voxel robust centre/spread of template-grid scaled scores, one per control, as
        :meth:`to_template` gives them (NaN outside each subject)."""
        values = np.stack([self._per_map(m) for m in maps], 1)  # (M, n, X, Y, Z)
        centre, spread, valid = robust_voxel_stats(values, self.settings)
        self.centre.copy_(torch.as_tensor(centre).reshape(self.centre.shape))
        self.spread.copy_(torch.as_tensor(spread).reshape(self.spread.shape))
        self.valid.copy_(torch.as_tensor(valid.astype(np.float32)))

    def signed(self, raw: np.ndarray, brain: np.ndarray, route) -> tuple[np.ndarray, np.ndarray]:
        """(the robust z of each of one subject's raw score maps (X, Y, Z, or (M, X, Y, Z)) on its grid,
        (M, X, Y, Z), before :meth:`fold` makes it a score; where it is defined: ``brain``, where the
        reference is, carried back).  ``route``: the subject's TemplateRoute for that grid."""
        if not self.fitted:
            raise InputValidationError("this network's score reference was never fitted (a model file written "
                                       "while training, or damaged): train the model again")
        if route is None:
            raise InputValidationError("this network's score is referred to its controls' in "
                                       f"{self.settings.normative_template}: the subject's transforms are needed")
        values, support = self.to_template(raw, brain, route)
        defined = support & (self.valid.cpu().numpy() > 0)
        centre = self._per_map(self.centre.cpu().numpy())
        spread = self._per_map(self.spread.cpu().numpy())
        z = np.where(defined, (self._per_map(values) - centre) / spread, 0).astype(np.float32)
        back, landed = route.backward(z, defined, self.template_affine, brain.shape)
        keep = brain & landed
        return np.where(keep, back, 0).astype(np.float32), keep

    def fold(self, z: np.ndarray) -> np.ndarray:
        """The score of z maps (M, X, Y, Z): the magnitude of a signed score's, the positive part of a
        magnitude score's; the largest over the maps."""
        return (np.abs(z) if self.settings.score_reduction == "sum" else np.maximum(z, 0)).max(0).astype(np.float32)

    def zscore(self, raw: np.ndarray, brain: np.ndarray, route) -> np.ndarray:
        """The score of one subject's raw score map(s): :meth:`fold` of :meth:`signed`; 0 outside
        ``brain`` and where the reference is undefined."""
        return self.fold(self.signed(raw, brain, route)[0])


#: fewest voxels defined in every fold's z map for an ensemble's null spread to be estimated
MIN_ENSEMBLE_VOXELS = 500


def ensemble_z(fold_z: Sequence[np.ndarray], keeps: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The fold ensemble of one subject's z maps, on the null scale of one fold's.

    ``fold_z``: each fold's :meth:`ScoreNormaliser.signed` maps (M, X, Y, Z) of the same subject,
    ``keeps`` where each is defined.  Their mean has a narrower healthy distribution than one fold's
    (separately trained networks err partly independently: the folds' z maps of a subject correlate
    by 0.1-0.6 on the hard-lesion set, docs/models.md), so a level calibrated on single folds'
    out-of-fold maps (every control can only be scored out of fold by one network) would flag fewer
    voxels in the ensemble's than it was calibrated for.  Each map's mean is therefore divided by
    ``r`` = robust spread of the mean / median over folds of each fold's robust spread, measured on
    the voxels every fold defines: the ratio of the subject's own spreads, so a lesion or a noisy scan,
    which widens both, leaves it about unchanged.  Returns (the rescaled mean (M, X, Y, Z), r per map);
    r is 1 for one fold or fewer than :data:`MIN_ENSEMBLE_VOXELS` common voxels.
    """
    stack = np.stack([np.asarray(z, np.float32) for z in fold_z])  # (K, M, X, Y, Z)
    mean = stack.mean(0)
    ratio = np.ones(stack.shape[1])
    common = np.logical_and.reduce([np.asarray(k, bool) for k in keeps])
    if len(stack) > 1 and common.sum() >= MIN_ENSEMBLE_VOXELS:
        for m in range(stack.shape[1]):
            folds = np.median([robust_spread(z[m][common]) for z in stack])
            together = robust_spread(mean[m][common])
            if folds > 0 and together > 0:
                ratio[m] = together / folds
    return (mean / ratio[:, None, None, None].astype(np.float32)).astype(np.float32), ratio


def robust_scale(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]):
    """(median, 1.4826 x MAD) of the score maps' values inside their masks; for maps with a leading
    axis (M, X, Y, Z), (locations, spreads) of each of the M maps."""
    if maps and np.ndim(maps[0]) == 4:
        pairs = [robust_scale([m[k] for m in maps], masks) for k in range(np.shape(maps[0])[0])]
        return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    values = np.concatenate([np.asarray(m, np.float64)[np.asarray(k) > 0] for m, k in zip(maps, masks)])
    if values.size == 0:
        raise InputValidationError("no brain voxel to put the scores on a common scale")
    location = float(np.median(values))
    spread = robust_spread(values, location)
    if not spread > 0:
        spread = float(np.std(values)) or 1.0
    return location, spread


def normaliser_of(model: nn.Module) -> ScoreNormaliser | None:
    """The network's score reference (:func:`bids_uad.models.get_model` attaches one to a network
    whose ``normative_space`` is ``template``), or None."""
    found = getattr(model, "normaliser", None)
    return found if isinstance(found, ScoreNormaliser) else None
