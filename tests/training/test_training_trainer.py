"""Training: folds, minimum controls, seed determinism, resumable checkpoints."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from bids_uad.errors import InputValidationError, UsageError
from bids_uad.models.settings import preset
from bids_uad.training.fit import train_from_dwi, train_model
from bids_uad.training.folds import make_folds
from bids_uad.training.toydata import fibonacci_directions, make_toy_subject
from bids_uad.training.trainer import fold_plan, train_fold

BVECS = fibonacci_directions(8)


@pytest.fixture(scope="module")
def controls():
    subs = [make_toy_subject((16, 16, 16), BVECS, i) for i in range(5)]
    return [np.moveaxis(s.data, -1, 0).copy() for s in subs], [s.mask for s in subs]


def _settings(name, **training):
    s = preset("quick", name)
    t = replace(s.training, **{"epochs": 4, "patience": 100, **training})
    return replace(s, model=replace(s.model, n_channels=8, features=4, max_features=16), training=t)


def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_folds_partition():
    folds = make_folds(10, 7, seed=3)
    assert len(folds) == 7
    held = np.sort(np.concatenate([v for _, v in folds]))
    np.testing.assert_array_equal(held, np.arange(10))
    for tr, va in folds:
        assert not set(tr) & set(va) and len(tr) + len(va) == 10
    assert len(make_folds(3, 7, 0)) == 3


def test_a_repeat_is_another_partition_and_the_first_is_unchanged():
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(make_folds(10, 3, 5), make_folds(10, 3, 5, repeat=0)))
    again = make_folds(10, 3, 5, repeat=1)
    np.testing.assert_array_equal(np.sort(np.concatenate([v for _, v in again])), np.arange(10))
    assert [sorted(v) for _, v in again] != [sorted(v) for _, v in make_folds(10, 3, 5)]


def test_fold_plan_numbers_the_folds_of_every_repeat_on():
    s = _settings("cdae", n_folds=3, repeats=2)
    data = [np.full((2, 4, 4, 4), i, np.float32) for i in range(5)]
    plan = fold_plan(s, data)
    assert [p[0] for p in plan] == list(range(6))
    for split in (plan[:3], plan[3:]):
        assert sorted(i for p in split for i in p[2]) == list(range(5))
    assert plan[:3] == fold_plan(replace(s, training=replace(s.training, repeats=1)), data)
    with pytest.raises(UsageError, match="repeats"):
        _settings("cdae", repeats=0)


def test_fewer_than_three_controls_is_an_error(controls):
    data, masks = controls
    with pytest.raises(InputValidationError, match="at least 3"):
        train_model(_settings("dae"), data[:2], masks[:2], ["a", "b"], np.full(8, 1000.0), BVECS)
    with pytest.raises(InputValidationError):
        make_folds(2, 7, 0)


@pytest.mark.parametrize("name", ["dae", "recdisc", "cdae"])
def test_seed_determinism(controls, name):
    data, masks = controls
    runs = [train_fold(_settings(name, epochs=2, seed=seed), data[:3], masks[:3], data[3:], masks[3:])
            for seed in (7, 7, 8)]
    a, b, c = (_params(r.model) for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert runs[0].history == runs[1].history


@pytest.mark.parametrize("name", ["dae", "recdisc", "cdae"])
def test_resume_from_checkpoint_matches_uninterrupted(tmp_path, controls, name):
    data, masks = controls
    s = _settings(name)
    full = train_fold(s, data[:3], masks[:3], data[3:], masks[3:])
    killed = train_fold(s, data[:3], masks[:3], data[3:], masks[3:], checkpoint_dir=tmp_path, stop_after=2)
    assert len(killed.history) == 2
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["fold-0.json", "fold-0.safetensors"]
    resumed = train_fold(s, data[:3], masks[:3], data[3:], masks[3:], checkpoint_dir=tmp_path)
    assert resumed.history == full.history
    a, b = _params(full.model), _params(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a finished checkpoint is reused without training again
    again = train_fold(s, data[:3], masks[:3], data[3:], masks[3:], checkpoint_dir=tmp_path)
    assert again.history == full.history


def test_early_stopping_and_best_epoch(controls):
    data, masks = controls
    res = train_fold(_settings("dae", epochs=30, patience=1, learning_rate=0.5), data[:3], masks[:3],
                     data[3:], masks[3:])
    assert len(res.history) < 30
    vals = [h["val_loss"] for h in res.history]
    assert res.best_epoch == int(np.argmin(vals)) and res.best_val_loss == min(vals)


def test_cdae_validation_loss_uses_a_fixed_noise_draw(controls):
    data, masks = controls
    from bids_uad.training.trainer import _validation_loss
    from bids_uad.models import get_model

    s = _settings("cdae")
    model = get_model("cdae", s.model)
    val = [_validation_loss(model, data[3:], masks[3:], s, torch.device("cpu"), 0) for _ in range(2)]
    assert val[0] == val[1] > 0
    assert _validation_loss(model, data[3:], masks[3:], s, torch.device("cpu"), 1) != val[0]


def test_progress_bar_shows_epoch_loss_and_time_left(controls, capsys):
    data, masks = controls
    s = _settings("cdae", epochs=2)
    train_fold(replace(s, training=replace(s.training, progress=True)), data[:3], masks[:3], data[3:], masks[3:])
    err = capsys.readouterr().err
    assert "epoch 2/2" in err and "loss=" in err and "val=" in err and "left at most" in err


def test_standard_preset_stops_early_and_keeps_quick_small():
    for name in ("dae", "recdisc", "cdae"):
        std, quick = preset("standard", name), preset("quick", name)
        assert std.training.patience < std.training.epochs  # early stopping is reachable
        assert quick.training.epochs * (quick.training.steps_per_epoch or 1) < \
            std.training.epochs * (std.training.steps_per_epoch or 1)
        assert std.model.depth > quick.model.depth
        assert quick.training.repeats == 1  # CI and the demo train one k-fold run
    assert preset("standard", "cdae").training.repeats == 2 and preset("standard", "dae").training.repeats == 1


def test_train_from_dwi_reconciles_gradients(controls):
    data, masks = controls
    order = np.random.default_rng(0).permutation(8)
    dwis, bvals, bvecs = [], [], []
    for i, (d, m) in enumerate(zip(data[:4], masks[:4])):
        ratio = np.moveaxis(d, 0, -1)
        o = order if i == 2 else np.arange(8)  # one subject with another direction order
        dwis.append(np.concatenate([np.full(m.shape + (1,), 800.0) * m[..., None], 800.0 * ratio[..., o]], -1))
        bvals.append(np.r_[0.0, np.full(8, 1000.0)])
        bvecs.append(np.vstack([[0, 0, 0], BVECS[o]]))
    bundle = train_from_dwi(_settings("dae", epochs=1), dwis, bvals, bvecs, masks[:4], list("abcd"))
    assert len(bundle.folds) == 3 and all(f.calibration.n > 0 for f in bundle.folds)
    np.testing.assert_allclose(bundle.ref_bvecs, BVECS)


def test_train_model_killed_between_folds_resumes(tmp_path, controls, monkeypatch):
    import bids_uad.training.trainer as trainer

    data, masks = controls
    s = _settings("recdisc", epochs=2)
    args = (s, data[:4], masks[:4], list("abcd"), np.full(8, 1000.0), BVECS)
    reference = train_model(*args)
    real = trainer.train_fold
    calls = []

    def dies_in_fold_1(*a, **k):
        if a[5] == 1:  # fold index
            k["stop_after"] = 1
            real(*a, **k)
            raise KeyboardInterrupt("killed")
        calls.append(a[5])
        return real(*a, **k)

    monkeypatch.setattr(trainer, "train_fold", dies_in_fold_1)
    with pytest.raises(KeyboardInterrupt):
        train_model(*args, checkpoint_dir=tmp_path)
    monkeypatch.setattr(trainer, "train_fold", real)
    resumed = train_model(*args, checkpoint_dir=tmp_path)
    for f0, f1 in zip(reference.folds, resumed.folds):
        a, b = _params(f0.model), _params(f1.model)
        assert all(torch.equal(a[k], b[k]) for k in a)
        np.testing.assert_array_equal(f0.calibration.null, f1.calibration.null)


def test_checkpoint_key_follows_what_the_checkpoints_compute():
    """The group level's checkpoint folder key: other settings or other controls give another key
    (so a rerun trains beside the old checkpoints); runtime keys (threads, processes, progress), the
    scoring settings and the score reduction (how a trained network scores) do not."""
    from dataclasses import replace

    from bids_uad.models.settings import preset
    from bids_uad.training.trainer import checkpoint_key

    base = preset("quick", "cdae")
    key = checkpoint_key(base, ["a", "b"])
    assert key == checkpoint_key(replace(base, training=replace(base.training, threads=4, processes=2,
                                                                 progress=True)), ["a", "b"])
    assert key == checkpoint_key(replace(base, scoring=replace(base.scoring, ensemble=not base.scoring.ensemble,
                                                                 fpr=0.05)), ["a", "b"])  # not trained on
    assert key == checkpoint_key(replace(base, model=replace(base.model, score_reduction="sum-abs")), ["a", "b"])
    assert key == checkpoint_key(replace(base, model=replace(base.model, score_median=5)), ["a", "b"])
    assert key != checkpoint_key(base, ["a", "c"])
    assert key != checkpoint_key(replace(base, model=replace(base.model, inputs="invariant")), ["a", "b"])
    assert key != checkpoint_key(preset("standard", "cdae"), ["a", "b"])
