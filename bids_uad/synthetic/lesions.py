"""Glioma model on the 2 mm template grid: core, solid rim, oedema, infiltration, mass effect.

The tumour mass ``B`` (core + solid) is a binary mask on the 2 mm template grid; everything
else derives from its signed distance ``s`` (mm, <0 inside):

* core        ``s < -core_depth``            (necrosis: high MD, low FA, FLAIR intermediate)
* solid       ``-core_depth <= s < 0``

``core_depth`` is chosen per lesion so that the core is the deepest ``core_fraction`` (15-35 %)
of the mass, and at least ``min_core_mm3`` (a few voxels of the dwi grid) but never more than
60 % of it: every glioma, however small, has a core, a solid part, oedema and infiltration.
* oedema      ``0 <= s < w_oed``  (w_oed larger in WM: oedema spreads along WM)
* infiltration ``w_oed <= s < w_inf``        (diffusion change only, invisible on FLAIR)

Oedema and infiltration are excluded from CSF.  Mass effect pushes tissue radially away
from the centre (tissue is sampled at :meth:`Lesion.mass_effect_inverse`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .anatomy import Template, sample

#: glioma shapes (mixed: either, drawn per lesion; "glioma" is accepted for "mixed")
GLIOMA_SHAPES = ("ellipsoid", "irregular", "mixed")


@dataclass
class Lesion:
    """One tumour at one time point (fields on the 2 mm template grid)."""

    centre_mm: np.ndarray
    mass: np.ndarray           # bool, tumour mass B (core + solid), 2 mm grid
    sdist: np.ndarray          # float32 signed distance to B (mm)
    core_depth: float
    w_oed: float
    w_inf: float
    mass_amp: float
    mass_radius: float
    shape_kind: str
    location: str
    core_fraction: float = 0.25

    def widths(self, wm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Oedema and infiltration outer distances (mm) given the local WM fraction."""
        w_oed = self.w_oed * (0.35 + 0.65 * wm)
        w_inf = w_oed + self.w_inf * (0.5 + 0.5 * wm)
        return w_oed, w_inf

    def mass_effect_inverse(self, m: np.ndarray) -> np.ndarray:
        """Where the tissue now at template point ``m`` (3, N) came from."""
        d = m - self.centre_mm[:, None].astype(np.float32)
        r2 = (d ** 2).sum(0)
        rr = self.mass_radius ** 2
        factor = 1.0 - self.mass_amp * rr / (r2 + rr)
        return (self.centre_mm[:, None] + d * factor[None, :]).astype(np.float32)

    def info(self) -> dict:
        return {"centre_template_mm": [round(float(v), 2) for v in self.centre_mm],
                "shape": self.shape_kind, "location": self.location,
                "mass_volume_ml": round(float(self.mass.sum()) * 8e-3, 2),
                "core_depth_mm": round(self.core_depth, 2),
                "core_volume_ml": round(float((self.sdist < -self.core_depth).sum()) * 8e-3, 2),
                "oedema_width_mm": round(self.w_oed, 2),
                "infiltration_width_mm": round(self.w_inf, 2),
                "mass_effect_max_mm": round(self.mass_amp * self.mass_radius / 2, 2)}


def signed_distance(mask: np.ndarray, voxel_mm: float = 2.0, margin_mm: float = 60.0) -> np.ndarray:
    """Signed Euclidean distance (mm) to a binary mask, negative inside.

    Computed in the mask's bounding box grown by ``margin_mm``; farther voxels get
    ``margin_mm`` (every lesion width is well below it), which keeps this cheap.
    """
    out = np.full(mask.shape, margin_mm, np.float32)
    if not mask.any():
        return out
    pad = int(np.ceil(margin_mm / voxel_mm))
    idx = np.argwhere(mask)
    box = tuple(slice(max(lo - pad, 0), min(hi + pad + 1, n))
                for lo, hi, n in zip(idx.min(0), idx.max(0), mask.shape))
    sub = mask[box]
    dist = (ndimage.distance_transform_edt(~sub) - ndimage.distance_transform_edt(sub)) * voxel_mm
    out[box] = np.minimum(dist, margin_mm)
    return out


def core_depth_for(sdist: np.ndarray, mass: np.ndarray, fraction: float, min_core_mm3: float = 0.0,
                   voxel_mm3: float = 8.0) -> float:
    """Depth (mm below the mass surface) whose deeper part is the core.

    The core holds ``fraction`` of the mass voxels, raised to ``min_core_mm3`` and capped at 60 %
    of the mass (so a solid rim always remains).  Masses of one voxel get a core of that voxel.
    """
    depth = np.sort(-sdist[mass])[::-1]  # deepest first, mm (> 0 inside)
    if depth.size == 0:
        return 1e3
    n_core = max(fraction * depth.size, min_core_mm3 / voxel_mm3)
    n_core = int(np.clip(round(n_core), 1, max(1, int(0.6 * depth.size))))
    # the core is s < -core_depth: put the threshold halfway to the next shallower voxel
    below = depth[n_core] if n_core < depth.size else 0.0
    return float(0.5 * (depth[n_core - 1] + below))


def _pick_centre(tpl: Template, rng, radius: float, location: str) -> np.ndarray:
    depth = tpl.extra["depth"]
    if location == "gm":
        cand = (tpl.gm > 0.5) & (depth > min(radius * 0.5 + 4, 18))
    else:
        cand = (tpl.wm > 0.8) & (depth > radius * 0.7 + 6)
    # stay away from the brainstem/cerebellum (keep to the cerebrum, z > -25 mm)
    zvox = (-25 - tpl.affine[2, 3]) / tpl.affine[2, 2]
    cand[:, :, : int(zvox)] = False
    idx = np.argwhere(cand)
    if len(idx) == 0:
        idx = np.argwhere((tpl.wm > 0.8) & (depth > 8))
    v = idx[rng.integers(len(idx))].astype(float)
    return tpl.affine[:3, :3] @ v + tpl.affine[:3, 3]


def _ellipsoid(tpl: Template, rng, centre, radius) -> np.ndarray:
    axes = radius * rng.uniform(0.7, 1.3, 3)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    pts = np.indices(tpl.wm.shape, dtype=np.float32).reshape(3, -1)
    mm = tpl.affine[:3, :3] @ pts + tpl.affine[:3, 3:4]
    d = q.T @ (mm - centre[:, None])
    r = ((d / axes[:, None]) ** 2).sum(0)
    return (r <= 1.0).reshape(tpl.wm.shape)


def _irregular(tpl: Template, rng, centre, radius) -> np.ndarray:
    """Lobulated blob grown from random seeds by a WM-seeking random walk."""
    shape = tpl.wm.shape
    inv = np.linalg.inv(tpl.affine)
    nodes = [np.asarray(centre, float)]
    pos = nodes[0]
    for _ in range(int(rng.integers(3, 8))):
        best, best_wm = None, -1.0
        for _ in range(6):
            step = rng.normal(size=3)
            step *= radius * rng.uniform(0.35, 0.7) / np.linalg.norm(step)
            cand = pos + step
            vox = inv[:3, :3] @ cand + inv[:3, 3]
            w = float(sample(tpl.wm, vox[:, None].astype(np.float32))[0])
            if w > best_wm:
                best, best_wm = cand, w
        pos = best
        nodes.append(pos)
    field = np.zeros(shape, np.float32)
    pts = np.indices(shape, dtype=np.float32).reshape(3, -1)
    mm = tpl.affine[:3, :3] @ pts + tpl.affine[:3, 3:4]
    for node in nodes:
        rad = radius * rng.uniform(0.35, 0.75)
        d2 = ((mm - node[:, None]) ** 2).sum(0).reshape(shape)
        field = np.maximum(field, np.exp(-d2 / (2 * rad ** 2)))
    noise = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), 2.0)
    noise /= noise.std() + 1e-6
    field = field * (1 + 0.25 * noise) * (0.6 + 0.4 * tpl.wm)
    target = int(4 / 3 * np.pi * radius ** 3 / 8.0)
    thr = np.partition(field.ravel(), -target)[-target]
    mask = field >= thr
    lab, n = ndimage.label(mask)
    if n > 1:  # keep the component holding most voxels
        sizes = ndimage.sum(mask, lab, range(1, n + 1))
        mask = lab == (1 + int(np.argmax(sizes)))
    return mask


def make_lesion(tpl: Template, rng: np.random.Generator, generator: str = "mixed",
                min_core_mm3: float = 0.0, radius_mm: float | None = None,
                min_radius_mm: float = 6.0) -> Lesion:
    """Random glioma: size from small (``min_radius_mm``, 6 mm) to large (24 mm radius), in WM or GM.

    ``min_core_mm3``: smallest necrotic core (e.g. four voxels of the dwi grid); ``radius_mm``
    fixes the size instead of drawing it.
    """
    if generator not in GLIOMA_SHAPES + ("glioma",):
        raise ValueError(f"glioma shape must be one of {GLIOMA_SHAPES}")
    kind = generator if generator not in ("mixed", "glioma") else ("ellipsoid" if rng.random() < 0.5 else "irregular")
    radius = float(rng.uniform(min(min_radius_mm, 24.0), 24.0))
    if radius_mm is not None:
        radius = float(radius_mm)
    location = "gm" if rng.random() < 0.3 else "wm"
    centre = _pick_centre(tpl, rng, radius, location)
    mass = (_ellipsoid if kind == "ellipsoid" else _irregular)(tpl, rng, centre, radius)
    mass &= tpl.brain > 0.5
    sdist = signed_distance(mass)
    fraction = float(rng.uniform(0.15, 0.35))
    return Lesion(
        centre_mm=np.asarray(centre, np.float32), mass=mass, sdist=sdist,
        core_depth=core_depth_for(sdist, mass, fraction, min_core_mm3),
        w_oed=float(rng.uniform(5, 8) + 0.5 * radius),
        w_inf=float(rng.uniform(6, 12)), mass_amp=float(rng.uniform(0.3, 0.6)),
        mass_radius=radius, shape_kind=kind, location=location, core_fraction=fraction)


def grow_lesion(tpl: Template, lesion: Lesion, rng: np.random.Generator, min_core_mm3: float = 0.0) -> Lesion:
    """Follow-up: the mass grows in a lobe into the baseline oedema and infiltration zone."""
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    pts = np.indices(tpl.wm.shape, dtype=np.float32).reshape(3, -1)
    mm = tpl.affine[:3, :3] @ pts + tpl.affine[:3, 3:4]
    d = mm - lesion.centre_mm[:, None]
    cosang = (direction @ d) / (np.linalg.norm(d, axis=0) + 1e-6)
    lobe = np.clip(cosang, 0, None).reshape(tpl.wm.shape) ** 0.7
    w_oed, w_inf = lesion.widths(tpl.wm)
    reach = (w_oed + 0.6 * (w_inf - w_oed)) * lobe + 2.0  # +2 mm everywhere
    mass = lesion.mass | ((lesion.sdist <= reach) & (tpl.brain > 0.5) & (tpl.wm + tpl.gm > 0.4))
    radius_new = lesion.mass_radius * float((mass.sum() / max(lesion.mass.sum(), 1)) ** (1 / 3))
    sdist = signed_distance(mass)
    return Lesion(
        centre_mm=lesion.centre_mm, mass=mass, sdist=sdist,
        core_depth=core_depth_for(sdist, mass, lesion.core_fraction, min_core_mm3),
        w_oed=lesion.w_oed * 1.1, w_inf=lesion.w_inf, mass_amp=min(lesion.mass_amp * 1.2, 0.7),
        mass_radius=radius_new, shape_kind=lesion.shape_kind, location=lesion.location,
        core_fraction=lesion.core_fraction)


def lesion_fields(tpl: Template, lesion: Lesion, m: np.ndarray, wm: np.ndarray,
                  csf: np.ndarray, brain: np.ndarray, tau: float = 0.8) -> dict:
    """Soft memberships and hard labels of the lesion classes at template points ``m``.

    ``wm``/``csf``/``brain`` are the (mass-effect displaced) tissue fractions at those points.
    """
    s = sample(lesion.sdist, tpl.to_voxel(m), order=1, cval=1e3)
    w_oed, w_inf = lesion.widths(wm)

    def sig(x):
        return 1.0 / (1.0 + np.exp(-np.clip(x / tau, -30, 30)))

    inbrain = np.clip(brain, 0, 1)
    notcsf = np.clip(1.0 - csf / 0.6, 0, 1) ** 0.5
    mu_mass = sig(-s) * inbrain
    mu_core = sig(-s - lesion.core_depth) * inbrain
    mu_solid = np.clip(mu_mass - mu_core, 0, 1)
    mu_oed = np.clip(sig(w_oed - s) * inbrain - mu_mass, 0, 1) * notcsf
    mu_inf = np.clip(sig(w_inf - s) - sig(w_oed - s), 0, 1) * inbrain * notcsf
    hard_brain = brain >= 0.5
    hard_tissue = hard_brain & (csf < 0.6)
    core = hard_brain & (s < -lesion.core_depth)
    solid = hard_brain & (s < 0) & ~core
    oedema = hard_tissue & (s >= 0) & (s < w_oed)
    infil = hard_tissue & (s >= w_oed) & (s < w_inf)
    return {"mu_core": mu_core, "mu_solid": mu_solid, "mu_oed": mu_oed, "mu_inf": mu_inf,
            "core": core, "solid": solid, "oedema": oedema, "infiltration": infil,
            "tumor": core | solid | oedema}
