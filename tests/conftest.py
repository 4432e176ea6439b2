"""Shared fixtures: paths to ``../shared/realdata`` and a small hand-built BIDS dataset."""
from __future__ import annotations

import os

# one BLAS/OpenMP thread per process, as `make test` exports: set before numpy/torch load their
# thread pools.  With the default (one thread per core) torch's OpenMP workers spin on a shared
# 2-core machine: the head-motion tests took 10x the CPU time (23.5 s instead of 2.3 s each).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
REALDATA = REPO.parent / "shared" / "realdata"


@pytest.fixture(scope="session")
def realdata() -> Path:
    if not REALDATA.is_dir():
        pytest.skip(f"shared real data not found at {REALDATA}")
    return REALDATA


def _write_dwi(folder: Path, stem: str, n_dirs: int = 6, pe: str = "j-", shape=(8, 8, 6)) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    n = n_dirs + 1
    data = (rng.random((*shape, n)) * 100 + 50).astype(np.float32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(data, affine), folder / f"{stem}_dwi.nii.gz")
    dirs = rng.normal(size=(n_dirs, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    bvecs = np.vstack([[0, 0, 0], dirs])
    (folder / f"{stem}_dwi.bval").write_text(" ".join(["0"] + ["1000"] * n_dirs) + "\n")
    (folder / f"{stem}_dwi.bvec").write_text("\n".join(" ".join(f"{v:.6f}" for v in row) for row in bvecs.T) + "\n")
    (folder / f"{stem}_dwi.json").write_text(json.dumps({"PhaseEncodingDirection": pe, "TotalReadoutTime": 0.05}))
    return folder / f"{stem}_dwi.nii.gz"


def _write_anat(folder: Path, stem: str, suffix: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(1).random((10, 12, 10)).astype(np.float32)
    path = folder / f"{stem}_{suffix}.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.0, 1.0])), path)
    (folder / f"{stem}_{suffix}.json").write_text("{}")
    return path


def build_small_bids(root: Path, n_controls: int = 3, n_patients: int = 1, with_rpe: bool = True) -> Path:
    """A valid little BIDS dataset with real (tiny) images: dwi + bval/bvec/json, T1w, FLAIR, fmap."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "test", "BIDSVersion": "1.9.0"}))
    (root / "README").write_text("test dataset\n")
    rows = ["participant_id\tgroup\tage\tsex"]
    labels = [f"ctrl{i:02d}" for i in range(1, n_controls + 1)] + [f"pat{i:02d}" for i in range(1, n_patients + 1)]
    for label in labels:
        group = "control" if label.startswith("ctrl") else "patient"
        rows.append(f"sub-{label}\t{group}\t40\tF")
        sdir = root / f"sub-{label}" / "ses-pre"
        stem = f"sub-{label}_ses-pre"
        _write_dwi(sdir / "dwi", f"{stem}_dir-AP")
        _write_anat(sdir / "anat", stem, "T1w")
        _write_anat(sdir / "anat", stem, "FLAIR")
        if with_rpe:
            fmap = sdir / "fmap"
            fmap.mkdir(parents=True, exist_ok=True)
            img = nib.load(sdir / "dwi" / f"{stem}_dir-AP_dwi.nii.gz")
            nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[..., 0], img.affine), fmap / f"{stem}_dir-PA_epi.nii.gz")
            (fmap / f"{stem}_dir-PA_epi.json").write_text(json.dumps({
                "PhaseEncodingDirection": "j", "TotalReadoutTime": 0.05,
                "IntendedFor": [f"bids::sub-{label}/ses-pre/dwi/{stem}_dir-AP_dwi.nii.gz"],
            }))
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture()
def small_bids(tmp_path) -> Path:
    return build_small_bids(tmp_path / "bids")


@pytest.fixture()
def copy_tree(tmp_path):
    def _copy(src: Path, name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst
    return _copy
