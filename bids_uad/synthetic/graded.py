"""Graded lesion types: infiltration, oedema-like, restricted diffusion and mass effect.

Each type changes the tissue in one physiological way, scaled by a ``severity`` in [0, 1]
(0: the mild end of the type's range, 1: the strong end):

* ``infiltration``  tumour cells along white matter: the tissue tensors lose anisotropy at
  constant trace (eigenvalues move towards their mean by 0.25-0.60) with a small net change
  of mean diffusivity (uniform in +-3 %); FLAIR faintly brighter.
* ``oedema``        vasogenic oedema: extracellular water adds an isotropic diffusivity of
  10-30 % of the tissue's MD to every eigenvalue (so MD +10-30 %, FA mildly lower) and raises
  T2 (b0 +10-30 %, FLAIR bright).
* ``restricted``    cellular tumour: diffusivities scaled by 0.8-0.6 (MD -20-40 %) with a mild
  anisotropy loss (0.15-0.30), T2 unchanged, so the diffusion-weighted signal is brighter.
* ``mass-effect``   an expansile lesion that displaces tissue without destroying it: tissue
  (and its scalars) is sampled at ``c + d (1 - A exp(-|d|^2 / 2 sigma^2))`` (``A`` = 0.4-0.7),
  the fibre directions are carried by the deformation's Jacobian (tracts bend around the
  centre) and radially compressed WM tracts lose a little perpendicular diffusivity
  (scaled by the square root of the radial compression).  Its
  region is the ball of radius ``2 sigma`` (outside it the displacement is small).

Regions live on the 2 mm template grid, in the coordinates of the lesioned brain.  Volumes are
drawn log-uniformly in 1.5-60 mL (a third below 5 mL); a region is the ``N`` voxels of highest
*priority* (a type-specific field: a tube along a traced WM tract, a WM-seeking lobulated blob,
a compact ellipsoid), so the follow-up growth takes more voxels of the same field.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .anatomy import Template, orientations, sample
from .lesions import _pick_centre, signed_distance

GRADED_TYPES = ("infiltration", "oedema", "restricted", "mass-effect")
#: lesion volumes (mL) are drawn log-uniformly in this range
VOLUME_RANGE_ML = (1.5, 60.0)
_VOXEL_ML = 8e-3  # one voxel of the 2 mm template grid
_BOX_MM = 70.0    # half-width of the box around a lesion centre in which its region is drawn


@dataclass
class GradedLesion:
    """One graded lesion at one time point (fields on the 2 mm template grid)."""

    kind: str
    severity: float
    centre_mm: np.ndarray
    target_ml: float
    location: str
    region: np.ndarray               # bool, the lesion's voxels
    sdist: np.ndarray                # float32 signed distance to the region (mm, <0 inside)
    md_change: float = 0.0           # relative MD change of the tissue tensors
    iso_mix: float = 0.0             # anisotropy loss: eigenvalues move this far to their mean
    s0_scale: float = 1.0            # tissue b0 (T2) factor
    flair_gain: float = 0.0          # relative FLAIR brightening
    t1_gain: float = 0.0             # relative T1w darkening
    mass_amp: float = 0.0            # mass effect amplitude A (0: none)
    mass_sigma: float = 0.0          # mass effect width (mm)
    box: tuple | None = None         # slices of the priority box on the template grid
    priority: np.ndarray | None = None
    allowed: np.ndarray | None = None

    # -- geometry -------------------------------------------------------------------------
    def mass_effect_inverse(self, m: np.ndarray) -> np.ndarray:
        """Where the tissue now at template point ``m`` (3, N) came from (``m`` itself if none)."""
        if self.mass_amp <= 0:
            return m
        d = m - self.centre_mm[:, None].astype(np.float32)
        g = np.exp(-(d ** 2).sum(0) / np.float32(2 * self.mass_sigma ** 2))
        return (self.centre_mm[:, None] + d * (1 - np.float32(self.mass_amp) * g)[None, :]).astype(np.float32)

    def push_directions(self, m: np.ndarray, e: np.ndarray) -> np.ndarray:
        """Unit directions (N, 3) carried from the source of ``m`` (3, N) to ``m``.

        The inverse map's Jacobian is ``f I + (A g / sigma^2) d d^T``; its inverse (Sherman-Morrison)
        moves a tract direction with the tissue: tangential stretch, radial compression.
        """
        if self.mass_amp <= 0:
            return e
        d = (m - self.centre_mm[:, None].astype(np.float32)).T
        r2 = (d ** 2).sum(1)
        g = np.exp(-r2 / np.float32(2 * self.mass_sigma ** 2))
        f = 1 - np.float32(self.mass_amp) * g
        beta = np.float32(self.mass_amp / self.mass_sigma ** 2) * g
        de = (d * e).sum(1)
        out = e - (beta * de / (f + beta * r2))[:, None] * d
        return (out / (np.linalg.norm(out, axis=1, keepdims=True) + 1e-12)).astype(np.float32)

    def radial_compression(self, m: np.ndarray) -> np.ndarray:
        """Forward radial length factor (<1 where the tissue is compressed) at ``m`` (3, N)."""
        d = m - self.centre_mm[:, None].astype(np.float32)
        r2 = (d ** 2).sum(0)
        g = np.exp(-r2 / np.float32(2 * self.mass_sigma ** 2))
        radial = 1 - np.float32(self.mass_amp) * g * (1 - r2 / np.float32(self.mass_sigma ** 2))
        return (1.0 / radial).astype(np.float32)

    def info(self) -> dict:
        out = {"type": self.kind, "severity": round(self.severity, 3),
               "centre_template_mm": [round(float(v), 2) for v in self.centre_mm],
               "location": self.location, "volume_ml": round(float(self.region.sum()) * _VOXEL_ML, 2),
               "md_change": round(self.md_change, 4), "anisotropy_loss": round(self.iso_mix, 4),
               "b0_scale": round(self.s0_scale, 4)}
        if self.mass_amp > 0:
            out.update({"mass_effect_amplitude": round(self.mass_amp, 3),
                        "mass_effect_sigma_mm": round(self.mass_sigma, 2),
                        "mass_effect_max_mm": round(self.mass_amp * self.mass_sigma * np.exp(-0.5), 2)})
        return out


def draw_volume_ml(rng: np.random.Generator) -> float:
    """A lesion volume, log-uniform in :data:`VOLUME_RANGE_ML` (most 2-60 mL, a third < 5 mL)."""
    lo, hi = VOLUME_RANGE_ML
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def effect_parameters(kind: str, severity: float, rng: np.random.Generator) -> dict:
    """The tissue changes of a lesion type at ``severity`` (see the module docstring)."""
    s = float(severity)
    if kind == "infiltration":
        return {"iso_mix": 0.25 + 0.35 * s, "md_change": float(rng.uniform(-0.03, 0.03)),
                "s0_scale": 1.0 + 0.05 * s, "flair_gain": 0.10 + 0.20 * s, "t1_gain": 0.03 * s}
    if kind == "oedema":
        r = 0.10 + 0.20 * s
        # eigenvalues + r * MD: mixing r / (1 + r) towards the mean, then scaling by 1 + r
        return {"iso_mix": r / (1 + r), "md_change": r, "s0_scale": 1.0 + r,
                "flair_gain": 2.5 * r, "t1_gain": 0.5 * r}
    if kind == "restricted":
        return {"iso_mix": 0.15 + 0.15 * s, "md_change": -(0.20 + 0.20 * s), "s0_scale": 1.0,
                "flair_gain": 0.30, "t1_gain": 0.10}
    if kind == "mass-effect":
        return {"mass_amp": 0.4 + 0.3 * s}
    raise ValueError(f"graded lesion type must be one of {GRADED_TYPES}")


# -- regions -------------------------------------------------------------------------------
def _box(tpl: Template, centre_mm: np.ndarray, half_mm: float = _BOX_MM):
    c = tpl.to_voxel(np.asarray(centre_mm, np.float32)[:, None])[:, 0]
    half = half_mm / tpl.res
    return tuple(slice(max(int(np.floor(ci - half)), 0), min(int(np.ceil(ci + half)) + 1, n))
                 for ci, n in zip(c, tpl.wm.shape))


def _box_mm(tpl: Template, box) -> np.ndarray:
    """(3, *box shape) template mm of the voxels of a box."""
    idx = np.indices(tuple(s.stop - s.start for s in box), dtype=np.float32)
    idx += np.array([s.start for s in box], np.float32)[:, None, None, None]
    aff = tpl.affine.astype(np.float32)
    return np.einsum("ij,j...->i...", aff[:3, :3], idx) + aff[:3, 3][:, None, None, None]


def _smooth_noise(rng, shape, sigma_vox: float = 2.0) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), sigma_vox)
    return noise / (noise.std() + 1e-6)


def _tissue(tpl: Template, box, wm_only: bool = False) -> np.ndarray:
    brain = tpl.brain[box] > 0.5
    if wm_only:
        return brain & (tpl.wm[box] > 0.5)
    return brain & (tpl.wm[box] + tpl.gm[box] > 0.5)


def _trace_tract(tpl: Template, centre_mm: np.ndarray, half_length_mm: float,
                 step_mm: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Streamline through ``centre_mm`` along the WM fibre field, both ways until WM ends.

    Returns (K, 3) template mm and the distance (mm) of each point from the centre along the tract.
    """
    def direction(p):
        return orientations(tpl, tpl.to_voxel(p[:, None].astype(np.float32)))[0][0].astype(float)

    start = np.asarray(centre_mm, float)
    d0 = direction(start)
    points, arc = [start], [0.0]
    for sign in (1.0, -1.0):
        p, d = start.copy(), sign * d0
        for k in range(1, int(half_length_mm / step_mm) + 1):
            p = p + step_mm * d
            if float(sample(tpl.wm, tpl.to_voxel(p[:, None].astype(np.float32)))[0]) < 0.4:
                break
            points.append(p)
            arc.append(k * step_mm)
            new = direction(p)
            d = new if new @ d >= 0 else -new
    return np.asarray(points), np.asarray(arc)


def _priority(tpl: Template, rng, kind: str, centre: np.ndarray, radius: float, box) -> np.ndarray:
    """Type-specific priority field in ``box``: the region is its ``N`` highest allowed voxels."""
    mm = _box_mm(tpl, box)
    shape = mm.shape[1:]
    if kind == "infiltration":
        # an elongated tube along a traced tract: distance across it and along it (arc length)
        ratio = float(rng.uniform(2.0, 3.5))
        tract, arc = _trace_tract(tpl, centre, half_length_mm=3 * radius * ratio)
        offset = np.array([b.start for b in box])
        vox = np.rint(tpl.to_voxel(tract.T.astype(np.float32))).astype(int).T - offset
        keep = np.all((vox >= 0) & (vox < shape), axis=1)
        seeds = np.ones(shape, bool)
        along = np.zeros(shape, np.float32)
        for (i, j, k), a in zip(vox[keep], arc[keep]):
            seeds[i, j, k] = False
            along[i, j, k] = a
        dist, nearest = ndimage.distance_transform_edt(seeds, sampling=tpl.res, return_indices=True)
        t = along[tuple(nearest)]
        field = -np.sqrt(dist ** 2 + (t / ratio) ** 2)
        return (field + 0.15 * radius * _smooth_noise(rng, shape)).astype(np.float32)
    if kind == "oedema":
        # lobulated, spreading into WM (finger-like), around a few WM-seeking nodes
        field = np.zeros(shape, np.float32)
        node = np.asarray(centre, float)
        for _ in range(int(rng.integers(2, 5))):
            rad = radius * rng.uniform(0.45, 0.8)
            d2 = ((mm - node[:, None, None, None].astype(np.float32)) ** 2).sum(0)
            field = np.maximum(field, np.exp(-d2 / (2 * rad ** 2)))
            best, best_wm = node, -1.0
            for _ in range(6):
                step = rng.normal(size=3)
                cand = node + step * radius * rng.uniform(0.3, 0.6) / np.linalg.norm(step)
                w = float(sample(tpl.wm, tpl.to_voxel(cand[:, None].astype(np.float32)))[0])
                if w > best_wm:
                    best, best_wm = cand, w
            node = best
        return (field * (1 + 0.2 * _smooth_noise(rng, shape)) * (0.3 + 0.7 * tpl.wm[box])).astype(np.float32)
    if kind == "restricted":
        axes = rng.uniform(0.8, 1.25, 3)
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        d = np.einsum("ij,j...->i...", q.T.astype(np.float32), mm - centre[:, None, None, None].astype(np.float32))
        r = np.sqrt(((d / axes[:, None, None, None]) ** 2).sum(0))
        return (-r + 0.1 * radius * _smooth_noise(rng, shape)).astype(np.float32)
    raise ValueError(kind)


def _top_region(priority: np.ndarray, allowed: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` allowed voxels of highest priority, kept to their largest connected part."""
    values = priority[allowed]
    if values.size == 0:
        return np.zeros(priority.shape, bool)
    n = int(np.clip(n, 1, values.size))
    thr = np.partition(values, values.size - n)[values.size - n]
    mask = allowed & (priority >= thr)
    lab, count = ndimage.label(mask)
    if count > 1:
        sizes = ndimage.sum(mask, lab, range(1, count + 1))
        mask = lab == (1 + int(np.argmax(sizes)))
    return mask


def _full(tpl: Template, box, sub: np.ndarray) -> np.ndarray:
    out = np.zeros(tpl.wm.shape, bool)
    out[box] = sub
    return out


def _ball_region(tpl: Template, centre: np.ndarray, radius: float) -> np.ndarray:
    box = _box(tpl, centre, radius + 4)
    d2 = ((_box_mm(tpl, box) - centre[:, None, None, None].astype(np.float32)) ** 2).sum(0)
    return _full(tpl, box, (d2 <= radius ** 2) & _tissue(tpl, box))


def _region(tpl: Template, lesion: GradedLesion, volume_ml: float) -> np.ndarray:
    if lesion.kind == "mass-effect":
        return _ball_region(tpl, lesion.centre_mm, 2 * lesion.mass_sigma)
    sub = _top_region(lesion.priority, lesion.allowed, int(round(volume_ml / _VOXEL_ML)))
    return _full(tpl, lesion.box, sub)


_LOCATIONS = {"infiltration": (1.0, "wm"), "oedema": (0.85, "wm"), "restricted": (0.7, "wm"),
              "mass-effect": (0.6, "wm")}


def make_graded_lesion(tpl: Template, rng: np.random.Generator, kind: str, severity: float | None = None,
                       volume_ml: float | None = None, avoid: np.ndarray | None = None,
                       tries: int = 20) -> GradedLesion:
    """A random lesion of a graded type (severity and volume drawn unless given).

    ``avoid``: voxels (2 mm grid) the region must not touch (other lesions of the session);
    centres are redrawn up to ``tries`` times.
    """
    if kind not in GRADED_TYPES:
        raise ValueError(f"graded lesion type must be one of {GRADED_TYPES}")
    sev = float(rng.uniform(0.0, 1.0)) if severity is None else float(severity)
    vol = draw_volume_ml(rng) if volume_ml is None else float(volume_ml)
    params = effect_parameters(kind, sev, rng)
    radius = (3 * vol * 1e3 / (4 * np.pi)) ** (1 / 3)
    p_wm, _ = _LOCATIONS[kind]
    location = "wm" if rng.random() < p_wm else "gm"
    for attempt in range(tries):
        centre = np.asarray(_pick_centre(tpl, rng, radius, location), np.float32)
        lesion = GradedLesion(kind=kind, severity=sev, centre_mm=centre, target_ml=vol, location=location,
                              region=np.zeros(0, bool), sdist=np.zeros(0, np.float32), **params)
        if kind == "mass-effect":
            lesion.mass_sigma = radius / 2  # region: the ball of radius 2 sigma
        else:
            lesion.box = _box(tpl, centre)
            lesion.priority = _priority(tpl, rng, kind, centre, radius, lesion.box)
            lesion.allowed = _tissue(tpl, lesion.box, wm_only=kind == "infiltration")
        lesion.region = _region(tpl, lesion, vol)
        if avoid is None or not np.any(lesion.region & avoid) or attempt == tries - 1:
            break
    lesion.sdist = signed_distance(lesion.region)
    return lesion


def grow_graded_lesion(tpl: Template, lesion: GradedLesion, rng: np.random.Generator) -> GradedLesion:
    """Follow-up: 1.2-1.8 times the volume (more voxels of the same priority field) and a
    slightly higher severity (+0-0.1); a mass effect widens and pushes harder."""
    factor = float(rng.uniform(1.2, 1.8))
    sev = min(1.0, lesion.severity + float(rng.uniform(0.0, 0.1)))
    params = effect_parameters(lesion.kind, sev, rng)
    if lesion.kind == "infiltration":  # its small net MD change is a property of the lesion
        params["md_change"] = lesion.md_change
    grown = GradedLesion(kind=lesion.kind, severity=sev, centre_mm=lesion.centre_mm,
                         target_ml=lesion.target_ml * factor, location=lesion.location,
                         region=lesion.region, sdist=lesion.sdist, box=lesion.box, priority=lesion.priority,
                         allowed=lesion.allowed, **params)
    if lesion.kind == "mass-effect":
        grown.mass_sigma = lesion.mass_sigma * factor ** (1 / 3)
    grown.region = _region(tpl, grown, grown.target_ml) | lesion.region
    grown.sdist = signed_distance(grown.region)
    return grown


def graded_fields(tpl: Template, lesion: GradedLesion, m: np.ndarray, wm: np.ndarray, csf: np.ndarray,
                  brain: np.ndarray, tau: float = 1.0) -> dict:
    """Soft membership ``mu`` and the hard region of a graded lesion at template points ``m``.

    The hard region is the tissue (brain, CSF fraction < 0.6) whose centre lies inside the
    lesion (an infiltration's region was drawn in WM).
    """
    s = sample(lesion.sdist, tpl.to_voxel(m), order=1, cval=1e3)
    mu = (1.0 / (1.0 + np.exp(-np.clip(-s / tau, -30, 30)))) * np.clip(brain, 0, 1)
    hard = (brain >= 0.5) & (csf < 0.6) & (s < 0)
    out = {"mu": mu.astype(np.float32), "region": hard}
    if lesion.mass_amp > 0:
        # radially compressed tissue has less extracellular space across its tracts
        out["rad_scale"] = np.sqrt(np.clip(lesion.radial_compression(m), None, 1.0)).astype(np.float32)
    return out
