"""Images for the registration checks: the template of a space, and the T1w warped onto it.

Nothing is fetched: the template comes from a TemplateFlow folder already on disk
(``$TEMPLATEFLOW_HOME`` or ``~/.cache/templateflow``, 1 mm brain T1w) or, for MNI spaces,
from the MNI152 2009a template bundled with nilearn.
"""
from __future__ import annotations

import functools
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from bids_uad.reports import figures as F


def template_image(space: str):
    """(nibabel image, description) of the template of ``space``; None when none is on disk."""
    import nibabel as nib

    home = Path(os.environ.get("TEMPLATEFLOW_HOME", Path.home() / ".cache" / "templateflow"))
    for name in (f"tpl-{space}_res-01_desc-brain_T1w.nii.gz", f"tpl-{space}_res-01_T1w.nii.gz"):
        path = home / f"tpl-{space}" / name
        if path.is_file() and path.stat().st_size > 1024:
            return nib.load(str(path)), f"TemplateFlow {space}"
    if "MNI152" in space:
        from nilearn.datasets import load_mni152_template

        return load_mni152_template(resolution=1), "MNI152 2009a symmetric template (nilearn)"
    return None


def reference_on(space: str, target) -> tuple[np.ndarray, str] | None:
    """The template resampled onto ``target``'s grid (RAS data, read-only), with its description.

    Kept per process for each grid: the T1w of every session of a run lies on the same template
    grid, and the resampling took ~0.6 s a session.
    """
    return _reference_on_grid(space, tuple(int(n) for n in target.shape[:3]),
                              np.asarray(target.affine, np.float64).tobytes())


@functools.lru_cache(maxsize=4)
def _reference_on_grid(space: str, shape: tuple[int, ...], affine: bytes) -> tuple[np.ndarray, str] | None:
    import nibabel as nib
    from nilearn.image import resample_to_img

    found = template_image(space)
    if found is None:
        return None
    img, description = found
    target = nib.Nifti1Image(np.zeros(shape, np.uint8), np.frombuffer(affine, np.float64).reshape(4, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = resample_to_img(img, target, interpolation="continuous", force_resample=True, copy_header=True)
    data = F.to_canonical(res)[0]
    data.flags.writeable = False
    return data, description


def warp_to_template(t1w: Path, xfm: Path, space: str, mask: Path | None = None, zoom: float = 1.5):
    """Apply the T1w→template transform (ANTs .h5) to the (brain-masked) T1w with antspyx.

    Returns (warped RAS data, affine, template RAS data, description) on a ``zoom`` mm
    template grid, or None without a template.
    """
    import ants
    import nibabel as nib
    from nilearn.image import resample_img

    found = template_image(space)
    if found is None:
        return None
    img, description = found
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        affine = img.affine.copy()
        scale = zoom / np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        target = affine.copy()
        target[:3, :3] = affine[:3, :3] * scale
        shape = np.ceil(np.array(img.shape[:3]) / scale).astype(int)
        ref = resample_img(img, target_affine=target, target_shape=tuple(shape), force_resample=True,
                           copy_header=True)
    with tempfile.TemporaryDirectory() as tmp:
        fixed_path = Path(tmp) / "fixed.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(ref.dataobj, np.float32), ref.affine), str(fixed_path))
        moving = ants.image_read(str(t1w))
        if mask is not None:
            moving = moving * ants.image_read(str(mask))
        warped = ants.apply_transforms(ants.image_read(str(fixed_path)), moving, [str(xfm)],
                                       interpolator="linear")
        out_path = Path(tmp) / "warped.nii.gz"
        ants.image_write(warped, str(out_path))
        data, aff = F.to_canonical(nib.load(str(out_path)))
    return data, aff, F.to_canonical(ref)[0], description
