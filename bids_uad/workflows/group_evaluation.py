"""Group level: every model next to the baselines, by the protocol of :mod:`bids_uad.scoring.evaluation`.

Patients are the non-control subjects with a dwi-space lesion mask (``--lesion-masks``), scored
by each model's default (best) fold and its written map (the model file's threshold method).
The controls are scored out of fold (each by the fold that held it out), so the subject-level
AUROC compares patients with controls no model saw in training; their written maps are
thresholded by a calibration each took no part in (:func:`control_cases`), so their
false-positive rate and findings are held-out figures.
The one-line detectors ``1 − FA`` and ``MD`` are computed on the same voxels.

Writes ``group/detection_summary.tsv`` (one row per detector), ``group/detection_groups.tsv``
(per lesion-volume stratum and lesion type), ``group/detection_prcurves.tsv`` (pooled
precision-recall curves) and ``group/detection_histograms.tsv`` (score densities, lesion vs
healthy tissue) for the group report.
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from bids_uad.bids.derivatives import write_tsv
from bids_uad.bids.lesions import find_lesion_instances, find_lesion_mask
from bids_uad.errors import InputValidationError
from bids_uad.models.settings import needs_template

LOGGER = logging.getLogger("bids_uad.group")
SUMMARY_KEYS = ("auprc", "auprc_sd", "auroc", "auroc_sd", "dice_calibrated", "dice_calibrated_sd", "dice_oracle",
                "dice_oracle_sd", "subject_auroc", "heldout_control_fpr", "heldout_control_fpr_sd",
                "lesion_detection_rate", "n_lesions", "false_findings_per_patient", "false_findings_per_control",
                "n_patients", "n_controls")


def load_with_lesion_mask(settings, found) -> tuple[dict, Path] | None:
    """A subject's preprocessed arrays with ``truth`` (its dwi-space lesion mask, checked against the
    dwi grid) and the mask's path; None without a lesion mask."""
    import nibabel as nib

    lesion = find_lesion_mask(settings.lesion_masks, found.subject, found.session, space="dwi")
    if lesion is None:
        return None
    arrays = found.load()
    truth = np.asarray(nib.load(str(lesion)).dataobj) > 0
    if truth.shape != arrays["brain_mask"].shape:
        raise InputValidationError(
            f"lesion mask shape {truth.shape} differs from the dwi grid {arrays['brain_mask'].shape}", lesion)
    arrays["truth"] = truth
    return arrays, lesion


def load_patients(settings, candidates: list) -> list[dict]:
    """Arrays and truth of every candidate (a non-control's baseline derivatives) with a dwi-space
    lesion mask, loaded once for every model's evaluation (``subject``, ``session``, ``truth``,
    ``instances``, ``types`` added)."""
    import nibabel as nib

    out = []
    for found in candidates:
        loaded = load_with_lesion_mask(settings, found)
        if loaded is None:
            continue
        arrays, lesion = loaded
        arrays.update(subject=found.subject, session=found.session, instances=None, types={})
        instances = find_lesion_instances(lesion)
        if instances is not None:
            arrays["instances"] = np.asarray(nib.load(str(instances[0])).dataobj).astype(np.int32)
            with open(instances[1], newline="") as fh:
                arrays["types"] = {int(r["index"]): r.get("type") or "lesion"
                                   for r in csv.DictReader(fh, delimiter="\t")}
        out.append(arrays)
    return out


def _voxel_ml(arrays: dict) -> float:
    return float(np.prod(arrays["header"].get_zooms()[:3])) / 1000.0


def _finding_min_ml(bundle) -> float:
    """The smallest finding of ``bundle`` as participant-level inference sizes it."""
    from bids_uad.scoring.inference import finding_min_volume

    scoring = bundle.settings.scoring
    calibrated = finding_min_volume(scoring.threshold_method, scoring, bundle.calibration(ensemble=scoring.ensemble))
    return scoring.min_cluster_ml if calibrated is None else calibrated


def _case(arrays: dict, score, written=None, bundle=None):
    """A :class:`Case`; ``bundle``: the model whose minimum finding volume sizes the findings."""
    from bids_uad.scoring.evaluation import Case
    from bids_uad.scoring.findings import min_finding_voxels

    amask = arrays["analysis_mask"]
    voxel_ml = _voxel_ml(arrays)
    min_voxels = 1 if bundle is None else min_finding_voxels(_finding_min_ml(bundle), voxel_ml)
    return Case(arrays.get("subject", ""), np.where(amask, score, 0), amask, written, arrays.get("truth"),
                arrays.get("instances"), arrays.get("types", {}), voxel_ml, min_voxels)


def control_cases(bundle, scored: list[tuple[dict, object, int]]) -> list:
    """Cases of the controls scored out of fold (``scored``: arrays, inference result, fold).

    With the healthy-fpr threshold (the default) each control's written map and smallest finding
    are *cross-fitted* (:func:`~bids_uad.models.calibration.cross_fitted`): calibrated on the
    controls the model's calibration pools in its place, without it: the other folds' held-out
    controls for an out-of-fold or pooled calibration, the other held-out controls of its own fold
    for a fold's own calibration (a fold that held out one control gives it no written map).  Its
    false-positive rate and findings are then those of a healthy subject that calibrated nothing.
    Other threshold methods calibrate nothing on the controls: their written maps are kept.
    """
    from bids_uad.models.calibration import cross_fitted
    from bids_uad.scoring.findings import min_finding_voxels
    from bids_uad.scoring.morphology import postprocess

    scoring = bundle.settings.scoring
    if scoring.threshold_method != "healthy-fpr" or not scored:
        return [_case(arrays, res.score, res.mask, bundle) for arrays, res, _ in scored]
    pooled = bundle.out_of_fold is not None or scoring.ensemble
    folds = [fold for _, _, fold in scored]
    subjects = [arrays.get("subject", id(arrays)) for arrays, _, _ in scored]
    # never the control itself: with training.repeats a control is held out (and scored) once per split
    peers = [[j for j, other in enumerate(folds) if (other != fold if pooled else other == fold) and subjects[j] != subject]
             for fold, subject in zip(folds, subjects)]
    amasks = [np.asarray(arrays["analysis_mask"]) > 0 for arrays, _, _ in scored]
    maps = [np.where(m, res.score, 0) for (_, res, _), m in zip(scored, amasks)]
    voxel_ml = _voxel_ml(scored[0][0])
    post = lambda b: postprocess(b, scoring)  # noqa: E731
    cals = cross_fitted(maps, amasks, peers, scoring.fpr, post, voxel_ml, scoring.max_null_samples,
                        bundle.settings.training.seed, scoring.finding_familywise, groups=subjects)
    cases = []
    for (arrays, res, _), score, amask, cal in zip(scored, maps, amasks, cals):
        case = _case(arrays, score)
        if cal is not None:
            case.written = post((score > cal.threshold(cal.level)) & amask) & amask
            case.min_finding_voxels = min_finding_voxels(
                scoring.min_cluster_ml if cal.finding_min_ml is None else cal.finding_min_ml, case.voxel_ml)
        cases.append(case)
    return cases


def can_score(bundle, arrays: dict) -> bool:
    """Whether ``bundle`` can score this loaded subject: a template-space model needs its route
    (``arrays["route"]``); without one the subject is left out of that model's evaluation, with a warning."""
    if not needs_template(bundle.settings.model) or arrays.get("route") is not None:
        return True
    LOGGER.warning("sub-%s: no transforms to %s and back: left out of the %s evaluation", arrays.get("subject"),
                   bundle.settings.model.normative_template, bundle.name)
    return False


def evaluate_detectors(settings, patients: list[dict], bundles: list, control_items: list[dict],
                       control_subjects: list[str], group_dir: Path,
                       patient_results: dict[str, list] | None = None) -> dict | None:
    """Evaluate every bundle and the one-line detectors; write the group/detection_*.tsv tables.

    ``patients``: :func:`load_patients` of the non-controls.  ``control_items`` are the loaded
    derivatives of the training controls ``control_subjects`` (the order of the bundles'
    ``subjects``).  ``patient_results``: {model: the patients' :class:`InferenceResult`} already
    computed (by ``evaluate_bundle``), so no patient is scored twice; a model missing there is
    scored here.  Returns {detector: results}, or None without patients.
    """
    from bids_uad.scoring.evaluation import evaluate_detector, one_line_detectors, pr_curve, score_histograms
    from bids_uad.scoring.inference import infer
    from bids_uad.models.inputs import normalise_dwi

    patient_results = patient_results or {}
    if not patients:
        LOGGER.info("no subject with a dwi-space lesion mask: detection evaluation skipped")
        return None
    for item, subject in zip(control_items, control_subjects):
        item["subject"] = subject
    cases: dict[str, dict[str, list]] = {}
    for bundle in bundles:
        entry = cases.setdefault(bundle.name, {"patients": [], "controls": []})
        done = patient_results.get(bundle.name)
        for k, arrays in enumerate(patients):
            if not can_score(bundle, arrays):  # a template-space model without the patient's transforms
                continue
            res = done[k] if done is not None else infer(bundle, arrays["dwi"], arrays["bvals"], arrays["bvecs"],
                                                         arrays["brain_mask"], arrays["analysis_mask"],
                                                         route=arrays.get("route"))
            entry["patients"].append(_case(arrays, res.score, res.mask, bundle))
        scored = []  # (arrays, out-of-fold result, fold) of each control
        for fold in bundle.folds:
            for i in fold.val_idx:
                subject = bundle.subjects[i]
                arrays = control_items[control_subjects.index(subject)] if subject in control_subjects else None
                if arrays is None:
                    continue
                res = infer(bundle, arrays["dwi"], arrays["bvals"], arrays["bvecs"], arrays["brain_mask"],
                            arrays["analysis_mask"], fold=fold.fold, route=arrays.get("route"))
                scored.append((arrays, res, fold.fold))
        entry["controls"] = control_cases(bundle, scored)
    for name in ("1-FA", "MD"):
        cases[name] = {"patients": [], "controls": []}
    for group, items in (("patients", patients), ("controls", control_items)):
        for arrays in items:
            ratios, bv, bc = normalise_dwi(arrays["dwi"], arrays["bvals"], arrays["bvecs"], arrays["brain_mask"])
            for name, score in one_line_detectors(ratios, bv, bc, arrays["brain_mask"]).items():
                cases[name][group].append(_case(arrays, score))
    results = {name: evaluate_detector(c["patients"], c["controls"]) for name, c in cases.items()}
    write_tsv(group_dir / "detection_summary.tsv",
              [{"detector": name, **{k: r.get(k) for k in SUMMARY_KEYS}} for name, r in results.items()])
    write_tsv(group_dir / "detection_groups.tsv", [
        {"detector": name, "grouping": grouping.replace("by_", ""), "group": g, **values}
        for name, r in results.items() for grouping in ("by_volume", "by_type") for g, values in r[grouping].items()])
    curves, hists = [], []
    for name, c in cases.items():
        recall, precision = pr_curve(c["patients"])
        curves += [{"detector": name, "recall": float(a), "precision": float(b)} for a, b in zip(recall, precision)]
        centres, lesion, healthy = score_histograms(c["patients"])
        hists += [{"detector": name, "score": float(x), "lesion_density": float(a), "healthy_density": float(b)}
                  for x, a, b in zip(centres, lesion, healthy)]
    write_tsv(group_dir / "detection_prcurves.tsv", curves)
    write_tsv(group_dir / "detection_histograms.tsv", hists)
    for name, r in results.items():
        LOGGER.info("%s: AUPRC %.3f, AUROC %.3f, Dice (written map) %s, subject AUROC %.3f", name, r["auprc"],
                    r["auroc"], "n/a" if not np.isfinite(r["dice_calibrated"]) else f"{r['dice_calibrated']:.3f}",
                    r["subject_auroc"])
        if np.isfinite(r.get("lesion_detection_rate", float("nan"))):
            rates = [f"{row['written_fpr']:.4f}" for row in r["per_subject"] if row.get("written_fpr") is not None]
            LOGGER.info("%s: lesion-wise detection rate %.2f (%d lesions), false findings %.2f per patient, findings per held-out "
                        "control %s, written-map false-positive rate per held-out control [%s]", name,
                        r["lesion_detection_rate"], r["n_lesions"], r["false_findings_per_patient"],
                        r.get("control_findings"), ", ".join(rates))
    return results
