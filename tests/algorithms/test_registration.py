"""ANTs registration helpers: spaces, SyN recovery, interpolation, lesion masking, templates."""
from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest

from bids_uad.algorithms import registration as reg
from bids_uad.algorithms.masking import dice
from bids_uad.algorithms.templates import (
    NILEARN_NAME, TEMPLATEFLOW_NAME, find_template, phantom_head, ventricle_prior,
)


def test_ants_roundtrip_keeps_oblique_affine():
    rot = np.deg2rad(10)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[np.cos(rot), -np.sin(rot), 0], [np.sin(rot), np.cos(rot), 0], [0, 0, 1]]) \
        @ np.diag([2.0, 2.5, 3.0])
    affine[:3, 3] = [-40, 12, 7]
    data = np.random.default_rng(0).random((6, 7, 8)).astype(np.float32)
    back = reg.from_ants(reg.to_ants(nib.Nifti1Image(data, affine)))
    assert np.allclose(back.affine, affine, atol=1e-5)
    assert np.allclose(back.get_fdata(), data)


@pytest.mark.parametrize("kind,expected", [("label", "genericLabel"), ("mask", "genericLabel"),
                                           ("dseg", "genericLabel"), ("probability", "linear"),
                                           ("image", "linear")])
def test_interpolation_per_kind(kind, expected):
    assert reg.interpolation_for(kind) == expected


def test_interpolation_unknown_kind():
    with pytest.raises(ValueError):
        reg.interpolation_for("banana")


def test_apply_transforms_labels_stay_labels():
    head = phantom_head(4.0)
    shifted = np.eye(4)
    shifted[:3, 3] = [1.3, -0.7, 0.4]
    target = nib.Nifti1Image(np.zeros(head["dseg"].shape, np.float32), shifted @ head["dseg"].affine)
    out = reg.apply_transforms(head["dseg"], target, [], "label")
    assert set(np.unique(out.get_fdata())) <= {0, 1, 2, 3}
    assert np.issubdtype(out.get_data_dtype(), np.integer)
    prob = reg.apply_transforms(head["brain_mask"], target, [], "probability")
    values = np.unique(prob.get_fdata())
    assert prob.get_data_dtype() == np.float32 and len(values) > 2  # linear: in-between values


def test_syn_recovers_known_deformation(tmp_path):
    fixed = phantom_head(4.0, bias=0.0, noise=0.0)
    moving = phantom_head(4.0, warp_mm=6.0, bias=0.0, noise=0.0)
    wm_f = fixed["dseg"].get_fdata() == 3
    before = dice(moving["dseg"].get_fdata() == 3, wm_f)
    res = reg.register(fixed["t1w"], moving["t1w"], kind="SyN", composite=True,
                       out_prefix=tmp_path / "x_", reg_iterations=(60, 30, 0))
    assert res.forward[0].endswith("Composite.h5") and res.inverse[0].endswith("InverseComposite.h5")
    warped = reg.apply_transforms(moving["dseg"], fixed["t1w"], res.forward, "label")
    after = dice(warped.get_fdata() == 3, wm_f)
    assert after > before + 0.1 and after >= 0.8, (before, after)
    # the inverse brings the fixed labels back onto the moving image
    back = reg.apply_transforms(fixed["dseg"], moving["t1w"], res.inverse, "label")
    assert dice(back.get_fdata() == 3, moving["dseg"].get_fdata() == 3) > before + 0.1


def test_rigid_plus_syn_recovers_rigid_pose_across_contrasts(tmp_path):
    """T1w → b0-like image (inverted contrast, moved rigidly): sub-voxel point error."""
    rot = np.deg2rad(6.0)
    pose = np.eye(4)
    pose[:3, :3] = [[np.cos(rot), -np.sin(rot), 0], [np.sin(rot), np.cos(rot), 0], [0, 0, 1]]
    pose[:3, 3] = [3.0, -4.0, 2.0]
    from nibabel.processing import resample_to_output

    t1 = phantom_head(3.0, bias=0.0, noise=0.0)
    moved = phantom_head(3.0, pose=pose, bias=0.0, noise=0.0)
    dseg = moved["dseg"].get_fdata()
    b0 = nib.Nifti1Image(np.select([dseg == 1, dseg == 2, dseg == 3], [1000.0, 600.0, 450.0], 0.0)
                         .astype(np.float32), moved["dseg"].affine)
    b0 = resample_to_output(b0, [4.0] * 3, order=1)  # dwi grid coarser than the T1w
    moved = {"brain_mask": resample_to_output(moved["brain_mask"], [4.0] * 3, order=0)}
    brain = nib.Nifti1Image(t1["t1w"].get_fdata().astype(np.float32) * (t1["brain_mask"].get_fdata() > 0),
                            t1["t1w"].affine)
    res = reg.register(b0, brain, kind="Rigid+SyN", composite=True, out_prefix=tmp_path / "d_",
                       reg_iterations=(10,))
    assert len(res.forward) == 1 and res.forward[0].endswith("Composite.h5")
    # where does the centre of each b0 brain voxel land in T1w space?
    coords = []
    for axis in range(3):
        ijk = np.indices(t1["t1w"].shape, dtype=np.float32)
        world = (t1["t1w"].affine[:3, :3] @ ijk.reshape(3, -1) + t1["t1w"].affine[:3, 3:4])[axis]
        img = nib.Nifti1Image(world.reshape(t1["t1w"].shape).astype(np.float32), t1["t1w"].affine)
        coords.append(reg.apply_transforms(img, b0, res.forward, "image").get_fdata())
    mask = ndi_erode(moved["brain_mask"].get_fdata() > 0)
    vox = np.argwhere(mask).T
    world = b0.affine[:3, :3] @ vox + b0.affine[:3, 3:4]
    truth = (np.linalg.inv(pose) @ np.vstack([world, np.ones((1, world.shape[1]))]))[:3]
    est = np.stack([c[mask] for c in coords])
    err = np.linalg.norm(est - truth, axis=0)
    assert err.mean() < 2.0, err.mean()  # half a 4 mm voxel


def ndi_erode(mask):
    from scipy import ndimage

    return ndimage.binary_erosion(mask, iterations=2)


def test_lesion_mask_reaches_ants(monkeypatch, tmp_path):
    import ants

    captured = {}

    def fake_registration(fixed, moving, **kwargs):
        captured.update(kwargs)
        raise RuntimeError("stop")

    monkeypatch.setattr(ants, "registration", fake_registration)
    head = phantom_head(4.0, lesion_radius_mm=12.0)
    lesion = head["lesion"]
    assert lesion.get_fdata().sum() > 10
    with pytest.raises(RuntimeError, match="stop"):
        reg.register(head["t1w"], head["t1w"], moving_mask=head["brain_mask"], lesion_mask=lesion,
                     out_prefix=tmp_path / "a_")
    mmask = captured["moving_mask"].numpy() > 0
    les, brain = lesion.get_fdata() > 0, head["brain_mask"].get_fdata() > 0
    assert not mmask[les].any()                     # lesion excluded from the metric
    assert mmask[brain & ~les].all()                # rest of the brain kept
    assert captured["mask_all_stages"] is True
    # without a brain mask: everything but the lesion
    captured.clear()
    with pytest.raises(RuntimeError):
        reg.register(head["t1w"], head["t1w"], lesion_mask=lesion, out_prefix=tmp_path / "b_")
    mmask = captured["moving_mask"].numpy() > 0
    assert mmask.sum() == mmask.size - les.sum()


def test_lesion_mask_on_another_grid_is_resampled(monkeypatch, tmp_path):
    import ants
    from nibabel.processing import resample_to_output

    captured = {}

    def fake_registration(fixed, moving, **kwargs):
        captured.update(kwargs)
        raise RuntimeError("stop")

    monkeypatch.setattr(ants, "registration", fake_registration)
    head = phantom_head(4.0, lesion_radius_mm=14.0)
    lesion_2mm = resample_to_output(head["lesion"], [2.0] * 3, order=0)
    with pytest.raises(RuntimeError):
        reg.register(head["t1w"], head["t1w"], lesion_mask=lesion_2mm, out_prefix=tmp_path / "x_")
    mmask = captured["moving_mask"].numpy() > 0
    assert mmask.shape == head["t1w"].shape
    assert (~mmask).sum() == pytest.approx((head["lesion"].get_fdata() > 0).sum(), rel=0.3)


def test_registration_refuses_to_run_without_an_out_prefix(monkeypatch, tmp_path):
    """Transforms go where the caller can remove them: without ``out_prefix`` every registration
    refuses before any work (register used to write them to a /tmp/bids_uad_reg_* folder that
    nobody removed)."""
    import tempfile

    import ants

    monkeypatch.setattr(ants, "registration", lambda *a, **k: pytest.fail("registered without a prefix"))
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: pytest.fail("made a temporary folder"))
    head = phantom_head(4.0)
    t1w, brain = head["t1w"], head["brain_mask"]
    with pytest.raises(TypeError, match="out_prefix"):
        reg.register(t1w, t1w, kind="Rigid")
    for kind in ("Rigid", "Rigid+SyN"):
        with pytest.raises(ValueError, match="needs out_prefix"):
            reg.register(t1w, t1w, kind=kind, out_prefix=None)
    with pytest.raises(TypeError, match="out_prefix"):
        reg.register_flair(t1w, t1w, brain)
    with pytest.raises(ValueError, match="needs out_prefix"):
        reg.register_flair(t1w, t1w, brain, out_prefix="")
    with pytest.raises(TypeError, match="out_prefix"):
        reg.register_fa_to_template(t1w, brain, t1w, brain)
    paths = [str(tmp_path / f"{k}.nii.gz") for k in ("t1w", "brain")]
    nib.save(t1w, paths[0])
    nib.save(brain, paths[1])
    with pytest.raises(ValueError, match="needs out_prefix"):
        reg.register_followup(paths[0], paths[1], "", paths[0], paths[1], "", None)


def test_seed_and_threads_are_set(monkeypatch):
    import ants

    monkeypatch.delenv("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", raising=False)
    reg.configure_ants(threads=2, seed=7)
    import os
    assert os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] == "2"
    assert ants.config._random_seed == reg.ants_seed(7) == 8  # ANTs reads 0 as "from the clock"


def test_chain_dwi_to_template_order():
    xfms, flags = reg.chain_dwi_to_template(["aff.mat", "inv.nii.gz"], [True, False],
                                            ["warp.nii.gz", "mni.mat"])
    assert xfms == ["warp.nii.gz", "mni.mat", "aff.mat", "inv.nii.gz"]
    assert flags == [False, False, True, False]


def test_template_falls_back_to_nilearn(tmp_path):
    empty_tf = tmp_path / "tf"
    (empty_tf / f"tpl-{TEMPLATEFLOW_NAME}").mkdir(parents=True)
    # placeholder (empty) files as a TemplateFlow skeleton leaves them
    (empty_tf / f"tpl-{TEMPLATEFLOW_NAME}" / f"tpl-{TEMPLATEFLOW_NAME}_res-01_T1w.nii.gz").write_bytes(b"")
    tpl = find_template(templateflow_home=empty_tf)
    assert tpl.name == NILEARN_NAME == "MNI152NLin2009aSym"
    name, t1w, mask, priors = tpl
    assert set(priors) == {"GM", "WM", "CSF"}
    brain = nib.load(mask).get_fdata() > 0
    vent = nib.load(tpl.ventricles).get_fdata()
    assert 8_000 < (vent > 0.5).sum() < 40_000          # lateral ventricles: ~10-40 ml at 1 mm
    assert (vent[~brain] > 0.5).sum() == 0
    csf = nib.load(priors["CSF"]).get_fdata()
    assert csf.max() <= 1.0 and csf[brain].mean() > 0.05


def test_template_uses_templateflow_when_present(tmp_path):
    base = tmp_path / "tf" / f"tpl-{TEMPLATEFLOW_NAME}"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    affine = np.diag([8.0, 8.0, 8.0, 1.0])
    affine[:3, 3] = [-96, -132, -78]
    shape = (25, 30, 25)
    brain = np.zeros(shape, bool)
    brain[4:21, 4:26, 4:21] = True
    stem = f"tpl-{TEMPLATEFLOW_NAME}_res-01"
    files = {"T1w": rng.random(shape) * 100, "desc-brain_mask": brain,
             "label-GM_probseg": rng.random(shape) * 0.5, "label-WM_probseg": rng.random(shape) * 0.4,
             "label-CSF_probseg": rng.random(shape) * 0.1}
    for key, arr in files.items():
        nib.save(nib.Nifti1Image(np.asarray(arr, np.float32), affine), base / f"{stem}_{key}.nii.gz")
    tpl = find_template(templateflow_home=tmp_path / "tf", cache=tmp_path / "cache")
    assert tpl.name == TEMPLATEFLOW_NAME and tpl.source == "templateflow"
    assert tpl.priors["WM"].endswith("label-WM_probseg.nii.gz")


def test_ventricle_prior_picks_central_component():
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-60, -80, -40]
    shape = (60, 80, 60)
    brain = np.zeros(shape, bool)
    brain[5:55, 5:75, 5:55] = True
    csf = np.zeros(shape, np.float32)
    csf[25:35, 35:45, 25:30] = 1.0    # around (0, -5, 15) mm: ventricles
    csf[5:8, 10:20, 10:20] = 1.0      # lateral, at the brain's edge: sulcal CSF
    prior = ventricle_prior(csf, brain, affine)
    assert prior[30, 40, 27] > 0.9
    assert prior[6, 15, 15] < 0.01


def _translation(path, shift_lps):
    import ants

    tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3,
                                    matrix=np.eye(3), translation=list(shift_lps))
    ants.write_transform(tx, str(path))
    return str(path)


def test_dwi_to_template_composes_inverse_then_forward(tmp_path):
    """dwi → T1w (inverse of T1w→dwi) then T1w → template, in one resampling."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-30, -30, -30]
    data = np.zeros((30, 30, 30), np.float32)
    data[13:17, 13:17, 13:17] = 1.0          # blob centred at world (0, 0, 0)
    img = nib.Nifti1Image(data, affine)
    # ANTs transforms map fixed points to moving points (LPS): T1w→dwi "forward" maps a dwi
    # point to T1w; its inverse (dwi→T1w) maps a T1w point to dwi.
    t1_to_dwi_inverse = _translation(tmp_path / "dwi2t1w.mat", [0.0, 0.0, -6.0])  # p_dwi = p_T1 - 6 z
    t1_to_mni = _translation(tmp_path / "t1w2mni.mat", [0.0, 0.0, 2.0])            # p_T1 = p_MNI + 2 z
    out = reg.dwi_to_template(img, img, [t1_to_dwi_inverse], [t1_to_mni], "image",
                              t1w2dwi_inverse_invert=[False]).get_fdata()
    # p_dwi = p_MNI + 2 - 6 = p_MNI - 4 (mm, z): the blob at dwi z=0 appears at MNI z=+4
    com = np.array(np.nonzero(out > 0.5)).mean(axis=1)
    world = affine[:3, :3] @ com + affine[:3, 3]
    assert np.allclose(world, [-1.0, -1.0, 3.0], atol=0.6)  # blob centre (-1,-1,-1) + 4 z


@pytest.mark.parametrize("kind", ["image", "label"])
def test_cropping_to_the_support_resamples_the_same_map(tmp_path, kind):
    """A 4 mm map with a small support carried onto a 1 mm grid: resampling only inside the box
    where it lands gives the same image as the whole grid."""
    coarse_affine = np.diag([4.0, 4.0, 4.0, 1.0])
    coarse_affine[:3, 3] = [-40, -40, -40]
    data = np.zeros((20, 20, 20), np.float32)
    data[6:9, 10:14, 4:7] = np.arange(1, 37, dtype=np.float32).reshape(3, 4, 3)
    img = nib.Nifti1Image(data if kind == "image" else (data > 10).astype(np.float32), coarse_affine)
    fine_affine = np.eye(4)
    fine_affine[:3, 3] = [-45, -45, -45]
    fine = nib.Nifti1Image(np.zeros((90, 90, 90), np.float32), fine_affine)
    shift = _translation(tmp_path / "shift.mat", [3.0, -5.0, 7.0])
    full = reg.apply_transforms(img, fine, [shift], kind)
    cropped = reg.apply_transforms(img, fine, [shift], kind, crop_to_support=True)
    assert np.asarray(full.dataobj).any() and full.get_data_dtype() == cropped.get_data_dtype()
    np.testing.assert_array_equal(np.asarray(full.dataobj), np.asarray(cropped.dataobj))
    box = reg.support_box(np.asarray(img.dataobj) != 0, coarse_affine, fine, [shift], [False])
    assert np.prod([hi - lo for lo, hi in box]) < 0.2 * 90 ** 3  # most of the grid was skipped
    empty = reg.apply_transforms(nib.Nifti1Image(np.zeros_like(data), coarse_affine), fine, [shift], kind,
                                 crop_to_support=True)
    assert not np.asarray(empty.dataobj).any() and empty.shape == fine.shape


def test_register_flair_rigid_onto_t1w(tmp_path):
    rot = np.deg2rad(5.0)
    pose = np.eye(4)
    pose[:3, :3] = [[1, 0, 0], [0, np.cos(rot), -np.sin(rot)], [0, np.sin(rot), np.cos(rot)]]
    pose[:3, 3] = [2.0, 3.0, -2.0]
    t1 = phantom_head(4.0, bias=0.0)
    flair = phantom_head(4.0, pose=pose, bias=0.0, seed=5)
    out, res = reg.register_flair(t1["t1w"], flair["t1w"], t1["brain_mask"], resolution_mm=4.0,
                                  out_prefix=tmp_path / "flair_")
    assert out.shape == t1["t1w"].shape and np.allclose(out.affine, t1["t1w"].affine)
    brain = t1["brain_mask"].get_fdata() > 0
    before = np.corrcoef(flair["t1w"].get_fdata()[brain], t1["t1w"].get_fdata()[brain])[0, 1]
    after = np.corrcoef(out.get_fdata()[brain], t1["t1w"].get_fdata()[brain])[0, 1]
    assert after > before + 0.2 and after > 0.85, (before, after)


_REPRO_SCRIPT = """
import sys, tempfile, numpy as np, nibabel as nib, ants
from scipy import ndimage as ndi
from bids_uad.algorithms import registration as reg
rng = np.random.default_rng(0)
vol = ndi.gaussian_filter(rng.random((40, 44, 40)), 3).astype(np.float32)
affine = np.diag([2.0, 2.0, 2.0, 1.0])
fixed = nib.Nifti1Image(vol, affine)
moving = nib.Nifti1Image((ndi.shift(vol, (1.3, -0.7, 0.4)) ** 2).astype(np.float32), affine)
for _ in range(3):
    with tempfile.TemporaryDirectory() as tmp:
        _, result = reg.register_flair(fixed, moving, seed=0, threads=1, out_prefix=tmp + "/flair_")
        print(repr(list(ants.read_transform(result.forward[0]).parameters)))
"""


def test_default_seed_makes_registration_reproducible():
    """Three identical rigid registrations with the default seed give the same transform.

    ANTs treats ``--random-seed 0`` as "seed from the clock"; the app's seed 0 must not reach
    it as 0 (it did, and repeated runs of one dataset differed after every registration).
    Run in a fresh process: ITK fixes its thread count at its first use in a process, and
    other tests here register with two threads.
    """
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _REPRO_SCRIPT], capture_output=True, text=True,
                         check=True, env={**os.environ, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1"})
    params = [line for line in out.stdout.splitlines() if line.startswith("[")]
    assert len(params) == 3 and len(set(params)) == 1, out.stdout
    assert reg.ants_seed(0) != 0


def _oblique(zooms, degrees, origin):
    rot = np.deg2rad(degrees)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[1, 0, 0], [0, np.cos(rot), -np.sin(rot)], [0, np.sin(rot), np.cos(rot)]]) \
        @ np.diag(zooms)
    affine[:3, 3] = origin
    return affine


def _warp_field(path, reference):
    """A smooth displacement field (mm, LPS) on ``reference``'s grid, as an ANTs warp file."""
    import ants
    from scipy import ndimage as ndi

    shape = reference.shape[:3]
    rng = np.random.default_rng(3)
    field = np.stack([ndi.gaussian_filter(rng.normal(0, 40, shape), 3) for _ in range(3)], axis=-1)
    ref = reg.to_ants(reference)
    warp = ants.from_numpy(field.astype(np.float32), origin=ref.origin, spacing=ref.spacing,
                           direction=ref.direction, has_components=True)
    ants.image_write(warp, str(path))
    return str(path)


@pytest.mark.parametrize("kind,crop", [("image", False), ("image", True), ("label", False)])
def test_a_series_is_resampled_as_its_volumes_one_by_one(tmp_path, monkeypatch, kind, crop):
    """4-D input goes through antsApplyTransforms once (its time-series mode, transforms read once):
    each volume comes out as the 3-D resampling of that volume alone, to the last bit, through a
    chain of a displacement field and an inverted affine, between oblique grids; so does a series
    on a grid too large for the series mode (one call per volume)."""
    moving_affine = _oblique((2.0, 2.5, 3.0), 12, [-30, -35, -28])
    fixed_affine = _oblique((1.5, 1.5, 1.5), -7, [-33, -31, -36])
    rng = np.random.default_rng(0)
    series = np.zeros((24, 26, 20, 4), np.float32)
    series[6:18, 7:19, 5:15] = rng.random((12, 12, 10, 4)) * 100
    if kind == "label":
        series = np.rint(series / 25)
    fixed = nib.Nifti1Image(np.zeros((44, 40, 42), np.float32), fixed_affine)
    chain = [_warp_field(tmp_path / "field_Warp.nii.gz", fixed), _translation(tmp_path / "shift.mat", [2.0, -3.0, 1.5])]
    invert = [False, True]
    together = reg.apply_transforms(nib.Nifti1Image(series, moving_affine), fixed, chain, kind, invert=invert,
                                    crop_to_support=crop)
    assert together.shape == fixed.shape + (4,)
    monkeypatch.setattr(reg, "SERIES_MAX_VOXELS", 0)
    one_by_one = reg.apply_transforms(nib.Nifti1Image(series, moving_affine), fixed, chain, kind, invert=invert,
                                      crop_to_support=crop)
    np.testing.assert_array_equal(np.asarray(together.dataobj), np.asarray(one_by_one.dataobj))
    for i in range(4):
        alone = reg.apply_transforms(nib.Nifti1Image(series[..., i], moving_affine), fixed, chain, kind,
                                     invert=invert, crop_to_support=crop)
        assert np.asarray(alone.dataobj).any()
        np.testing.assert_array_equal(np.asarray(together.dataobj)[..., i], np.asarray(alone.dataobj))
