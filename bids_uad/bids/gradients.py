"""Gradient tables: read FSL ``.bval``/``.bvec`` files robustly, detect b0s, round shells.

Real files are messy: bvecs come as 3xN (FSL) or Nx3, b0 rows may be ``nan``, scanners write
b0s as 0.001..0.004 or 5.  Everything here works on arrays or on the two text files and
raises :class:`~bids_uad.errors.InputValidationError` naming the file and what is wrong.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bids_uad.errors import InputValidationError

#: b-values at or below this (s/mm²) count as b0 volumes (scanners write 0, 5 or 0.001): the one
#: definition, used by preprocessing, the tensor fit, motion correction and the models.
B0_THRESHOLD = 50.0
#: b-values are rounded to multiples of this to define shells.
DEFAULT_SHELL_ROUNDING = 100.0
#: relative tolerance on |bvec| for diffusion-weighted volumes before it is an error.
UNIT_NORM_TOLERANCE = 0.1


@dataclass(frozen=True)
class GradientTable:
    """b-values (N,) and unit b-vectors (N, 3), with b0 rows as zero vectors."""

    bvals: np.ndarray
    bvecs: np.ndarray
    b0_threshold: float = B0_THRESHOLD
    shell_rounding: float = DEFAULT_SHELL_ROUNDING

    @property
    def n_volumes(self) -> int:
        return int(self.bvals.shape[0])

    @property
    def b0_mask(self) -> np.ndarray:
        return self.bvals <= self.b0_threshold

    @property
    def dwi_mask(self) -> np.ndarray:
        return ~self.b0_mask

    @property
    def rounded_bvals(self) -> np.ndarray:
        return round_bvals(self.bvals, self.shell_rounding, self.b0_threshold)

    @property
    def shells(self) -> tuple[float, ...]:
        """The distinct non-zero shells after rounding, ascending."""
        rb = self.rounded_bvals
        return tuple(float(b) for b in np.unique(rb[rb > 0]))

    def summary(self) -> dict:
        """A JSON-friendly description (used in sidecars and reports)."""
        return {
            "n_volumes": self.n_volumes,
            "n_b0": int(self.b0_mask.sum()),
            "shells": list(self.shells),
            "directions_per_shell": {
                str(int(b)): int((self.rounded_bvals == b).sum()) for b in self.shells
            },
        }


def round_bvals(
    bvals: np.ndarray,
    step: float = DEFAULT_SHELL_ROUNDING,
    b0_threshold: float = B0_THRESHOLD,
) -> np.ndarray:
    """Round b-values to the nearest multiple of ``step``; b0s become exactly 0."""
    bvals = np.asarray(bvals, dtype=float)
    rounded = np.round(bvals / step) * step
    rounded[bvals <= b0_threshold] = 0.0
    return rounded


def _read_numbers(path: Path, what: str) -> np.ndarray:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise InputValidationError(f"{what} file does not exist", path) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise InputValidationError(f"cannot read {what} file ({exc})", path) from exc
    rows = [line.replace(",", " ").split() for line in text.splitlines() if line.strip()]
    if not rows:
        raise InputValidationError(f"{what} file is empty", path)
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise InputValidationError(
            f"{what} file has rows of different lengths {sorted(widths)}", path
        )
    try:
        return np.array([[float(v) for v in r] for r in rows], dtype=float)
    except ValueError as exc:
        raise InputValidationError(f"{what} file holds a non-numeric value ({exc})", path) from exc


def read_bvals(path: str | Path) -> np.ndarray:
    """Read a ``.bval`` file (one row or one column) into an (N,) array."""
    arr = _read_numbers(Path(path), "bval")
    if arr.ndim != 2 or min(arr.shape) != 1:
        raise InputValidationError(
            f"bval file must hold one row or one column, found shape {arr.shape}", path
        )
    bvals = arr.ravel()
    if not np.all(np.isfinite(bvals)):
        raise InputValidationError("bval file holds NaN or infinite values", path)
    if np.any(bvals < 0):
        raise InputValidationError("bval file holds negative b-values", path)
    return bvals


def read_bvecs(path: str | Path, n_volumes: int | None = None) -> np.ndarray:
    """Read a ``.bvec`` file in FSL's 3xN layout or the transposed Nx3 layout into (N, 3).

    A 3x3 file is taken as FSL layout.  ``nan`` entries (as some tools write for b0 rows)
    are returned as ``nan``; :func:`load_gradients` decides whether they are acceptable.
    """
    arr = _read_numbers(Path(path), "bvec")
    if arr.shape[0] == 3 and (n_volumes is None or arr.shape[1] == n_volumes or arr.shape[1] != 3):
        return arr.T.copy()
    if arr.shape[1] == 3:
        return arr
    raise InputValidationError(
        f"bvec file must be 3xN (FSL) or Nx3, found {arr.shape[0]}x{arr.shape[1]}", path
    )


def load_gradients(
    bval_path: str | Path,
    bvec_path: str | Path,
    n_volumes: int | None = None,
    b0_threshold: float = B0_THRESHOLD,
    shell_rounding: float = DEFAULT_SHELL_ROUNDING,
    image_path: str | Path | None = None,
) -> GradientTable:
    """Read and check a gradient table; ``n_volumes`` is the dwi's 4th dimension when known.

    Checks: equal counts in bval, bvec and the image; finite, unit-norm directions for
    diffusion-weighted volumes (renormalised within 10 %); at least one b0.
    """
    bvals = read_bvals(bval_path)
    bvecs = read_bvecs(bvec_path, n_volumes=n_volumes if n_volumes else bvals.size)
    counts = {"bval": bvals.size, "bvec": bvecs.shape[0]}
    if n_volumes is not None:
        counts["image volumes"] = int(n_volumes)
    if len(set(counts.values())) != 1:
        where = ", ".join(str(p) for p in (bval_path, bvec_path, image_path) if p is not None)
        detail = ", ".join(f"{k} {v}" for k, v in counts.items())
        raise InputValidationError(f"{where}: gradient count mismatch ({detail})")
    b0 = bvals <= b0_threshold
    bvecs = bvecs.copy()
    bad_b0_rows = b0 & ~np.all(np.isfinite(bvecs), axis=1)
    bvecs[bad_b0_rows] = 0.0
    dw = ~b0
    if not np.all(np.isfinite(bvecs[dw])):
        rows = np.flatnonzero(dw & ~np.all(np.isfinite(bvecs), axis=1))
        raise InputValidationError(
            f"bvec holds NaN/inf for diffusion-weighted volumes {rows.tolist()[:10]}", bvec_path
        )
    norms = np.linalg.norm(bvecs, axis=1)
    off = dw & (np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE)
    if np.any(off):
        rows = np.flatnonzero(off)
        raise InputValidationError(
            f"bvec directions are not unit length for diffusion-weighted volumes "
            f"{rows.tolist()[:10]} (norms {np.round(norms[rows][:5], 3).tolist()})",
            bvec_path,
        )
    bvecs[dw] /= norms[dw, None]
    bvecs[b0] = 0.0
    if not np.any(b0):
        raise InputValidationError(
            f"no b0 volume (no b-value <= {b0_threshold:g} s/mm²) in the gradient table", bval_path
        )
    return GradientTable(
        bvals=bvals, bvecs=bvecs, b0_threshold=b0_threshold, shell_rounding=shell_rounding
    )


def rotate_bvecs(bvecs: np.ndarray, rotations: np.ndarray) -> np.ndarray:
    """Apply one 3x3 rotation (or the rotational part of an affine) per volume to b-vectors.

    ``rotations`` is (N, 3, 3); non-rigid parts are removed by polar decomposition so the
    result stays unit length.
    """
    bvecs = np.asarray(bvecs, dtype=float)
    out = np.zeros_like(bvecs)
    for i, (vec, mat) in enumerate(zip(bvecs, np.asarray(rotations, dtype=float))):
        if not np.any(vec):
            continue
        u, _, vt = np.linalg.svd(mat[:3, :3])
        rot = u @ vt
        v = rot @ vec
        out[i] = v / np.linalg.norm(v)
    return out


def write_fsl_gradients(table: GradientTable, bval_path: str | Path, bvec_path: str | Path) -> None:
    """Write a gradient table as FSL text files (bvals one row, bvecs 3xN)."""
    Path(bval_path).write_text(" ".join(f"{b:g}" for b in table.bvals) + "\n")
    Path(bvec_path).write_text(
        "\n".join(" ".join(f"{v:.6f}" for v in row) for row in table.bvecs.T) + "\n"
    )
