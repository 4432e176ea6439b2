"""Template choice without downloads: TemplateFlow when it is already there, else nilearn's.

:func:`find_template` returns the template image, its brain mask, tissue priors (GM, WM,
CSF) and a lateral-ventricle prior.  ``MNI152NLin2009cAsym`` is used when
``$TEMPLATEFLOW_HOME`` holds its (non-empty) files; otherwise the MNI152 2009a symmetric
template bundled with nilearn (``MNI152NLin2009aSym``).  Derived files (brain mask, CSF
prior, ventricle prior) are computed once into a cache folder and reused.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

LOGGER = logging.getLogger(__name__)

TEMPLATEFLOW_NAME = "MNI152NLin2009cAsym"
NILEARN_NAME = "MNI152NLin2009aSym"

#: Box (mm, MNI) searched for the lateral ventricles, and the prior's smoothing.
VENTRICLE_BOX = {"x": (-35.0, 35.0), "y": (-60.0, 35.0), "z": (-5.0, 40.0)}
VENTRICLE_SIGMA_MM = 1.5


@dataclass(frozen=True)
class Template:
    """A template and what the anatomical workflow needs from it (all files on disk)."""

    name: str
    t1w: str            # brain-extracted T1w
    brain_mask: str
    priors: dict = field(default_factory=dict)   # {"GM": path, "WM": path, "CSF": path}
    ventricles: str = ""                          # lateral-ventricle prior (0..1)
    source: str = ""                              # "templateflow" or "nilearn"

    def __iter__(self):  # (name, path, brain mask path, priors), as the brief asks
        return iter((self.name, self.t1w, self.brain_mask, self.priors))


def nilearn_data_dir() -> Path:
    import nilearn.datasets

    return Path(nilearn.datasets.__file__).parent / "data"


def cache_dir() -> Path:
    """Where derived template files go: ``$BIDS_UAD_CACHE``, else ``~/.cache/bids_uad``, else tmp."""
    for candidate in (os.environ.get("BIDS_UAD_CACHE"),
                      os.path.join(os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")),
                                   "bids_uad"),
                      os.path.join(tempfile.gettempdir(), "bids_uad_cache")):
        if not candidate:
            continue
        path = Path(candidate) / "templates"
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".probe{os.getpid()}"
            probe.write_text("")
            probe.unlink()
            return path
        except OSError:
            continue
    raise RuntimeError("no writable cache folder for template files")


def _save(img: nib.Nifti1Image, path: Path) -> str:
    from bids_uad.bids.derivatives import atomic_path

    if not path.exists():
        with atomic_path(path) as tmp:
            nib.save(img, str(tmp))
    return str(path)


def _templateflow_files(home: str | Path | None) -> dict | None:
    """Paths of the 1 mm MNI152NLin2009cAsym files when all are present and not empty."""
    if not home:
        return None
    base = Path(home) / f"tpl-{TEMPLATEFLOW_NAME}"
    stem = f"tpl-{TEMPLATEFLOW_NAME}_res-01"
    files = {
        "t1w": base / f"{stem}_T1w.nii.gz",
        "brain_mask": base / f"{stem}_desc-brain_mask.nii.gz",
        "GM": base / f"{stem}_label-GM_probseg.nii.gz",
        "WM": base / f"{stem}_label-WM_probseg.nii.gz",
        "CSF": base / f"{stem}_label-CSF_probseg.nii.gz",
    }
    for path in files.values():
        try:
            if path.stat().st_size < 1024:  # DataLad/TemplateFlow placeholders are empty
                return None
            nib.load(str(path))
        except (OSError, nib.filebasedimages.ImageFileError):
            return None
    return {k: str(v) for k, v in files.items()}


def ventricle_prior(csf: np.ndarray, brain: np.ndarray, affine: np.ndarray,
                    box: dict = VENTRICLE_BOX, sigma_mm: float = VENTRICLE_SIGMA_MM) -> np.ndarray:
    """Lateral-ventricle prior from a template's CSF map.

    CSF (p > 0.5) deep inside the brain (brain mask eroded by 10 mm, which drops the
    sulcal and cisternal CSF) and inside a central box around the ventricles (MNI mm,
    :data:`VENTRICLE_BOX`); the largest connected component is the lateral ventricles
    (with the third ventricle where it touches them).  Smoothed (σ 1.5 mm) into a 0..1 prior.
    """
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    iters = max(1, int(round(10.0 / float(np.mean(zooms)))))
    deep = ndi.binary_erosion(brain > 0, iterations=iters)
    ijk = np.indices(csf.shape, dtype=np.float32).reshape(3, -1)
    xyz = (affine[:3, :3] @ ijk + affine[:3, 3:4]).reshape((3,) + csf.shape)
    inside = np.ones(csf.shape, dtype=bool)
    for axis, key in enumerate("xyz"):
        lo, hi = box[key]
        inside &= (xyz[axis] > lo) & (xyz[axis] < hi)
    cand = (csf > 0.5) & deep & inside
    labels, n = ndi.label(cand)
    if n == 0:
        return np.zeros(csf.shape, dtype=np.float32)
    sizes = ndi.sum(cand, labels, range(1, n + 1))
    vent = labels == (int(np.argmax(sizes)) + 1)
    prior = ndi.gaussian_filter(vent.astype(np.float32), sigma=sigma_mm / zooms)
    return np.clip(prior / max(float(prior.max()), 1e-6), 0.0, 1.0).astype(np.float32)


def _nilearn_template(cache: Path) -> Template:
    data = nilearn_data_dir()
    t1_path = data / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    t1 = nib.load(str(t1_path))
    affine = t1.affine
    t1_data = np.asarray(t1.dataobj, dtype=np.float32)
    tag = hashlib.sha1(f"{t1_path.stat().st_size}{VENTRICLE_BOX}{VENTRICLE_SIGMA_MM}".encode()).hexdigest()[:8]
    out = cache / f"{NILEARN_NAME}-{tag}"
    out.mkdir(parents=True, exist_ok=True)
    stem = f"tpl-{NILEARN_NAME}_res-01"
    paths = {
        "t1w": out / f"{stem}_desc-brain_T1w.nii.gz",
        "brain_mask": out / f"{stem}_desc-brain_mask.nii.gz",
        "GM": out / f"{stem}_label-GM_probseg.nii.gz",
        "WM": out / f"{stem}_label-WM_probseg.nii.gz",
        "CSF": out / f"{stem}_label-CSF_probseg.nii.gz",
        "ventricles": out / f"{stem}_desc-ventricles_probseg.nii.gz",
    }
    if not all(p.exists() for p in paths.values()):
        LOGGER.info("deriving %s mask and priors into %s", NILEARN_NAME, out)
        brain = ndi.binary_fill_holes(t1_data > 0)
        gm = np.asarray(nib.load(str(data / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")).dataobj,
                        dtype=np.float32)
        wm = np.asarray(nib.load(str(data / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")).dataobj,
                        dtype=np.float32)
        scale = 255.0 if max(gm.max(), wm.max()) > 1.5 else 1.0
        gm, wm = gm / scale, wm / scale
        total = gm + wm
        over = total > 1.0
        gm[over] /= total[over]
        wm[over] /= total[over]
        csf = np.clip(brain.astype(np.float32) - gm - wm, 0.0, 1.0) * brain
        gm, wm = gm * brain, wm * brain

        def img(a, dtype=np.float32):
            return nib.Nifti1Image(a.astype(dtype), affine)

        _save(img(t1_data * brain), paths["t1w"])
        _save(img(brain, np.uint8), paths["brain_mask"])
        _save(img(gm), paths["GM"])
        _save(img(wm), paths["WM"])
        _save(img(csf), paths["CSF"])
        _save(img(ventricle_prior(csf, brain, affine)), paths["ventricles"])
    return Template(
        name=NILEARN_NAME, t1w=str(paths["t1w"]), brain_mask=str(paths["brain_mask"]),
        priors={k: str(paths[k]) for k in ("GM", "WM", "CSF")},
        ventricles=str(paths["ventricles"]), source="nilearn",
    )


def _templateflow_template(files: dict, cache: Path) -> Template:
    out = cache / TEMPLATEFLOW_NAME
    out.mkdir(parents=True, exist_ok=True)
    stem = f"tpl-{TEMPLATEFLOW_NAME}_res-01"
    brain_t1 = out / f"{stem}_desc-brain_T1w.nii.gz"
    vent = out / f"{stem}_desc-ventricles_probseg.nii.gz"
    if not (brain_t1.exists() and vent.exists()):
        t1 = nib.load(files["t1w"])
        mask = np.asarray(nib.load(files["brain_mask"]).dataobj) > 0
        _save(nib.Nifti1Image(np.asarray(t1.dataobj, dtype=np.float32) * mask, t1.affine), brain_t1)
        csf = np.asarray(nib.load(files["CSF"]).dataobj, dtype=np.float32)
        _save(nib.Nifti1Image(ventricle_prior(csf, mask, t1.affine), t1.affine), vent)
    return Template(
        name=TEMPLATEFLOW_NAME, t1w=str(brain_t1), brain_mask=files["brain_mask"],
        priors={k: files[k] for k in ("GM", "WM", "CSF")}, ventricles=str(vent),
        source="templateflow",
    )


def find_template(templateflow_home: str | Path | None = None,
                  cache: str | Path | None = None) -> Template:
    """The template to use: TemplateFlow's MNI152NLin2009cAsym if present, else nilearn's.

    ``templateflow_home`` defaults to ``$TEMPLATEFLOW_HOME``.  Nothing is downloaded.
    """
    home = templateflow_home if templateflow_home is not None else os.environ.get("TEMPLATEFLOW_HOME")
    cache = Path(cache) if cache is not None else cache_dir()
    files = _templateflow_files(home)
    if files is not None:
        _log_once("template: TemplateFlow %s from %s", TEMPLATEFLOW_NAME, home)
        return _templateflow_template(files, cache)
    _log_once("template: %s bundled with nilearn (TemplateFlow's %s not available offline)",
              NILEARN_NAME, TEMPLATEFLOW_NAME)
    return _nilearn_template(cache)


@functools.lru_cache(maxsize=None)
def _log_once(message: str, *args, level: int = logging.INFO) -> None:
    """Log a template notice once per process (workflows look the template up once per session)."""
    LOGGER.log(level, message, *args)


def template_for_output_spaces(output_spaces) -> "Template":
    """:func:`find_template`, warning once per process when the MNI output space asked for is not
    the template available offline (outputs are then named after the template used)."""
    template = find_template()
    wanted = [s for s in output_spaces if s.startswith("MNI")]
    if wanted and template.name not in wanted:
        _log_once("template %s asked for but not available offline; using %s (outputs are named space-%s)",
                  ", ".join(wanted), template.name, template.name, level=logging.WARNING)
    return template


def phantom_head(resolution_mm: float = 3.0, pose: np.ndarray | None = None,
                 warp_mm: float = 0.0, bias: float = 0.2, noise: float = 0.02,
                 seed: int = 0, lesion_radius_mm: float = 0.0) -> dict:
    """A T1w head with skull built from nilearn's template, with its truth (tests, benchmarks).

    Brain tissue keeps the template's T1w contrast; around it: a CSF rim (2 mm, dark), a
    skull (5 mm, very dark) and a scalp (5 mm, bright).  ``pose`` (4x4, world → world)
    moves the head, ``warp_mm`` adds a smooth sinusoidal deformation of that amplitude,
    ``bias`` a multiplicative linear field (±bias), ``lesion_radius_mm`` a dark sphere in the
    right hemisphere's white matter.  Returns nibabel images: ``t1w``, ``brain_mask``,
    ``dseg`` (1 CSF, 2 GM, 3 WM), ``lesion``, ``bias`` and the ``pose`` used.
    """
    from nibabel.processing import resample_from_to

    rng = np.random.default_rng(seed)
    data = nilearn_data_dir()
    t1 = nib.load(str(data / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"))
    gm = nib.load(str(data / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"))
    wm = nib.load(str(data / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"))
    r = float(resolution_mm)
    pad = 16.0
    lo = t1.affine[:3, 3] - pad
    extent = np.asarray(t1.shape) * np.abs(np.diag(t1.affine)[:3]) + 2 * pad
    shape = tuple(int(np.ceil(e / r)) for e in extent)
    affine = np.diag([r, r, r, 1.0])
    affine[:3, 3] = lo
    grid = (shape, affine)

    def res(img, order):
        img = nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine)
        return np.asarray(resample_from_to(img, grid, order=order).dataobj, dtype=np.float32)

    t1d, gmd, wmd = res(t1, 1), res(gm, 1) / 255.0, res(wm, 1) / 255.0
    brain = ndi.binary_fill_holes(t1d > 20)
    csf = np.clip(1.0 - gmd - wmd, 0, 1)
    dseg = (np.argmax(np.stack([csf, gmd, wmd]), axis=0) + 1) * brain
    dist = ndi.distance_transform_edt(~brain, sampling=[r] * 3)
    img = np.where(brain, t1d, 0.0)
    # extra-axial CSF, inner table, diploe, outer table, muscle, fat (outer radius mm, value)
    lo_mm = 0.0
    for hi_mm, value in ((1.5, 35.0), (3.0, 7.0), (5.0, 80.0), (6.5, 7.0), (8.5, 90.0), (12.5, 215.0)):
        img = np.where((dist > lo_mm) & (dist <= hi_mm), value, img)
        lo_mm = hi_mm
    lesion = np.zeros(shape, dtype=bool)
    if lesion_radius_mm > 0:
        centre = np.linalg.inv(affine) @ np.array([26.0, -10.0, 22.0, 1.0])
        ijk = np.indices(shape).astype(np.float32)
        d2 = sum(((ijk[i] - centre[i]) * r) ** 2 for i in range(3))
        lesion = (d2 <= lesion_radius_mm ** 2) & brain
        img = np.where(lesion, 60.0, img)
    # truth arrays on the template grid; now pose + warp: sample template at x = f(y)
    pose = np.eye(4) if pose is None else np.asarray(pose, dtype=float)
    ijk = np.indices(shape).reshape(3, -1).astype(np.float64)
    world = affine[:3, :3] @ ijk + affine[:3, 3:4]
    src = np.linalg.inv(pose) @ np.vstack([world, np.ones((1, world.shape[1]))])
    src = src[:3]
    if warp_mm > 0:
        src = src + warp_mm * np.sin(src[[1, 2, 0]] / 25.0)
    vox = np.linalg.inv(affine)[:3, :3] @ src + np.linalg.inv(affine)[:3, 3:4]

    def samp(a, order):
        return ndi.map_coordinates(a.astype(np.float32), vox, order=order, mode="constant",
                                   prefilter=False).reshape(shape)

    img_w = samp(img, 1)
    dseg_w = samp(dseg, 0).astype(np.int16)
    brain_w = samp(brain, 0) > 0
    lesion_w = samp(lesion, 0) > 0
    pos = (ijk.reshape((3,) + shape) - np.asarray(shape).reshape(3, 1, 1, 1) / 2.0)
    field_ = 1.0 + bias * (pos[0] / shape[0] + pos[2] / shape[2])
    img_w = img_w * field_ * (1.0 + noise * rng.standard_normal(shape))
    img_w = np.clip(img_w, 0, None).astype(np.float32)

    def mk(a, dtype):
        out = nib.Nifti1Image(a.astype(dtype), affine)
        out.set_data_dtype(dtype)
        return out

    return {
        "t1w": mk(img_w, np.float32), "brain_mask": mk(brain_w, np.uint8),
        "dseg": mk(dseg_w, np.int16), "lesion": mk(lesion_w, np.uint8),
        "bias": mk(field_, np.float32), "pose": pose,
    }


#: FA assigned to each prior of the template to build an FA-like target for dwi-only subjects
#: (typical adult values at b~1000: WM 0.45, GM 0.15, CSF 0.05).
FA_OF_TISSUE = {"WM": 0.45, "GM": 0.15, "CSF": 0.05}


def fa_like_template(template: Template, resolution_mm: float = 2.0) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """(FA-like image, brain mask) of ``template`` at ``resolution_mm``, from its tissue priors.

    No FA template ships with nilearn or the offline TemplateFlow subset; the weighted sum of the
    tissue priors (:data:`FA_OF_TISSUE`) has FA's contrast (bright WM, dark GM and CSF), which
    is what a mutual-information registration of a subject's FA map needs.
    """
    from nibabel.processing import resample_to_output

    ref = nib.load(template.priors["WM"])
    fa = sum(FA_OF_TISSUE[k] * np.asarray(nib.load(template.priors[k]).dataobj, np.float32) for k in FA_OF_TISSUE)
    img = resample_to_output(nib.Nifti1Image(fa.astype(np.float32), ref.affine), [resolution_mm] * 3, order=1)
    mask = resample_to_output(nib.load(template.brain_mask), [resolution_mm] * 3, order=0)
    return img, nib.Nifti1Image((np.asarray(mask.dataobj) > 0).astype(np.uint8), mask.affine)


def native_resolution_mm(zooms) -> float:
    """The isotropic voxel size (mm) at which diffusion-space maps live in a template: that of the
    same volume as a voxel of ``zooms`` (mm), rounded to 0.01 mm, at least 1 mm.  Used for the
    normative model's and the score references' grids and for the template-space anomaly maps
    (fMRIPrep's ``res-native``: a map is not resampled finer than it was measured)."""
    return max(1.0, round(float(np.prod([float(z) for z in zooms[:3]])) ** (1 / 3), 2))


@functools.lru_cache(maxsize=8)
def native_template_reference(brain_mask: str, resolution_mm: float) -> nib.Nifti1Image:
    """An empty image on :func:`template_grid` (``brain_mask``: a path) at ``resolution_mm``: the
    reference grid that diffusion-space maps are carried onto in the template."""
    shape, affine = template_grid(brain_mask, resolution_mm)
    return nib.Nifti1Image(np.zeros(shape, np.uint8), affine)


def template_grid(brain_mask, resolution_mm: float, margin_vox: int = 2) -> tuple[tuple[int, int, int], np.ndarray]:
    """(shape, affine) of a grid at isotropic ``resolution_mm`` covering the template brain
    ``brain_mask`` (image or path) and ``margin_vox`` voxels around it: where a template-space model
    (the normative model's centre/spread) lives, at about the data's resolution rather than 1 mm."""
    from nibabel.processing import resample_to_output

    img = nib.load(str(brain_mask)) if not isinstance(brain_mask, nib.Nifti1Image) else brain_mask
    coarse = resample_to_output(nib.Nifti1Image((np.asarray(img.dataobj) > 0).astype(np.float32), img.affine),
                                [float(resolution_mm)] * 3, order=1)
    inside = np.argwhere(np.asarray(coarse.dataobj) > 0.5)
    if inside.size == 0:
        raise ValueError("the template brain mask is empty")
    lo = np.maximum(inside.min(0) - margin_vox, 0)
    hi = np.minimum(inside.max(0) + margin_vox + 1, coarse.shape[:3])
    affine = coarse.affine.copy()
    affine[:3, 3] = coarse.affine[:3, :3] @ lo + coarse.affine[:3, 3]
    return tuple(int(v) for v in hi - lo), affine
