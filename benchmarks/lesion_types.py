"""Benchmark: what each synthetic lesion type does to the tensor scalars, and what it costs.

For every graded type (``bids_uad.synthetic.graded``) and severity, lesions of drawn
(realistic) volume are simulated noise-free on a preset's dwi grid, with the same anatomy
without the lesion as the reference; reported per type and severity, as medians over the
lesions' truth voxels: the MD and FA change, the change of the mean diffusion-weighted
signal, the fibre-direction change in WM (degrees) and, for the mass effect, MD and FA
against the same tissue before it was displaced.  ``--generate`` also times whole datasets
(tiny and small presets, one process) per lesion generator.  Prints a table; the last line
is one JSON object.

    .venv/bin/python benchmarks/lesion_types.py [--preset tiny] [--lesions 4] [--generate glioma mixed-hard]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bids_uad.synthetic.anatomy import SubjectAnatomy, load_template  # noqa: E402
from bids_uad.synthetic.graded import GRADED_TYPES, make_graded_lesion  # noqa: E402
from bids_uad.synthetic.presets import get_preset  # noqa: E402
from bids_uad.synthetic.simulate import (clean_dwi, compartments, dwi_signal, gradient_table,  # noqa: E402
                                         tensor_fa_md, tissue_at)


def _identity() -> SubjectAnatomy:
    return SubjectAnatomy(np.ones(3), np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0))


def _angle(a, b):
    cos = np.abs((a * b).sum(-1)) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
    return np.rad2deg(np.arccos(np.clip(cos, 0, 1)))


def measure(preset_name: str, n_lesions: int, severities=(0.0, 0.5, 1.0)) -> dict:
    tpl = load_template(2)
    preset = get_preset(preset_name)
    t0, _, clean0, fa0, md0 = clean_dwi(tpl, tpl, _identity(), None, np.eye(4), preset)
    dw0 = clean0[:, 1:].mean(1)
    bvals, bvecs = gradient_table(preset.shells)
    out = {}
    for kind in GRADED_TYPES:
        for sev in severities:
            rows, make_s = [], []
            for k in range(n_lesions):
                rng = np.random.default_rng([17, k])
                start = time.perf_counter()
                lesion = make_graded_lesion(tpl, rng, kind, sev)
                make_s.append(time.perf_counter() - start)
                t, _, clean, fa, md = clean_dwi(tpl, tpl, _identity(), lesion, np.eye(4), preset)
                region = t["tumor"] & (md0 > 0) & (md > 0)
                wm = region & (t["wm"] >= 0.5) & (t0["wm"] >= 0.5)
                row = {"volume_ml": float(region.sum() * preset.dwi_voxel_mm ** 3 / 1000),
                       "md": float(np.median(md[region] / md0[region] - 1)),
                       "fa": float(np.median(fa[region] / fa0[region] - 1)),
                       "dw": float(np.median(clean[region, 1:].mean(1) / dw0[region] - 1)),
                       "angle_deg": float(np.median(_angle(t["e_wm"][wm], t0["e_wm"][wm]))) if wm.any() else 0.0}
                if lesion.mass_amp > 0:  # against the same tissue before it was displaced
                    ts = tissue_at(tpl, tpl, _identity(), None, lesion.mass_effect_inverse(t["m"]), np.eye(4), 1.0,
                                   with_orient=True)
                    g = bvecs @ np.diag([-1.0, 1.0, 1.0])
                    fas, mds = tensor_fa_md(dwi_signal(compartments(ts), ts, bvals, g), bvals, g, ts["brain"] >= 0.5)
                    ok = region & (mds > 0)
                    row["md_vs_source"] = float(np.median(md[ok] / mds[ok] - 1))
                    row["fa_vs_source"] = float(np.median(fa[ok] / fas[ok] - 1))
                rows.append(row)
            summary = {key: round(float(np.median([r[key] for r in rows])), 4) for key in rows[0]}
            summary["make_s"] = round(float(np.median(make_s)), 3)
            out[f"{kind}@{sev:g}"] = summary
    return out


def time_generation(generators, presets=("tiny", "small")) -> dict:
    from bids_uad.synthetic import generate_dataset

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in presets:
            for gen in generators:
                start = time.monotonic()
                generate_dataset(Path(tmp) / f"{preset}-{gen}", preset=preset, seed=0, progress=False, n_jobs=1,
                                 lesion_generator=gen)
                out[f"{preset}/{gen}"] = round(time.monotonic() - start, 1)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="dwi grid of the measurement (default: tiny)")
    parser.add_argument("--lesions", type=int, default=4, help="lesions per type and severity (default: 4)")
    parser.add_argument("--generate", nargs="*", default=[], metavar="GENERATOR",
                        help="also time whole tiny and small datasets with these lesion generators")
    args = parser.parse_args(argv)
    load_template(2)
    effects = measure(args.preset, args.lesions)
    print(f"{'type@severity':18s} {'vol mL':>7s} {'dMD':>7s} {'dFA':>7s} {'dDW':>7s} {'angle':>6s} "
          f"{'dMD src':>8s} {'dFA src':>8s} {'make s':>7s}")
    for key, r in effects.items():
        print(f"{key:18s} {r['volume_ml']:7.1f} {r['md']:+7.3f} {r['fa']:+7.3f} {r['dw']:+7.3f} {r['angle_deg']:6.1f} "
              f"{r.get('md_vs_source', float('nan')):+8.3f} {r.get('fa_vs_source', float('nan')):+8.3f} "
              f"{r['make_s']:7.2f}")
    timings = time_generation(args.generate) if args.generate else {}
    for key, sec in timings.items():
        print(f"generate {key}: {sec:.1f} s")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(json.dumps({"benchmark": "lesion_types", "preset": args.preset, "lesions_per_cell": args.lesions,
                      "effects": effects, "generation_s": timings, "load_1min": load}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
