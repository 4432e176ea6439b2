"""Benchmark of the anatomical stage: time, memory and accuracy per step on synthetic heads.

    .venv/bin/python benchmarks/anat.py [--preset tiny|small|paper] [--subjects 2] [--threads 1]

Runs the same algorithm calls, with the same settings, as ``init_anat_wf`` (N4 → skull strip
and T1w→template from one SyN → priors → Atropos → ventricles → FLAIR rigid → T1w→dwi SyN → labels to
dwi → analysis mask) step by step, so each step gets its own wall time and peak RSS.
Inputs: the synthetic dataset generator (``bids_uad.synthetic.generate_dataset``) when it is
available, else template-derived phantom heads (``bids_uad.algorithms.templates.phantom_head``);
the JSON says which.  The dwi reference is the truth clean b0 (``*_space-dwi_desc-clean_dwi``
volume 0) with the truth dwi brain mask.

Accuracy: Dice per tissue class in T1w space against the truth dseg; skull-strip Dice; WM
Dice of our warped dseg in dwi space against the truth ``space-dwi_dseg``; the same for the
truth T1w dseg carried by our transform (registration only); mean/median/95th-percentile
displacement error (mm) of our T1w→dwi mapping against the truth matrix on dwi brain voxels.
Prints one JSON object as the last line and saves ``benchmarks/results/anat_<preset>.{json,md}``.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from _measure import scratch_folder  # noqa: E402

from bids_uad.algorithms import intensity, masking, registration, segmentation, skullstrip  # noqa: E402
from bids_uad.algorithms.templates import find_template, phantom_head  # noqa: E402
from bids_uad.workflows.anat import DWI_REG_MOVING_MM, DWI_SYN_ITERATIONS, TEMPLATE_REG_MM  # noqa: E402

DWI_TRANSFORM = os.environ.get("BENCH_DWI_TRANSFORM", "Rigid+SyN")


# --------------------------------------------------------------------------- measuring
def _rss_mb() -> float:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cpu_s() -> float:
    """CPU seconds of this process (all threads, ANTs included): the time on an idle machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Meter:
    """Wall time and peak RSS (sampled every 50 ms) of named steps."""

    def __init__(self):
        self.steps: dict[str, dict] = {}
        self._peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_mb())
            time.sleep(0.05)

    def step(self, name):
        meter = self

        class _Ctx:
            def __enter__(self):
                meter._peak = _rss_mb()
                self.t0 = time.perf_counter()
                self.c0 = _cpu_s()
                return self

            def __exit__(self, *exc):
                wall = time.perf_counter() - self.t0
                peak = max(meter._peak, _rss_mb())
                entry = meter.steps.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0, "peak_rss_mb": 0.0, "n": 0})
                entry["wall_s"] += wall
                entry["cpu_s"] += _cpu_s() - self.c0
                entry["peak_rss_mb"] = max(entry["peak_rss_mb"], peak)
                entry["n"] += 1
                return False

        return _Ctx()

    def close(self):
        self._stop.set()
        self._thread.join(timeout=1)


# --------------------------------------------------------------------------- inputs
@dataclass
class Case:
    name: str
    t1w: nib.Nifti1Image
    flair: nib.Nifti1Image | None
    b0: nib.Nifti1Image
    dwi_mask: nib.Nifti1Image
    truth_t1w_dseg: nib.Nifti1Image
    truth_t1w_brain: nib.Nifti1Image
    truth_dwi_dseg: nib.Nifti1Image
    truth_xfm: np.ndarray            # T1w world → dwi world (points)
    lesion: nib.Nifti1Image | None = None
    extra: dict = field(default_factory=dict)


def _generator_cases(preset: str, seed: int, max_subjects: int, root: Path):
    """The sessions of the synthetic dataset in ``root``, generated there first when it has none."""
    try:
        from bids_uad.synthetic import generate_dataset  # noqa: F401
    except ImportError:
        return None, "generator not available"
    if not (root / "derivatives" / "synthetic-truth").is_dir():
        from bids_uad.synthetic import generate_dataset

        generate_dataset(root, preset=preset, seed=seed, n_jobs=1, progress=False)
    truth = root / "derivatives" / "synthetic-truth"
    t1ws = sorted(glob.glob(str(root / "sub-*" / "ses-*" / "anat" / "*_T1w.nii.gz")))
    t1ws += sorted(glob.glob(str(root / "sub-*" / "anat" / "*_T1w.nii.gz")))
    def has_dwi_truth(t1w):
        rel = Path(t1w).parent.parent.relative_to(root)
        return bool(glob.glob(str(truth / rel / "dwi" / "*_space-dwi_desc-clean_dwi.nii.gz")))

    t1ws = [p for p in t1ws if has_dwi_truth(p)]
    patients = [p for p in t1ws if "sub-pat" in p]
    controls = [p for p in t1ws if "sub-pat" not in p]
    chosen = []
    while len(chosen) < max_subjects and (patients or controls):  # alternate patient/control
        src = patients if (len(chosen) % 2 == 0 and patients) or not controls else controls
        chosen.append(src.pop(0))
    cases = []
    for t1w in chosen:
        stem = Path(t1w).name[: -len("_T1w.nii.gz")]
        rel = Path(t1w).parent.parent.relative_to(root)
        tanat, tdwi = truth / rel / "anat", truth / rel / "dwi"

        def one(folder, pattern, required=True):
            hits = sorted(glob.glob(str(folder / f"{stem}{pattern}")))
            if not hits and required:
                raise FileNotFoundError(f"{folder}/{stem}{pattern}")
            return hits[0] if hits else None

        clean = nib.load(one(tdwi, "*_space-dwi_desc-clean_dwi.nii.gz"))
        b0 = nib.Nifti1Image(np.asarray(clean.dataobj[..., 0], dtype=np.float32), clean.affine)
        flair = Path(t1w.replace("_T1w.nii.gz", "_FLAIR.nii.gz"))
        lesion = one(tanat, "*_space-T1w_desc-tumor_mask.nii.gz", required=False)
        cases.append(Case(
            name=stem, t1w=nib.load(t1w), flair=nib.load(flair) if flair.exists() else None, b0=b0,
            dwi_mask=nib.load(one(tdwi, "*_space-dwi_desc-brain_mask.nii.gz")),
            truth_t1w_dseg=nib.load(one(tanat, "*_space-T1w_dseg.nii.gz")),
            truth_t1w_brain=nib.load(one(tanat, "*_space-T1w_desc-brain_mask.nii.gz")),
            truth_dwi_dseg=nib.load(one(tdwi, "*_space-dwi_dseg.nii.gz")),
            truth_xfm=np.loadtxt(one(tanat, "*_from-T1w_to-dwi_mode-image_xfm.txt")),
            lesion=nib.load(lesion) if lesion else None,
        ))
    return cases, f"bids_uad.synthetic preset={preset} seed={seed} ({root})"


def _pose(rx, ry, rz, t):
    rx, ry, rz = np.deg2rad([rx, ry, rz])
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    rot = (np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
           @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]))
    out = np.eye(4)
    out[:3, :3] = rot
    out[:3, 3] = t
    return out


def _phantom_cases(preset: str, seed: int, max_subjects: int):
    from nibabel.processing import resample_from_to

    t1_mm, dwi_mm = (2.0, 4.0) if preset == "tiny" else (1.0, 2.4)
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(max_subjects):
        lesion_r = 15.0 if i % 2 == 0 else 0.0
        warp = 3.0 + rng.random()
        head = phantom_head(t1_mm, warp_mm=warp, lesion_radius_mm=lesion_r, seed=seed + i)
        pose = _pose(*(rng.uniform(-6, 6, 3)), rng.uniform(-5, 5, 3))
        dwi_head = phantom_head(t1_mm, pose=pose, warp_mm=warp, lesion_radius_mm=lesion_r, bias=0.0,
                                seed=seed + 100 + i)
        dseg = dwi_head["dseg"].get_fdata()
        b0 = np.select([dseg == 1, dseg == 2, dseg == 3], [1.0, 0.6, 0.45], 0.0) * 1000
        b0[dwi_head["lesion"].get_fdata() > 0] = 800
        shape = tuple(int(s * t1_mm / dwi_mm) for s in dseg.shape)
        grid_aff = np.diag([dwi_mm] * 3 + [1.0])
        grid_aff[:3, 3] = dwi_head["dseg"].affine[:3, 3]
        grid = (shape, grid_aff)
        b0_img = resample_from_to(nib.Nifti1Image(b0.astype(np.float32), dwi_head["dseg"].affine), grid, order=1)
        cases.append(Case(
            name=f"phantom{i:02d}" + ("_lesion" if lesion_r else ""), t1w=head["t1w"], flair=None,
            b0=b0_img, dwi_mask=resample_from_to(dwi_head["brain_mask"], grid, order=0),
            truth_t1w_dseg=head["dseg"], truth_t1w_brain=head["brain_mask"],
            truth_dwi_dseg=resample_from_to(dwi_head["dseg"], grid, order=0), truth_xfm=pose,
            lesion=head["lesion"] if lesion_r else None,
        ))
    return cases, f"phantom_head (template-derived) T1w {t1_mm} mm, b0 {dwi_mm} mm"


# --------------------------------------------------------------------------- one case
def _coords_image(img: nib.Nifti1Image) -> list[nib.Nifti1Image]:
    ijk = np.indices(img.shape[:3], dtype=np.float32).reshape(3, -1)
    xyz = img.affine[:3, :3] @ ijk + img.affine[:3, 3:4]
    return [nib.Nifti1Image(xyz[i].reshape(img.shape[:3]).astype(np.float32), img.affine) for i in range(3)]


def registration_error(t1w, b0, dwi_mask, forward, forward_invert, truth_xfm):
    """Displacement error (mm) of our dwi→T1w point mapping against the truth, on dwi brain voxels."""
    est = [registration.apply_transforms(c, b0, forward, "image", invert=forward_invert).get_fdata()
           for c in _coords_image(t1w)]
    mask = np.asarray(dwi_mask.dataobj) > 0
    ijk = np.argwhere(mask).T.astype(np.float64)
    world = b0.affine[:3, :3] @ ijk + b0.affine[:3, 3:4]
    true_t1 = np.linalg.inv(truth_xfm) @ np.vstack([world, np.ones((1, world.shape[1]))])
    est_pts = np.stack([e[mask] for e in est])
    err = np.linalg.norm(est_pts - true_t1[:3], axis=0)
    return {"mean": float(err.mean()), "median": float(np.median(err)), "p95": float(np.percentile(err, 95))}


def run_case(case: Case, template, meter: Meter, threads: int, seed: int) -> dict:
    """One case's anatomical stage, measured; its transforms go to a folder removed at the end."""
    with tempfile.TemporaryDirectory(prefix="bench_anat_xfm_") as xfm:
        return _run_case(case, template, meter, threads, seed, Path(xfm))


def _run_case(case: Case, template, meter: Meter, threads: int, seed: int, xfm: Path) -> dict:
    out: dict = {"case": case.name, "t1w_shape": list(case.t1w.shape[:3]),
                 "t1w_voxel_mm": float(case.t1w.header.get_zooms()[0]),
                 "dwi_shape": list(case.b0.shape[:3]), "dwi_voxel_mm": float(case.b0.header.get_zooms()[0]),
                 "has_lesion": case.lesion is not None}
    t1w = nib.Nifti1Image(np.asarray(case.t1w.dataobj, dtype=np.float32), case.t1w.affine)
    t_case, c_case = time.perf_counter(), _cpu_s()
    with meter.step("n4"):
        n4, _ = intensity.n4_correct(t1w, threads=threads, seed=seed)
    lesion = case.lesion
    with meter.step("skullstrip_to_template"):
        # as init_anat_wf: one SyN gives the brain mask and the T1w → template transform
        mask_img, brain, reg_tpl = skullstrip.strip_and_normalise(
            n4, template, lesion, out_prefix=xfm / "t1w2tpl_", resolution_mm=TEMPLATE_REG_MM,
            seed=seed, threads=threads)
    truth_brain = np.asarray(case.truth_t1w_brain.dataobj) > 0
    out["skullstrip_dice"] = masking.dice(mask_img.get_fdata(), truth_brain)
    with meter.step("priors_to_t1w"):
        priors = {k: registration.apply_transforms(template.priors[k], n4, reg_tpl.inverse, "probability")
                  for k in ("CSF", "GM", "WM")}
        vent_prior = registration.apply_transforms(template.ventricles, n4, reg_tpl.inverse, "probability")
    with meter.step("atropos"):
        dseg, probs = segmentation.segment_tissues(n4, mask_img, priors=priors, prior_weight=0.5,
                                                   seed=seed, threads=threads)  # MRF 0.2, 3 iterations
    with meter.step("ventricles"):
        vent = segmentation.ventricle_mask(dseg.get_fdata(), vent_prior.get_fdata())
    dice_t1 = segmentation.dice_per_class(dseg.get_fdata(), case.truth_t1w_dseg.get_fdata())
    out.update({"seg_dice_csf": dice_t1["CSF"], "seg_dice_gm": dice_t1["GM"], "seg_dice_wm": dice_t1["WM"],
                "ventricle_volume_ml": float(vent.sum() * np.prod(case.t1w.header.get_zooms()[:3]) / 1000)})
    if case.flair is not None:
        with meter.step("flair_to_t1w"):
            flair = nib.Nifti1Image(np.asarray(case.flair.dataobj, np.float32), case.flair.affine)
            fl_n4, _ = intensity.n4_correct_flair(flair, threads=threads, seed=seed)
            _, reg_fl = registration.register_flair(n4, fl_n4, mask_img, seed=seed, threads=threads,
                                                    out_prefix=xfm / "flair2t1w_")
        # the synthetic FLAIR shares the T1w grid and pose: the truth is the identity
        out["flair_registration_error_mm"] = registration_error(
            case.flair, case.t1w, case.truth_t1w_brain, reg_fl.forward, reg_fl.forward_invert, np.eye(4))["mean"]
    with meter.step("t1w_to_dwi"):
        # as init_anat_wf: the moving T1w brain (and lesion) at DWI_REG_MOVING_MM
        moving_mm = float(os.environ.get("BENCH_DWI_MOVING_MM", DWI_REG_MOVING_MM))
        reg_dwi = registration.register(case.b0, registration.coarse(brain, moving_mm), kind=DWI_TRANSFORM,
                                        lesion_mask=(None if lesion is None else
                                                     registration.coarse(lesion, moving_mm, order=0)),
                                        reg_iterations=(DWI_SYN_ITERATIONS,), composite=True,
                                        seed=seed, threads=threads, out_prefix=xfm / "t1w2dwi_")
    with meter.step("to_dwi"):
        dwi_dseg = registration.apply_transforms(dseg, case.b0, reg_dwi.forward, "label")
        for p in probs.values():
            registration.apply_transforms(p, case.b0, reg_dwi.forward, "probability")
        vent_img = nib.Nifti1Image(vent.astype(np.uint8), n4.affine)
        dwi_vent = registration.apply_transforms(vent_img, case.b0, reg_dwi.forward, "label")
        segmentation.analysis_mask(dwi_dseg.get_fdata(), dwi_vent.get_fdata())
    out["wall_s"] = time.perf_counter() - t_case
    out["cpu_s"] = _cpu_s() - c_case
    truth_dwi = case.truth_dwi_dseg.get_fdata()
    dice_dwi = segmentation.dice_per_class(dwi_dseg.get_fdata(), truth_dwi)
    out.update({"wm_dice_dwi_space": dice_dwi["WM"], "gm_dice_dwi_space": dice_dwi["GM"],
                "csf_dice_dwi_space": dice_dwi["CSF"]})
    truth_carried = registration.apply_transforms(case.truth_t1w_dseg, case.b0, reg_dwi.forward, "label")
    out["wm_dice_dwi_space_truth_labels"] = segmentation.dice_per_class(
        truth_carried.get_fdata(), truth_dwi)["WM"]
    err = registration_error(case.t1w, case.b0, case.dwi_mask, reg_dwi.forward, reg_dwi.forward_invert,
                             case.truth_xfm)
    out.update({"registration_error_mm": err["mean"], "registration_error_median_mm": err["median"],
                "registration_error_p95_mm": err["p95"]})
    return out


# --------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small", "paper"])
    parser.add_argument("--subjects", type=int, default=2, help="sessions to process (patients first)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=None, help="an already generated synthetic dataset")
    parser.add_argument("--phantom", action="store_true", help="use phantom heads, not the generator")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)

    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    # a generated dataset lives in a temporary folder that is removed at the end (--data is kept)
    with scratch_folder(args.data, f"bench_anat_{args.preset}_") as data:
        cases, source = (None, "phantom requested") if args.phantom else _generator_cases(
            args.preset, args.seed, args.subjects, data)
        if cases is None:
            note = source
            cases, source = _phantom_cases(args.preset, args.seed, args.subjects)
            source = f"{source} ({note})"
        template = find_template()
        meter = Meter()
        per_case = []
        t0 = time.perf_counter()
        for case in cases:
            res = run_case(case, template, meter, args.threads, args.seed)
            print(json.dumps(res), file=sys.stderr)
            per_case.append(res)
        meter.close()
    total = time.perf_counter() - t0

    def mean(key):
        vals = [c[key] for c in per_case if key in c]
        return float(np.mean(vals)) if vals else None

    result = {
        "benchmark": "anat", "preset": args.preset, "input": source,
        "dwi_reference": "truth clean b0 (space-dwi_desc-clean_dwi volume 0) + truth dwi brain mask",
        "template": template.name, "dwi_transform": DWI_TRANSFORM,
        "dwi_syn_iterations": DWI_SYN_ITERATIONS,
        "dwi_moving_mm": float(os.environ.get("BENCH_DWI_MOVING_MM", DWI_REG_MOVING_MM)), "threads": args.threads, "n_cases": len(per_case),
        "wall_s": max(c["wall_s"] for c in per_case), "wall_s_mean": mean("wall_s"), "wall_s_total": total,
        "cpu_s": max(c["cpu_s"] for c in per_case),
        "load_average_1min": os.getloadavg()[0], "cpu_count": os.cpu_count(),
        "peak_rss_mb": max(s["peak_rss_mb"] for s in meter.steps.values()),
        "seg_dice_gm": mean("seg_dice_gm"), "seg_dice_wm": mean("seg_dice_wm"),
        "seg_dice_csf": mean("seg_dice_csf"), "skullstrip_dice": mean("skullstrip_dice"),
        "wm_dice_dwi_space": mean("wm_dice_dwi_space"),
        "wm_dice_dwi_space_min": min(c["wm_dice_dwi_space"] for c in per_case),
        "wm_dice_dwi_space_truth_labels": mean("wm_dice_dwi_space_truth_labels"),
        "registration_error_mm": mean("registration_error_mm"),
        "registration_error_p95_mm": mean("registration_error_p95_mm"),
        "flair_registration_error_mm": mean("flair_registration_error_mm"),
        "steps": {k: {"wall_s_mean": v["wall_s"] / v["n"], "cpu_s_mean": v["cpu_s"] / v["n"],
                      "peak_rss_mb": v["peak_rss_mb"]}
                  for k, v in meter.steps.items()},
        "cases": per_case,
        "targets": {"wall_s": "< 180 per 1 mm T1w", "peak_rss_mb": "< 6144", "wm_dice_dwi_space": ">= 0.85"},
    }
    if not args.no_save:
        out_dir = REPO / "benchmarks" / "results"
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"anat_{args.preset}.json").write_text(json.dumps(result, indent=2) + "\n")
        (out_dir / f"anat_{args.preset}.md").write_text(_markdown(result))
    print("step            wall s    CPU s   peak MB  (mean per session)", file=sys.stderr)
    for name, st in result["steps"].items():
        print(f"{name:14s} {st['wall_s_mean']:8.1f} {st['cpu_s_mean']:8.1f} {st['peak_rss_mb']:9.0f}", file=sys.stderr)
    print(json.dumps({**{k: v for k, v in result.items() if k not in ("cases", "steps")},
                      "step_cpu_s": {k: round(v["cpu_s_mean"], 1) for k, v in result["steps"].items()}}))
    return result


def _markdown(r: dict) -> str:
    def f(v, nd=3):
        return "n/a" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))

    lines = [f"# Anatomical stage benchmark — preset `{r['preset']}`", "",
             f"Input: {r['input']}  ", f"dwi reference: {r['dwi_reference']}  ",
             f"Template: {r['template']}; ITK threads: {r['threads']}; cases: {r['n_cases']}", "",
             "| metric | value | target |", "|---|---|---|",
             f"| wall time per session (max), s | {f(r['wall_s'], 1)} | < 180 (1 mm T1w) |",
             f"| CPU time per session (max), s | {f(r['cpu_s'], 1)} | (≈ wall time on an idle machine) |",
             f"| load average during the run / cores | {f(r['load_average_1min'], 1)} / {r['cpu_count']} | |",
             f"| peak RSS, MB | {f(r['peak_rss_mb'], 0)} | < 6144 |",
             f"| segmentation Dice GM / WM / CSF | {f(r['seg_dice_gm'])} / {f(r['seg_dice_wm'])} / "
             f"{f(r['seg_dice_csf'])} | |",
             f"| skull-strip Dice | {f(r['skullstrip_dice'])} | |",
             f"| WM Dice in dwi space (mean / min) | {f(r['wm_dice_dwi_space'])} / "
             f"{f(r['wm_dice_dwi_space_min'])} | >= 0.85 |",
             f"| WM Dice in dwi space, truth labels carried by our transform | "
             f"{f(r['wm_dice_dwi_space_truth_labels'])} | |",
             f"| T1w→dwi displacement error, mean / p95 mm | {f(r['registration_error_mm'], 2)} / "
             f"{f(r['registration_error_p95_mm'], 2)} | |",
             f"| FLAIR→T1w displacement error (truth: identity), mean mm | "
             f"{f(r.get('flair_registration_error_mm'), 2)} | |", "",
             "## Steps (mean per session: wall s, CPU s, peak RSS MB)", "", "| step | wall s | CPU s | MB |",
             "|---|---|---|---|"]
    for k, v in r["steps"].items():
        lines.append(f"| {k} | {v['wall_s_mean']:.1f} | {v['cpu_s_mean']:.1f} | {v['peak_rss_mb']:.0f} |")
    lines += ["", "## Cases", "", "| case | lesion | T1w mm | seg WM | dwi WM | err mm | wall s |",
              "|---|---|---|---|---|---|---|"]
    for c in r["cases"]:
        lines.append(f"| {c['case']} | {c['has_lesion']} | {c['t1w_voxel_mm']:.1f} | {c['seg_dice_wm']:.3f} | "
                     f"{c['wm_dice_dwi_space']:.3f} | {c['registration_error_mm']:.2f} | {c['wall_s']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
