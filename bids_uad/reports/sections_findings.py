"""The findings tables that open the anomaly section, each row linked to a three-plane figure.

Read from the findings TSV and its sidecar (``*_model-<m>_desc-findings_table.tsv``); each row's
cluster is found again in the written anomaly mask (the 26-connected cluster whose size and centre
of mass match the row), so the figure outlines exactly the voxels the row describes.
"""
from __future__ import annotations

import numpy as np

from bids_uad.bids.derivatives import read_tsv
from bids_uad.bids.layout import sidecar_of
from bids_uad.reports import figures as F
from bids_uad.reports.collect import read_json, to_float
from bids_uad.reports.common import load, same_grid
from bids_uad.reports.reportlets import FigureMaker, heading, note

#: figures are drawn for the largest findings only (a poor map can have hundreds)
MAX_FIGURES = 10
COLUMNS = ("#", "volume (mL)", "centre, scanner (mm)", "centre, template (mm)", "region", "peak score",
           "min p", "FDR", "deviation signature", "compared with")


def _num(value: str, digits: int = 3) -> str:
    v = to_float(value)
    return "n/a" if not np.isfinite(v) else f"{v:.{digits}g}"


def _p(value: str) -> str:
    """A p-value: two significant digits, scientific below 0.001."""
    v = to_float(value)
    return "n/a" if not np.isfinite(v) else (f"{v:.1e}" if v < 1e-3 else f"{v:.2g}")


def _xyz(row: dict, prefix: str) -> str:
    values = [to_float(row.get(f"{prefix}_{a}")) for a in "xyz"]
    return "n/a" if not all(np.isfinite(values)) else ", ".join(f"{v:.0f}" for v in values)


def _region(row: dict, atlas: str | None) -> str:
    value = row.get(f"region_{atlas}") if atlas else None
    return value if value and value != "n/a" else "n/a"


def _reference(row: dict) -> str:
    """What the row's signature metrics are compared with, grouped: e.g. 'controls: FA, MD, mean DW
    ratio; own WM: AD, RD' (a table without <metric>_reference columns: its reference_tissue)."""
    from bids_uad.scoring.findings import SIGNATURE_METRICS

    tissue = row.get("reference_tissue")
    own = f"own {tissue}" if tissue and tissue != "n/a" else "own tissue"
    groups: dict[str, list[str]] = {}
    for key, label, _ in SIGNATURE_METRICS:
        source = row.get(f"{key}_reference")
        if source is None and row.get(f"{key}_median") not in (None, "", "n/a"):
            source = "subject"                      # older tables: the subject's tissue was the only reference
        if source in ("controls", "subject"):
            groups.setdefault("controls" if source == "controls" else own, []).append(label)
    return "; ".join(f"{name}: {', '.join(labels)}" for name, labels in groups.items()) or "n/a"


def _match_clusters(rows: list[dict], mask: np.ndarray, affine: np.ndarray) -> dict[int, np.ndarray]:
    """Finding number -> its voxels in ``mask`` (RAS grid): the cluster of the row's size whose
    centre of mass is nearest the row's scanner centre."""
    from scipy import ndimage

    from bids_uad.scoring.morphology import label_clusters

    labels, n = label_clusters(mask)
    if not n:
        return {}
    ids = np.arange(1, n + 1)
    sizes = ndimage.sum_labels(np.ones(mask.shape), labels, ids)
    centres = np.asarray(ndimage.center_of_mass(np.ones(mask.shape), labels, ids), float).reshape(-1, 3)
    world = centres @ np.asarray(affine, float)[:3, :3].T + np.asarray(affine, float)[:3, 3]
    out = {}
    for row in rows:
        centre = np.array([to_float(row.get(f"centre_{a}")) for a in "xyz"])
        size = to_float(row.get("n_voxels"))
        candidates = np.flatnonzero(sizes == size)
        if not candidates.size or not np.all(np.isfinite(centre)):
            continue
        best = candidates[np.argmin(np.linalg.norm(world[candidates] - centre, axis=1))]
        out[int(to_float(row.get("finding")))] = labels == ids[best]
    return out


def findings_items(sessions, maker: FigureMaker) -> list[dict]:
    """Items for every session: an overview of every model's findings, how to read the tables
    (once per session: atlas, deviation reference), then each model's table and one figure per
    finding."""
    items: list[dict] = []
    for ses in sessions:
        loaded = []
        for model, files in sorted(ses.anomaly.items()):
            table = files.get("findings")
            rows = read_tsv(table) if table is not None else None
            meta = (read_json(sidecar_of(table)) or {}) if table is not None else {}
            loaded.append((model, files, table, rows, meta))
        items.append(heading(f"Findings — {ses.title}"))
        items.append(_overview(ses, loaded))
        first = next((meta for *_, rows, meta in loaded if rows is not None and meta), None)
        if first:
            items.append(note(_how_to_read(first)))
        for model, files, table, rows, meta in loaded:
            items.append({**heading(f"Findings — {ses.title} — model {model}"),
                          "anchor": f"findings-{ses.prefix}-{model}"})
            if rows is None:
                items.append(note(f"Not available: findings table of model {model} "
                                  f"(dwi/{ses.prefix}_model-{model}_desc-findings_table.tsv)."))
                continue
            items += _table_and_figures(ses, model, files, table, rows, meta, maker)
    return items


#: columns of the per-session overview (one row per model)
OVERVIEW_COLUMNS = ("model", "findings", "surviving FDR", "largest (mL)", "region of the largest",
                    "smallest counted (mL)", "threshold")


def _overview(ses, loaded) -> dict:
    """One row per model: how many findings, the largest and where, and what counted as one."""
    atlas_of = lambda meta: next((a.get("Key") for a in _atlases(meta)), None)  # noqa: E731
    rows = []
    for model, _files, _table, found, meta in loaded:
        href = f"#findings-{ses.prefix}-{model}"
        if found is None:
            rows.append({"href": href, "cells": [model, "n/a", "n/a", "n/a", "n/a", "n/a", "n/a"]})
            continue
        surviving = sum(1 for r in found if r.get("fdr_survives") == "yes")
        fdr = str(surviving) if any(r.get("fdr_survives") in ("yes", "no") for r in found) else "n/a"
        largest = found[0] if found else None
        minimum = _num(meta.get("MinimumVolumeMl")) + _short_source(meta.get("MinimumVolumeSource"))
        threshold = (f"{meta.get('ThresholdMethod')} {_num(meta.get('Threshold'), 4)}"
                     if meta.get("ThresholdMethod") else "n/a")
        rows.append({"href": href, "cells": [
            model, str(len(found)), fdr, _num(largest.get("volume_ml")) if largest else "-",
            _region(largest, atlas_of(meta)) if largest else "-", minimum, threshold]})
    return {"type": "findings", "columns": list(OVERVIEW_COLUMNS), "rows": rows, "empty": "no models",
            "caption": f"Every model's findings in {ses.title} at a glance (each model's table follows)."}


def _short_source(source) -> str:
    """The sidecar's MinimumVolumeSource in a word or two, for the overview."""
    if not source:
        return ""
    text = str(source)
    short = ("calibrated on controls" if text.startswith("calibrated") else
             "--findings-min-volume" if text.startswith("--findings-min-volume") else
             "post-processing minimum" if "post-processing" in text else text)
    return f" ({short})"


def _how_to_read(meta: dict) -> str:
    """What the columns of this session's findings tables mean: the parts every model shares."""
    atlases = _atlases(meta)
    parts = ["How to read the findings tables: a finding is a 26-connected cluster of the model's written "
             "anomaly mask (after thresholding and post-processing), at least the model's smallest counted "
             "volume, largest first; FDR = yes when a voxel of the cluster is a Benjamini-Hochberg discovery"]
    if meta.get("MinimumVolumeSource"):
        parts.append(f"smallest counted volume: {meta['MinimumVolumeSource']}")
    info = atlases[0] if atlases else None
    if isinstance(info, dict):
        parts.append(f"region: {info.get('Name', info.get('Key'))} ({info.get('Citation', '')}; licence: "
                     f"{info.get('License', '')}; {info.get('Source', '')}), percent of the cluster's voxels in "
                     "template space; 'no label' is mostly white matter")
    if meta.get("DeviationReference"):
        parts.append("deviation signature, the cluster's median against a reference (column 'compared with': "
                     "controls = the healthy controls at the same template locations, own = this subject's "
                     "normal-appearing tissue of that class): " + str(meta["DeviationReference"]))
    return "; ".join(parts) + "."


def _atlases(meta: dict) -> list[dict]:
    """The sidecar's atlases, in column order (the first names the report's region column)."""
    value = meta.get("Atlases")
    return [a for a in value if isinstance(a, dict)] if isinstance(value, list) else []


def _caption(model: str, rows: list[dict], meta: dict) -> str:
    """The model's own line above its table (what every model shares is said once per session)."""
    surviving = sum(1 for r in rows if r.get("fdr_survives") == "yes")
    parts = [f"{len(rows)} finding(s) of model {model}"
             + (f", {surviving} surviving FDR" if any(r.get("fdr_survives") in ("yes", "no") for r in rows) else "")
             + f", at least {_num(meta.get('MinimumVolumeMl'))} mL" + _short_source(meta.get("MinimumVolumeSource"))]
    if meta.get("ThresholdMethod"):
        parts.append(f"threshold {meta.get('ThresholdMethod')} {_num(meta.get('Threshold'), 4)}")
    if meta.get("FDRq") is not None:
        parts.append(f"FDR at q = {_num(meta.get('FDRq'))}")
    return "; ".join(parts) + "."


def _table_and_figures(ses, model, files, table, rows, meta, maker) -> list[dict]:
    atlases = [a.get("Key") for a in _atlases(meta)]
    atlas = atlases[0] if atlases else None
    score, mask = load(files.get("score")), load(files.get("mask"))
    anchors: dict[int, str] = {}
    figures: list[dict] = []
    if score is not None and mask is not None and same_grid(score[0], mask[0]) and rows:
        binary = mask[0] > 0.5
        clusters = _match_clusters(rows[:MAX_FIGURES], binary, mask[1])
        backgrounds = []
        for key in ("md", "fa"):
            bg = load(ses.get(key))
            if bg is not None and same_grid(bg[0], score[0]):
                backgrounds.append((key.upper(), bg[0]))
        if not backgrounds:
            backgrounds = [("score", score[0])]
        values = score[0][binary]
        lo = to_float(meta.get("Threshold"))
        lo = lo if np.isfinite(lo) else float(values.min()) if values.size else 0.0
        hi = float(np.percentile(values, 99.5)) if values.size else lo + 1
        hi = hi if hi > lo else lo + 1e-6
        for row in rows[:MAX_FIGURES]:
            k = int(to_float(row.get("finding")))
            voxels = clusters.get(k)
            if voxels is None:
                continue
            centre = np.round(np.argwhere(voxels).mean(0)).astype(int)
            anchor = f"finding-{ses.prefix}-{model}-{k}"
            anchors[k] = anchor
            shown = ", ".join(name for name, _ in backgrounds)
            item = maker.figure(
                f"{ses.prefix}_model-{model}_desc-finding{k}_anomaly.svg",
                [files.get("score"), files.get("mask"), table, ses.get("md"), ses.get("fa")],
                lambda voxels=voxels, centre=centre: F.finding_planes(
                    backgrounds, score[0], voxels, centre, score[1], (lo, hi), binary & ~voxels,
                    f"{model} finding {k}"),
                f"Finding {k} of model {model}: {_num(row.get('volume_ml'))} mL, {_region(row, atlas)}; "
                f"signature {row.get('signature', 'n/a')}. Three planes through the cluster's centre on {shown}: "
                f"score above the threshold in hot colours, the finding outlined in cyan, other flagged voxels in "
                "white. (No FLAIR is shown: the FLAIR is kept in T1w space, not on the dwi grid.)",
                f"Finding {k} of {model} ({ses.title})", wide=False)
            item["anchor"] = anchor
            figures.append(item)
    table_rows = [{"href": f"#{anchors[int(to_float(r.get('finding')))]}" if int(to_float(r.get("finding"))) in anchors
                   else "",
                   "cells": [r.get("finding", "n/a"), _num(r.get("volume_ml")), _xyz(r, "centre"),
                             _xyz(r, "template"), _region(r, atlas), _num(r.get("peak_score")),
                             _p(r.get("min_pvalue")), r.get("fdr_survives", "n/a"), r.get("signature", "n/a"),
                             _reference(r)]}
                  for r in rows]
    items = [{"type": "findings", "columns": list(COLUMNS), "rows": table_rows,
              "caption": _caption(model, rows, meta), "empty": "no findings"}]
    if len(rows) > MAX_FIGURES:
        items.append(note(f"Figures of the {MAX_FIGURES} largest findings of {len(rows)}."))
    return items + figures
