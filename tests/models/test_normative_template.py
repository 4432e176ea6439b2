"""The normative model in template space: fitted on a template grid through each subject's transforms,
z back in diffusion space; no fallback when transforms are missing; the template grid in the model file."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from bids_uad.algorithms.registration import TemplateRoute
from bids_uad.errors import InputMissingError, UsageError
from bids_uad.models import get_model
from bids_uad.models.bundle import load_bundle, score_volume
from bids_uad.models.settings import preset
from bids_uad.scoring.inference import infer
from bids_uad.training.fit import train_from_dwi, train_model
from bids_uad.training.toydata import fibonacci_directions, make_toy_subject

GRID = (20, 20, 16)
BVECS = fibonacci_directions(12)
BVALS = np.full(12, 1000.0)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
AFFINE[:3, 3] = [-20.0, -22.0, -14.0]


def _settings(space="dwi", shape=GRID, affine=AFFINE, template="tplTest"):
    s = preset("quick", "normative")
    extra = {}
    if space == "template":
        extra = dict(normative_template=template, normative_template_shape=tuple(shape),
                     normative_template_affine=tuple(np.asarray(affine, float).ravel()))
    model = replace(s.model, grid=GRID, n_channels=12, normative_space=space, **extra)
    return replace(s, model=model, scoring=s.scoring.sized_to(0.008))


def _controls(n=5):
    subs = [make_toy_subject(GRID, BVECS, 100 + i) for i in range(n)]
    return [np.ascontiguousarray(np.moveaxis(s.data, -1, 0), np.float32) for s in subs], [s.mask for s in subs]


def _fit(settings, data, masks, routes=None):
    model = get_model("normative", settings.model)
    if routes is None:
        model.fit(data, masks, BVALS, BVECS)
    else:
        model.fit(data, masks, BVALS, BVECS, routes=routes)
    return model.eval()


def _translation(path, mm):
    """An ANTs affine file translating by ``mm`` along z (the same axis in RAS and LPS)."""
    import ants

    tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3, translation=(0.0, 0.0, mm))
    ants.write_transform(tx, str(path))
    return str(path)


def test_identity_route_reproduces_the_dwi_grid_fit():
    data, masks = _controls()
    on_grid = _fit(_settings(), data, masks)
    identity = TemplateRoute("tplTest", tuple(AFFINE.ravel()))  # no transforms: the template frame is the grid's
    in_template = _fit(_settings("template"), data, masks, [identity] * len(data))
    assert in_template.centre.shape == on_grid.centre.shape
    assert torch.equal(in_template.valid, on_grid.valid)
    assert torch.allclose(in_template.centre, on_grid.centre, atol=1e-5)
    assert torch.allclose(in_template.spread, on_grid.spread, rtol=1e-4, atol=1e-7)
    patient = make_toy_subject(GRID, BVECS, 900, lesion=True)
    x = np.moveaxis(patient.data, -1, 0)
    a, b = score_volume(on_grid, x), score_volume(in_template, x, route=identity)
    assert np.abs(a).max() > 1 and np.allclose(a, b, atol=1e-3)


def test_translated_route_carries_maps_there_and_back(tmp_path):
    """Subjects 4 mm (2 voxels) off the template along z, on a template grid 2 voxels larger each side
    (nothing is cut): fitted there, z comes back to each subject's grid with the inverse chain, so
    the scores equal the dwi-grid model's."""
    data, masks = _controls()
    shift = TemplateRoute("tplTest", tuple(AFFINE.ravel()), (_translation(tmp_path / "fwd.mat", 4.0),),
                          (_translation(tmp_path / "inv.mat", -4.0),))
    tpl_affine = AFFINE.copy()
    tpl_affine[2, 3] -= 4.0
    in_template = _fit(_settings("template", GRID[:2] + (GRID[2] + 4,), tpl_affine), data, masks, [shift] * len(data))
    on_grid = _fit(_settings(), data, masks)
    # away from the dwi grid's faces (where the toy brain touches them, the smoothing of the dwi-grid
    # model reflects at the face; on the larger template grid it does not)
    inner = (slice(4, -4),) * 3
    # the template-space centre is the dwi-grid one, moved 2 voxels along z (either way: ANTs' convention)
    md, there = on_grid.centre[1].numpy(), in_template.centre[1].numpy()
    moved = sorted(float(np.abs(there[..., k:k + GRID[2]][inner] - md[inner]).max()) for k in (0, 4))
    assert moved[0] < 1e-3 * np.median(md[md > 0]) < moved[1]
    patient = make_toy_subject(GRID, BVECS, 900, lesion=True)
    x = np.moveaxis(patient.data, -1, 0)
    a, b = score_volume(on_grid, x), score_volume(in_template, x, route=shift)
    # within 0.1 %: the spread floor (a quarter of the median spread) sees the grid faces too
    assert np.abs(a[inner]).max() > 1 and np.allclose(a[inner], b[inner], rtol=2e-3, atol=1e-3)
    # a chain that does not undo the way there (the forward one again) moves the z map 4 voxels: differs
    wrong = TemplateRoute("tplTest", shift.affine, shift.to_template, shift.to_template)
    assert not np.allclose(a[inner], score_volume(in_template, x, route=wrong)[inner], rtol=0.1, atol=0.1)


def test_missing_routes_are_refused_not_fallen_back_on():
    data, masks = _controls(3)
    model = get_model("normative", _settings("template").model)
    with pytest.raises(InputMissingError, match="template space"):
        model.fit(data, masks, BVALS, BVECS)
    identity = TemplateRoute("tplTest", tuple(AFFINE.ravel()))
    model.fit(data, masks, BVALS, BVECS, routes=[identity] * 3)
    with pytest.raises(InputMissingError):
        score_volume(model, data[0])
    with pytest.raises(Exception, match="tplOther"):
        score_volume(model, data[0], route=TemplateRoute("tplOther", identity.affine))


def test_template_settings_are_complete():
    with pytest.raises(UsageError, match="normative_template"):
        replace(preset("quick", "normative").model, normative_space="template")
    with pytest.raises(UsageError, match="normative_space"):
        replace(preset("quick", "normative").model, normative_space="mni")


def _raw(sub):
    s0 = 1000.0 * sub.mask[..., None].astype(np.float32)
    return np.concatenate([s0, s0 * sub.data], -1), np.r_[0.0, BVALS], np.vstack([[0, 0, 0], BVECS])


def test_model_file_round_trip_and_validation(tmp_path):
    subs = [make_toy_subject(GRID, BVECS, 100 + i) for i in range(4)]
    raws = [_raw(s) for s in subs]
    # template grid: coarser and elsewhere than the data's (3 mm, shifted): a real resampling each way
    tpl_affine = np.diag([3.0, 3.0, 3.0, 1.0])
    tpl_affine[:3, 3] = [-21.0, -24.0, -15.0]
    settings = _settings("template", (15, 15, 12), tpl_affine)
    routes = [TemplateRoute("tplTest", tuple(AFFINE.ravel()))] * 4  # dwi images' affine; moved onto the grid
    with pytest.raises(InputMissingError):
        train_from_dwi(settings, [r[0] for r in raws], [r[1] for r in raws], [r[2] for r in raws],
                       [s.mask for s in subs], list("abcd"))
    bundle = train_from_dwi(settings, [r[0] for r in raws], [r[1] for r in raws], [r[2] for r in raws],
                            [s.mask for s in subs], list("abcd"), routes=routes)
    assert bundle.folds[0].model.centre.shape == (3, 15, 15, 12)
    assert bundle.out_of_fold is not None and bundle.out_of_fold.level is not None
    path = bundle.save(tmp_path)
    loaded = load_bundle(path)
    m = loaded.settings.model
    assert (m.normative_space, m.normative_template, m.normative_template_shape) == ("template", "tplTest", (15, 15, 12))
    assert np.allclose(np.reshape(m.normative_template_affine, (4, 4)), tpl_affine)
    patient = make_toy_subject(GRID, BVECS, 900, lesion=True)
    dwi, bvals, bvecs = _raw(patient)
    with pytest.raises(InputMissingError, match="template space"):
        infer(loaded, dwi, bvals, bvecs, patient.mask)
    res = infer(loaded, dwi, bvals, bvecs, patient.mask, route=routes[0])
    again = infer(bundle, dwi, bvals, bvecs, patient.mask, route=routes[0])
    assert np.array_equal(res.score, again.score) and res.info["model_space"] == "tplTest"
    # (x1.87 with the score's median filter, x2.1 without; the filter raises its AUPRC 0.32 -> 0.41)
    assert res.score[patient.lesion].mean() > 1.6 * res.score[patient.mask & ~patient.lesion].mean()
    # the template grid is validated on load: a shape that is not the stored tensors' is refused
    meta = json.loads(path.read_text())
    meta["settings"]["model"]["normative_template_shape"] = [15, 15, 13]
    path.write_text(json.dumps(meta))
    with pytest.raises(Exception, match="centre|shape"):
        load_bundle(path)
    meta["settings"]["model"]["normative_template_affine"] = [1.0] * 15
    path.write_text(json.dumps(meta))
    with pytest.raises(Exception, match="normative_template"):
        load_bundle(path)


def test_dwi_grid_model_files_still_load(tmp_path):
    """Model files without normative_space (written before it existed) mean the dwi-grid model."""
    data, masks = _controls(3)
    bundle = train_model(_settings(), data, masks, list("abc"), BVALS, BVECS)
    path = bundle.save(tmp_path)
    meta = json.loads(path.read_text())
    for key in ("normative_space", "normative_template", "normative_template_shape", "normative_template_affine"):
        meta["settings"]["model"].pop(key)
    path.write_text(json.dumps(meta))
    loaded = load_bundle(path)
    assert loaded.settings.model.normative_space == "dwi"
    assert np.array_equal(score_volume(loaded.folds[0].model, data[0]), score_volume(bundle.folds[0].model, data[0]))


def test_controls_reference_carries_the_folds_centre_and_spread_back(tmp_path):
    """The controls' values on a subject's grid: the folds' centres/spreads averaged, back through the
    route's inverse chain (the score's own route); where the model has no data, not defined."""
    from bids_uad.models.baselines import NORMATIVE_METRICS, controls_reference

    data, masks = _controls()
    identity = TemplateRoute("tplTest", tuple(AFFINE.ravel()))
    folds = [_fit(_settings("template"), data[:4], masks[:4], [identity] * 4),
             _fit(_settings("template"), data[1:], masks[1:], [identity] * 4)]
    reference = controls_reference(folds, identity, GRID)
    assert list(reference) == list(NORMATIVE_METRICS)
    valid = (folds[0].valid.numpy() > 0) & (folds[1].valid.numpy() > 0)
    for k, key in enumerate(NORMATIVE_METRICS):
        centre, spread, defined = reference[key]
        assert np.array_equal(defined, valid)
        mean_centre = (folds[0].centre[k].numpy() + folds[1].centre[k].numpy()) / 2
        mean_spread = (folds[0].spread[k].numpy() + folds[1].spread[k].numpy()) / 2
        assert np.allclose(centre[valid], mean_centre[valid], rtol=1e-5, atol=1e-9)
        assert np.allclose(spread[valid], mean_spread[valid], rtol=1e-5, atol=1e-9)
    # a subject 4 mm off the template: the controls' MD comes back moved by the inverse chain
    shift = TemplateRoute("tplTest", tuple(AFFINE.ravel()), (_translation(tmp_path / "fwd.mat", 4.0),),
                          (_translation(tmp_path / "inv.mat", -4.0),))
    moved = controls_reference(folds, shift, GRID)["md"][0]
    centre = reference["md"][0]
    inner = (slice(4, -4),) * 2
    diffs = [np.abs(moved[inner + (slice(4 + d, -4 + d),)] - centre[inner + (slice(4, -4),)]).max() for d in (-2, 2)]
    assert min(diffs) < 1e-6 < max(diffs)
    with pytest.raises(Exception, match="template-space normative"):
        controls_reference([_fit(_settings(), data, masks)], identity, GRID)


def test_methods_text_follows_the_model_files_space():
    """The group report's methods clause says where the normative model was fitted, from the model file."""
    from bids_uad.models import describe_model
    from bids_uad.workflows.group import describe_training

    assert "template space" in describe_model("normative", {"normative_space": "template"})
    dwi_text = describe_model("normative", {"normative_space": "dwi"})
    assert "diffusion space, without registration" in dwi_text and "template" not in dwi_text
    older = describe_training("normative", {"settings": {"model": {}}, "folds": [0, 1]})[0][0]
    assert "without registration" in older  # older files have no normative_space: the dwi grid
    # a reconstruction network's clause says when its score is referred to the controls' in the template
    referred = describe_model("cdae", {"normative_space": "template", "normative_template": "MNI152NLin2009cAsym"})
    assert referred.startswith(describe_model("cdae")) and "referred to the controls'" in referred
    assert "MNI152NLin2009cAsym space" in referred and "grid" not in referred
    on_template = describe_model("cdae", {"normative_space": "template", "normative_template": "MNI152NLin2009cAsym",
                                          "network_space": "template"})
    assert "sees each subject on the MNI152NLin2009cAsym grid" in on_template
    assert describe_model("dae", {"normative_space": "dwi"}) == describe_model("dae")
    filtered = describe_model("normative", {"normative_space": "template", "score_median": 3})
    assert filtered.endswith("median-filtered over each brain voxel's 3x3x3 neighbourhood inside the brain")
    assert "median-filtered" not in describe_model("cdae", {"score_median": 1})
    # RecDiscNet's score (a probability) never is
    assert describe_model("recdisc", {"normative_space": "template"}) == describe_model("recdisc")
