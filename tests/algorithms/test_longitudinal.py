"""Longitudinal algorithms on small hand-made arrays: volumes, mismatch, overlap, random null."""
from __future__ import annotations

import math

import numpy as np
import pytest

from bids_uad.algorithms import longitudinal as lg


def _ball(shape, centre, radius):
    idx = np.indices(shape).astype(float)
    return sum((idx[i] - centre[i]) ** 2 for i in range(3)) <= radius ** 2


def _brain(shape=(40, 40, 32)):
    return _ball(shape, np.array(shape) / 2 - 0.5, min(shape) / 2 - 1.5)


# -- volumes, mismatch, overlap -------------------------------------------------------------------

def test_volumes_in_ml():
    mask = np.zeros((10, 10, 10), bool)
    mask[:5, :4, :2] = True  # 40 voxels
    assert lg.voxel_volume_ml((2, 2, 2)) == pytest.approx(0.008)
    assert lg.volume_ml(mask, (2.0, 2.0, 2.0)) == pytest.approx(0.32)
    assert lg.volume_ml(mask, (1, 1, 1, 3)) == pytest.approx(0.04)  # 4-D zooms: 3 used


def test_mismatch_and_overlap_hand_made():
    shape = (12, 12, 12)
    anomaly = np.zeros(shape, bool)
    anomaly[2:8, 2:8, 2:8] = True                      # 216 voxels
    lesion = np.zeros(shape, bool)
    lesion[2:5, 2:8, 2:8] = True                       # 108 of them are the visible lesion
    analysis = np.ones(shape, bool)
    analysis[7, :, :] = False                          # one slab outside the analysis mask
    mism = lg.mismatch_mask(anomaly, lesion, analysis)
    assert mism.sum() == 3 * 36 - 36                   # rows 5, 6 (row 7 excluded)
    assert not (mism & lesion).any()
    follow = np.zeros(shape, bool)
    follow[2:6, 2:8, 2:8] = True                       # lesion grew by row 5
    assert lg.overlap_fraction(mism, follow) == pytest.approx(0.5)
    assert math.isnan(lg.overlap_fraction(np.zeros(shape, bool), follow))
    # a lone voxel is dropped by min_voxels
    anomaly[10, 10, 10] = True
    assert lg.mismatch_mask(anomaly, lesion, analysis, min_voxels=2).sum() == 72
    assert lg.mismatch_mask(anomaly, lesion, analysis).sum() == 73


def test_compare_sessions_hand_made_numbers():
    shape = (12, 12, 12)
    anomaly = np.zeros(shape, bool)
    anomaly[2:8, 2:8, 2:8] = True
    lesion = np.zeros(shape, bool)
    lesion[2:5, 2:8, 2:8] = True
    follow = np.zeros(shape, bool)
    follow[2:6, 2:8, 2:8] = True
    score0 = np.zeros(shape, np.float32)
    score1 = np.ones(shape, np.float32)
    stats, maps = lg.compare_sessions(anomaly, lesion, follow, None, (2, 2, 2), followup_anomaly=follow,
                                      baseline_score=score0, followup_score=score1, n_permutations=20)
    v = 0.008
    assert stats["baseline_anomaly_ml"] == pytest.approx(216 * v)
    assert stats["mismatch_ml"] == pytest.approx(108 * v)
    assert stats["mismatch_growth_ml"] == pytest.approx(36 * v)
    assert stats["new_lesion_ml"] == pytest.approx(36 * v)
    assert stats["new_lesion_in_mismatch_fraction"] == pytest.approx(1.0)
    assert stats["overlap_fraction"] == pytest.approx(1 / 3)
    assert stats["anomaly_change_ml"] == pytest.approx((144 - 216) * v)
    assert stats["score_change_mean"] == pytest.approx(1.0)
    assert stats["mismatch_components"] == 1
    assert maps["score_change"].shape == shape
    assert set(lg.STAT_COLUMNS) <= set(stats)


# -- random-region null ----------------------------------------------------------------------------

def test_random_region_keeps_voxel_count_and_stays_allowed():
    rng = np.random.default_rng(0)
    brain = _brain()
    region = np.zeros(brain.shape, bool)
    region[18:22, 18:23, 14:17] = True
    region[8:10, 20:22, 15:17] = True
    for method in lg.NULL_METHODS:
        rand, _ = lg.random_region(region, brain, rng, method)
        assert rand.sum() == region.sum()
        assert not (rand & ~brain).any()


def _try_place_one_by_one(coords, free, candidates, rng, tries):
    """The placement search checked one try at a time (the definition the batched one keeps)."""
    shape = np.asarray(free.shape)
    best, best_n = None, 0
    for _ in range(tries):
        c = coords.copy()
        for axis in range(3):
            if rng.random() < 0.5:
                c[:, axis] = -c[:, axis]
        anchor = candidates[rng.integers(len(candidates))]
        moved = c - c[rng.integers(len(c))] + anchor
        inside = ((moved >= 0) & (moved < shape)).all(1)
        ok = np.zeros(len(moved), dtype=bool)
        ok[inside] = free[tuple(moved[inside].T)]
        if ok.all():
            return moved, None
        if int(ok.sum()) > best_n:
            best, best_n = moved[ok], int(ok.sum())
    return None, best


@pytest.mark.parametrize("size", [1, 6, 9])
def test_batched_placement_search_is_the_one_by_one_search(size):
    # a tight allowed region (many tries miss, some partial copies) and a roomy one (first try fits)
    brain = _brain((24, 24, 20))
    comp = np.argwhere(_ball((30, 30, 30), (15, 15, 15), size / 2.0))
    for allowed in (brain & (np.indices(brain.shape)[0] < 6 + size), brain):
        candidates = np.argwhere(allowed)
        for seed in range(4):
            r1, r2 = np.random.default_rng(seed), np.random.default_rng(seed)
            got = lg._try_place(comp, allowed, candidates, r1, 50)
            want = _try_place_one_by_one(comp, allowed, candidates, r2, 50)
            for a, b in zip(got, want):
                assert (a is None) == (b is None) and (a is None or np.array_equal(a, b))
            assert r1.random() == r2.random()  # the generator is where the one-by-one search left it


def test_windowed_top_up_picks_what_a_whole_grid_distance_map_picks():
    from scipy import ndimage as ndi

    # free voxels around the copy, then a gap: the first window holds too few or too far ones
    core = _ball((30, 30, 24), (15, 15, 12), 3.0)
    free = (_brain((30, 30, 24)) & ~_ball((30, 30, 24), (15, 15, 12), 9.0)) | core
    part = np.argwhere(core)[::2]
    # only a far corner voxel inside the first window (copy's box +- 3), a nearer block outside it
    sparse = core.copy()
    sparse[9, 9, 6] = True
    sparse[22:24, 14:17, 11:14] = True
    whole = np.argwhere(core)
    got = lg._top_up(whole, len(whole) + 1, sparse, np.random.default_rng(0))
    assert got[-1][0] >= 22
    for missing in (1, 40, 300, 900):
        got = lg._top_up(part, len(part) + missing, free, np.random.default_rng(missing))
        rng = np.random.default_rng(missing)
        placed = np.zeros(free.shape, bool)
        placed[tuple(part.T)] = True
        pts = np.argwhere(free & ~placed)
        dist = ndi.distance_transform_edt(~placed)[tuple(pts.T)] + 0.5 * rng.random(len(pts))
        want = np.concatenate([part, pts[np.argpartition(dist, missing - 1)[:missing]]])
        assert len(got) == len(part) + missing
        assert set(map(tuple, got)) == set(map(tuple, want))


def test_random_null_matches_expected_overlap_for_random_targets():
    """A target that covers a known fraction of the allowed region: random overlap ≈ that fraction."""
    rng = np.random.default_rng(1)
    brain = _brain()
    target = brain & (rng.random(brain.shape) < 0.3)
    region = np.zeros(brain.shape, bool)
    region[15:20, 15:20, 12:16] = True
    region[25:27, 12:15, 14:16] = True
    null = lg.random_region_null(region, target, brain, n_permutations=100, seed=3)
    assert null.samples.size == 100
    assert null.mean == pytest.approx(0.3, abs=0.03)
    # a half-space target: overlap ≈ the half's share of the allowed region
    half = brain.copy()
    half[: brain.shape[0] // 2] = False
    share = half.sum() / brain.sum()
    null = lg.random_region_null(region, half, brain, n_permutations=150, seed=4)
    assert null.mean == pytest.approx(share, abs=0.1)
    # seeded: same inputs, same null
    again = lg.random_region_null(region, half, brain, n_permutations=150, seed=4)
    np.testing.assert_array_equal(null.samples, again.samples)


def test_random_null_p_value_and_empty_region():
    brain = _brain()
    region = np.zeros(brain.shape, bool)
    region[18:21, 18:21, 14:17] = True
    null = lg.random_region_null(region, region, brain, n_permutations=50, seed=0)
    assert null.observed == 1.0
    assert null.p <= 3 / 51
    empty = lg.random_region_null(np.zeros_like(brain), region, brain, n_permutations=50)
    assert math.isnan(empty.p) and empty.samples.size == 0
    with pytest.raises(ValueError):
        lg.random_region(region, brain, np.random.default_rng(0), method="nope")


# -- synthetic longitudinal cases ------------------------------------------------------------------

def _glioma_case(seed=0):
    """Baseline tumour + infiltration shell; follow-up tumour grows into one side of the shell."""
    rng = np.random.default_rng(seed)
    shape = (40, 40, 32)
    brain = _brain(shape)
    centre = np.array([20.0, 14.0, 16.0])
    idx = np.indices(shape).astype(float)
    d = np.sqrt(sum((idx[i] - centre[i]) ** 2 for i in range(3)))
    tumour = (d <= 4.5) & brain
    infiltration = (d > 4.5) & (d <= 8.0) & brain
    direction = np.array([1.0, 0.3, 0.0]) / np.linalg.norm([1.0, 0.3, 0.0])
    cos = sum((idx[i] - centre[i]) * direction[i] for i in range(3)) / (d + 1e-6)
    followup = tumour | (infiltration & (cos > 0.2))
    # the model finds most of the infiltration and some scattered false positives
    anomaly = tumour | (infiltration & (rng.random(shape) < 0.8))
    for _ in range(4):
        c = rng.uniform(8, 32, 3)
        anomaly |= _ball(shape, c, 1.5) & brain
    return brain, tumour, infiltration, followup, anomaly


def test_infiltration_that_becomes_lesion_beats_random_regions():
    brain, tumour, _, followup, anomaly = _glioma_case()
    stats, maps = lg.compare_sessions(anomaly, tumour, followup, brain, (2, 2, 2),
                                      n_permutations=100, seed=0)
    assert stats["mismatch_ml"] > 0
    assert stats["overlap_fraction"] > 0.3
    assert stats["overlap_fraction_random_mean"] < 0.1
    assert stats["overlap_fraction"] > 3 * stats["overlap_fraction_random_mean"]
    # a copy of the infiltration shell can land back around the tumour: rare, not impossible
    assert stats["overlap_fraction_random_p"] < 0.05
    assert stats["new_lesion_in_mismatch_fraction"] > 0.6
    # blobs give the same conclusion
    blobs, _ = lg.compare_sessions(anomaly, tumour, followup, brain, (2, 2, 2),
                                   n_permutations=50, seed=0, null_method="blobs")
    assert blobs["overlap_fraction_random_mean"] < 0.15 and blobs["overlap_fraction_random_p"] < 0.05


def test_control_with_identical_sessions_has_no_mismatch_growth():
    rng = np.random.default_rng(5)
    brain = _brain()
    flair = (100 + 5 * rng.standard_normal(brain.shape)) * brain
    lesion0, _ = lg.flair_hyperintensity_estimate(flair, brain, zooms=(2, 2, 2))
    lesion1, _ = lg.flair_hyperintensity_estimate(flair.copy(), brain, zooms=(2, 2, 2))
    anomaly = np.zeros(brain.shape, bool)
    anomaly[10:12, 18:20, 14:16] = True  # a few false positives
    stats, _ = lg.compare_sessions(anomaly, lesion0, lesion1, brain, (2, 2, 2), followup_anomaly=anomaly,
                                   n_permutations=30)
    assert stats["baseline_lesion_ml"] == pytest.approx(0.0, abs=0.05)
    assert stats["new_lesion_ml"] == 0.0
    assert stats["mismatch_growth_ml"] == 0.0
    assert stats["anomaly_change_ml"] == 0.0
    assert stats["overlap_fraction"] == 0.0


# -- FLAIR hyperintensity estimate ---------------------------------------------------------------

def test_flair_estimate_finds_bright_lesion_and_ignores_csf_and_edge():
    rng = np.random.default_rng(2)
    brain = _brain()
    flair = 100 + 6 * rng.standard_normal(brain.shape)
    lesion = _ball(brain.shape, (22, 14, 16), 4.0)
    flair[lesion] = 170
    csf = _ball(brain.shape, (20, 27, 16), 3.0)
    flair[csf] = 200                        # bright "CSF" (e.g. poor suppression) must not count
    edge = brain & ~_ball(brain.shape, np.array(brain.shape) / 2 - 0.5, min(brain.shape) / 2 - 2.5)
    flair[edge] = 180                       # bright rim at the brain edge: excluded
    flair *= brain
    est, info = lg.flair_hyperintensity_estimate(flair, brain, csf, zooms=(2, 2, 2))
    inter = (est & lesion).sum()
    dice = 2 * inter / (est.sum() + lesion.sum())
    assert dice > 0.8
    assert not (est & csf).any()
    assert "estimate" in info["Method"]
    assert info["VolumeMl"] == pytest.approx(est.sum() * 0.008)


def test_perilesional_null_is_stricter_than_the_whole_brain_null():
    brain, tumour, _, followup, anomaly = _glioma_case()
    stats, _ = lg.compare_sessions(anomaly, tumour, followup, brain, (2, 2, 2), n_permutations=40,
                                   seed=0, perilesional_mm=20.0)
    assert stats["overlap_fraction_perilesional_mean"] > stats["overlap_fraction_random_mean"]
    assert 0.0 <= stats["overlap_fraction_perilesional_p"] <= 1.0
    plain, _ = lg.compare_sessions(anomaly, tumour, followup, brain, (2, 2, 2), n_permutations=5)
    assert math.isnan(plain["overlap_fraction_perilesional_mean"])


def test_flair_estimate_on_the_synthetic_glioma_model():
    """The generator's FLAIR (oedema bright, solid tumour mildly bright, core dark): Dice vs its tumour."""
    try:
        from bids_uad.synthetic.anatomy import SubjectAnatomy, load_template
        from bids_uad.synthetic.lesions import make_lesion
        from bids_uad.synthetic.presets import get_preset
        from bids_uad.synthetic.simulate import simulate_anat
    except ImportError as exc:  # the generator is developed alongside
        pytest.skip(f"synthetic generator not available: {exc}")
    preset = get_preset("tiny")
    tpl = load_template(2)
    dices = []
    for seed in range(5):  # one draw can be unlucky (bias field over the lesion): the median of five
        rng = np.random.default_rng(seed)
        subject, lesion = SubjectAnatomy.random(rng), make_lesion(tpl, rng)
        anat = simulate_anat(tpl, tpl, subject, lesion, np.eye(4), preset, rng, 1.0)
        truth = {k: np.asarray(anat["truth"][k]).reshape(anat["shape"]) for k in ("brain", "csf", "tumor")}
        est, _ = lg.flair_hyperintensity_estimate(anat["flair"], truth["brain"] > 0.5, truth["csf"] > 0.5,
                                                  zooms=[preset.t1w_voxel_mm] * 3)
        tumour = truth["tumor"] > 0
        dices.append(2 * (est & tumour).sum() / (est.sum() + tumour.sum()))
    assert np.median(dices) > 0.8, dices
