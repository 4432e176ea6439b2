"""Calibration on held-out healthy tissue: FPR thresholds and conformal p-values.

The null sample is the score of held-out controls inside the analysis mask.  A voxel's
conformal p-value is (1 + #{null >= s}) / (n + 1), valid for exchangeable healthy voxels,
so Benjamini-Hochberg on these p-values controls the FDR.

The healthy-fpr threshold is calibrated for the map that is *written*: post-processing
(cluster removal or opening, :func:`bids_uad.scoring.morphology.postprocess`) removes most of
the scattered voxels a voxel-wise 1 % threshold flags, so a voxel-wise calibration leaves the
written maps nearly empty.  :func:`calibrate_written` finds the voxel-wise level ``level`` whose
threshold, after post-processing, flags the target fraction of the held-out controls' healthy
voxels; :meth:`Calibration.threshold_for` uses it.  With two or more calibration controls that
fraction is counted *left out*: each control thresholded from the other controls' null sample,
so the level is what a new healthy subject's written map would flag, not what the controls that
set it flag (in-sample, the between-subject spread of a few controls makes it liberal).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np


@dataclass
class Calibration:
    """Sorted healthy scores (null sample) and, when calibrated for the written map, the
    voxel-wise ``level`` that gives ``target_fpr`` after post-processing."""

    null: np.ndarray
    level: float | None = None  # voxel-wise exceedance level used for the written map
    target_fpr: float | None = None  # false-positive rate of the written map it was calibrated for
    written_fpr: float | None = None  # the rate it reached on the calibration controls
    finding_min_ml: float | None = None  # smallest finding (mL), see calibrate_finding_volume
    written_fpr_left_out: float | None = None  # the same, each control thresholded from the others' null

    def __post_init__(self) -> None:
        self.null = np.sort(np.asarray(self.null, dtype=np.float32).ravel())
        if self.null.size == 0:
            raise ValueError("calibration needs at least one healthy score")

    @property
    def n(self) -> int:
        return int(self.null.size)

    def threshold(self, fpr: float) -> float:
        """Threshold t such that P(healthy score > t) <= fpr (conformal order statistic)."""
        k = math.ceil((self.n + 1) * (1 - fpr))
        return float(self.null[min(max(k, 1), self.n) - 1])

    def threshold_for(self, fpr: float) -> float:
        """Threshold of the written map for target ``fpr``: the calibrated level when this
        calibration was made for that target, else the voxel-wise order statistic."""
        if self.level is not None and self.target_fpr is not None and np.isclose(fpr, self.target_fpr):
            return self.threshold(self.level)
        return self.threshold(fpr)

    def pvalues(self, scores: np.ndarray) -> np.ndarray:
        """Conformal p-values, same shape as ``scores``."""
        s = np.asarray(scores, dtype=np.float32)
        n_ge = self.n - np.searchsorted(self.null, s.ravel(), side="left")
        return ((n_ge + 1) / (self.n + 1)).reshape(s.shape).astype(np.float32)


#: the written-map level is searched down to the target divided by this
LEVEL_RANGE = 100.0


def calibrate(score_maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], max_samples: int = 200_000,
              seed: int = 0) -> Calibration:
    """Null sample from held-out healthy score maps inside their masks (subsampled, seeded)."""
    values = np.concatenate([np.asarray(s)[np.asarray(m) > 0].ravel() for s, m in zip(score_maps, masks)])
    if values.size > max_samples:
        values = np.random.default_rng([seed, 104729]).choice(values, max_samples, replace=False)
    return Calibration(values)


def written_fpr(threshold: float | Sequence[float], score_maps: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                post: Callable[[np.ndarray], np.ndarray]) -> float:
    """Fraction of the masks' voxels flagged in the written maps at ``threshold`` (one for every
    map, or one per map): ``post`` is the post-processing (e.g.
    :func:`bids_uad.scoring.morphology.postprocess` with its settings)."""
    thresholds = np.broadcast_to(np.asarray(threshold, float), (len(score_maps),))
    flagged = total = 0
    for s, m, t in zip(score_maps, masks, thresholds):
        m = np.asarray(m) > 0
        flagged += int((post((np.asarray(s) > t) & m) & m).sum())
        total += int(m.sum())
    return flagged / max(total, 1)


def left_out_nulls(score_maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], max_samples: int = 200_000,
                   seed: int = 0, groups: Sequence | None = None) -> list[Calibration] | None:
    """For each map ``i``, a :class:`Calibration` of the scores, inside their masks, of the maps of
    the *other* subjects (``groups``: each map's subject, so that two maps of one control — e.g.
    from two training repeats — leave out together; default: every map its own subject), each map
    contributing at most ``max_samples / n`` seeded draws; None with fewer than two subjects: the
    thresholds map ``i`` would get had its subject taken no part in the calibration."""
    groups = list(range(len(score_maps))) if groups is None else list(groups)
    if len(groups) != len(score_maps):
        raise ValueError(f"{len(groups)} groups for {len(score_maps)} maps")
    if len(set(groups)) < 2:
        return None
    rng = np.random.default_rng([seed, 7919])
    per = max(max_samples // len(score_maps), 1)
    values = []
    for s, m in zip(score_maps, masks):
        v = np.asarray(s)[np.asarray(m) > 0].ravel()
        values.append(rng.choice(v, per, replace=False) if v.size > per else v)
    out = []
    for i in range(len(values)):
        others = [v for j, v in enumerate(values) if groups[j] != groups[i]]
        if not sum(v.size for v in others):
            return None
        out.append(Calibration(np.concatenate(others)))
    return out


def calibrate_written(calibration: Calibration, score_maps: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                      target: float, post: Callable[[np.ndarray], np.ndarray], iterations: int = 30,
                      left_out: bool = True, max_samples: int = 200_000, seed: int = 0,
                      groups: Sequence | None = None) -> Calibration:
    """Set ``calibration.level`` so that the written maps (``post`` applied to the thresholded map)
    of the held-out controls (``score_maps`` inside ``masks``) flag at most ``target`` of the voxels.

    ``left_out`` (the default; needs maps of two or more subjects, ``groups``: each map's subject):
    the rate is counted with each map thresholded at the level's threshold of the *other* subjects'
    null sample (:func:`left_out_nulls`), a leave-one-out estimate of what a new healthy subject's
    written map flags.  In-sample (the maps' own pooled null), a few controls set a level their own
    maps just meet and a new subject exceeds (measured: 1.6-1.9 % of held-out controls' voxels at a
    1 % target).  The threshold applied afterwards is the level's order statistic of
    ``calibration``'s null (all maps).

    The level is searched (bisection in log space) between ``target / 100`` and 0.5, taking the
    largest level whose written rate stays within the target: post-processing only removes voxels,
    so in-sample the written rate at voxel-wise level ``a`` is at most about ``a`` and the level lies
    above ``target``; left out, a control whose scores run higher than the others' can need a
    level below it.  When even ``target / 100`` exceeds the target, that level is kept.  Stores
    the in-sample rate (``written_fpr``) and, when counted so, the left-out rate
    (``written_fpr_left_out``) reached.  Returns the same object.
    """
    nulls = left_out_nulls(score_maps, masks, max_samples, seed, groups) if left_out else None

    def rate(level: float) -> float:
        if nulls is None:
            return written_fpr(calibration.threshold(level), score_maps, masks, post)
        return written_fpr([c.threshold(level) for c in nulls], score_maps, masks, post)

    lo, hi = np.log(target / LEVEL_RANGE), np.log(0.5)
    if rate(0.5) <= target:
        lo = hi
    elif rate(float(np.exp(lo))) <= target:
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            if rate(float(np.exp(mid))) <= target:
                lo = mid
            else:
                hi = mid
    calibration.level = float(np.exp(lo))
    calibration.target_fpr = float(target)
    calibration.written_fpr = written_fpr(calibration.threshold(calibration.level), score_maps, masks, post)
    calibration.written_fpr_left_out = None if nulls is None else rate(calibration.level)
    return calibration


def calibrate_finding_volume(calibration: Calibration, score_maps: Sequence[np.ndarray],
                             masks: Sequence[np.ndarray], post, voxel_ml: float,
                             familywise: float = 0.05) -> Calibration:
    """Set ``calibration.finding_min_ml``: the smallest volume a cluster of the written map needs
    to be a *finding*, so that at most ``familywise`` of healthy subjects have any finding.

    A cluster-extent threshold from the controls' own null distribution, as in cluster-level
    inference: each calibration control's written map (``post`` of its map thresholded at the
    calibrated level) gives its largest cluster (26-connectivity); the finding volume is one voxel
    more than the ``ceil((n+1)(1-familywise))``-th smallest of those n largest clusters (capped at
    the largest; with fewer than 19 controls that is the largest, so no calibration control
    keeps a finding).  Calibrated at the written map's level: a threshold chosen another way
    (``--threshold``) does not use it.  Without clusters in the controls it stays unset (the
    post-processing's minimum applies).  Returns the same object.
    """
    from scipy import ndimage as ndi

    if calibration.level is None:
        raise ValueError("calibrate the written map (calibrate_written) before the finding volume")
    t = calibration.threshold(calibration.level)
    structure = np.ones((3, 3, 3), bool)
    largest = []
    for score, mask in zip(score_maps, masks):
        written = post((np.asarray(score) > t) & (np.asarray(mask) > 0)) & (np.asarray(mask) > 0)
        labels, n = ndi.label(written, structure)
        largest.append(int(np.bincount(labels.ravel())[1:].max()) if n else 0)
    largest.sort()
    k = min(math.ceil((len(largest) + 1) * (1 - familywise)), len(largest))
    calibration.finding_min_ml = float((largest[k - 1] + 1) * voxel_ml) if largest and largest[k - 1] else None
    return calibration


def pool(calibrations: Sequence[Calibration]) -> Calibration:
    """One null sample from several folds (used for the fold ensemble; approximate): the written-map
    level is the folds' mean level when every fold has one for the same target."""
    levels = [c.level for c in calibrations]
    targets = {c.target_fpr for c in calibrations}
    ok = all(v is not None for v in levels) and len(targets) == 1
    return Calibration(np.concatenate([c.null for c in calibrations]),
                       float(np.mean(levels)) if ok else None, targets.pop() if ok else None)


def calibrate_written_map(score_maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], target: float,
                          post: Callable[[np.ndarray], np.ndarray], max_samples: int = 200_000, seed: int = 0,
                          voxel_ml: float | None = None, familywise: float = 0.05,
                          left_out: bool = True, groups: Sequence | None = None) -> Calibration:
    """The whole calibration of a written map from healthy score maps: the null sample
    (:func:`calibrate`), the voxel-wise level that gives ``target`` after ``post``
    (:func:`calibrate_written`, counted with each subject of ``groups`` left out unless ``left_out``
    is False) and, when ``voxel_ml`` is known, the smallest finding
    (:func:`calibrate_finding_volume`)."""
    cal = calibrate(score_maps, masks, max_samples, seed)
    calibrate_written(cal, score_maps, masks, target, post, left_out=left_out, max_samples=max_samples, seed=seed,
                      groups=groups)
    if voxel_ml:
        calibrate_finding_volume(cal, score_maps, masks, post, voxel_ml, familywise)
    return cal


def cross_fitted(score_maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], peers: Sequence[Sequence[int]],
                 target: float, post: Callable[[np.ndarray], np.ndarray], voxel_ml: float | None = None,
                 max_samples: int = 200_000, seed: int = 0, familywise: float = 0.05,
                 groups: Sequence | None = None) -> list[Calibration | None]:
    """For each healthy map ``i``, the written-map calibration made from its ``peers[i]`` alone
    (None without peers): the threshold, and smallest finding, that map gets when it took no part
    in calibrating them.

    A control that calibrated its own threshold flags about the target fraction by construction
    (in-sample).  Thresholding each control with a calibration from the others estimates what a
    new healthy subject's written map flags, as cross-fitting does for any tuned parameter: the
    honest held-out false-positive rate and findings per control of a group study with no spare
    controls.  ``peers`` says which maps the model would calibrate on in place of ``i`` (e.g.
    the other folds' held-out controls for an out-of-fold calibration).  ``voxel_ml``: the maps'
    voxel volume, to calibrate the smallest finding too (:func:`calibrate_written_map`); ``groups``:
    each map's subject, left out together within the peers' calibration.
    """
    out: list[Calibration | None] = []
    for i, chosen in enumerate(peers):
        chosen = [j for j in chosen if j != i]
        out.append(None if not chosen else calibrate_written_map(
            [score_maps[j] for j in chosen], [masks[j] for j in chosen], target, post, max_samples, seed,
            voxel_ml, familywise, groups=None if groups is None else [groups[j] for j in chosen]))
    return out
