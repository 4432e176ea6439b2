"""Image-level input checks: readable NIfTI, right dimensionality, finite data, sane affine.

Run only on the files a run actually uses; each failure is one
:class:`~bids_uad.errors.InputValidationError` (exit 16) naming the file and the problem.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from bids_uad.bids.gradients import GradientTable, load_gradients
from bids_uad.bids.layout import DwiRun
from bids_uad.errors import InputValidationError

#: plausible voxel sizes (mm) for human MRI
VOXEL_SIZE_RANGE = (0.1, 20.0)
#: bytes read at once when scanning a 4D image for NaNs
_CHUNK_VOLUMES = 8


def load_image(path: str | Path, ndim: int | tuple[int, ...], what: str):
    """Open a NIfTI image and check it; returns the nibabel image (data not yet loaded)."""
    import nibabel as nib

    path = Path(path)
    if not path.exists():
        raise InputValidationError(f"{what} image does not exist", path)
    try:
        img = nib.load(str(path))
        shape = img.shape
    except Exception as exc:  # nibabel raises many types on broken files
        raise InputValidationError(f"unreadable NIfTI {what} image ({type(exc).__name__}: {exc})", path) from exc
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    effective = len(shape)
    if effective == 4 and shape[3] == 1 and 3 in allowed:
        effective = 3
    if effective not in allowed:
        raise InputValidationError(
            f"{what} image must be {' or '.join(f'{n}D' for n in allowed)}, found shape {tuple(shape)}", path
        )
    check_affine(img.affine, path)
    return img


def check_affine(affine: np.ndarray, path: str | Path) -> None:
    """A sane affine: finite, invertible, plausible voxel sizes."""
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InputValidationError("image affine is not a finite 4x4 matrix", path)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    if abs(np.linalg.det(affine[:3, :3])) < 1e-6 or np.any(zooms < VOXEL_SIZE_RANGE[0]) or np.any(zooms > VOXEL_SIZE_RANGE[1]):
        raise InputValidationError(
            f"image affine is degenerate or has implausible voxel sizes {np.round(zooms, 3).tolist()} mm", path
        )


def check_finite(img, path: str | Path, what: str) -> None:
    """Scan the data for NaN/inf without holding a float64 copy of a whole 4D series."""
    data = img.dataobj
    shape = img.shape
    if len(shape) == 4:
        for start in range(0, shape[3], _CHUNK_VOLUMES):
            block = np.asarray(data[..., start:start + _CHUNK_VOLUMES])
            if block.dtype.kind == "f" and not np.all(np.isfinite(block)):
                bad = start + int(np.flatnonzero(~np.all(np.isfinite(block), axis=(0, 1, 2)))[0])
                raise InputValidationError(f"{what} image holds NaN or infinite values (volume {bad})", path)
    else:
        block = np.asarray(data)
        if block.dtype.kind == "f" and not np.all(np.isfinite(block)):
            raise InputValidationError(f"{what} image holds NaN or infinite values", path)


def validate_anatomical(path: str | Path, what: str = "T1w") -> None:
    img = load_image(path, 3, what)
    check_finite(img, path, what)


def validate_dwi_run(run: DwiRun, require_sidecar: bool = True) -> GradientTable:
    """Check one dwi run (image, gradients, sidecar, reverse-PE partner); return its gradients."""
    if run.bval is None or run.bvec is None:
        missing = ", ".join(x for x, p in (("bval", run.bval), ("bvec", run.bvec)) if p is None)
        raise InputValidationError(f"no {missing} file found for this dwi (also none inherited)", run.path)
    if require_sidecar and not run.metadata:
        raise InputValidationError(
            "no JSON sidecar found for this dwi (none next to it and none inherited); "
            "PhaseEncodingDirection and TotalReadoutTime are needed", run.path,
        )
    img = load_image(run.path, 4, "dwi")
    table = load_gradients(run.bval, run.bvec, n_volumes=img.shape[3], image_path=run.path)
    check_finite(img, run.path, "dwi")
    if run.reverse_pe is not None:
        check_phase_encoding(run.metadata, run.path, "dwi")
        check_phase_encoding(run.reverse_pe.metadata, run.reverse_pe.path, "reverse phase-encoding")
        rimg = load_image(run.reverse_pe.path, (3, 4), "reverse phase-encoding")
        check_finite(rimg, run.reverse_pe.path, "reverse phase-encoding")
    return table


def check_phase_encoding(metadata: Mapping[str, Any], image_path: str | Path, what: str) -> None:
    """Susceptibility correction needs a PE direction with polarity; a readout time, when given, must be plausible.

    A missing readout time is allowed: the correction then assumes a nominal one
    (``bids.phase_encoding.NOMINAL_TOTAL_READOUT_TIME``) and says so in the field's sidecar.
    """
    sidecar = _sidecar_name(image_path)
    pe = metadata.get("PhaseEncodingDirection")
    if pe not in ("i", "i-", "j", "j-", "k", "k-"):
        raise InputValidationError(
            f"{what} sidecar lacks a valid PhaseEncodingDirection (found {pe!r}; "
            "PhaseEncodingAxis alone has no polarity)", sidecar,
        )
    trt = metadata.get("TotalReadoutTime")
    if trt is None:
        return
    if not isinstance(trt, (int, float)) or not (0 < float(trt) < 1):
        raise InputValidationError(
            f"{what} sidecar lacks a plausible TotalReadoutTime in seconds (found {trt!r})", sidecar
        )


def _sidecar_name(image_path: str | Path) -> Path:
    p = Path(image_path)
    return p.with_name(p.name.removesuffix(".gz").removesuffix(".nii") + ".json")
