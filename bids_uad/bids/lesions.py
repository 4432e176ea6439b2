"""Find lesion masks for a subject/session in a ``--lesion-masks`` BIDS-derivatives folder."""
from __future__ import annotations

from pathlib import Path

from bids_uad.bids.derivatives import validate_label

#: ``desc-`` values accepted as a lesion mask, in order of preference
LESION_DESCS = ("tumor", "lesion", "tumour")


def find_lesion_mask(root: str | Path | None, subject: str, session: str | None = None,
                     space: str = "T1w") -> Path | None:
    """The lesion mask of ``sub-<subject>[_ses-<session>]`` in ``space``, or None.

    Looks in ``root/sub-X[/ses-Y]/{anat,dwi}/`` for ``*_desc-{tumor,lesion}_mask.nii[.gz]``; a
    file without a ``space-`` entity is in its folder's native space (T1w for anat, dwi for dwi).
    """
    if root is None:
        return None
    subject = validate_label(subject, "sub")
    folder = Path(root) / f"sub-{subject}"
    if session:
        folder = folder / f"ses-{validate_label(session, 'ses')}"
    prefix = f"sub-{subject}" + (f"_ses-{session}" if session else "")
    for desc in LESION_DESCS:
        for datatype, implied_space in (("anat", "T1w"), ("dwi", "dwi")):
            for path in sorted((folder / datatype).glob(f"{prefix}_*desc-{desc}_mask.nii*")):
                name = path.name
                if "_space-" in name:
                    if f"_space-{space}_" in name:
                        return path
                elif space == implied_space:
                    return path
    return None
