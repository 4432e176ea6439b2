"""Anatomical nipype interfaces: files in, files out; FSL command lines built without FSL."""
from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest

from bids_uad.algorithms.templates import phantom_head
from bids_uad.interfaces import anat as ia


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("anat_if")
    head = phantom_head(4.0, warp_mm=3.0, lesion_radius_mm=12.0)
    paths = {}
    for key in ("t1w", "brain_mask", "dseg", "lesion"):
        paths[key] = str(root / f"{key}.nii.gz")
        nib.save(head[key], paths[key])
    return paths


def test_n4_interface(files, tmp_path):
    res = ia.N4BiasFieldCorrection(in_file=files["t1w"], num_threads=1).run(cwd=str(tmp_path))
    assert os.path.isfile(res.outputs.out_file) and os.path.isfile(res.outputs.bias_file)
    assert os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] == "1"


def test_skullstrip_interface(files, tmp_path):
    res = ia.SkullStrip(in_file=files["t1w"], method="morph").run(cwd=str(tmp_path))
    mask = nib.load(res.outputs.out_mask).get_fdata()
    truth = nib.load(files["brain_mask"]).get_fdata()
    assert 2 * (mask * truth).sum() / (mask.sum() + truth.sum()) > 0.9


def test_segmentation_interface_orders_probsegs(files, tmp_path):
    res = ia.TissueSegmentation(in_file=files["t1w"], mask_file=files["brain_mask"],
                                iterations=2).run(cwd=str(tmp_path))
    assert [os.path.basename(p) for p in res.outputs.probsegs] == [
        "label-GM_probseg.nii", "label-WM_probseg.nii", "label-CSF_probseg.nii"]  # work files: uncompressed
    assert open(res.outputs.dseg_tsv).read().splitlines() == ["index\tname", "1\tCSF", "2\tGM", "3\tWM"]


def test_apply_transforms_interpolation_reaches_ants(files, tmp_path, monkeypatch):
    import ants

    seen = []
    real = ants.apply_transforms

    def spy(fixed, moving, transformlist, interpolator="linear", **kw):
        seen.append(interpolator)
        return real(fixed, moving, transformlist, interpolator=interpolator, **kw)

    monkeypatch.setattr(ants, "apply_transforms", spy)
    eye = tmp_path / "eye.mat"
    tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3)
    ants.write_transform(tx, str(eye))
    for kind, expected in (("label", "genericLabel"), ("probability", "linear"), ("mask", "genericLabel")):
        (tmp_path / kind).mkdir()
        res = ia.ApplyTransforms(in_files=[files["dseg"]], reference=files["t1w"], transforms=[str(eye)],
                                 interpolation=kind).run(cwd=str(tmp_path / kind))
        assert seen[-1] == expected
        out = nib.load(res.outputs.out_file)
        if expected == "genericLabel":
            assert set(np.unique(out.get_fdata())) <= {0, 1, 2, 3}


def test_apply_transforms_skips_without_reference(files, tmp_path):
    res = ia.ApplyTransforms(in_files=[files["dseg"]], reference="", transforms=[]).run(cwd=str(tmp_path))
    assert res.outputs.out_files == [""]


def test_register_interface_passes_lesion_mask(files, tmp_path, monkeypatch):
    import bids_uad.algorithms.registration as reg

    captured = {}

    def fake_register(fixed, moving, **kwargs):
        captured.update(kwargs)
        raise RuntimeError("stop")

    monkeypatch.setattr(reg, "register", fake_register)
    node = ia.RegisterImages(fixed_file=files["t1w"], moving_file=files["t1w"],
                             moving_mask=files["brain_mask"], lesion_mask=files["lesion"])
    with pytest.raises(RuntimeError, match="stop"):
        node.run(cwd=str(tmp_path))
    lesion = np.asarray(captured["lesion_mask"].dataobj) > 0
    assert lesion.sum() == (nib.load(files["lesion"]).get_fdata() > 0).sum()
    assert captured["moving_mask"] is not None


def test_register_interface_without_fixed_outputs_empty(files, tmp_path):
    res = ia.RegisterImages(fixed_file="", moving_file=files["t1w"]).run(cwd=str(tmp_path))
    assert res.outputs.forward_transforms == [] and res.outputs.forward_xfm == ""


def test_analysis_and_ventricle_masks(files, tmp_path):
    dseg = nib.load(files["dseg"])
    prior = np.zeros(dseg.shape, np.float32)
    prior[dseg.shape[0] // 2 - 3:dseg.shape[0] // 2 + 3] = 1.0
    prior_path = tmp_path / "prior.nii.gz"
    nib.save(nib.Nifti1Image(prior, dseg.affine), prior_path)
    for sub in ("v", "a", "b"):
        (tmp_path / sub).mkdir()
    vent = ia.VentricleMask(dseg=files["dseg"], prior=str(prior_path)).run(cwd=str(tmp_path / "v"))
    res = ia.AnalysisMask(dseg=files["dseg"], ventricles=vent.outputs.out_file,
                          brain_mask=files["brain_mask"]).run(cwd=str(tmp_path / "a"))
    mask = nib.load(res.outputs.out_file).get_fdata() > 0
    d = dseg.get_fdata()
    v = nib.load(vent.outputs.out_file).get_fdata() > 0
    assert mask.sum() > 0 and not (mask & v).any() and not mask[d == 1].any()
    # the brain mask's boundary layer (partial volume) is left out
    from scipy import ndimage

    brain = nib.load(files["brain_mask"]).get_fdata() > 0
    edge = brain & ~ndimage.binary_erosion(brain, np.ones((3, 3, 3), bool))
    assert edge.any() and not (mask & edge).any()
    assert ia.AnalysisMask(dseg="").run(cwd=str(tmp_path / "b")).outputs.out_file == ""
    # the dwi field of view: slices a volume was moved out of are left out
    fov = np.ones(dseg.shape, np.uint8)
    fov[..., -2:] = 0
    nib.save(nib.Nifti1Image(fov, dseg.affine), tmp_path / "fov.nii.gz")
    (tmp_path / "f").mkdir()
    res = ia.AnalysisMask(dseg=files["dseg"], ventricles=vent.outputs.out_file, brain_mask=files["brain_mask"],
                          fov_mask=str(tmp_path / "fov.nii.gz")).run(cwd=str(tmp_path / "f"))
    restricted = nib.load(res.outputs.out_file).get_fdata() > 0
    np.testing.assert_array_equal(restricted, mask & (fov > 0))


def test_flair_interface_none(files, tmp_path):
    res = ia.FlairToT1w(flair_file="", t1w_file=files["t1w"]).run(cwd=str(tmp_path))
    assert res.outputs.out_file == ""


def test_fsl_bet_cmdline(tmp_path):
    t1 = tmp_path / "t1w.nii.gz"
    t1.write_bytes(b"")
    bet = ia.fsl_bet(in_file=str(t1), out_file=str(tmp_path / "brain.nii.gz"))
    cmd = bet.cmdline
    assert cmd.startswith("bet ") and str(tmp_path / "brain.nii.gz") in cmd
    assert " -m" in cmd and " -R" in cmd and "-f 0.50" in cmd


def test_fsl_fast_cmdline(tmp_path):
    brain = tmp_path / "brain.nii.gz"
    brain.write_bytes(b"")
    fast = ia.fsl_fast(in_files=[str(brain)], out_basename=str(tmp_path / "fast"))
    cmd = fast.cmdline
    assert cmd.startswith("fast ") and "-n 3" in cmd and "-t 1" in cmd
    assert cmd.endswith(str(brain))


def test_fast_to_dseg(tmp_path):
    seg = np.array([[[0, 1, 2, 3]]], np.int16)
    affine = np.eye(4)
    nib.save(nib.Nifti1Image(seg, affine), tmp_path / "fast_seg.nii.gz")
    pves = []
    for i in range(3):
        p = tmp_path / f"fast_pve_{i}.nii.gz"
        nib.save(nib.Nifti1Image((seg == i + 1).astype(np.float32), affine), p)
        pves.append(str(p))
    res = ia.FASTToDseg(tissue_class_map=str(tmp_path / "fast_seg.nii.gz"),
                        partial_volume_files=pves[::-1]).run(cwd=str(tmp_path))
    assert nib.load(res.outputs.dseg).get_fdata().ravel().tolist() == [0, 1, 2, 3]
    gm = nib.load(res.outputs.gm_probseg).get_fdata().ravel().tolist()
    assert gm == [0, 0, 1, 0]  # pve_1 is GM for a T1w


def test_fsl_backend_builds_bet_and_fast_nodes(tmp_path, monkeypatch):
    from bids_uad.config import Settings
    from bids_uad.workflows import anat as wa

    settings = Settings(bids_dir=tmp_path / "bids", output_dir=tmp_path / "out", analysis_level="participant",
                        work_dir=tmp_path / "work", preproc_backend="python")
    monkeypatch.setattr(Settings, "resolved_backend", lambda self: "fsl")
    wf = wa.init_anat_wf(settings)
    names = wf.list_node_names()
    assert "fsl_bet" in names and "fsl_fast" in names and "skull_strip" not in names
