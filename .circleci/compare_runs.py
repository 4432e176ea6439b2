#!/usr/bin/env python3
"""Compare two bids_uad output folders of the same data (the image's run against a venv run).

    compare_runs.py OUT_A OUT_B [--rtol R] [--max-differing F] [--report TSV]

Both folders must hold the same files (run identifiers and the MNI template variant are
normalized as in compare_outputs.py).  Every NIfTI image must have the same shape and affine,
and its data must agree: continuous images voxel by voxel within ``R`` times the largest
absolute value of OUT_A's image, label and mask images (integer data) on all but a fraction
``F`` of the voxels.  Exit 0 when everything agrees, 1 when not (each difference printed), 2
when a folder is missing.  ``--report`` writes one line per image (largest difference, share
of differing voxels).
"""
from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

HERE = Path(__file__).resolve().parent
TEMPLATE = re.compile(r"MNI152NLin2009[ac](?:A?Sym|Asym)")


def _list_outputs(root: Path) -> dict[str, Path]:
    """Normalized relative name -> file (compare_outputs.py's normalization, plus the template)."""
    spec = importlib.util.spec_from_file_location("compare_outputs", HERE / "compare_outputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = {}
    for path in root.rglob("*"):
        if path.is_file():
            name = TEMPLATE.sub("MNI152NLin2009*", module.normalize(path.relative_to(root).as_posix()))
            out.setdefault(name, path)
    return out


def compare_images(a: Path, b: Path, rtol: float, max_differing: float) -> tuple[bool, str, float, float]:
    """(agree, why not, largest difference relative to A's largest value, share of voxels differing)."""
    img_a, img_b = nib.load(str(a)), nib.load(str(b))
    if img_a.shape != img_b.shape:
        return False, f"shape {img_a.shape} != {img_b.shape}", np.inf, 1.0
    if not np.allclose(img_a.affine, img_b.affine, atol=1e-4):
        return False, "affines differ", np.inf, 1.0
    da, db = np.asanyarray(img_a.dataobj), np.asanyarray(img_b.dataobj)
    scale = float(np.max(np.abs(da))) if da.size else 0.0
    diff = np.abs(da.astype(np.float64) - db.astype(np.float64))
    largest = float(diff.max() / scale) if scale > 0 else float(diff.max())
    if np.issubdtype(da.dtype, np.integer) and np.issubdtype(db.dtype, np.integer):
        share = float(np.mean(diff > 0)) if da.size else 0.0
        ok = share <= max_differing
        return ok, "" if ok else f"{share:.2%} of the voxels differ", largest, share
    share = float(np.mean(diff > rtol * scale)) if da.size else 0.0
    ok = largest <= rtol
    return ok, "" if ok else f"largest difference {largest:.2e} of the maximum ({share:.2%} of voxels)", largest, share


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_a", type=Path)
    parser.add_argument("out_b", type=Path)
    parser.add_argument("--rtol", type=float, default=1e-3,
                        help="continuous images: largest difference / largest value of A (default 1e-3)")
    parser.add_argument("--max-differing", type=float, default=1e-3,
                        help="integer images: share of voxels allowed to differ (default 0.001)")
    parser.add_argument("--report", type=Path, help="write one TSV line per image")
    args = parser.parse_args(argv)
    for folder in (args.out_a, args.out_b):
        if not folder.is_dir():
            print(f"compare_runs: {folder}: no such output folder", file=sys.stderr)
            return 2
    files_a, files_b = _list_outputs(args.out_a), _list_outputs(args.out_b)
    problems = [f"only in {args.out_a}: {n}" for n in sorted(set(files_a) - set(files_b))]
    problems += [f"only in {args.out_b}: {n}" for n in sorted(set(files_b) - set(files_a))]
    rows = []
    images = sorted(n for n in set(files_a) & set(files_b) if n.endswith((".nii.gz", ".nii")))
    for name in images:
        ok, why, largest, share = compare_images(files_a[name], files_b[name], args.rtol, args.max_differing)
        rows.append(f"{name}\t{'ok' if ok else 'DIFFERENT'}\t{largest:.3g}\t{share:.4f}")
        if not ok:
            problems.append(f"differs: {name}: {why}")
    if args.report:
        args.report.write_text("image\tresult\tlargest_relative_difference\tshare_differing\n" + "\n".join(rows) + "\n")
    for line in problems:
        print(line)
    agree = len(images) - sum("differs:" in p for p in problems)
    print(f"compare_runs: {len(set(files_a) & set(files_b))} files in both, {agree} of {len(images)} images agree "
          f"(rtol {args.rtol:g}, integer images {args.max_differing:.1%} voxels)"
          + (f"; {len(problems)} problem(s)" if problems else ""), file=sys.stderr if problems else sys.stdout)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
