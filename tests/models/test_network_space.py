"""Networks on the template grid (``ModelSettings.network_space = "template"``): every control carried
there through its own route, the grid cut to where the controls' brains land, subjects carried there at
inference and their score back to their own grid; the settings and the model file."""
import json
from dataclasses import replace

import numpy as np
import pytest

from bids_uad.algorithms.registration import TemplateRoute
from bids_uad.errors import InputMissingError, UsageError
from bids_uad.models.bundle import load_bundle
from bids_uad.models.inputs import carry_to_template, controls_box, template_route
from bids_uad.models.settings import preset
from bids_uad.scoring.inference import infer
from bids_uad.scoring.metrics import auprc
from bids_uad.training.fit import train_from_dwi
from bids_uad.training.toydata import fibonacci_directions, make_toy_subject

SHAPE = (20, 20, 16)
BVECS = fibonacci_directions(12)
BVALS = np.full(12, 1000.0)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
AFFINE[:3, 3] = [-20.0, -22.0, -14.0]
# the template grid: 2 mm like the data, but larger and elsewhere (the box is cut from it)
TPL_AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
TPL_AFFINE[:3, 3] = [-40.0, -44.0, -30.0]
TPL_SHAPE = (40, 48, 32)


def _settings(model="cdae", space="template"):
    s = preset("quick", model)
    grid = TPL_SHAPE if space == "template" else SHAPE
    m = replace(s.model, grid=grid, n_channels=12, normative_space="template", normative_template="tplTest",
                normative_template_shape=TPL_SHAPE, normative_template_affine=tuple(TPL_AFFINE.ravel()),
                score_reduction="sum", network_space=space)
    return replace(s, model=m, scoring=s.scoring.sized_to(0.008))


def _raw(sub):
    s0 = 1000.0 * sub.mask[..., None].astype(np.float32)
    return np.concatenate([s0, s0 * sub.data], -1), np.r_[0.0, BVALS], np.vstack([[0, 0, 0], BVECS])


def test_settings_tie_the_network_to_its_template_grid():
    model = _settings().model
    assert model.grid == model.normative_template_shape
    with pytest.raises(UsageError, match="network_space"):
        replace(model, network_space="mni")
    with pytest.raises(UsageError, match="template grid"):
        replace(model, grid=(16, 16, 16))
    with pytest.raises(UsageError, match="normative_space"):
        replace(preset("quick", "cdae").model, network_space="template")
    with pytest.raises(UsageError, match="network_space 'template'"):
        replace(preset("quick", "normative").model, normative_space="template", normative_template="tplTest",
                normative_template_shape=(16, 16, 16), normative_template_affine=tuple(TPL_AFFINE.ravel()),
                network_space="template")


def test_controls_box_covers_their_brains_and_carries_exactly():
    """Identity transforms: the brains (20x20x16 at 2 mm) sit 10/11/8 voxels into the template grid;
    the box covers them with its margin, its sides divisible by 2**depth, and a carried control is the
    control's own array moved by the box's offset (no interpolation: the grids align)."""
    sub = make_toy_subject(SHAPE, BVECS, 3)
    data = np.ascontiguousarray(np.moveaxis(sub.data, -1, 0), np.float32)
    route = TemplateRoute("tplTest", tuple(AFFINE.ravel()))
    model = controls_box(_settings().model, [sub.mask], [route], margin=2)
    div = 2 ** model.depth
    assert all(g % div == 0 for g in model.grid) and model.grid == model.normative_template_shape
    corner = np.reshape(model.normative_template_affine, (4, 4))[:3, 3]
    found = np.argwhere(sub.mask)
    low = found.min(0)
    # the box starts 2 voxels before the brain (in template voxels: the brain's offset is 10, 11, 8)
    assert np.allclose(corner, AFFINE[:3, 3] + 2.0 * (low - 2))
    assert all(g >= n + 4 for g, n in zip(model.grid, found.max(0) - low + 1))
    carried, brain, _ = carry_to_template(data, sub.mask, route, model)
    offset = (np.asarray(AFFINE[:3, 3]) - corner) / 2.0
    ox, oy, oz = (int(round(v)) for v in offset)
    back = carried[:, ox:ox + SHAPE[0], oy:oy + SHAPE[1], oz:oz + SHAPE[2]]
    inside = sub.mask
    assert brain.sum() == inside.sum()
    assert np.allclose(back[:, inside], data[:, inside], atol=1e-5)
    with pytest.raises(Exception, match="tplTest"):
        controls_box(_settings().model, [np.zeros(SHAPE, bool)], [route])


def test_trained_on_the_template_grid_scores_the_lesion_on_the_subjects_grid(tmp_path):
    """The whole path: controls carried to the template box, trained and referred there; a patient
    scored there and its score back on its own (dwi) grid, where its lesion is; the model file says
    where the network works and loads as it was saved."""
    subs = [make_toy_subject(SHAPE, BVECS, 100 + i) for i in range(5)]
    raws = [_raw(s) for s in subs]
    route = TemplateRoute("tplTest", tuple(AFFINE.ravel()))
    args = ([r[0] for r in raws], [r[1] for r in raws], [r[2] for r in raws], [s.mask for s in subs], list("abcde"))
    with pytest.raises(InputMissingError, match="tplTest"):
        train_from_dwi(_settings(), *args)
    bundle = train_from_dwi(_settings(), *args, routes=[route] * 5)
    m = bundle.settings.model
    assert m.network_space == "template" and m.grid != TPL_SHAPE and m.grid == m.normative_template_shape
    path = bundle.save(tmp_path)
    loaded = load_bundle(path)
    assert loaded.settings.model == m
    patient = make_toy_subject(SHAPE, BVECS, 900, lesion=True)
    dwi, bvals, bvecs = _raw(patient)
    with pytest.raises(InputMissingError):
        infer(loaded, dwi, bvals, bvecs, patient.mask)
    res = infer(loaded, dwi, bvals, bvecs, patient.mask, route=route)
    assert res.score.shape == SHAPE and res.info["network_grid"].startswith("tplTest")
    assert not res.score[~patient.mask].any() and res.score[patient.mask].any()
    inside = patient.mask
    # the lesion ranks above the healthy tissue: AUPRC above its prevalence by far
    prevalence = patient.lesion[inside].mean()
    assert auprc(res.score[inside], patient.lesion[inside]) > 3 * prevalence
    # the score comes back through the route's inverse chain: a way back that is not the way there
    # (8 mm along z) moves the lesion's score off the lesion
    wrong = TemplateRoute("tplTest", route.affine, (), (_translation(tmp_path / "z8.mat", 8.0),))
    moved = infer(loaded, dwi, bvals, bvecs, patient.mask, route=wrong)
    assert auprc(moved.score[inside], patient.lesion[inside]) < 0.8 * auprc(res.score[inside], patient.lesion[inside])


def _translation(path, mm):
    """An ANTs affine file translating by ``mm`` along z."""
    import ants

    tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3, translation=(0.0, 0.0, mm))
    ants.write_transform(tx, str(path))
    return str(path)


def test_model_file_with_a_bad_network_space_is_refused(tmp_path):
    subs = [make_toy_subject(SHAPE, BVECS, 100 + i) for i in range(3)]
    raws = [_raw(s) for s in subs]
    route = TemplateRoute("tplTest", tuple(AFFINE.ravel()))
    bundle = train_from_dwi(_settings(), [r[0] for r in raws], [r[1] for r in raws], [r[2] for r in raws],
                            [s.mask for s in subs], list("abc"), routes=[route] * 3)
    path = bundle.save(tmp_path)
    meta = json.loads(path.read_text())
    meta["settings"]["model"]["network_space"] = "mni"
    path.write_text(json.dumps(meta))
    with pytest.raises(Exception, match="network_space"):
        load_bundle(path)


def test_identity_carry_skips_the_resampling_with_the_same_values(monkeypatch):
    """Between two equal grids without transforms (a template-grid network's identity routes) the
    carry is the values where the support is at least one half, bit for bit what antsApplyTransforms'
    identity resampling gives; on another grid the resampling still runs."""
    import nibabel as nib

    from bids_uad.algorithms import registration as reg

    rng = np.random.default_rng(0)
    maps = rng.normal(size=(2, 20, 24, 18)).astype(np.float32)
    support = rng.random((20, 24, 18)) > 0.3
    target = nib.Nifti1Image(np.zeros((20, 24, 18), np.float32), AFFINE)
    stack = np.concatenate([maps * support, support[None].astype(np.float32)], 0)
    moved = np.moveaxis(np.asarray(reg.apply_transforms(nib.Nifti1Image(np.moveaxis(stack, 0, -1), AFFINE), target,
                                                        [], "linear").dataobj, np.float32), -1, 0)
    expected = np.where(moved[-1] >= 0.5, moved[:-1] / np.maximum(moved[-1], 1e-6), 0)
    calls = []
    real = reg.apply_transforms
    monkeypatch.setattr(reg, "apply_transforms", lambda *a, **k: calls.append(1) or real(*a, **k))
    out, inside = reg.carry_masked(maps, support, AFFINE, (20, 24, 18), AFFINE, [])
    assert not calls and np.array_equal(out, expected) and np.array_equal(inside, moved[-1] >= 0.5)
    reg.carry_masked(maps, support, AFFINE, (20, 24, 18), TPL_AFFINE, [])
    reg.carry_masked(maps, support, AFFINE, (10, 12, 9), AFFINE, [])
    assert len(calls) == 2
