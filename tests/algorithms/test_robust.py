"""The masked median filter of score maps (bids_uad.algorithms.robust)."""
import numpy as np
import pytest
from scipy import ndimage

from bids_uad.algorithms.robust import masked_median_filter


def test_inside_a_full_mask_it_is_scipys_median_filter():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(14, 15, 12)).astype(np.float32)
    for width in (3, 5):
        got = masked_median_filter(image, np.ones(image.shape, bool), width)
        want = ndimage.median_filter(image, width)
        r = width // 2
        inner = (slice(r, -r),) * 3
        assert np.array_equal(got[inner], want[inner])


def test_only_voxels_inside_the_mask_are_sampled_and_changed():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(12, 12, 10)).astype(np.float32)
    mask = np.zeros(image.shape, bool)
    mask[3:9, 2:10, 0:6] = True  # touches the image's edge
    image[~mask] = 1000.0  # would dominate every median near the border if it leaked in
    got = masked_median_filter(image, mask, 3)
    assert np.array_equal(got[~mask], image[~mask])
    assert got[mask].max() < 10
    for (i, j, k) in [(3, 2, 0), (8, 9, 5), (5, 5, 3)]:
        near = tuple(slice(max(v - 1, 0), v + 2) for v in (i, j, k))
        assert got[i, j, k] == pytest.approx(np.median(image[near][mask[near]]))


def test_an_isolated_voxel_is_removed_and_a_region_is_kept():
    """What the score's filter is for: one deviating voxel is noise, a lesion spans its neighbours."""
    image = np.zeros((16, 16, 16), np.float32)
    mask = np.ones(image.shape, bool)
    image[4, 4, 4] = 9.0
    image[8:13, 8:13, 8:13] = 5.0
    got = masked_median_filter(image, mask, 3)
    assert got[4, 4, 4] == 0
    assert (got[9:12, 9:12, 9:12] == 5).all()


def test_width_one_is_the_image_and_an_even_width_is_refused():
    image = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    assert np.array_equal(masked_median_filter(image, image > 3, 1), image)
    with pytest.raises(ValueError, match="odd"):
        masked_median_filter(image, image > 3, 2)
