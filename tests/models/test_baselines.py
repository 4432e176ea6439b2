"""Baseline detectors (meansignal, normative) as registered, fitted, calibrated, saved models."""
import numpy as np
import pytest

from bids_uad.algorithms.tensor import fit_tensor, tensor_metrics_from_ratios
from bids_uad.scoring.inference import infer
from bids_uad.scoring.metrics import auroc
from bids_uad.models.bundle import load_bundle
from bids_uad.training.fit import train_from_dwi
from bids_uad.models.settings import preset
from bids_uad.training.toydata import fibonacci_directions, make_toy_subject
from dataclasses import replace

SHAPE = (20, 20, 16)
BVECS = fibonacci_directions(12)


def _raw(sub):
    s0 = 1000.0 * sub.mask[..., None].astype(np.float32)
    return np.concatenate([s0, s0 * sub.data], -1), np.r_[0.0, np.full(12, 1000.0)], np.vstack([[0, 0, 0], BVECS])


def test_tensor_metrics_from_ratios_match_dipy():
    sub = make_toy_subject(SHAPE, BVECS, 5)
    dwi, bvals, bvecs = _raw(sub)
    mine = tensor_metrics_from_ratios(np.moveaxis(sub.data, -1, 0), bvals[1:], bvecs[1:], sub.mask)
    ref = fit_tensor(dwi, bvals, bvecs, sub.mask, fit_method="OLS")
    inside = sub.mask & (ref["md"] > 0)
    assert np.corrcoef(mine["fa"][inside], ref["fa"][inside])[0, 1] > 0.95
    assert np.corrcoef(mine["md"][inside], ref["md"][inside])[0, 1] > 0.95
    assert np.allclose(mine["mdw"][inside], sub.data[inside].mean(-1), atol=1e-5)


def test_baselines_fit_calibrate_save_load_and_detect(tmp_path):
    controls = [make_toy_subject(SHAPE, BVECS, 100 + i) for i in range(5)]
    patient = make_toy_subject(SHAPE, BVECS, 900, lesion=True, severity=1.0)
    raws = [_raw(c) for c in controls]
    for name in ("normative", "meansignal"):
        s = preset("quick", name)
        s = replace(s, model=replace(s.model, grid=(24, 24, 16), n_channels=12), scoring=s.scoring.sized_to(0.008))
        bundle = train_from_dwi(s, [r[0] for r in raws], [r[1] for r in raws], [r[2] for r in raws],
                                [c.mask for c in controls], [f"c{i}" for i in range(5)])
        assert all(f.calibration is not None and f.calibration.level is not None for f in bundle.folds)
        bundle.save(tmp_path)
        loaded = load_bundle(tmp_path / f"model-{name}.json")
        assert loaded.folds[0].calibration.level == bundle.folds[0].calibration.level
        # the model that is used is calibrated on every control's out-of-fold scores, saved and loaded
        oof = bundle.out_of_fold
        assert oof is not None and oof.n == sum(f.calibration.n for f in bundle.folds)
        assert bundle.calibration() is oof and bundle.calibration(ensemble=True) is oof
        assert bundle.calibration(fold=1) is bundle.folds[1].calibration
        assert loaded.out_of_fold.level == oof.level and np.array_equal(loaded.out_of_fold.null, oof.null)
        # the smallest finding is calibrated on the same controls, saved and loaded
        assert oof.finding_min_ml is None or oof.finding_min_ml > 0
        assert loaded.out_of_fold.finding_min_ml == oof.finding_min_ml
        dwi, bvals, bvecs = _raw(patient)
        res = infer(loaded, dwi, bvals, bvecs, patient.mask)
        again = infer(bundle, dwi, bvals, bvecs, patient.mask)
        assert np.array_equal(res.score, again.score)
        assert res.method == "healthy-fpr" and res.info["threshold_source"].startswith("model file")
        assert res.threshold == oof.threshold_for(s.scoring.fpr) and res.info["calibration"].startswith("out-of-fold")
        assert res.info["finding_min_volume_ml"] == (None if oof.finding_min_ml is None
                                                     else max(oof.finding_min_ml, s.scoring.min_cluster_ml))
        fixed = infer(loaded, dwi, bvals, bvecs, patient.mask, method="fixed")  # no reference value: model file's
        assert fixed.method == "healthy-fpr" and "no reference value" in fixed.info["threshold_source"]
        # toy brains differ in anatomy from seed to seed, which blurs a voxelwise normative model
        floor = {"normative": 0.65, "meansignal": 0.7}[name]
        assert auroc(res.score[patient.mask], patient.lesion[patient.mask]) > floor, name


@pytest.mark.parametrize("n", [1, 4, 5, 108])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nanmedian_is_numpys(n, dtype):
    """The normative statistics' median equals np.nanmedian bit for bit: odd and even counts of
    valid values, voxels with none (NaN), both float widths."""
    import warnings

    from bids_uad.algorithms.robust import nanmedian

    rng = np.random.default_rng(n)
    values = rng.normal(size=(2, n, 6, 5, 4)).astype(dtype)
    values[rng.random(values.shape) < 0.3] = np.nan
    values[:, :, 0] = np.nan  # no subject there
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = np.nanmedian(values, axis=1)
    got = nanmedian(values, 1)
    assert got.dtype == want.dtype and np.array_equal(got, want, equal_nan=True)


def test_every_models_score_ends_with_its_median_filter():
    """score_volume's last step is the masked median filter of ``model.score_median`` (the
    calibration, the thresholds and the evaluation all see the filtered map); width 1 is the raw score."""
    from bids_uad.algorithms.robust import masked_median_filter
    from bids_uad.models import get_model
    from bids_uad.models.bundle import score_volume

    rng = np.random.default_rng(3)
    data = rng.uniform(0.2, 0.9, size=(4, 10, 11, 9)).astype(np.float32)
    data[:, :2] = 0  # outside the brain
    brain = data.mean(0) > 0
    raw_settings = replace(preset("quick", "meansignal").model, score_median=1)
    raw = score_volume(get_model("meansignal", raw_settings), data)
    assert np.array_equal(raw, np.where(brain, 1 - data.mean(0), 0))
    filtered = score_volume(get_model("meansignal", replace(raw_settings, score_median=3)), data)
    assert np.array_equal(filtered, masked_median_filter(raw, brain, 3)) and not np.array_equal(filtered, raw)
    assert (filtered[~brain] == 0).all()
