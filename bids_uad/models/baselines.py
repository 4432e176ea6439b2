"""Baseline detectors registered as models: what a neuroradiologist tries first.

Both take the same input as the networks (diffusion-weighted signal ratios on the model grid,
(B, C, X, Y, Z)) and are trained, calibrated, saved and run exactly like them; they are *fitted*
instead of optimised (``trainable = False``; see :func:`bids_uad.training.trainer.fit_fold`).

* :class:`MeanSignal` — ``1 − mean diffusion-weighted signal ratio``: a diffusivity detector with
  no training; only its threshold is calibrated on held-out controls.
* :class:`NormativeModel` — a voxelwise normative model of DTI metrics (FA, MD, mean
  diffusion-weighted ratio) from the training controls: per voxel a robust centre (median) and
  spread (1.4826 × MAD), pooled over a neighbourhood when the controls are few, smoothed; the
  score is the largest absolute robust z over the metrics.  Space (``model.normative_space``):
  ``"template"`` — each subject's metric maps are carried to a template grid with its own
  transforms (one resampling), fitted/z-scored there, and the z map comes back to the subject's
  grid with the inverse chain (the group level's setting for BIDS runs); ``"dwi"`` — the model
  grid in each subject's diffusion space, where correspondence is only the heads' alignment in
  their dwi grids (arrays without registrations: the array-level benchmark; older model files).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from bids_uad.algorithms.robust import MAD_TO_SD, nanmedian, neighbourhood
from bids_uad.algorithms.tensor import tensor_metrics_from_ratios
from bids_uad.errors import InputMissingError, InputValidationError
from bids_uad.models.settings import ModelSettings

#: metrics of the normative model, in buffer order
NORMATIVE_METRICS = ("fa", "md", "mdw")


class MeanSignal(nn.Module):
    """Score ``1 − mean_c x_c`` inside the brain (0 outside, where the input is 0)."""

    needs_ood = False
    trainable = False
    #: how this model learns, for the methods text (nipreps' ``__desc__``)
    __desc__ = ("a baseline detector scoring 1 minus the mean diffusion-weighted signal ratio (no training; "
                "only its threshold is calibrated on held-out controls)")

    def __init__(self, settings: ModelSettings):
        super().__init__()
        self.settings = settings
        self.register_buffer("version", torch.ones(1))  # a tensor so the model file is never empty

    def fit(self, data: Sequence[np.ndarray], masks: Sequence[np.ndarray], bvals=None, bvecs=None) -> None:
        """Nothing to learn."""

    @torch.no_grad()
    def score(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1)
        return torch.where(mean > 0, 1.0 - mean, torch.zeros_like(mean))


class TemplateGrid:
    """The template grid of a module whose ``settings`` (:class:`ModelSettings`) place it in template
    space: the normative model, and a network's score reference (:mod:`bids_uad.models.normaliser`)."""

    @property
    def template_shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.settings.normative_template_shape)

    @property
    def template_affine(self) -> np.ndarray:
        return np.asarray(self.settings.normative_template_affine, float).reshape(4, 4)


class NormativeModel(TemplateGrid, nn.Module):
    """Voxelwise robust z-scores of FA, MD and mean dw ratio against the training controls."""

    needs_ood = False
    trainable = False
    #: how this model learns, for the methods text (nipreps' ``__desc__``)
    __desc__ = ("a voxelwise normative model (the per-voxel median and median absolute deviation of FA, MD and "
                "the mean diffusion-weighted signal ratio over the training controls, pooled over a 3x3x3 "
                "neighbourhood when controls are few and smoothed, in template space: each subject's maps carried "
                "to the template with its own transforms in one resampling), scoring the largest absolute robust "
                "z-score, mapped back to diffusion space with the inverse transforms")
    #: the same for a model fitted on the model grid in each subject's diffusion space
    #: (``model.normative_space`` ``dwi``: array-level benchmarks and older model files)
    __desc_dwi__ = ("a voxelwise normative model (the per-voxel median and median absolute deviation of FA, MD and "
                    "the mean diffusion-weighted signal ratio over the training controls, pooled over a 3x3x3 "
                    "neighbourhood when controls are few and smoothed, on the model grid in each subject's "
                    "diffusion space, without registration), scoring the largest absolute robust z-score")

    @classmethod
    def describe(cls, model_settings: dict) -> str:
        """The methods clause for a model file's ``settings.model`` (its ``normative_space``)."""
        return cls.__desc_dwi__ if model_settings.get("normative_space", "dwi") == "dwi" else cls.__desc__

    def __init__(self, settings: ModelSettings):
        super().__init__()
        self.settings = settings
        c, m = settings.n_channels, len(NORMATIVE_METRICS)
        grid = self.template_shape if self.in_template else tuple(settings.grid)
        self.register_buffer("bvals", torch.zeros(c))
        self.register_buffer("bvecs", torch.zeros(c, 3))
        self.register_buffer("centre", torch.zeros((m,) + grid))
        self.register_buffer("spread", torch.ones((m,) + grid))
        self.register_buffer("valid", torch.zeros(grid))

    @property
    def in_template(self) -> bool:
        """Fitted on a template grid (``model.normative_space = "template"``), else on the model grid."""
        return self.settings.normative_space == "template"

    def _routes(self, routes, n: int) -> list:
        """The per-subject routes to the template (template space), checked; [None]*n on the model grid."""
        if not self.in_template:
            return [None] * n
        routes = list(routes) if routes is not None else []
        if len(routes) != n or any(r is None for r in routes):
            raise InputMissingError(
                f"the normative model lives in template space ({self.settings.normative_template}): every subject "
                "needs its transforms to the template (TemplateRoute); none given for "
                f"{sum(r is None for r in routes) + max(n - len(routes), 0)} of {n}")
        for r in routes:
            if r.template != self.settings.normative_template:
                raise InputValidationError(f"transforms to {r.template!r} given to a normative model fitted in "
                                           f"{self.settings.normative_template!r}")
        return routes

    def metrics(self, x: np.ndarray) -> np.ndarray:
        """(M, X, Y, Z) metric maps of one subject (C, X, Y, Z)."""
        maps = tensor_metrics_from_ratios(x, self.bvals.cpu().numpy(), self.bvecs.cpu().numpy())
        return np.stack([maps[k] for k in NORMATIVE_METRICS])

    def subject_maps(self, x: np.ndarray, brain: np.ndarray, route=None) -> tuple[np.ndarray, np.ndarray]:
        """(metric maps, where they are defined) of one subject in the model's space: its grid, or
        the template grid (carried there by ``route`` in one resampling, support-normalised)."""
        values = self.metrics(x).astype(np.float32)
        if route is None:
            return values, brain
        return route.forward(np.where(brain, values, 0), brain, self.template_shape, self.template_affine)

    def fit(self, data: Sequence[np.ndarray], masks: Sequence[np.ndarray], bvals: np.ndarray,
            bvecs: np.ndarray, routes: Sequence | None = None) -> None:
        """Robust per-voxel centre and spread of each metric over the controls ``data``;
        ``routes``: each control's :class:`~bids_uad.algorithms.registration.TemplateRoute`
        (template space only, where it is required)."""
        s = self.settings
        routes = self._routes(routes, len(data))
        self.bvals.copy_(torch.as_tensor(np.asarray(bvals, np.float32)))
        self.bvecs.copy_(torch.as_tensor(np.asarray(bvecs, np.float32).reshape(-1, 3)))
        stacks = []
        for d, mask, route in zip(data, masks, routes):
            inside = (np.asarray(mask) > 0) & (np.asarray(d).mean(0) > 0)
            values, inside = self.subject_maps(np.asarray(d), inside, route)
            values[:, ~inside] = np.nan
            stacks.append(values)
        centre, spread, valid = robust_voxel_stats(np.stack(stacks, 1), s)  # (M, n, X, Y, Z)
        self.centre.copy_(torch.as_tensor(centre))
        self.spread.copy_(torch.as_tensor(spread))
        self.valid.copy_(torch.as_tensor(valid.astype(np.float32)))

    def carry_back(self, maps: np.ndarray, support: np.ndarray, route, shape: Sequence[int]
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Template-grid ``maps`` (K, ...) defined where ``support``, back onto the grid of ``route``'s
        arrays (``shape``) with its inverse chain in one resampling, support-normalised (the route of
        the score map and of the controls' reference, :func:`controls_reference`)."""
        return route.backward(maps, support, self.template_affine, shape)

    @torch.no_grad()
    def score(self, x: torch.Tensor, routes: Sequence | None = None) -> torch.Tensor:
        """Largest |robust z| over the metrics (B, X, Y, Z); 0 outside the brain and the model.
        In template space z is computed there and carried back with each subject's route."""
        out = []
        centre, spread = self.centre.cpu().numpy(), self.spread.cpu().numpy()
        valid = self.valid.cpu().numpy() > 0
        arrays = x.detach().cpu().numpy()
        for xi, route in zip(arrays, self._routes(routes, len(arrays))):
            brain = xi.mean(0) > 0
            values, inside = self.subject_maps(xi, brain, route)
            defined = valid & inside
            z = np.where(defined, (np.abs(values - centre) / spread).max(0), 0).astype(np.float32)
            if route is not None:  # back to the subject's grid with the inverse chain
                z, defined = self.carry_back(z[None], defined, route, brain.shape)
                z = z[0]
            out.append(np.where(brain & defined, z, 0).astype(np.float32))
        return torch.from_numpy(np.stack(out)).to(x.device)


def controls_reference(models: Sequence[NormativeModel], route, shape: Sequence[int]
                       ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The controls' values of a template-space normative model on one subject's grid.

    ``models``: the fold models of one template-space normative model file (their centres and
    spreads averaged, where every fold defines them: together they have seen every control);
    ``route``: the subject's :class:`~bids_uad.algorithms.registration.TemplateRoute` for arrays of
    ``shape`` (its dwi image).  Returns {metric (:data:`NORMATIVE_METRICS`): (the controls' median,
    their robust spread 1.4826 x MAD, where both are defined on the subject's grid)}, carried back
    with :meth:`NormativeModel.carry_back` — the normative score's own route.
    """
    models = list(models)
    if not models or not all(isinstance(m, NormativeModel) and m.in_template for m in models):
        raise InputValidationError("the controls' reference needs the folds of a template-space normative model")
    valid = np.logical_and.reduce([m.valid.cpu().numpy() > 0 for m in models])
    centre = np.mean([m.centre.cpu().numpy() for m in models], 0)
    spread = np.mean([m.spread.cpu().numpy() for m in models], 0)
    stack = np.where(valid, np.concatenate([centre, spread]), 0).astype(np.float32)
    carried, defined = models[0].carry_back(stack, valid, route, shape)
    n = len(NORMATIVE_METRICS)
    return {key: (carried[i], carried[n + i], defined & (carried[n + i] > 0)) for i, key in enumerate(NORMATIVE_METRICS)}


def robust_voxel_stats(values: np.ndarray, settings: ModelSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-voxel robust centre (median) and spread (1.4826 x MAD) of ``values`` (M, n, X, Y, Z): M
    maps of n subjects, NaN where a subject has no value; the normative model's statistics.

    Fewer subjects than ``settings.normative_pool_below``: each voxel pools its neighbourhood's
    samples (half-width ``normative_pool_radius``).  Both maps are smoothed inside the voxels where
    they are defined (Gaussian sigma ``normative_smoothing`` voxels), and the spread is floored at a
    quarter of its median, so near-constant voxels give no huge z.  Returns (centre (M, X, Y, Z),
    spread (M, X, Y, Z), valid (X, Y, Z): defined for every map); outside ``valid`` centre is 0 and
    spread 1.
    """
    s = settings
    if values.shape[1] < s.normative_pool_below and s.normative_pool_radius > 0:
        values = neighbourhood(values, s.normative_pool_radius)
    with np.errstate(all="ignore"):
        centre = nanmedian(values, 1)
        spread = MAD_TO_SD * nanmedian(np.abs(values - centre[:, None]), 1)
    valid = np.isfinite(centre).all(0) & np.isfinite(spread).all(0)
    centre = np.stack([_smooth(c, valid, s.normative_smoothing) for c in centre])
    spread = np.stack([_smooth(v, valid, s.normative_smoothing) for v in spread])
    for k in range(len(spread)):  # a floor keeps near-constant voxels from giving huge z
        floor = 0.25 * float(np.median(spread[k][valid])) if valid.any() else 1.0
        spread[k] = np.maximum(spread[k], max(floor, 1e-12))
    return (np.where(valid, centre, 0).astype(np.float32), np.where(valid, spread, 1).astype(np.float32), valid)


def _smooth(image: np.ndarray, valid: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing normalised by the valid voxels' weight (no bleeding of the outside in)."""
    if sigma <= 0:
        return image
    w = ndimage.gaussian_filter(valid.astype(np.float64), sigma)
    v = ndimage.gaussian_filter(np.where(valid, image, 0).astype(np.float64), sigma)
    return np.where(valid, v / np.maximum(w, 1e-12), image).astype(np.float32)
