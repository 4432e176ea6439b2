"""Simulator physics: gradients seen by a moving head, lesion regions at every size."""
from __future__ import annotations

import numpy as np
import pytest
from dipy.core.gradients import gradient_table
from dipy.reconst.dti import TensorModel
from scipy import ndimage

from bids_uad.synthetic import simulate
from bids_uad.synthetic.anatomy import SubjectAnatomy, load_template
from bids_uad.synthetic.distortion import interp_along, source_positions, voxel_motion_map
from bids_uad.synthetic.lesions import lesion_fields, make_lesion
from bids_uad.synthetic.presets import get_preset


@pytest.fixture(scope="module")
def templates():
    return load_template(2), load_template(2)


def _angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    cos = np.abs((a * b).sum(-1)) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
    return np.rad2deg(np.arccos(np.clip(cos, 0, 1)))


def test_moved_head_sees_rotated_gradients(templates, monkeypatch):
    """A series acquired with the head rotated by 25 degrees, moved back: its tensor agrees with
    the true fibres only with the b-vectors rotated into the head (R^T g), not the nominal ones."""
    tpl_src, tpl2 = templates
    big = np.array([0.0, 0.0, 0.0, np.deg2rad(15.0), 0.0, np.deg2rad(20.0)])
    monkeypatch.setattr(simulate, "random_motion", lambda rng, n: np.vstack([np.zeros(6), np.tile(big, (n - 1, 1))]))
    monkeypatch.setattr(simulate, "random_eddy", lambda rng: np.zeros((4, 3)))
    no_field = simulate.Susceptibility(np.zeros((1, 3)), np.ones(1), np.zeros(1), np.zeros(3))
    preset = get_preset("tiny", b0_snr=1e6)
    rng = np.random.default_rng(3)
    out = simulate.simulate_dwi(tpl_src, tpl2, SubjectAnatomy.random(rng), None, no_field, np.eye(4), preset,
                                rng, skull_scale=1.0, want_fmap=False)
    shape, raw, bvals, bvecs = out["shape"], out["raw"], out["bvals"], out["bvecs"]
    # bring every moved volume back to the reference position (volume 0)
    to_moved = np.linalg.inv(voxel_motion_map(big, shape, (preset.dwi_voxel_mm,) * 3))
    ref = np.indices(shape, dtype=np.float64).reshape(3, -1)
    coords = to_moved[:3, :3] @ ref + to_moved[:3, 3:]
    back = raw.copy()
    for i in range(1, raw.shape[-1]):
        back[..., i] = ndimage.map_coordinates(raw[..., i], coords, order=1).reshape(shape)
    wm = ndimage.binary_erosion(out["truth"]["wm"].reshape(shape) > 0.9, iterations=1)
    wm &= (out["fa"] > 0.5) & (np.abs(out["fibre"][..., 2]) < 0.8)  # fibres that the rotation turns
    assert wm.sum() > 100
    rot = simulate.rotation_matrix(*big[3:])
    rotated = bvecs.copy()
    rotated[1:] = bvecs[1:] @ rot  # rows: R^T g
    axes = out["affine"][:3, :3] / preset.dwi_voxel_mm
    errors = {}
    for name, table in (("rotated", rotated), ("nominal", bvecs)):
        fit = TensorModel(gradient_table(bvals, bvecs=table)).fit(back[wm])
        errors[name] = np.median(_angle_deg(fit.evecs[..., 0] @ axes.T, out["fibre"][wm]))
    assert errors["rotated"] < 8.0, errors
    assert errors["nominal"] > errors["rotated"] + 8.0, errors


@pytest.mark.parametrize("shift", [0.0, 12.0, -12.0])
def test_source_positions_invert_the_displacement(shift):
    rng = np.random.default_rng(0)
    disp = ndimage.gaussian_filter(rng.normal(size=(20, 30, 10)), 5).astype(np.float32) * 20 + np.float32(shift)
    assert np.abs(np.gradient(disp, axis=1)).max() < 0.5
    y, jac = source_positions(disp, axis=1)
    x = np.broadcast_to(np.arange(30, dtype=np.float32)[None, :, None], disp.shape)
    assert np.abs(y + interp_along(disp, y, 1) - x).max() < 1e-3
    assert np.allclose(jac, 1 + interp_along(np.gradient(disp, axis=1).astype(np.float32), y, 1), atol=1e-5)


@pytest.mark.parametrize("kind", ["ellipsoid", "irregular"])
@pytest.mark.parametrize("voxel,radius", [(4.0, 10.0), (2.4, 6.0), (2.4, 20.0)])
def test_every_glioma_has_core_solid_oedema_infiltration(templates, kind, voxel, radius):
    """The smallest tumour a preset draws (tiny: 10 mm radius at 4 mm, paper: 6 mm at 2.4 mm) has a
    necrotic core of a few dwi voxels, a solid part, oedema and infiltration."""
    _, tpl2 = templates
    lesion = make_lesion(tpl2, np.random.default_rng(7), kind, min_core_mm3=4 * voxel ** 3, radius_mm=radius)
    mass_ml = lesion.mass.sum() * 8e-3
    info = lesion.info()
    assert 0 < info["core_volume_ml"] <= 0.6 * mass_ml + 1e-6
    # the regions on a 4 mm grid around the lesion (template space, tissue from the template)
    half = radius + 40.0
    axis = np.arange(-half, half + 1e-3, voxel)
    pts = np.stack(np.meshgrid(axis, axis, axis, indexing="ij")).reshape(3, -1) + lesion.centre_mm[:, None]
    pts = pts.astype(np.float32)
    vox = tpl2.to_voxel(pts)
    wm, gm, brain = (ndimage.map_coordinates(a, vox, order=1) for a in (tpl2.wm, tpl2.gm, tpl2.brain))
    csf = np.clip(brain - gm - wm, 0, 1)
    fields = lesion_fields(tpl2, lesion, pts, wm, csf, brain)
    counts = {k: int(fields[k].sum()) for k in ("core", "solid", "oedema", "infiltration")}
    assert counts["core"] >= 3, counts
    assert counts["solid"] >= 1 and counts["oedema"] >= counts["core"] and counts["infiltration"] >= counts["core"]
    assert counts["core"] <= 0.7 * (counts["core"] + counts["solid"]), counts
    if radius > 10:  # large tumours: the core is a minority of the mass, set by the drawn fraction
        assert 0.08 <= counts["core"] / (counts["core"] + counts["solid"]) <= 0.5, counts
