"""Benchmark: cost of the findings table of one written map (the plain functions, no nipype).

A ``paper``-sized map (96x96x64 at 2 mm, or ``--shape``) with ``--clusters`` spherical clusters
placed in the MNI brain; times each step: clustering and per-cluster scores/p-values/FDR
(:func:`find_findings`), the deviation signature (five metrics against the tissue reference) and
the atlas lookup (Harvard-Oxford streamed from the 4-D file, AAL), with peak memory.  The map is
already in template space here (identity), so no registration is timed.  Also checks that each
cluster is named where it was placed.  Prints a table; the last line is one JSON object.

    .venv/bin/python benchmarks/findings.py [--clusters 5] [--repeat 1]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import markdown_table, measure  # noqa: E402

from bids_uad.algorithms.atlases import DEFAULT_ATLASES, load_atlas  # noqa: E402
from bids_uad.scoring.findings import add_template_location, deviation_signature, find_findings  # noqa: E402

#: cluster centres (MNI mm) and the AAL region expected among the cluster's regions there
PLACES = [((40, -20, 55), "Precentral_R"), ((-40, -20, 55), "Precentral_L"), ((-50, -30, 5), "Temporal_Sup_L"),
          ((0, -80, 10), "Calcarine_L"), ((20, 10, 10), "Putamen_R"), ((-20, 10, 10), "Putamen_L")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clusters", type=int, default=5)
    parser.add_argument("--shape", type=int, nargs=3, default=(96, 96, 64))
    parser.add_argument("--radius-mm", type=float, default=6.0)
    args = parser.parse_args(argv)
    shape = tuple(args.shape)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -np.asarray(shape) + [0, -20, 16]   # centre the grid on the brain
    rng = np.random.default_rng(0)
    world = np.indices(shape).reshape(3, -1).T * 2.0 + affine[:3, 3]
    mask = np.zeros(shape, bool)
    places = PLACES[: args.clusters]
    for centre, _ in places:
        mask |= (np.linalg.norm(world - centre, axis=1) < args.radius_mm).reshape(shape)
    score = rng.gamma(2, 0.1, shape).astype(np.float32) + 3 * mask
    pvalues = np.where(mask, 1e-4, rng.random(shape)).astype(np.float32)
    maps = {k: rng.normal(1, 0.05, shape).astype(np.float32) * (1 + 0.3 * mask) for k in
            ("fa", "md", "ad", "rd", "dwratio")}
    dseg = np.full(shape, 3, np.int16)
    stages = []
    with measure("find_findings") as m:
        labels, rows = find_findings(mask, score, affine, pvalues, np.ones(shape, bool), 0.05, 0.5)
    stages.append(m.as_dict())
    with measure("deviation_signature") as m:
        deviation_signature(rows, labels, maps, ~mask, dseg)
    stages.append(m.as_dict())
    with measure("atlas_lookup") as m:
        atlases = [load_atlas(name) for name in DEFAULT_ATLASES]
        add_template_location(rows, labels, affine, atlases)
    stages.append(m.as_dict())
    named = 0
    for row in rows:
        centre = np.array([row["template_x"], row["template_y"], row["template_z"]])
        expected = min(places, key=lambda p: np.linalg.norm(np.asarray(p[0]) - centre))[1]
        named += expected in str(row["region_aal"])
    print(markdown_table(stages))
    for row in rows:
        print(f"finding {row['finding']}: {row['volume_ml']:.2f} mL at "
              f"({row['template_x']:.0f}, {row['template_y']:.0f}, {row['template_z']:.0f}): "
              f"{row['region_harvard_oxford']} | {row['region_aal']} | {row['signature']}")
    result = {"benchmark": "findings", "shape": list(shape), "clusters": len(rows),
              "named_as_placed": f"{named}/{len(rows)}",
              "loadavg_1min": round(os.getloadavg()[0], 1),
              **{f"{s['stage']}_s": s["wall_s"] for s in stages},
              "peak_rss_mb": max(s["peak_rss_mb"] for s in stages)}
    print(json.dumps(result))
    return 0 if named == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
