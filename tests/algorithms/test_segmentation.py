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


_REPRO_SCRIPT = """
import hashlib, numpy as np, nibabel as nib
from scipy import ndimage as ndi
from bids_uad.algorithms.segmentation import segment_tissues
from bids_uad.algorithms.templates import phantom_head
head = phantom_head(2.0, bias=0.1, noise=0.05)
truth = head["dseg"].get_fdata()
priors = {name: nib.Nifti1Image(ndi.gaussian_filter((truth == value).astype(np.float32), 2), head["t1w"].affine)
          for value, name in ((1, "CSF"), (2, "GM"), (3, "WM"))}
for given in (None, priors):
    _, probs = segment_tissues(head["t1w"], head["brain_mask"], priors=given, prior_weight=0.5, seed=0, threads=1)
    print(hashlib.sha256(np.stack([p.get_fdata() for p in probs.values()]).tobytes()).hexdigest())
"""


def test_segmentation_is_reproducible_between_processes():
    """The same Atropos call in two fresh processes gives the same probabilities (k-means and
    priors).  Regression: Atropos' default ``--use-random-seed 1`` seeds from the clock, so the
    image and the venv run of the tiny study (#16) had different tissue maps after identical
    registrations."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1"}
    runs = [subprocess.run([sys.executable, "-c", _REPRO_SCRIPT], capture_output=True, text=True, check=True,
                           env=env).stdout.split() for _ in range(2)]
    assert all(len(r) == 2 for r in runs), runs
    assert runs[0] == runs[1], runs


def test_atropos_on_the_mask_box_gives_the_whole_grid_result(head):
    """segment_tissues runs Atropos on the mask's bounding box: the probabilities are those of
    Atropos on the whole grid."""
    import ants
    import nibabel as nib

    from bids_uad.algorithms.masking import bounding_box
    from bids_uad.algorithms.registration import configure_ants, to_ants
    from bids_uad.algorithms.segmentation import ATROPOS_MARGIN, ATROPOS_RANDOM_SEED, _private_tempdir

    truth = head["dseg"].get_fdata()
    priors = {name: nib.Nifti1Image((0.2 + 0.6 * (truth == value)).astype(np.float32), head["t1w"].affine)
              for value, name in ((1, "CSF"), (2, "GM"), (3, "WM"))}
    _, probs = segment_tissues(head["t1w"], head["brain_mask"], priors=priors, iterations=2)
    configure_ants(1, 0)
    mask = (head["brain_mask"].get_fdata() > 0).astype(np.float32)
    with _private_tempdir():
        whole = ants.atropos(a=to_ants(nib.Nifti1Image(head["t1w"].get_fdata().astype(np.float32), head["t1w"].affine)),
                             x=to_ants(nib.Nifti1Image(mask, head["t1w"].affine)),
                             i=[to_ants(priors[k]) for k in ("CSF", "GM", "WM")], m="[0.2,1x1x1]", c="[2,0]",
                             priorweight=0.25, r=ATROPOS_RANDOM_SEED)
        expected = [p.numpy() * mask for p in whole["probabilityimages"]]
    box_shape = [s.stop - s.start for s in bounding_box(mask > 0, margin=ATROPOS_MARGIN)]
    assert box_shape != list(mask.shape)  # the box is smaller than the grid
    for name, exp in zip(("CSF", "GM", "WM"), expected):
        assert np.allclose(probs[name].get_fdata(), exp, atol=1e-6), name
