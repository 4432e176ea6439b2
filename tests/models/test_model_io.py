"""Model files are safetensors + JSON, round trip exactly and never unpickle."""
import json
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch

from bids_uad.errors import InputValidationError
from bids_uad.models.bundle import load_bundle, score_volume
from bids_uad.models.io import flatten_optimizer, load_tensors, save_tensors, unflatten_optimizer
from bids_uad.models.settings import preset
from bids_uad.training.fit import train_model
from bids_uad.training.toydata import fibonacci_directions, make_toy_subject


def _tiny(name):
    s = preset("quick", name)
    return replace(s, model=replace(s.model, n_channels=12), training=replace(s.training, epochs=2))


@pytest.fixture(scope="module")
def controls():
    bvecs = fibonacci_directions(12)
    subs = [make_toy_subject((16, 16, 16), bvecs, i) for i in range(3)]
    return [np.moveaxis(s.data, -1, 0).copy() for s in subs], [s.mask for s in subs], bvecs


@pytest.mark.parametrize("name", ["dae", "recdisc"])
def test_bundle_round_trip_exact(tmp_path, controls, name, monkeypatch):
    data, masks, bvecs = controls
    bundle = train_model(_tiny(name), data, masks, ["a", "b", "c"], np.full(12, 1000.0), bvecs)
    out = bundle.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"model-{name}.json", f"model-{name}.safetensors"]
    meta = json.loads(out.read_text())
    for key in ("architecture", "settings", "normalisation", "reference_gradients", "folds",
                "training_subjects", "versions", "data_hash", "tensor_sha256"):
        assert key in meta
    # loading must not touch pickle
    def refuse(*a, **k):
        raise AssertionError("pickle used")
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    loaded = load_bundle(out)
    assert loaded.settings == bundle.settings and loaded.subjects == bundle.subjects
    for f0, f1 in zip(bundle.folds, loaded.folds):
        s0, s1 = f0.model.state_dict(), f1.model.state_dict()
        assert s0.keys() == s1.keys()
        assert all(torch.equal(s0[k], s1[k]) for k in s0)
        np.testing.assert_array_equal(f0.calibration.null, f1.calibration.null)
        assert np.array_equal(score_volume(f0.model, data[0]), score_volume(f1.model, data[0]))
    np.testing.assert_array_equal(loaded.ref_bvecs, bvecs)
    # networks keep their best fold's own calibration (fold networks need not share a score scale)
    assert meta["calibration"] is None and loaded.out_of_fold is None
    assert loaded.calibration().threshold_for(0.01) == bundle.folds[bundle.best_fold()].calibration.threshold_for(0.01)


def test_malformed_out_of_fold_calibration_refused(tmp_path, controls):
    from bids_uad.models.io import save_tensors
    from bids_uad.models.validate import validate_model_file

    data, masks, bvecs = controls
    bundle = train_model(_tiny("normative"), data, masks, ["a", "b", "c"], np.full(12, 1000.0), bvecs)
    out = bundle.save(tmp_path)
    tensors, meta = load_tensors(out.with_suffix(""))
    # the baselines' out-of-fold calibration over every control: JSON record + tensor, round trip exact
    assert meta["calibration"]["method"].startswith("out-of-fold")
    loaded = load_bundle(out)
    np.testing.assert_array_equal(loaded.out_of_fold.null, bundle.out_of_fold.null)
    assert loaded.out_of_fold.level == bundle.out_of_fold.level == meta["calibration"]["written_map_level"]
    # three controls: the level was counted with each of them left out, and the file says what that gave
    left_out = meta["calibration"]["written_map_fpr_left_out"]
    assert left_out is not None and loaded.out_of_fold.written_fpr_left_out == left_out
    assert loaded.calibration().threshold_for(0.01) == bundle.calibration().threshold_for(0.01)
    tensors["calibration.null"] = tensors["calibration.null"].reshape(1, -1)  # not 1-D
    meta.pop("tensor_sha256")
    save_tensors(out.with_suffix(""), tensors, meta)
    with pytest.raises(InputValidationError, match="calibration.null"):
        validate_model_file(out)


def test_pickle_files_are_refused(tmp_path):
    stem = tmp_path / "model-dae"
    save_tensors(stem, {"w": torch.ones(3)}, {"x": 1})
    tensors, meta = load_tensors(stem)
    assert torch.equal(tensors["w"], torch.ones(3)) and meta["x"] == 1
    # a torch.save zip archive and a raw pickle under the safetensors name
    for writer in (lambda p: torch.save({"w": torch.ones(3)}, p),
                   lambda p: p.write_bytes(pickle.dumps({"w": [1.0, 2.0]}))):
        writer(stem.with_suffix(".safetensors"))
        with pytest.raises(InputValidationError):
            load_tensors(stem)


def test_tampered_tensor_file_refused(tmp_path):
    stem = tmp_path / "m"
    save_tensors(stem, {"w": torch.ones(3)}, {})
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(3)}, str(stem.with_suffix(".safetensors")))
    with pytest.raises(InputValidationError):
        load_tensors(stem)


def test_optimizer_flatten_round_trip():
    p = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.Adam([p], lr=0.1)
    p.sum().backward()
    opt.step()
    tensors, meta = flatten_optimizer(opt.state_dict())
    meta = json.loads(json.dumps(meta))
    state = unflatten_optimizer(tensors, meta)
    ref = opt.state_dict()
    assert state["param_groups"] == ref["param_groups"]
    for k, v in ref["state"][0].items():
        assert torch.equal(state["state"][0][k], v)
