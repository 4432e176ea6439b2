"""Findings: each flagged region of a written anomaly map as one row a reader can use.

A finding is a 26-connected cluster of the written (thresholded, post-processed) binary map of
at least ``min_volume_ml``.  Per finding (plain functions on arrays; the interface
:class:`~bids_uad.interfaces.findings.Findings` reads and writes the files):

* :func:`find_findings` — the label image (finding 1 is the largest) and one row each: volume,
  centre of mass in scanner mm, peak and mean score, minimum p-value and whether a voxel of it is a
  Benjamini-Hochberg discovery at the model's level q in the analysis mask;
* :func:`add_template_location` — centre in template mm and the atlas regions it overlaps, from
  the label image carried to the template (:mod:`bids_uad.algorithms.atlases`);
* :func:`deviation_signature` — median FA, MD, AD, RD and mean diffusion-weighted ratio inside the
  finding relative to a reference (percent and robust z): the healthy controls' values at the
  same locations where a template-space normative model gives them (FA, MD, mean DW ratio),
  else the subject's own normal-appearing tissue of the finding's tissue class;
* :func:`match_findings` — baseline findings against follow-up findings in one space;
* :func:`lesion_wise` — per-lesion detection and false findings against a lesion instance image.

:data:`COLUMNS` describes every column of the findings table (the TSV's JSON sidecar).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from bids_uad.algorithms.robust import MAD_TO_SD
from bids_uad.scoring.morphology import label_clusters
from bids_uad.scoring.thresholds import benjamini_hochberg

#: metrics of the deviation signature, in column order: (key, label, units)
SIGNATURE_METRICS = (("fa", "FA", "1"), ("md", "MD", "mm^2/s"), ("ad", "AD", "mm^2/s"), ("rd", "RD", "mm^2/s"),
                     ("dwratio", "mean DW ratio", "1"))
#: metric of the normative model (:data:`bids_uad.models.baselines.NORMATIVE_METRICS`) -> signature metric
NORMATIVE_SIGNATURE = {"fa": "fa", "md": "md", "mdw": "dwratio"}
#: tissue classes of a dwi-space dseg (bids_uad.algorithms.segmentation.LABELS)
TISSUE_NAMES = {1: "CSF", 2: "GM", 3: "WM"}

#: column -> (description, units or None); the order of the TSV
COLUMNS: dict[str, tuple[str, str | None]] = {
    "finding": ("Finding number, 1 = the largest; the same number labels the finding in the report's figures", None),
    "volume_ml": ("Volume of the 26-connected cluster of the written anomaly mask", "mL"),
    "n_voxels": ("Number of voxels of the cluster (diffusion space)", None),
    "centre_x": ("Centre of mass, scanner coordinates (the dwi image's world space, RAS+), x", "mm"),
    "centre_y": ("Centre of mass, scanner coordinates (RAS+), y", "mm"),
    "centre_z": ("Centre of mass, scanner coordinates (RAS+), z", "mm"),
    "template_x": ("Centre of mass of the cluster carried to the template (see Template), x; n/a without "
                   "transforms or when the cluster vanishes at the template's resolution", "mm"),
    "template_y": ("Centre of mass in template space, y", "mm"),
    "template_z": ("Centre of mass in template space, z", "mm"),
    "peak_score": ("Highest anomaly score in the cluster", "arbitrary (the model's score scale)"),
    "mean_score": ("Mean anomaly score in the cluster", "arbitrary (the model's score scale)"),
    "min_pvalue": ("Smallest conformal p-value in the cluster (against held-out controls' scores); n/a for an "
                   "uncalibrated model", "1"),
    "fdr_survives": ("yes when a voxel of the cluster is a Benjamini-Hochberg discovery at level FDRq over the "
                     "analysis mask's conformal p-values, else no; n/a for an uncalibrated model", None),
}
#: values of the ``<metric>_reference`` columns -> what they mean (the sidecar's Levels)
REFERENCE_LEVELS = {
    "controls": "the healthy controls at the same locations: the template-space normative model's per-voxel median "
                "and robust spread (1.4826 x MAD) carried back to this run's diffusion grid, over the cluster's voxels",
    "subject": "this subject's normal-appearing tissue of class reference_tissue (outside the dilated anomaly mask)",
}
for _key, _label, _units in SIGNATURE_METRICS:
    COLUMNS[f"{_key}_median"] = ((f"Median {_label} inside the cluster" if _key != "dwratio" else
                                  "Mean diffusion-weighted signal ratio (S/S0 averaged over the diffusion-weighted "
                                  "volumes), median over the cluster")
                                 + " (with the controls' reference: over the cluster's voxels where the controls' "
                                   "values are defined)", _units)
    COLUMNS[f"{_key}_percent"] = (f"{_label} inside the cluster relative to the reference median ({_key}_reference; "
                                  "see DeviationReference): 100 * (cluster median - reference median) / reference "
                                  "median; with the controls' reference, the reference median is the median of the "
                                  "controls' per-voxel medians over the same voxels", "%")
    COLUMNS[f"{_key}_z"] = (f"Robust z of the cluster's median {_label}: (cluster median - reference median) / reference "
                            "spread, the spread being 1.4826 x the median absolute deviation (of the subject's "
                            "reference tissue; with the controls' reference, the median over the cluster's voxels "
                            "of the controls' per-voxel robust spread)", "1")
    COLUMNS[f"{_key}_reference"] = (f"What {_label} is compared with: 'controls' (the healthy controls' values at the "
                                    "same template locations, from the template-space normative model) or 'subject' "
                                    "(this subject's normal-appearing tissue of class reference_tissue); n/a when "
                                    f"{_label} is not available", None)
COLUMNS["signature"] = ("The deviation signature in words: metrics whose |robust z| >= 2, e.g. 'MD +34 %, FA -41 %'",
                        None)
COLUMNS["reference_tissue"] = ("Tissue class of the subject's own reference values, used by the metrics whose "
                               "<metric>_reference is 'subject' (the class holding most of the cluster's voxels in "
                               "the dwi-space segmentation; 'brain' without one)", None)

def find_findings(mask: np.ndarray, score: np.ndarray, affine: np.ndarray, pvalues: np.ndarray | None = None,
                  analysis_mask: np.ndarray | None = None, fdr_q: float | None = 0.05,
                  min_volume_ml: float = 0.0) -> tuple[np.ndarray, list[dict]]:
    """Label image of the findings (1 = largest, 0 = none) and one row per finding.

    ``mask``: the written binary map; ``score``/``pvalues``: the maps it was made from (same
    grid); ``analysis_mask``: the voxels the BH procedure counts (default: the whole image);
    ``min_volume_ml``: smaller clusters are not findings (in voxels as the post-processing counts
    it, :func:`min_finding_voxels`).
    """
    mask = np.asarray(mask, bool)
    voxel_ml = float(abs(np.linalg.det(np.asarray(affine, float)[:3, :3]))) / 1000.0
    labels, n = label_clusters(mask)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    min_voxels = min_finding_voxels(min_volume_ml, voxel_ml)
    keep = [i + 1 for i in np.argsort(-sizes, kind="stable") if sizes[i] >= min_voxels]
    relabel = np.zeros(n + 1, np.int32)
    relabel[keep] = np.arange(1, len(keep) + 1)
    labels = relabel[labels]
    rows = []
    if not keep:
        return labels, rows
    discoveries = None
    if pvalues is not None and fdr_q is not None:
        pvalues = np.asarray(pvalues, float)
        counted = np.asarray(analysis_mask, bool) if analysis_mask is not None else np.ones(mask.shape, bool)
        discoveries = np.zeros(mask.shape, bool)
        discoveries[counted] = benjamini_hochberg(pvalues[counted], fdr_q)
    score = np.asarray(score, float)
    affine = np.asarray(affine, float)
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        voxels = labels[box] == index          # the cluster inside its bounding box
        ijk = np.argwhere(voxels) + [s.start for s in box]
        world = affine[:3, :3] @ ijk.mean(axis=0) + affine[:3, 3]
        values = score[box][voxels]
        row = {"finding": int(index), "volume_ml": float(voxels.sum()) * voxel_ml, "n_voxels": int(voxels.sum()),
               "centre_x": float(world[0]), "centre_y": float(world[1]), "centre_z": float(world[2]),
               "template_x": None, "template_y": None, "template_z": None,
               "peak_score": float(values.max()), "mean_score": float(values.mean()),
               "min_pvalue": None, "fdr_survives": None}
        if pvalues is not None:
            row["min_pvalue"] = float(pvalues[box][voxels].min())
            if discoveries is not None:
                row["fdr_survives"] = "yes" if discoveries[box][voxels].any() else "no"
        rows.append(row)
    return labels, rows


def min_finding_voxels(min_volume_ml: float, voxel_ml: float) -> int:
    """The smallest finding in voxels: ``min_volume_ml`` in voxels of ``voxel_ml``, rounded down as
    :meth:`~bids_uad.models.settings.ScoringSettings.sized_to` sizes the cluster removal."""
    return max(1, int(min_volume_ml / voxel_ml + 1e-9)) if voxel_ml > 0 else 1


def add_template_location(rows: list[dict], template_labels: np.ndarray | None, template_affine: np.ndarray | None,
                          atlases: Sequence = (), lookup: Callable | None = None,
                          min_percent: float = 5.0) -> None:
    """Fill each row's template centre and ``region_<atlas>`` columns, in place.

    ``template_labels``: the finding label image carried to the template (nearest label);
    ``atlases``: :class:`~bids_uad.algorithms.atlases.Atlas` objects; ``lookup(atlas, coords_mm)``
    gives a label index per point (default :func:`~bids_uad.algorithms.atlases.point_labels`).
    Findings absent from ``template_labels`` (no transforms, or too small for its grid) get n/a.
    """
    from bids_uad.algorithms.atlases import cluster_regions, format_regions, point_labels

    lookup = lookup or point_labels
    for atlas in atlases:
        for row in rows:
            row[f"region_{atlas.name}"] = None
    if template_labels is None or not rows:
        return
    template_labels = np.asarray(template_labels).astype(np.int64)
    carried = set(int(v) for v in np.unique(template_labels))
    present = [r for r in rows if r["finding"] in carried]
    if not present:
        return
    ijk = np.argwhere(np.isin(template_labels, [r["finding"] for r in present]))
    ids = template_labels[tuple(ijk.T)]
    world = nib_apply(template_affine, ijk)
    for row in present:
        sel = ids == row["finding"]
        centre = world[sel].mean(axis=0)
        row["template_x"], row["template_y"], row["template_z"] = (float(c) for c in centre)
    for atlas in atlases:
        labels = lookup(atlas, world)
        for row in present:
            row[f"region_{atlas.name}"] = format_regions(cluster_regions(atlas, labels[ids == row["finding"]],
                                                                         min_percent)) or None


def nib_apply(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """Voxel indices (N, 3) -> world mm through ``affine``."""
    affine = np.asarray(affine, float)
    return np.asarray(ijk, float) @ affine[:3, :3].T + affine[:3, 3]


def region_columns(atlas_names: Sequence[str]) -> dict[str, tuple[str, str | None]]:
    """Column descriptions of the ``region_<atlas>`` columns."""
    return {f"region_{name}": (f"Regions of the {name} atlas covering at least 5 % of the cluster's voxels in "
                               "template space, with that percentage ('no label': white matter or outside the "
                               "atlas's labelled structures); see Atlases for the atlas, citation and licence", None)
            for name in atlas_names}


def deviation_signature(rows: list[dict], labels: np.ndarray, maps: Mapping[str, np.ndarray],
                        reference_mask: np.ndarray, dseg: np.ndarray | None = None,
                        z_words: float = 2.0,
                        controls: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
                        min_coverage: float = 0.5) -> None:
    """Fill each row's ``<metric>_median``, ``_percent``, ``_z``, ``_reference``, ``signature`` and
    ``reference_tissue``, in place.

    ``maps``: metric key (:data:`SIGNATURE_METRICS`) -> the subject's map on the label grid; a
    missing metric gives n/a.  Per metric the reference is:

    * ``controls`` — when ``controls`` holds the metric (key -> (the controls' per-voxel centre,
      their per-voxel robust spread, where both are defined), on the label grid; e.g. a
      template-space normative model carried back to the subject) and it is defined on at least
      ``min_coverage`` of the finding's voxels: over those voxels, the subject's median against
      the median of the controls' centres; robust z with the median of their spreads;
    * ``subject`` — otherwise: ``reference_mask`` (the subject's normal-appearing analysis mask:
      no flagged voxel) restricted, when ``dseg`` is given, to the tissue class holding most of
      the finding's voxels; its median and 1.4826 x MAD give the percent and robust z.
    """
    reference_mask = np.asarray(reference_mask, bool)
    dseg = None if dseg is None else np.asarray(dseg)
    controls = {k: v for k, v in (controls or {}).items() if v is not None}
    boxes = ndimage.find_objects(np.asarray(labels).astype(np.int64))
    cache: dict[tuple[str, str], tuple[float, float] | None] = {}

    def reference_stats(tissue: str, reference: np.ndarray, key: str) -> tuple[float, float] | None:
        """(median, 1.4826 x MAD) of metric ``key`` over the reference of ``tissue`` (computed once)."""
        if (tissue, key) not in cache:
            ref = maps[key][reference]
            centre = float(np.median(ref)) if ref.size else float("nan")
            cache[tissue, key] = None if not ref.size else (centre, MAD_TO_SD * float(np.median(np.abs(ref - centre))))
        return cache[tissue, key]

    references: dict[str, np.ndarray] = {"brain": reference_mask}
    for row in rows:
        box = boxes[row["finding"] - 1] if row["finding"] - 1 < len(boxes) else None
        if box is None:
            continue
        voxels = np.asarray(labels)[box] == row["finding"]
        tissue = "brain"
        if dseg is not None:
            classes = dseg[box][voxels].astype(np.int64)
            classes = classes[classes > 0]
            if classes.size:
                major = int(np.bincount(classes).argmax())
                name = TISSUE_NAMES.get(major, f"class {major}")
                if name not in references:
                    references[name] = reference_mask & (dseg == major)
                if references[name].sum() >= 20:
                    tissue = name
        row["reference_tissue"] = tissue
        words = []
        for key, label, _ in SIGNATURE_METRICS:
            row[f"{key}_median"] = row[f"{key}_percent"] = row[f"{key}_z"] = row[f"{key}_reference"] = None
            if maps.get(key) is None:
                continue
            values = maps[key][box][voxels]
            stats, source = None, "subject"
            if key in controls:
                centre_map, spread_map, defined = controls[key]
                covered = np.asarray(defined, bool)[box][voxels]
                if covered.any() and covered.mean() >= min_coverage:
                    values = values[covered]
                    stats = (float(np.median(np.asarray(centre_map)[box][voxels][covered])),
                             float(np.median(np.asarray(spread_map)[box][voxels][covered])))
                    source = "controls"
            if stats is None:
                stats = reference_stats(tissue, references[tissue], key)
            if stats is None:
                continue
            centre, spread = stats
            inside = float(np.median(values))
            row[f"{key}_median"] = inside
            row[f"{key}_reference"] = source
            row[f"{key}_percent"] = 100.0 * (inside - centre) / centre if centre != 0 else None
            row[f"{key}_z"] = (inside - centre) / spread if spread > 0 else None
            if row[f"{key}_z"] is not None and abs(row[f"{key}_z"]) >= z_words and row[f"{key}_percent"] is not None:
                words.append(f"{label} {row[f'{key}_percent']:+.0f} %")
        row["signature"] = ", ".join(words) if words else "none beyond |z| 2"


#: columns of the longitudinal findings match (``desc-findingsmatch_table.tsv``)
MATCH_COLUMNS: dict[str, tuple[str, str | None]] = {
    "baseline_finding": ("Finding number in the baseline session's findings table (n/a: new at follow-up)", None),
    "followup_findings": ("Follow-up finding numbers (its own findings table) overlapping the baseline finding, "
                          "largest overlap first", None),
    "status": ("matched, not found at follow-up, or new at follow-up", None),
    "dice": ("Dice of the baseline finding with the union of its matched follow-up findings (baseline dwi grid)", "1"),
    "baseline_volume_ml": ("Volume of the baseline finding on the baseline dwi grid", "mL"),
    "followup_volume_ml": ("Volume of the matched follow-up findings carried to the baseline dwi grid", "mL"),
    "volume_change_ml": ("Follow-up minus baseline volume", "mL"),
    "volume_change_percent": ("Volume change relative to the baseline volume", "%"),
}


def match_findings(baseline: np.ndarray, followup: np.ndarray, voxel_ml: float) -> list[dict]:
    """Each baseline finding against the follow-up findings in the same space.

    ``baseline``/``followup``: finding label images on one grid (the follow-up carried to the
    baseline).  Per baseline finding: the follow-up findings it overlaps (by number, largest
    overlap first), the Dice of the finding with their union, its volume at baseline and the
    volume of the matched follow-up findings (their change in mL and percent); follow-up findings
    overlapping no baseline finding are listed as new (``baseline_finding`` n/a).
    """
    baseline, followup = np.asarray(baseline, np.int64), np.asarray(followup, np.int64)
    rows = []
    matched_followups: set[int] = set()
    for b in [int(i) for i in np.unique(baseline) if i > 0]:
        voxels = baseline == b
        hits, counts = np.unique(followup[voxels & (followup > 0)], return_counts=True)
        order = np.argsort(-counts, kind="stable")
        hits = [int(hits[i]) for i in order]
        matched_followups.update(hits)
        union = np.isin(followup, hits) if hits else np.zeros_like(voxels)
        v0, v1 = float(voxels.sum()) * voxel_ml, float(union.sum()) * voxel_ml
        overlap = float((voxels & union).sum())
        rows.append({"baseline_finding": b, "followup_findings": ",".join(map(str, hits)) or None,
                     "status": "matched" if hits else "not found at follow-up",
                     "dice": 2 * overlap / (voxels.sum() + union.sum()), "baseline_volume_ml": v0,
                     "followup_volume_ml": v1 if hits else 0.0, "volume_change_ml": (v1 if hits else 0.0) - v0,
                     "volume_change_percent": 100.0 * ((v1 if hits else 0.0) - v0) / v0 if v0 else None})
    for f in [int(i) for i in np.unique(followup) if i > 0 and int(i) not in matched_followups]:
        v1 = float((followup == f).sum()) * voxel_ml
        rows.append({"baseline_finding": None, "followup_findings": str(f), "status": "new at follow-up",
                     "dice": 0.0, "baseline_volume_ml": 0.0, "followup_volume_ml": v1, "volume_change_ml": v1,
                     "volume_change_percent": None})
    return rows


def lesion_wise(written: np.ndarray, lesions: np.ndarray | None, min_voxels: int = 1) -> dict:
    """Lesion-wise detection of one written map.

    ``lesions``: lesion instance ids (0 = none; None or all 0 for a control).  Findings are the
    26-connected clusters of ``written`` of at least ``min_voxels``; a lesion is found when a
    finding overlaps it; a false finding overlaps no lesion.  Returns ``n_lesions``,
    ``n_found``, ``n_findings``, ``n_false_findings`` and ``found`` ({lesion id: bool}).
    """
    labels, n = label_clusters(written)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= max(1, min_voxels)
    keep[0] = False
    labels = np.where(keep[labels], labels, 0)
    lesions = np.zeros(labels.shape, np.int64) if lesions is None else np.asarray(lesions, np.int64)
    ids = [int(i) for i in np.unique(lesions) if i > 0]
    found = {i: bool((labels[lesions == i] > 0).any()) for i in ids}
    findings = [int(i) for i in np.flatnonzero(keep)]
    false = sum(1 for f in findings if not (lesions[labels == f] > 0).any())
    return {"n_lesions": len(ids), "n_found": int(sum(found.values())), "n_findings": len(findings),
            "n_false_findings": int(false), "found": found}
