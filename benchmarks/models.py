"""Benchmark of the anomaly detectors on synthetic data: every registered model and baseline.

    python benchmarks/models.py [--input toydata|synthetic-bids] [--preset tiny|small|paper]
                                [--lesions GENERATOR] [--seeds N] [--models dae recdisc ...]
                                [--epochs N] [--controls N] [--heldout-controls N] [--patients N]
                                [--train-preset quick|standard|paper] [--device cpu|cuda|auto]

    # the product's yardstick (docs/models.md): standard preset, hard lesions, 3 seeds
    python benchmarks/models.py --input synthetic-bids --preset small --lesions mixed-hard --seeds 3 \
        --train-preset standard --models cdae normative meansignal
    # training throughput (volumes/s) and peak GPU memory at the reference geometry (96x96x64 x 64)
    python benchmarks/models.py --preset paper --device cuda --models dae recdisc cdae

Per seed: generates the data, trains (or fits) every model with k-fold cross-validation on the
training controls, calibrates on each fold's held-out controls (the written map, after
post-processing, at the 1 % target), then scores the patients and *held-out controls that no
model saw in training or calibration*, and evaluates every detector with the protocol of
:mod:`bids_uad.scoring.evaluation` (AUPRC, AUROC, Dice of the written map, oracle Dice,
subject-level AUROC, held-out control FPR, per lesion-volume stratum and lesion type), next to
the one-line detectors ``1 - FA`` and ``MD`` computed by the same code on the same voxels.
Figures are mean ± SD over seeds (each seed's figure is the mean over its patients).  Each model
is also scored as a fold ensemble (``<model>[ensemble]``: the mean score of the same fitted fold
models with their pooled calibration).  Timing per model: training wall and CPU time, the load
average around it, training volumes/s, peak RSS and, on ``--device cuda``, peak GPU memory.
The JSON/MD results are rewritten after every seed.

Inputs:
* ``toydata``: ``bids_uad.training.toydata`` tensor-model brains (array level, no files).
  Results: ``benchmarks/results/models_<preset>.json``.
* ``synthetic-bids``: a dataset written by ``bids_uad.synthetic.generate_dataset`` (``tiny``
  generator preset, ``lesion_generator="irregular"``), using its noise-free truth
  (``derivatives/synthetic-truth``: clean dwi, brain mask, dseg, tumour mask in dwi space),
  i.e. the models without the preprocessing's errors; the grid is sized to the data as the
  group level does.  Results: ``benchmarks/results/models_bids-<preset>.json`` and ``.md``.

The normative model runs as its dwi-grid variant here (``model.normative_space = "dwi"``, in the
results JSON): neither input has registrations to a template (the toy brains and the synthetic
truth share one anatomy on one grid, so voxel correspondence holds without them).  The group level
of a BIDS run fits it in template space (docs/models.md).

Prints a table, then one JSON object as the LAST line.  Not a test: no asserts.
"""
from __future__ import annotations

import argparse
import csv
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
from bids_uad.errors import UsageError  # noqa: E402
from bids_uad.models import is_trainable  # noqa: E402
from bids_uad.models.bundle import resolve_device  # noqa: E402
from bids_uad.models.inputs import normalise_dwi  # noqa: E402
from bids_uad.models.settings import preset  # noqa: E402
from bids_uad.scoring.evaluation import Case, evaluate_detector, one_line_detectors  # noqa: E402
from bids_uad.scoring.inference import infer  # noqa: E402
from bids_uad.training.fit import train_from_dwi  # noqa: E402
from bids_uad.training.toydata import fibonacci_directions, make_toy_subject  # noqa: E402

MODEL_ORDER = ("dae", "recdisc", "cdae", "cevae", "normative", "meansignal")
ONE_LINE = ("1-FA", "MD")
PRESETS = {
    # volume shape, settings preset, grid, channels, controls, patients, epochs, folds
    "tiny": dict(shape=(22, 23, 20), settings="quick", grid=(24, 24, 24), channels=32,
                 controls=8, patients=6, epochs=20, folds=3, steps=6),
    # the reference geometry (96x96x64 grid, 64 channels), sized to measure training throughput
    # (volumes/s, peak memory) on a GPU: 2 folds x 2 epochs x 8 steps of the paper's batch of 4
    "paper": dict(shape=(90, 90, 54), settings="paper", grid=(96, 96, 64), channels=64,
                  controls=4, patients=2, epochs=2, folds=2, steps=8),
}
# synthetic-bids: generator preset, settings preset, controls, patients; epochs/folds/steps
# None = the settings preset's own (what `bids_uad ... group --train-preset <x>` would run)
BIDS_PRESETS = {
    "tiny": dict(generator="tiny", settings="quick", controls=4, patients=4, epochs=None, folds=None, steps=None),
    "small": dict(generator="small", settings="quick", controls=5, patients=4, epochs=None, folds=None, steps=None),
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


def _toy_inputs(p, severity, seed):
    """(controls, patients) as dicts of raw dwi arrays + masks (+ lesion) from toydata."""
    bvecs = fibonacci_directions(p["channels"])
    controls, patients = [], []
    for i in range(p["controls"] + p["heldout"]):
        sub = make_toy_subject(p["shape"], bvecs, 1000 + 100 * seed + i)
        controls.append(dict(zip(("dwi", "bvals", "bvecs"), raw_dwi(sub, bvecs)), mask=sub.mask,
                             amask=analysis_mask(sub), label=f"ctrl{i:02d}", voxel_ml=0.008))
    for i in range(p["patients"]):
        sub = make_toy_subject(p["shape"], bvecs, 2000 + 100 * seed + i, lesion=True, severity=severity)
        patients.append(dict(zip(("dwi", "bvals", "bvecs"), raw_dwi(sub, bvecs)), mask=sub.mask,
                             amask=analysis_mask(sub), lesion=sub.lesion, label=f"pat{i:02d}", voxel_ml=0.008))
    return controls, patients


def _bids_inputs(p, seed, root: Path | None, lesions: str):
    """(controls, patients) from the truth of a generated synthetic BIDS dataset (ses-pre)."""
    import nibabel as nib

    from bids_uad.bids.gradients import load_gradients
    from bids_uad.bids.lesions import find_lesion_instances
    from bids_uad.synthetic import generate_dataset

    if root is None or not (root / "dataset_description.json").is_file():
        root = generate_dataset(root, preset=p["generator"], n_controls=p["controls"] + p["heldout"],
                                n_patients=p["patients"], seed=seed, lesion_generator=lesions, progress=False,
                                n_jobs=1)
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
                    amask=ndimage.binary_erosion(mask) & (dseg != 1),
                    voxel_ml=float(np.prod(img.header.get_zooms()[:3])) / 1000.0)
        if item["label"].startswith("sub-pat"):
            lesion_path = Path(f"{stem}_desc-tumor_mask.nii.gz")
            item["lesion"] = np.asarray(nib.load(lesion_path).dataobj) > 0
            found = find_lesion_instances(lesion_path)
            if found is not None:
                item["instances"] = np.asarray(nib.load(found[0]).dataobj).astype(np.int32)
                with open(found[1], newline="") as fh:
                    item["types"] = {int(r["index"]): r["type"] for r in csv.DictReader(fh, delimiter="\t")}
            patients.append(item)
        else:
            controls.append(item)
    return controls, patients, root


def _settings(name, p, args, controls, bids):
    """The preset's settings for model ``name``, sized to the data as the group level does."""
    s = preset(args.train_preset or p["settings"], name)
    if name == "cdae" and args.cdae_score:
        s = replace(s, model=replace(s.model, score_reduction=args.cdae_score))
    shape = controls[0]["dwi"].shape
    if bids:  # as the group level: grid = data shape rounded up to a multiple of 2**depth
        div = 2 ** s.model.depth
        grid = tuple(int(np.ceil(n / div) * div) for n in shape[:3])
        channels = int((controls[0]["bvals"] > B0_THRESHOLD).sum())
    else:
        grid, channels = p["grid"], p["channels"]
    t = s.training
    t = replace(t, epochs=p["epochs"] or t.epochs, n_folds=p["folds"] or t.n_folds,
                steps_per_epoch=p["steps"] if p["steps"] is not None or not bids else t.steps_per_epoch,
                threads=args.threads, progress=args.progress, seed=args.seed, device=args.device)
    if not bids:
        t = replace(t, patience=max(5, t.epochs // 3))
    # the arrays here have no registrations (toy brains; the synthetic truth in dwi space, one anatomy):
    # the normative model is the dwi-grid variant, said so (the group level fits it in template space)
    return replace(s, model=replace(s.model, grid=grid, n_channels=channels, normative_space="dwi"), training=t,
                   scoring=s.scoring.sized_to(controls[0]["voxel_ml"]))


def _reset_gpu_peak(device: str) -> bool:
    """Reset CUDA's peak-memory counter when training runs on a GPU; True if it does."""
    cuda = resolve_device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    return cuda


def _gpu_peak_mb(cuda: bool) -> float | None:
    """Peak GPU memory allocated by torch (MiB) since the last reset; None on CPU."""
    return torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else None


def _training_volumes(bundle, s) -> int:
    """Volumes passed forward and backward in training, all folds (validation not counted):
    epochs run x (steps x batch, or one pass over the fold's training subjects)."""
    if not is_trainable(s.model.name):
        return 0  # a fitted baseline: no optimisation
    per_epoch = [s.training.steps_per_epoch * s.training.batch_size if s.training.steps_per_epoch
                 else len(f.train_idx) for f in bundle.folds]
    return int(sum(len(f.history) * n for f, n in zip(bundle.folds, per_epoch)))


def _case(item, score, written=None) -> Case:
    return Case(item["label"], score, item["amask"], written, item.get("lesion"), item.get("instances"),
                item.get("types", {}), item["voxel_ml"])


def _score_cases(bundle, patients: list, heldout: list, ensemble: bool) -> tuple[dict, list[float]]:
    """Score the patients and the held-out controls with ``bundle``: the evaluation cases per
    group and the inference time of each subject."""
    cases, times = {"patients": [], "controls": []}, []
    for group, items in (("patients", patients), ("controls", heldout)):
        for item in items:
            t0 = time.perf_counter()
            res = infer(bundle, item["dwi"], item["bvals"], item["bvecs"], item["mask"], item["amask"],
                        ensemble=ensemble)
            times.append(time.perf_counter() - t0)
            cases[group].append(_case(item, res.score, res.mask))
    return cases, times


def run_seed(p, args, seed, bids) -> dict:
    """Train, calibrate and evaluate every model (and the one-line detectors) for one seed."""
    t0 = time.perf_counter()
    if bids:
        import tempfile
        with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
            root = Path(tmp) / "bids" if args.bids is None else args.bids / f"seed-{seed}"
            controls, patients, _ = _bids_inputs(p, seed, root, args.lesions)
    else:
        controls, patients = _toy_inputs(p, args.severity, seed)
    gen_s = time.perf_counter() - t0
    train, heldout = controls[:p["controls"]], controls[p["controls"]:]
    args.seed = seed
    out = {"models": {}, "timing": {}, "generation_s": gen_s, "shape": list(controls[0]["dwi"].shape),
           "n_train_controls": len(train), "n_heldout_controls": len(heldout), "n_patients": len(patients)}
    for name in args.models:
        s = _settings(name, p, args, controls, bids)
        cuda = _reset_gpu_peak(args.device)
        t0, c0, load0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]
        with PeakRSS() as mem_train:
            bundle = train_from_dwi(s, [c["dwi"] for c in train], [c["bvals"] for c in train],
                                    [c["bvecs"] for c in train], [c["mask"] for c in train],
                                    [c["label"] for c in train], analysis_masks=[c["amask"] for c in train])
        if cuda:
            torch.cuda.synchronize()
        train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        gpu_train_mb = _gpu_peak_mb(cuda)
        volumes = _training_volumes(bundle, s)
        load1 = os.getloadavg()[0]
        with PeakRSS() as mem_inf:
            cases, times = _score_cases(bundle, patients, heldout, ensemble=False)
        result = evaluate_detector(cases["patients"], cases["controls"])
        result["threshold_method"] = s.scoring.threshold_method
        result["postprocessing"] = {"postprocess": s.scoring.postprocess,
                                    "min_cluster_voxels": s.scoring.min_cluster_voxels}
        result["calibration_controls_written_fpr"] = [f.calibration.written_fpr for f in bundle.folds]
        result["best_val_loss"] = [f.best_val_loss for f in bundle.folds]
        result["epochs_run"] = [len(f.history) for f in bundle.folds]
        result["best_epoch"] = [f.best_epoch for f in bundle.folds]
        out["models"][name] = result
        out["timing"][name] = {"train_s": train_s, "train_cpu_s": train_cpu_s, "train_peak_rss_mb": mem_train.peak,
                               "train_volumes": volumes, "train_volumes_per_s": volumes / train_s if volumes else None,
                               "train_peak_gpu_mb": gpu_train_mb, "inference_s": float(np.mean(times)),
                               "inference_peak_rss_mb": mem_inf.peak, "inference_peak_gpu_mb": _gpu_peak_mb(cuda),
                               "device": str(resolve_device(args.device)),
                               "load_average_1min_start": load0, "load_average_1min_end": load1}
        print(f"seed {seed} {name}: AUPRC {result['auprc']:.3f} AUROC {result['auroc']:.3f} Dice "
              f"{result['dice_calibrated']:.3f} (oracle {result['dice_oracle']:.3f}) subject AUROC "
              f"{result['subject_auroc']:.3f} held-out FPR {result['heldout_control_fpr']:.4f} "
              f"({train_s:.0f} s)", flush=True)
        if args.ensemble_compare and len(bundle.folds) > 1:  # the fold ensemble of the same fitted folds
            ens, times = _score_cases(bundle, patients, heldout, ensemble=True)
            key = f"{name}[ensemble]"
            out["models"][key] = evaluate_detector(ens["patients"], ens["controls"])
            out["timing"][key] = dict(out["timing"][name], inference_s=float(np.mean(times)))
            print(f"seed {seed} {key}: AUPRC {out['models'][key]['auprc']:.3f} AUROC {out['models'][key]['auroc']:.3f}"
                  f" Dice {out['models'][key]['dice_calibrated']:.3f} held-out FPR "
                  f"{out['models'][key]['heldout_control_fpr']:.4f} (mean score of {len(bundle.folds)} folds, "
                  "pooled calibration)", flush=True)
        if name == "cdae":  # the other score reduction of the same trained networks (ranking metrics only)
            other = "sum-abs" if s.model.score_reduction == "abs-sum" else "abs-sum"
            for f in bundle.folds:
                f.model.settings = replace(f.model.settings, score_reduction=other)
            alt = {"patients": [], "controls": []}
            for group, items in (("patients", patients), ("controls", heldout)):
                for item in items:
                    res = infer(bundle, item["dwi"], item["bvals"], item["bvecs"], item["mask"], item["amask"],
                                ensemble=False)
                    alt[group].append(_case(item, res.score))  # no written map: calibrated for the other score
            key = f"cdae[{other}]"
            out["models"][key] = evaluate_detector(alt["patients"], alt["controls"])
            print(f"seed {seed} {key}: AUPRC {out['models'][key]['auprc']:.3f} AUROC "
                  f"{out['models'][key]['auroc']:.3f} (same networks, score reduction {other})", flush=True)
    cases = {k: {"patients": [], "controls": []} for k in ONE_LINE}
    for group, items in (("patients", patients), ("controls", heldout)):
        for item in items:
            ratios, bv, bc = normalise_dwi(item["dwi"], item["bvals"], item["bvecs"], item["mask"])
            for k, score in one_line_detectors(ratios, bv, bc, item["mask"]).items():
                cases[k][group].append(_case(item, np.where(item["amask"], score, 0)))
    for k in ONE_LINE:
        out["models"][k] = evaluate_detector(cases[k]["patients"], cases[k]["controls"])
    return out


SCALARS = ("auprc", "auroc", "dice_calibrated", "dice_oracle", "subject_auroc", "heldout_control_fpr")


def _agg(values) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
    if not v.size:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def aggregate(per_seed: list[dict]) -> dict:
    """Mean ± SD over seeds of every scalar and of each group's AUPRC/AUROC/detection rate."""
    results = {}
    for name in per_seed[0]["models"]:
        runs = [r["models"][name] for r in per_seed]
        entry = {}
        for key in SCALARS:
            entry[key], entry[f"{key}_sd"] = _agg([r[key] for r in runs])
        for group in ("by_type", "by_volume"):
            names = sorted({g for r in runs for g in r[group]})
            entry[group] = {}
            for g in names:
                sub = [r[group][g] for r in runs if g in r[group]]
                entry[group][g] = {k: _agg([x[k] for x in sub])[0] for k in ("auprc", "auroc", "detection_rate")}
                entry[group][g]["n_lesions"] = int(sum(x["n_lesions"] for x in sub))
        results[name] = entry
    return results


def _fmt(r, key):
    return f"{r[key]:.3f} ± {r[key + '_sd']:.3f}" if np.isfinite(r.get(key, np.nan)) else "n/a"


def _markdown(out: dict) -> str:
    lines = [f"# Models benchmark: {out['input_kind']} ({out['preset']}, lesions {out['lesions']}, "
             f"{out['seeds']} seeds)", "", out["input"], "",
             "| detector | AUPRC | AUROC | Dice (written map) | oracle Dice | subject AUROC | held-out control FPR |",
             "|---|---|---|---|---|---|---|"]
    for name, r in out["results"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(r, k) for k in SCALARS) + " |")
    lines += ["", f"Written maps: threshold method from the model file (healthy-fpr, target "
              f"{out['calibration_target']:g} of healthy tissue after post-processing); `1-FA` and `MD` "
              "are one-line detectors without a calibrated threshold.  Mean ± SD over seeds.", ""]
    for group, title in (("by_volume", "lesion-volume stratum"), ("by_type", "lesion type")):
        names = sorted({g for r in out["results"].values() for g in r[group]})
        lines += [f"## AUPRC / AUROC / detection rate (written map touches the lesion) per {title}", "",
                  "| detector | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for name, r in out["results"].items():
            cells = []
            for g in names:
                x = r[group].get(g)
                cells.append("" if x is None else f"{x['auprc']:.3f} / {x['auroc']:.3f} / "
                             + ("-" if not np.isfinite(x["detection_rate"]) else f"{x['detection_rate']:.2f}")
                             + f" (n={x['n_lesions']})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Timing per model (mean over seeds): " + "; ".join(
        f"{n} train {t['train_s']:.0f} s" + (f" (CPU {t['train_cpu_s']:.0f} s)" if "train_cpu_s" in t else "")
        + (f", {t['train_volumes_per_s']:.3g} training volumes/s" if t.get("train_volumes_per_s") else "")
        + (f", peak GPU memory {t['train_peak_gpu_mb']:.0f} MiB" if t.get("train_peak_gpu_mb") else "")
        + f", inference {t['inference_s']:.1f} s" for n, t in out["timing"].items()), ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", choices=("toydata", "synthetic-bids"), default="toydata")
    ap.add_argument("--preset", choices=("tiny", "small", "paper"), default="tiny")
    ap.add_argument("--lesions", default="irregular",
                    help="synthetic-bids: the generator's --lesion-generator (default: irregular)")
    ap.add_argument("--seeds", type=int, default=1, help="repeat generation and training with seeds 0..N-1")
    ap.add_argument("--models", nargs="+", default=list(MODEL_ORDER), choices=MODEL_ORDER)
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--controls", type=int, help="training controls")
    ap.add_argument("--heldout-controls", type=int, default=3,
                    help="controls used neither in training nor in calibration (default: 3)")
    ap.add_argument("--patients", type=int)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                    help="torch device for training and inference (default: cpu); on cuda the timing also "
                         "reports the peak GPU memory")
    ap.add_argument("--train-preset", choices=("quick", "standard", "paper"),
                    help="settings preset of the networks (default: the data preset's, quick for tiny/small)")
    ap.add_argument("--cdae-score", choices=("abs-sum", "sum-abs"),
                    help="cdae score reduction over channels (default: the preset's, abs-sum)")
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--progress", action="store_true",
                    help="show the training progress bar (epoch, losses, time left) and the trainer's log on stderr")
    ap.add_argument("--no-ensemble-compare", dest="ensemble_compare", action="store_false",
                    help="do not also evaluate each model's fold ensemble (mean score of its fold models)")
    ap.add_argument("--bids", type=Path, help="synthetic-bids: folder for the generated datasets (default: temporary)")
    ap.add_argument("--severity", type=float, default=0.3,
                    help="toydata lesion contrast: 1 = full oedema/necrosis tensors, lower = subtler")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.progress:
        logging.getLogger("bids_uad.training").setLevel(logging.INFO)
    bids = args.input == "synthetic-bids"
    try:
        resolve_device(args.device)
    except UsageError as exc:
        ap.error(str(exc))
    if not bids and args.preset == "small":
        ap.error("--preset small needs --input synthetic-bids")
    p = dict((BIDS_PRESETS if bids else PRESETS)[args.preset])
    for key in ("epochs", "controls", "patients"):
        if getattr(args, key) is not None:
            p[key] = getattr(args, key)
    p["heldout"] = args.heldout_controls
    torch.set_num_threads(args.threads)
    name = f"models_bids-{args.preset}" if bids else f"models_{args.preset}"
    if bids and args.lesions != "irregular":
        name += f"_{args.lesions}"
    if args.train_preset:
        name += f"_train-{args.train_preset}"
    if args.epochs:
        name += f"_epochs-{args.epochs}"
    if args.cdae_score:
        name += f"_cdae-{args.cdae_score}"
    dest = Path(__file__).resolve().parent / "results" / f"{name}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    per_seed, first = [], args.seed  # run_seed sets args.seed to the seed it runs
    for k in range(args.seeds):  # written after every seed: a run stopped early keeps the seeds it finished
        per_seed.append(run_seed(p, args, first + k, bids))
        out = _summary(per_seed, p, args, bids, first)
        dest.write_text(json.dumps(_clean(out), indent=1, default=_json_default) + "\n")
        dest.with_suffix(".md").write_text(_markdown(out))
    print(_markdown(out))
    last = {k: v for k, v in out.items() if k != "per_seed"}
    print(json.dumps(_clean(last), default=_json_default))
    return out


def _mean_or_first(values: list):
    """Mean of numbers over seeds; the first value of anything else (None on CPU, a device name)."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return float(np.mean(values))
    return values[0]


def _summary(per_seed: list[dict], p: dict, args, bids: bool, first: int) -> dict:
    """The benchmark's output object from the seeds finished so far."""
    results = aggregate(per_seed)
    timing = {n: {k: _mean_or_first([r["timing"][n][k] for r in per_seed]) for k in per_seed[0]["timing"][n]}
              for n in per_seed[0]["timing"]}
    shape, last = per_seed[0]["shape"], first + len(per_seed) - 1
    if bids:
        desc = (f"bids_uad.synthetic.generate_dataset preset {p['generator']!r} (lesion generator {args.lesions!r}, "
                f"seeds {first}..{last}), truth clean dwi {tuple(shape)} of ses-pre, "
                f"{p['controls']} training controls, {p['heldout']} held-out controls (never trained or calibrated "
                f"on), {p['patients']} patients per seed; analysis mask = true brain mask eroded by 1 voxel minus CSF "
                f"(true dseg); settings preset {args.train_preset or p['settings']!r} sized to the data as the group "
                f"level does; {args.threads} torch thread(s) on CPU")
    else:
        desc = (f"bids_uad.training.toydata tensor-model brains, {p['shape']} voxels x {p['channels']} "
                f"directions (b=1000, one b0), {p['controls']} training + {p['heldout']} held-out controls, "
                f"{p['patients']} patients with irregular lesions (severity {args.severity}); grid {p['grid']}; "
                f"{args.threads} torch thread(s) on CPU")
    return {
        "preset": args.preset, "input_kind": args.input, "input": desc, "lesions": args.lesions if bids else "toy",
        "seeds": len(per_seed), "seeds_requested": args.seeds, "calibration_target": preset(p["settings"]).scoring.fpr,
        "normative_space": "dwi (model grid in each subject's diffusion space: these arrays have no registrations; "
                           "BIDS runs fit it in template space)",
        "metrics_note": ("auprc/auroc: voxels in the analysis mask, mean over patients; dice_calibrated: the written "
                         "map (model file's healthy-fpr threshold, post-processed); dice_oracle: best threshold on "
                         "the truth before post-processing; subject_auroc: patients vs held-out controls from the "
                         "99th-percentile score; heldout_control_fpr: fraction of held-out controls' analysis mask "
                         "flagged in the written map; <model>[ensemble]: mean score of the same fitted fold models "
                         "with the folds' pooled calibration (the plain name: the fold with the lowest validation "
                         "loss); train_cpu_s: CPU time of this process (all threads) while training; mean ± SD over "
                         "seeds"),
        "timing": timing, "results": results, "per_seed": per_seed, "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
    }


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(type(value))


def _clean(value):
    """NaN -> None (strict JSON), recursively."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (float, np.floating)) and not np.isfinite(value):
        return None
    return value

if __name__ == "__main__":
    main()
