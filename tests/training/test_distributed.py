"""Data-parallel training (DDP, gloo on CPU): 2 processes follow the single-process run.

Spawning is slow (each worker imports torch), so one 2-process launch trains everything the
comparisons need; the error test uses a second, short launch.
"""
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.distributed as dist

from bids_uad.models import get_model
from bids_uad.training import distributed, trainer
from bids_uad.models.settings import preset
from bids_uad.training.toydata import fibonacci_directions, make_toy_subject
from bids_uad.training.trainer import (LossModule, batch_arrays, latent_noise, shard_batch, train_fold,
                                       train_folds)

BVECS = fibonacci_directions(8)
N_SUBJECTS = 5
# 2 processes vs 1 do the same arithmetic up to the order of float32 sums (gradient
# all-reduce, convolutions over 1 instead of 2 samples), which Adam at the quick preset's
# learning rate amplifies: measured after 4 epochs, best validation loss 2.2e-4 (DAE) and
# 1.2e-4 (RecDiscNet) relative, about the spread of the *single*-process run between 1 and 2
# torch threads (up to 5.4e-4).  Real sharding bugs measured larger: the MSE normalised per
# shard instead of over the global batch 2.5e-3 to 3.9e-3, unshared VAE noise 3.8e-3.
RTOL = 1e-3
# In float64 the rounding differences vanish: measured <= 1.6e-15 relative over 6 epochs.
RTOL_FLOAT64 = 1e-10


def _subjects():
    subs = [make_toy_subject((16, 16, 16), BVECS, i) for i in range(N_SUBJECTS)]
    return [np.moveaxis(s.data, -1, 0).copy() for s in subs], [s.mask for s in subs]


def _settings(name, **training):
    s = preset("quick", name)
    t = replace(s.training, **{"epochs": 4, "patience": 100, "batch_size": 3, "steps_per_epoch": 3,
                               "n_folds": 2, **training})
    return replace(s, model=replace(s.model, n_channels=8, features=4, max_features=16), training=t)


def _summary(result):
    return {"best_val_loss": result.best_val_loss, "best_epoch": result.best_epoch,
            "history": result.history}


@contextmanager
def _float64():
    """Train in float64 (parameters, batches, latent noise) to take rounding out of comparisons."""
    dtype, to_tensors = torch.get_default_dtype(), trainer.to_tensors
    torch.set_default_dtype(torch.float64)
    trainer.to_tensors = lambda arrays, device: {k: v.double() for k, v in to_tensors(arrays, device).items()}
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)
        trainer.to_tensors = to_tensors


def _runs(data, masks):
    """Both models in float32 (as in production) and in float64."""
    out = {}
    for name in ("dae", "recdisc"):
        out[name] = _summary(train_fold(_settings(name), data[:3], masks[:3], data[3:], masks[3:]))
        with _float64():
            out[f"{name}-float64"] = _summary(train_fold(_settings(name), data[:3], masks[:3], data[3:], masks[3:]))
    return out


def _two_process_runs(checkpoint_dir):
    """Rank body of the shared 2-process launch: both models, then an interrupted DAE run resumed."""
    data, masks = _subjects()
    out = _runs(data, masks)
    train_fold(_settings("dae"), data[:3], masks[:3], data[3:], masks[3:], checkpoint_dir=checkpoint_dir,
               stop_after=2)
    out["resumed"] = _summary(train_fold(_settings("dae"), data[:3], masks[:3], data[3:], masks[3:],
                                         checkpoint_dir=checkpoint_dir))
    out["world"] = distributed.world_size()
    return out


def _fail_on_rank_1():
    """Rank 1 raises while rank 0 waits in a collective that can never complete."""
    if distributed.rank() == 1:
        raise ValueError("deliberate failure on rank 1")
    dist.barrier()


@pytest.fixture(scope="module")
def two_process(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ddp_ckpt")
    return distributed.launch(_two_process_runs, 2, (str(ckpt),), threads=1, timeout=240)


@pytest.fixture(scope="module")
def one_process():
    return _runs(*_subjects())


@pytest.mark.parametrize("name", ["dae", "recdisc", "dae-float64", "recdisc-float64"])
def test_two_processes_match_one(two_process, one_process, name):
    rtol = RTOL_FLOAT64 if name.endswith("float64") else RTOL
    single, multi = one_process[name], two_process[name]
    assert two_process["world"] == 2
    assert multi["best_epoch"] == single["best_epoch"]
    np.testing.assert_allclose(multi["best_val_loss"], single["best_val_loss"], rtol=rtol)
    for a, b in zip(multi["history"], single["history"]):
        np.testing.assert_allclose([a["train_loss"], a["val_loss"]], [b["train_loss"], b["val_loss"]], rtol=rtol)
    assert single["history"][-1]["val_loss"] < single["history"][0]["val_loss"]  # it trained at all


def test_two_process_resume_matches_uninterrupted_run(two_process):
    assert two_process["resumed"]["history"] == two_process["dae"]["history"]
    assert two_process["resumed"]["best_val_loss"] == two_process["dae"]["best_val_loss"]


@pytest.mark.parametrize("name", ["dae", "recdisc"])
@pytest.mark.parametrize("batch_size, world", [(3, 2), (1, 2), (4, 3)])
def test_shard_weights_give_the_full_batch_gradient(name, batch_size, world):
    """Average over simulated ranks of grad(weight * shard loss) == grad(full-batch loss),
    including empty shards (batch 1 on 2 ranks) and subjects with different brain sizes."""
    data, masks = _subjects()
    assert len({int(m.sum()) for m in masks}) > 1
    settings = _settings(name)
    torch.manual_seed(0)
    model = get_model(name, settings.model)
    model.train()
    net = LossModule(model)
    idx = np.arange(batch_size)
    arrays = batch_arrays(model, data, masks, idx, np.random.default_rng(1), settings)
    noise = latent_noise(model, settings, batch_size, "cpu")

    def gradient(batch, weight=1.0):
        model.zero_grad()
        (net(batch) * weight).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    full, _ = shard_batch(arrays, noise, 1, 0, "cpu")
    reference = gradient(full)
    shards = [shard_batch(arrays, noise, world, r, "cpu") for r in range(world)]
    averaged = sum(gradient(b, w) for b, w in shards) / world
    torch.testing.assert_close(averaged, reference, rtol=1e-4, atol=1e-7)
    weights = [w for _, w in shards]
    assert sum(weights) == pytest.approx(world)
    assert (min(weights) == 0.0) == (batch_size < world)


def test_train_folds_in_two_spawned_processes(tmp_path):
    """The spawn path of ``training.processes``: workers train, this process resumes and calibrates."""
    data, masks = _subjects()
    single = train_folds(_settings("dae", epochs=2), data, masks)
    multi = train_folds(_settings("dae", epochs=2, processes=2, threads=2), data, masks, checkpoint_dir=tmp_path)
    assert [r.val_idx for r in multi] == [r.val_idx for r in single]
    for a, b in zip(multi, single):
        np.testing.assert_allclose(a.best_val_loss, b.best_val_loss, rtol=RTOL)
        assert a.calibration is not None and a.calibration.n == b.calibration.n
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fold-0.json", "fold-0.safetensors",
                                                         "fold-1.json", "fold-1.safetensors"]
    # the workers' checkpoints resume in one process (the process count is not part of their identity)
    again = train_folds(_settings("dae", epochs=2), data, masks, checkpoint_dir=tmp_path)
    assert [r.best_val_loss for r in again] == [r.best_val_loss for r in multi]


def test_worker_error_surfaces_quickly():
    with pytest.raises(distributed.WorkerError, match="deliberate failure on rank 1"):
        distributed.launch(_fail_on_rank_1, 2, timeout=60)


def test_shard_slices_partition_the_batch():
    for n in range(0, 7):
        for world in (1, 2, 3, 4):
            parts = [distributed.shard_slice(n, world, r) for r in range(world)]
            assert [i for p in parts for i in range(p.start, p.stop)] == list(range(n))
            sizes = [p.stop - p.start for p in parts]
            assert max(sizes) - min(sizes) <= 1


def test_torchrun_env_needs_every_variable():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert distributed.torchrun_env(env) == {"rank": 1, "world_size": 2, "local_rank": 1}
    assert distributed.torchrun_env({k: v for k, v in env.items() if k != "MASTER_PORT"}) is None
    assert distributed.backend_for("cpu") == "gloo" and distributed.backend_for("cuda") == "nccl"


def test_group_level_process_count(tmp_path, monkeypatch):
    """--nprocs caps at the batch size, threads per process stay --omp-nthreads; torchrun's world wins."""
    from bids_uad.config import Settings as RunSettings
    from bids_uad.workflows.group import model_settings_for, torchrun_worker_main

    for var in distributed.TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)

    def training(nprocs, omp):
        run = RunSettings(bids_dir=tmp_path, output_dir=tmp_path / "o", analysis_level="group", work_dir=tmp_path,
                          nprocs=nprocs, omp_nthreads=omp, device="cpu", train_preset="quick")
        return model_settings_for(run, "dae", np.full(8, 1000.0), (16, 16, 16)).training, run

    t, run = training(8, 3)  # quick preset: batch 2
    assert (t.processes, t.threads) == (2, 6)
    assert (training(1, 2)[0].processes, training(1, 2)[0].threads) == (1, 2)
    assert torchrun_worker_main(run) is None  # not started by torchrun: run the level normally
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert training(1, 1)[0].processes == 3
    assert torchrun_worker_main(run) is None  # rank 0 runs the whole level
    monkeypatch.setenv("RANK", "1")
    assert torchrun_worker_main(replace(run, analysis_level="participant")) == 0  # nothing to do there
