"""Image-level input checks: readable NIfTI, right dimensionality, finite data, sane geometry.

Run only on the files a run actually uses; each failure is one
:class:`~bids_uad.errors.InputValidationError` (exit 16) naming the file and the problem.
The header is checked from its raw bytes before nibabel opens the image (nibabel silently
"fixes" zero or negative voxel sizes), and the data are read in bounded slabs, so a header
claiming gigabytes on a small file, a truncated or corrupt gzip stream and all-zero data
are refused here, in seconds, before any processing.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from bids_uad.bids.gradients import GradientTable, load_gradients
from bids_uad.bids.layout import DwiRun, sidecar_of
from bids_uad.errors import InputValidationError

LOGGER = logging.getLogger("bids_uad.bids")

#: plausible voxel sizes (mm) for human MRI
VOXEL_SIZE_RANGE = (0.1, 20.0)
#: at most this many bytes of image data are read at once when scanning an image
_CHUNK_BYTES = 64 * 1024 * 1024
#: qform and sform differing by more than this (mm, anywhere in a 256 mm field of view) disagree
QFORM_SFORM_TOLERANCE_MM = 0.5
#: above this b-value (s/mm²) a gradient table is unusual enough to warn (units? typo?)
PLAUSIBLE_MAX_BVALUE = 5000.0


def _missing_message(path: Path, what: str) -> str:
    if path.is_symlink():  # DataLad / git-annex: content not retrieved yet
        return (f"{what} image is a broken symbolic link (a DataLad/git-annex file whose content "
                "was not retrieved? run `datalad get` on it)")
    return f"{what} image does not exist"


def check_raw_header(path: str | Path, what: str) -> None:
    """Check the on-disk header before nibabel opens it: dimensions and voxel sizes.

    nibabel replaces zero voxel sizes by 1 and negative ones by their absolute value while
    loading (and logs it); tools disagree on such files, so they are refused here.
    """
    import nibabel as nib
    from nibabel.openers import ImageOpener

    path = Path(path)
    try:
        with ImageOpener(str(path), "rb") as handle:
            raw = handle.read(540)
    except Exception as exc:  # gzip/zlib/OS errors of many types
        raise InputValidationError(f"unreadable NIfTI {what} image ({type(exc).__name__}: {exc})", path) from exc
    sizeof_hdr = {int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big")}
    klass = nib.Nifti2Header if 540 in sizeof_hdr else nib.Nifti1Header
    try:
        header = klass.from_fileobj(io.BytesIO(raw), check=False)
        dim = np.asarray(header["dim"])
        pixdim = np.asarray(header["pixdim"], dtype=float)
    except Exception as exc:
        raise InputValidationError(f"unreadable NIfTI {what} header ({type(exc).__name__}: {exc})", path) from exc
    ndim = int(dim[0])
    if not 1 <= ndim <= 7 or np.any(dim[1:ndim + 1] < 1):
        raise InputValidationError(f"{what} header has invalid dimensions {dim[:max(ndim, 0) + 1].tolist()}", path)
    spatial = pixdim[1:min(ndim, 3) + 1]
    if not np.all(np.isfinite(spatial)) or np.any(spatial <= 0):
        raise InputValidationError(
            f"{what} header has zero, negative or non-finite voxel sizes (pixdim {spatial.tolist()}); "
            "tools read such files differently", path)


def check_qform_sform(img, path: str | Path, what: str) -> None:
    """Both orientations set and different: FSL/nibabel read the sform, ITK/ANTs may read the qform."""
    header = img.header
    if int(header["qform_code"]) <= 0 or int(header["sform_code"]) <= 0:
        return
    qform, sform = header.get_qform(), header.get_sform()
    # largest displacement between the two mappings over a 256 mm cube of voxels
    corners = np.array([[x, y, z, 1.0] for x in (0, 1) for y in (0, 1) for z in (0, 1)])
    extent = 256.0 / np.maximum(np.linalg.norm(sform[:3, :3], axis=0), 1e-6)
    pts = corners * np.append(extent, 1.0)
    diff = float(np.max(np.linalg.norm((pts @ qform.T - pts @ sform.T)[:, :3], axis=1)))
    if not np.isfinite(diff) or diff > QFORM_SFORM_TOLERANCE_MM:
        raise InputValidationError(
            f"{what} header's qform and sform disagree (up to {diff:.1f} mm); tools choose different "
            "ones, so the geometry is ambiguous: make them equal (e.g. fslorient -copysform2qform)", path)


def load_image(path: str | Path, ndim: int | tuple[int, ...], what: str):
    """Open a NIfTI image and check its header; returns the nibabel image (data not yet loaded)."""
    import nibabel as nib

    path = Path(path)
    if not path.exists():
        raise InputValidationError(_missing_message(path, what), path)
    check_raw_header(path, what)
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
    check_qform_sform(img, path, what)
    if not path.name.endswith(".gz"):  # uncompressed: the header's claim is checked against the size
        need = int(img.header.get_data_offset()) + int(np.prod(shape)) * img.get_data_dtype().itemsize
        have = path.stat().st_size
        if have < need:
            raise InputValidationError(
                f"{what} image is truncated: its header describes {need} bytes, the file has {have}", path)
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


def _slabs(shape: tuple[int, ...], itemsize: int):
    """Index ranges along the last axis whose slabs hold at most ``_CHUNK_BYTES`` each."""
    per_index = int(np.prod(shape[:-1])) * itemsize if len(shape) > 1 else itemsize
    step = max(1, _CHUNK_BYTES // max(per_index, 1))
    return [(start, min(start + step, shape[-1])) for start in range(0, shape[-1], step)]


def _check_gzip_stream(path: str | Path, what: str) -> None:
    """Decompress a ``.gz`` image to its end: a corrupt stream fails its CRC here even where the
    damaged bytes still inflate (into garbage) and nibabel would never read the trailer."""
    import gzip

    if not str(path).endswith(".gz"):
        return
    try:
        with gzip.open(path, "rb") as handle:
            while handle.read(_CHUNK_BYTES):
                pass
    except Exception as exc:  # EOFError, gzip.BadGzipFile (CRC, length), zlib.error, OSError
        raise InputValidationError(
            f"{what} image data are truncated or corrupt ({type(exc).__name__}: {exc})", path) from exc


def check_finite(img, path: str | Path, what: str, require_signal: bool = True) -> None:
    """Read the data in bounded slabs: readable to the end, finite, and (by default) not all zero.

    A truncated file or a corrupt gzip stream surfaces here as an unreadable image, and a
    header claiming more data than the file holds fails without allocating the claim.
    """
    _check_gzip_stream(path, what)
    data = img.dataobj
    shape = tuple(img.shape)
    itemsize = img.get_data_dtype().itemsize
    nonzero = False
    for start, stop in _slabs(shape, itemsize):
        try:
            block = np.asarray(data[..., start:stop])
        except MemoryError:
            raise InputValidationError(f"{what} image is too large to read ({shape})", path) from None
        except Exception as exc:  # EOFError, zlib.error, gzip.BadGzipFile, OSError, ValueError, ...
            raise InputValidationError(
                f"{what} image data are truncated or corrupt ({type(exc).__name__}: {exc})", path) from exc
        if block.dtype.kind in "fc" and not np.all(np.isfinite(block)):
            if len(shape) == 4:
                bad = start + int(np.flatnonzero(~np.all(np.isfinite(block), axis=(0, 1, 2)))[0])
                raise InputValidationError(f"{what} image holds NaN or infinite values (volume {bad})", path)
            raise InputValidationError(f"{what} image holds NaN or infinite values", path)
        nonzero = nonzero or bool(np.any(block))
    if require_signal and not nonzero:
        raise InputValidationError(f"{what} image holds only zeros (no signal)", path)


def validate_anatomical(path: str | Path, what: str = "T1w") -> None:
    img = load_image(path, 3, what)
    check_finite(img, path, what)


def validate_dwi_run(run: DwiRun, require_sidecar: bool | None = None) -> GradientTable:
    """Check one dwi run (image, gradients, sidecar, reverse-PE partner); return its gradients.

    The JSON sidecar is recommended, not required, by BIDS: it is needed only where its fields
    are, i.e. for susceptibility correction with a reverse phase-encoding image
    (``require_sidecar=None``, the default) or when the caller says so (FSL's eddy needs the
    phase encoding); without one the run goes on with a warning.
    """
    if run.bval is None or run.bvec is None:
        missing = ", ".join(x for x, p in (("bval", run.bval), ("bvec", run.bvec)) if p is None)
        raise InputValidationError(f"no {missing} file found for this dwi (also none inherited)", run.path)
    needed = run.reverse_pe is not None if require_sidecar is None else require_sidecar
    if not run.metadata:
        if needed:
            raise InputValidationError(
                "no JSON sidecar found for this dwi (none next to it and none inherited); "
                "PhaseEncodingDirection and TotalReadoutTime are needed", run.path,
            )
        LOGGER.warning("%s: no JSON sidecar (none next to it and none inherited): going on without "
                       "acquisition metadata", run.path.name)
    img = load_image(run.path, 4, "dwi")
    table = load_gradients(run.bval, run.bvec, n_volumes=img.shape[3], image_path=run.path)
    if not np.any(table.dwi_mask):
        raise InputValidationError(
            f"no diffusion-weighted volume: every b-value is <= {table.b0_threshold:g} s/mm²", run.bval)
    if float(np.max(table.bvals)) > PLAUSIBLE_MAX_BVALUE:
        LOGGER.warning("%s: b-values up to %g s/mm² (shells %s) are unusually high for a tensor model; "
                       "check the units of the .bval file", run.bval.name, float(np.max(table.bvals)),
                       ", ".join(f"{b:g}" for b in table.shells))
    check_finite(img, run.path, "dwi")
    if run.reverse_pe is not None:
        check_phase_encoding(run.metadata, run.path, img.shape)
        rimg = load_image(run.reverse_pe.path, (3, 4), "reverse phase-encoding")
        check_phase_encoding(run.reverse_pe.metadata, run.reverse_pe.path, rimg.shape)
        check_finite(rimg, run.reverse_pe.path, "reverse phase-encoding")
    return table


def phase_encoding(meta: Mapping[str, Any], where: str | Path) -> tuple[int, int]:
    """(axis, polarity) from ``PhaseEncodingDirection``; InputValidationError naming the sidecar."""
    from bids_uad.algorithms.resample import parse_phase_encoding

    ped = meta.get("PhaseEncodingDirection")
    if not ped:
        raise InputValidationError(
            "PhaseEncodingDirection is missing (needed with a reverse phase-encoding image; "
            "PhaseEncodingAxis alone has no polarity)", where)
    try:
        return parse_phase_encoding(ped)
    except ValueError as exc:
        raise InputValidationError(str(exc), where) from exc


def total_readout_time(meta: Mapping[str, Any], n_pe: int, where: str | Path) -> float:
    """``TotalReadoutTime`` from a sidecar, or ``EffectiveEchoSpacing`` * (N_PE - 1), in (0, 1) s."""
    try:
        if meta.get("TotalReadoutTime") not in (None, ""):
            trt = float(meta["TotalReadoutTime"])
        elif meta.get("EffectiveEchoSpacing") not in (None, ""):
            n = int(meta.get("ReconMatrixPE") or n_pe)
            trt = float(meta["EffectiveEchoSpacing"]) * (n - 1)
        else:
            raise InputValidationError(
                "TotalReadoutTime (or EffectiveEchoSpacing) is missing: it is needed for "
                "susceptibility distortion correction with a reverse phase-encoding image", where)
    except (TypeError, ValueError) as exc:
        raise InputValidationError(f"TotalReadoutTime/EffectiveEchoSpacing is not a number ({exc})", where) from exc
    if not (0 < trt < 1):
        raise InputValidationError(f"TotalReadoutTime {trt} s is not plausible (expected 0-1 s)", where)
    return trt


def check_phase_encoding(metadata: Mapping[str, Any], image_path: str | Path,
                         shape: tuple[int, ...]) -> tuple[int, int]:
    """Susceptibility correction needs a PE direction with polarity and the readout time: the
    same rules as the correction itself (:func:`phase_encoding`, :func:`total_readout_time`),
    checked before any processing starts.  Returns (axis, polarity)."""
    sidecar = sidecar_of(image_path)
    axis, polarity = phase_encoding(metadata, sidecar)
    total_readout_time(metadata, shape[axis], sidecar)
    return axis, polarity
