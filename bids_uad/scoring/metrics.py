"""Voxel-wise detection metrics (rank-based AUROC, average-precision AUPRC, Dice) and tables."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their mean rank."""
    values = np.asarray(values).ravel()
    order = np.argsort(values, kind="mergesort")
    sorted_v = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_v[1:] != sorted_v[:-1]])
    ends = np.r_[starts[1:], sorted_v.size]
    group_rank = (starts + ends + 1) / 2.0  # mean of (start+1 .. end)
    ranks = np.empty(values.size, float)
    ranks[order] = np.repeat(group_rank, ends - starts)
    return ranks


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney rank statistic (ties count one half)."""
    scores, labels = np.asarray(scores, float).ravel(), np.asarray(labels, bool).ravel()
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = average_ranks(scores)[labels].sum()
    return float((r - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _sweep(scores: np.ndarray, labels: np.ndarray):
    """Distinct scores (descending) with cumulative true/false positives at ``score >= value``."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last = np.r_[s[1:] != s[:-1], True]  # end of each tie group
    tp = np.cumsum(y)[last]
    fp = np.cumsum(~y)[last]
    return s[last], tp, fp


def auprc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision: sum over distinct thresholds of (recall step) x precision."""
    scores, labels = np.asarray(scores, float).ravel(), np.asarray(labels, bool).ravel()
    n_pos = int(labels.sum())
    if n_pos == 0:
        return float("nan")
    _, tp, fp = _sweep(scores, labels)
    precision = tp / (tp + fp)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _cut_thresholds(values: np.ndarray) -> np.ndarray:
    """Threshold t_k with {score > t_k} == {score >= values[k]} for descending distinct values."""
    below = np.r_[values[1:], np.nextafter(values[-1], -np.inf)]
    return below


def youden_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """Oracle threshold maximising TPR - FPR (flag ``score > t``); needs ground truth."""
    scores, labels = np.asarray(scores, float).ravel(), np.asarray(labels, bool).ravel()
    values, tp, fp = _sweep(scores, labels)
    j = tp / max(labels.sum(), 1) - fp / max((~labels).sum(), 1)
    return float(_cut_thresholds(values)[int(np.argmax(j))])


def dice_optimal_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """Oracle threshold maximising Dice (flag ``score > t``); needs ground truth."""
    scores, labels = np.asarray(scores, float).ravel(), np.asarray(labels, bool).ravel()
    values, tp, fp = _sweep(scores, labels)
    d = 2 * tp / (labels.sum() + tp + fp)
    return float(_cut_thresholds(values)[int(np.argmax(d))])


def summarise(rows: Sequence[Mapping[str, float]]) -> dict[str, tuple[float, float]]:
    """Per key: (mean, sample SD) over subjects, ignoring NaN."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    out = {}
    for k in keys:
        v = np.array([r[k] for r in rows if k in r], float)
        v = v[~np.isnan(v)]
        out[k] = (float(v.mean()) if v.size else float("nan"), float(v.std(ddof=1)) if v.size > 1 else 0.0)
    return out


def format_table(summary: Mapping[str, Mapping[str, tuple[float, float]]], digits: int = 3) -> str:
    """Plain-text table: one row per model/condition, one column per metric, 'mean ± SD'."""
    cols = list(dict.fromkeys(c for row in summary.values() for c in row))
    width = max([len(c) for c in cols] + [8 + 2 * digits])
    name_w = max([len(r) for r in summary] + [5])
    lines = [" " * name_w + " | " + " | ".join(c.rjust(width) for c in cols)]
    for name, row in summary.items():
        cells = [f"{row[c][0]:.{digits}f} ± {row[c][1]:.{digits}f}" if c in row else "" for c in cols]
        lines.append(name.ljust(name_w) + " | " + " | ".join(x.rjust(width) for x in cells))
    return "\n".join(lines)
