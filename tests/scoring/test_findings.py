"""Findings: clusters of a written map as rows (volume, centre, score, p, FDR, signature, matching)."""
import numpy as np
import pytest

from bids_uad.scoring import findings as FN

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
AFFINE[:3, 3] = [-20, -30, -10]


def _two_blobs():
    mask = np.zeros((20, 20, 12), bool)
    mask[2:5, 2:5, 2:5] = True            # 27 voxels
    mask[10:16, 10:16, 4:8] = True        # 144 voxels: the largest -> finding 1
    mask[18, 18, 10] = True               # a single voxel
    return mask


def test_findings_sorted_by_volume_with_centres_and_scores():
    mask = _two_blobs()
    score = np.where(mask, 1.0, 0.1).astype(np.float32)
    score[12, 12, 5] = 3.0
    labels, rows = FN.find_findings(mask, score, AFFINE, min_volume_ml=0.1)   # 0.1 mL = 12.5 voxels of 8 uL
    assert [r["finding"] for r in rows] == [1, 2]
    assert rows[0]["n_voxels"] == 144 and rows[1]["n_voxels"] == 27
    assert rows[0]["volume_ml"] == pytest.approx(144 * 0.008)
    # centre of mass of voxels 10..15 -> 12.5 -> 2 * 12.5 - 20 = 5 mm
    assert (rows[0]["centre_x"], rows[0]["centre_y"], rows[0]["centre_z"]) == pytest.approx((5.0, -5.0, 1.0))
    assert rows[0]["peak_score"] == pytest.approx(3.0) and rows[1]["peak_score"] == pytest.approx(1.0)
    assert rows[0]["mean_score"] == pytest.approx((143 + 3) / 144)
    assert labels.max() == 2 and labels[18, 18, 10] == 0          # below the minimum volume: not a finding
    assert rows[0]["min_pvalue"] is None and rows[0]["fdr_survives"] is None


def test_min_pvalue_and_fdr_survival():
    mask = _two_blobs()
    p = np.ones(mask.shape, np.float32)
    p[mask] = 0.5
    p[12, 12, 5] = 1e-6                                            # only finding 1 holds a discovery
    labels, rows = FN.find_findings(mask, mask.astype(float), AFFINE, p, np.ones(mask.shape, bool), 0.05, 0.0)
    assert rows[0]["min_pvalue"] == pytest.approx(1e-6) and rows[0]["fdr_survives"] == "yes"
    assert rows[1]["min_pvalue"] == pytest.approx(0.5) and rows[1]["fdr_survives"] == "no"
    assert len(rows) == 3                                          # min volume 0: the single voxel too


def test_empty_map_has_no_findings():
    labels, rows = FN.find_findings(np.zeros((5, 5, 5), bool), np.zeros((5, 5, 5)), np.eye(4))
    assert rows == [] and not labels.any()


def test_min_finding_voxels_matches_cluster_removal_rounding():
    assert FN.min_finding_voxels(0.5, 0.008) == 62         # int(0.5 / 0.008) as ScoringSettings.sized_to
    assert FN.min_finding_voxels(0.0, 0.008) == 1


def test_deviation_signature_against_tissue_reference():
    rng = np.random.default_rng(0)
    shape = (30, 30, 10)
    dseg = np.full(shape, 3)                                       # WM everywhere ...
    dseg[:, :5] = 2                                                # ... GM on one side
    md = np.where(dseg == 3, 0.7e-3, 1.0e-3) + rng.normal(0, 0.02e-3, shape)
    fa = np.where(dseg == 3, 0.5, 0.15) + rng.normal(0, 0.02, shape)
    lesion = np.zeros(shape, bool)
    lesion[10:15, 10:15, 3:7] = True
    md[lesion] *= 1.34
    fa[lesion] *= 0.59
    labels, rows = FN.find_findings(lesion, lesion.astype(float), np.eye(4))
    FN.deviation_signature(rows, labels, {"md": md, "fa": fa}, ~lesion, dseg)
    row = rows[0]
    assert row["reference_tissue"] == "WM"
    assert row["md_percent"] == pytest.approx(34, abs=2) and row["fa_percent"] == pytest.approx(-41, abs=2)
    assert row["md_z"] > 5 and row["fa_z"] < -5
    assert "MD +34 %" in row["signature"] and "FA -41 %" in row["signature"]
    assert row["ad_median"] is None                               # a metric not given stays n/a
    assert row["md_reference"] == row["fa_reference"] == "subject" and row["ad_reference"] is None  # no controls


def test_match_findings_overlap_volume_change_and_new():
    base = np.zeros((20, 20, 20), int)
    base[2:6, 2:6, 2:6] = 1               # grows at follow-up
    base[12:14, 12:14, 12:14] = 2         # disappears
    follow = np.zeros_like(base)
    follow[2:7, 2:7, 2:7] = 1
    follow[15:18, 2:4, 2:4] = 2           # new
    rows = FN.match_findings(base, follow, voxel_ml=0.001)
    by = {r["baseline_finding"]: r for r in rows}
    assert by[1]["status"] == "matched" and by[1]["followup_findings"] == "1"
    assert by[1]["volume_change_ml"] == pytest.approx((125 - 64) * 0.001)
    assert by[1]["dice"] == pytest.approx(2 * 64 / (64 + 125))
    assert by[2]["status"] == "not found at follow-up" and by[2]["followup_volume_ml"] == 0
    assert by[None]["status"] == "new at follow-up" and by[None]["followup_findings"] == "2"


def test_lesion_wise_detection_and_false_findings():
    lesions = np.zeros((20, 20, 20), int)
    lesions[2:6, 2:6, 2:6] = 1
    lesions[12:16, 12:16, 12:16] = 2
    written = np.zeros(lesions.shape, bool)
    written[3:5, 3:5, 3:5] = True         # overlaps lesion 1
    written[8:10, 17:19, 2:4] = True      # overlaps nothing: a false finding
    written[0, 19, 19] = True             # one voxel: below min_voxels
    out = FN.lesion_wise(written, lesions, min_voxels=2)
    assert out["found"] == {1: True, 2: False}
    assert (out["n_lesions"], out["n_found"], out["n_findings"], out["n_false_findings"]) == (2, 1, 2, 1)
    control = FN.lesion_wise(written, None, min_voxels=2)
    assert control["n_lesions"] == 0 and control["n_false_findings"] == 2


def test_deviation_signature_against_the_controls_at_the_same_locations():
    """The controls' centre varies across the image (as FA/MD do across the brain): the finding is
    compared with the controls' values over its own voxels, not with the subject's tissue elsewhere."""
    shape = (30, 30, 10)
    x = np.arange(shape[0], dtype=float)[:, None, None] * np.ones(shape)
    md_controls = 0.6e-3 + 0.02e-3 * x                  # 0.6e-3 .. 1.18e-3 along x
    fa_controls = 0.7 - 0.01 * x
    spread_md, spread_fa = np.full(shape, 0.05e-3), np.full(shape, 0.04)
    defined = np.ones(shape, bool)
    defined[25:] = False                                 # the controls do not cover x >= 25
    lesion = np.zeros(shape, bool)
    lesion[10:15, 10:15, 3:7] = True                     # x 10..14: controls' MD median 0.84e-3, FA 0.58
    outside = np.zeros(shape, bool)
    outside[26:29, 10:13, 3:6] = True                    # where the controls say nothing
    md = md_controls.copy()
    fa = fa_controls.copy()
    md[lesion] *= 1.25
    fa[lesion] *= 0.5
    ad = np.full(shape, 1.2e-3)
    ad[lesion] = 1.5e-3
    labels, rows = FN.find_findings(lesion | outside, (lesion | outside).astype(float), np.eye(4))
    controls = {"md": (md_controls, spread_md, defined), "fa": (fa_controls, spread_fa, defined)}
    FN.deviation_signature(rows, labels, {"md": md, "fa": fa, "ad": ad}, ~(lesion | outside), controls=controls)
    row = next(r for r in rows if r["centre_x"] == pytest.approx(12))
    assert row["md_reference"] == row["fa_reference"] == "controls" and row["ad_reference"] == "subject"
    assert row["md_median"] == pytest.approx(1.25 * 0.84e-3)
    assert row["md_percent"] == pytest.approx(25) and row["md_z"] == pytest.approx(0.25 * 0.84e-3 / 0.05e-3)
    assert row["fa_percent"] == pytest.approx(-50) and row["fa_z"] == pytest.approx(-0.29 / 0.04)
    assert row["ad_percent"] == pytest.approx(25)                 # against the subject's own (constant) AD
    assert row["dwratio_reference"] is None                       # not given: n/a
    # the subject's own tissue would have hidden the change: its MD median over the brain is ~0.89e-3
    subject_only = [dict(r) for r in rows]
    FN.deviation_signature(subject_only, labels, {"md": md}, ~(lesion | outside))
    assert abs(next(r for r in subject_only if r["finding"] == row["finding"])["md_percent"] - 25) > 5
    far = next(r for r in rows if r["finding"] != row["finding"])
    assert far["md_reference"] == far["fa_reference"] == "subject"  # not covered by the controls: fallback


def test_controls_covering_less_than_half_of_a_finding_are_not_its_reference():
    shape = (20, 20, 10)
    lesion = np.zeros(shape, bool)
    lesion[5:10, 5:10, 2:6] = True
    defined = np.zeros(shape, bool)
    defined[5:7] = True                                            # 2 of the finding's 5 x-slices
    md = np.full(shape, 0.8e-3)
    md[lesion] = 1.0e-3
    labels, rows = FN.find_findings(lesion, lesion.astype(float), np.eye(4))
    controls = {"md": (np.full(shape, 0.5e-3), np.full(shape, 0.05e-3), defined)}
    FN.deviation_signature(rows, labels, {"md": md}, ~lesion, controls=controls)
    assert rows[0]["md_reference"] == "subject" and rows[0]["md_percent"] == pytest.approx(25)
    defined[5:8] = True                                            # 3 of 5: covered
    FN.deviation_signature(rows, labels, {"md": md}, ~lesion, controls=controls)
    assert rows[0]["md_reference"] == "controls" and rows[0]["md_percent"] == pytest.approx(100)
