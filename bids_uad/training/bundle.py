"""A trained model: all fold networks + calibration + metadata, saved as safetensors + JSON.

Entry points for the group level:

* :func:`train_model` — arrays already on the grid (from :func:`prepare_subject`).
* :func:`train_from_dwi` — raw preprocessed dwi arrays with their gradient tables.
* :meth:`ModelBundle.save` / :func:`load_bundle` — ``<dir>/model-<name>.safetensors/.json``.
"""
from __future__ import annotations

import logging
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file

from bids_uad.errors import InputValidationError
from bids_uad.models import get_model
from bids_uad.models.io import data_hash, file_sha256, save_tensors
from bids_uad.models.validate import validate_model_file
from bids_uad.training.calibration import Calibration, pool
from bids_uad.training.inputs import B0_THRESHOLD, dw_gradients, prepare_subject, to_grid
from bids_uad.training.settings import Settings
from bids_uad.training.trainer import FoldResult, resolve_device, train_folds

LOG = logging.getLogger(__name__)
NORMALISATION = {"method": "dw / mean(b0), clipped to [0, 1], b0 removed, masked",
                 "b0_threshold": B0_THRESHOLD, "grid": "centre pad/crop"}


def _versions() -> dict[str, str]:
    import safetensors
    try:
        from importlib.metadata import version
        own = version("bids_uad")
    except Exception:  # not installed as a distribution
        own = "unknown"
    return {"bids_uad": own, "torch": torch.__version__, "numpy": np.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


@dataclass
class ModelBundle:
    """Fold models of one architecture with their calibrations and provenance."""

    settings: Settings
    folds: list[FoldResult]
    ref_bvals: np.ndarray
    ref_bvecs: np.ndarray
    subjects: list[str]
    data_hash: str = ""
    versions: dict = field(default_factory=_versions)
    path: Path | None = None  # set when saved or loaded
    file_hash: str | None = None

    @property
    def name(self) -> str:
        return self.settings.model.name

    def best_fold(self) -> int:
        """Index of the fold with the lowest validation loss (the default single model)."""
        return int(np.argmin([f.best_val_loss for f in self.folds]))

    def calibration(self, ensemble: bool = False, fold: int | None = None) -> Calibration | None:
        """Null sample for a single fold, or pooled over folds for the ensemble."""
        if ensemble:
            cals = [f.calibration for f in self.folds]
            return None if any(c is None for c in cals) else pool(cals)
        return self.folds[self.best_fold() if fold is None else fold].calibration

    def to(self, device: str) -> "ModelBundle":
        dev = resolve_device(device)
        for f in self.folds:
            f.model.to(dev)
        return self

    def metadata(self) -> dict:
        """JSON part of the model file."""
        return {
            "architecture": {"name": self.name, "class": type(self.folds[0].model).__name__},
            "settings": self.settings.to_dict(),
            "normalisation": NORMALISATION,
            "reference_gradients": {"bvals": np.asarray(self.ref_bvals, float).tolist(),
                                    "bvecs": np.asarray(self.ref_bvecs, float).tolist()},
            "training_subjects": list(self.subjects),
            "folds": [{"fold": f.fold, "train_subjects": [self.subjects[i] for i in f.train_idx],
                       "heldout_subjects": [self.subjects[i] for i in f.val_idx],
                       "best_epoch": f.best_epoch, "best_val_loss": f.best_val_loss, "history": f.history,
                       "calibration": None if f.calibration is None else {
                           "n_healthy_voxels": f.calibration.n,
                           "threshold_at_fpr": f.calibration.threshold(self.settings.scoring.fpr),
                           "fpr": self.settings.scoring.fpr}}
                      for f in self.folds],
            "best_fold": self.best_fold(),
            "versions": self.versions,
            "data_hash": self.data_hash,
        }

    def save(self, directory: str | Path) -> Path:
        """Write ``<directory>/model-<name>.safetensors`` + ``.json``; return the JSON path."""
        tensors = {}
        for f in self.folds:
            tensors.update({f"fold{f.fold}.{k}": v for k, v in f.model.state_dict().items()})
            if f.calibration is not None:
                tensors[f"fold{f.fold}.calibration.null"] = torch.from_numpy(f.calibration.null)
        stem = Path(directory) / f"model-{self.name}"
        out = save_tensors(stem, tensors, self.metadata())
        self.path, self.file_hash = out, file_sha256(stem.with_suffix(".safetensors"))
        return out


def load_bundle(path: str | Path, device: str = "cpu") -> ModelBundle:
    """Load a bundle from ``model-<name>.json``/``.safetensors``, their stem, or a folder holding
    exactly one ``model-*.json``; no pickle involved."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("model-*.json"))
        if len(found) != 1:
            raise InputValidationError(f"expected one model-*.json in the folder, found {len(found)}", path)
        path = found[0]
    checked = validate_model_file(path)  # the same checks as at start-up (--model)
    tensors, meta, settings = load_file(str(checked.tensor_path)), checked.meta, checked.settings
    dev = resolve_device(device)
    subjects = meta["training_subjects"]
    folds = []
    for fm in meta["folds"]:
        k = fm["fold"]
        prefix = f"fold{k}."
        model = get_model(settings.model.name, settings.model)
        state = {n[len(prefix):]: t for n, t in tensors.items()
                 if n.startswith(prefix) and not n.startswith(prefix + "calibration.")}
        model.load_state_dict(state, strict=True)
        model.to(dev).eval()
        null = tensors.get(prefix + "calibration.null")
        index = {s: i for i, s in enumerate(subjects)}
        folds.append(FoldResult(k, model, [index[s] for s in fm["train_subjects"]],
                                [index[s] for s in fm["heldout_subjects"]], fm["best_epoch"],
                                fm["best_val_loss"], fm["history"],
                                None if null is None else Calibration(null.numpy())))
    stem = Path(path).with_suffix("") if Path(path).suffix in (".json", ".safetensors") else Path(path)
    return ModelBundle(settings, folds, np.asarray(meta["reference_gradients"]["bvals"]),
                       np.asarray(meta["reference_gradients"]["bvecs"]), subjects, meta["data_hash"],
                       meta["versions"], stem.with_suffix(".json"), meta["tensor_sha256"])


def train_model(settings: Settings, data: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                subjects: Sequence[str], ref_bvals: np.ndarray, ref_bvecs: np.ndarray,
                analysis_masks: Sequence[np.ndarray] | None = None,
                checkpoint_dir: str | Path | None = None) -> ModelBundle:
    """Train and calibrate all folds on control arrays (C, X, Y, Z) already on the model grid.

    ``ref_bvals``/``ref_bvecs`` describe the channels (b0s removed) and are stored so that
    inference can reconcile other protocols.  ``analysis_masks`` (default: brain masks)
    select the healthy voxels used for calibration.
    """
    if len(subjects) != len(data):
        raise InputValidationError(f"{len(subjects)} subject labels for {len(data)} arrays")
    if len(set(subjects)) != len(subjects):
        raise InputValidationError("subject labels must be unique")
    if len(ref_bvals) != settings.model.n_channels:
        raise InputValidationError(
            f"{len(ref_bvals)} reference b-values but the model has {settings.model.n_channels} channels")
    folds = train_folds(settings, data, masks, analysis_masks, checkpoint_dir)
    return ModelBundle(settings, folds, np.asarray(ref_bvals, float), np.asarray(ref_bvecs, float),
                       list(subjects), data_hash(data))


def train_from_dwi(settings: Settings, dwis: Sequence[np.ndarray], bvals: Sequence[np.ndarray],
                   bvecs: Sequence[np.ndarray], masks: Sequence[np.ndarray], subjects: Sequence[str],
                   analysis_masks: Sequence[np.ndarray] | None = None,
                   checkpoint_dir: str | Path | None = None) -> ModelBundle:
    """Like :func:`train_model` from raw preprocessed dwi (with b0s) in diffusion space.

    The first subject's diffusion-weighted gradient table is the reference; the others are
    reconciled to it (permutation or SH resampling; a different b-value raises).
    """
    if len(dwis) < 3:
        raise InputValidationError(f"training needs at least 3 control subjects, got {len(dwis)}")
    ref_bvals, ref_bvecs = dw_gradients(bvals[0], bvecs[0])
    grid = settings.model.grid
    prepared = [prepare_subject(d, bv, bc, m, grid, ref_bvals, ref_bvecs)
                for d, bv, bc, m in zip(dwis, bvals, bvecs, masks)]
    amasks = None
    if analysis_masks is not None:
        amasks = [to_grid(np.asarray(a) > 0, grid)[0] for a in analysis_masks]
    return train_model(settings, [p.data for p in prepared], [p.mask for p in prepared], subjects,
                       ref_bvals, ref_bvecs, amasks, checkpoint_dir)
