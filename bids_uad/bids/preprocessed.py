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

from bids_uad.bids import outputs
from bids_uad.bids.derivatives import validate_label
from bids_uad.bids.gradients import load_gradients
from bids_uad.bids.layout import session_entities


@dataclass(frozen=True)
class PreprocessedDwi:
    """File paths of one dwi run's preprocessed diffusion derivatives."""

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

    @property
    def run(self) -> str:
        """What tells this run from the session's others (``dir-AP``; '' for an unnamed run)."""
        return outputs.run_label(self.dwi.name)

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


def find_preprocessed_dwi_runs(output_dir: str | Path, subject: str, session: str | None) -> list[PreprocessedDwi]:
    """Every complete preprocessed dwi run of one session in ``output_dir`` (in name order).

    A run is complete with its series, gradient table and brain mask; its analysis mask is
    the one named with the same run entities (None when the T1w was not registered to it).
    """
    subject = validate_label(subject, "sub")
    session = validate_label(session, "ses") if session else None
    found = []
    for dwi in outputs.find(output_dir, "dwi_preproc", subject, session):
        run = outputs.run_entities(dwi.name)
        parts = {key: next(iter(outputs.find_run(output_dir, key, subject, session, run)), None)
                 for key in ("dwi_bval", "dwi_bvec", "brain_mask", "analysis_mask")}
        if None in (parts["dwi_bval"], parts["dwi_bvec"], parts["brain_mask"]):
            continue
        found.append(PreprocessedDwi(subject, session, dwi, parts["dwi_bval"], parts["dwi_bvec"],
                                     parts["brain_mask"], parts["analysis_mask"]))
    return found


def find_preprocessed_dwi(output_dir: str | Path, subject: str, session: str | None) -> PreprocessedDwi | None:
    """The session's preprocessed dwi run that has an analysis mask (the one the T1w was
    registered to), else its first complete run; None when there is none.

    For what needs one series per session (group training, the longitudinal baseline);
    inference scores every run (:func:`find_preprocessed_dwi_runs`).
    """
    runs = find_preprocessed_dwi_runs(output_dir, subject, session)
    with_mask = [r for r in runs if r.analysis_mask is not None]
    return (with_mask or runs or [None])[0]


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
