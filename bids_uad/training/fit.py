"""Group-level training entry points: train and calibrate every fold, return a :class:`ModelBundle`.

* :func:`train_model` — arrays already on the grid (from :func:`prepare_subject`).
* :func:`train_from_dwi` — raw preprocessed dwi arrays with their gradient tables.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

from bids_uad.errors import InputMissingError, InputValidationError
from bids_uad.models import is_trainable
from bids_uad.models.normaliser import normaliser_of
from bids_uad.models.bundle import ModelBundle
from bids_uad.models.inputs import (carry_to_template, controls_box, dw_gradients, prepare_subject, route_on_grid,
                                    sized_to_inputs, subject_grid, template_route, to_grid)
from bids_uad.models.io import data_hash
from bids_uad.models.settings import Settings
from bids_uad.training import distributed
from bids_uad.training.trainer import calibrate_out_of_fold, train_folds

LOG = logging.getLogger(__name__)


def train_model(settings: Settings, data: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                subjects: Sequence[str], ref_bvals: np.ndarray, ref_bvecs: np.ndarray,
                analysis_masks: Sequence[np.ndarray] | None = None,
                checkpoint_dir: str | Path | None = None, routes: Sequence | None = None) -> ModelBundle:
    """Train and calibrate all folds on control arrays (C, X, Y, Z) already on the model grid.

    ``ref_bvals``/``ref_bvecs`` describe the channels (b0s removed) and are stored so that
    inference can reconcile other protocols.  ``analysis_masks`` (default: brain masks)
    select the healthy voxels used for calibration.  Each fold calibrates on its held-out
    controls; for the fitted baselines, and networks whose score is referred to the controls' in
    template space (:mod:`bids_uad.models.normaliser`, fitted in :func:`train_folds`), the bundle's
    default calibration pools every control's out-of-fold scores (:func:`calibrate_out_of_fold`);
    other networks use their best fold's own.
    ``routes``: each control's :class:`~bids_uad.algorithms.registration.TemplateRoute` for the
    arrays on the grid (required by a model that works in template space, else unused).
    """
    if len(subjects) != len(data):
        raise InputValidationError(f"{len(subjects)} subject labels for {len(data)} arrays")
    if len(set(subjects)) != len(subjects):
        raise InputValidationError("subject labels must be unique")
    sized = sized_to_inputs(settings.model, ref_bvals)
    if sized != settings.model:
        raise InputValidationError(
            f"{len(ref_bvals)} reference b-values give {sized.n_channels} {settings.model.inputs} input channels "
            f"({sized.feature_channels} features) but the model has {settings.model.n_channels} "
            f"({settings.model.feature_channels})")
    scores: dict = {}
    folds = train_folds(settings, data, masks, analysis_masks, checkpoint_dir,
                        gradients=(np.asarray(ref_bvals, float), np.asarray(ref_bvecs, float)),
                        heldout_scores=scores, routes=routes)
    pooled = None
    # pooling needs fold models that share a score scale: the fitted baselines (robust statistics of
    # overlapping control sets) and networks with a score reference (robust z) do; separately
    # trained networks' raw scores need not (docs/models.md, measured)
    shared_scale = not is_trainable(settings.model.name) or normaliser_of(folds[0].model) is not None
    if (shared_scale and distributed.rank() == 0
            and all(f.calibration is not None for f in folds)):
        pooled = calibrate_out_of_fold(settings, folds, data, masks if analysis_masks is None else analysis_masks,
                                       scores, routes)
    return ModelBundle(settings, folds, np.asarray(ref_bvals, float), np.asarray(ref_bvecs, float),
                       list(subjects), data_hash(data), out_of_fold=pooled)


def train_from_dwi(settings: Settings, dwis: Sequence[np.ndarray], bvals: Sequence[np.ndarray],
                   bvecs: Sequence[np.ndarray], masks: Sequence[np.ndarray], subjects: Sequence[str],
                   analysis_masks: Sequence[np.ndarray] | None = None,
                   checkpoint_dir: str | Path | None = None, routes: Sequence | None = None) -> ModelBundle:
    """Like :func:`train_model` from raw preprocessed dwi (with b0s) in diffusion space.

    The first subject's diffusion-weighted gradient table is the reference; the others are
    reconciled to it (permutation or SH resampling; a different b-value raises).
    ``settings.model.n_channels`` is sized here to the input representation
    (``settings.model.inputs``): the dw volumes, or the invariant features of the shells.
    ``routes``: each control's :class:`~bids_uad.algorithms.registration.TemplateRoute` for its dwi
    image (affine of the dwi); moved here onto the model grid that overlays it.  A network on the
    template grid (``network_space = "template"``) trains on every control carried there through its
    route (:func:`~bids_uad.models.inputs.carry_to_template`; routes required), and everything after
    (score reference, calibration) works on those template-grid arrays.
    """
    if len(dwis) < 3:
        raise InputValidationError(f"training needs at least 3 control subjects, got {len(dwis)}")
    ref_bvals, ref_bvecs = dw_gradients(bvals[0], bvecs[0])
    m = settings.model
    settings = replace(settings, model=sized_to_inputs(m, ref_bvals))
    prepared = [prepare_subject(d, bv, bc, mk, subject_grid(settings.model, np.shape(d)), ref_bvals, ref_bvecs,
                                m.inputs, m.invariant_sh_order)
                for d, bv, bc, mk in zip(dwis, bvals, bvecs, masks)]
    amasks = None
    if analysis_masks is not None:
        amasks = [to_grid(np.asarray(a) > 0, p.grid_map.grid)[0] for a, p in zip(analysis_masks, prepared)]
    if routes is not None:
        routes = [route_on_grid(r, p.grid_map) for r, p in zip(routes, prepared)]
    data, brains = [p.data for p in prepared], [p.mask for p in prepared]
    if settings.model.network_space == "template":  # every control carried to the template grid, once
        if routes is None or any(r is None for r in routes):
            raise InputMissingError(f"the {m.name} network works on the {m.normative_template} grid: every "
                                    "control's transforms to the template are needed")
        settings = replace(settings, model=controls_box(settings.model, brains, routes))
        LOG.info("%s works on the %s grid %s where the controls' brains land", m.name, m.normative_template,
                 settings.model.grid)
        carried = [carry_to_template(d, b, r, settings.model, None if amasks is None else a)
                   for d, b, r, a in zip(data, brains, routes, amasks or [None] * len(data))]
        data, brains = [c[0] for c in carried], [c[1] for c in carried]
        amasks = None if amasks is None else [c[2] for c in carried]
        routes = [template_route(settings.model)] * len(data)
    return train_model(settings, data, brains, subjects, ref_bvals, ref_bvecs, amasks, checkpoint_dir, routes)
