"""Read participant-level derivatives back: the interface between the levels.

Group training and participant inference read the preprocessed dwi, its masks and gradient
table from ``OUTPUT_DIR`` (never from a work folder), so they run on derivatives made by
an earlier run, another machine, or the FSL backend alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from bids_uad.bids.derivatives import validate_label
from bids_uad.bids.gradients import load_gradients
from bids_uad.bids.layout import session_entities


@dataclass(frozen=True)
class PreprocessedDwi:
    """File paths of one session's preprocessed diffusion derivatives."""

    subject: str
    session: str | None
    dwi: Path
    bval: Path
    bvec: Path
    brain_mask: Path
    analysis_mask: Path | None

    @property
    def entities(self) -> dict[str, str]:
        return session_entities(self.subject, self.session)

    def load(self) -> dict:
        """Arrays: dwi (X,Y,Z,N float32), bvals, bvecs (N,3), brain and analysis masks, affine."""
        import nibabel as nib

        img = nib.load(str(self.dwi))
        data = np.asarray(img.dataobj, dtype=np.float32)
        table = load_gradients(self.bval, self.bvec, n_volumes=data.shape[3], image_path=self.dwi)
        brain = np.asarray(nib.load(str(self.brain_mask)).dataobj) > 0
        analysis = brain if self.analysis_mask is None else np.asarray(nib.load(str(self.analysis_mask)).dataobj) > 0
        return {"dwi": data, "bvals": table.bvals, "bvecs": table.bvecs, "brain_mask": brain,
                "analysis_mask": analysis & brain, "affine": img.affine, "header": img.header}


def _prefix(subject: str, session: str | None) -> str:
    return f"sub-{subject}" + (f"_ses-{session}" if session else "")


def find_preprocessed_dwi(output_dir: str | Path, subject: str, session: str | None) -> PreprocessedDwi | None:
    """The preprocessed dwi of one session in ``output_dir``, or None when any part is missing."""
    subject = validate_label(subject, "sub")
    folder = Path(output_dir) / f"sub-{subject}"
    if session:
        folder = folder / f"ses-{validate_label(session, 'ses')}"
    folder = folder / "dwi"
    prefix = _prefix(subject, session)
    candidates = sorted(folder.glob(f"{prefix}_*space-dwi_desc-preproc_dwi.nii.gz"))
    if not candidates:
        return None
    dwi = candidates[0]
    stem = dwi.name[: -len("_space-dwi_desc-preproc_dwi.nii.gz")]
    bval = dwi.with_name(dwi.name.replace(".nii.gz", ".bval"))
    bvec = dwi.with_name(dwi.name.replace(".nii.gz", ".bvec"))
    brain = folder / f"{stem}_space-dwi_desc-brain_mask.nii.gz"
    if not (bval.is_file() and bvec.is_file() and brain.is_file()):
        return None
    analysis = folder / f"{prefix}_space-dwi_desc-analysis_mask.nii.gz"
    return PreprocessedDwi(subject, session, dwi, bval, bvec, brain, analysis if analysis.is_file() else None)


def order_sessions(sessions: list[str | None], table: list[dict[str, str]]) -> list[str | None]:
    """Sessions by ``acq_time`` in ``sessions.tsv`` (those without a time last, by name)."""
    times: dict[str, datetime] = {}
    for row in table:
        label = str(row.get("session_id", "")).removeprefix("ses-")
        value = row.get("acq_time", "")
        try:
            times[label] = datetime.fromisoformat(value)
        except (TypeError, ValueError):
            continue
    return sorted(sessions, key=lambda s: (s not in times, times.get(s or "", datetime.min), s or ""))
