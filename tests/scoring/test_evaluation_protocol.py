"""The detection-evaluation protocol (scoring/evaluation.py)."""
import numpy as np

from bids_uad.scoring.evaluation import Case, evaluate_detector, one_line_detectors, pr_curve, volume_stratum


def _patient(seed, perfect):
    rng = np.random.default_rng(seed)
    shape = (30, 30, 30)
    amask = np.ones(shape, bool)
    instances = np.zeros(shape, np.int32)
    instances[2:4, 2:4, 2:4] = 1  # 8 voxels = 0.5 mL at 4 mm: stratum < 5 mL
    instances[10:20, 10:20, 10:20] = 2  # 1000 voxels = 64 mL: > 20 mL
    truth = instances > 0
    score = rng.normal(size=shape).astype(np.float32)
    if perfect:
        score[truth] += 100
    written = score > 50
    return Case(f"p{seed}", score, amask, written, truth, instances, {1: "oedema", 2: "restricted"}, 0.064)


def _control(seed):
    rng = np.random.default_rng(100 + seed)
    score = rng.normal(size=(30, 30, 30)).astype(np.float32)
    return Case(f"c{seed}", score, np.ones(score.shape, bool), score > 50)


def test_perfect_and_random_detectors():
    good = evaluate_detector([_patient(i, True) for i in range(3)], [_control(i) for i in range(3)])
    assert good["auprc"] == 1.0 and good["auroc"] == 1.0 and good["dice_calibrated"] == 1.0
    assert good["subject_auroc"] == 1.0 and good["heldout_control_fpr"] == 0.0
    assert set(good["by_type"]) == {"oedema", "restricted"} and set(good["by_volume"]) == {"<5 mL", ">20 mL"}
    assert good["by_volume"]["<5 mL"]["n_lesions"] == 3 and good["by_type"]["oedema"]["detection_rate"] == 1.0
    bad = evaluate_detector([_patient(i, False) for i in range(3)], [_control(i) for i in range(3)])
    assert bad["auprc"] < 0.2 and abs(bad["auroc"] - 0.5) < 0.1 and bad["dice_calibrated"] == 0.0
    recall, precision = pr_curve([_patient(0, True)])
    assert np.allclose(precision, 1.0) and recall[-1] == 1.0


def test_volume_strata_and_one_line_detectors():
    assert [volume_stratum(v) for v in (1, 5, 19.9, 20, 300)] == ["<5 mL", "5-20 mL", "5-20 mL", ">20 mL", ">20 mL"]
    bvecs = np.eye(3).repeat(2, 0) * np.array([1, -1] * 3)[:, None]
    ratios = np.full((4, 4, 4, 6), np.exp(-1000 * 0.0008), np.float32)
    ratios[0, 0, 0] = np.exp(-1000 * 0.002)
    maps = one_line_detectors(ratios, np.full(6, 1000.0), bvecs, np.ones((4, 4, 4), bool), median=1)
    assert np.isclose(maps["MD"][1, 1, 1], 0.0008, rtol=1e-3) and maps["MD"][0, 0, 0] > maps["MD"][1, 1, 1]
    assert np.allclose(maps["1-FA"], 1.0, atol=1e-4)  # isotropic diffusion: FA 0
    # by default through the masked median filter every model's score gets: a lone voxel is not a lesion
    filtered = one_line_detectors(ratios, np.full(6, 1000.0), bvecs, np.ones((4, 4, 4), bool))
    assert np.allclose(filtered["MD"], maps["MD"][1, 1, 1])


def test_lesion_wise_detection_rate_and_false_findings():
    patients = [_patient(i, True) for i in range(2)]
    patients[0].written[2:4, 2:4, 2:4] = False          # the small lesion of patient 0 missed
    patients[1].written[25:28, 25:28, 25:28] = True      # a false finding of 27 voxels
    patients[1].written[0, 29, 0] = True                 # a single voxel: below the minimum finding
    for case in patients:
        case.min_finding_voxels = 5
    controls = [_control(i) for i in range(2)]
    controls[0].written[5:8, 20:23, 5:8] = True          # 27 voxels
    controls[0].written[20:23, 5:8, 20:23] = True        # another
    for case in controls:
        case.min_finding_voxels = 5
    out = evaluate_detector(patients, controls)
    assert out["n_lesions"] == 4 and out["lesion_detection_rate"] == 0.75
    assert out["false_findings_per_patient"] == 0.5 and out["false_findings_per_control"] == 1.0
    rows = {r["subject"]: r for r in out["per_subject"]}
    assert rows["p0"]["lesions_found"] == 1 and rows["p1"]["false_findings"] == 1 and rows["c0"]["findings"] == 2
    md = evaluate_detector([Case("p", p.score, p.amask, None, p.truth) for p in patients], [])
    assert np.isnan(md["lesion_detection_rate"])         # no written map (1-FA, MD): no findings
