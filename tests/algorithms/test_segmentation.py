"""Tissue segmentation (Atropos), ventricles and the analysis mask."""
from __future__ import annotations

import numpy as np
import pytest

from bids_uad.algorithms.segmentation import (
    analysis_mask, dice_per_class, dseg_tsv_rows, segment_tissues, ventricle_mask,
)
from bids_uad.algorithms.templates import phantom_head


@pytest.fixture(scope="module")
def head():
    return phantom_head(3.0, bias=0.0, noise=0.01)


def test_kmeans_segmentation_dice_per_class(head):
    truth = head["dseg"].get_fdata()
    dseg, probs = segment_tissues(head["t1w"], head["brain_mask"], mrf=0.1, iterations=3)
    scores = dice_per_class(dseg.get_fdata(), truth)
    assert scores["WM"] >= 0.75, scores
    assert scores["GM"] >= 0.6, scores
    assert scores["CSF"] >= 0.4, scores
    assert set(np.unique(dseg.get_fdata())) <= {0, 1, 2, 3}
    assert list(probs) == ["CSF", "GM", "WM"]
    total = sum(p.get_fdata() for p in probs.values())
    inside = head["brain_mask"].get_fdata() > 0
    assert np.allclose(total[inside], 1.0, atol=0.05)
    assert np.all(total[~inside] == 0)


def test_priors_are_used(head):
    truth = head["dseg"].get_fdata()
    import nibabel as nib
    priors = {name: nib.Nifti1Image((truth == value).astype(np.float32), head["t1w"].affine)
              for value, name in ((1, "CSF"), (2, "GM"), (3, "WM"))}
    dseg, _ = segment_tissues(head["t1w"], head["brain_mask"], priors=priors, prior_weight=0.8,
                              iterations=2)
    assert dice_per_class(dseg.get_fdata(), truth)["WM"] >= 0.85


def test_ventricle_mask_keeps_whole_component_and_drops_sulci():
    dseg = np.full((30, 30, 30), 3, np.int16)
    dseg[10:20, 10:14, 10:20] = 1  # a ventricle
    dseg[0:3, :, :] = 1            # sulcal CSF at the edge
    prior = np.zeros(dseg.shape, np.float32)
    prior[11:19, 10:14, 11:19] = 0.9  # prior covers most (not all) of it
    vent = ventricle_mask(dseg, prior)
    assert vent[10:20, 10:14, 10:20].all()
    assert not vent[0:3].any()


def test_analysis_mask_excludes_ventricles_and_csf():
    dseg = np.array([0, 1, 2, 3, 3])
    vent = np.array([0, 1, 0, 1, 0])
    assert analysis_mask(dseg, vent).tolist() == [False, False, True, False, True]


def test_dseg_tsv_rows():
    assert dseg_tsv_rows() == [{"index": 1, "name": "CSF"}, {"index": 2, "name": "GM"},
                               {"index": 3, "name": "WM"}]
