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


def find_lesion_instances(mask_path: str | Path) -> tuple[Path, Path] | None:
    """The lesion-instance truth next to a lesion mask, or None: ``*_desc-lesions_dseg.nii[.gz]``
    (integer id per lesion, 0 = none) and its ``.tsv`` (columns ``index name type severity
    volume_ml``), as the synthetic generator writes them."""
    mask_path = Path(mask_path)
    for desc in LESION_DESCS:
        token = f"_desc-{desc}_mask.nii"
        if token in mask_path.name:
            stem = mask_path.name[: mask_path.name.index(token)]
            for ext in (".nii.gz", ".nii"):
                image = mask_path.with_name(f"{stem}_desc-lesions_dseg{ext}")
                table = mask_path.with_name(f"{stem}_desc-lesions_dseg.tsv")
                if image.is_file() and table.is_file():
                    return image, table
    return None
