"""Calibration of the written (post-processed) map and the post-processing itself."""
import numpy as np
from scipy import ndimage

from bids_uad.scoring.morphology import postprocess, remove_small_clusters
from bids_uad.models.calibration import calibrate, calibrate_written, left_out_nulls, written_fpr
from bids_uad.models.settings import ScoringSettings


def _healthy_maps(n, seed, shape=(40, 40, 30)):
    rng = np.random.default_rng(seed)
    return [ndimage.gaussian_filter(rng.normal(size=shape), 1.0).astype(np.float32) for _ in range(n)]


def test_remove_small_clusters_keeps_large_ones():
    m = np.zeros((10, 10, 10), bool)
    m[1, 1, 1] = True  # 1 voxel
    m[5:7, 5:7, 5:7] = True  # 8 voxels
    out = remove_small_clusters(m, 8)
    assert not out[1, 1, 1] and out[5:7, 5:7, 5:7].all()
    assert remove_small_clusters(m, 1).sum() == 9


def test_written_map_fpr_on_heldout_controls_is_within_half_to_twice_the_target():
    scoring = ScoringSettings(fpr=0.01, min_cluster_voxels=8)
    post = lambda b: postprocess(b, scoring)  # noqa: E731
    calib_maps, heldout = _healthy_maps(2, 0), _healthy_maps(4, 1)
    masks = [np.ones(m.shape, bool) for m in calib_maps]
    cal = calibrate(calib_maps, masks)
    # the voxel-wise 1 % threshold leaves the written map far below the target (most clusters are small)
    voxelwise = written_fpr(cal.threshold(0.01), heldout, masks + masks, post)
    calibrate_written(cal, calib_maps, masks, 0.01, post)
    assert cal.level > 0.01 and cal.target_fpr == 0.01
    measured = written_fpr(cal.threshold_for(0.01), heldout, masks + masks, post)
    assert 0.005 <= measured <= 0.02, measured
    assert voxelwise < measured


def test_a_one_millilitre_lesion_survives_post_processing():
    # 4 mm voxels (the demo's dwi): 0.5 mL minimum cluster = 7 voxels; a 1 mL ball is ~16 voxels
    scoring = ScoringSettings().sized_to(0.064)
    assert scoring.min_cluster_voxels == 7
    zz, yy, xx = np.mgrid[:20, :20, :20]
    ball = (zz - 10) ** 2 + (yy - 10) ** 2 + (xx - 10) ** 2 <= 1.6 ** 2
    assert 0.9 <= ball.sum() * 0.064 <= 1.6
    assert postprocess(ball, scoring).sum() == ball.sum()
    # the reference's 3x3x3 opening would erase it at this voxel size
    assert postprocess(ball, ScoringSettings(postprocess="opening")).sum() == 0


def test_finding_volume_is_larger_than_every_calibration_controls_largest_cluster():
    from bids_uad.models.calibration import calibrate_finding_volume
    from bids_uad.scoring.findings import min_finding_voxels

    scoring = ScoringSettings(fpr=0.01, min_cluster_voxels=4).sized_to(0.008)  # 2 mm voxels
    post = lambda b: postprocess(b, scoring)  # noqa: E731
    calib_maps = _healthy_maps(3, 0)
    masks = [np.ones(m.shape, bool) for m in calib_maps]
    cal = calibrate_written(calibrate(calib_maps, masks), calib_maps, masks, 0.01, post)
    calibrate_finding_volume(cal, calib_maps, masks, post, 0.008, familywise=0.05)
    t = cal.threshold(cal.level)
    largest = []
    for m in calib_maps:
        labels, n = ndimage.label(post(m > t), np.ones((3, 3, 3), bool))
        largest.append(np.bincount(labels.ravel())[1:].max() if n else 0)
    # fewer than 19 controls: one voxel more than the largest cluster of any of them
    assert cal.finding_min_ml == (max(largest) + 1) * 0.008
    # so no calibration control keeps a finding, while a lesion-sized cluster stays one
    assert min_finding_voxels(cal.finding_min_ml, 0.008) > max(largest)
    # a laxer family-wise rate takes a lower order statistic
    lax = calibrate_finding_volume(cal, calib_maps, masks, post, 0.008, familywise=0.6)
    assert lax.finding_min_ml == (sorted(largest)[1] + 1) * 0.008
    # without the written-map level there is nothing to calibrate at
    import pytest
    with pytest.raises(ValueError):
        calibrate_finding_volume(calibrate(calib_maps, masks), calib_maps, masks, post, 0.008)


def test_cross_fitted_calibrates_each_map_on_its_peers_only():
    from bids_uad.models.calibration import cross_fitted

    scoring = ScoringSettings(fpr=0.01, min_cluster_voxels=8)
    post = lambda b: postprocess(b, scoring)  # noqa: E731
    maps = _healthy_maps(3, 2)
    maps[2] = maps[2] * 3.0  # a control far noisier than the others
    masks = [np.ones(m.shape, bool) for m in maps]
    cals = cross_fitted(maps, masks, [[1, 2], [0, 2], [0, 1], [0]], 0.01, post, voxel_ml=0.008)
    assert len(cals) == 4 and all(c is not None for c in cals)
    # the same as calibrating on the peers alone
    alone = calibrate_written(calibrate(maps[:2], masks[:2]), maps[:2], masks[:2], 0.01, post)
    assert cals[2].threshold(cals[2].level) == alone.threshold(alone.level)
    assert cals[2].finding_min_ml is not None
    # in-sample, the noisy control flags about the target; held out (calibrated on the others) far more
    in_sample = calibrate_written(calibrate(maps, masks), maps, masks, 0.01, post, left_out=False)
    held_out = written_fpr(cals[2].threshold(cals[2].level), maps[2:], masks[2:], post)
    assert written_fpr(in_sample.threshold(in_sample.level), maps, masks, post) <= 0.01
    assert held_out > 0.05
    # a map whose only peer is itself gets no calibration
    assert cross_fitted(maps[:1], masks[:1], [[0]], 0.01, post) == [None]


def _varied_maps(n, rng, shape=(32, 32, 24)):
    """Healthy maps whose spread differs from subject to subject (log-normal, SD 0.25), as the
    networks' residuals of different brains do."""
    return [(ndimage.gaussian_filter(rng.normal(size=shape), 1.0) * np.exp(0.25 * rng.normal())).astype(np.float32)
            for _ in range(n)]


def test_left_out_nulls_leave_out_each_map_and_need_two():
    maps = [np.full((4, 4, 4), float(i), np.float32) for i in range(3)]
    masks = [np.ones((4, 4, 4), bool)] * 3
    nulls = left_out_nulls(maps, masks)
    assert [sorted(set(c.null.tolist())) for c in nulls] == [[1.0, 2.0], [0.0, 2.0], [0.0, 1.0]]
    assert left_out_nulls(maps[:1], masks[:1]) is None
    # each map contributes at most max_samples / n draws
    assert all(c.n == 2 * 10 for c in left_out_nulls(maps, masks, max_samples=30))
    # two maps of one subject (e.g. two training repeats) leave out together
    nulls = left_out_nulls(maps, masks, groups=["a", "a", "b"])
    assert [sorted(set(c.null.tolist())) for c in nulls] == [[2.0], [2.0], [0.0, 1.0]]
    assert left_out_nulls(maps, masks, groups=["a", "a", "a"]) is None
    import pytest
    with pytest.raises(ValueError):
        left_out_nulls(maps, masks, groups=["a", "b"])


def test_left_out_calibration_holds_the_target_for_new_subjects_where_in_sample_is_liberal():
    """Five calibration controls whose maps' spreads differ: the level set on their own pooled null
    lets new healthy subjects' written maps flag more than the target; counted with each control
    left out it holds it (mean over 40 draws of 5 controls and 10 new subjects)."""
    scoring = ScoringSettings(fpr=0.01, min_cluster_voxels=8)
    post = lambda b: postprocess(b, scoring)  # noqa: E731
    rates = {True: [], False: []}
    for seed in range(40):
        rng = np.random.default_rng(seed)
        calib, new = _varied_maps(5, rng), _varied_maps(10, rng)
        masks = [np.ones(calib[0].shape, bool)] * 10
        for left_out in (True, False):
            cal = calibrate_written(calibrate(calib, masks[:5]), calib, masks[:5], 0.01, post, left_out=left_out)
            rates[left_out].append(written_fpr(cal.threshold_for(0.01), new, masks, post))
            if left_out:
                assert cal.written_fpr_left_out <= 0.01
    assert 0.008 <= np.mean(rates[True]) <= 0.012, np.mean(rates[True])
    assert np.mean(rates[False]) > 0.012, np.mean(rates[False])


def test_one_calibration_map_is_counted_in_sample():
    scoring = ScoringSettings(fpr=0.01, min_cluster_voxels=8)
    post = lambda b: postprocess(b, scoring)  # noqa: E731
    maps = _healthy_maps(1, 3)
    masks = [np.ones(maps[0].shape, bool)]
    a = calibrate_written(calibrate(maps, masks), maps, masks, 0.01, post)
    b = calibrate_written(calibrate(maps, masks), maps, masks, 0.01, post, left_out=False)
    assert a.level == b.level and a.written_fpr_left_out is None
