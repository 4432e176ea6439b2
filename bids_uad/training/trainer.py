"""k-fold training of one registered model on control subjects, with resumable checkpoints.

Randomness is derived from (seed, fold, epoch): model initialisation from (seed, fold),
batch order, synthetic patches and VAE sampling from (seed, fold, epoch).  A run resumed
from an epoch checkpoint therefore continues bit-identically (on the same device/threads).
Checkpoints are safetensors + JSON (model, Adam state flattened, best weights, counters).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from bids_uad.errors import InputValidationError, UsageError
from bids_uad.models import get_model
from bids_uad.models.io import data_hash, flatten_optimizer, load_tensors, save_tensors, unflatten_optimizer
from bids_uad.training.calibration import Calibration, calibrate
from bids_uad.training.folds import make_folds
from bids_uad.training.ood import add_ood_patches
from bids_uad.training.settings import Settings

LOG = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when available, else CPU; 'cuda' without a GPU is a usage error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("device 'cuda' requested but no CUDA device is available")
    return torch.device(name)


def _seed_int(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


@dataclass
class FoldResult:
    """One trained fold: the best-validation model and its bookkeeping."""

    fold: int
    model: torch.nn.Module
    train_idx: list[int]
    val_idx: list[int]
    best_epoch: int
    best_val_loss: float
    history: list[dict] = field(default_factory=list)
    calibration: Calibration | None = None


def make_batch(model, data, masks, idx, rng, settings: Settings, device) -> dict[str, torch.Tensor]:
    """Stack subjects ``idx`` (and their brain masks, ``"mask"``) into a batch; corrupt inputs with
    synthetic patches if the model needs them."""
    clean = np.stack([data[i] for i in idx])
    batch = {"clean": clean, "mask": np.stack([np.asarray(masks[i], np.float32) for i in idx])}
    if getattr(model, "needs_ood", False):
        pairs = [add_ood_patches(data[i], masks[i], rng, settings.ood) for i in idx]
        batch["input"] = np.stack([p[0] for p in pairs])
        batch["anomaly"] = np.stack([p[1] for p in pairs])
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in batch.items()}


def _validation_loss(model, data, masks, settings, device, fold) -> float:
    """Mean loss over held-out controls with fixed synthetic patches (comparable across epochs)."""
    model.eval()
    rng = np.random.default_rng([settings.training.seed, fold, 999_983])
    total = 0.0
    with torch.no_grad():
        for i in range(len(data)):
            loss, _ = model.loss(make_batch(model, data, masks, [i], rng, settings, device))
            total += float(loss)
    return total / max(len(data), 1)


def _checkpoint_meta(settings: Settings, fold: int, dhash: str) -> dict:
    return json.loads(json.dumps({"settings": settings.to_dict(), "fold": fold, "data_hash": dhash}))


def train_fold(settings: Settings, train_data: Sequence[np.ndarray], train_masks: Sequence[np.ndarray],
               val_data: Sequence[np.ndarray], val_masks: Sequence[np.ndarray], fold: int = 0,
               checkpoint_dir: str | Path | None = None, stop_after: int | None = None,
               data_id: str | None = None) -> FoldResult:
    """Train one fold; returns the model with its best validation weights.

    ``checkpoint_dir``: epoch checkpoints ``fold-<k>.safetensors/.json`` are written there and
    a present checkpoint is resumed.  ``stop_after`` (tests) stops after that many epochs
    in this call, as if the process had been killed.  ``data_id`` identifies the data in the
    checkpoint (default: a hash of the arrays).
    """
    ts = settings.training
    torch.set_num_threads(max(1, ts.threads))
    device = resolve_device(ts.device)
    torch.manual_seed(_seed_int(ts.seed, fold))
    model = get_model(settings.model.name, settings.model).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=ts.learning_rate)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=ts.lr_decay)
    dhash = data_id or data_hash(list(train_data) + list(val_data))
    start, best_val, best_epoch, bad, history = 0, math.inf, -1, 0, []
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    done = False
    ckpt = Path(checkpoint_dir) / f"fold-{fold}" if checkpoint_dir is not None else None
    if ckpt is not None and ckpt.with_suffix(".json").is_file():
        tensors, meta = load_tensors(ckpt)
        expected = _checkpoint_meta(settings, fold, dhash)
        if any(meta.get(k) != v for k, v in expected.items()):
            raise UsageError(f"checkpoint {ckpt} was written for other settings or data; "
                             "use an empty checkpoint directory", ckpt)
        model.load_state_dict({k[6:]: v.to(device) for k, v in tensors.items() if k.startswith("model.")})
        best_state = {k[5:]: v.to(device) for k, v in tensors.items() if k.startswith("best.")}
        opt.load_state_dict(unflatten_optimizer(tensors, meta["optimizer"]))
        sched.load_state_dict(meta["scheduler"])
        start, best_val, best_epoch, bad = meta["epoch"] + 1, meta["best_val"], meta["best_epoch"], meta["bad_epochs"]
        best_val = math.inf if best_val is None else best_val
        history, done = meta["history"], meta["done"]
        LOG.info("fold %d: resuming from epoch %d checkpoint", fold, start)

    def save_checkpoint(epoch: int, finished: bool) -> None:
        if ckpt is None:
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
    bar = tqdm(range(start, ts.epochs), desc=f"{settings.model.name} fold {fold}", disable=not ts.progress or done,
               initial=start, total=ts.epochs, leave=False)
    ran = 0
    for epoch in bar:
        if done:
            break
        model.train()
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
            batch = make_batch(model, train_data, train_masks, idx, rng, settings, device)
            opt.zero_grad(set_to_none=True)
            loss, _ = model.loss(batch)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        sched.step()
        val = _validation_loss(model, val_data, val_masks, settings, device, fold)
        if val < best_val:
            best_val, best_epoch, bad = val, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val,
                        "lr": sched.get_last_lr()[0]})
        bar.set_postfix(loss=f"{np.mean(losses):.4g}", val=f"{val:.4g}")
        finished = bad >= ts.patience or epoch == ts.epochs - 1
        if finished or (epoch + 1 - start) % ts.checkpoint_every == 0:
            save_checkpoint(epoch, finished)
        ran += 1
        if bad >= ts.patience:
            LOG.info("fold %d: early stop at epoch %d (best %d)", fold, epoch, best_epoch)
            break
        if stop_after is not None and ran >= stop_after:
            break
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    return FoldResult(fold, model, [], [], best_epoch, float(best_val), history)


@torch.no_grad()
def score_volume(model: torch.nn.Module, data: np.ndarray, device: torch.device | str | None = None) -> np.ndarray:
    """Score map (X, Y, Z) float32 of one subject (C, X, Y, Z) on the model grid."""
    device = next(model.parameters()).device if device is None else torch.device(device)
    model.eval()
    x = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None].to(device)
    return model.score(x)[0].float().cpu().numpy()


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
                on_fold: Callable[[FoldResult], None] | None = None) -> list[FoldResult]:
    """k-fold training + calibration on each fold's held-out controls (arrays on the grid)."""
    check_training_inputs(data, masks, settings)
    analysis_masks = masks if analysis_masks is None else analysis_masks
    data = [np.ascontiguousarray(d, dtype=np.float32) for d in data]
    masks = [np.asarray(m) > 0 for m in masks]
    results = []
    hashes = [data_hash([d]) for d in data]  # once per subject, reused by every fold
    for fold, (tr, va) in enumerate(make_folds(len(data), settings.training.n_folds, settings.training.seed)):
        fold_id = data_hash([np.frombuffer("".join(hashes[i] for i in (*tr, *va)).encode(), np.uint8)])
        res = train_fold(settings, [data[i] for i in tr], [masks[i] for i in tr],
                         [data[i] for i in va], [masks[i] for i in va], fold, checkpoint_dir,
                         data_id=fold_id)
        res.train_idx, res.val_idx = tr.tolist(), va.tolist()
        scores = [score_volume(res.model, data[i]) for i in va]
        res.calibration = calibrate(scores, [analysis_masks[i] for i in va],
                                    settings.scoring.max_null_samples, settings.training.seed + fold)
        LOG.info("fold %d: best epoch %d, val loss %.5g, %d healthy voxels calibrated",
                 fold, res.best_epoch, res.best_val_loss, res.calibration.n)
        results.append(res)
        if on_fold is not None:
            on_fold(res)
    return results
