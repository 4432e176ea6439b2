"""Image registration with ANTs (antspyx, in-process): rigid, affine and SyN, lesion-aware.

Images come in and go out as nibabel images (array + RAS affine); ANTs works in LPS
physical space, so :func:`to_ants`/:func:`from_ants` convert the affine exactly.  Transforms
are written by ANTs itself (``.mat`` affines, ``Warp.nii.gz`` fields and, with
``composite=True``, one ``Composite.h5`` / ``InverseComposite.h5`` pair) and are listed in
antspyx order: the image goes through the *last* transform of a list first.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from bids_uad.algorithms.masking import subgrid_affine

LOGGER = logging.getLogger(__name__)

#: Interpolation per kind of image: labels keep their values, the rest is resampled smoothly.
INTERPOLATION = {
    "label": "genericLabel",
    "dseg": "genericLabel",
    "mask": "genericLabel",
    "probability": "linear",
    "probseg": "linear",
    "image": "linear",
    "scalar": "linear",
}
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def interpolation_for(kind: str) -> str:
    """ANTs interpolator for ``label|dseg|mask`` (genericLabel) or ``image|probability`` (linear)."""
    try:
        return INTERPOLATION[kind]
    except KeyError as exc:
        raise ValueError(f"unknown image kind {kind!r}; one of {sorted(INTERPOLATION)}") from exc


def ants_seed(seed: int) -> int:
    """The ``--random-seed`` ANTs gets for the app's ``seed``: never 0.

    ANTs reads a seed of 0 as "seed from the system clock", so with the app's default seed 0
    every registration sampled differently from run to run (measured: rigid translations
    differing by up to 0.005 mm between two identical calls, which then spread into every
    resampled image).  Non-negative seeds map one-to-one onto positive ones.

    >>> ants_seed(0), ants_seed(1), ants_seed(-3)
    (1, 2, -3)
    """
    seed = int(seed)
    return seed + 1 if seed >= 0 else seed


#: The environment variable ITK (and so ANTs) reads its thread count from.
ITK_THREADS_VARIABLE = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"


def set_itk_threads(threads: int) -> int:
    """Give ITK (ANTs) ``threads`` threads in this process and in the processes it starts later.

    ITK reads :data:`ITK_THREADS_VARIABLE` once per process, when it makes its first image;
    setting the variable after that changes nothing in that process.  So a run sets it before
    any image exists (``bids_uad.cli.run.run`` and ``run_workflow``, before the workers are
    started: they inherit it), not only in the node that registers: a worker whose first ITK
    call was a resampling (which sets nothing) kept ITK's default, one thread per core, for
    every registration after it.

    With more than one thread ANTs' Mattes mutual information is not reproducible even with a
    fixed seed (the ANTs authors say so; measured here: two identical rigid fits with seed 1
    and two threads differed by up to 2e-3 mm in translation, with one thread they were
    identical), so the default ``--omp-nthreads 1`` keeps repeated runs equal.  Returns the
    count set.
    """
    threads = max(1, int(threads))
    os.environ[ITK_THREADS_VARIABLE] = str(threads)
    return threads


def configure_ants(threads: int = 1, seed: int | None = 0) -> None:
    """Set ITK's thread count (:func:`set_itk_threads`: effective only before ITK's first use in
    the process) and ANTs' random seed (sampling in Mattes MI) for reproducibility."""
    import ants

    set_itk_threads(threads)
    if seed is not None:
        os.environ["ANTS_RANDOM_SEED"] = str(ants_seed(seed))
        ants.config._random_seed = ants_seed(seed)  # read by ants.registration (--random-seed)
        np.random.seed(int(seed))


def _lps_geometry(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], np.ndarray]:
    """(origin, spacing, direction) of an ANTs image (LPS) on the grid of a RAS ``affine``."""
    lps = _LPS @ np.asarray(affine, float)
    zooms = np.linalg.norm(lps[:3, :3], axis=0)
    return tuple(float(v) for v in lps[:3, 3]), tuple(float(v) for v in zooms), (lps[:3, :3] / zooms).astype(float)


def to_ants(img: nib.Nifti1Image | "object", pixeltype: str = "float"):
    """nibabel image (RAS affine) → ANTsImage with the same physical space (LPS)."""
    import ants

    if not isinstance(img, nib.spatialimages.SpatialImage):
        return img  # already an ANTsImage
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"expected a 3-D image, got shape {data.shape}")
    origin, spacing, direction = _lps_geometry(img.affine)
    return ants.from_numpy(data, origin=origin, spacing=spacing, direction=direction).clone(pixeltype)


def series_to_ants(data: np.ndarray, affine: np.ndarray):
    """A 4-D array whose first three axes lie on the grid of ``affine`` (RAS) → a 4-D ANTsImage
    (a time series to ANTs: its fourth axis has unit spacing and no rotation)."""
    import ants

    origin, spacing, direction3 = _lps_geometry(affine)
    direction = np.eye(4)
    direction[:3, :3] = direction3
    return ants.from_numpy(np.ascontiguousarray(data, dtype=np.float32), origin=(*origin, 0.0),
                           spacing=(*spacing, 1.0), direction=direction)


def from_ants(aimg, dtype=np.float32, header: nib.Nifti1Header | None = None) -> nib.Nifti1Image:
    """ANTsImage → nibabel image with the equivalent RAS affine."""
    spacing = np.asarray(aimg.spacing, dtype=float)
    direction = np.asarray(aimg.direction, dtype=float).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing
    lps[:3, 3] = np.asarray(aimg.origin, dtype=float)
    affine = _LPS @ lps
    out = nib.Nifti1Image(np.asarray(aimg.numpy()).astype(dtype), affine)
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    return out


def _as_nib(img) -> nib.Nifti1Image:
    if isinstance(img, (str, Path)):
        return nib.load(str(img))
    if isinstance(img, nib.spatialimages.SpatialImage):
        return img
    return from_ants(img)


@dataclass
class RegistrationResult:
    """Transforms (antspyx order) from one registration and the warped moving image."""

    forward: list[str]            # moving → fixed (resample moving onto fixed)
    inverse: list[str]            # fixed → moving
    forward_invert: list[bool]    # whichtoinvert flags for ``forward``
    inverse_invert: list[bool]    # whichtoinvert flags for ``inverse``
    warped: nib.Nifti1Image       # moving resampled on fixed
    kind: str = "SyN"
    extras: dict = field(default_factory=dict)


def exclusion_mask(brain_mask: np.ndarray | None, lesion_mask: np.ndarray | None,
                   shape: tuple[int, ...] | None = None) -> np.ndarray | None:
    """Metric mask for ANTs: brain (or everything) minus the lesion — lesions do not drive the fit.

    Examples
    --------
    >>> import numpy as np
    >>> exclusion_mask(np.array([1, 1, 1, 0]), np.array([0, 1, 0, 0])).astype(int)
    array([1, 0, 1, 0])
    """
    if brain_mask is None and lesion_mask is None:
        return None
    if brain_mask is None:
        brain = np.ones(shape or lesion_mask.shape, dtype=bool)
    else:
        brain = np.asarray(brain_mask) > 0
    if lesion_mask is not None:
        brain = brain & ~(np.asarray(lesion_mask) > 0)
    return brain


def _on_grid(mask: nib.Nifti1Image, like: nib.Nifti1Image) -> np.ndarray:
    """A mask as a boolean array on ``like``'s grid (nearest-neighbour resampling if needed)."""
    data = np.asarray(mask.dataobj)
    if data.ndim > 3:
        data = data[..., 0]
    if data.shape[:3] == like.shape[:3] and np.allclose(mask.affine, like.affine, atol=1e-3):
        return data > 0
    from nibabel.processing import resample_from_to

    img = nib.Nifti1Image((data > 0).astype(np.float32), mask.affine)
    return np.asarray(resample_from_to(img, (like.shape[:3], like.affine), order=0).dataobj) > 0


def _mask_image(mask, like: nib.Nifti1Image | None = None):
    if mask is None:
        return None
    if isinstance(mask, np.ndarray):
        if like is None:
            raise ValueError("a mask given as an array needs a reference image")
        mask = nib.Nifti1Image(mask.astype(np.float32), like.affine)
    mask = _as_nib(mask)
    data = (np.asarray(mask.dataobj) > 0).astype(np.float32)
    return to_ants(nib.Nifti1Image(data, mask.affine))


def register(
    fixed,
    moving,
    kind: str = "SyN",
    fixed_mask=None,
    moving_mask=None,
    lesion_mask=None,
    *,
    out_prefix: str | Path,
    composite: bool = False,
    seed: int | None = 0,
    threads: int = 1,
    reg_iterations: Sequence[int] = (40, 20, 0),
    aff_metric: str = "mattes",
    syn_metric: str = "mattes",
    initial_transform: str | None = None,
    **kwargs,
) -> RegistrationResult:
    """Register ``moving`` onto ``fixed`` (ANTs ``Rigid``, ``Affine``, ``SyN``, ``SyNRA``...).

    ``lesion_mask`` (in moving space) is removed from the moving metric mask (and from the
    brain mask if one is given), so a tumour neither pulls nor tears the deformation; the
    masks are used in every stage.  Transforms go to ``out_prefix`` (a folder and file-name prefix,
    required: :func:`checked_prefix`); ``composite=True`` writes ``Composite.h5``/``InverseComposite.h5``.
    """
    import ants

    out_prefix = checked_prefix(out_prefix)
    if kind in STAGED:
        return _register_staged(fixed, moving, kind, fixed_mask, moving_mask, lesion_mask, out_prefix,
                                composite, seed, threads, reg_iterations, aff_metric, syn_metric, **kwargs)
    configure_ants(threads, seed)
    fixed_n, moving_n = _as_nib(fixed), _as_nib(moving)
    if lesion_mask is not None:
        lesion = _on_grid(_as_nib(lesion_mask), moving_n)
        brain = None if moving_mask is None else _on_grid(_as_nib(moving_mask), moving_n)
        moving_mask = nib.Nifti1Image(
            exclusion_mask(brain, lesion, moving_n.shape[:3]).astype(np.float32), moving_n.affine)
    fmask, mmask = _mask_image(fixed_mask, fixed_n), _mask_image(moving_mask, moving_n)
    Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)
    args = dict(
        type_of_transform=kind, outprefix=out_prefix, mask=fmask, moving_mask=mmask,
        mask_all_stages=fmask is not None or mmask is not None,
        reg_iterations=tuple(reg_iterations), aff_metric=aff_metric, syn_metric=syn_metric,
        write_composite_transform=composite, verbose=False,
    )
    if initial_transform is not None:
        args["initial_transform"] = initial_transform
    args.update(kwargs)
    LOGGER.info("antsRegistration %s (%s masks)", kind, "with" if args["mask_all_stages"] else "no")
    res = ants.registration(to_ants(fixed_n), to_ants(moving_n), **args)
    fwd, inv = res["fwdtransforms"], res["invtransforms"]
    if composite:
        fwd, inv = [fwd], [inv]
        fwd_inv, inv_inv = [False], [False]
    else:
        fwd, inv = list(fwd), list(inv)
        fwd_inv = [False] * len(fwd)
        inv_inv = [p.endswith(".mat") for p in inv]
    return RegistrationResult(
        forward=[str(p) for p in fwd], inverse=[str(p) for p in inv],
        forward_invert=fwd_inv, inverse_invert=inv_inv,
        warped=from_ants(res["warpedmovout"]), kind=kind,
    )


def checked_prefix(out_prefix: str | Path | None) -> str:
    """``out_prefix`` as a string, or a ValueError when there is none.

    Every registration writes its transforms under a prefix its caller owns (a node's working
    directory, a pytest ``tmp_path``, a ``tempfile.TemporaryDirectory`` the caller closes): with
    no prefix they used to go to a ``/tmp/bids_uad_reg_*`` folder that nobody removed.
    """
    if out_prefix is None or str(out_prefix) == "":
        raise ValueError("registration needs out_prefix, the folder and file-name prefix its transforms are "
                         "written to (a folder the caller removes, e.g. a tempfile.TemporaryDirectory); "
                         "none was given")
    return str(out_prefix)


#: two-step registrations: a linear fit, then SyN at the full resolution of the fixed image only
STAGED = {"Rigid+SyN": "Rigid", "Affine+SyN": "Affine"}


def _sibling_prefix(prefix: str, tag: str) -> str:
    """A prefix in the same folder that antspyx's output glob for ``prefix`` cannot match."""
    path = Path(prefix)
    return str(path.parent / f"{tag}{path.name}")


def _register_staged(fixed, moving, kind, fixed_mask, moving_mask, lesion_mask, out_prefix, composite,
                     seed, threads, reg_iterations, aff_metric, syn_metric, **kwargs):
    """Linear registration, then ``SyNOnly`` initialised with it, at the finest level only.

    Coarse SyN levels on a 2-4 mm diffusion grid (8-16 mm effective voxels) were measured
    to drift by several mm on synthetic heads, while a few full-resolution SyN iterations
    after a rigid fit keep sub-voxel accuracy and still absorb residual EPI distortion.
    ``reg_iterations``: only its last entry is used (iterations at full resolution).
    ``out_prefix``: already checked by :func:`register`, its only caller.
    """
    linear = register(fixed, moving, kind=STAGED[kind], fixed_mask=fixed_mask, moving_mask=moving_mask,
                      lesion_mask=lesion_mask, out_prefix=_sibling_prefix(out_prefix, "linear_"), composite=False, seed=seed,
                      threads=threads, aff_metric=aff_metric, aff_random_sampling_rate=1.0)
    iterations = int(list(reg_iterations)[-1]) if len(reg_iterations) else 0
    if iterations <= 0:
        iterations = 20
    result = register(fixed, moving, kind="SyNOnly", fixed_mask=fixed_mask, moving_mask=moving_mask,
                      lesion_mask=lesion_mask, out_prefix=out_prefix, composite=composite, seed=seed,
                      threads=threads, reg_iterations=(iterations,), syn_metric=syn_metric,
                      initial_transform=linear.forward[0], **kwargs)
    # antsRegistration folds the initial (linear) transform into its outputs: the composite
    # .h5, or the 0GenericAffine.mat of the [Warp, Affine] pair
    result.kind = kind
    result.extras["linear"] = linear.forward
    return result


#: The largest grid (voxels of one volume, moving or fixed) whose 4-D images go through
#: antsApplyTransforms in one call (its time-series mode) rather than one call per volume.  Each
#: call reads the transforms (a T1w->template SyN is a 10 MB file: ~50 ms) and the series mode
#: reads them once: 33 volumes of the paper subject's dwi onto a template grid took 1.05 s
#: instead of 2.61 s at 4 mm, 3.0 instead of 4.9 at 2 mm, 6.3 instead of 8.2 at 1.5 mm, but 27
#: instead of 21 at 1 mm (8.7 M voxels; four 1 mm priors onto a 1 mm T1w: 4.4 instead of 3.7 s).
SERIES_MAX_VOXELS = 4_000_000


def apply_transforms(
    moving_img,
    fixed_img,
    transforms: Sequence[str],
    interpolation: str = "linear",
    invert: Sequence[bool] | None = None,
    default_value: float = 0.0,
    dtype=None,
    crop_to_support: bool = False,
) -> nib.Nifti1Image:
    """Resample ``moving_img`` onto the grid of ``fixed_img`` through ``transforms``.

    ``interpolation`` is an ANTs interpolator or an image kind (``label``, ``mask``,
    ``probability``, ``image``; see :data:`INTERPOLATION`).  ``invert`` flags the affine
    ``.mat`` files to invert (antspyx ``whichtoinvert``).  4-D inputs on grids of at most
    :data:`SERIES_MAX_VOXELS` voxels are resampled in one call (antsApplyTransforms' time-series
    mode), the others one volume per call; both give the same values to the last bit.
    Label outputs keep an integer dtype.  ``crop_to_support``: for a map that is zero outside a
    small region (an anomaly map, a label image) going onto a much finer grid (a 1 mm template),
    resample only inside the box of the fixed grid where it lands (:func:`support_box`) and leave
    the rest ``default_value`` (0); the result is the same, in a fraction of the time.
    """
    import ants

    interp = INTERPOLATION.get(interpolation, interpolation)
    moving_n, fixed_n = _as_nib(moving_img), _as_nib(fixed_img)
    if fixed_n.ndim > 3:
        fixed_n = nib.Nifti1Image(np.asarray(fixed_n.dataobj)[..., 0], fixed_n.affine)
    transforms = [str(t) for t in transforms] or ["identity"]
    if transforms == ["identity"]:
        invert = None
    elif invert is None:
        invert = [False] * len(transforms)
    invert = None if invert is None else [bool(v) for v in invert]
    data = np.asarray(moving_n.dataobj, dtype=np.float32)
    whole = [(0, int(n)) for n in fixed_n.shape[:3]]
    box = whole  # the part of the fixed grid that is resampled; None: nothing lands on it
    if crop_to_support and default_value == 0 and transforms != ["identity"]:
        box = support_box(np.any(data != 0, axis=-1) if data.ndim > 3 else data != 0, moving_n.affine,
                          fixed_n, transforms, invert)
    if box is None:  # nothing to carry: the map is empty where it lands
        arr = np.zeros(fixed_n.shape[:3] + data.shape[3:], np.float32)
    else:
        fixed_a = to_ants(fixed_n if box == whole else _crop_grid(fixed_n, box))

        def resample(vol: np.ndarray) -> np.ndarray:
            if transforms == ["identity"]:
                return ants.resample_image_to_target(to_ants(nib.Nifti1Image(vol, moving_n.affine)), fixed_a,
                                                     interp_type=interp).numpy()
            series = vol.ndim > 3
            return ants.apply_transforms(fixed_a, series_to_ants(vol, moving_n.affine) if series
                                         else to_ants(nib.Nifti1Image(vol, moving_n.affine)),
                                         transformlist=list(transforms), interpolator=interp, whichtoinvert=invert,
                                         defaultvalue=default_value, imagetype=3 if series else 0).numpy()

        one_call = data.ndim == 3 or (transforms != ["identity"] and max(
            int(np.prod(data.shape[:3])), int(np.prod(fixed_a.shape))) <= SERIES_MAX_VOXELS)
        warped = resample(data) if one_call else \
            np.stack([resample(data[..., i]) for i in range(data.shape[-1])], axis=-1)
        if box == whole:
            arr = np.asarray(warped, np.float32)
        else:
            arr = np.zeros(fixed_n.shape[:3] + data.shape[3:], np.float32)  # 0 outside where it lands
            arr[tuple(slice(lo, hi) for lo, hi in box)] = warped
    if dtype is None:
        dtype = np.int16 if interp in ("genericLabel", "nearestNeighbor", "multiLabel") else np.float32
    if np.issubdtype(np.dtype(dtype), np.integer):
        arr = np.rint(arr)
    img = nib.Nifti1Image(arr.astype(dtype), fixed_n.affine)
    img.set_qform(fixed_n.affine, code=1)
    img.set_sform(fixed_n.affine, code=1)
    return img


def coarse(img, resolution_mm: float, order: int = 1) -> nib.Nifti1Image:
    """The image (path or image; volume 0 of a 4D one) as float32, resampled to isotropic
    ``resolution_mm`` when its finest voxel is finer; ``resolution_mm <= 0`` keeps the grid.

    Registrations run on such copies: the transforms they find are physical, so they apply
    to the native grids unchanged.

    Examples
    --------
    >>> import numpy as np, nibabel as nib
    >>> img = nib.Nifti1Image(np.zeros((10, 10, 10), np.float32), np.eye(4))
    >>> out = coarse(img, 2.0)
    >>> out.shape, tuple(float(z) for z in out.header.get_zooms())
    ((6, 6, 6), (2.0, 2.0, 2.0))
    """
    from nibabel.processing import resample_to_output

    img = _as_nib(img)
    data = np.asarray(img.dataobj, dtype=np.float32)
    img = nib.Nifti1Image(data[..., 0] if data.ndim > 3 else data, img.affine)
    if resolution_mm > 0 and min(img.header.get_zooms()[:3]) < resolution_mm - 1e-3:
        return resample_to_output(img, [resolution_mm] * 3, order=order)
    return img


#: iterations of the FLAIR → T1w rigid fit per level (antspyx's shrink factors 6, 4, 2, 1 of the
#: 2 mm copies): none at full resolution.  That level's 10 full-sampling iterations were 2.5 s of
#: the 4.1 s fit on a 2 mm head; without them the error against the truth (identity) went from
#: 0.077 to 0.107 mm on the paper patient (1 mm T1w) and from 0.156 to 0.203 mm over four demo
#: sessions (2 mm): a twentieth of a 2 mm voxel, for an image that is displayed, thresholded at
#: lesion scale and used on the dwi grid (benchmarks/anat.py, 2026-12-07).
FLAIR_RIGID_ITERATIONS = (2100, 1200, 1200, 0)


def register_flair(t1w, flair, t1w_mask=None, resolution_mm: float = 2.0, seed: int | None = 0,
                   threads: int = 1, *, out_prefix: str | Path,
                   ) -> tuple[nib.Nifti1Image, RegistrationResult]:
    """Rigid FLAIR → T1w (Mattes MI, T1w brain mask as fixed mask), run on ``resolution_mm``
    copies (the rigid transform is physical) with :data:`FLAIR_RIGID_ITERATIONS`; returns the
    FLAIR resampled (linear) on the T1w grid and the registration (its transform written under
    ``out_prefix``).  The metric uses every voxel (sampling rate 1): with antspyx's default
    random 20 % sampling the same call occasionally (1 run in 5) ended in a wrong optimum
    despite the fixed seed.
    """
    out_prefix = checked_prefix(out_prefix)  # before any work
    fixed = coarse(t1w, resolution_mm)
    mask = None if t1w_mask is None else coarse(t1w_mask, resolution_mm, order=0)
    result = register(fixed, coarse(flair, resolution_mm), kind="Rigid", fixed_mask=mask,
                      aff_random_sampling_rate=1.0, aff_iterations=FLAIR_RIGID_ITERATIONS,
                      out_prefix=out_prefix, seed=seed, threads=threads)
    return apply_transforms(flair, t1w, result.forward, "image"), result


def register_followup(baseline_t1w, baseline_mask, baseline_lesion, followup_t1w, followup_mask,
                      followup_lesion, out_prefix, resolution: float = 2.0, syn: bool = True,
                      reg_iterations=(40, 20, 0), seed: int = 0, threads: int = 1,
                      ) -> tuple[RegistrationResult, RegistrationResult]:
    """Follow-up T1w brain → baseline T1w brain: rigid, then SyN; returns (rigid, last) results.

    Both lesions stay out of the metric: the baseline lesion and the rigidly mapped
    follow-up lesion (dilated by a voxel) are removed from the fixed mask, the follow-up
    lesion from the moving mask, so tumour growth is not "registered away".  The SyN stage
    starts from the rigid transform and the composite it writes includes it.  Images are
    paths; lesions may be ``""`` (none).  Without ``syn`` both results are the rigid one.
    """
    from scipy import ndimage as ndi

    out_prefix = checked_prefix(out_prefix)  # (None would have named files "Nonerigid_..." in the cwd)

    def brain_img(t1w, mask):
        img = coarse(t1w, resolution)
        m = _on_grid(nib.load(str(mask)), img)
        return nib.Nifti1Image(np.asarray(img.dataobj, np.float32) * m, img.affine), m

    fixed, fmask = brain_img(baseline_t1w, baseline_mask)
    moving, mmask = brain_img(followup_t1w, followup_mask)
    base_les = _on_grid(nib.load(str(baseline_lesion)), fixed) if baseline_lesion else np.zeros(fixed.shape, bool)
    fu_les = _on_grid(nib.load(str(followup_lesion)), moving) if followup_lesion else np.zeros(moving.shape, bool)
    fu_les_img = nib.Nifti1Image(fu_les.astype(np.float32), moving.affine)
    mmask_img = nib.Nifti1Image(mmask.astype(np.float32), moving.affine)
    fixed_mask = nib.Nifti1Image(exclusion_mask(fmask, base_les).astype(np.float32), fixed.affine)
    rigid = register(fixed, moving, kind="Rigid", fixed_mask=fixed_mask, moving_mask=mmask_img,
                     lesion_mask=fu_les_img if fu_les.any() else None, out_prefix=f"{out_prefix}rigid_",
                     seed=seed, threads=threads)
    if not syn:
        return rigid, rigid
    fu_on_base = np.asarray(apply_transforms(fu_les_img, fixed, rigid.forward, "mask").dataobj) > 0
    excl = ndi.binary_dilation(base_les | fu_on_base) if (base_les.any() or fu_on_base.any()) else base_les
    fixed_mask = nib.Nifti1Image(exclusion_mask(fmask, excl).astype(np.float32), fixed.affine)
    result = register(fixed, moving, kind="SyNOnly", fixed_mask=fixed_mask, moving_mask=mmask_img,
                      lesion_mask=fu_les_img if fu_les.any() else None, out_prefix=f"{out_prefix}syn_",
                      composite=True, initial_transform=rigid.forward, seed=seed, threads=threads,
                      reg_iterations=tuple(reg_iterations))
    return rigid, result


#: Spacing (mm) of the coarse probe grid of :func:`support_box`, and its margin in probe voxels.
SUPPORT_PROBE_MM = 4.0
SUPPORT_MARGIN = 3


def support_box(support: np.ndarray, affine: np.ndarray, fixed_n: nib.Nifti1Image, transforms: Sequence[str],
                invert: Sequence[bool] | None) -> list[tuple[int, int]] | None:
    """The index box of ``fixed_n``'s grid outside which a map nonzero only on ``support`` (on the
    grid of ``affine``) resamples to 0 through ``transforms``: [(lo, hi)] per axis, None when it
    lands nowhere.  The whole grid when it is not much finer than :data:`SUPPORT_PROBE_MM`.

    The support (as a 0/1 image, linear interpolation: nonzero wherever any interpolation of the
    map can be) is resampled onto a probe grid of the fixed grid's every ``f``-th voxel (``f``
    voxels make :data:`SUPPORT_PROBE_MM`); the box of the nonzero probe voxels, grown by
    :data:`SUPPORT_MARGIN` probe voxels (12 mm: a linear interpolation reaches one moving voxel
    past the support, and a probe point lies within half a probe spacing of any point), is where
    the full resampling runs.
    """
    import ants

    zooms = np.asarray(fixed_n.header.get_zooms()[:3], float)
    shape = np.asarray(fixed_n.shape[:3])
    factor = int(np.floor(SUPPORT_PROBE_MM / max(float(zooms.max()), 1e-6)))
    if factor < 2:
        return [(0, int(n)) for n in shape]
    if not support.any():
        return None
    probe_shape = tuple(int(n) for n in -(-shape // factor))
    probe_affine = fixed_n.affine @ np.diag([factor, factor, factor, 1.0])
    probe = to_ants(nib.Nifti1Image(np.zeros(probe_shape, np.float32), probe_affine))
    moving = to_ants(nib.Nifti1Image(support.astype(np.float32), affine))
    landed = ants.apply_transforms(probe, moving, transformlist=list(transforms), interpolator="linear",
                                   whichtoinvert=None if invert is None else list(invert)).numpy() > 0
    if not landed.any():
        return None
    idx = np.argwhere(landed)
    lo = np.maximum((idx.min(0) - SUPPORT_MARGIN) * factor, 0)
    hi = np.minimum((idx.max(0) + SUPPORT_MARGIN) * factor + 1, shape)
    return [(int(a), int(b)) for a, b in zip(lo, hi)]


def _crop_grid(fixed_n: nib.Nifti1Image, box: list[tuple[int, int]]) -> nib.Nifti1Image:
    """An empty image on the sub-grid ``box`` of ``fixed_n``'s grid (same voxels, shifted origin)."""
    return nib.Nifti1Image(np.zeros([hi - lo for lo, hi in box], np.float32), subgrid_affine(fixed_n.affine, box))


def chain_dwi_to_template(t1w2dwi_inverse: Sequence[str], t1w2dwi_inverse_invert: Sequence[bool],
                          t1w2mni: Sequence[str], t1w2mni_invert: Sequence[bool] | None = None,
                          ) -> tuple[list[str], list[bool]]:
    """Transform list (and invert flags) taking a dwi-space image to the template.

    The image first goes dwi → T1w (inverse of T1w→dwi), then T1w → template; antspyx
    applies the last transform of the list first, so the T1w→template part comes first.

    Examples
    --------
    >>> chain_dwi_to_template(["dwi2t1w_affine.mat"], [True], ["t1w2mni.h5"])
    (['t1w2mni.h5', 'dwi2t1w_affine.mat'], [False, True])
    """
    fwd_flags = list(t1w2mni_invert) if t1w2mni_invert is not None else [False] * len(t1w2mni)
    return list(t1w2mni) + list(t1w2dwi_inverse), fwd_flags + list(t1w2dwi_inverse_invert)


def dwi_to_template(img, template_file, t1w2dwi_inverse: Sequence[str],
                    t1w2mni: Sequence[str], interpolation: str = "linear",
                    t1w2dwi_inverse_invert: Sequence[bool] | None = None) -> nib.Nifti1Image:
    """Carry a dwi-space map to template space in one resampling (dwi → T1w → template).

    ``t1w2dwi_inverse`` is the inverse of T1w→dwi (``InverseComposite.h5`` or the
    ``[affine.mat, InverseWarp.nii.gz]`` pair, whose ``.mat`` is inverted automatically).
    """
    flags = (list(t1w2dwi_inverse_invert) if t1w2dwi_inverse_invert is not None
             else [str(p).endswith(".mat") for p in t1w2dwi_inverse])
    xfms, inv = chain_dwi_to_template(t1w2dwi_inverse, flags, t1w2mni)
    return apply_transforms(img, template_file, xfms, interpolation, invert=inv, crop_to_support=True)


def register_fa_to_template(fa: nib.Nifti1Image, brain_mask: nib.Nifti1Image, template_fa: nib.Nifti1Image,
                            template_mask: nib.Nifti1Image, *, out_prefix: str | Path,
                            seed: int | None = 0, threads: int = 1) -> tuple[RegistrationResult, dict]:
    """Subject FA → an FA-like template (affine then SyN, Mattes MI, both brain masks), for
    subjects without a T1w; returns the registration and its quality.

    Quality: Pearson correlation of the warped FA with the template's FA-like image, inside
    the template brain where the subject's (warped) brain mask is: a slab is judged on what it
    covers.  Composite transforms (``from-dwi_to-<template>``) are written under ``out_prefix``.
    """
    out_prefix = checked_prefix(out_prefix)  # before any work
    fa_n, mask_n = _as_nib(fa), _as_nib(brain_mask)
    moving = nib.Nifti1Image(np.asarray(fa_n.dataobj, np.float32) * (np.asarray(mask_n.dataobj) > 0), fa_n.affine)
    result = register(template_fa, moving, kind="Affine+SyN", fixed_mask=template_mask, moving_mask=mask_n,
                      out_prefix=out_prefix, composite=True, seed=seed, threads=threads,
                      reg_iterations=(40, 20, 0))
    warped = apply_transforms(moving, template_fa, result.forward, "image")
    covered = apply_transforms(mask_n, template_fa, result.forward, "mask")
    return result, fa_template_agreement(warped, covered, template_fa, template_mask)


def fa_template_agreement(warped_fa, warped_mask, template_fa, template_mask) -> dict:
    """How well a subject's FA, already in template space, matches the FA-like template.

    Pearson correlation of the warped FA with the template's FA-like image inside the template
    brain where the subject's warped brain mask is (a slab is judged on what it covers), and the
    fraction of the template brain covered.  One measure for both routes to the template (FA
    registered directly without a T1w; dwi -> T1w -> template with one), so they can be compared.
    """
    warped = np.asarray(_as_nib(warped_fa).dataobj, np.float32)
    target = np.asarray(_as_nib(template_fa).dataobj, np.float32)
    brain = np.asarray(_as_nib(template_mask).dataobj) > 0
    inside = (np.asarray(_as_nib(warped_mask).dataobj) > 0) & brain
    corr = float(np.corrcoef(warped[inside], target[inside])[0, 1]) if inside.sum() > 10 else float("nan")
    return {"FACorrelationWithTemplate": round(corr, 4),
            "CoveredTemplateBrainFraction": round(float(inside.sum()) / max(int(brain.sum()), 1), 3)}


@dataclass(frozen=True)
class TemplateRoute:
    """How the maps of one dwi run go to a template grid and come back (one resampling each way).

    ``affine``: voxel-to-world (4x4) of the arrays carried (the dwi image, or the model grid that
    overlays it); ``to_template``: the ANTs transform list that resamples a dwi-space image onto the
    template (``[T1w→template, dwi→T1w]``, or the dwi-only ``[dwi→template]``); ``to_dwi``: the
    inverse chain (``[T1w→dwi, template→T1w]``).  Empty lists mean identity (the arrays are already
    in the template's world frame: tests, phantoms).
    """

    template: str
    affine: tuple
    to_template: tuple = ()
    to_dwi: tuple = ()

    def with_affine(self, affine: np.ndarray) -> "TemplateRoute":
        """The same route for arrays with another voxel-to-world ``affine`` (e.g. the model grid)."""
        return TemplateRoute(self.template, tuple(np.asarray(affine, float).ravel()), self.to_template, self.to_dwi)

    @property
    def matrix(self) -> np.ndarray:
        return np.asarray(self.affine, float).reshape(4, 4)

    def forward(self, maps: np.ndarray, support: np.ndarray, shape: Sequence[int],
                affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(``maps`` (K, X, Y, Z) carried onto the template grid ``shape``/``affine``, the carried
        ``support``): :func:`carry_masked` with this route's ``to_template`` chain."""
        return carry_masked(maps, support, self.matrix, shape, affine, self.to_template)

    def backward(self, maps: np.ndarray, support: np.ndarray, template_affine: np.ndarray,
                 shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Template-grid ``maps`` (K, X', Y', Z') back onto this route's arrays (``shape``)."""
        return carry_masked(maps, support, np.asarray(template_affine, float), shape, self.matrix, self.to_dwi)


def carry_masked(maps: np.ndarray, support: np.ndarray, affine: np.ndarray, shape: Sequence[int],
                 target_affine: np.ndarray, transforms: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Resample ``maps`` (K, X, Y, Z; defined where ``support``) onto the grid ``shape``/``target_affine``
    through ``transforms`` (linear), normalised by the carried support: each output is
    Σ w·m·s / Σ w·s, so values outside the support (0) do not dilute the edge.  Returns
    (maps (K, ...) float32, 0 where the carried support is below one half; that support, bool).
    No transforms between two equal grids (a network's own grid given identity routes) carry nothing:
    the values where the support is at least one half, without a resampling call."""
    s = np.asarray(support, np.float32)
    if (not transforms and tuple(int(v) for v in shape) == s.shape
            and np.allclose(np.asarray(affine, float), np.asarray(target_affine, float), rtol=0, atol=1e-6)):
        inside = s >= 0.5
        return np.where(inside, np.asarray(maps, np.float32) * s / np.maximum(s, 1e-6), 0).astype(np.float32), inside
    target = nib.Nifti1Image(np.zeros(tuple(int(v) for v in shape), np.float32), np.asarray(target_affine, float))
    stack = np.concatenate([np.asarray(maps, np.float32) * s, s[None]], 0)
    moved = np.asarray(apply_transforms(nib.Nifti1Image(np.moveaxis(stack, 0, -1), np.asarray(affine, float)),
                                        target, list(transforms), "linear").dataobj, np.float32)
    moved = np.moveaxis(moved, -1, 0) if moved.ndim == 4 else moved[None]
    weight = moved[-1]
    inside = weight >= 0.5
    out = np.where(inside, moved[:-1] / np.maximum(weight, 1e-6), 0).astype(np.float32)
    return out, inside
