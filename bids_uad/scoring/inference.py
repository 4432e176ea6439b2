"""Inference for one subject and evaluation against a lesion mask.

* :func:`infer` — raw preprocessed dwi (with b0s) + gradient table + masks in diffusion
  space -> score map, p-value map (if calibrated), binary mask, all in the input's shape.
* :func:`infer_prepared` — the same from a :class:`~bids_uad.models.inputs.Prepared` subject.
* :func:`evaluate` — per-subject AUROC, AUPRC and Dice per threshold method, of the written
  (post-processed) map and before post-processing, plus oracle thresholds (reported apart).

The threshold method has one default, the one stored in the model file
(``settings.scoring.threshold_method``; the group level stores ``healthy-fpr``); an explicit
``method`` (``--threshold``) overrides it, and the result's ``info`` says which and why.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from bids_uad.algorithms.masking import dice
from bids_uad.errors import InputMissingError, InputValidationError
from bids_uad.models import FIXED_THRESHOLDS
from bids_uad.models.bundle import ModelBundle, brain_of, filtered_score, score_volume, signed_score
from bids_uad.models.settings import needs_template
from bids_uad.models.calibration import Calibration
from bids_uad.models.normaliser import ensemble_z, normaliser_of
from bids_uad.models.inputs import (Prepared, carry_to_template, from_grid, prepare_subject, route_on_grid, subject_grid,
                                    template_affine, template_route, to_grid)
from bids_uad.models.settings import THRESHOLD_METHODS, ScoringSettings
from bids_uad.scoring.metrics import auprc, auroc, dice_optimal_threshold, youden_threshold
from bids_uad.scoring.morphology import postprocess, postprocess_description
from bids_uad.scoring.thresholds import threshold_map


@dataclass
class InferenceResult:
    """Outputs in the input array's shape (diffusion space)."""

    score: np.ndarray  # float32, 0 outside the analysis mask
    pvalues: np.ndarray | None  # conformal p-values (1 outside the mask), None if uncalibrated
    mask: np.ndarray  # bool, thresholded, post-processed, inside the analysis mask: the written map
    mask_raw: np.ndarray  # bool, thresholded, before post-processing
    threshold: float
    method: str
    info: dict = field(default_factory=dict)  # provenance for the JSON sidecar


def score_grid(bundle: ModelBundle, data: np.ndarray, ensemble: bool = False, fold: int | None = None,
               route=None, details: dict | None = None) -> np.ndarray:
    """Score map on the grid: one fold (default: best validation loss) or the fold ensemble
    (``route``: the subject's route to the template, on the grid, for a template-space model).

    The ensemble of networks referred to their controls (:mod:`bids_uad.models.normaliser`) averages
    the folds' z maps before they are folded into a score and puts the mean back on one fold's null
    scale (:func:`~bids_uad.models.normaliser.ensemble_z`; ``details["ensemble_scale"]`` gets the
    ratio), so the out-of-fold calibration holds for it; other models' ensemble is the mean of the
    folds' scores, accumulated as a running sum (memory stays at two score maps whatever the number
    of folds; each fold's network is applied in turn, never all at once)."""
    folds = bundle.folds if ensemble else [bundle.folds[bundle.best_fold() if fold is None else fold]]
    torch.set_num_threads(max(1, bundle.settings.training.threads))
    if len(folds) > 1 and normaliser_of(folds[0].model) is not None:
        maps, keeps = zip(*(signed_score(f.model, data, route) for f in folds))
        mean, ratio = ensemble_z(maps, keeps)
        if details is not None:
            details["ensemble_scale"] = [round(float(r), 4) for r in ratio]
        return filtered_score(folds[0].model, normaliser_of(folds[0].model).fold(mean), brain_of(data))
    total = None
    for f in folds:
        s = score_volume(f.model, data, route=route).astype(np.float64)
        total = s if total is None else np.add(total, s, out=total)
    return (total / len(folds)).astype(np.float32)


def infer_prepared(bundle: ModelBundle, prepared: Prepared, analysis_mask: np.ndarray | None = None,
                   method: str | None = None, ensemble: bool | None = None, fold: int | None = None,
                   scoring: ScoringSettings | None = None, route=None) -> InferenceResult:
    """Score, threshold and post-process one prepared subject; map results back to its original shape.

    ``analysis_mask`` is in the original (diffusion-space) shape; default: the brain mask.
    ``method``: None uses the model file's threshold method.  ``ensemble``: None uses the model
    file's ``scoring.ensemble`` (mean score of all folds, or the best fold); an explicit ``fold``
    means that single fold.  ``scoring`` overrides the bundle's scoring settings (threshold
    method, FPR, q, post-processing, ensemble).  ``route``: the subject's
    :class:`~bids_uad.algorithms.registration.TemplateRoute` for its *original* (diffusion-space)
    array, required by a template-space model (:func:`~bids_uad.models.bundle.needs_template`).
    """
    scoring = scoring or bundle.settings.scoring
    if needs_template(bundle.settings.model):
        check_route(bundle, route)
        route = route_on_grid(route, prepared.grid_map)
    if ensemble is None:
        ensemble = scoring.ensemble and fold is None
    source = "requested (--threshold)" if method else "model file (the default; set at the group level)"
    if method == "fixed" and scoring.fixed_threshold is None and bundle.name not in FIXED_THRESHOLDS:
        method, source = None, f"model file (--threshold fixed has no reference value for {bundle.name})"
    method = method or scoring.threshold_method
    gm = prepared.grid_map
    amask = prepared.mask if analysis_mask is None else to_grid(np.asarray(analysis_mask) > 0, gm.grid)[0]
    details: dict = {}
    score = np.where(amask, _score_subject(bundle, prepared, ensemble, fold, route, details), 0).astype(np.float32)
    cal: Calibration | None = bundle.calibration(ensemble=ensemble, fold=fold)
    pvals = None if cal is None else np.where(amask, cal.pvalues(score), 1).astype(np.float32)
    binary, t = threshold_map(score, amask, method, bundle.name, scoring, cal, pvals)
    written = postprocess(binary, scoring) & amask
    info = {"model": bundle.name, "model_file": None if bundle.path is None else str(bundle.path),
            "model_sha256": bundle.file_hash, "threshold_method": method, "threshold": t,
            "threshold_source": source, "threshold_reason": _reason(method, scoring, cal),
            "postprocessing": postprocess_description(scoring),
            "opening_size": scoring.opening_size if scoring.postprocess == "opening" else None,
            "min_cluster_voxels": scoring.min_cluster_voxels if scoring.postprocess == "cluster" else None,
            "ensemble": ensemble,
            "folds": [f.fold for f in bundle.folds] if ensemble else [bundle.best_fold() if fold is None else fold],
            **({"ensemble_scale": details["ensemble_scale"]} if "ensemble_scale" in details else {}),
            "gradient_reconciliation": prepared.method, "grid_map": gm.to_dict(),
            **({"model_space": bundle.settings.model.normative_template} if route is not None else {}),
            **({"network_grid": f"{bundle.settings.model.normative_template} (the subject carried there and its score "
                                "back)"} if bundle.settings.model.network_space == "template" else {}),
            "calibration": None if cal is None else (
                "out-of-fold: every training control, scored by the fold that held it out"
                if fold is None and bundle.out_of_fold is not None
                else f"the held-out controls of fold {bundle.best_fold() if fold is None else fold}"
                if not ensemble else "the folds' held-out controls pooled"),
            "fpr": scoring.fpr if method == "healthy-fpr" else None,
            "fdr_q": scoring.fdr_q if method == "fdr" else None,
            "finding_min_volume_ml": finding_min_volume(method, scoring, cal)}
    return InferenceResult(from_grid(score, gm), None if pvals is None else from_grid(pvals, gm, fill=1.0),
                           from_grid(written, gm), from_grid(binary, gm), t, method, info)


def _score_subject(bundle: ModelBundle, prepared: Prepared, ensemble: bool, fold: int | None, route,
                   details: dict) -> np.ndarray:
    """:func:`score_grid` of a prepared subject, on its grid (``route``: its TemplateRoute there).  A network
    on the template grid scores the subject carried there (one linear resampling) and its score comes back
    to the subject's grid through the inverse chain (one more), 0 where it does not land."""
    model = bundle.settings.model
    if model.network_space != "template":
        return score_grid(bundle, prepared.data, ensemble, fold, route, details)
    data, brain, _ = carry_to_template(prepared.data, prepared.mask, route, model)
    score = score_grid(bundle, data, ensemble, fold, template_route(model), details)
    back, landed = route.backward(score[None], brain, template_affine(model), prepared.grid_map.grid)
    return np.where(landed & prepared.mask, back[0], 0).astype(np.float32)


def check_route(bundle: ModelBundle, route) -> None:
    """A template-space model needs the subject's transforms to its template: refuse without them
    (no fallback: scored in another space it would be a detector its threshold was not calibrated for)."""
    want = bundle.settings.model.normative_template
    if route is None:
        raise InputMissingError(f"the {bundle.name} model works in template space ({want}): the subject's "
                                "transforms to the template and back are needed")
    if route.template != want:
        raise InputValidationError(f"the {bundle.name} model was fitted in {want}; the subject's transforms "
                                   f"go to {route.template}")


def finding_min_volume(method: str, scoring: ScoringSettings, cal: Calibration | None) -> float | None:
    """The calibrated smallest finding (mL) when the written map uses the threshold it was
    calibrated at (healthy-fpr at the calibrated target), else ``None`` (then the
    post-processing's ``min_cluster_ml`` is the smallest finding)."""
    if (method == "healthy-fpr" and cal is not None and cal.level is not None and cal.target_fpr is not None
            and np.isclose(cal.target_fpr, scoring.fpr) and cal.finding_min_ml is not None):
        return max(float(cal.finding_min_ml), float(scoring.min_cluster_ml))
    return None


def _reason(method: str, scoring: ScoringSettings, cal: Calibration | None) -> str:
    """Why this threshold: one line for the sidecar."""
    if method == "healthy-fpr":
        if cal is not None and cal.level is not None and np.isclose(cal.target_fpr, scoring.fpr):
            return (f"calibrated on held-out controls so that the written map (after post-processing) flags "
                    f"{scoring.fpr:g} of healthy analysis-mask voxels (voxel-wise level {cal.level:.4g})")
        return f"voxel-wise order statistic flagging {scoring.fpr:g} of held-out healthy voxels before post-processing"
    if method == "fdr":
        return f"Benjamini-Hochberg at q = {scoring.fdr_q:g} on conformal p-values from held-out controls"
    if method == "fixed":
        return "the reference's fixed threshold on its score scale (not calibrated on this study)"
    reasons = {"otsu": "Otsu's threshold of this subject's scores (not calibrated)",
               "meanpool": f"maximum of the local {scoring.meanpool_size}^3 mean score (the reference's eq. 3)"}
    return reasons.get(method, "")


def prepare_for(bundle: ModelBundle, dwi: np.ndarray, bvals: np.ndarray, bvecs: np.ndarray,
                brain_mask: np.ndarray) -> Prepared:
    """A preprocessed dwi (X, Y, Z, N with b0s) on ``bundle``'s grid (a network on the template grid: its
    own, :func:`~bids_uad.models.inputs.subject_grid`), in its input representation and its reference
    gradients' order."""
    m = bundle.settings.model
    return prepare_subject(dwi, bvals, bvecs, brain_mask, subject_grid(m, np.shape(dwi)), bundle.ref_bvals,
                           bundle.ref_bvecs, m.inputs, m.invariant_sh_order)


def infer(bundle: ModelBundle, dwi: np.ndarray, bvals: np.ndarray, bvecs: np.ndarray, brain_mask: np.ndarray,
          analysis_mask: np.ndarray | None = None, method: str | None = None, ensemble: bool | None = None,
          fold: int | None = None, scoring: ScoringSettings | None = None, route=None) -> InferenceResult:
    """Full inference from a preprocessed dwi (X, Y, Z, N with b0s) in diffusion space (``route``:
    the dwi's :class:`~bids_uad.algorithms.registration.TemplateRoute`, for a template-space model)."""
    prepared = prepare_for(bundle, dwi, bvals, bvecs, brain_mask)
    if analysis_mask is not None and np.shape(analysis_mask) != np.shape(brain_mask):
        raise InputValidationError("analysis mask and brain mask differ in shape")
    return infer_prepared(bundle, prepared, analysis_mask, method, ensemble, fold, scoring, route)


def evaluate(score: np.ndarray, truth: np.ndarray, analysis_mask: np.ndarray, model_name: str,
             scoring: ScoringSettings, calibration: Calibration | None = None,
             methods: tuple[str, ...] = THRESHOLD_METHODS) -> dict:
    """Per-subject metrics inside ``analysis_mask``.

    Returns ``{"auroc", "auprc", "dice": {method: . before post-processing}, "dice_written":
    {method: . of the written map}, "thresholds": {method: .}, "fpr": {method: fraction of
    non-lesion voxels flagged before post-processing}}``; oracle methods (``oracle-youden``, ``oracle-dice``) use the
    ground truth and appear under the same keys with their ``oracle-`` prefix.
    """
    amask = np.asarray(analysis_mask, bool)
    truth = np.asarray(truth, bool) & amask
    s, y = score[amask], truth[amask]
    out = {"auroc": auroc(s, y), "auprc": auprc(s, y), "dice": {}, "dice_written": {}, "thresholds": {},
           "fpr": {}}
    pvals = None if calibration is None else calibration.pvalues(score)
    for m in methods:
        if m in ("healthy-fpr", "fdr") and calibration is None:
            continue
        if m == "fixed" and scoring.fixed_threshold is None and model_name not in FIXED_THRESHOLDS:
            continue  # the baselines have no reference threshold
        binary, t = threshold_map(score, amask, m, model_name, scoring, calibration, pvals)
        _record(out, m, binary, t, truth, amask, scoring)
    if y.any() and (~y).any():
        for m, fn in (("oracle-youden", youden_threshold), ("oracle-dice", dice_optimal_threshold)):
            t = fn(s, y)
            _record(out, m, (score > t) & amask, t, truth, amask, scoring)
    return out


def _record(out, name, binary, t, truth, amask, scoring):
    healthy = amask & ~truth
    out["fpr"][name] = float(binary[healthy].mean()) if healthy.any() else float("nan")
    out["dice"][name] = dice(binary, truth)
    out["dice_written"][name] = dice(postprocess(binary, scoring) & amask, truth)
    out["thresholds"][name] = float(t)
