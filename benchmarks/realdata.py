"""Real-data benchmark: the participant level on every real scanner dataset of ``../shared/realdata``.

Runs ``bids_uad BIDS OUT participant`` (a subprocess per subject, so wall time and peak memory
are the subject's own) on every subject of ``vendors_bids`` and on the Siemens XA30 AP/PA pair
and the Philips slab (laid out as a small BIDS dataset of symbolic links in the work folder),
then reads the derivatives and prints per subject:

- wall time (s), peak resident memory (MB, the largest process of the run);
- brain-mask volume (mL) and whether the mask is cut by the field of view (slab);
- median FA and MD in white matter (dseg WM: from the T1w when there is one, else from the
  diffusion tissue classes), plausibility ranges FA 0.35-0.6 and MD 0.6-0.9e-3 mm2/s at b~1000
  (MD falls with b: b1500-b2000 give lower MD, flagged but not failed);
- for opposite-PE pairs, the b0 correlation between the two phase-encoding directions in the
  brain before correction (raw first b0s) and after (corrected and aligned b0 references);
- template registration quality when a dwi→template transform exists, else why not;
- steps skipped and why (the run's warnings).

The last line is JSON: ``{"subjects": {label: {...}}, "failed": [labels], ...}``; the table
and the JSON also go to ``benchmarks/results/realdata.{md,json}``.

    PYTHONPATH=. python benchmarks/realdata.py [--subjects canon61 xa30] [--work /tmp/rd]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_uad.algorithms.masking import coverage_summary

REPO = Path(__file__).resolve().parents[1]
REALDATA = REPO.parent / "shared" / "realdata"
RESULTS = REPO / "benchmarks" / "results"
#: subjects made from the loose real files: label -> [(source stem, BIDS stem)]
EXTRA = {
    "xa30": [(REALDATA / "xa30_dwi_apa" / "17_DWI_dir80_AP", "sub-xa30_dir-AP_dwi"),
             (REALDATA / "xa30_dwi_apa" / "10_DWI_dir80_PA", "sub-xa30_dir-PA_dwi")],
    "philips": [(REALDATA / "philips_dti_b1000" / "701_DTI_Biobank_2mm_MB3S2_EPI", "sub-philips_dwi")],
}
FA_RANGE, MD_RANGE = (0.35, 0.6), (0.6e-3, 0.9e-3)
MASK_RANGE_ML = (1100, 1800)


def build_extra_dataset(root: Path) -> Path:
    """A BIDS dataset of symbolic links to the xa30 pair and the Philips slab."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "realdata extra", "BIDSVersion": "1.9.0"}))
    (root / "participants.tsv").write_text("participant_id\tgroup\n" + "".join(f"sub-{s}\tcontrol\n" for s in EXTRA))
    for label, files in EXTRA.items():
        folder = root / f"sub-{label}" / "dwi"
        folder.mkdir(parents=True, exist_ok=True)
        for src, stem in files:
            for ext in (".nii.gz", ".bval", ".bvec", ".json"):
                link = folder / (stem + ext)
                if not link.exists():
                    link.symlink_to(Path(str(src) + ext))
    return root


def run_participant(bids: Path, out: Path, work: Path, label: str, log: Path) -> dict:
    """One participant run in a subprocess: rc, wall time, peak RSS of the largest process."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "bids_uad", str(bids), str(out), "participant", "--participant-label", label,
           "-w", str(work)]
    t0 = time.perf_counter()
    with log.open("w") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024.0, 1)}


def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)


def _corr(a, b, mask) -> float:
    from bids_uad.algorithms.combine import masked_correlation

    return round(masked_correlation(a, b, mask), 4)


def primary_series(dwi_dir: Path, label: str) -> str:
    """Name prefix of the series the analysis used: the combined pair when there is one."""
    combined = dwi_dir / f"sub-{label}_space-dwi_desc-preproc_dwi.nii.gz"
    if combined.is_file():
        return f"sub-{label}"
    hits = sorted(dwi_dir.glob(f"sub-{label}*_space-dwi_desc-preproc_dwi.nii.gz"))
    return hits[0].name.split("_space-")[0] if hits else ""


def measure_outputs(out: Path, bids: Path, label: str, log: Path) -> dict:
    """Read the derivatives of one subject into the benchmark's figures."""
    dwi_dir = out / f"sub-{label}" / "dwi"
    prefix = primary_series(dwi_dir, label)
    if not prefix:
        return {"error": "no preprocessed dwi"}
    get = lambda what: dwi_dir / f"{prefix}_{what}.nii.gz"  # noqa: E731
    mask_img = nib.load(str(get("space-dwi_desc-brain_mask")))
    mask = np.asarray(mask_img.dataobj) > 0
    voxel_ml = float(np.prod(mask_img.header.get_zooms()[:3])) / 1000.0
    fa, md = _load(get("space-dwi_model-tensor_param-fa_dwimap")), _load(get("space-dwi_model-tensor_param-md_dwimap"))
    dseg_path = get("space-dwi_dseg")
    if dseg_path.is_file():
        wm = (_load(dseg_path) == 3) & mask
        wm_source = json.loads(dseg_path.with_name(dseg_path.name.replace(".nii.gz", ".json")).read_text()) \
            .get("TissueClasses", "T1w segmentation") if dseg_path.with_name(
                dseg_path.name.replace(".nii.gz", ".json")).is_file() else "T1w segmentation"
    else:
        wm, wm_source = mask & (fa > 0.25), "FA > 0.25 (no dseg)"
    coverage = coverage_summary(mask, mask_img.header.get_zooms())  # the current rule, from the mask itself
    shells = sorted({round(float(b), -2) for b in np.loadtxt(dwi_dir / f"{prefix}_space-dwi_desc-preproc_dwi.bval")
                     if b > 50})
    res = {
        "series": prefix,
        "shells": shells,
        "mask_ml": round(float(mask.sum()) * voxel_ml, 1),
        "whole_brain": coverage.get("WholeBrain"),
        "cut_axes": coverage.get("CutAxes"),
        "brain_extent_mm": coverage.get("BrainExtentMm"),
        "wm_fa_median": round(float(np.median(fa[wm])), 3) if wm.any() else None,
        "wm_md_median": round(float(np.median(md[wm])), 6) if wm.any() else None,
        "wm_from": wm_source.split(":")[0],
        "analysis_mask": (dwi_dir / f"{prefix}_space-dwi_desc-analysis_mask.nii.gz").is_file(),
    }
    res.update(pair_correlations(bids, dwi_dir, label, prefix, mask))
    res["template_fa_correlation"], res["template_registration"] = template_quality(dwi_dir, prefix, out, label)
    res["skipped"] = skipped_steps(log)
    res["checks"] = plausibility(res)
    return res


def pair_correlations(bids: Path, dwi_dir: Path, label: str, prefix: str, mask: np.ndarray) -> dict:
    """b0 correlation between the PE directions before (raw) and after (corrected + aligned)."""
    meta_path = dwi_dir / f"{prefix}_space-dwi_desc-preproc_dwi.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    runs = meta.get("CombinedRuns")
    if not runs:
        return {"pe_pair": False}
    raw = []
    for name in runs:
        path = next((bids / f"sub-{label}" / "dwi").glob(name))
        bval = np.loadtxt(str(path).replace(".nii.gz", ".bval"))
        raw.append(np.asarray(nib.load(str(path)).dataobj[..., int(np.flatnonzero(bval <= 50)[0])], np.float32))
    after = meta.get("RunCombinationSettings", {}).get("runs", [{}, {}])[1]
    return {"pe_pair": True, "b0_corr_before": _corr(raw[0], raw[1], mask),
            "b0_corr_after_correction": after.get("b0_correlation_before_alignment"),
            "b0_corr_after_correction_and_alignment": after.get("b0_correlation_after_alignment"),
            "sdc": meta.get("SusceptibilityDistortionCorrection")}


def template_quality(dwi_dir: Path, prefix: str, out: Path, label: str) -> tuple[float | None, str]:
    """(correlation of the subject's FA with the FA-like template in template space, path that ran).

    One measure for both routes (``registration.fa_template_agreement``): dwi-only subjects
    have it in the sidecar of their template-space FA; for T1w subjects the FA is carried here
    through the written transforms (dwi -> T1w -> template, one resampling) and compared in the
    same way.
    """
    warped = sorted(dwi_dir.glob(f"{prefix}_space-MNI*_model-tensor_param-fa_dwimap.json"))
    if warped:
        meta = json.loads(warped[0].read_text())
        return (meta.get("TemplateRegistrationQuality", {}).get("FACorrelationWithTemplate"),
                "dwi-only: FA -> FA-like template (affine + SyN)")
    anat = out / f"sub-{label}" / "anat"
    to_template = sorted(anat.glob("*_from-T1w_to-MNI*_xfm.h5"))
    dwi_to_t1w = sorted(anat.glob(f"{prefix}_from-dwi_to-T1w_*xfm.h5"))
    if to_template and dwi_to_t1w:
        return t1w_route_quality(dwi_dir, prefix, dwi_to_t1w[0], to_template[0]), \
            "T1w -> template (ANTs SyN) and dwi -> T1w (rigid + SyN), FA carried through both"
    return None, "none"


def t1w_route_quality(dwi_dir: Path, prefix: str, dwi_to_t1w: Path, t1w_to_template: Path) -> float:
    """FA correlation with the FA-like template for a subject registered through its T1w."""
    from bids_uad.algorithms.registration import apply_transforms, fa_template_agreement
    from bids_uad.algorithms.templates import fa_like_template, template_for_output_spaces

    name = re.search(r"_to-([A-Za-z0-9]+)_", t1w_to_template.name).group(1)
    target, target_mask = fa_like_template(template_for_output_spaces([name]))
    fa = nib.load(str(dwi_dir / f"{prefix}_space-dwi_model-tensor_param-fa_dwimap.nii.gz"))
    mask = nib.load(str(dwi_dir / f"{prefix}_space-dwi_desc-brain_mask.nii.gz"))
    fa = nib.Nifti1Image(np.asarray(fa.dataobj, np.float32) * (np.asarray(mask.dataobj) > 0), fa.affine)
    chain = [str(t1w_to_template), str(dwi_to_t1w)]  # antspyx applies the last first
    quality = fa_template_agreement(apply_transforms(fa, target, chain, "image"),
                                    apply_transforms(mask, target, chain, "mask"), target, target_mask)
    return quality["FACorrelationWithTemplate"]


_SKIP_RE = re.compile(r"\[WARNING\] (.*(skipped|nominal|partial brain coverage|polarity unknown|no T1w).*)")


def skipped_steps(log: Path) -> list[str]:
    """The run's warnings about skipped or approximated steps (deduplicated, shortened)."""
    seen = []
    for line in log.read_text(errors="replace").splitlines():
        match = _SKIP_RE.search(line)
        if match:
            text = re.sub(r" \(extent .*?mm\)|; a nominal.*| \(the correction.*", "", match.group(1))[:140]
            if text not in seen:
                seen.append(text)
    return seen


def plausibility(res: dict) -> list[str]:
    """Which figures fall outside the healthy-adult ranges at b~1000 (notes, not failures)."""
    notes = []
    fa, md = res.get("wm_fa_median"), res.get("wm_md_median")
    if fa is not None and not FA_RANGE[0] <= fa <= FA_RANGE[1]:
        notes.append(f"WM FA {fa} outside {FA_RANGE}")
    if md is not None and not MD_RANGE[0] <= md <= MD_RANGE[1]:
        notes.append(f"WM MD {md:.2e} outside {MD_RANGE} (shells {res.get('shells')})")
    if res.get("whole_brain") and not MASK_RANGE_ML[0] <= res["mask_ml"] <= MASK_RANGE_ML[1]:
        notes.append(f"whole-brain mask {res['mask_ml']} mL outside {MASK_RANGE_ML}")
    return notes


def table(subjects: dict) -> str:
    head = ("| subject | wall s | peak MB | mask mL | whole brain | WM FA | WM MD (1e-3) | b0 r before/after "
            "| template FA r (route) | skipped / notes |\n|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for label, r in subjects.items():
        md = r.get("wm_md_median")
        pair = f"{r.get('b0_corr_before')} / {r.get('b0_corr_after_correction_and_alignment')}" if r.get("pe_pair") \
            else "-"
        rows.append(f"| {label} | {r.get('wall_s')} | {r.get('peak_rss_mb')} | {r.get('mask_ml')} | "
                    f"{r.get('whole_brain')} | {r.get('wm_fa_median')} | {round(md * 1e3, 3) if md else None} | {pair} | "
                    f"{_template_cell(r)} | "
                    f"{'; '.join((r.get('skipped') or []) + (r.get('checks') or []))[:300]} |")
    return head + "\n".join(rows) + "\n"


def _template_cell(r: dict) -> str:
    """FA correlation with the template and the route (T1w or FA) it came through."""
    corr, route = r.get("template_fa_correlation"), str(r.get("template_registration") or "")
    if corr is None:
        return "no"
    return f"{corr} ({'T1w' if route.startswith('T1w') else 'FA'})"


def write_results(summary: dict, merge: bool, order: list[str]) -> None:
    """benchmarks/results/realdata.{json,md}; ``merge``: update the subjects already there."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "realdata.json"
    if merge and path.is_file():
        old = json.loads(path.read_text())
        subjects = {**old.get("subjects", {}), **summary["subjects"]}
        failed = sorted((set(old.get("failed", [])) - set(summary["subjects"])) | set(summary["failed"]))
        pending = [s for s in old.get("pending", []) if s not in subjects]
        summary = {**summary, "subjects": {k: subjects[k] for k in order if k in subjects},
                   "failed": failed, "pending": pending, "note": summary.get("note") or old.get("note", "")}
    (RESULTS / "realdata.md").write_text((summary["note"] + "\n\n" if summary.get("note") else "")
                                         + table(summary["subjects"]))
    path.write_text(json.dumps(summary, indent=1) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", nargs="+", help="labels (default: every vendors_bids subject, xa30, philips)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bids_uad_realdata"))
    parser.add_argument("--keep-done", action="store_true",
                        help="keep the subjects that succeeded in benchmarks/results/realdata.json; run the others")
    parser.add_argument("--remeasure", action="store_true",
                        help="run nothing: re-read the derivatives of an earlier run in --work with the current "
                             "measuring code, keeping its rc, wall time and memory from benchmarks/results/realdata.json")
    parser.add_argument("--note", default="", help="conditions of the measurement (machine load, code), kept with the results")
    parser.add_argument("--update", action="store_true",
                        help="with --subjects: merge the subjects into benchmarks/results/realdata.{json,md}")
    args = parser.parse_args(argv)
    vendors = REALDATA / "vendors_bids"
    extra = build_extra_dataset(args.work / "extra_bids")
    datasets = {s.name[4:]: vendors for s in sorted(vendors.glob("sub-*"))}
    datasets.update({label: extra for label in EXTRA})
    # the 0.5 mm T1w of sub-uih16 is the slowest: last
    order = sorted(datasets, key=lambda s: (s == "uih16", s))
    wanted = [s for s in order if not args.subjects or s in args.subjects]
    subjects, failed = {}, []
    previous = RESULTS / "realdata.json"
    earlier = json.loads(previous.read_text()).get("subjects", {}) if previous.is_file() else {}
    if args.keep_done:
        subjects = {k: v for k, v in earlier.items() if v.get("rc") == 0 and "error" not in v and k in wanted}
    for label in wanted:
        if label in subjects:
            continue
        bids = datasets[label]
        out, work, log = args.work / "out" / bids.name, args.work / "work" / bids.name, args.work / f"{label}.log"
        out.parent.mkdir(parents=True, exist_ok=True)
        if args.remeasure:
            run = {k: earlier.get(label, {}).get(k) for k in ("rc", "wall_s", "peak_rss_mb")}
        else:
            run = run_participant(bids, out, work, label, log)
        result = dict(run)
        if run["rc"] == 0:
            try:
                result.update(measure_outputs(out, bids, label, log))
            except Exception as exc:  # noqa: BLE001 - a benchmark reports, it does not stop
                result["error"] = f"{type(exc).__name__}: {exc}"
        if run["rc"] != 0 or "error" in result:
            failed.append(label)
            result.setdefault("error", f"exit {run['rc']}; log {log}")
        subjects[label] = result
        print(f"{label}: {json.dumps(result)}", flush=True)
        summary = {"benchmark": "realdata", "load_1min": round(os.getloadavg()[0], 2), "note": args.note,
                   "subjects": subjects,
                   "failed": failed, "pending": [s for s in wanted if s not in subjects]}
        if not args.subjects or args.update:  # written after each subject: a long run keeps what it measured
            write_results(summary, merge=bool(args.subjects), order=order)
    print(table(subjects))
    print(json.dumps(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
