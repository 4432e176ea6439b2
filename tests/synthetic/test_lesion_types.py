"""Graded lesion types: their diffusion changes, sizes, truth files and determinism."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from bids_uad.synthetic import generate_dataset
from bids_uad.synthetic.anatomy import SubjectAnatomy, load_template
from bids_uad.synthetic.cli import main as synth_main
from bids_uad.synthetic.graded import GRADED_TYPES, VOLUME_RANGE_ML, draw_volume_ml, make_graded_lesion
from bids_uad.synthetic.lesion_types import patient_lesions
from bids_uad.synthetic.presets import get_preset
from bids_uad.synthetic.simulate import clean_dwi, compartments, dwi_signal, gradient_table, tensor_fa_md, tissue_at

TRUTH = "derivatives/synthetic-truth"


@pytest.fixture(scope="module")
def tpl():
    return load_template(2)


def _identity_subject() -> SubjectAnatomy:
    """Head space = template space, so the lesion's own geometry can be checked in place."""
    return SubjectAnatomy(np.ones(3), np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0))


def _angle_deg(a, b):
    cos = np.abs((a * b).sum(-1)) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
    return np.rad2deg(np.arccos(np.clip(cos, 0, 1)))


def _simulate(tpl, lesion):
    """Noise-free tensor FA, MD, mean diffusion-weighted signal and truth on the tiny dwi grid."""
    t, _, clean, fa, md = clean_dwi(tpl, tpl, _identity_subject(), lesion, np.eye(4), get_preset("tiny"))
    return t, fa, md, clean[:, 1:].mean(1)


def _distance(t, shape):
    """Distance (voxels) of every voxel from the lesion."""
    return ndimage.distance_transform_edt(~t["tumor"].reshape(shape)).ravel()


def _interior(t, shape):
    """Lesion voxels of pure tissue (CSF < 5 %) whose neighbours are all in the lesion."""
    region = t["tumor"].reshape(shape)
    return ndimage.binary_erosion(region).ravel() & (t["csf"] < 0.05)


@pytest.mark.parametrize("kind", ["infiltration", "oedema", "restricted"])
def test_tissue_changes_match_the_type(tpl, kind):
    """Inside the lesion the tensor scalars change as the type says (pure tissue: the modelled
    value, within the soft edge's 2 points; whole region: diluted by partial volume only);
    outside nothing changes."""
    shape = get_preset("tiny").dwi_shape
    t0, fa0, md0, dw0 = _simulate(tpl, None)
    healthy = (t0["brain"] >= 0.5) & (md0 > 0)
    for severity in (0.0, 1.0):
        lesion = make_graded_lesion(tpl, np.random.default_rng(11), kind, severity, volume_ml=25.0)
        t, fa, md, dw = _simulate(tpl, lesion)
        region = t["tumor"] & healthy
        core = _interior(t, shape) & healthy
        assert region.sum() > 150 and core.sum() > 20, (region.sum(), core.sum())
        d_md, d_fa = md / np.where(healthy, md0, 1) - 1, fa / np.where(healthy, fa0, 1) - 1
        md_core, md_all = np.median(d_md[core]), np.median(d_md[region])
        fa_all = np.median(d_fa[region & (t["wm"] >= 0.5)])
        if kind == "infiltration":
            assert abs(md_core) <= 0.05 and abs(md_all) <= 0.05, (md_core, md_all)
            assert fa_all <= (-0.15 if severity == 0 else -0.40), fa_all
        elif kind == "oedema":
            expected = 0.10 + 0.20 * severity
            assert abs(md_core - expected) < 0.02, (md_core, expected)
            assert 0.06 <= md_all <= 0.31, md_all
            assert -0.25 <= fa_all <= -0.03, fa_all  # mildly lower
        else:
            expected = -(0.20 + 0.20 * severity)
            assert abs(md_core - expected) < 0.02, (md_core, expected)
            assert -0.41 <= md_all <= -0.15, md_all
            assert np.median(dw[region] / dw0[region]) > 1.1  # brighter diffusion-weighted signal
        # beyond a two-voxel margin the soft edge leaves < 2 %, beyond three voxels nothing
        for margin, rtol in ((2, 0.02), (3, 1e-3)):
            far = healthy & (_distance(t, shape) > margin)
            assert np.allclose(md[far], md0[far], rtol=rtol) and np.allclose(fa[far], fa0[far], rtol=rtol, atol=1e-5)


def test_mass_effect_changes_directions_not_scalars(tpl):
    """Mass effect: the tissue keeps its own FA and MD (compared with the same tissue before it
    was displaced) but its tracts point elsewhere than in the healthy brain at that place."""
    preset = get_preset("tiny")
    t0, fa0, md0, _ = _simulate(tpl, None)
    for severity in (0.0, 1.0):
        lesion = make_graded_lesion(tpl, np.random.default_rng(5), "mass-effect", severity, volume_ml=30.0)
        t, fa, md, _ = _simulate(tpl, lesion)
        region = t["tumor"] & (md > 0)
        wm = region & (t["wm"] >= 0.5) & (t0["wm"] >= 0.5)
        assert wm.sum() > 30
        change = _angle_deg(t["e_wm"][wm], t0["e_wm"][wm])
        assert np.median(change) >= (4.0 if severity == 0 else 7.0), np.median(change)
        # the same tissue before the displacement: the healthy brain at the source points
        source = lesion.mass_effect_inverse(t["m"])
        t_src = tissue_at(tpl, tpl, _identity_subject(), None, source, np.eye(4), 1.0, with_orient=True)
        bvals, bvecs = gradient_table(preset.shells)
        g = bvecs @ np.diag([-1.0, 1.0, 1.0])  # the LAS grid's voxel axes in world
        fa_src, md_src = tensor_fa_md(dwi_signal(compartments(t_src), t_src, bvals, g), bvals, g,
                                      t_src["brain"] >= 0.5)
        ok = region & (md_src > 0)
        assert abs(np.median(md[ok] / md_src[ok] - 1)) <= 0.06
        assert abs(np.median(fa[ok] / fa_src[ok] - 1)) <= 0.10
        # far from it the brain is as before
        far = (t0["brain"] >= 0.5) & (t0["wm"] >= 0.5) & (_distance(t, preset.dwi_shape) > 3)
        assert np.median(_angle_deg(t["e_wm"][far], t0["e_wm"][far])) < 0.5


def test_volumes_are_realistic(tpl):
    rng = np.random.default_rng(0)
    volumes = np.array([draw_volume_ml(rng) for _ in range(4000)])
    lo, hi = VOLUME_RANGE_ML
    assert volumes.min() >= lo and volumes.max() <= hi
    assert 0.2 <= np.mean(volumes < 5) <= 0.45  # some small lesions
    assert np.mean((volumes >= 2) & (volumes <= 60)) >= 0.85  # most in 2-60 mL
    for kind in GRADED_TYPES:
        for target in (3.0, 40.0):
            lesion = make_graded_lesion(tpl, np.random.default_rng(3), kind, 0.5, volume_ml=target)
            volume = lesion.region.sum() * 8e-3
            assert 0.7 * target <= volume <= 1.1 * target, (kind, target, volume)
            assert ndimage.label(lesion.region)[1] == 1


def test_lesions_are_deterministic_and_grow(tpl):
    def draw(seed):
        return patient_lesions(tpl, np.random.default_rng(seed), "mixed-hard", ("pre", "followup"), None,
                               min_core_mm3=256.0, min_radius_mm=10.0)

    a, b, c = draw(4), draw(4), draw(9)
    assert [les.kind for les in a["pre"]] == [les.kind for les in b["pre"]]
    for x, y in zip(a["pre"] + a["followup"], b["pre"] + b["followup"]):
        assert np.array_equal(x.region, y.region) and x.severity == y.severity
    assert not np.array_equal(a["pre"][0].region, c["pre"][0].region)
    for pre, follow in zip(a["pre"], a["followup"]):
        assert follow.kind == pre.kind and follow.severity >= pre.severity
        assert np.all(follow.region[pre.region]) and follow.region.sum() > 1.1 * pre.region.sum()
    # lesions of one patient do not overlap
    ids = np.sum([les.region.astype(int) for les in a["pre"]], axis=0)
    assert ids.max() == 1


@pytest.fixture(scope="module")
def mixed_hard(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "ds"
    # seed 0: the two patients draw all four types, three lesions and two (patients only: fast)
    generate_dataset(out, preset="tiny", n_controls=0, n_patients=2, seed=0, progress=False, n_jobs=1,
                     lesion_generator="mixed-hard", write_clean_dwi=False, no_reverse_pe_fraction=0.0)
    return out


def _load(path):
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img


def test_mixed_hard_truth_is_consistent(mixed_hard):
    truth = mixed_hard / TRUTH
    types, n_multi = set(), 0
    for sub in ("pat01", "pat02"):
        info = json.loads((truth / f"sub-{sub}" / f"sub-{sub}_desc-lesion_info.json").read_text())
        kinds = {}
        for ses in ("pre", "followup"):
            for space, folder in (("dwi", "dwi"), ("T1w", "anat")):
                stem = truth / f"sub-{sub}" / f"ses-{ses}" / folder / f"sub-{sub}_ses-{ses}_space-{space}"
                ids, img = _load(f"{stem}_desc-lesions_dseg.nii.gz")
                tumor, _ = _load(f"{stem}_desc-tumor_mask.nii.gz")
                assert np.array_equal(ids > 0, tumor > 0)  # the union is today's tumour mask
                lines = (stem.parent / f"{stem.name}_desc-lesions_dseg.tsv").read_text().splitlines()
                assert lines[0].split("\t") == ["index", "name", "type", "severity", "volume_ml"]
                rows = [line.split("\t") for line in lines[1:]]
                voxel_ml = abs(np.linalg.det(img.affine[:3, :3])) / 1000
                assert set(np.unique(ids[ids > 0])) <= {int(r[0]) for r in rows}
                for index, _, kind, severity, volume in rows:
                    assert abs(float(volume) - (ids == int(index)).sum() * voxel_ml) < 1e-3
                    assert float(volume) > 0.5 and 0 <= float(severity) <= 1
                    assert kinds.setdefault(int(index), kind) == kind  # same lesion in every session and space
                assert [les["type"] for les in info[ses]["lesions"]] == [r[2] for r in rows]
            assert not (truth / f"sub-{sub}" / f"ses-{ses}" / "dwi" /
                        f"sub-{sub}_ses-{ses}_space-dwi_desc-core_mask.nii.gz").exists()
        types |= set(kinds.values())
        n_multi += len(kinds) > 1
    assert len(types) >= 2 and n_multi >= 1, (types, n_multi)
    assert types <= set(GRADED_TYPES)
    assert "lesion generator mixed-hard" in (mixed_hard / "dataset_description.json").read_text()


def test_severity_option(tmp_path, capsys):
    assert synth_main([str(tmp_path / "x"), "--lesion-generator", "oedema", "--severity", "1.5"]) == 64
    assert synth_main([str(tmp_path / "x"), "--severity", "0.5"]) == 64  # the glioma has no severity
    assert "graded" in capsys.readouterr().err
    assert synth_main([str(tmp_path / "x"), "--lesion-generator", "cyst"]) == 64
    assert not (tmp_path / "x").exists()
