"""Benchmark: does baseline mismatch predict follow-up lesion growth better than random regions?

Uses the synthetic generator's own glioma model (``bids_uad.synthetic.lesions``) on the 2 mm
MNI template: per patient a tumour (core + solid + oedema, the visible lesion) with an
infiltration zone, and its follow-up growth into part of that zone.  A simulated detector
flags the tumour, ~80 % of the infiltration (spatially smooth misses) and a few false
positive blobs.  For each patient: the observed overlap of the mismatch (anomalous,
outside the baseline lesion) with the follow-up lesion, against randomly placed copies of
the mismatch components inside the brain minus the baseline lesion.  Controls (no tumour,
false positives only, identical sessions) give the mismatch growth, which should be zero.

No registration here (both sessions on the template grid): this measures the statistic, the
workflow test measures the registration path.  Prints a table; the last line is one JSON object.

    .venv/bin/python benchmarks/longitudinal.py [--patients 6] [--controls 3] [--permutations 200]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from scipy import ndimage as ndi


def simulate_detector(tumour, infiltration, brain, rng, sensitivity=0.8, n_fp=3):
    """Anomaly mask: tumour, most of the infiltration (smooth misses), false-positive blobs."""
    field = ndi.gaussian_filter(rng.standard_normal(brain.shape).astype(np.float32), 1.5)
    thr = np.quantile(field[infiltration], 1 - sensitivity) if infiltration.any() else 0.0
    anomaly = tumour | (infiltration & (field >= thr))
    inside = np.argwhere(brain & ~tumour & ~infiltration)
    idx = np.indices(brain.shape, dtype=np.float32)
    for _ in range(n_fp):
        c = inside[rng.integers(len(inside))]
        r = rng.uniform(1.5, 3.0)
        anomaly |= (sum((idx[i] - c[i]) ** 2 for i in range(3)) <= r * r) & brain
    return anomaly


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=6)
    parser.add_argument("--controls", type=int, default=3)
    parser.add_argument("--permutations", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--method", default="components", choices=("components", "blobs"))
    parser.add_argument("--perilesional-mm", type=float, default=20.0,
                        help="also a stricter null: random regions within this distance of the lesion (0 = off)")
    args = parser.parse_args(argv)

    from bids_uad.algorithms.longitudinal import compare_sessions
    from bids_uad.synthetic.anatomy import load_template
    from bids_uad.synthetic.lesions import grow_lesion, lesion_fields, make_lesion

    t0 = time.time()
    tpl = load_template(2)
    brain = tpl.brain > 0.5
    csf = np.clip(tpl.brain - tpl.gm - tpl.wm, 0, 1)
    analysis = brain & (tpl.gm + tpl.wm > 0.5)
    pts = np.indices(brain.shape, dtype=np.float32).reshape(3, -1)
    m = (tpl.affine[:3, :3] @ pts + tpl.affine[:3, 3:4]).astype(np.float32)
    flat = lambda a: a.reshape(-1)  # noqa: E731
    zooms = (2.0, 2.0, 2.0)

    def labels(lesion):
        f = lesion_fields(tpl, lesion, m, flat(tpl.wm), flat(csf), flat(tpl.brain))
        return {k: f[k].reshape(brain.shape) for k in ("tumor", "infiltration")}

    rows = []
    for i in range(args.patients):
        rng = np.random.default_rng(args.seed + i)
        lesion = make_lesion(tpl, rng)
        grown = grow_lesion(tpl, lesion, rng)
        base, follow = labels(lesion), labels(grown)
        anomaly = simulate_detector(base["tumor"], base["infiltration"], analysis, rng) & analysis
        stats, _ = compare_sessions(anomaly, base["tumor"], follow["tumor"], analysis, zooms,
                                    n_permutations=args.permutations, seed=args.seed + i,
                                    null_method=args.method, perilesional_mm=args.perilesional_mm)
        rows.append({"subject": f"pat{i + 1:02d}", "group": "patient", **stats})
    for i in range(args.controls):
        rng = np.random.default_rng(1000 + args.seed + i)
        none = np.zeros(brain.shape, bool)
        anomaly = simulate_detector(none, none, analysis, rng) & analysis
        stats, _ = compare_sessions(anomaly, none, none, analysis, zooms,
                                    n_permutations=args.permutations, seed=args.seed + i,
                                    null_method=args.method)
        rows.append({"subject": f"ctl{i + 1:02d}", "group": "control", **stats})

    cols = ("subject", "baseline_lesion_ml", "new_lesion_ml", "mismatch_ml", "mismatch_growth_ml",
            "overlap_fraction", "overlap_fraction_random_mean", "overlap_fraction_random_p",
            "overlap_fraction_perilesional_mean", "overlap_fraction_perilesional_p")
    short = {c: c.replace("overlap_fraction", "ovl").replace("perilesional", "peri")[:16] for c in cols}
    print("  ".join(f"{short[c]:>16s}" for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]:>16.4g}" if isinstance(r[c], float) else f"{r[c]:>16s}" for c in cols))
    pats = [r for r in rows if r["group"] == "patient"]
    ctls = [r for r in rows if r["group"] == "control"]
    summary = {
        "benchmark": "longitudinal",
        "null_method": args.method,
        "n_patients": len(pats),
        "n_controls": len(ctls),
        "permutations": args.permutations,
        "overlap_observed_median": round(float(np.median([r["overlap_fraction"] for r in pats])), 4) if pats else None,
        "overlap_random_median": round(float(np.median([r["overlap_fraction_random_mean"] for r in pats])), 4) if pats else None,
        "patients_p_below_0.05": int(sum(r["overlap_fraction_random_p"] < 0.05 for r in pats)),
        "perilesional_mm": args.perilesional_mm,
        "overlap_perilesional_median": (round(float(np.nanmedian([r["overlap_fraction_perilesional_mean"]
                                                                  for r in pats])), 4)
                                        if pats and args.perilesional_mm > 0 else None),
        "patients_perilesional_p_below_0.05": int(sum(r["overlap_fraction_perilesional_p"] < 0.05 for r in pats)),
        "control_mismatch_growth_ml_max": max((r["mismatch_growth_ml"] for r in ctls), default=None),
        "wall_s": round(time.time() - t0, 1),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
