"""A network's score referred to its controls' in template space (bids_uad.models.normaliser):
fitted per fold from the controls it trained on (scored out of fold), saved and loaded with the
model, applied through the subject's route, never silently skipped."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from bids_uad.algorithms.registration import TemplateRoute
from bids_uad.algorithms.robust import robust_spread
from bids_uad.errors import InputValidationError, UsageError
from bids_uad.models import get_model, has_score_reference
from bids_uad.models.bundle import filtered_score, load_bundle, refer_score, score_volume, signed_score
from bids_uad.models.normaliser import ScoreNormaliser, ensemble_z, normaliser_of, robust_scale
from bids_uad.models.settings import needs_template, preset
from bids_uad.models.validate import validate_model_file
from bids_uad.scoring.inference import score_grid
from bids_uad.training.fit import train_model
from bids_uad.training.normalise import splits
from bids_uad.training.trainer import calibrate_out_of_fold
from bids_uad.training.toydata import fibonacci_directions, make_toy_subject

GRID = (16, 16, 16)
BVECS = fibonacci_directions(12)
BVALS = np.full(12, 1000.0)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
IDENTITY = TemplateRoute("tplTest", tuple(AFFINE.ravel()))  # no transforms: the template frame is the grid's


def _model_settings(name="cdae", space="template"):
    s = preset("quick", name)
    extra = {}
    if space == "template":
        extra = dict(normative_template="tplTest", normative_template_shape=GRID,
                     normative_template_affine=tuple(AFFINE.ravel()))
    return replace(s.model, grid=GRID, n_channels=12, normative_space=space, **extra)


def _settings(name="cdae"):
    s = preset("quick", name)
    return replace(s, model=_model_settings(name), training=replace(s.training, epochs=2, processes=1),
                   scoring=s.scoring.sized_to(0.008))


def _x(subject):
    return np.ascontiguousarray(np.moveaxis(subject.data, -1, 0), np.float32)


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    subs = [make_toy_subject(GRID, BVECS, 200 + i) for i in range(5)]
    data, masks = [_x(s) for s in subs], [s.mask for s in subs]
    bundle = train_model(_settings(), data, masks, [f"c{i}" for i in range(5)], BVALS, BVECS,
                         routes=[IDENTITY] * 5)
    return bundle, data, masks


def _check_references(folds, data):
    """Each fold's scale is its held-out controls' raw scores and its reference the scaled scores of the
    controls it trained on, each scored by the fold of the same split that held it out."""
    brains = [d.mean(0) > 0 for d in data]
    held_by = {i: f for f in folds for i in f.val_idx}
    assert sorted(held_by) == list(range(len(data)))  # every control scored out of fold once
    raw = {i: score_volume(f.model, data[i], raw=True) for i, f in held_by.items()}
    for f in folds:
        norm = normaliser_of(f.model)
        assert norm is not None and norm.fitted
        # the fold's scale: its held-out controls' raw scores
        location, spread = robust_scale([raw[i] for i in f.val_idx], [brains[i] for i in f.val_idx])
        assert np.allclose(norm.scale.numpy(), [location, spread], rtol=1e-6)
        # its reference: its training controls' scores, each scaled by the fold that held it out;
        # its held-out controls take no part
        expected = ScoreNormaliser(f.model.settings)
        maps = []
        for i in f.train_idx:
            values, support = normaliser_of(held_by[i].model).to_template(raw[i], brains[i], IDENTITY)
            maps.append(np.where(support, values, np.nan))
        expected.set_reference(maps)
        assert torch.equal(expected.centre, norm.centre) and torch.equal(expected.spread, norm.spread)
        assert not set(f.val_idx) & set(f.train_idx)
    return raw


def test_each_fold_refers_to_the_controls_it_trained_on(trained):
    bundle, data, masks = trained
    raw = _check_references(bundle.folds, data)
    # one score scale for every fold (robust z): the out-of-fold calibration pools every control
    assert bundle.out_of_fold is not None and bundle.calibration() is bundle.out_of_fold
    # the calibrations reuse the reference fit's forward passes: the same as scoring the controls again
    again = calibrate_out_of_fold(bundle.settings, bundle.folds, data, masks, None, [IDENTITY] * 5)
    assert again.level == bundle.out_of_fold.level and again.n == bundle.out_of_fold.n
    for f in bundle.folds:
        referred = [score_volume(f.model, data[i], route=IDENTITY) for i in f.val_idx]
        assert all(np.array_equal(refer_score(f.model, raw[i], data[i], IDENTITY), m)
                   for i, m in zip(f.val_idx, referred))


def test_repeated_k_fold_trainings_each_fit_their_own_references(trained):
    """training.repeats = 2: two k-fold trainings with other splits and initialisations; each split's
    folds are referred as one k-fold training's, every fold joins the ensemble, and the out-of-fold
    calibration pools every control once per split."""
    _, data, masks = trained
    base = _settings()
    settings = replace(base, training=replace(base.training, repeats=2))
    bundle = train_model(settings, data, masks, [f"c{i}" for i in range(5)], BVALS, BVECS, routes=[IDENTITY] * 5)
    assert [f.fold for f in bundle.folds] == list(range(6))
    groups = splits(bundle.folds)
    assert [[f.fold for f in g] for g in groups] == [[0, 1, 2], [3, 4, 5]]
    assert [sorted(f.val_idx) for f in groups[0]] != [sorted(f.val_idx) for f in groups[1]]  # another split
    assert not torch.equal(next(groups[0][0].model.parameters()), next(groups[1][0].model.parameters()))
    for group in groups:
        _check_references(group, data)
    one = train_model(base, data, masks, [f"c{i}" for i in range(5)], BVALS, BVECS, routes=[IDENTITY] * 5)
    assert bundle.out_of_fold.n == 2 * one.out_of_fold.n  # every control's healthy voxels, once per split
    assert [f.val_idx for f in one.folds] == [f.val_idx for f in groups[0]]  # the first split is repeats = 1's
    ens = score_grid(bundle, data[0], ensemble=True, route=IDENTITY)
    assert ens.shape == GRID and np.isfinite(ens).all()


def test_score_is_a_positive_robust_z_that_rises_in_a_lesion(trained):
    bundle, data, _ = trained
    fold = bundle.folds[bundle.best_fold()]
    patient = make_toy_subject(GRID, BVECS, 990, lesion=True)
    x = _x(patient)
    z = score_volume(fold.model, x, route=IDENTITY)
    brain = x.mean(0) > 0
    assert z.min() >= 0 and np.all(z[~brain] == 0)
    lesion = patient.lesion & brain
    assert lesion.sum() > 5
    assert np.median(z[lesion]) > 2 * np.median(z[brain & ~lesion])
    # the held-out controls of this fold: their z is of the order of 1, not of the raw score's scale
    for i in fold.val_idx:
        healthy = score_volume(fold.model, data[i], route=IDENTITY)[data[i].mean(0) > 0]
        assert np.median(healthy) < 1.5


def _folds_z(shape, k, rho, seed):
    """``k`` fold z maps (1, X, Y, Z) of one healthy subject: unit normal each, correlated by ``rho``."""
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal(shape)
    return [(np.sqrt(rho) * shared + np.sqrt(1 - rho) * rng.standard_normal(shape))[None].astype(np.float32)
            for _ in range(k)]


def test_the_fold_ensemble_keeps_one_folds_null_scale():
    """The mean of partly independent folds' z is narrower than one fold's; a level calibrated on
    single folds' out-of-fold maps would flag too few of its voxels.  ensemble_z puts it back."""
    shape, rho = (40, 40, 30), 0.3
    maps = _folds_z(shape, 3, rho, 0)
    keep = np.ones(shape, bool)
    mean, ratio = ensemble_z(maps, [keep] * 3)
    expected = np.sqrt((1 + 2 * rho) / 3)  # the plain mean's spread
    assert abs(robust_spread(np.mean(maps, 0)) - expected) < 0.03
    assert abs(ratio[0] - expected) < 0.03 and abs(robust_spread(mean) - 1) < 0.03
    level = np.percentile(np.abs(maps[0]), 99)  # one fold's 1 % level
    assert abs(np.mean(np.abs(mean) >= level) - 0.01) < 0.002
    assert np.mean(np.abs(np.mean(maps, 0)) >= level) < 0.002  # the plain mean: far below 1 %
    # a lesion the folds agree on stands out more; a scan twice as noisy keeps the ratio
    lesion = [m.copy() for m in maps]
    for m in lesion:
        m[0, :8, :8, :8] += 4
    assert np.median(ensemble_z(lesion, [keep] * 3)[0][0, :8, :8, :8]) > 4.5
    assert np.allclose(ensemble_z([2 * m for m in maps], [keep] * 3)[1], ratio, rtol=1e-6)
    # one fold, or too few common voxels: unchanged
    one, r1 = ensemble_z(maps[:1], [keep])
    assert np.array_equal(one, maps[0]) and r1.tolist() == [1.0]
    few = np.zeros(shape, bool)
    few[:5, :5, :5] = True
    assert ensemble_z(maps, [few] * 3)[1].tolist() == [1.0]


def test_the_ensemble_score_is_the_rescaled_mean_of_the_folds_signed_z(trained):
    bundle, data, _ = trained
    patient = _x(make_toy_subject(GRID, BVECS, 991, lesion=True))
    details = {}
    score = score_grid(bundle, patient, ensemble=True, route=IDENTITY, details=details)
    maps, keeps = zip(*(signed_score(f.model, patient, IDENTITY) for f in bundle.folds))
    mean, ratio = ensemble_z(maps, keeps)
    folded = normaliser_of(bundle.folds[0].model).fold(mean)
    np.testing.assert_array_equal(score, filtered_score(bundle.folds[0].model, folded, patient.mean(0) > 0))
    assert not np.array_equal(score, folded)  # the score's median filter, last, as for a single fold
    assert details["ensemble_scale"] == [round(float(r), 4) for r in ratio] and 0 < ratio[0] < 1.2
    # a single fold is its own score, as the calibration saw it
    for f in bundle.folds:
        np.testing.assert_array_equal(score_grid(bundle, patient, fold=f.fold, route=IDENTITY),
                                      score_volume(f.model, patient, route=IDENTITY))


def test_round_trip_keeps_the_reference(trained, tmp_path):
    bundle, data, _ = trained
    path = bundle.save(tmp_path)
    checked = validate_model_file(path)
    assert any(k.endswith("normaliser.centre") for k in checked.shapes)
    loaded = load_bundle(path)
    assert needs_template(loaded.settings.model)
    for f0, f1 in zip(bundle.folds, loaded.folds):
        assert np.array_equal(score_volume(f0.model, data[0], route=IDENTITY),
                              score_volume(f1.model, data[0], route=IDENTITY))


def test_a_model_file_with_an_unfitted_reference_is_refused_at_start_up(trained, tmp_path):
    """Checked with the model file (start-up, --model), not first at inference: one line, exit 16."""
    import copy

    bundle = copy.deepcopy(trained[0])
    normaliser_of(bundle.folds[1].model).scale.zero_()
    path = bundle.save(tmp_path)
    with pytest.raises(InputValidationError, match=r"fold1\.normaliser\.scale.*never fitted") as err:
        validate_model_file(path)
    assert err.value.exit_code == 16 and "\n" not in str(err.value)


def test_never_silently_raw():
    """An unfitted reference, or a subject without its route, is refused, never passed through."""
    model = get_model("cdae", _model_settings())
    x = _x(make_toy_subject(GRID, BVECS, 5))
    with pytest.raises(InputValidationError, match="never fitted"):
        score_volume(model, x, route=IDENTITY)
    normaliser_of(model).set_scale(0.0, 1.0)
    with pytest.raises(InputValidationError, match="transforms are needed"):
        score_volume(model, x)
    assert score_volume(model, x, raw=True).shape == GRID  # what the reference is fitted on


def test_a_signed_score_is_referred_two_sided():
    """score_reduction "sum": the residual's signed channel sum, centred per voxel on the controls'
    before its magnitude is taken; a value far *below* the controls' (a lesion moving the residual
    against the network's usual bias there) scores as high as one far above.  A magnitude score
    keeps the positive z.  The signed score needs a reference and dw inputs."""
    from bids_uad.models.blocks import residual_score

    x, recon = torch.zeros(1, 3, 2, 2, 2), torch.zeros(1, 3, 2, 2, 2)
    recon[:, 0], recon[:, 1] = 0.5, -0.2
    torch.testing.assert_close(residual_score(recon, x, "sum"), torch.full((1, 2, 2, 2), 0.3))
    brain = np.ones(GRID, bool)
    controls = [np.random.default_rng(i).normal(1.0, 0.1, GRID).astype(np.float32) for i in range(6)]
    subject = np.ones(GRID, np.float32)
    subject[4:8, 4:8, 4:8], subject[10:14, 10:14, 10:14] = -1.0, 3.0  # 20 spreads below, above
    z = {}
    for reduction in ("sum", "abs-sum"):
        norm = ScoreNormaliser(replace(_model_settings(), score_reduction=reduction))
        norm.set_scale(0.0, 1.0)
        norm.set_reference([np.where(brain, c, np.nan) for c in controls])
        z[reduction] = norm.zscore(subject, brain, IDENTITY)
    below, above = z["sum"][5, 5, 5], z["sum"][11, 11, 11]
    assert below > 10 and above > 10 and abs(below - above) < 0.2 * above
    assert z["abs-sum"][5, 5, 5] == 0 and z["abs-sum"][11, 11, 11] > 10
    for bad in ({"normative_space": "dwi", "normative_template": "", "normative_template_shape": (0, 0, 0),
                 "normative_template_affine": ()}, {"inputs": "invariant", "n_channels": 5}):
        with pytest.raises(UsageError, match="score_reduction 'sum'"):
            replace(_model_settings(), score_reduction="sum", **bad)


def test_a_signed_score_of_both_inputs_refers_its_two_maps_apart(tmp_path):
    """Inputs "both" with the signed score: the dw volumes' and the features' residual sums are two
    raw maps, each with its own scale and per-voxel reference (buffers with a leading axis of 2),
    the score the larger |z|; the model file round-trips and an unfitted second map is refused."""
    import copy

    from bids_uad.models.blocks import residual_score
    from bids_uad.models.inputs import invariant_features

    settings = replace(_model_settings(), inputs="both", n_channels=16, feature_channels=4, invariant_sh_order=2,
                       score_reduction="sum")
    assert settings.n_score_maps == 2
    x, recon = torch.zeros(1, 16, 2, 2, 2), torch.zeros(1, 16, 2, 2, 2)
    recon[:, :12], recon[:, 12] = 0.1, -0.5
    torch.testing.assert_close(residual_score(recon, x, "sum", 4)[0, :, 0, 0, 0], torch.tensor([1.2, -0.5]))

    norm = ScoreNormaliser(settings)
    assert tuple(norm.scale.shape) == (2, 2) and tuple(norm.centre.shape) == (2,) + GRID
    brain = np.ones(GRID, bool)
    controls = [np.random.default_rng(i).normal([[[[1.0]]], [[[-2.0]]]], 0.1, (2,) + GRID).astype(np.float32)
                for i in range(6)]
    location, spread = robust_scale(controls, [brain] * 6)
    assert np.allclose(location, [1.0, -2.0], atol=0.02) and np.allclose(spread, 0.1, rtol=0.1)
    norm.set_scale(location, spread)
    norm.set_reference([np.where(brain, norm.to_template(c, brain, IDENTITY)[0], np.nan) for c in controls])
    patient = np.stack([np.full(GRID, 1.0), np.full(GRID, -2.0)]).astype(np.float32)
    patient[1, 4:8, 4:8, 4:8] = -4.0  # only the features' sum moves, below the controls'
    z = norm.zscore(patient, brain, IDENTITY)
    assert z[5, 5, 5] > 10 and np.median(z) < 2

    subs = [make_toy_subject(GRID, BVECS, 300 + i) for i in range(5)]
    data = [np.concatenate([_x(t), np.moveaxis(invariant_features(t.data, BVALS, BVECS, t.mask, BVALS, 2), -1, 0)])
            for t in subs]
    s = _settings()
    bundle = train_model(replace(s, model=settings), data, [t.mask for t in subs], [f"c{i}" for i in range(5)],
                         BVALS, BVECS, routes=[IDENTITY] * 5)
    loaded = load_bundle(bundle.save(tmp_path / "a"))
    m = loaded.folds[0].model
    assert normaliser_of(m).fitted and tuple(normaliser_of(m).scale.shape) == (2, 2)
    assert score_volume(m, data[0], raw=True).shape == (2,) + GRID
    assert np.array_equal(score_volume(m, data[0], route=IDENTITY),
                          score_volume(bundle.folds[0].model, data[0], route=IDENTITY))
    broken = copy.deepcopy(bundle)
    normaliser_of(broken.folds[0].model).scale[1, 1] = 0
    with pytest.raises(InputValidationError, match="never fitted"):
        validate_model_file(broken.save(tmp_path / "b"))


def test_which_models_have_a_reference():
    assert has_score_reference("cdae") and has_score_reference("dae") and has_score_reference("cevae")
    # RecDiscNet's score is a probability; the baselines are not networks
    assert not has_score_reference("recdisc") and not has_score_reference("normative")
    with pytest.raises(UsageError, match="recdisc"):
        get_model("recdisc", _model_settings("recdisc"))
    with pytest.raises(UsageError, match="meansignal"):
        _model_settings("meansignal")
    assert normaliser_of(get_model("cdae", _model_settings(space="dwi"))) is None


def test_a_location_where_every_control_scores_high_is_normal():
    """The point of the reference: a raw score that is high at one place in every control (a hard
    to reconstruct structure) gives a z near 0 there; a rise that only the patient has stands out."""
    settings = _model_settings()
    rng = np.random.default_rng(0)
    brain = np.zeros(GRID, bool)
    brain[2:14, 2:14, 2:14] = True
    hard = np.zeros(GRID, bool)
    hard[5:12, 5:12, 5:12] = True

    def raw_map(extra=None):
        m = rng.normal(1.0, 0.3, GRID) + 1.5 * hard  # a 5-sigma rise at one place in every brain
        if extra is not None:
            m = m + 1.5 * extra
        return np.where(brain, m, 0).astype(np.float32)

    norm = ScoreNormaliser(settings)
    controls = [raw_map() for _ in range(6)]
    norm.set_scale(*robust_scale(controls, [brain] * 6))
    maps = []
    for m in controls:
        values, support = norm.to_template(m, brain, IDENTITY)
        maps.append(np.where(support, values, np.nan))
    norm.set_reference(maps)
    lesion = np.zeros(GRID, bool)
    lesion[2:5, 2:5, 2:5] = True
    patient = raw_map(lesion)
    z = norm.zscore(patient, brain, IDENTITY)
    core = np.zeros(GRID, bool)
    core[7:10, 7:10, 7:10] = True  # inside the hard structure, away from its smoothed edge
    assert np.median(norm.scaled(patient)[core]) > 3.0  # on the common scale alone it would stand out
    assert np.median(z[core]) < 1.0
    assert np.median(z[lesion]) > 3.0


def test_methods_text_names_each_models_calibration():
    """The group report's methods say, per model file, where its null sample came from."""
    from bids_uad.workflows.group import describe_training

    referred = {"settings": {"model": {"normative_space": "template", "normative_template": "tplTest"}},
                "folds": [0, 1, 2], "calibration": {"method": "out-of-fold"}}
    text = " ".join(t for t, _ in describe_training("cdae", referred))
    assert "referred to the controls'" in text and "every control's out-of-fold scores" in text
    raw = {"settings": {"model": {"normative_space": "dwi"}}, "folds": [0, 1, 2], "calibration": None}
    text = " ".join(t for t, _ in describe_training("recdisc", raw))
    assert "the selected fold's held-out controls" in text and "out-of-fold" not in text
    assert "3-fold cross-validation in" in text
    repeated = dict(referred, settings={**referred["settings"], "training": {"repeats": 2}}, folds=list(range(6)))
    text = " ".join(t for t, _ in describe_training("cdae", repeated))
    assert "3-fold cross-validation repeated 2 times with other splits (all networks averaged)" in text
