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
