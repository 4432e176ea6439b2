"""Find lesion masks for a subject/session in a ``--lesion-masks`` BIDS-derivatives folder."""
from __future__ import annotations

from pathlib import Path

from bids_uad.bids.derivatives import validate_label

#: ``desc-`` values accepted as a lesion mask, in order of preference
LESION_DESCS = ("tumor", "lesion", "tumour")


def find_lesion_mask(root: str | Path | None, subject: str, session: str | None = None,
                     space: str = "T1w") -> Path | None:
    """The lesion mask of ``sub-<subject>[_ses-<session>]`` in ``space``, or None.

    Looks in ``root/sub-X[/ses-Y]/anat/`` for ``*_desc-{tumor,lesion}_mask.nii[.gz]``; a file
    without a ``space-`` entity is taken as T1w space (the BIDS default for anat masks).
    """
    if root is None:
        return None
    subject = validate_label(subject, "sub")
    folder = Path(root) / f"sub-{subject}"
    if session:
        folder = folder / f"ses-{validate_label(session, 'ses')}"
    folder = folder / "anat"
    if not folder.is_dir():
        return None
    prefix = f"sub-{subject}" + (f"_ses-{session}" if session else "")
    for desc in LESION_DESCS:
        for path in sorted(folder.glob(f"{prefix}_*desc-{desc}_mask.nii*")):
            name = path.name
            has_space = "_space-" in name
            if (has_space and f"_space-{space}_" in name) or (not has_space and space == "T1w"):
                return path
    return None
