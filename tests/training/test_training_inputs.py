"""Normalisation, grid padding/cropping and gradient-table reconciliation."""
import numpy as np
import pytest

from bids_uad.errors import InputValidationError
from bids_uad.models.inputs import (from_grid, grid_affine, match_directions, normalise_dwi,
                                      prepare_subject, reconcile_gradients, to_grid)
from bids_uad.training.toydata import fibonacci_directions, random_rotation, tensor_signal


def test_normalise_divides_by_mean_b0_clips_and_masks():
    rng = np.random.default_rng(0)
    b0 = rng.uniform(500, 1000, (4, 4, 3))
    ratio = rng.uniform(0, 1.2, (4, 4, 3, 5))
    dwi = np.concatenate([b0[..., None] * 0.9, ratio * b0[..., None], b0[..., None] * 1.1], -1)
    bvals = np.array([0, 1000, 1000, 1000, 1000, 1000, 5])
    bvecs = np.vstack([[0, 0, 0], fibonacci_directions(5), [0, 0, 0]])
    mask = np.ones((4, 4, 3), bool)
    mask[0] = False
    out, bv, bvec = normalise_dwi(dwi, bvals, bvecs.T, mask)
    assert out.shape == (4, 4, 3, 5) and out.dtype == np.float32
    np.testing.assert_allclose(out[1:], np.clip(ratio[1:], 0, 1), rtol=1e-5)
    assert np.all(out[0] == 0)
    np.testing.assert_array_equal(bv, [1000] * 5)
    np.testing.assert_allclose(bvec, fibonacci_directions(5))
    with pytest.raises(InputValidationError):
        normalise_dwi(dwi[..., 1:6], bvals[1:6], bvecs[1:6], mask)  # no b0


@pytest.mark.parametrize("shape", [(90, 90, 54), (13, 20, 7), (96, 100, 64)])
def test_pad_crop_round_trip_exact(shape):
    rng = np.random.default_rng(1)
    arr = rng.random(shape + (2,)).astype(np.float32)
    grid = (96, 96, 64) if shape[0] > 50 else (16, 16, 8)
    g, gm = to_grid(arr, grid)
    assert g.shape == grid + (2,)
    back = from_grid(g, gm)
    assert back.shape == arr.shape
    kept = tuple(slice(s, s + n) for s, n in zip(gm.src_start, gm.length))
    np.testing.assert_array_equal(back[kept], arr[kept])
    if all(n <= g_ for n, g_ in zip(shape, grid)):
        np.testing.assert_array_equal(back, arr)  # pure padding: exact everywhere
    # the grid affine puts every copied voxel at the same world position
    aff = np.diag([2.0, 2.0, 2.5, 1.0])
    aff[:3, 3] = [-90, -100, -60]
    gaff = grid_affine(aff, gm)
    i = np.array(gm.src_start) + 1
    j = np.array(gm.dst_start) + 1
    np.testing.assert_allclose(aff @ np.r_[i, 1], gaff @ np.r_[j, 1])
    np.testing.assert_array_equal(g[tuple(j)], arr[tuple(i)])


def _signal(bvecs, bval=1000.0):
    e1 = np.array([[0.6, 0.64, 0.48]])
    e1 /= np.linalg.norm(e1)
    return tensor_signal(np.array([[1.7e-3, 0.3e-3]]), e1, bvecs, bval)[0].astype(np.float32)


def test_permuted_and_flipped_directions_are_reordered():
    rng = np.random.default_rng(2)
    ref = fibonacci_directions(30)
    perm = rng.permutation(30)
    flip = np.where(rng.random(30) > 0.5, -1.0, 1.0)[:, None]
    bvecs = ref[perm] * flip  # antipodal = same direction
    data = rng.random((3, 2, 2, 30)).astype(np.float32)
    out, method = reconcile_gradients(data, np.full(30, 1000.0), bvecs, np.full(30, 1000.0), ref)
    assert method == "permutation"
    inv = np.argsort(perm)
    np.testing.assert_array_equal(out, data[..., inv])
    assert np.array_equal(match_directions(bvecs, ref), inv)
    same, method = reconcile_gradients(data, np.full(30, 1000.0), ref, np.full(30, 1000.0), ref)
    assert method == "identity" and same is data


def test_rotated_directions_resampled_by_sh_reproduce_tensor_signal():
    ref = fibonacci_directions(64)
    bvecs = fibonacci_directions(60, random_rotation(np.random.default_rng(3)))
    data = _signal(bvecs)[None, None, None]
    out, method = reconcile_gradients(data, np.full(60, 1000.0), bvecs, np.full(64, 1000.0), ref)
    assert method == "sh"
    truth = _signal(ref)
    err = np.abs(out[0, 0, 0] - truth)
    assert err.max() < 0.03 and err.mean() < 0.01


def test_multishell_and_bvalue_mismatch():
    ref = np.vstack([fibonacci_directions(20), fibonacci_directions(20)])
    ref_b = np.r_[np.full(20, 1000.0), np.full(20, 2000.0)]
    data = np.random.default_rng(4).random((2, 2, 2, 40)).astype(np.float32)
    order = np.r_[20:40, 0:20]
    out, method = reconcile_gradients(data[..., order], ref_b[order] + 5, ref[order], ref_b, ref)
    np.testing.assert_array_equal(out, data)
    with pytest.raises(InputValidationError, match="b-values"):
        reconcile_gradients(data[..., :20], np.full(20, 3000.0), ref[:20], ref_b[:20], ref[:20])
    with pytest.raises(InputValidationError, match="lack"):
        reconcile_gradients(data[..., :20], ref_b[:20], ref[:20], ref_b, ref)


def test_prepare_subject_channels_first_on_grid():
    rng = np.random.default_rng(5)
    dirs = fibonacci_directions(8)
    dwi = rng.uniform(100, 200, (10, 12, 6, 9))
    mask = np.ones((10, 12, 6), bool)
    p = prepare_subject(dwi, np.r_[0, np.full(8, 1000)], np.vstack([[0, 0, 0], dirs]), mask, (16, 16, 8),
                        np.full(8, 1000.0), dirs[::-1])
    assert p.data.shape == (8, 16, 16, 8) and p.mask.shape == (16, 16, 8) and p.method == "permutation"


def _ratios_of(e1, evals, bvecs):
    """(N, 1, 1, C) signal ratios of axially symmetric tensors, as a flat 'image'."""
    return tensor_signal(evals, e1, bvecs, 1000.0).astype(np.float32)[:, None, None, :]


def test_invariant_features_do_not_depend_on_directions_or_orientation():
    """The same tissue measured with other directions (number, order) or turned in the head gives
    the same features; FA and MD come out of the tensor fit, the SH power is 0 when isotropic."""
    from bids_uad.models.inputs import input_channels, invariant_feature_names, invariant_features
    from bids_uad.models.settings import ModelSettings

    rng = np.random.default_rng(3)
    n = 200
    e1 = rng.normal(size=(n, 3))
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    evals = np.column_stack([rng.uniform(1.2e-3, 1.8e-3, n), rng.uniform(0.3e-3, 0.9e-3, n)])
    evals[:20] = 1e-3  # isotropic
    mask = np.ones((n, 1, 1), bool)
    b32, b45 = fibonacci_directions(32), fibonacci_directions(45, random_rotation(rng))
    f32 = invariant_features(_ratios_of(e1, evals, b32), np.full(32, 1000.0), b32, mask, np.full(32, 1000.0))
    f45 = invariant_features(_ratios_of(e1, evals, b45), np.full(45, 1000.0), b45, mask, np.full(32, 1000.0))
    turned = e1 @ random_rotation(rng).T
    f_rot = invariant_features(_ratios_of(turned, evals, b32), np.full(32, 1000.0), b32, mask, np.full(32, 1000.0))
    names = invariant_feature_names(np.full(32, 1000.0), 4)
    assert names == ["b1000-mean", "b1000-sh2", "b1000-sh4", "fa", "md"] and f32.shape == (n, 1, 1, 5)
    assert input_channels(ModelSettings(name="cdae", inputs="invariant"), np.full(32, 1000.0)) == 5
    assert input_channels(ModelSettings(name="cdae"), np.full(32, 1000.0)) == 32
    np.testing.assert_allclose(f45, f32, atol=0.02)
    np.testing.assert_allclose(f_rot, f32, atol=0.02)
    assert f32[20:, 0, 0, 1].min() > 0.02 and np.all(f32[:20, 0, 0, 1:4] < 1e-3)  # sh2, sh4, FA of isotropic
    md = (evals[:, 0] + 2 * evals[:, 1]) / 3 / 3e-3
    np.testing.assert_allclose(f32[:, 0, 0, 4], md, rtol=0.02)


def test_invariant_inputs_reject_too_few_directions_and_other_shells():
    from bids_uad.models.inputs import invariant_features

    b = fibonacci_directions(12)
    ratios = np.full((2, 2, 2, 12), 0.5, np.float32)
    mask = np.ones((2, 2, 2), bool)
    with pytest.raises(InputValidationError, match="too few"):
        invariant_features(ratios, np.full(12, 1000.0), b, mask, np.full(12, 1000.0), sh_order=4)
    with pytest.raises(InputValidationError, match="shell"):
        invariant_features(ratios, np.full(12, 2000.0), b, mask, np.full(12, 1000.0), sh_order=2)


def test_invariant_model_trains_saves_and_reads_another_protocol(tmp_path):
    """A cdae on invariant inputs: n_channels sized to the features, the model file validates, and
    a subject scanned with other directions is scored without resampling."""
    from dataclasses import replace

    from bids_uad.errors import UsageError
    from bids_uad.models.bundle import load_bundle
    from bids_uad.models.settings import ModelSettings, preset
    from bids_uad.scoring.inference import infer
    from bids_uad.training.fit import train_from_dwi
    from bids_uad.training.toydata import make_toy_subject

    def raw(sub, bvecs):
        s0 = 900.0 * sub.mask[..., None]
        return (np.concatenate([s0, s0 * sub.data], -1), np.r_[0.0, np.full(len(bvecs), 1000.0)],
                np.vstack([[0, 0, 0], bvecs]))

    b20 = fibonacci_directions(20)
    s = preset("quick", "cdae")
    s = replace(s, model=replace(s.model, inputs="invariant"), training=replace(s.training, epochs=1, steps_per_epoch=1))
    subs = [make_toy_subject((14, 14, 14), b20, i) for i in range(3)]
    raws = [raw(x, b20) for x in subs]
    bundle = train_from_dwi(s, [r[0] for r in raws], [r[1] for r in raws], [r[2] for r in raws],
                            [x.mask for x in subs], ["a", "b", "c"])
    assert bundle.settings.model.n_channels == 5 and len(bundle.ref_bvals) == 20
    loaded = load_bundle(bundle.save(tmp_path))
    b30 = fibonacci_directions(30, random_rotation(np.random.default_rng(1)))
    patient = make_toy_subject((15, 13, 14), b30, 9, lesion=True)
    res = infer(loaded, *raw(patient, b30), patient.mask)
    assert res.info["gradient_reconciliation"] == "invariant-features" and res.score.shape == patient.mask.shape
    assert np.isfinite(res.score).all() and res.score[patient.mask].max() > 0
    with pytest.raises(UsageError, match="baseline"):
        ModelSettings(name="normative", inputs="invariant")


def test_both_inputs_train_save_and_read_another_protocol(tmp_path):
    """A cdae on "both" inputs: the dw channels in the reference order, then the invariant features;
    channel counts sized and stored, the model file validates (a wrong feature count is refused),
    and a subject scanned with other directions is resampled for the dw part only."""
    import json
    from dataclasses import replace

    from bids_uad.models.bundle import load_bundle
    from bids_uad.models.inputs import invariant_features, prepare_subject
    from bids_uad.models.settings import preset
    from bids_uad.scoring.inference import infer
    from bids_uad.training.fit import train_from_dwi
    from bids_uad.training.toydata import make_toy_subject

    def raw(sub, bvecs):
        s0 = 900.0 * sub.mask[..., None]
        return (np.concatenate([s0, s0 * sub.data], -1), np.r_[0.0, np.full(len(bvecs), 1000.0)],
                np.vstack([[0, 0, 0], bvecs]))

    b20 = fibonacci_directions(20)
    subs = [make_toy_subject((14, 14, 14), b20, i) for i in range(3)]
    raws = [raw(x, b20) for x in subs]
    p = prepare_subject(*raws[0], subs[0].mask, (16, 16, 16), np.full(20, 1000.0), b20, "both")
    ratios, bv, bvec = normalise_dwi(*raws[0], subs[0].mask)
    want = np.moveaxis(to_grid(np.concatenate([ratios, invariant_features(ratios, bv, bvec, subs[0].mask, bv)], -1),
                               (16, 16, 16))[0], -1, 0)
    assert p.data.shape == (25, 16, 16, 16) and p.method == "identity+invariant-features"
    np.testing.assert_array_equal(p.data, want)

    s = preset("quick", "cdae")
    s = replace(s, model=replace(s.model, inputs="both", feature_channels=1, n_channels=2),
                training=replace(s.training, epochs=1, steps_per_epoch=1))
    bundle = train_from_dwi(s, [r[0] for r in raws], [r[1] for r in raws], [r[2] for r in raws],
                            [x.mask for x in subs], ["a", "b", "c"])
    m = bundle.settings.model
    assert (m.n_channels, m.feature_channels) == (25, 5) and len(bundle.ref_bvals) == 20
    path = bundle.save(tmp_path)
    loaded = load_bundle(path)
    b30 = fibonacci_directions(30, random_rotation(np.random.default_rng(1)))
    patient = make_toy_subject((15, 13, 14), b30, 9, lesion=True)
    res = infer(loaded, *raw(patient, b30), patient.mask)
    assert res.info["gradient_reconciliation"] == "sh+invariant-features"
    assert np.isfinite(res.score).all() and res.score[patient.mask].max() > 0
    meta = json.loads(path.read_text())
    meta["settings"]["model"]["feature_channels"] = 4
    path.write_text(json.dumps(meta))
    with pytest.raises(InputValidationError, match="feature_channels"):
        load_bundle(path)
