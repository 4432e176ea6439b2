"""Benchmark of the anomaly-detection models (DAE, RecDiscNet) on synthetic arrays.

    python benchmarks/models.py [--preset tiny|paper] [--epochs N] [--controls N] [--patients N]

Trains both models with k-fold cross-validation on synthetic control subjects, calibrates
on held-out controls, then scores synthetic patients with irregular lesions and reports
per-method Dice (after the 3x3x3 opening, and without), AUROC and AUPRC, plus throughput
and peak memory.  Input: ``bids_uad.training.toydata`` tensor-model brains (array level,
no BIDS files, no preprocessing).  Prints a table, then one JSON object as the LAST line,
also written to ``benchmarks/results/models_<preset>.json``.  Not a test: no asserts.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bids_uad.scoring.inference import evaluate, infer  # noqa: E402
from bids_uad.scoring.metrics import auroc, format_table, summarise  # noqa: E402
from bids_uad.training.bundle import train_from_dwi  # noqa: E402
from bids_uad.training.settings import ORACLE_METHODS, THRESHOLD_METHODS, preset  # noqa: E402
from bids_uad.training.toydata import fibonacci_directions, make_toy_subject  # noqa: E402

PRESETS = {
    # volume shape, settings preset, grid, channels, controls, patients, epochs, folds
    "tiny": dict(shape=(22, 23, 20), settings="quick", grid=(24, 24, 24), channels=32,
                 controls=8, patients=6, epochs=20, folds=3, steps=6),
    "paper": dict(shape=(90, 90, 54), settings="paper", grid=(96, 96, 64), channels=64,
                  controls=4, patients=2, epochs=1, folds=2, steps=None),
}


class PeakRSS:
    """Peak resident memory (MB) of this process while the block runs (sampled /proc)."""

    def __enter__(self):
        self.peak, self._stop = _rss_mb(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_mb())


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def raw_dwi(sub, bvecs):
    """Raw dwi with one b0 (S0 = 1000 inside the brain), as the pipeline would provide."""
    s0 = 1000.0 * sub.mask[..., None].astype(np.float32)
    dwi = np.concatenate([s0, s0 * sub.data], -1)
    return dwi, np.r_[0.0, np.full(len(bvecs), 1000.0)], np.vstack([[0, 0, 0], bvecs])


def analysis_mask(sub) -> np.ndarray:
    """Brain eroded by one voxel, without CSF: the tissue where anomalies are scored."""
    return ndimage.binary_erosion(sub.mask) & (sub.dseg != 1)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--controls", type=int)
    ap.add_argument("--patients", type=int)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--severity", type=float, default=0.3,
                    help="lesion contrast: 1 = full oedema/necrosis tensors, lower = subtler")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    p = dict(PRESETS[args.preset])
    for key in ("epochs", "controls", "patients"):
        if getattr(args, key) is not None:
            p[key] = getattr(args, key)
    torch.set_num_threads(args.threads)
    bvecs = fibonacci_directions(p["channels"])
    controls = [make_toy_subject(p["shape"], bvecs, 1000 + i) for i in range(p["controls"])]
    patients = [make_toy_subject(p["shape"], bvecs, 2000 + i, lesion=True, severity=args.severity)
                for i in range(p["patients"])]
    results, timing, rows_by_model = {}, {}, {}
    # difficulty reference: 1 - mean diffusion-weighted signal (i.e. a mean-diffusivity detector)
    baseline = [auroc(-pat.data.mean(-1)[analysis_mask(pat)], pat.lesion[analysis_mask(pat)]) for pat in patients]
    for name in ("dae", "recdisc"):
        s = preset(p["settings"], name)
        s = replace(s, model=replace(s.model, grid=p["grid"], n_channels=p["channels"]),
                    training=replace(s.training, epochs=p["epochs"], n_folds=p["folds"], steps_per_epoch=p["steps"],
                                     patience=max(5, p["epochs"] // 3), threads=args.threads, progress=False))
        raws = [raw_dwi(c, bvecs) for c in controls]
        t0 = time.perf_counter()
        with PeakRSS() as mem_train:
            bundle = train_from_dwi(s, [r[0] for r in raws], [r[1] for r in raws], [r[2] for r in raws],
                                    [c.mask for c in controls], [f"ctrl{i:02d}" for i in range(len(controls))],
                                    analysis_masks=[analysis_mask(c) for c in controls])
        train_s = time.perf_counter() - t0
        per_epoch = lambda f: len(f.train_idx) if p["steps"] is None else p["steps"] * s.training.batch_size  # noqa: E731
        volumes = sum(len(f.history) * per_epoch(f) for f in bundle.folds)
        rows, times = [], []
        with PeakRSS() as mem_inf:
            for pat in patients:
                amask = analysis_mask(pat)
                t0 = time.perf_counter()
                res = infer(bundle, *raw_dwi(pat, bvecs), pat.mask, amask)
                times.append(time.perf_counter() - t0)
                ev = evaluate(res.score, pat.lesion, amask, name, s.scoring, bundle.calibration())
                rows.append(ev)
        methods = list(THRESHOLD_METHODS) + list(ORACLE_METHODS)
        results[name] = {
            "auroc": float(np.nanmean([r["auroc"] for r in rows])),
            "auprc": float(np.nanmean([r["auprc"] for r in rows])),
            "dice": {m: float(np.mean([r["dice_opened"][m] for r in rows])) for m in methods},
            "dice_no_opening": {m: float(np.mean([r["dice"][m] for r in rows])) for m in methods},
            "healthy_tissue_fpr": {m: float(np.mean([r["fpr"][m] for r in rows])) for m in methods},
            "best_val_loss": [f.best_val_loss for f in bundle.folds],
            "epochs_run": [len(f.history) for f in bundle.folds],
        }
        timing[name] = {"train_s": train_s, "train_volumes_per_s": volumes / train_s,
                        "train_peak_rss_mb": mem_train.peak, "inference_s": float(np.mean(times)),
                        "inference_peak_rss_mb": mem_inf.peak}
        rows_by_model[name] = [{"auroc": r["auroc"], "auprc": r["auprc"],
                                **{f"dice:{m}": r["dice_opened"][m] for m in methods}} for r in rows]
    print(format_table({m: summarise(r) for m, r in rows_by_model.items()}))
    print(format_table({m: {k: (v, 0.0) for k, v in t.items()} for m, t in timing.items()}, digits=2))
    out = {
        "preset": args.preset,
        "input": (f"bids_uad.training.toydata tensor-model brains, {p['shape']} voxels x {p['channels']} "
                  f"directions (b=1000, one b0), {p['controls']} controls, {p['patients']} patients with "
                  f"irregular lesions (severity {args.severity}); analysis mask = brain eroded by 1 voxel minus CSF; grid {p['grid']}; "
                  f"{p['epochs']} epochs max x {p['steps'] or 'one pass of'} "
                  f"batches, {p['folds']} folds; "
                  f"{args.threads} torch thread(s) on CPU"),
        "train_volumes_per_s": float(np.mean([t["train_volumes_per_s"] for t in timing.values()])),
        "train_peak_rss_mb": float(max(t["train_peak_rss_mb"] for t in timing.values())),
        "inference_s": float(np.mean([t["inference_s"] for t in timing.values()])),
        "inference_peak_rss_mb": float(max(t["inference_peak_rss_mb"] for t in timing.values())),
        "dice_note": "dice = after 3x3x3 opening (pipeline output); dice_no_opening = before; oracle-* use ground truth",
        "baseline_mean_signal_auroc": float(np.mean(baseline)),
        "timing": timing,
        "results": results,
        "cpu_count": os.cpu_count(),
    }
    dest = Path(__file__).resolve().parent / "results" / f"models_{args.preset}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
