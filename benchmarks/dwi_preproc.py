"""Benchmark of diffusion preprocessing: SDC, head motion/eddy, mask, tensor; dipy reference.

    .venv/bin/python benchmarks/dwi_preproc.py [--preset tiny|paper] [--skip-dipy] [--threads N]

One synthetic subject (``bids_uad.synthetic`` simulator: distorted, moving, eddy-current
series with its reverse-PE b0 and the truth) is corrected with the algorithms the workflow
runs; errors are measured against the truth.  dipy's affine ``motion_correction`` runs on the
same series as the reference.  The real AP/PA pair in ``../shared/realdata/xa30_dwi_apa``
gives the correlation of the two b0s inside the brain before and after correction.
Prints a table and, as its last line, one JSON object; saves
``benchmarks/results/dwi_preproc_<preset>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import markdown_table, measure  # noqa: E402

from bids_uad.bids.gradients import B0_THRESHOLD  # noqa: E402

REAL = ROOT.parent / "shared" / "realdata" / "xa30_dwi_apa"


def synthetic_subject(preset_name: str, seed: int) -> dict:
    """One subject from the project's simulator (same code as ``bids_uad.synthetic``)."""
    from bids_uad.synthetic import anatomy, presets, simulate

    preset = presets.get_preset(preset_name)
    rng = np.random.default_rng(seed)
    tpl_src = anatomy.load_template(int(getattr(preset, "t1w_source_mm", 1) or 1))
    tpl2 = anatomy.load_template(2)
    subj = anatomy.SubjectAnatomy.random(rng)
    suscept = simulate.Susceptibility.random(rng)
    head = simulate.random_pose(rng)
    out = simulate.simulate_dwi(tpl_src, tpl2, subj, None, suscept, head, preset, rng,
                                skull_scale=1.0, want_fmap=True)
    shape = tuple(out["shape"])
    return {
        "source": f"bids_uad.synthetic.simulate ({preset_name} preset, seed {seed})",
        "raw": out["raw"], "affine": out["affine"], "bvals": np.asarray(out["bvals"], float),
        "bvecs": np.asarray(out["bvecs"], float), "field": out["field"], "motion": out["motion"],
        "fmap": out["fmap"], "trt": float(preset.total_readout_time),
        "brain": np.asarray(out["truth"]["brain"]).reshape(shape) >= 0.5,
        "fa": out["fa"], "md": out["md"], "clean": out["clean"], "eddy": out["eddy"],
        "fmap_motion": np.asarray(out.get("fmap_motion", np.zeros(6)), float),
    }


def rigid_from_world(mat: np.ndarray, affine: np.ndarray, shape) -> np.ndarray:
    """dipy's static->moving world affine as (trans mm, rot rad) about the grid centre, in the
    grid's voxel-mm frame (the frame of the truth and of our estimates; world x flips for LAS)."""
    from bids_uad.algorithms.hmc import matrix_to_params

    centre = affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0) + affine[:3, 3]
    axes = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    a, b = mat[:3, :3], mat[:3, 3]
    u, _, vt = np.linalg.svd(a)
    rot = u @ vt
    out = np.eye(4)
    out[:3, :3] = axes.T @ rot @ axes
    out[:3, 3] = axes.T @ (a @ centre + b - centre)
    return matrix_to_params(out)


def motion_errors(est: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    """Mean absolute translation (mm) and rotation (degrees) errors over volumes and axes."""
    return (float(np.abs(est[:, :3] - true[:, :3]).mean()),
            float(np.rad2deg(np.abs(est[:, 3:] - true[:, 3:])).mean()))


def real_pair(threads: int) -> dict:
    import nibabel as nib
    from scipy import ndimage

    from bids_uad.algorithms.sdc import estimate_sdc

    ap_img = nib.load(str(REAL / "17_DWI_dir80_AP.nii.gz"))
    ap = np.asarray(ap_img.dataobj[..., 0], np.float32)
    pa = np.asarray(nib.load(str(REAL / "10_DWI_dir80_PA.nii.gz")).dataobj[..., 0], np.float32)
    trt = json.loads((REAL / "17_DWI_dir80_AP.json").read_text())["TotalReadoutTime"]
    with measure("real_sdc") as m:
        res = estimate_sdc([ap, pa], [-trt, trt], 1, zooms=ap_img.header.get_zooms()[:3])
    from bids_uad.algorithms.masking import brain_mask

    mask = ndimage.binary_dilation(brain_mask(0.5 * (res.corrected[0] + res.corrected[1])), iterations=1)
    mask |= ndimage.binary_dilation(brain_mask(0.5 * (ap + pa)), iterations=1)

    def corr(a, b):
        return float(np.corrcoef(a[mask], b[mask])[0, 1])

    return {"real_apa_corr_before": round(corr(ap, pa), 4),
            "real_rpe_movement": [round(float(v), 3)
                                  for v in np.r_[res.movement[1, :3], np.rad2deg(res.movement[1, 3:])]],
            "real_apa_corr_after": round(corr(res.corrected[0], res.corrected[1]), 4),
            "real_sdc_s": round(m.wall_s, 2), "real_mask_voxels": int(mask.sum())}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper", choices=("tiny", "small", "paper"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (dipy is single-threaded)")
    parser.add_argument("--skip-dipy", action="store_true", help="do not run dipy's motion_correction")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from bids_uad.algorithms.hmc import correct_motion
    from bids_uad.algorithms.masking import brain_mask, dice
    from bids_uad.algorithms.sdc import estimate_sdc
    from bids_uad.algorithms.tensor import fit_tensor

    t_all = time.perf_counter()
    with measure("simulate") as m_sim:
        subj = synthetic_subject(args.preset, args.seed)
    raw, trt, brain = subj["raw"], subj["trt"], subj["brain"]
    shape = raw.shape[:3]
    zooms = tuple(float(z) for z in np.sqrt((subj["affine"][:3, :3] ** 2).sum(0)))
    is_b0 = subj["bvals"] <= B0_THRESHOLD
    stages = [m_sim]

    with measure("sdc") as m_sdc:
        b0 = raw[..., int(np.flatnonzero(is_b0)[0])]
        sdc = estimate_sdc([b0, subj["fmap"]], [-trt, trt], 1, zooms=zooms)
    resid = np.abs(sdc.field_hz - subj["field"]) * trt
    # the reverse-PE b0's translation along PE is not identifiable (a constant field offset does
    # the same): the field absorbs half of it, which is part of this residual
    mv_err = sdc.movement[1] - subj["fmap_motion"]
    m_sdc.extra = {"median_residual_vox": round(float(np.median(resid[brain])), 4),
                   "rpe_true_movement": [round(float(v), 4) for v in np.r_[subj["fmap_motion"][:3],
                                                                            np.rad2deg(subj["fmap_motion"][3:])]],
                   "rpe_movement_error_mm_deg": [round(float(v), 4) for v in np.r_[mv_err[:3], np.rad2deg(mv_err[3:])]],
                   "p90_residual_vox": round(float(np.percentile(resid[brain], 90)), 4),
                   "true_median_abs_disp_vox": round(float(np.median(np.abs(subj["field"][brain]) * trt)), 3)}
    stages.append(m_sdc)

    with measure("hmc") as m_hmc:
        hmc = correct_motion(raw, subj["bvals"], subj["bvecs"], zooms, pe_axis=1,
                             disp_vox=sdc.field_hz * (-trt), affine_det_positive=np.linalg.det(subj["affine"]) > 0)
    t_err, r_err = motion_errors(hmc.motion, subj["motion"])
    m_hmc.extra = {"translation_error_mm": round(t_err, 4), "rotation_error_deg": round(r_err, 4)}
    stages.append(m_hmc)

    with measure("mask") as m_mask:
        b0_ref = hmc.corrected[..., is_b0].mean(-1)
        mask = brain_mask(b0_ref)
    m_mask.extra = {"dice_vs_truth": round(dice(mask, brain), 4)}
    stages.append(m_mask)

    with measure("tensor") as m_ten:
        maps = fit_tensor(hmc.corrected, subj["bvals"], hmc.bvecs, mask)
    core = mask & brain
    m_ten.extra = {"fa_median_abs_error": round(float(np.median(np.abs(maps["fa"] - subj["fa"])[core])), 4),
                   "md_median_rel_error": round(float(np.median(np.abs(maps["md"] - subj["md"])[core]
                                                                / np.maximum(subj["md"][core], 1e-6))), 4)}
    stages.append(m_ten)
    step_s = sum(m.wall_s for m in (m_sdc, m_hmc, m_mask, m_ten))
    step_peak = max(m.peak_rss_mb for m in (m_sdc, m_hmc, m_mask, m_ten))

    result = {
        "preset": args.preset, "data": subj["source"], "shape": list(raw.shape), "threads": args.threads,
        "wall_s": round(step_s, 2), "peak_rss_mb": round(step_peak, 1),
        "sdc_s": round(m_sdc.wall_s, 2), "sdc_median_residual_vox": m_sdc.extra["median_residual_vox"],
        "sdc_rpe_translation_error_mm": round(float(np.abs(np.delete(mv_err[:3], 1)).mean()), 4),
        "sdc_rpe_rotation_error_deg": round(float(np.rad2deg(np.abs(mv_err[3:])).mean()), 4),
        "hmc_s": round(m_hmc.wall_s, 2), "hmc_translation_error_mm": round(t_err, 4),
        "hmc_rotation_error_deg": round(r_err, 4),
        "mask_dice": m_mask.extra["dice_vs_truth"], "tensor_s": round(m_ten.wall_s, 2),
        "fa_median_abs_error": m_ten.extra["fa_median_abs_error"],
        "dipy_hmc_s": None, "dipy_translation_error_mm": None, "dipy_rotation_error_deg": None,
        "hmc_speedup_vs_dipy": None,
    }

    if not args.skip_dipy:
        from dipy.align import motion_correction
        from dipy.core.gradients import gradient_table

        gtab = gradient_table(np.where(is_b0, 0, subj["bvals"]), bvecs=subj["bvecs"], b0_threshold=50)
        with measure("dipy_hmc_affine") as m_dipy:
            _, reg = motion_correction(raw, gtab, affine=subj["affine"], b0_ref=int(np.flatnonzero(is_b0)[0]))
        reg = np.asarray(reg)
        dparams = np.stack([rigid_from_world(reg[..., i], subj["affine"], shape) for i in range(reg.shape[-1])])
        dt, dr = motion_errors(dparams, subj["motion"])
        m_dipy.extra = {"translation_error_mm": round(dt, 4), "rotation_error_deg": round(dr, 4)}
        stages.append(m_dipy)
        result.update(dipy_hmc_s=round(m_dipy.wall_s, 2), dipy_translation_error_mm=round(dt, 4),
                      dipy_rotation_error_deg=round(dr, 4), hmc_speedup_vs_dipy=round(m_dipy.wall_s / m_hmc.wall_s, 2))

    if REAL.exists():
        result.update(real_pair(args.threads))
    else:
        result.update(real_apa_corr_before=None, real_apa_corr_after=None)
    result["total_benchmark_s"] = round(time.perf_counter() - t_all, 1)
    result["machine"] = f"{platform.machine()}, {platform.python_version()}, torch threads {args.threads}"
    result["targets"] = {
        "hmc_speedup_vs_dipy>=5": None if result["hmc_speedup_vs_dipy"] is None else result["hmc_speedup_vs_dipy"] >= 5,
        "sdc_s<60": result["sdc_s"] < 60, "sdc_median_residual_vox<0.2": result["sdc_median_residual_vox"] < 0.2,
        "wall_s<180": result["wall_s"] < 180, "peak_rss_mb<4096": result["peak_rss_mb"] < 4096,
    }

    rows = [m.as_dict() for m in stages]
    table = markdown_table(rows)
    print(table)
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"dwi_preproc_{args.preset}.json").write_text(json.dumps({**result, "stages": rows}, indent=2) + "\n")
    summary = markdown_table([{k: v for k, v in result.items() if not isinstance(v, dict)}])
    (out_dir / f"dwi_preproc_{args.preset}.md").write_text(
        f"# dwi preprocessing benchmark ({args.preset})\n\n{table}\n\n{summary}\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
