"""k-fold training of one registered model on control subjects, with resumable checkpoints.

Randomness is derived from (seed, fold, epoch): model initialisation from (seed, fold),
batch order, synthetic patches and VAE sampling from (seed, fold, epoch).  A run resumed
from an epoch checkpoint therefore continues bit-identically (on the same device/threads).
Checkpoints are safetensors + JSON (model, Adam state flattened, best weights, counters).

Data-parallel training (see :mod:`bids_uad.training.distributed`): inside a process group of
N > 1 processes every rank draws the same global batch (indices, synthetic patches, VAE latent
noise) from the shared seeds and computes only its contiguous shard of it; each shard's loss
is weighted so that DDP's averaged gradient is the gradient of the global batch's loss, so N
processes follow the single-process trajectory up to floating-point rounding.  Validation is
sharded over subjects and summed over ranks; only rank 0 writes checkpoints.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from bids_uad.errors import InputValidationError, UsageError
from bids_uad.models import get_model, is_trainable
from bids_uad.models.bundle import FoldResult, refer_score, resolve_device, score_volume
from bids_uad.models.normaliser import normaliser_of
from bids_uad.models.settings import needs_template
from bids_uad.models.calibration import Calibration, calibrate_written_map
from bids_uad.models.io import data_hash, flatten_optimizer, load_tensors, save_tensors, unflatten_optimizer
from bids_uad.models.settings import Settings
from bids_uad.training import distributed
from bids_uad.training.precision import training_autocast, training_dtype
from bids_uad.scoring.morphology import postprocess
from bids_uad.training.folds import make_folds
from bids_uad.training.normalise import fit_score_normalisers
from bids_uad.training.ood import add_ood_patches

LOG = logging.getLogger(__name__)
# training settings that change how a run executes, not what it computes: a checkpoint may be
# resumed with other values (e.g. more processes, other threads)
RUNTIME_TRAINING_KEYS = ("threads", "processes", "progress")
#: training progress bar: epoch, elapsed and time left (an upper bound: early stopping may end sooner), losses
PROGRESS_FORMAT = "{desc}: epoch {n_fmt}/{total_fmt} [{elapsed}<{remaining} left at most]{postfix}"


def _seed_int(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def batch_arrays(model, data, masks, idx, rng, settings: Settings) -> dict[str, np.ndarray]:
    """Stack subjects ``idx`` (and their brain masks, ``"mask"``) into numpy arrays; corrupt inputs
    with synthetic patches if the model needs them (drawn from ``rng`` in the order of ``idx``)."""
    clean = np.stack([data[i] for i in idx])
    batch = {"clean": clean, "mask": np.stack([np.asarray(masks[i], np.float32) for i in idx])}
    if getattr(model, "needs_ood", False):
        pairs = [add_ood_patches(data[i], masks[i], rng, settings.ood) for i in idx]
        batch["input"] = np.stack([p[0] for p in pairs])
        batch["anomaly"] = np.stack([p[1] for p in pairs])
    return batch


def to_tensors(arrays: dict[str, np.ndarray], device) -> dict[str, torch.Tensor]:
    """Numpy batch -> tensors on ``device``."""
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in arrays.items()}


def latent_noise(model, settings: Settings, n: int, device) -> torch.Tensor | dict | None:
    """The training noise of a global batch of ``n`` for models that draw some (the VAE's latent
    draw, the cDAE's coarse input noise: ``model.training_noise``), from torch's seeded generator:
    the same values the model would draw itself for the whole batch.  None for other models."""
    draw = getattr(model, "training_noise", None)
    return None if draw is None else draw(n, device)


def shard_batch(arrays: dict[str, np.ndarray], noise: torch.Tensor | None, world: int, rank: int,
                device) -> tuple[dict[str, torch.Tensor], float]:
    """This rank's part of a global batch, as tensors, and the weight of its loss.

    The weight ``world * n_shard / n_global`` makes DDP's gradient average equal the gradient
    of the global batch's mean loss.  The brain-masked MSE is a mean over the brain voxels of
    the *whole* batch, so the shard gets ``mask_count`` = the global count scaled to its share.
    A rank with an empty shard still takes part (DDP needs every rank's gradients): it
    forwards the first sample with weight 0.
    """
    n = len(arrays["clean"])
    part = distributed.shard_slice(n, world, rank)
    n_part = part.stop - part.start
    weight = distributed.shard_weight(n_part, n, world)
    if n_part == 0:
        part, n_part = slice(0, 1), 1
    batch = to_tensors({k: v[part] for k, v in arrays.items()}, device)
    attach_noise(batch, noise, part)
    if world > 1:
        batch["mask_count"] = float(arrays["mask"].sum(dtype=np.float64)) * n_part / n
    return batch, weight


def attach_noise(batch: dict[str, torch.Tensor], noise: torch.Tensor | dict | None, part: slice = slice(None)) -> None:
    """Put a model's training noise (``part`` of the global batch's) into ``batch``: a tensor as
    ``batch["noise"]``, a dict of tensors under its own keys (e.g. the ceVAE's ``context_mask``)."""
    items = noise.items() if isinstance(noise, dict) else [("noise", noise)]
    for key, value in items:
        if value is not None:
            batch[key] = value[part]


class LossModule(torch.nn.Module):
    """``model.loss(batch)[0]`` as a forward pass: DDP synchronises the gradients of forward()."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.loss(batch)[0]


def _validation_loss(model, data, masks, settings, device, fold) -> float:
    """Mean loss over held-out controls with fixed synthetic patches (comparable across epochs).

    In a process group each rank scores its shard of the subjects (patches are still drawn for
    every subject, in order, so they match the single-process ones) and the sums are added over
    ranks; rank 0's total is broadcast so that every rank takes the same early-stopping decision.
    """
    model.eval()
    rng = np.random.default_rng([settings.training.seed, fold, 999_983])
    mine = distributed.shard_slice(len(data), distributed.world_size(), distributed.rank())
    needs_ood = getattr(model, "needs_ood", False)
    total = 0.0
    torch.manual_seed(_seed_int(settings.training.seed, fold, 999_983))  # fixed noise draw (cDAE)
    with torch.no_grad():
        for i in range(len(data)):
            noise = latent_noise(model, settings, 1, device)  # drawn for every subject, as the patches
            if not (mine.start <= i < mine.stop or needs_ood):
                continue
            arrays = batch_arrays(model, data, masks, [i], rng, settings)  # draws this subject's patches
            if mine.start <= i < mine.stop:
                batch = to_tensors(arrays, device)
                attach_noise(batch, noise)
                loss, _ = model.loss(batch)
                total += float(loss)
    if distributed.is_distributed():
        summed = distributed.all_reduce_sum(torch.tensor([total], dtype=torch.float64, device=device))
        total = float(distributed.broadcast_from_root(summed)[0])
    return total / max(len(data), 1)


def _checkpoint_meta(settings: Settings, fold: int, dhash: str) -> dict:
    return json.loads(json.dumps({"settings": settings.to_dict(), "fold": fold, "data_hash": dhash}))


#: model settings that change how a trained network scores, not what is trained
SCORE_ONLY_MODEL_KEYS = ("score_reduction", "score_median")


def _comparable(meta: dict) -> dict:
    """Checkpoint identity: settings (without runtime keys, and without the scoring settings and
    :data:`SCORE_ONLY_MODEL_KEYS`, which do not change what is trained: another ``--threshold`` or
    ``--ensemble`` reuses the training), fold and data hash."""
    settings = {k: v for k, v in (meta.get("settings") or {}).items() if k != "scoring"}
    settings["training"] = {k: v for k, v in (settings.get("training") or {}).items()
                            if k not in RUNTIME_TRAINING_KEYS}
    settings["model"] = {k: v for k, v in (settings.get("model") or {}).items() if k not in SCORE_ONLY_MODEL_KEYS}
    return {"settings": settings, "fold": meta.get("fold"), "data_hash": meta.get("data_hash")}


def checkpoint_key(settings: Settings, subjects: Sequence[str]) -> str:
    """A short digest of what a model's checkpoints compute: its settings without the runtime and
    scoring keys (:func:`_comparable`) and its training subjects.  The group level keeps each key's
    checkpoints in their own folder, so a rerun with other settings (another preset,
    ``--model-inputs``) or other controls trains afresh beside them instead of meeting checkpoints
    it cannot resume."""
    ident = _comparable(_checkpoint_meta(settings, 0, ""))["settings"]
    text = json.dumps({"settings": ident, "subjects": list(subjects)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def train_fold(settings: Settings, train_data: Sequence[np.ndarray], train_masks: Sequence[np.ndarray],
               val_data: Sequence[np.ndarray], val_masks: Sequence[np.ndarray], fold: int = 0,
               checkpoint_dir: str | Path | None = None, stop_after: int | None = None,
               data_id: str | None = None) -> FoldResult:
    """Train one fold; returns the model with its best validation weights.

    ``checkpoint_dir``: epoch checkpoints ``fold-<k>.safetensors/.json`` are written there and
    a present checkpoint is resumed.  ``stop_after`` (tests) stops after that many epochs
    in this call, as if the process had been killed.  ``data_id`` identifies the data in the
    checkpoint (default: a hash of the arrays).

    Inside an initialised process group of N > 1 processes (every rank calls this with the
    same arguments) the model is trained data-parallel with DistributedDataParallel; each
    rank uses ``threads // N`` torch threads and rank 0 alone writes checkpoints.
    """
    ts = settings.training
    world, rank = distributed.world_size(), distributed.rank()
    torch.set_num_threads(max(1, ts.threads // world))
    device = resolve_device(ts.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # set per rank by distributed.init_group
    step_dtype = training_dtype(ts.precision, device)
    torch.manual_seed(_seed_int(ts.seed, fold))
    model = get_model(settings.model.name, settings.model).to(device)
    if hasattr(model, "fit_noise_basis"):  # the cdae's noise along the signal's principal directions
        model.fit_noise_basis(train_data, train_masks)
    opt = torch.optim.Adam(model.parameters(), lr=ts.learning_rate)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=ts.lr_decay)
    dhash = data_id or data_hash(list(train_data) + list(val_data))
    start, best_val, best_epoch, bad, history = 0, math.inf, -1, 0, []
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    done = False
    ckpt = Path(checkpoint_dir) / f"fold-{fold}" if checkpoint_dir is not None else None
    if ckpt is not None and ckpt.with_suffix(".json").is_file():
        tensors, meta = load_tensors(ckpt)
        if _comparable(meta) != _comparable(_checkpoint_meta(settings, fold, dhash)):
            raise UsageError(f"checkpoint {ckpt} was written for other settings or data; "
                             "use an empty checkpoint directory", ckpt)
        model.load_state_dict({k[6:]: v.to(device) for k, v in tensors.items() if k.startswith("model.")})
        best_state = {k[5:]: v.to(device) for k, v in tensors.items() if k.startswith("best.")}
        opt.load_state_dict(unflatten_optimizer(tensors, meta["optimizer"]))
        sched.load_state_dict(meta["scheduler"])
        start, best_val, best_epoch, bad = meta["epoch"] + 1, meta["best_val"], meta["best_epoch"], meta["bad_epochs"]
        best_val = math.inf if best_val is None else best_val
        history, done = meta["history"], meta["done"]
        if rank == 0:
            LOG.info("fold %d: resuming from epoch %d checkpoint", fold, start)
    net: torch.nn.Module = LossModule(model)
    if world > 1 and not done:  # all ranks read the same checkpoint, so all wrap (a collective) or none
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    def save_checkpoint(epoch: int, finished: bool) -> None:
        if ckpt is None or rank != 0:
            return
        opt_t, opt_meta = flatten_optimizer(opt.state_dict())
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        tensors.update({f"best.{k}": v for k, v in best_state.items()})
        tensors.update(opt_t)
        meta = dict(_checkpoint_meta(settings, fold, dhash), epoch=epoch, best_epoch=best_epoch,
                    best_val=None if math.isinf(best_val) else best_val, bad_epochs=bad,
                    history=history, done=finished, optimizer=opt_meta, scheduler=sched.state_dict())
        save_tensors(ckpt, tensors, meta)

    n = len(train_data)
    # epoch n/N, elapsed<left (left: at the current pace if no early stop comes first), losses
    bar = tqdm(desc=f"{settings.model.name} fold {fold}", disable=not ts.progress or done or rank != 0,
               initial=start, total=ts.epochs, leave=False, unit="epoch", bar_format=PROGRESS_FORMAT)
    ran = 0
    for epoch in range(start, ts.epochs):
        if done:
            break
        net.train()
        rng = np.random.default_rng([ts.seed, fold, epoch])
        torch.manual_seed(_seed_int(ts.seed, fold, epoch))
        if ts.steps_per_epoch is None:
            order = rng.permutation(n)
            batches = [order[b:b + ts.batch_size] for b in range(0, n, ts.batch_size)]
        else:  # fixed number of batches drawn from consecutive permutations
            need = ts.steps_per_epoch * ts.batch_size
            order = np.concatenate([rng.permutation(n) for _ in range(math.ceil(need / n))])[:need]
            batches = np.split(order, ts.steps_per_epoch)
        losses = []
        for idx in batches:
            arrays = batch_arrays(model, train_data, train_masks, idx, rng, settings)  # the global batch
            batch, weight = shard_batch(arrays, latent_noise(model, settings, len(idx), device), world, rank, device)
            opt.zero_grad(set_to_none=True)
            with training_autocast(step_dtype, device):
                loss = net(batch)
            if world > 1:
                loss = loss * weight
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        losses = _global_step_losses(losses, world)
        sched.step()
        val = _validation_loss(model, val_data, val_masks, settings, device, fold)
        if val < best_val:
            best_val, best_epoch, bad = val, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val,
                        "lr": sched.get_last_lr()[0]})
        bar.set_postfix(loss=f"{np.mean(losses):.4g}", val=f"{val:.4g}", best=best_epoch, patience=f"{bad}/{ts.patience}",
                        refresh=False)
        bar.update(1)
        bar.refresh()  # every epoch, with its count: tqdm alone prints only if 0.1 s passed since the last print
        finished = bad >= ts.patience or epoch == ts.epochs - 1
        if finished or (epoch + 1 - start) % ts.checkpoint_every == 0:
            save_checkpoint(epoch, finished)
            distributed.barrier()  # no rank runs ahead of (or exits before) rank 0's checkpoint
        ran += 1
        if bad >= ts.patience:
            if rank == 0:
                LOG.info("fold %d: early stop at epoch %d (best %d)", fold, epoch, best_epoch)
            break
        if stop_after is not None and ran >= stop_after:
            break
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    return FoldResult(fold, model, [], [], best_epoch, float(best_val), history)


def _global_step_losses(losses: list[torch.Tensor], world: int) -> list[float]:
    """Per-step losses of the global batch: the ranks' weighted shard losses summed over ranks,
    divided by the number of ranks (the plain losses in a single process)."""
    if world == 1 or not losses:
        return [float(x) for x in losses]
    summed = distributed.all_reduce_sum(torch.stack(losses).to(torch.float64))
    return (summed / world).tolist()


def check_training_inputs(data: Sequence[np.ndarray], masks: Sequence[np.ndarray], settings: Settings) -> None:
    """Shapes must match the model grid and channel count; at least 3 controls."""
    if len(data) < 3:
        raise InputValidationError(f"training needs at least 3 control subjects, got {len(data)}")
    want = (settings.model.n_channels,) + tuple(settings.model.grid)
    for i, (d, m) in enumerate(zip(data, masks)):
        if tuple(d.shape) != want:
            raise InputValidationError(f"subject {i}: array shape {tuple(d.shape)}, model expects {want}")
        if tuple(m.shape) != want[1:]:
            raise InputValidationError(f"subject {i}: mask shape {tuple(m.shape)}, model expects {want[1:]}")
    if len(masks) != len(data):
        raise InputValidationError("one mask per subject is needed")


def train_folds(settings: Settings, data: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                analysis_masks: Sequence[np.ndarray] | None = None, checkpoint_dir: str | Path | None = None,
                on_fold: Callable[[FoldResult], None] | None = None,
                gradients: tuple[np.ndarray, np.ndarray] | None = None,
                heldout_scores: dict[int, list[np.ndarray]] | None = None,
                routes: Sequence | None = None) -> list[FoldResult]:
    """k-fold training + calibration on each fold's held-out controls (arrays on the grid).

    Models that are not trainable (the baselines) are fitted on each fold's training subjects
    (:func:`fit_fold`; ``gradients`` = the channels' (bvals, bvecs)) and calibrated alike.

    Data-parallel training, either way:

    * started by torchrun: the process group is joined here and every rank trains every fold
      (all ranks must call this with the same arguments); rank 0 alone calibrates (the other
      ranks' results have ``calibration=None``) and calls ``on_fold``.
    * ``settings.training.processes`` N > 1 (and no process group): N workers are spawned to
      train all folds, rank 0 writing the fold checkpoints (in ``checkpoint_dir``, or a
      temporary folder); this process then loads the finished folds from them and calibrates.

    ``heldout_scores`` (a dict, filled on rank 0): {fold: its held-out controls' score maps}, for
    :func:`calibrate_out_of_fold` without scoring them again.  ``routes``: each subject's
    :class:`~bids_uad.algorithms.registration.TemplateRoute` (on the grid of ``data``), for a model
    that works in template space (the template-space normative model); None otherwise.
    """
    heldout_scores = {} if heldout_scores is None else heldout_scores
    check_training_inputs(data, masks, settings)
    analysis_masks = masks if analysis_masks is None else analysis_masks
    data = [np.ascontiguousarray(d, dtype=np.float32) for d in data]
    masks = [np.asarray(m) > 0 for m in masks]
    plan = fold_plan(settings, data)
    results = []
    if not is_trainable(settings.model.name):
        for fold, tr, va, _ in plan:
            res, val_scores = fit_fold(settings, data, masks, tr, va, fold, gradients, routes)
            results.append(res)
            if distributed.rank() == 0:
                heldout_scores[res.fold] = calibrate_fold(res, settings, data, analysis_masks, routes, val_scores)
                if on_fold is not None:
                    on_fold(res)
        return results
    distributed.init_from_torchrun(resolve_device(settings.training.device))
    with ExitStack() as cleanup:
        if spawned_processes(settings) > 1 and not _all_folds_done(plan, checkpoint_dir):
            checkpoint_dir = _train_in_workers(settings, data, masks, plan, checkpoint_dir, cleanup)
        for fold, tr, va, fold_id in plan:
            res = train_fold(settings, [data[i] for i in tr], [masks[i] for i in tr],
                             [data[i] for i in va], [masks[i] for i in va], fold, checkpoint_dir,
                             data_id=fold_id)
            res.train_idx, res.val_idx = list(tr), list(va)
            results.append(res)
    if distributed.rank() != 0:
        return results
    raw = {}
    if normaliser_of(results[0].model) is not None:  # every fold trained: their score references
        raw = fit_score_normalisers(results, data, routes)
    for res in results:
        referred = ([refer_score(res.model, raw[res.fold, i], data[i], _route(routes, i)) for i in res.val_idx]
                    if raw else None)
        heldout_scores[res.fold] = calibrate_fold(res, settings, data, analysis_masks, routes, referred)
        if on_fold is not None:
            on_fold(res)
    return results


def _route(routes: Sequence | None, i: int):
    """Subject ``i``'s route to the template (None without routes)."""
    return None if routes is None else routes[i]


def calibrate_fold(res: FoldResult, settings: Settings, data: Sequence[np.ndarray],
                   analysis_masks: Sequence[np.ndarray], routes: Sequence | None = None,
                   scores: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
    """Null sample and written-map level of one fold from its held-out controls' score maps
    (``routes``: as :func:`train_folds`; ``scores``: those maps when already computed, in
    ``res.val_idx`` order); returns the score maps for :func:`calibrate_out_of_fold`."""
    va = res.val_idx
    fold = res.fold
    if scores is None:
        scores = [score_volume(res.model, data[i], route=_route(routes, i)) for i in va]
    scores = list(scores)
    amasks = [analysis_masks[i] for i in va]
    res.calibration = _calibrate_written_map(settings, scores, amasks, settings.training.seed + fold, list(va))
    LOG.info("fold %d: best epoch %d, val loss %.5g, %d healthy voxels calibrated, written-map level %.4g "
             "for FPR %.3g", fold, res.best_epoch, res.best_val_loss, res.calibration.n,
             res.calibration.level, settings.scoring.fpr)
    return scores


def _calibrate_written_map(settings: Settings, maps, masks, seed: int, subjects: Sequence[int]) -> Calibration:
    """:func:`~bids_uad.models.calibration.calibrate_written_map` with the settings' scoring (the
    smallest finding when the training data's voxel size is known); ``subjects``: each map's
    control, left out together."""
    scoring = settings.scoring
    return calibrate_written_map(maps, masks, scoring.fpr, lambda b: postprocess(b, scoring),
                                 scoring.max_null_samples, seed, scoring.voxel_ml, scoring.finding_familywise,
                                 groups=subjects)


def calibrate_out_of_fold(settings: Settings, folds: Sequence[FoldResult], data: Sequence[np.ndarray],
                          analysis_masks: Sequence[np.ndarray], scores: dict[int, list[np.ndarray]] | None = None,
                          routes: Sequence | None = None) -> Calibration:
    """One calibration from every control's *out-of-fold* score map (each control scored by the
    fold that held it out): the threshold of the model that is used (the best fold, or the fold
    ensemble).

    Why: a fold calibrates on its 1-2 held-out controls, so its written-map level is noisy
    (measured: held-out false-positive rates from 0.44 % to 2.3 % at a 1 % target), and choosing
    the best fold by its held-out controls' scores picks the fold whose controls looked most
    normal, i.e. whose threshold is lowest.  Pooling all k folds' held-out controls calibrates on
    every control and removes that selection.  Valid when the fold models share a score scale
    (the fitted baselines; :func:`bids_uad.training.fit.train_model` uses it only for them).  ``scores``: {fold: the held-out score maps} already
    computed by :func:`calibrate_fold` (recomputed when missing).
    """
    maps, masks, subjects = [], [], []
    for res in folds:
        fold_scores = (scores or {}).get(res.fold)
        if fold_scores is None:
            fold_scores = [score_volume(res.model, data[i], route=_route(routes, i)) for i in res.val_idx]
        maps += list(fold_scores)
        masks += [analysis_masks[i] for i in res.val_idx]
        subjects += list(res.val_idx)  # with repeated k-fold runs a control has a map per run
    cal = _calibrate_written_map(settings, maps, masks, settings.training.seed, subjects)
    LOG.info("out-of-fold calibration over %d maps of %d controls: %d healthy voxels, written-map level %.4g "
             "for FPR %.3g (written rate %.4g, each control left out %s)", len(maps), len(set(subjects)), cal.n,
             cal.level, settings.scoring.fpr, cal.written_fpr,
             "n/a" if cal.written_fpr_left_out is None else f"{cal.written_fpr_left_out:.4g}")
    return cal


def fit_fold(settings: Settings, data: Sequence[np.ndarray], masks: Sequence[np.ndarray], train_idx: Sequence[int],
             val_idx: Sequence[int], fold: int, gradients: tuple[np.ndarray, np.ndarray] | None,
             routes: Sequence | None = None) -> tuple[FoldResult, list[np.ndarray]]:
    """Fit a non-trainable model (a baseline) on the fold's training subjects (``routes``: as
    :func:`train_folds`, passed to the model only when it works in template space).

    Its "validation loss" is the mean score of the held-out controls inside their brain masks
    (lower: they look more normal), so the best fold is chosen as for the networks.  Returns the
    fold and its held-out controls' score maps (in ``val_idx`` order, for :func:`calibrate_fold`).
    """
    model = get_model(settings.model.name, settings.model)
    bvals, bvecs = gradients if gradients is not None else (None, None)
    if needs_template(model):
        model.fit([data[i] for i in train_idx], [masks[i] for i in train_idx], bvals, bvecs,
                  routes=[_route(routes, i) for i in train_idx])
    else:
        model.fit([data[i] for i in train_idx], [masks[i] for i in train_idx], bvals, bvecs)
    model.eval()

    def scored(idx):
        return [score_volume(model, data[i], route=_route(routes, i)) for i in idx]

    def mean_score(maps, idx):
        return float(np.mean([m[masks[i]].mean() for m, i in zip(maps, idx)])) if len(idx) else 0.0

    val_maps = scored(val_idx)
    val, train = mean_score(val_maps, val_idx), mean_score(scored(train_idx), train_idx)
    history = [{"epoch": 0, "train_loss": train, "val_loss": val, "lr": 0.0}]
    return FoldResult(fold, model, list(train_idx), list(val_idx), 0, val, history), val_maps


def fold_plan(settings: Settings, data: Sequence[np.ndarray]) -> list[tuple[int, list[int], list[int], str]]:
    """(fold, training indices, held-out indices, data id for the checkpoint) of every fold: the k
    folds of the first split, then those of each further repeat (``training.repeats``: another
    split, numbered on, so that every fold has its own initialisation and draws)."""
    hashes = [data_hash([d]) for d in data]  # once per subject, reused by every fold
    plan = []
    for repeat in range(settings.training.repeats):
        for tr, va in make_folds(len(data), settings.training.n_folds, settings.training.seed, repeat):
            fold_id = data_hash([np.frombuffer("".join(hashes[i] for i in (*tr, *va)).encode(), np.uint8)])
            plan.append((len(plan), tr.tolist(), va.tolist(), fold_id))
    return plan


def _all_folds_done(plan, checkpoint_dir: str | Path | None) -> bool:
    """Every fold of ``plan`` has a finished checkpoint (a re-run then needs no workers)."""
    if checkpoint_dir is None:
        return False
    for fold, *_ in plan:
        meta = Path(checkpoint_dir) / f"fold-{fold}.json"
        if not meta.is_file() or not json.loads(meta.read_text()).get("done"):
            return False
    return True


def spawned_processes(settings: Settings) -> int:
    """Training processes to spawn: ``training.processes`` (at most one per GPU on CUDA), or 1
    when this process already belongs to a process group (torchrun)."""
    if distributed.is_initialized():
        return 1
    return distributed.plan_processes(settings.training.processes, resolve_device(settings.training.device))


def _train_in_workers(settings: Settings, data: Sequence[np.ndarray], masks: Sequence[np.ndarray], plan,
                      checkpoint_dir: str | Path | None, cleanup: ExitStack) -> Path:
    """Train every fold of ``plan`` in spawned DDP workers; return the folder of their checkpoints.

    The arrays reach the workers as memory-mapped ``.npy`` files (shared pages, no pickling);
    the folder holding them is removed when ``cleanup`` closes.
    """
    ts = settings.training
    n = spawned_processes(settings)
    if checkpoint_dir is None:
        checkpoint_dir = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="bids_uad_train_"))
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    shared = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="arrays-", dir=checkpoint_dir)))
    for name, arrays, dtype in (("data", data, np.float32), ("masks", masks, bool)):
        out = np.lib.format.open_memmap(shared / f"{name}.npy", "w+", dtype, (len(arrays), *arrays[0].shape))
        for i, a in enumerate(arrays):
            out[i] = a
        out.flush()
        del out
    LOG.info("%s: training %d folds in %d DDP processes (%s, %d threads each, %s steps)", settings.model.name,
             len(plan), n, distributed.backend_for(resolve_device(ts.device)), max(1, ts.threads // n),
             str(training_dtype(ts.precision, resolve_device(ts.device))).replace("torch.", ""))
    distributed.launch(train_folds_worker, n, (settings.to_dict(), str(shared), plan, str(checkpoint_dir)),
                       device=resolve_device(ts.device), threads=max(1, ts.threads // n))
    return checkpoint_dir


def train_folds_worker(settings: dict, arrays_dir: str, plan: list, checkpoint_dir: str) -> list[dict]:
    """One spawned DDP rank (see :func:`distributed.launch`): train every fold of ``plan`` on the
    memory-mapped arrays, checkpointing into ``checkpoint_dir``; returns per-fold summaries."""
    settings = Settings.from_dict(settings)
    data = np.load(Path(arrays_dir) / "data.npy", mmap_mode="r")
    masks = np.load(Path(arrays_dir) / "masks.npy", mmap_mode="r")
    summary = []
    for fold, tr, va, fold_id in plan:
        res = train_fold(settings, [data[i] for i in tr], [masks[i] for i in tr], [data[i] for i in va],
                         [masks[i] for i in va], fold, checkpoint_dir, data_id=fold_id)
        summary.append({"fold": fold, "best_epoch": res.best_epoch, "best_val_loss": res.best_val_loss})
    return summary
