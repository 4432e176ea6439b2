"""Benchmark of the anomaly-detection models (DAE, RecDiscNet) on synthetic data.

    python benchmarks/models.py [--input toydata|synthetic-bids] [--preset tiny|paper]
                                [--epochs N] [--controls N] [--patients N]

Trains both models with k-fold cross-validation on synthetic control subjects, calibrates
on held-out controls, then scores synthetic patients with irregular lesions and reports
per-method Dice (after the 3x3x3 opening, and without), AUROC and AUPRC, plus throughput
and peak memory, next to the mean-signal baseline (1 - mean diffusion-weighted signal ratio).

Inputs:
* ``toydata``: ``bids_uad.training.toydata`` tensor-model brains (array level, no files).
  Results: ``benchmarks/results/models_<preset>.json``.
* ``synthetic-bids``: a dataset written by ``bids_uad.synthetic.generate_dataset`` (``tiny``
  generator preset, ``lesion_generator="irregular"``), using its noise-free truth
  (``derivatives/synthetic-truth``: clean dwi, brain mask, dseg, tumour mask in dwi space),
  i.e. the models without the preprocessing's errors; the grid is sized to the data as the
  group level does.  Results: ``benchmarks/results/models_bids-<preset>.json`` and ``.md``.

Prints a table, then one JSON object as the LAST line.  Not a test: no asserts.
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

from bids_uad.bids.gradients import B0_THRESHOLD  # noqa: E402
from bids_uad.models.inputs import normalise_dwi  # noqa: E402
from bids_uad.models.settings import ORACLE_METHODS, THRESHOLD_METHODS, preset  # noqa: E402
from bids_uad.scoring.inference import evaluate, infer  # noqa: E402
from bids_uad.scoring.metrics import auprc, auroc, format_table, summarise  # noqa: E402
from bids_uad.training.fit import train_from_dwi  # noqa: E402
from bids_uad.training.toydata import fibonacci_directions, make_toy_subject  # noqa: E402

PRESETS = {
    # volume shape, settings preset, grid, channels, controls, patients, epochs, folds
    "tiny": dict(shape=(22, 23, 20), settings="quick", grid=(24, 24, 24), channels=32,
                 controls=8, patients=6, epochs=20, folds=3, steps=6),
    "paper": dict(shape=(90, 90, 54), settings="paper", grid=(96, 96, 64), channels=64,
                  controls=4, patients=2, epochs=1, folds=2, steps=None),
}
# synthetic-bids: generator preset, settings preset, controls, patients; epochs/folds/steps
# None = the settings preset's own (what `bids_uad ... group --train-preset <x>` would run)
BIDS_PRESETS = {
    "tiny": dict(generator="tiny", settings="quick", controls=4, patients=4, epochs=None, folds=None, steps=None),
    "paper": dict(generator="paper", settings="paper", controls=4, patients=2, epochs=1, folds=2, steps=None),
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


def _toy_inputs(p, severity):
    """(controls, patients) as dicts of raw dwi arrays + masks (+ lesion) from toydata."""
    bvecs = fibonacci_directions(p["channels"])
    controls, patients = [], []
    for i in range(p["controls"]):
        sub = make_toy_subject(p["shape"], bvecs, 1000 + i)
        controls.append(dict(zip(("dwi", "bvals", "bvecs"), raw_dwi(sub, bvecs)), mask=sub.mask,
                             amask=analysis_mask(sub), label=f"ctrl{i:02d}"))
    for i in range(p["patients"]):
        sub = make_toy_subject(p["shape"], bvecs, 2000 + i, lesion=True, severity=severity)
        patients.append(dict(zip(("dwi", "bvals", "bvecs"), raw_dwi(sub, bvecs)), mask=sub.mask,
                             amask=analysis_mask(sub), lesion=sub.lesion, label=f"pat{i:02d}"))
    return controls, patients


def _bids_inputs(p, seed, root: Path | None):
    """(controls, patients) from the truth of a generated synthetic BIDS dataset (ses-pre)."""
    import nibabel as nib

    from bids_uad.bids.gradients import load_gradients
    from bids_uad.synthetic import generate_dataset

    if root is None or not (root / "dataset_description.json").is_file():
        root = generate_dataset(root, preset=p["generator"], n_controls=p["controls"], n_patients=p["patients"],
                                seed=seed, lesion_generator="irregular", progress=False, n_jobs=1)
    truth = root / "derivatives" / "synthetic-truth"
    controls, patients = [], []
    for folder in sorted(truth.glob("sub-*/ses-pre/dwi")):
        stem = folder / f"{folder.parents[1].name}_ses-pre_space-dwi"
        img = nib.load(f"{stem}_desc-clean_dwi.nii.gz")
        dwi = np.asarray(img.dataobj, np.float32)
        table = load_gradients(Path(f"{stem}_desc-clean_dwi.bval"), Path(f"{stem}_desc-clean_dwi.bvec"),
                               n_volumes=dwi.shape[-1])
        mask = np.asarray(nib.load(f"{stem}_desc-brain_mask.nii.gz").dataobj) > 0
        dseg = np.asarray(nib.load(f"{stem}_dseg.nii.gz").dataobj)
        item = dict(dwi=dwi, bvals=table.bvals, bvecs=table.bvecs, mask=mask, label=folder.parents[1].name,
                    amask=ndimage.binary_erosion(mask) & (dseg != 1))
        if item["label"].startswith("sub-pat"):
            item["lesion"] = np.asarray(nib.load(f"{stem}_desc-tumor_mask.nii.gz").dataobj) > 0
            patients.append(item)
        else:
            controls.append(item)
    return controls, patients, root


def _baseline(pat) -> tuple[float, float]:
    """AUROC, AUPRC of 1 - mean diffusion-weighted signal ratio (a mean-diffusivity detector)."""
    ratio = normalise_dwi(pat["dwi"], pat["bvals"], pat["bvecs"], pat["mask"])[0].mean(-1)
    s, y = -ratio[pat["amask"]], pat["lesion"][pat["amask"]]
    return auroc(s, y), auprc(s, y)


def _markdown(out: dict) -> str:
    lines = [f"# Models benchmark: {out['input_kind']} ({out['preset']})", "", out["input"], "",
             "| model | AUROC | AUPRC | " + " | ".join(f"Dice {m}" for m in out["methods"]) + " |",
             "|---" * (3 + len(out["methods"])) + "|"]
    b = out["baseline_mean_signal"]
    lines.append(f"| 1 - mean signal (baseline) | {b['auroc']:.3f} ± {b.get('auroc_sd', 0):.3f} | "
                 f"{b['auprc']:.3f} ± {b.get('auprc_sd', 0):.3f} |"
                 + " |" * len(out["methods"]))
    for name, r in out["results"].items():
        lines.append(f"| {name} | {r['auroc']:.3f} ± {r['auroc_sd']:.3f} | {r['auprc']:.3f} ± {r['auprc_sd']:.3f} | "
                     + " | ".join(f"{r['dice'][m]:.3f}" for m in out["methods"]) + " |")
    lines += ["", "Dice after the 3x3x3 opening (the pipeline's output), mean over patients.  Without the opening:", "",
              "| model | " + " | ".join(f"Dice {m}" for m in out["methods"]) + " |", "|---" * (1 + len(out["methods"])) + "|"]
    for name, r in out["results"].items():
        lines.append(f"| {name} | " + " | ".join(f"{r['dice_no_opening'][m]:.3f}" for m in out["methods"]) + " |")
    lines += ["", "oracle-* thresholds are chosen on the ground truth before the opening (not a method; after the "
              "opening they are no upper bound).  Healthy-tissue false-positive rate per method (before opening):", ""]
    for name, r in out["results"].items():
        lines.append(f"* {name}: " + ", ".join(f"{m} {v:.4f}" for m, v in r["healthy_tissue_fpr"].items()))
    lines += ["", "Training (per model): " + "; ".join(
        f"{n} {t['train_s']:.0f} s, loss first→last epoch (fold mean) "
        f"{out['results'][n]['train_loss_first']:.4g} → {out['results'][n]['train_loss_last']:.4g}"
        for n, t in out["timing"].items()), ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", choices=("toydata", "synthetic-bids"), default="toydata")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--controls", type=int)
    ap.add_argument("--patients", type=int)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bids", type=Path, help="synthetic-bids: dataset folder to reuse or create (default: temporary)")
    ap.add_argument("--severity", type=float, default=0.3,
                    help="toydata lesion contrast: 1 = full oedema/necrosis tensors, lower = subtler")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    bids = args.input == "synthetic-bids"
    p = dict((BIDS_PRESETS if bids else PRESETS)[args.preset])
    for key in ("epochs", "controls", "patients"):
        if getattr(args, key) is not None:
            p[key] = getattr(args, key)
    torch.set_num_threads(args.threads)
    if bids:
        import tempfile
        tmp = None
        if args.bids is None:
            tmp = tempfile.TemporaryDirectory(prefix="bench-models-")
            args.bids = Path(tmp.name) / "bids"
        t0 = time.perf_counter()
        controls, patients, root = _bids_inputs(p, args.seed, args.bids)
        gen_s = time.perf_counter() - t0
        shape = controls[0]["dwi"].shape
    else:
        controls, patients = _toy_inputs(p, args.severity)
        shape = controls[0]["dwi"].shape
    results, timing, rows_by_model = {}, {}, {}
    base = [_baseline(pat) for pat in patients]
    methods = list(THRESHOLD_METHODS) + list(ORACLE_METHODS)
    for name in ("dae", "recdisc"):
        s = preset(p["settings"], name)
        if bids:  # as the group level: grid = data shape rounded up to a multiple of 2**depth
            div = 2 ** s.model.depth
            grid = tuple(int(np.ceil(n / div) * div) for n in shape[:3])
            channels = int((controls[0]["bvals"] > B0_THRESHOLD).sum())
        else:
            grid, channels = p["grid"], p["channels"]
        t = s.training
        t = replace(t, epochs=p["epochs"] or t.epochs, n_folds=p["folds"] or t.n_folds,
                    steps_per_epoch=p["steps"] if p["steps"] is not None or not bids else t.steps_per_epoch,
                    threads=args.threads, progress=False, seed=args.seed)
        if not bids:
            t = replace(t, patience=max(5, t.epochs // 3))
        s = replace(s, model=replace(s.model, grid=grid, n_channels=channels), training=t)
        t0 = time.perf_counter()
        with PeakRSS() as mem_train:
            bundle = train_from_dwi(s, [c["dwi"] for c in controls], [c["bvals"] for c in controls],
                                    [c["bvecs"] for c in controls], [c["mask"] for c in controls],
                                    [c["label"] for c in controls],
                                    analysis_masks=[c["amask"] for c in controls])
        train_s = time.perf_counter() - t0
        steps = s.training.steps_per_epoch
        per_epoch = lambda f: len(f.train_idx) if steps is None else steps * s.training.batch_size  # noqa: E731
        volumes = sum(len(f.history) * per_epoch(f) for f in bundle.folds)
        rows, times = [], []
        with PeakRSS() as mem_inf:
            for pat in patients:
                t0 = time.perf_counter()
                res = infer(bundle, pat["dwi"], pat["bvals"], pat["bvecs"], pat["mask"], pat["amask"])
                times.append(time.perf_counter() - t0)
                rows.append(evaluate(res.score, pat["lesion"], pat["amask"], name, s.scoring, bundle.calibration()))
        aurocs, auprcs = [r["auroc"] for r in rows], [r["auprc"] for r in rows]
        results[name] = {
            "auroc": float(np.nanmean(aurocs)), "auroc_sd": float(np.nanstd(aurocs, ddof=1)) if len(rows) > 1 else 0.0,
            "auprc": float(np.nanmean(auprcs)), "auprc_sd": float(np.nanstd(auprcs, ddof=1)) if len(rows) > 1 else 0.0,
            "auroc_per_patient": [float(a) for a in aurocs],
            "dice": {m: float(np.mean([r["dice_opened"][m] for r in rows])) for m in methods},
            "dice_no_opening": {m: float(np.mean([r["dice"][m] for r in rows])) for m in methods},
            "healthy_tissue_fpr": {m: float(np.mean([r["fpr"][m] for r in rows])) for m in methods},
            "best_val_loss": [f.best_val_loss for f in bundle.folds],
            "best_epoch": [f.best_epoch for f in bundle.folds],
            "epochs_run": [len(f.history) for f in bundle.folds],
            "train_loss_first": float(np.mean([f.history[0]["train_loss"] for f in bundle.folds])),
            "train_loss_last": float(np.mean([f.history[-1]["train_loss"] for f in bundle.folds])),
            "settings": {"grid": list(grid), "channels": channels, "epochs": s.training.epochs,
                         "steps_per_epoch": s.training.steps_per_epoch, "batch_size": s.training.batch_size,
                         "learning_rate": s.training.learning_rate, "folds": s.training.n_folds},
        }
        timing[name] = {"train_s": train_s, "train_volumes_per_s": volumes / train_s,
                        "train_peak_rss_mb": mem_train.peak, "inference_s": float(np.mean(times)),
                        "inference_peak_rss_mb": mem_inf.peak}
        rows_by_model[name] = [{"auroc": r["auroc"], "auprc": r["auprc"],
                                **{f"dice:{m}": r["dice_opened"][m] for m in methods}} for r in rows]
    rows_by_model["baseline"] = [{"auroc": a, "auprc": b} for a, b in base]
    print(format_table({m: summarise(r) for m, r in rows_by_model.items()}))
    print(format_table({m: {k: (v, 0.0) for k, v in t.items()} for m, t in timing.items()}, digits=2))
    if bids:
        desc = (f"bids_uad.synthetic.generate_dataset preset {p['generator']!r} (seed {args.seed}, irregular lesions), "
                f"truth clean dwi {tuple(shape)} of ses-pre, {len(controls)} controls, {len(patients)} patients; "
                "analysis mask = true brain mask eroded by 1 voxel minus CSF (true dseg); "
                f"settings preset {p['settings']!r} sized to the data as the group level does; "
                f"{args.threads} torch thread(s) on CPU; generation {gen_s:.0f} s")
    else:
        desc = (f"bids_uad.training.toydata tensor-model brains, {p['shape']} voxels x {p['channels']} "
                f"directions (b=1000, one b0), {p['controls']} controls, {p['patients']} patients with "
                f"irregular lesions (severity {args.severity}); analysis mask = brain eroded by 1 voxel minus CSF; "
                f"grid {p['grid']}; {p['epochs']} epochs max x {p['steps'] or 'one pass of'} batches, "
                f"{p['folds']} folds; {args.threads} torch thread(s) on CPU")
    out = {
        "preset": args.preset,
        "input_kind": args.input,
        "input": desc,
        "methods": methods,
        "train_volumes_per_s": float(np.mean([t["train_volumes_per_s"] for t in timing.values()])),
        "train_peak_rss_mb": float(max(t["train_peak_rss_mb"] for t in timing.values())),
        "inference_s": float(np.mean([t["inference_s"] for t in timing.values()])),
        "inference_peak_rss_mb": float(max(t["inference_peak_rss_mb"] for t in timing.values())),
        "dice_note": "dice = after 3x3x3 opening (pipeline output); dice_no_opening = before; oracle-* use ground truth",
        "baseline_mean_signal_auroc": float(np.mean([b[0] for b in base])),
        "baseline_mean_signal": {"auroc": float(np.mean([b[0] for b in base])),
                                 "auprc": float(np.mean([b[1] for b in base])),
                                 "auroc_sd": float(np.std([b[0] for b in base], ddof=1)) if len(base) > 1 else 0.0,
                                 "auprc_sd": float(np.std([b[1] for b in base], ddof=1)) if len(base) > 1 else 0.0,
                                 "auroc_per_patient": [float(b[0]) for b in base]},
        "timing": timing,
        "results": results,
        "cpu_count": os.cpu_count(),
    }
    name = f"models_bids-{args.preset}" if bids else f"models_{args.preset}"
    dest = Path(__file__).resolve().parent / "results" / f"{name}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=1) + "\n")
    dest.with_suffix(".md").write_text(_markdown(out))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
