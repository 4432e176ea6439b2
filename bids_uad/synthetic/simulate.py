"""Image synthesis for one subject/session: T1w, FLAIR, distorted noisy dwi and their truth."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.ndimage import affine_transform, map_coordinates

from .anatomy import (SubjectAnatomy, Template, apply_affine, axis_directions, grid_affine, grid_world,
                      orientations, sample, shell_intensity)
from .distortion import interp_along, rigid_matrix, rotation_matrix, source_positions, voxel_motion_map
from .graded import GradedLesion, graded_fields
from .lesions import Lesion, lesion_fields

T1W_CENTRE = (0.0, -17.0, 5.0)
DWI_CENTRE = (0.0, -17.0, 14.0)

# compartment b0 weights (T2/PD at the dwi TE) and diffusivities (mm^2/s)
S0 = {"wm": 1.0, "gm": 1.25, "csf": 2.2, "fw": 2.2, "nec": 2.0, "sol": 1.5}
D_ISO = {"csf": 3.0e-3, "fw": 3.0e-3, "nec": 2.6e-3, "sol": 1.1e-3, "scalp": 1.0e-3}
WM_TENSOR = (1.5e-3, 0.35e-3)   # (parallel, perpendicular): FA ~0.73, MD ~0.73e-3
GM_TENSOR = (0.95e-3, 0.725e-3)  # FA ~0.16, MD ~0.8e-3
DWI_SCALE = 1000.0              # b0 signal of pure WM


def gradient_directions(n: int, seed: int = 1234) -> np.ndarray:
    """``n`` well-spread unit vectors (antipodally symmetric electrostatic repulsion)."""
    return _gradient_directions(n, seed).copy()


@lru_cache(maxsize=8)
def _gradient_directions(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    step = 0.05
    for _ in range(400):
        force = np.zeros_like(v)
        for sgn in (1.0, -1.0):
            diff = v[:, None, :] - sgn * v[None, :, :]
            dist = np.linalg.norm(diff, axis=2) + np.eye(n) * 1e9 * (sgn > 0)
            force += (diff / dist[..., None] ** 3).sum(1)
        force -= (force * v).sum(1, keepdims=True) * v
        v = v + step * force / (np.abs(force).max() + 1e-12)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
    v[v[:, 2] < 0] *= -1  # one hemisphere
    return v


def gradient_table(shells) -> tuple[np.ndarray, np.ndarray]:
    """bvals (N,) and unit bvecs (N, 3) for ((b, count), ...); b0s first."""
    bvals, bvecs = [], []
    for b, count in sorted(shells, key=lambda s: s[0]):
        if b == 0:
            bvals += [0] * count
            bvecs += [np.zeros(3)] * count
        else:
            bvals += [b] * count
            bvecs += list(gradient_directions(count))
    return np.asarray(bvals, float), np.asarray(bvecs, float)


@dataclass
class Susceptibility:
    """Off-resonance field (Hz) as Gaussian sources near the air cavities (template mm)."""

    centres: np.ndarray
    sigmas: np.ndarray
    amps: np.ndarray
    linear: np.ndarray

    @classmethod
    def random(cls, rng: np.random.Generator) -> "Susceptibility":
        base = np.array([[0, 44, -30], [0, 66, 6], [-46, 4, -42], [46, 4, -42], [0, 12, -44]], float)
        centres = base + rng.normal(scale=3.0, size=base.shape)
        sigmas = np.array([22, 18, 17, 17, 20], float) * rng.uniform(0.9, 1.1, 5)
        amps = np.array([125, 60, 85, 85, 50], float) * rng.uniform(0.75, 1.2, 5)
        return cls(centres, sigmas, amps, rng.normal(scale=0.05, size=3))

    def __call__(self, m: np.ndarray) -> np.ndarray:
        out = (self.linear[:, None] * m).sum(0)
        for c, s, a in zip(self.centres, self.sigmas, self.amps):
            d2 = ((m - c[:, None].astype(np.float32)) ** 2).sum(0)
            out = out + a * np.exp(-d2 / (2 * s * s))
        return out.astype(np.float32)


def random_pose(rng, rot_deg=(8.0, 3.0, 3.0), trans_mm=(4.0, 6.0, 5.0)) -> np.ndarray:
    """Head position: a 4x4 rigid head(mm) -> scanner world(mm) transform."""
    p = np.concatenate([rng.uniform(-1, 1, 3) * trans_mm,
                        np.deg2rad(rng.uniform(-1, 1, 3) * rot_deg)])
    return rigid_matrix(p)


def bias_field(rng, pts: np.ndarray, strength: float = 0.18) -> np.ndarray:
    """Smooth multiplicative intensity bias (low-order sinusoids over the head)."""
    out = np.zeros(pts.shape[1], np.float32)
    for _ in range(4):
        k = rng.normal(size=3) * (2 * np.pi / 260.0)
        out += np.sin(k.astype(np.float32) @ pts + rng.uniform(0, 2 * np.pi)).astype(np.float32)
    return np.exp(strength * out / 2.0).astype(np.float32)


def as_lesion_list(lesions) -> list:
    """``None``, one lesion or a sequence of lesions -> a list (at most one glioma)."""
    if lesions is None:
        return []
    out = [lesions] if isinstance(lesions, (Lesion, GradedLesion)) else list(lesions)
    if sum(isinstance(les, Lesion) for les in out) > 1:
        raise ValueError("a session holds at most one glioma")
    return out


def tissue_at(tpl_src: Template, tpl2: Template, subj: SubjectAnatomy, lesion, world: np.ndarray,
              head_to_world: np.ndarray, skull_scale: float, with_orient: bool = False) -> dict:
    """Everything the signal models need at (3, N) world points for one head pose.

    ``lesion``: ``None``, a glioma (:class:`Lesion`), a graded lesion or a list of them.
    Brain maps and lesion fields are only computed near the brain (``brain_reach_mm``), where
    the template is not empty: most of a field of view is skull, scalp and air.  ``lesion_id``
    numbers the lesions' hard regions 1, 2, ... in list order (0: none); ``tumor`` is their union.
    """
    lesions = as_lesion_list(lesion)
    head = apply_affine(np.linalg.inv(head_to_world), world)
    m = subj.to_template(head)
    chain = [m]  # mass effects, one after the other: where the tissue now at m came from
    for les in lesions:
        chain.append(les.mass_effect_inverse(chain[-1]))
    m0 = chain[-1]
    hd = sample(tpl2.extra["headdist"], tpl2.to_voxel(m0), cval=1e3)
    near = np.flatnonzero(hd < tpl2.extra["brain_reach_mm"])
    n = world.shape[1]
    v = tpl_src.to_voxel(m0[:, near])
    gm, wm, brain, t1 = (_scatter(sample(a, v), near, n)
                         for a in (tpl_src.gm, tpl_src.wm, tpl_src.brain, tpl_src.t1))
    csf = np.clip(brain - gm - wm, 0, 1)
    out = {"m": m, "gm": gm, "wm": wm, "csf": csf, "brain": brain, "t1": t1,
           "headdist": hd, "skull_scale": skull_scale}
    zeros, z = np.zeros(n, np.float32), np.zeros(n, bool)
    out.update({"mu_core": zeros, "mu_solid": zeros, "mu_oed": zeros, "mu_inf": zeros,
                "core": z, "solid": z, "oedema": z, "infiltration": z, "tumor": z})
    inside = near[brain[near] > 0]  # every lesion field is zero outside the brain
    lesion_id = np.zeros(inside.size, np.uint8)
    graded = [les for les in lesions if isinstance(les, GradedLesion)]
    effects = _graded_effects(inside.size) if graded else None
    for index, les in enumerate(lesions, start=1):
        args = (m[:, inside], wm[inside], csf[inside], brain[inside])
        if isinstance(les, Lesion):
            fields = lesion_fields(tpl2, les, *args)
            out.update({k: _scatter(val, inside, n) for k, val in fields.items()})
            region = fields["tumor"]
        else:
            fields = graded_fields(tpl2, les, *args)
            _add_effect(effects, les, fields)
            region = fields["region"]
        lesion_id[region & (lesion_id == 0)] = index
    out["lesion_id"] = _scatter(lesion_id, inside, n)
    out["tumor"] = out["lesion_id"] > 0
    if effects is not None:
        out.update({k: _scatter(val, inside, n, fill=0.0 if k in ("iso_mix", "flair_gain", "t1_gain") else 1.0)
                    for k, val in effects.items()})
    if with_orient:
        # directions only matter inside the brain; elsewhere any unit vector will do
        e_wm, e_gm = orientations(tpl2, tpl2.to_voxel(m0[:, near]))
        for k in range(len(lesions) - 1, -1, -1):  # carried through each mass effect, last first
            if isinstance(lesions[k], GradedLesion):
                e_wm = lesions[k].push_directions(chain[k][:, near], e_wm)
                e_gm = lesions[k].push_directions(chain[k][:, near], e_gm)
        rot = head_to_world[:3, :3].astype(np.float32)
        out["e_wm"] = _scatter(e_wm @ rot.T, near, n, fill=(1.0, 0.0, 0.0))
        out["e_gm"] = _scatter(e_gm @ rot.T, near, n, fill=(1.0, 0.0, 0.0))
    return out


def _graded_effects(n: int) -> dict:
    """Neutral per-point modifiers of the tissue compartments (see :func:`tissue_tensors`)."""
    return {"iso_mix": np.zeros(n, np.float32), "md_scale": np.ones(n, np.float32),
            "rad_scale": np.ones(n, np.float32), "s0_scale": np.ones(n, np.float32),
            "flair_gain": np.zeros(n, np.float32), "t1_gain": np.zeros(n, np.float32)}


def _add_effect(effects: dict, les: GradedLesion, fields: dict) -> None:
    """Fold one graded lesion (membership ``mu``) into the modifiers: changes multiply."""
    mu = fields["mu"]
    effects["iso_mix"] = 1 - (1 - effects["iso_mix"]) * (1 - np.float32(les.iso_mix) * mu)
    effects["md_scale"] *= 1 + np.float32(les.md_change) * mu
    effects["s0_scale"] *= 1 + np.float32(les.s0_scale - 1) * mu
    effects["flair_gain"] += np.float32(les.flair_gain) * mu
    effects["t1_gain"] += np.float32(les.t1_gain) * mu
    if "rad_scale" in fields:
        effects["rad_scale"] *= fields["rad_scale"]


def _scatter(values: np.ndarray, index: np.ndarray, n: int, fill=0) -> np.ndarray:
    """Length-``n`` array (rows) holding ``values`` at ``index`` and ``fill`` elsewhere."""
    out = np.empty((n,) + values.shape[1:], values.dtype)
    out[...] = np.asarray(fill, values.dtype)
    out[index] = values
    return out


def dseg_labels(t: dict) -> np.ndarray:
    """1=CSF, 2=GM, 3=WM inside the brain mask, else 0."""
    lab = (np.argmax(np.stack([t["csf"], t["gm"], t["wm"]]), axis=0) + 1).astype(np.uint8)
    lab[t["brain"] < 0.5] = 0
    return lab


def anat_images(t: dict, rng: np.random.Generator, world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """T1w and FLAIR intensities (arbitrary units, WM ~1) with bias field and Rician noise."""
    mu_mass = t["mu_core"] + t["mu_solid"]
    keep = 1.0 - mu_mass
    shell_w = np.clip(1.0 - t["brain"], 0, 1)
    hd = t["headdist"]
    t1 = (t["t1"] * keep + 0.55 * t["mu_solid"] + 0.22 * t["mu_core"]) * (1 - 0.15 * t["mu_oed"])
    t1 = t1 + shell_w * shell_intensity(hd, 1, t["skull_scale"])
    tissue_fl = 0.55 * t["wm"] + 0.75 * t["gm"] + 0.05 * t["csf"]
    fl = tissue_fl * keep + 0.85 * t["mu_solid"] + 0.4 * t["mu_core"]
    fl = fl * (1 - t["mu_oed"]) + 1.0 * t["mu_oed"] * (t["wm"] + t["gm"] + 0.3)
    if "flair_gain" in t:  # graded lesions: T2 changes brighten FLAIR, water darkens T1w
        t1 = t1 * (1 - t["t1_gain"])
        fl = fl * (1 + t["flair_gain"])
    fl = fl + shell_w * shell_intensity(hd, 2, t["skull_scale"])
    images = [rician(rng, img * bias_field(rng, world), sigma) for img, sigma in ((t1, 0.02), (fl, 0.025))]
    return images[0], images[1]


def compartments(t: dict) -> dict:
    """Signal fractions (including S0 weights) and per-voxel tensors for the dwi model."""
    keep = 1.0 - t["mu_core"] - t["mu_solid"]
    fw = 0.30 * t["mu_oed"] + 0.05 * t["mu_inf"]
    tis = keep * (1 - fw)
    perp_factor = 1.0 + 0.30 * t["mu_oed"] + 0.20 * t["mu_inf"]
    par_factor = 1.0 - 0.05 * t["mu_inf"]
    shell_w = np.clip(1.0 - t["brain"], 0, 1)
    scalp = shell_w * shell_intensity(t["headdist"], 3, t["skull_scale"])
    comp = {
        "wm": tis * t["wm"] * S0["wm"], "gm": tis * t["gm"] * S0["gm"],
        "csf": keep * t["csf"] * S0["csf"],
        "fw": keep * fw * (t["wm"] + t["gm"]) * S0["fw"],
        "nec": t["mu_core"] * S0["nec"], "sol": t["mu_solid"] * S0["sol"], "scalp": scalp,
        "wpar": WM_TENSOR[0] * par_factor, "wperp": WM_TENSOR[1] * perp_factor,
        "gpar": GM_TENSOR[0] * par_factor, "gperp": GM_TENSOR[1] * perp_factor,
    }
    if "md_scale" in t:  # graded lesions
        comp["wm"] = comp["wm"] * t["s0_scale"]
        comp["gm"] = comp["gm"] * t["s0_scale"]
        comp["wpar"], comp["wperp"] = tissue_tensors(comp["wpar"], comp["wperp"] * t["rad_scale"], t)
        comp["gpar"], comp["gperp"] = tissue_tensors(comp["gpar"], comp["gperp"], t)
    return comp


def tissue_tensors(par: np.ndarray, perp: np.ndarray, t: dict) -> tuple[np.ndarray, np.ndarray]:
    """Axially symmetric tissue tensor (parallel, perpendicular) changed by graded lesions.

    The eigenvalues move towards their mean by ``iso_mix`` (anisotropy loss at constant trace)
    and are scaled by ``md_scale`` (the relative MD change).  (Compressed WM tracts lose some
    perpendicular diffusivity first: ``rad_scale``, applied by :func:`compartments`.)
    """
    mean = (par + 2 * perp) / 3
    a, s = t["iso_mix"], t["md_scale"]
    return ((par + a * (mean - par)) * s).astype(np.float32), ((perp + a * (mean - perp)) * s).astype(np.float32)


def dwi_volume(comp: dict, t: dict, b: float, g_world: np.ndarray) -> np.ndarray:
    """Noise-free signal (N,) of one volume for b-value ``b`` and unit gradient ``g_world``.

    ``g_world`` is the gradient direction in the world frame of the head's reference position
    (for a moved head: the scanner gradient rotated into the head, ``R^T g``).
    """
    if b == 0:
        s = sum(comp[k] for k in ("wm", "gm", "csf", "fw", "nec", "sol", "scalp"))
        return (s * DWI_SCALE).astype(np.float32)
    g = np.asarray(g_world, np.float32)
    wpar, wperp = comp["wpar"], comp["wperp"]
    gpar, gperp = comp["gpar"], comp["gperp"]
    cw = (t["e_wm"] @ g) ** 2
    cg = (t["e_gm"] @ g) ** 2
    s = (comp["wm"] * np.exp(-b * (wperp + (wpar - wperp) * cw))
         + comp["gm"] * np.exp(-b * (gperp + (gpar - gperp) * cg)))
    for k in ("csf", "fw", "nec", "sol", "scalp"):
        s = s + comp[k] * np.float32(np.exp(-b * D_ISO["csf" if k == "fw" else k]))
    return (s * DWI_SCALE).astype(np.float32)


def dwi_signal(comp: dict, t: dict, bvals, gvecs_world) -> np.ndarray:
    """Noise-free multi-compartment signal (N, nvol), b0 of pure WM = DWI_SCALE."""
    out = np.empty((comp["wm"].shape[0], len(bvals)), np.float32)
    for i, (b, g) in enumerate(zip(bvals, gvecs_world)):
        out[:, i] = dwi_volume(comp, t, float(b), g)
    return out


def tensor_fa_md(signal: np.ndarray, bvals, bvecs, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares log-linear tensor fit; FA and MD (mm^2/s) inside ``mask``."""
    n = signal.shape[0]
    fa = np.zeros(n, np.float32)
    md = np.zeros(n, np.float32)
    idx = np.flatnonzero(mask & (signal[:, 0] > 1e-3))
    if idx.size == 0:
        return fa, md
    g = bvecs
    design = np.column_stack([np.ones(len(bvals)), -bvals * g[:, 0] ** 2, -bvals * g[:, 1] ** 2,
                              -bvals * g[:, 2] ** 2, -2 * bvals * g[:, 0] * g[:, 1],
                              -2 * bvals * g[:, 0] * g[:, 2], -2 * bvals * g[:, 1] * g[:, 2]])
    pinv = np.linalg.pinv(design)
    y = np.log(np.clip(signal[idx].astype(np.float64), 1e-6, None))
    coef = y @ pinv.T
    dxx, dyy, dzz, dxy, dxz, dyz = (coef[:, k] for k in range(1, 7))
    tens = np.stack([np.stack([dxx, dxy, dxz], -1), np.stack([dxy, dyy, dyz], -1),
                     np.stack([dxz, dyz, dzz], -1)], -2)
    ev = np.clip(np.linalg.eigvalsh(tens), 0, None)
    mean = ev.mean(1)
    num = np.sqrt(((ev - mean[:, None]) ** 2).sum(1))
    den = np.sqrt((ev ** 2).sum(1)) + 1e-12
    fa[idx] = np.sqrt(1.5) * num / den
    md[idx] = mean
    return fa, md


def random_motion(rng, n_vol: int) -> np.ndarray:
    """(n_vol, 6) tx ty tz (mm) rx ry rz (rad) relative to volume 0 (drift + rare jumps).

    Parameters move the head by ``q -> R q + t`` in the grid-centred voxel-mm frame of the dwi
    (:func:`bids_uad.synthetic.distortion.voxel_motion_map`).
    """
    steps = np.concatenate([rng.normal(scale=0.06, size=(n_vol, 3)),
                            rng.normal(scale=np.deg2rad(0.08), size=(n_vol, 3))], 1)
    jumps = rng.random(n_vol) < 0.04
    steps[jumps, :3] += rng.normal(scale=0.6, size=(int(jumps.sum()), 3))
    steps[jumps, 3:] += rng.normal(scale=np.deg2rad(0.6), size=(int(jumps.sum()), 3))
    steps[0] = 0
    return np.cumsum(steps, axis=0)


def random_fmap_pose(rng) -> np.ndarray:
    """(6,) head position of the reverse-PE b0 relative to dwi volume 0 (a separate scan)."""
    return np.concatenate([rng.normal(scale=0.5, size=3), rng.normal(scale=np.deg2rad(0.5), size=3)])


def random_eddy(rng) -> np.ndarray:
    """(4, 3) matrix E: eddy terms (translation vox, shear_x, scale_y, shear_z) = E @ g * b/1000."""
    return np.stack([rng.normal(scale=0.7, size=3), rng.normal(scale=0.004, size=3),
                     rng.normal(scale=0.008, size=3), rng.normal(scale=0.004, size=3)])


def rician(rng, img: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of the image plus complex Gaussian noise of standard deviation ``sigma``."""
    real = img + np.float32(sigma) * rng.standard_normal(img.shape, dtype=np.float32)
    imag = np.float32(sigma) * rng.standard_normal(img.shape, dtype=np.float32)
    return np.hypot(real, imag).astype(np.float32, copy=False)


def head_gradient(bvec_voxel: np.ndarray, params: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """World gradient direction seen by a head moved by ``params`` (voxel-mm frame).

    The scanner applies the nominal b-vector (voxel frame, FSL convention for an LAS image);
    the head is rotated by ``R``, so its tissue sees ``R^T g``; ``axes`` maps voxel-frame
    vectors to world.
    """
    rot = rotation_matrix(*np.asarray(params, float)[3:])
    return axes @ (rot.T @ np.asarray(bvec_voxel, float))


def acquire(signal_ref: np.ndarray, field_ref: np.ndarray, params, shape, zooms,
            disp_scale: float, eddy_disp: np.ndarray | None = None, pe_axis: int = 1) -> np.ndarray:
    """One EPI volume of a moved head: rigid motion, susceptibility and eddy distortion.

    ``signal_ref``/``field_ref``: noise-free image and field (Hz) with the head at the reference
    position; ``params``: head motion (voxel-mm frame); ``disp_scale``: TotalReadoutTime *
    polarity; ``eddy_disp``: extra displacement (voxels along PE) on the grid.  The field moves
    with the head; the distortion is solved along PE and sampled in one interpolation.
    """
    grid = np.indices(shape, dtype=np.float32)
    moved = np.any(np.asarray(params) != 0)
    vmap = voxel_motion_map(params, shape, zooms).astype(np.float32)
    ref0 = apply_affine(vmap, grid.reshape(3, -1)) if moved else grid.reshape(3, -1)
    field = (affine_transform(field_ref, vmap, order=1, mode="nearest", prefilter=False)
             if moved else field_ref)
    disp = field * np.float32(disp_scale)
    if eddy_disp is not None:
        disp = disp + eddy_disp
    y, jac = source_positions(disp, axis=pe_axis)
    if not moved:
        return interp_along(signal_ref, y, pe_axis, outside=0.0) / jac
    shift = (y - grid[pe_axis]).reshape(1, -1)
    ref = ref0 + vmap[:3, pe_axis:pe_axis + 1] * shift
    out = map_coordinates(signal_ref, ref, order=1, mode="constant", cval=0.0, prefilter=False)
    return out.reshape(shape) / jac


def eddy_displacement(e: np.ndarray, shape) -> np.ndarray:
    """Eddy displacement along PE (voxels) on the grid: ``e0 + e1 (i-ci) + e2 (j-cj) + e3 (k-ck)``.

    ``e`` = (translation, shear_x, scale_y, shear_z); (ci, cj, ck) is the grid centre.
    """
    c = (np.asarray(shape, np.float32) - 1) / 2
    i, j, k = (np.arange(n, dtype=np.float32) - c[a] for a, n in enumerate(shape))
    return (np.float32(e[0]) + np.float32(e[1]) * i[:, None, None] + np.float32(e[2]) * j[None, :, None]
            + np.float32(e[3]) * k[None, None, :]).astype(np.float32)


def clean_dwi(tpl_src, tpl2, subj, lesion, head_to_world, preset, skull_scale: float = 1.0) -> tuple:
    """Noise-free, artefact-free dwi of one session on the preset's (LAS) dwi grid.

    Returns the tissue truth ``t``, the compartments, the (N, nvol) series and the tensor FA
    and MD (N,) of that series inside the brain.
    """
    shape = tuple(preset.dwi_shape)
    aff = grid_affine(shape, preset.dwi_voxel_mm, DWI_CENTRE, las=True)
    t = tissue_at(tpl_src, tpl2, subj, lesion, grid_world(shape, aff), head_to_world, skull_scale,
                  with_orient=True)
    bvals, bvecs = gradient_table(preset.shells)
    g_world = bvecs @ axis_directions(aff).T
    comp = compartments(t)
    clean = dwi_signal(comp, t, bvals, g_world)
    fa, md = tensor_fa_md(clean, bvals, g_world, t["brain"] >= 0.5)
    return t, comp, clean, fa, md


def simulate_dwi(tpl_src, tpl2, subj, lesion, suscept, head_to_world, preset, rng,
                 skull_scale, want_fmap: bool) -> dict:
    """Distorted noisy dwi series + reverse-PE b0 and all dwi-space truth.

    The grid is LAS (as dcm2niix writes scanner data), so the b-vectors (voxel frame) are FSL
    b-vectors.  Every volume has its own head position; its signal is computed with the
    gradient rotated into the moved head.  ``motion`` and ``fmap_motion`` are in the
    grid-centred voxel-mm frame, relative to volume 0.
    """
    shape = tuple(preset.dwi_shape)
    aff = grid_affine(shape, preset.dwi_voxel_mm, DWI_CENTRE, las=True)
    axes = axis_directions(aff)
    zooms = (preset.dwi_voxel_mm,) * 3
    t, comp, clean, fa, md = clean_dwi(tpl_src, tpl2, subj, lesion, head_to_world, preset, skull_scale)
    bvals, bvecs = gradient_table(preset.shells)
    field_ref = suscept(t["m"]).reshape(shape)
    n_vol = len(bvals)
    motion = random_motion(rng, n_vol)
    eddy_mat = random_eddy(rng)
    eddy = np.zeros((n_vol, 4))
    trt = preset.total_readout_time
    clean4 = clean.reshape(shape + (n_vol,))
    sigma = DWI_SCALE / preset.b0_snr
    raw = np.empty(shape + (n_vol,), np.float32)
    for i in range(n_vol):
        if bvals[i] > 0:
            signal = dwi_volume(comp, t, float(bvals[i]), head_gradient(bvecs[i], motion[i], axes))
            eddy[i] = eddy_mat @ bvecs[i] * (bvals[i] / 1000.0)
            extra = eddy_displacement(eddy[i], shape)
        else:  # a b0 does not depend on the head's orientation
            signal, extra = clean[:, i], None
        vol = acquire(signal.reshape(shape), field_ref, motion[i], shape, zooms, -trt, extra)  # AP: "j-"
        raw[..., i] = rician(rng, vol, sigma)
    out = {"affine": aff, "raw": raw, "clean": clean4, "bvals": bvals, "bvecs": bvecs,
           "fa": fa.reshape(shape), "md": md.reshape(shape), "field": field_ref,
           "motion": motion, "eddy": eddy, "truth": t, "shape": shape,
           "fibre": (t["e_wm"] * (t["wm"] >= 0.5)[:, None]).reshape(shape + (3,))}
    if want_fmap:
        fmap_motion = random_fmap_pose(rng)
        b0 = clean4[..., int(np.argmin(bvals))]
        out["fmap"] = rician(rng, acquire(b0, field_ref, fmap_motion, shape, zooms, trt), sigma)  # PA: "j"
        out["fmap_motion"] = fmap_motion
    return out


def simulate_anat(tpl_src, tpl2, subj, lesion, head_to_world, preset, rng, skull_scale) -> dict:
    """T1w + FLAIR (same grid and pose) and T1w-space truth."""
    shape = preset.t1w_shape
    aff = grid_affine(shape, preset.t1w_voxel_mm, T1W_CENTRE)
    world = grid_world(shape, aff)
    t = tissue_at(tpl_src, tpl2, subj, lesion, world, head_to_world, skull_scale)
    t1, fl = anat_images(t, rng, world)
    return {"affine": aff, "shape": shape, "t1w": t1.reshape(shape), "flair": fl.reshape(shape),
            "truth": t}
