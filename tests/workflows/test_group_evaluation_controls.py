"""The group evaluation's controls: written maps thresholded by a calibration they took no part in."""
from types import SimpleNamespace

import nibabel as nib
import numpy as np
from scipy import ndimage

from bids_uad.models.calibration import calibrate, calibrate_written
from bids_uad.models.settings import ScoringSettings
from bids_uad.scoring.morphology import postprocess
from bids_uad.workflows.group_evaluation import control_cases


def _scored(n_per_fold, seed=0, shape=(30, 30, 20)):
    rng = np.random.default_rng(seed)
    out = []
    for fold, n in enumerate(n_per_fold):
        for _ in range(n):
            score = ndimage.gaussian_filter(rng.normal(size=shape), 1.0).astype(np.float32)
            header = nib.Nifti1Image(np.zeros(shape, np.float32), np.diag([2.0, 2.0, 2.0, 1.0])).header
            arrays = {"analysis_mask": np.ones(shape, bool), "header": header, "subject": f"c{len(out)}"}
            out.append((arrays, SimpleNamespace(score=score, mask=score > 0.1), fold))
    return out


def _bundle(pooled, method="healthy-fpr"):
    scoring = ScoringSettings(fpr=0.01, min_cluster_voxels=4, threshold_method=method)
    return SimpleNamespace(settings=SimpleNamespace(scoring=scoring, training=SimpleNamespace(seed=0)),
                           out_of_fold=object() if pooled else None, name="m",
                           calibration=lambda ensemble=False, fold=None: None)


def test_out_of_fold_calibrated_controls_are_thresholded_by_the_other_folds():
    scored = _scored([2, 2, 1])
    bundle = _bundle(pooled=True)
    cases = control_cases(bundle, scored)
    post = lambda b: postprocess(b, bundle.settings.scoring)  # noqa: E731
    maps = [s[1].score for s in scored]
    masks = [s[0]["analysis_mask"] for s in scored]
    # control 4 (fold 2) is thresholded by a calibration over folds 0 and 1 alone
    cal = calibrate_written(calibrate(maps[:4], masks[:4]), maps[:4], masks[:4], 0.01, post)
    np.testing.assert_array_equal(cases[4].written, post(maps[4] > cal.threshold(cal.level)))
    assert all(c.written is not None and c.min_finding_voxels >= 1 for c in cases)
    assert not np.array_equal(cases[0].written, scored[0][1].mask)  # not inference's in-sample map


def test_fold_calibrated_controls_use_their_folds_other_controls_or_none():
    cases = control_cases(_bundle(pooled=False), _scored([2, 1]))
    assert cases[0].written is not None and cases[1].written is not None
    assert cases[2].written is None  # its fold held out no other control: no held-out figure


def test_uncalibrated_threshold_methods_keep_the_written_map():
    scored = _scored([1, 1])
    cases = control_cases(_bundle(pooled=True, method="otsu"), scored)
    np.testing.assert_array_equal(cases[0].written, scored[0][1].mask)


def test_a_control_scored_by_several_splits_never_calibrates_its_own_threshold():
    """training.repeats: each control is held out once per split, so it appears once per split among
    the scored controls; its written map is calibrated on the other controls only."""
    scored = _scored([2, 2, 1]) + _scored([1, 2, 2], seed=1)
    for j, (arrays, res, fold) in enumerate(scored[5:]):  # the second split: folds 3-5, the same 5 controls
        arrays["subject"] = f"c{[2, 0, 1, 3, 4][j]}"
        scored[5 + j] = (arrays, res, fold + 3)
    bundle = _bundle(pooled=True)
    cases = control_cases(bundle, scored)
    post = lambda b: postprocess(b, bundle.settings.scoring)  # noqa: E731
    maps = [s[1].score for s in scored]
    masks = [s[0]["analysis_mask"] for s in scored]
    # control c4 of fold 2: every other fold's maps but its own second-split map (fold 5, entry 9)
    peers = [j for j in range(10) if scored[j][2] != 2 and scored[j][0]["subject"] != "c4"]
    assert 9 not in peers and len(peers) == 8
    cal = calibrate_written(calibrate([maps[j] for j in peers], [masks[j] for j in peers]),
                            [maps[j] for j in peers], [masks[j] for j in peers], 0.01, post)
    np.testing.assert_array_equal(cases[4].written, post(maps[4] > cal.threshold(cal.level)))
