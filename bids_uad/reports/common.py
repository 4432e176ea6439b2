"""Helpers shared by the participant-report sections: loading images, 'not available' notes."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bids_uad.reports import figures as F
from bids_uad.reports.collect import SessionDerivatives, pattern_of
from bids_uad.reports.reportlets import note

TISSUES = (("CSF", 1), ("GM", 2), ("WM", 3))


def load(path: Path | None):
    """(RAS data, affine) of a NIfTI file, or None."""
    import nibabel as nib

    if path is None:
        return None
    return F.to_canonical(nib.load(str(path)))


def missing(ses: SessionDerivatives, what: str, *keys: str) -> dict:
    """A note naming which derivative was not found and where it was looked for."""
    absent = [k for k in keys if ses.get(k) is None]
    looked = [pattern_of(key, ses.session_prefix) for key in absent]
    return note(f"Not available: {what} — no " + ", ".join(looked) + " in the derivatives.")


def same_grid(*arrays) -> bool:
    shapes = {a.shape for a in arrays if a is not None}
    return len(shapes) <= 1


def tissue_contours(seg: np.ndarray) -> list[tuple[np.ndarray, str, str]]:
    return [(seg == value, F.COLORS[name], name) for name, value in TISSUES]


LEGEND = "Contours: " + ", ".join(f"{n} ({F.COLORS[n]})" for n, _ in TISSUES) + "."
