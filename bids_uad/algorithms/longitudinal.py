"""Longitudinal comparison on arrays: mismatch regions, volumes, overlap and a random-region null.

The question these functions answer: do the voxels a model flags as anomalous at baseline,
*outside* the visible (FLAIR/T1w) lesion, become lesion at follow-up more often than random
regions of the same size would?  Everything here works on boolean/float arrays that are
already on one grid (the baseline diffusion space); nothing reads files or knows nipype.

* :func:`mismatch_mask` — anomalous at baseline, outside the baseline lesion.
* :func:`overlap_fraction` — the part of a region that lies in a target (follow-up lesion).
* :func:`random_region_null` — the same overlap for randomly placed regions of the same voxel
  count (shifted and flipped copies of the mismatch components, or random compact blobs),
  drawn inside the analysis mask minus the baseline lesion; a one-sided permutation p-value.
* :func:`flair_hyperintensity_estimate` — a lesion-mask *estimate* when no manual masks exist.
* :func:`compare_sessions` — all the numbers of one baseline/follow-up pair as a dict.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from bids_uad.algorithms.masking import bounding_box
from bids_uad.algorithms.robust import robust_spread

LOGGER = logging.getLogger(__name__)

#: how random regions are drawn: shifted/flipped copies of each connected component of the
#: region (shape-preserving), or compact random blobs of the same voxel count.
NULL_METHODS = ("components", "blobs")


# -- volumes and overlap -----------------------------------------------------------------------

def voxel_volume_ml(zooms) -> float:
    """Volume of one voxel in millilitres from voxel sizes in mm."""
    z = np.asarray(zooms, dtype=float)[:3]
    return float(np.prod(z)) / 1000.0


def volume_ml(mask: np.ndarray, zooms) -> float:
    """Volume of a binary mask in millilitres.

    Examples
    --------
    >>> import numpy as np
    >>> volume_ml(np.ones((10, 10, 10)), (2.0, 2.0, 2.0))
    8.0
    """
    return float(np.count_nonzero(np.asarray(mask) > 0)) * voxel_volume_ml(zooms)


def as_bool(mask: np.ndarray | None, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A boolean mask (``> 0``); None becomes all False of ``shape``."""
    if mask is None:
        if shape is None:
            raise ValueError("a missing mask needs a shape")
        return np.zeros(shape, dtype=bool)
    return np.asarray(mask) > 0


def mismatch_mask(anomaly: np.ndarray, lesion: np.ndarray | None,
                  analysis_mask: np.ndarray | None = None, min_voxels: int = 1) -> np.ndarray:
    """Voxels anomalous at baseline but outside the baseline lesion (and inside the analysis mask).

    Connected components (26-connectivity) smaller than ``min_voxels`` are dropped: a single
    voxel left over at the lesion border is registration noise, not a region.

    Examples
    --------
    >>> import numpy as np
    >>> mismatch_mask(np.array([1, 1, 1, 0]), np.array([1, 0, 0, 0])).astype(int)
    array([0, 1, 1, 0])
    """
    anomaly = as_bool(anomaly)
    out = anomaly & ~as_bool(lesion, anomaly.shape)
    if analysis_mask is not None:
        out &= as_bool(analysis_mask)
    if min_voxels > 1 and out.any():
        labels, n = ndi.label(out, structure=np.ones((3, 3, 3), bool))
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        keep = sizes >= min_voxels
        keep[0] = False
        out = keep[labels]
    return out


def overlap_fraction(region: np.ndarray, target: np.ndarray) -> float:
    """|region ∩ target| / |region|; NaN when the region is empty (nothing to predict with).

    Examples
    --------
    >>> import numpy as np
    >>> overlap_fraction(np.array([1, 1, 0, 0]), np.array([0, 1, 1, 1]))
    0.5
    """
    region, target = as_bool(region), as_bool(target)
    n = int(np.count_nonzero(region))
    if n == 0:
        return float("nan")
    return float(np.count_nonzero(region & target)) / n


# -- random-region null ----------------------------------------------------------------------

@dataclass
class RandomNull:
    """Overlap fractions of random regions of the same size, and the observed value's p."""

    observed: float
    samples: np.ndarray
    method: str
    n_voxels: int
    n_fallback: int = 0          # components that did not fit whole (completed or blobs)
    extras: dict = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return float(np.mean(self.samples)) if self.samples.size else float("nan")

    @property
    def std(self) -> float:
        return float(np.std(self.samples)) if self.samples.size else float("nan")

    @property
    def p(self) -> float:
        """One-sided permutation p-value: P(random overlap >= observed), with the +1 correction."""
        if not self.samples.size or math.isnan(self.observed):
            return float("nan")
        return float((1 + np.count_nonzero(self.samples >= self.observed - 1e-12)) / (1 + self.samples.size))


def _components(region: np.ndarray) -> list[np.ndarray]:
    """Voxel coordinates (n, 3) of each 26-connected component, largest first."""
    labels, n = ndi.label(region, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return []
    coords = np.argwhere(labels > 0)
    order = np.argsort(labels[tuple(coords.T)], kind="stable")
    coords = coords[order]
    counts = np.bincount(labels[tuple(coords.T)])[1:]
    parts = np.split(coords, np.cumsum(counts)[:-1])
    return sorted(parts, key=len, reverse=True)


#: tries of one component checked per vectorised batch: 4, then 16, 64, ... (most small
#: components fit at the first try; one that fits nowhere uses all ``tries`` in a few batches)
_FIRST_BATCH = 4
#: at most this many voxel positions (tries x component voxels) are checked in one batch
_BATCH_VOXELS = 400_000


def _draw_try(rng: np.random.Generator, n_candidates: int, n_coords: int) -> tuple[tuple[int, ...], int, int]:
    """The random numbers of one placement try, in the order they are drawn: three axis
    flips, the anchor (a candidate voxel), the component voxel put on the anchor."""
    signs = tuple(-1 if rng.random() < 0.5 else 1 for _ in range(3))
    return signs, int(rng.integers(n_candidates)), int(rng.integers(n_coords))


def _try_place(coords: np.ndarray, free: np.ndarray, candidates: np.ndarray,
               rng: np.random.Generator, tries: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A randomly flipped and shifted copy of ``coords`` lying entirely in ``free``.

    Returns (copy, None) when one fits; otherwise (None, best partial copy): the voxels of the
    attempt that kept the largest part inside ``free`` (None when every attempt missed).

    Tries are drawn one after another (random flips, a random anchor voxel, the component voxel
    put on it) and the first that fits is taken.  They are *checked* in vectorised batches, as
    flat indices into ``free`` padded by the component's extent (outside the grid = not free).
    When a batch holds a fitting try, the generator is rewound to the batch start and advanced
    by exactly the tries up to that one, so the stream of random numbers, and therefore every
    result, is the one of checking one try at a time.
    """
    n = len(coords)
    pad = int((coords.max(0) - coords.min(0)).max()) + 1
    padded = np.pad(free, pad)
    strides = np.array([padded.shape[1] * padded.shape[2], padded.shape[2], 1])
    flat_free = padded.ravel()
    flipped: dict[tuple[int, ...], np.ndarray] = {}   # flat offsets of the flipped component

    def rel(signs):
        if signs not in flipped:
            flipped[signs] = (coords * np.asarray(signs)) @ strides
        return flipped[signs]

    best, best_n = None, 0
    done, batch = 0, _FIRST_BATCH
    while done < tries:
        k = max(1, min(batch, tries - done, _BATCH_VOXELS // max(n, 1)))
        state = rng.bit_generator.state
        draws = [_draw_try(rng, len(candidates), n) for _ in range(k)]
        # flat index of voxel j of try i: anchor + pad - sign * coords[pivot] + sign * coords[j]
        base = np.array([(candidates[a] + pad - coords[p] * np.asarray(s)) @ strides for s, a, p in draws])
        ok = flat_free[base[:, None] + np.stack([rel(s) for s, _, _ in draws])]
        n_ok = np.count_nonzero(ok, axis=1)
        fits = np.flatnonzero(n_ok == n)
        pick = int(fits[0]) if fits.size else int(np.argmax(n_ok))  # argmax: the first best, as a scan
        if fits.size or n_ok[pick] > best_n:
            s, a, p = draws[pick]
            moved = (coords - coords[p]) * np.asarray(s) + candidates[a]
            if fits.size:
                rng.bit_generator.state = state
                for _ in range(pick + 1):
                    _draw_try(rng, len(candidates), n)
                return moved, None
            best, best_n = moved[ok[pick]], int(n_ok[pick])
        done += k
        batch *= 4
    return None, best


def _rank_in(mask: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Position of each voxel of ``points`` (n, 3; all inside ``mask``) in ``np.argwhere(mask)``."""
    order = np.flatnonzero(mask)
    return np.searchsorted(order, np.ravel_multi_index(tuple(points.T), mask.shape))


def _top_up(part: np.ndarray, n: int, free: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Grow a partial copy back to ``n`` voxels with the free voxels nearest to it.

    Every free voxel gets a distance to the partial copy plus a random jitter (one draw per
    free voxel, in C order); the ``missing`` smallest are taken.  Distances are computed in a
    window around the copy that is grown until the voxels it picks are provably nearer than
    anything outside it (outside a margin ``r`` every distance is at least ``r + 1``), so the
    pick is that of a distance transform of the whole grid, at the cost of a small one.
    """
    missing = n - len(part)
    if missing <= 0:
        return part
    placed = np.zeros(free.shape, dtype=bool)
    placed[tuple(part.T)] = True
    rest = free & ~placed
    n_rest = int(np.count_nonzero(rest))
    if n_rest <= missing:
        return np.concatenate([part, np.argwhere(rest)])
    jitter = 0.5 * rng.random(n_rest)
    shape = np.asarray(free.shape)
    lo_part, hi_part = part.min(0), part.max(0) + 1
    margin = int(np.ceil(np.cbrt(missing))) + 2
    while True:
        lo, hi = np.maximum(lo_part - margin, 0), np.minimum(hi_part + margin, shape)
        whole = bool((lo == 0).all() and (hi == shape).all())
        win = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        local = np.argwhere(rest[win])
        if len(local) >= missing or whole:
            dist = ndi.distance_transform_edt(~placed[win])[tuple(local.T)]
            pts = local + lo
            dist = dist + jitter[_rank_in(rest, pts)]
            pick = np.argpartition(dist, missing - 1)[:missing]
            if whole or dist[pick].max() < margin + 1:
                return np.concatenate([part, pts[pick]])
        margin *= 2


def _blob(n: int, free: np.ndarray, candidates: np.ndarray, rng: np.random.Generator,
          roughness: float = 0.5) -> np.ndarray:
    """``n`` free voxels closest to a random seed (distance jittered for an irregular outline)."""
    pts = np.argwhere(free)
    if len(pts) <= n:
        return pts
    seed = candidates[rng.integers(len(candidates))]
    d = np.sqrt(((pts - seed) ** 2).sum(1).astype(float))
    radius = (3.0 * n / (4.0 * np.pi)) ** (1.0 / 3.0)
    d = d + roughness * radius * rng.random(len(d))
    pick = np.argpartition(d, n - 1)[:n]
    return pts[pick]


def _place_components(components: list[np.ndarray], allowed: np.ndarray, candidates: np.ndarray,
                      rng: np.random.Generator, method: str, tries: int) -> tuple[list[np.ndarray], int]:
    """Voxel coordinates of one random region (one array per component) and the fallbacks."""
    free = allowed.copy()
    pieces, fallbacks = [], 0
    for coords in components:
        placed, partial = (_try_place(coords, free, candidates, rng, tries) if method == "components"
                           else (None, None))
        if placed is None and partial is not None and len(partial) >= len(coords) // 2:
            fallbacks += 1          # most of a copy fitted: complete it at its border
            placed = _top_up(partial, len(coords), free, rng)
        elif placed is None:
            fallbacks += method == "components"
            placed = _blob(len(coords), free, candidates, rng)
        free[tuple(placed.T)] = False
        pieces.append(placed)
    return pieces, fallbacks


def random_region(region: np.ndarray, allowed: np.ndarray, rng: np.random.Generator,
                  method: str = "components", tries: int = 200) -> tuple[np.ndarray, int]:
    """One random region with the same voxel count as ``region``, inside ``allowed``.

    ``components``: each connected component is copied (random flips, random shift) to a
    place where it fits entirely inside ``allowed`` without touching the copies already
    placed; a component that fits nowhere after ``tries`` attempts is taken from the attempt
    that kept most of it inside (completed with the free voxels nearest to it) or, when not
    even half fitted, becomes a compact blob.
    ``blobs``: one compact random blob per component.  Returns (mask, number of fallbacks).
    """
    if method not in NULL_METHODS:
        raise ValueError(f"method must be one of {NULL_METHODS}, got {method!r}")
    region, allowed = as_bool(region), as_bool(allowed)
    candidates = np.argwhere(allowed)
    if len(candidates) == 0:
        raise ValueError("the allowed region is empty: nowhere to draw random regions")
    pieces, fallbacks = _place_components(_components(region), allowed, candidates, rng, method, tries)
    out = np.zeros(region.shape, dtype=bool)
    for placed in pieces:
        out[tuple(placed.T)] = True
    return out, fallbacks


def random_region_null(region: np.ndarray, target: np.ndarray, allowed: np.ndarray,
                       n_permutations: int = 200, seed: int = 0, method: str = "components",
                       tries: int = 200) -> RandomNull:
    """Overlap with ``target`` of ``n_permutations`` random regions the size of ``region``.

    ``allowed`` is where random regions may lie (the analysis mask minus the baseline lesion);
    the observed overlap is that of ``region`` itself.  Seeded: the same inputs give the same
    null.  An empty region gives an empty null (mean and p are NaN).
    """
    region, target, allowed = as_bool(region), as_bool(target), as_bool(allowed)
    observed = overlap_fraction(region, target)
    n = int(np.count_nonzero(region))
    if n == 0 or n_permutations <= 0:
        return RandomNull(observed, np.zeros(0), method, n)
    if 2 * n > np.count_nonzero(allowed):
        LOGGER.warning("random-region null skipped: the region (%d voxels) covers more than half "
                       "of the allowed region (%d voxels)", n, int(np.count_nonzero(allowed)))
        return RandomNull(observed, np.zeros(0), method, n, extras={"skipped": "region too large"})
    # random regions live in ``allowed``: work in its bounding box (fast on whole-brain grids)
    box = bounding_box(allowed | region)
    region, target, allowed = region[box], target[box], allowed[box]
    if method not in NULL_METHODS:
        raise ValueError(f"method must be one of {NULL_METHODS}, got {method!r}")
    # what every draw shares is computed once; the pieces of a draw are disjoint, so its
    # overlap is counted on their voxels (the same number as on the whole mask)
    components = _components(region)
    candidates = np.argwhere(allowed)
    if len(candidates) == 0:
        raise ValueError("the allowed region is empty: nowhere to draw random regions")
    rng = np.random.default_rng(seed)
    samples = np.empty(n_permutations)
    fallbacks = 0
    for i in range(n_permutations):
        pieces, fb = _place_components(components, allowed, candidates, rng, method, tries)
        fallbacks += fb
        size = sum(len(p) for p in pieces)
        hits = sum(int(np.count_nonzero(target[tuple(p.T)])) for p in pieces)
        samples[i] = float(hits) / size if size else float("nan")
    if fallbacks:
        LOGGER.info("random-region null: %d of %d component copies did not fit whole",
                    fallbacks, n_permutations * len(components))
    return RandomNull(observed, samples, method, n, n_fallback=fallbacks)


# -- lesion estimate from FLAIR ------------------------------------------------------------------

def robust_zscore(image: np.ndarray, mask: np.ndarray, out_mask: np.ndarray | None = None) -> np.ndarray:
    """(x − median) / (1.4826 · MAD), statistics from ``mask``; 0 outside ``out_mask`` (default ``mask``)."""
    image = np.asarray(image, dtype=np.float64)
    mask = as_bool(mask)
    out_mask = mask if out_mask is None else as_bool(out_mask)
    values = image[mask]
    if values.size == 0:
        return np.zeros(image.shape, dtype=np.float32)
    med = float(np.median(values))
    mad = robust_spread(values, med)
    if mad <= 0:
        mad = float(values.std()) or 1.0
    z = (image - med) / mad
    return np.where(out_mask, z, 0.0).astype(np.float32)


def _fill_holes(mask: np.ndarray, min_axes: int = 2) -> np.ndarray:
    """3-D hole filling plus 2-D filling of slices: a voxel enclosed in the slices of at least
    ``min_axes`` of the three axes is filled (a solid tumour inside a hyperintense oedema ring
    that is open somewhere in 3-D); ``min_axes=0`` fills 3-D holes only."""
    out = ndi.binary_fill_holes(mask)
    if min_axes <= 0 or not mask.any():
        return out
    votes = np.zeros(mask.shape, dtype=np.int8)
    for axis in range(3):
        filled = np.zeros(mask.shape, dtype=bool)
        for i in range(mask.shape[axis]):
            sl = [slice(None)] * 3
            sl[axis] = i
            plane = mask[tuple(sl)]
            if plane.any():
                filled[tuple(sl)] = ndi.binary_fill_holes(plane)
        votes += filled & ~mask
    return out | (votes >= min_axes)


def flair_hyperintensity_estimate(flair: np.ndarray, brain_mask: np.ndarray,
                                  csf_mask: np.ndarray | None = None, zooms=(1.0, 1.0, 1.0),
                                  z_threshold: float = 3.0, min_volume_ml: float = 0.1,
                                  edge_mm: float = 2.0, opening: int = 1,
                                  reference_mask: np.ndarray | None = None,
                                  fill_axes: int = 1) -> tuple[np.ndarray, dict]:
    """An *estimate* of the lesion (oedema/tumour) as FLAIR hyperintensity; returns (mask, info).

    Robust z-score of FLAIR against a reference tissue — ``reference_mask`` (e.g. grey
    matter, the brightest normal tissue on FLAIR) or else the whole brain without CSF — above
    ``z_threshold``; minus CSF and a ``edge_mm`` rim inside the brain edge (skull-stripping
    leftovers are bright on FLAIR); binary opening (``opening`` iterations, 6-connectivity),
    hole filling, and components under ``min_volume_ml`` dropped.  Not a segmentation:
    outputs made from it carry ``flairhyperEstimate`` in their names.
    """
    brain = as_bool(brain_mask)
    csf = as_bool(csf_mask, brain.shape)
    tissue = brain & ~csf
    if edge_mm > 0:
        dist = ndi.distance_transform_edt(brain, sampling=np.asarray(zooms, float)[:3])
        tissue &= dist > edge_mm
    ref = tissue if tissue.any() else brain
    use_reference = reference_mask is not None and np.count_nonzero(as_bool(reference_mask) & tissue) >= 50
    if use_reference:
        ref = as_bool(reference_mask) & tissue
    z = robust_zscore(flair, ref, out_mask=tissue)
    mask = (z > z_threshold) & tissue
    if opening > 0 and mask.any():
        mask = ndi.binary_opening(mask, iterations=opening)
    mask = _fill_holes(mask, fill_axes) & brain & ~csf
    min_vox = int(math.ceil(min_volume_ml / voxel_volume_ml(zooms))) if min_volume_ml > 0 else 1
    n_comp = 0
    if mask.any():
        labels, n = ndi.label(mask, structure=np.ones((3, 3, 3), bool))
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        keep = sizes >= min_vox
        keep[0] = False
        mask = keep[labels]
        n_comp = int(keep.sum())
    info = {"Method": "FLAIR hyperintensity estimate (not a manual segmentation)",
            "RobustZThreshold": float(z_threshold), "MinComponentVolumeMl": float(min_volume_ml),
            "BrainEdgeExclusionMm": float(edge_mm), "OpeningIterations": int(opening),
            "HoleFilling": f"3-D, and 2-D slices enclosed along >= {fill_axes} axes" if fill_axes else "3-D",
            "CSFExcluded": csf_mask is not None, "Components": n_comp,
            "Reference": "reference tissue (grey matter)" if use_reference else "brain without CSF",
            "VolumeMl": volume_ml(mask, zooms)}
    return mask, info


# -- score change and the full comparison --------------------------------------------------------

def score_change(baseline_score: np.ndarray, followup_score: np.ndarray,
                 mask: np.ndarray | None = None) -> np.ndarray:
    """Follow-up minus baseline anomaly score (same grid); 0 outside ``mask``."""
    diff = np.asarray(followup_score, dtype=np.float32) - np.asarray(baseline_score, dtype=np.float32)
    diff = np.nan_to_num(diff, nan=0.0, posinf=0.0, neginf=0.0)
    if mask is not None:
        diff = np.where(as_bool(mask), diff, 0.0).astype(np.float32)
    return diff


#: columns of the per-pair statistics (the TSV columns after the identifiers)
STAT_COLUMNS = (
    "baseline_anomaly_ml", "baseline_lesion_ml", "followup_lesion_ml", "new_lesion_ml",
    "mismatch_ml", "mismatch_components", "mismatch_growth_ml", "overlap_fraction",
    "overlap_fraction_random_mean", "overlap_fraction_random_std", "overlap_fraction_random_p",
    "overlap_fraction_perilesional_mean", "overlap_fraction_perilesional_p",
    "new_lesion_in_mismatch_fraction", "followup_anomaly_ml", "anomaly_change_ml",
    "score_change_mean", "score_change_mismatch_mean", "n_permutations", "null_method",
)


def compare_sessions(anomaly: np.ndarray, baseline_lesion: np.ndarray | None,
                     followup_lesion: np.ndarray | None, analysis_mask: np.ndarray | None,
                     zooms, *, followup_anomaly: np.ndarray | None = None,
                     baseline_score: np.ndarray | None = None,
                     followup_score: np.ndarray | None = None,
                     n_permutations: int = 200, seed: int = 0, null_method: str = "components",
                     min_mismatch_voxels: int = 1, perilesional_mm: float = 0.0) -> tuple[dict, dict]:
    """Every number of one baseline/follow-up pair, all arrays on the baseline dwi grid.

    Returns (stats, maps): ``stats`` holds :data:`STAT_COLUMNS` (volumes in mL; NaN where
    undefined, e.g. the overlap of an empty mismatch); ``maps`` holds ``mismatch`` and, when
    both score maps are given, ``score_change``.  ``mismatch_growth_ml`` is the mismatch
    volume that is lesion at follow-up; ``new_lesion_in_mismatch_fraction`` the part of the
    new lesion (follow-up minus baseline lesion) the mismatch predicted.  With
    ``perilesional_mm > 0`` a second, stricter null draws the random regions only within that
    distance of the baseline lesion (does the mismatch predict *where* around the tumour it
    grows, beyond being close to it?): ``overlap_fraction_perilesional_mean``/``_p``.
    """
    anomaly = as_bool(anomaly)
    shape = anomaly.shape
    base_les = as_bool(baseline_lesion, shape)
    fu_les = as_bool(followup_lesion, shape)
    analysis = as_bool(analysis_mask) if analysis_mask is not None else np.ones(shape, bool)
    mism = mismatch_mask(anomaly, base_les, analysis, min_mismatch_voxels)
    new_lesion = fu_les & ~base_les
    allowed = analysis & ~base_les
    null = random_region_null(mism, fu_les, allowed, n_permutations, seed, null_method)
    n_new = int(np.count_nonzero(new_lesion))
    stats: dict = {
        "baseline_anomaly_ml": volume_ml(anomaly, zooms),
        "baseline_lesion_ml": volume_ml(base_les, zooms),
        "followup_lesion_ml": volume_ml(fu_les, zooms),
        "new_lesion_ml": volume_ml(new_lesion, zooms),
        "mismatch_ml": volume_ml(mism, zooms),
        "mismatch_components": len(_components(mism)) if mism.any() else 0,
        "mismatch_growth_ml": volume_ml(mism & fu_les, zooms),
        "overlap_fraction": null.observed,
        "overlap_fraction_random_mean": null.mean,
        "overlap_fraction_random_std": null.std,
        "overlap_fraction_random_p": null.p,
        "overlap_fraction_perilesional_mean": float("nan"),
        "overlap_fraction_perilesional_p": float("nan"),
        "new_lesion_in_mismatch_fraction": (float(np.count_nonzero(new_lesion & mism)) / n_new
                                            if n_new else float("nan")),
        "followup_anomaly_ml": float("nan"),
        "anomaly_change_ml": float("nan"),
        "score_change_mean": float("nan"),
        "score_change_mismatch_mean": float("nan"),
        "n_permutations": int(null.samples.size),
        "null_method": null_method,
    }
    if perilesional_mm > 0 and base_les.any() and mism.any():
        near = ndi.distance_transform_edt(~base_les, sampling=np.asarray(zooms, float)[:3]) <= perilesional_mm
        zone = allowed & (near | mism)  # the observed mismatch is always a possible draw
        peri = random_region_null(mism, fu_les, zone, n_permutations, seed + 1, null_method)
        stats["overlap_fraction_perilesional_mean"] = peri.mean
        stats["overlap_fraction_perilesional_p"] = peri.p
    maps: dict = {"mismatch": mism}
    if followup_anomaly is not None:
        fu_anom = as_bool(followup_anomaly) & analysis
        stats["followup_anomaly_ml"] = volume_ml(fu_anom, zooms)
        stats["anomaly_change_ml"] = stats["followup_anomaly_ml"] - stats["baseline_anomaly_ml"]
    if baseline_score is not None and followup_score is not None:
        change = score_change(baseline_score, followup_score, analysis)
        maps["score_change"] = change
        stats["score_change_mean"] = float(change[analysis].mean()) if analysis.any() else float("nan")
        if mism.any():
            stats["score_change_mismatch_mean"] = float(change[mism].mean())
    return stats, {**maps, "null_samples": null.samples}
