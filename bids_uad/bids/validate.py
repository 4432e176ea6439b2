"""Image-level input checks: readable NIfTI, right dimensionality, finite data, sane geometry.

Run only on the files a run actually uses; each failure is one
:class:`~bids_uad.errors.InputValidationError` (exit 16) naming the file and the problem.
The header is checked from its raw bytes before nibabel opens the image (nibabel silently
"fixes" zero or negative voxel sizes), and the data are read once, in bounded chunks, so a header
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
from bids_uad.bids.phase_encoding import NOMINAL_TOTAL_READOUT_TIME, readout_time_source
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
        need = int(getattr(img.dataobj, "offset", img.header.get_data_offset())) + int(np.prod(shape)) * img.get_data_dtype().itemsize
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


def _open_stream(path: str | Path):
    """The image file as a byte stream, decompressed for ``.gz`` (whose CRC is checked at its end)."""
    import gzip

    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


def _scan_stream(img, path: str | Path, what: str) -> tuple[bool, int | None]:
    """One sequential pass over a single-file NIfTI's data: ``(any non-zero, first bad volume)``.

    Reading a ``.gz`` to its end checks its CRC and length trailer, so a corrupt stream fails
    here even where the damaged bytes still inflate (into garbage) and nibabel would never read
    the trailer; the same pass tests finiteness and signal, so the file is decompressed once.
    A header claiming more data than the file holds fails as truncated without allocating the
    claim. ``first bad volume`` is the index of the first volume (last axis of a 4D image)
    holding a NaN or infinite value, 0 for 3D images, ``None`` when all values are finite.
    """
    header = img.header
    dtype = header.get_data_dtype()
    shape = tuple(int(n) for n in img.shape)
    proxy = img.dataobj  # nibabel's array proxy knows where the data start and how they scale
    offset = int(getattr(proxy, "offset", header.get_data_offset()))
    slope, inter = getattr(proxy, "slope", None), getattr(proxy, "inter", None)
    slope = 1.0 if slope is None or not np.isfinite(slope) else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    n_values = int(np.prod(shape))
    per_volume = int(np.prod(shape[:3])) if len(shape) == 4 else max(n_values, 1)
    step = max(dtype.itemsize, (_CHUNK_BYTES // dtype.itemsize) * dtype.itemsize)
    check_finite_values = dtype.kind in "fc"
    nonzero, bad, seen = False, None, 0
    try:
        with _open_stream(path) as handle:
            skip = offset
            while skip > 0:
                got = len(handle.read(min(skip, step)))
                if not got:
                    break
                skip -= got
            remaining = n_values * dtype.itemsize
            while remaining > 0:
                chunk = handle.read(min(step, remaining))
                if not chunk or len(chunk) % dtype.itemsize:
                    raise EOFError(f"data end after {seen} of {n_values} values")
                block = np.frombuffer(chunk, dtype=dtype)
                if check_finite_values and bad is None:
                    finite = np.isfinite(block)
                    if not finite.all():
                        bad = (seen + int(np.flatnonzero(~finite)[0])) // per_volume
                if not nonzero:
                    if inter == 0.0:
                        nonzero = bool(np.any(block) and slope != 0.0)
                    else:
                        nonzero = bool(np.any(block.astype(np.float64) * slope + inter))
                seen += block.size
                remaining -= len(chunk)
            while handle.read(step):  # to the end: the gzip trailer (CRC, length) is checked here
                pass
    except Exception as exc:  # EOFError, gzip.BadGzipFile (CRC, length), zlib.error, OSError
        raise InputValidationError(
            f"{what} image data are truncated or corrupt ({type(exc).__name__}: {exc})", path) from exc
    return nonzero, bad


def check_finite(img, path: str | Path, what: str, require_signal: bool = True) -> None:
    """Read the data once, in bounded chunks: readable to the end, finite, and (by default) not all zero.

    A truncated file or a corrupt gzip stream surfaces here as an unreadable image, and a
    header claiming more data than the file holds fails without allocating the claim.
    """
    nonzero, bad = _scan_stream(img, path, what)
    if bad is not None:
        if len(img.shape) == 4:
            raise InputValidationError(f"{what} image holds NaN or infinite values (volume {bad})", path)
        raise InputValidationError(f"{what} image holds NaN or infinite values", path)
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
        check_phase_encoding(run.metadata, run.path, "dwi", img.shape)
        rimg = load_image(run.reverse_pe.path, (3, 4), "reverse phase-encoding")
        check_phase_encoding(run.reverse_pe.metadata, run.reverse_pe.path, "reverse phase-encoding", rimg.shape)
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


def check_phase_encoding(metadata: Mapping[str, Any], image_path: str | Path, what: str = "dwi",
                         shape: tuple[int, ...] | None = None) -> tuple[int, int]:
    """Susceptibility correction needs a PE direction with polarity and the readout time: the
    same rules as the correction itself (:func:`phase_encoding`, :func:`total_readout_time`),
    checked on the ``what`` image before any processing starts; ``shape`` gives the number of
    PE lines for an ``EffectiveEchoSpacing`` without ``ReconMatrixPE``.  Returns (axis, polarity).
    """
    sidecar = sidecar_of(image_path)
    try:
        axis, polarity = phase_encoding(metadata, sidecar)
        if readout_time_source(metadata) is not None:  # missing: a nominal time, flagged (readout_time_or_nominal)
            total_readout_time(metadata, shape[axis] if shape is not None else 0, sidecar)
    except InputValidationError as exc:
        raise InputValidationError(f"{what} sidecar: {exc}", sidecar) from exc
    return axis, polarity


def readout_time_or_nominal(meta: Mapping[str, Any], n_pe: int, where: str | Path,
                            partner: tuple[float, str] | None = None) -> tuple[float, str]:
    """(readout time, its source): the sidecar's, else the partner's (same protocol), else nominal.

    ``partner`` is the (time, source) of the other image of a reverse-PE pair; with neither,
    :data:`~bids_uad.bids.phase_encoding.NOMINAL_TOTAL_READOUT_TIME` (the correction of a pair
    does not depend on it; the field in Hz is then in units of it).
    """
    source = readout_time_source(meta)
    if source is not None:
        return total_readout_time(meta, n_pe, where), source
    if partner is not None and not partner[1].startswith("nominal"):
        return partner[0], "the other image of the pair (not in this sidecar; same protocol assumed)"
    LOGGER.warning("%s: no TotalReadoutTime or EffectiveEchoSpacing; a nominal %.3f s is assumed (the "
                   "correction is unaffected when both images share it; the field in Hz is in units of "
                   "this assumed time)", Path(where).name, NOMINAL_TOTAL_READOUT_TIME)
    return NOMINAL_TOTAL_READOUT_TIME, "nominal (missing from the sidecar)"
