"""The detection-evaluation protocol shared by the group level and ``benchmarks/models.py``.

Every detector — trained models, the registered baselines and the one-line detectors
``1 − FA`` and ``MD`` — is evaluated by the same code on the same voxels (each subject's
analysis mask):

* voxel level, per patient (mean ± SD over patients): AUPRC (the primary figure: lesions are a
  few percent of the voxels, where AUROC alone flatters), AUROC, Dice of the written map
  (calibrated threshold, after post-processing) and, apart, the oracle Dice (best threshold on
  the truth, before post-processing: an upper bound, not a method);
* subject level: AUROC of patients against held-out controls from each subject's 99th-percentile
  score in the analysis mask;
* held-out controls: the fraction of their analysis mask flagged in the written map;
* lesion-wise (the view UAD papers give beside voxel metrics): the fraction of all patients' lesions
  a *finding* overlaps (a finding: a 26-connected cluster of the written map of at least the
  model's minimum finding volume, :mod:`bids_uad.scoring.findings`), the findings per patient that
  overlap no lesion, and the findings per held-out control (every one of them false);
* per lesion-volume stratum (< 5, 5–20, > 20 mL) and per lesion type: AUPRC/AUROC on the voxels of
  those lesions against the subject's healthy voxels, and the fraction of those lesions the
  written map touches.  Lesion instances and types come from the truth's
  ``*_desc-lesions_dseg`` image and table when present, else from the connected components of
  the lesion mask (type ``lesion``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from bids_uad.algorithms.masking import dice
from bids_uad.algorithms.robust import masked_median_filter
from bids_uad.models.settings import SCORE_MEDIAN
from bids_uad.scoring.findings import lesion_wise
from bids_uad.scoring.metrics import _sweep, auprc, auroc

VOLUME_STRATA = (("<5 mL", 0.0, 5.0), ("5-20 mL", 5.0, 20.0), (">20 mL", 20.0, np.inf))
SUBJECT_PERCENTILE = 99.0


@dataclass
class Case:
    """One subject's map from one detector, with its truth (patients) or without (controls)."""

    subject: str
    score: np.ndarray  # float map; only voxels inside ``amask`` are used
    amask: np.ndarray  # bool analysis mask
    written: np.ndarray | None = None  # the written binary map (None: an uncalibrated detector)
    truth: np.ndarray | None = None  # bool lesion mask (patients)
    instances: np.ndarray | None = None  # int lesion ids (0 none); default: components of truth
    types: dict[int, str] = field(default_factory=dict)  # lesion id -> type
    voxel_ml: float = 0.001
    min_finding_voxels: int = 1  # smallest finding of the written map (the model's minimum volume)

    def lesions(self) -> tuple[np.ndarray, dict[int, str]]:
        """(instance labels inside the truth, id -> type)."""
        if self.instances is not None:
            labels = np.where(self.truth, self.instances, 0).astype(np.int32)
            return labels, {int(i): self.types.get(int(i), "lesion") for i in np.unique(labels) if i}
        labels, n = ndimage.label(self.truth, structure=np.ones((3, 3, 3), bool))
        return labels, {i: "lesion" for i in range(1, n + 1)}


def _mean_sd(values) -> tuple[float, float, int]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
    if not v.size:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def oracle_dice(score: np.ndarray, truth: np.ndarray) -> float:
    """Best Dice over all thresholds of ``score`` (flag ``score >= t``) against ``truth``."""
    truth = np.asarray(truth, bool)
    if not truth.any():
        return float("nan")
    _, tp, fp = _sweep(np.asarray(score, float).ravel(), truth.ravel())
    return float(np.max(2 * tp / (truth.sum() + tp + fp)))


def subject_score(case: Case) -> float:
    """The subject-level score: the 99th percentile of the map in the analysis mask."""
    inside = case.score[case.amask]
    return float(np.percentile(inside, SUBJECT_PERCENTILE)) if inside.size else float("nan")


def _group_metrics(patients: list[Case], key) -> dict[str, dict]:
    """Per group of lesions (``key(volume_ml, type)`` -> group name): AUPRC/AUROC on those lesions'
    voxels against healthy voxels (mean over patients) and the written map's detection rate."""
    per: dict[str, dict[str, list]] = {}
    for case in patients:
        labels, types = case.lesions()
        healthy = case.amask & ~case.truth
        groups: dict[str, list[int]] = {}
        for i, kind in types.items():
            volume = float((labels == i).sum()) * case.voxel_ml
            groups.setdefault(key(volume, kind), []).append(i)
        for name, ids in groups.items():
            lesion = np.isin(labels, ids) & case.amask
            entry = per.setdefault(name, {"auprc": [], "auroc": [], "detected": [], "volume_ml": []})
            if lesion.any():
                sel = healthy | lesion
                entry["auprc"].append(auprc(case.score[sel], lesion[sel]))
                entry["auroc"].append(auroc(case.score[sel], lesion[sel]))
            for i in ids:
                entry["volume_ml"].append(float((labels == i).sum()) * case.voxel_ml)
                if case.written is not None:
                    entry["detected"].append(float((case.written & (labels == i)).any()))
    out = {}
    for name, entry in per.items():
        out[name] = {"auprc": _mean_sd(entry["auprc"])[0], "auroc": _mean_sd(entry["auroc"])[0],
                     "detection_rate": _mean_sd(entry["detected"])[0], "n_lesions": len(entry["volume_ml"]),
                     "median_volume_ml": float(np.median(entry["volume_ml"])) if entry["volume_ml"] else float("nan")}
    return out


def volume_stratum(volume_ml: float) -> str:
    """The lesion-volume stratum's name."""
    return next(name for name, lo, hi in VOLUME_STRATA if lo <= volume_ml < hi)


def evaluate_detector(patients: list[Case], controls: list[Case]) -> dict:
    """All figures of the protocol for one detector; see the module docstring.

    Returns ``auprc``, ``auroc``, ``dice_calibrated``, ``dice_oracle`` (means over patients, each
    with ``<key>_sd``), ``subject_auroc``, ``heldout_control_fpr``, ``by_volume`` and ``by_type``
    ({group: {auprc, auroc, detection_rate, n_lesions, median_volume_ml}}), ``n_patients``,
    ``n_controls`` and ``per_subject`` rows.
    """
    rows = []
    for case in patients:
        s, y = case.score[case.amask], case.truth[case.amask]
        rows.append({"subject": case.subject, "auprc": auprc(s, y), "auroc": auroc(s, y),
                     "dice_calibrated": None if case.written is None else dice(case.written & case.amask,
                                                                                case.truth & case.amask),
                     "dice_oracle": oracle_dice(s, y), "subject_score": subject_score(case),
                     "lesion_ml": float(y.sum()) * case.voxel_ml})
    out: dict = {}
    for key in ("auprc", "auroc", "dice_calibrated", "dice_oracle"):
        out[key], out[f"{key}_sd"], _ = _mean_sd([r[key] for r in rows])
    pos = [r["subject_score"] for r in rows]
    neg = [subject_score(c) for c in controls]
    out["subject_auroc"] = auroc(np.r_[pos, neg], np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]) \
        if pos and neg else float("nan")
    fprs = [float(c.written[c.amask].mean()) for c in controls if c.written is not None and c.amask.any()]
    out["heldout_control_fpr"], out["heldout_control_fpr_sd"], _ = _mean_sd(fprs)
    out.update(_lesion_wise(patients, controls, rows))
    out["by_volume"] = _group_metrics(patients, lambda v, t: volume_stratum(v))
    out["by_type"] = _group_metrics(patients, lambda v, t: t)
    out["n_patients"], out["n_controls"] = len(patients), len(controls)
    control_findings = iter(out.get("control_findings", []))
    out["per_subject"] = rows + [{"subject": c.subject, "subject_score": s, "control": True,
                                  "written_fpr": None if c.written is None else float(c.written[c.amask].mean()),
                                  "findings": None if c.written is None else next(control_findings)}
                                 for c, s in zip(controls, neg)]
    return out


def _lesion_wise(patients: list[Case], controls: list[Case], rows: list[dict]) -> dict:
    """Lesion detection rate (pooled over patients' lesions), false findings per patient and per
    control, of the detectors with a written map; per-patient counts are added to ``rows``."""
    out = {"lesion_detection_rate": float("nan"), "n_lesions": 0, "false_findings_per_patient": float("nan"),
           "false_findings_per_control": float("nan")}
    if not any(c.written is not None for c in patients + controls):
        return out
    found = total = 0
    false = []
    for case, row in zip(patients, rows):
        if case.written is None:
            continue
        labels, _ = case.lesions()
        lw = lesion_wise(case.written & case.amask, labels, case.min_finding_voxels)
        found, total = found + lw["n_found"], total + lw["n_lesions"]
        false.append(lw["n_false_findings"])
        row.update(n_lesions=lw["n_lesions"], lesions_found=lw["n_found"], findings=lw["n_findings"],
                   false_findings=lw["n_false_findings"])
    per_control = [lesion_wise(c.written & c.amask, None, c.min_finding_voxels)["n_findings"]
                   for c in controls if c.written is not None]
    out["lesion_detection_rate"] = found / total if total else float("nan")
    out["n_lesions"] = total
    out["false_findings_per_patient"] = _mean_sd(false)[0]
    out["false_findings_per_control"] = _mean_sd(per_control)[0]
    out["control_findings"] = per_control
    return out


def pr_curve(patients: list[Case], points: int = 101) -> tuple[np.ndarray, np.ndarray]:
    """Precision at evenly spaced recall levels, voxels of all patients pooled (interpolated
    upper envelope, as average precision counts it)."""
    s = np.concatenate([c.score[c.amask] for c in patients]).astype(float)
    y = np.concatenate([c.truth[c.amask] for c in patients]).astype(bool)
    recall_levels = np.linspace(0, 1, points)
    if not y.any():
        return recall_levels, np.full(points, np.nan)
    _, tp, fp = _sweep(s, y)
    precision, recall = tp / (tp + fp), tp / y.sum()
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.searchsorted(recall, recall_levels, side="left")
    return recall_levels, np.where(idx < len(envelope), envelope[np.minimum(idx, len(envelope) - 1)], 0.0)


def score_histograms(patients: list[Case], bins: int = 40) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bin centres, lesion density, healthy density) of the patients' scores in the analysis mask."""
    s = np.concatenate([c.score[c.amask] for c in patients]).astype(float)
    y = np.concatenate([c.truth[c.amask] for c in patients]).astype(bool)
    lo, hi = np.percentile(s, [0.5, 99.9]) if s.size else (0.0, 1.0)
    edges = np.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
    lesion = np.histogram(np.clip(s[y], lo, hi), edges, density=True)[0] if y.any() else np.zeros(bins)
    healthy = np.histogram(np.clip(s[~y], lo, hi), edges, density=True)[0] if (~y).any() else np.zeros(bins)
    return 0.5 * (edges[1:] + edges[:-1]), lesion, healthy


def one_line_detectors(ratios: np.ndarray, bvals: np.ndarray, bvecs: np.ndarray,
                       mask: np.ndarray, median: int = SCORE_MEDIAN) -> dict[str, np.ndarray]:
    """Score maps of the one-line detectors ``1 − FA`` and ``MD`` from diffusion-weighted signal
    ratios (X, Y, Z, C) with their dw gradient table (reported, not registered models), through the
    masked median filter every model's score map gets (``median`` voxels wide; 1: none)."""
    from bids_uad.algorithms.tensor import tensor_metrics_from_ratios

    maps = tensor_metrics_from_ratios(np.moveaxis(ratios, -1, 0), bvals, bvecs, mask)
    inside = np.asarray(mask, bool) & (maps["mdw"] > 0)
    return {"1-FA": masked_median_filter(np.where(inside, 1.0 - maps["fa"], 0).astype(np.float32), inside, median),
            "MD": masked_median_filter(np.where(inside, maps["md"], 0).astype(np.float32), inside, median)}
