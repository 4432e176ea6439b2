"""Skull stripping: Dice against the true brain mask of a synthetic head with skull and scalp."""
from __future__ import annotations

import tempfile

import numpy as np
import pytest

from bids_uad.algorithms.masking import dice
from bids_uad.algorithms.skullstrip import combine_masks, morphological_brain_mask, skull_strip
from bids_uad.algorithms.templates import find_template, phantom_head


@pytest.fixture(scope="module")
def head():
    rot = np.deg2rad(6.0)
    pose = np.eye(4)
    pose[:3, :3] = [[1, 0, 0], [0, np.cos(rot), -np.sin(rot)], [0, np.sin(rot), np.cos(rot)]]
    pose[:3, 3] = [3.0, -4.0, 2.0]
    return phantom_head(3.0, pose=pose, warp_mm=3.0, bias=0.2, lesion_radius_mm=12.0)


def test_morphological_mask_dice(head):
    data = head["t1w"].get_fdata()
    mask = morphological_brain_mask(data, head["t1w"].header.get_zooms())
    assert dice(mask, head["brain_mask"].get_fdata()) >= 0.9


def test_template_skull_strip_dice(head, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the registration's scratch folder
    mask, brain = skull_strip(head["t1w"], method="template", template=find_template())
    assert list(tmp_path.iterdir()) == []  # its transforms did not outlive the call
    truth = head["brain_mask"].get_fdata()
    assert dice(mask.get_fdata(), truth) >= 0.9
    assert mask.get_data_dtype() == np.uint8
    # no scalp left in the brain image
    assert (brain.get_fdata()[truth == 0] > 0).sum() < 0.1 * (truth > 0).sum()


def test_combine_masks_prefers_template_on_gross_failure():
    guess = np.zeros((20, 20, 20), bool)
    guess[:, :, :] = True  # threshold leaked everywhere
    warped = np.zeros_like(guess)
    warped[5:15, 5:15, 5:15] = True
    out = combine_masks(guess, warped, (1.0, 1.0, 1.0))
    assert dice(out, warped) == 1.0


def test_unknown_method():
    head = phantom_head(4.0)
    with pytest.raises(ValueError):
        skull_strip(head["t1w"], method="nope")


def test_strip_and_normalise_gives_mask_and_template_registration(head, tmp_path):
    """One SyN for both: the mask matches the truth, and the registration it hands over maps
    the subject's brain onto the template (its forward) and the template's mask back (inverse)."""
    import nibabel as nib

    from bids_uad.algorithms.registration import apply_transforms
    from bids_uad.algorithms.skullstrip import strip_and_normalise

    template = find_template()
    mask, brain, reg = strip_and_normalise(head["t1w"], template, head["lesion"], out_prefix=tmp_path / "t1w2tpl_",
                                           resolution_mm=4.0, reg_iterations=(20, 10, 0))
    truth = head["brain_mask"].get_fdata() > 0
    assert dice(mask.get_fdata(), truth) >= 0.9
    assert [p.startswith(str(tmp_path)) for p in reg.forward + reg.inverse] == [True, True]
    # the truth brain carried to the template overlaps the template's brain mask
    tpl_mask = nib.load(template.brain_mask)
    on_tpl = np.asarray(apply_transforms(head["brain_mask"], tpl_mask, reg.forward, "mask").dataobj) > 0
    assert dice(on_tpl, np.asarray(tpl_mask.dataobj) > 0) >= 0.85


def test_strip_and_normalise_registers_again_when_the_first_guess_fails(head, tmp_path, caplog):
    from bids_uad.algorithms.skullstrip import strip_and_normalise

    leaked = np.ones(head["t1w"].shape, bool)  # a first guess that is the whole field of view
    with caplog.at_level("WARNING"):
        mask, _, reg = strip_and_normalise(head["t1w"], find_template(), first_guess=leaked,
                                           out_prefix=tmp_path / "t1w2tpl_", resolution_mm=4.0,
                                           reg_iterations=(20, 10, 0))
    assert "registering the T1w to the template again" in caplog.text
    assert all("final_" in p for p in reg.forward + reg.inverse)  # the second fit's transforms
    assert dice(mask.get_fdata(), head["brain_mask"].get_fdata() > 0) >= 0.8


def test_morphology_on_the_mask_box_is_the_whole_grid_morphology():
    """_in_box: a dilation and a closing computed on the mask's box (grown by their reach) are
    the whole-grid results, also for a mask touching the grid's edge."""
    from scipy import ndimage

    from bids_uad.algorithms.masking import ball
    from bids_uad.algorithms.skullstrip import _in_box, _reach

    rng = np.random.default_rng(5)
    zooms = np.array([1.0, 1.5, 2.0])
    mask = np.zeros((50, 40, 36), bool)
    mask[10:30, 8:25, 5:20] = rng.random((20, 17, 15)) > 0.4
    mask[0:3, 0:4, 30:36] = True  # at the grid's edge
    for radius in (2.0, 4.0):
        se = ball(radius / zooms)
        dil = _in_box(lambda m: ndimage.binary_dilation(m, structure=se), mask, _reach(radius / zooms))
        assert np.array_equal(dil, ndimage.binary_dilation(mask, structure=se))
        closed = _in_box(lambda m: ndimage.binary_closing(m, structure=se), mask, _reach(radius / zooms, 2))
        assert np.array_equal(closed, ndimage.binary_closing(mask, structure=se))
