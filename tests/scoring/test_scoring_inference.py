"""End to end on toy arrays: train a quick model, infer on a lesion subject, evaluate."""
from dataclasses import replace

import numpy as np
import pytest

from bids_uad.errors import InputValidationError
from bids_uad.models.bundle import load_bundle
from bids_uad.models.settings import preset
from bids_uad.scoring.inference import evaluate, infer
from bids_uad.training.fit import train_from_dwi
from bids_uad.training.toydata import fibonacci_directions, make_toy_subject

BVECS = fibonacci_directions(16)


def _raw(sub, order=None):
    order = np.arange(len(BVECS)) if order is None else order
    s0 = 900.0 * sub.mask[..., None]
    dwi = np.concatenate([s0, s0 * sub.data[..., order]], -1)
    return dwi, np.r_[0.0, np.full(len(order), 1000.0)], np.vstack([[0, 0, 0], BVECS[order]])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    s = preset("quick", "dae")
    s = replace(s, model=replace(s.model, n_channels=16), training=replace(s.training, epochs=3))
    subs = [make_toy_subject((15, 14, 16), BVECS, i) for i in range(4)]
    raws = [_raw(x) for x in subs]
    b = train_from_dwi(s, [r[0] for r in raws], [r[1] for r in raws], [r[2] for r in raws],
                       [x.mask for x in subs], [f"c{i}" for i in range(4)])
    b.save(tmp_path_factory.mktemp("model"))
    return load_bundle(b.path)


def test_infer_maps_back_to_input_shape(bundle):
    sub = make_toy_subject((18, 13, 15), BVECS, 50, lesion=True)  # crop one axis, pad the others
    dwi, bvals, bvecs = _raw(sub)
    amask = sub.mask & (sub.dseg != 1)
    res = infer(bundle, dwi, bvals, bvecs, sub.mask, amask)
    assert res.score.shape == res.mask.shape == res.pvalues.shape == sub.mask.shape
    assert not np.any(res.mask & ~amask) and not np.any(res.mask_raw & ~amask)
    assert np.all(res.score[~amask] == 0) and np.all(res.pvalues[~amask] == 1)
    assert 0 < res.pvalues.min() and res.pvalues.max() <= 1
    assert res.method == "healthy-fpr" and res.info["model_sha256"] == bundle.file_hash
    # channel order of the input does not matter
    perm = np.random.default_rng(0).permutation(len(BVECS))
    res2 = infer(bundle, *_raw(sub, perm), sub.mask, amask)
    assert res2.info["gradient_reconciliation"] == "permutation"
    np.testing.assert_array_equal(res.score, res2.score)
    ens = infer(bundle, dwi, bvals, bvecs, sub.mask, amask, method="fdr", ensemble=True)
    assert ens.info["folds"] == [0, 1, 2] and ens.method == "fdr"
    with pytest.raises(InputValidationError):
        infer(bundle, dwi, np.r_[0.0, np.full(16, 2000.0)], bvecs, sub.mask)


def test_evaluate_reports_every_method(bundle):
    sub = make_toy_subject((16, 16, 16), BVECS, 60, lesion=True)
    res = infer(bundle, *_raw(sub), sub.mask)
    out = evaluate(res.score, sub.lesion, sub.mask, "dae", bundle.settings.scoring, bundle.calibration())
    assert 0 <= out["auroc"] <= 1 and 0 <= out["auprc"] <= 1
    names = {"fixed", "otsu", "meanpool", "healthy-fpr", "fdr", "oracle-youden", "oracle-dice"}
    assert set(out["dice"]) == set(out["dice_written"]) == set(out["fpr"]) == names
    assert out["dice"]["oracle-dice"] >= max(v for k, v in out["dice"].items() if not k.startswith("oracle"))


def test_ensemble_default_comes_from_the_model_file(bundle):
    """``ensemble=None`` follows ``scoring.ensemble`` of the model file; an explicit value overrides it;
    the ensemble's score is the mean of the folds' scores."""
    from bids_uad.models.bundle import score_volume
    from bids_uad.models.inputs import prepare_subject
    from bids_uad.scoring.inference import score_grid

    sub = make_toy_subject((16, 16, 16), BVECS, 61, lesion=True)
    dwi, bvals, bvecs = _raw(sub)
    single = infer(bundle, dwi, bvals, bvecs, sub.mask)
    assert single.info["ensemble"] is False and single.info["folds"] == [bundle.best_fold()]
    on = replace(bundle.settings.scoring, ensemble=True)
    ens = infer(bundle, dwi, bvals, bvecs, sub.mask, scoring=on)
    assert ens.info["ensemble"] is True and ens.info["folds"] == [0, 1, 2]
    assert not np.array_equal(ens.score, single.score)
    off = infer(bundle, dwi, bvals, bvecs, sub.mask, scoring=on, ensemble=False)
    np.testing.assert_array_equal(off.score, single.score)
    one = infer(bundle, dwi, bvals, bvecs, sub.mask, scoring=on, fold=1)  # an explicit fold is that fold
    assert one.info["folds"] == [1]
    prepared = prepare_subject(dwi, bvals, bvecs, sub.mask, bundle.settings.model.grid,
                               bundle.ref_bvals, bundle.ref_bvecs)
    mean = np.mean([score_volume(f.model, prepared.data) for f in bundle.folds], axis=0)
    np.testing.assert_allclose(score_grid(bundle, prepared.data, ensemble=True), mean, rtol=1e-5, atol=1e-6)


def test_ensemble_setting_is_validated():
    from bids_uad.errors import UsageError
    from bids_uad.models.settings import ScoringSettings, Settings

    with pytest.raises(UsageError, match="ensemble"):
        ScoringSettings(ensemble="yes")
    s = Settings(scoring=ScoringSettings(ensemble=True))
    assert Settings.from_dict(s.to_dict()).scoring.ensemble is True
    assert Settings.from_dict({}).scoring.ensemble is False  # older model files: the best fold
