"""Subject anatomy from the MNI152 2009a template shipped inside nilearn's wheel.

The template (T1w, GM, WM; CSF = brain mask - GM - WM) is padded so that a skull and scalp
shell fits around the brain.  A subject is the template seen through a smooth random
nonlinear deformation (global scaling + a few low-frequency sinusoidal modes); each session
places the head in the scanner with a rigid transform.  Everything is analytic in the
coordinates, so any grid can be sampled directly with one interpolation.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from bids_uad.errors import InputMissingError

PAD_MM = 22


def _nilearn_data_dir() -> Path:
    """nilearn's bundled data folder, found without importing nilearn (about 1 s with sklearn)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:  # pragma: no cover - a hard dependency
        raise InputMissingError("nilearn is needed for the MNI152 template")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


@dataclass
class Template:
    """Template arrays on one padded grid (voxel size ``res`` mm)."""

    res: int
    affine: np.ndarray
    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    brain: np.ndarray
    extra: dict = field(default_factory=dict)

    @property
    def inv_affine(self) -> np.ndarray:
        return np.linalg.inv(self.affine)

    def to_voxel(self, pts_mm: np.ndarray) -> np.ndarray:
        """(3, N) template mm -> (3, N) voxel coordinates."""
        inv = self.inv_affine.astype(np.float32)
        return inv[:3, :3] @ np.asarray(pts_mm, np.float32) + inv[:3, 3:4]


def sample(vol: np.ndarray, vox: np.ndarray, order: int = 1, cval: float = 0.0) -> np.ndarray:
    """Trilinear (or nearest) sample of ``vol`` at (3, N) voxel coordinates."""
    return ndimage.map_coordinates(vol, vox, order=order, mode="constant", cval=cval,
                                   prefilter=False).astype(np.float32)


@lru_cache(maxsize=2)
def load_template(res: int = 1) -> Template:
    """Padded MNI152 template at 1 mm, or 2 mm (block mean) with the derived fields.

    The 2 mm template also carries ``extra``: ``headdist`` (signed distance to the brain
    surface in mm, >0 outside), ``depth`` (distance inside the brain, mm) and the six
    components of a WM structure tensor used for fibre orientations.
    """
    data = _nilearn_data_dir()
    names = {"t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
             "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
             "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"}
    arrs = {}
    aff = None
    for key, name in names.items():
        path = data / name
        if not path.exists():
            raise InputMissingError("MNI152 template missing from the nilearn installation", path)
        img = nib.load(str(path))
        aff = img.affine
        arrs[key] = np.asarray(img.dataobj, dtype=np.float32) / 255.0
    shape = np.array(arrs["t1"].shape)
    pad_hi = PAD_MM + (shape + 2 * PAD_MM) % 2  # even shape so 2 mm blocks fit
    pads = [(PAD_MM, int(h)) for h in pad_hi]
    for key in arrs:
        arrs[key] = np.pad(arrs[key], pads)
    brain = np.maximum((arrs["t1"] > 0).astype(np.float32), np.clip(arrs["gm"] + arrs["wm"], 0, 1))
    wm_norm = float(np.median(arrs["t1"][arrs["wm"] > 0.9]))
    arrs["t1"] = arrs["t1"] / wm_norm
    affine = aff.copy()
    affine[:3, 3] -= PAD_MM * np.diag(aff)[:3]
    tpl1 = Template(1, affine, arrs["t1"], arrs["gm"], arrs["wm"], brain)
    if res == 1:
        return tpl1
    if res != 2:
        raise ValueError("template resolution must be 1 or 2 mm")

    def down(a):
        s = a.shape
        return a.reshape(s[0] // 2, 2, s[1] // 2, 2, s[2] // 2, 2).mean(axis=(1, 3, 5)).astype(np.float32)

    aff2 = affine.copy()
    aff2[:3, :3] *= 2
    aff2[:3, 3] += 0.5  # centre of a 2x2x2 block
    tpl = Template(2, aff2, down(tpl1.t1), down(tpl1.gm), down(tpl1.wm), down(brain))
    bmask = tpl.brain > 0.5
    tpl.extra["headdist"] = (ndimage.distance_transform_edt(~bmask) * 2.0
                             - ndimage.distance_transform_edt(bmask) * 2.0).astype(np.float32)
    tpl.extra["depth"] = np.clip(-tpl.extra["headdist"], 0, None)
    # farther than this outside the brain surface every brain map (1 or 2 mm) is empty
    tpl.extra["brain_reach_mm"] = float(tpl.extra["headdist"][tpl.brain > 0].max()) + 2.0 * 2.0
    # Structure tensor of the smoothed WM map: fibres run along the direction of least
    # change (smallest eigenvalue), i.e. parallel to the WM boundary; cortex is radial
    # (largest eigenvalue).  Smoothing makes the orientation field spatially coherent.
    wm_s = ndimage.gaussian_filter(tpl.wm, 1.0)
    grads = np.gradient(wm_s)
    comps = []
    for a, b in ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)):
        comps.append(ndimage.gaussian_filter(grads[a] * grads[b], 2.5).astype(np.float32))
    tpl.extra["stensor"] = comps
    return tpl


def orientations(tpl2: Template, vox2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit fibre (WM) and radial (GM) directions at (3, N) 2 mm-template voxel coords."""
    n = vox2.shape[1]
    j = np.empty((n, 3, 3), dtype=np.float64)
    c = [sample(comp, vox2) for comp in tpl2.extra["stensor"]]
    j[:, 0, 0], j[:, 0, 1], j[:, 0, 2], j[:, 1, 1], j[:, 1, 2], j[:, 2, 2] = c
    j[:, 1, 0], j[:, 2, 0], j[:, 2, 1] = c[1], c[2], c[4]
    j += np.eye(3) * 1e-9
    _, vecs = np.linalg.eigh(j)
    return vecs[:, :, 0].astype(np.float32), vecs[:, :, 2].astype(np.float32)


@dataclass
class SubjectAnatomy:
    """Random smooth deformation head space (mm) -> template space (mm)."""

    scale: np.ndarray
    wave: np.ndarray      # (K, 3) wave vectors (rad/mm)
    amp: np.ndarray       # (K, 3) displacement amplitudes (mm)
    phase: np.ndarray     # (K,)

    @classmethod
    def random(cls, rng: np.random.Generator, n_modes: int = 8) -> "SubjectAnatomy":
        scale = rng.uniform(0.93, 1.07, 3) * rng.uniform(0.96, 1.04)
        dirs = rng.normal(size=(n_modes, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        lam = rng.uniform(70.0, 160.0, n_modes)
        wave = dirs * (2 * np.pi / lam)[:, None]
        amp = rng.normal(scale=1.3, size=(n_modes, 3))
        phase = rng.uniform(0, 2 * np.pi, n_modes)
        return cls(scale, wave, amp, phase)

    def to_template(self, head_mm: np.ndarray) -> np.ndarray:
        """(3, N) head coordinates -> (3, N) template coordinates (mm)."""
        head_mm = np.asarray(head_mm, np.float32)
        out = head_mm / self.scale[:, None].astype(np.float32)
        wave, amp, phase = (np.asarray(a, np.float32) for a in (self.wave, self.amp, self.phase))
        for k in range(len(phase)):
            s = np.sin(wave[k] @ head_mm + phase[k])
            out += amp[k][:, None] * s[None, :]
        return out


def grid_world(shape, affine) -> np.ndarray:
    """(3, N) world coordinates of every voxel of a grid (C order)."""
    ijk = np.indices(shape, dtype=np.float32).reshape(3, -1)
    return (affine[:3, :3].astype(np.float32) @ ijk + affine[:3, 3:4].astype(np.float32))


def apply_affine(mat: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return (mat[:3, :3].astype(np.float32) @ pts + mat[:3, 3:4].astype(np.float32))


def grid_affine(shape, voxel_mm: float, centre_mm, las: bool = False) -> np.ndarray:
    """Axis-aligned affine whose grid centre is at ``centre_mm``: RAS, or LAS with ``las``.

    LAS (first voxel axis right->left, negative determinant) is how dcm2niix stores scanner
    images; FSL b-vectors of such an image are plain voxel-frame vectors.
    """
    aff = np.diag([-voxel_mm if las else voxel_mm, voxel_mm, voxel_mm, 1.0])
    aff[:3, 3] = np.asarray(centre_mm, float) - aff[:3, :3] @ ((np.asarray(shape[:3]) - 1) / 2.0)
    return aff


def axis_directions(affine: np.ndarray) -> np.ndarray:
    """3x3 orthonormal matrix whose columns are the world directions of the voxel axes."""
    lin = np.asarray(affine, float)[:3, :3]
    return lin / np.linalg.norm(lin, axis=0)


# Skull/scalp layers as (outer distance from the brain surface in mm, T1w, FLAIR, dwi S0).
SHELL_LAYERS = (
    (1.5, 0.15, 0.05, 0.0),   # extra-axial CSF
    (3.0, 0.03, 0.02, 0.0),   # inner table
    (5.0, 0.35, 0.30, 0.0),   # diploe (marrow)
    (6.5, 0.03, 0.02, 0.0),   # outer table
    (8.5, 0.40, 0.35, 0.05),  # muscle / galea
    (12.5, 0.95, 0.55, 0.08),  # subcutaneous fat
)


def shell_intensity(dist_mm: np.ndarray, column: int, thickness: np.ndarray | float = 1.0) -> np.ndarray:
    """Piecewise-constant skull/scalp intensity as a function of distance outside the brain."""
    out = np.zeros_like(dist_mm, dtype=np.float32)
    lo = 0.0
    d = dist_mm / thickness
    for layer in SHELL_LAYERS:
        hi = layer[0]
        sel = (d > lo) & (d <= hi)
        out[sel] = layer[column]
        lo = hi
    return out
