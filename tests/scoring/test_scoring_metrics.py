"""Rank-based AUROC / AUPRC, Dice and oracle thresholds against brute force."""
import itertools

import numpy as np
import pytest

from bids_uad.algorithms.masking import dice
from bids_uad.scoring.metrics import (auprc, auroc, average_ranks, dice_optimal_threshold, format_table,
                                      summarise, youden_threshold)


def _brute_auroc(s, y):
    pos, neg = s[y], s[~y]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def _brute_auprc(s, y):
    ap, prev_recall = 0.0, 0.0
    for t in np.sort(np.unique(s))[::-1]:
        pred = s >= t
        tp = np.sum(pred & y)
        recall, precision = tp / y.sum(), tp / pred.sum()
        ap += (recall - prev_recall) * precision
        prev_recall = recall
    return ap


@pytest.mark.parametrize("seed", range(5))
def test_auroc_auprc_match_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 60
    y = rng.random(n) < 0.3
    s = np.round(rng.normal(size=n) + y, 1)  # rounding creates ties
    assert auroc(s, y) == pytest.approx(_brute_auroc(s, y), abs=1e-12)
    assert auprc(s, y) == pytest.approx(_brute_auprc(s, y), abs=1e-12)


def test_metric_edge_cases():
    assert auroc(np.arange(4), np.array([0, 0, 1, 1], bool)) == 1.0
    assert auroc(np.arange(4), np.array([1, 1, 0, 0], bool)) == 0.0
    assert np.isnan(auroc(np.arange(3), np.zeros(3, bool)))
    assert auprc(np.arange(4), np.array([0, 0, 1, 1], bool)) == 1.0
    np.testing.assert_array_equal(average_ranks(np.array([3, 1, 3, 2])), [3.5, 1, 3.5, 2])
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    assert dice(np.array([1, 1, 0, 0], bool), np.array([0, 1, 1, 0], bool)) == 0.5


def test_oracle_thresholds_match_brute_force():
    rng = np.random.default_rng(9)
    y = rng.random(200) < 0.2
    s = np.round(rng.normal(size=200) + 1.5 * y, 2)
    cands = np.r_[np.unique(s), s.min() - 1]
    best_d = max(dice(s > t, y) for t in cands)
    best_j = max(np.mean(s[y] > t) - np.mean(s[~y] > t) for t in cands)
    t = dice_optimal_threshold(s, y)
    assert dice(s > t, y) == pytest.approx(best_d)
    t = youden_threshold(s, y)
    assert np.mean(s[y] > t) - np.mean(s[~y] > t) == pytest.approx(best_j)


def test_summary_table():
    rows = [{"auroc": 0.8, "dice": 0.5}, {"auroc": 0.6, "dice": float("nan")}]
    summ = summarise(rows)
    assert summ["auroc"][0] == pytest.approx(0.7) and summ["auroc"][1] == pytest.approx(np.std([0.8, 0.6], ddof=1))
    assert summ["dice"] == (0.5, 0.0)
    text = format_table({"dae": summ})
    assert "0.700 ± 0.141" in text and text.count("\n") == 1
