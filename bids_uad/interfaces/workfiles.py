"""Names of the images a node writes into its working folder.

They are written uncompressed (``.nii``): such a file is read again by the next nodes and
never leaves the work folder as it is.  gzip (nibabel's level 1) cost about 1 s per 1 mm
float32 volume written and 0.2-0.3 s per read, on the anatomical chain that bounds a
participant's wall time.  The derivatives sink compresses the images that become derivatives
(:func:`compress_nifti`), byte for byte as ``nibabel.save`` to ``.nii.gz`` would have.
"""
from __future__ import annotations

import shutil
from pathlib import Path

#: extension of the images written into a node's working folder
WORK_NIFTI = ".nii"


def work_nifti(folder: str | Path, stem: str) -> str:
    """``folder/stem.nii``: where a node writes the image it calls ``stem``."""
    return str(Path(folder) / f"{stem}{WORK_NIFTI}")


def compress_nifti(source: str | Path, target: str | Path) -> None:
    """gzip an uncompressed NIfTI ``source`` into ``target`` as nibabel writes ``.nii.gz`` files
    (level 1, no file name and a zero time stamp in the gzip header), so the result does not
    depend on when or under which name it was written."""
    import gzip

    from nibabel.openers import Opener

    with open(source, "rb") as src, open(target, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", compresslevel=Opener.default_compresslevel,
                          fileobj=raw, mtime=0) as out:
        shutil.copyfileobj(src, out, length=1 << 22)
