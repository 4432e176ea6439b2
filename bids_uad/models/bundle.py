"""A trained model: all fold networks + calibration + metadata, saved as safetensors + JSON.

The artefact that the group level writes and inference reads:

* :class:`FoldResult` — one fold's network with its calibration and bookkeeping.
* :class:`ModelBundle` — the folds of one architecture; :meth:`ModelBundle.save` /
  :func:`load_bundle` — ``<dir>/model-<name>.safetensors/.json``.
* :func:`score_volume` — one network's score map of one subject on the model grid (its last step,
  the score's median filter: :func:`filtered_score`).

Training lives in :mod:`bids_uad.training` (:func:`bids_uad.training.fit.train_model`).
"""
from __future__ import annotations

import logging
import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from bids_uad.algorithms.robust import masked_median_filter
from bids_uad.bids.gradients import B0_THRESHOLD
from bids_uad.errors import InputValidationError, UsageError
from bids_uad.models import get_model
from bids_uad.models.calibration import Calibration, pool
from bids_uad.models.io import file_sha256, save_tensors
from bids_uad.models.normaliser import normaliser_of
from bids_uad.models.settings import Settings, needs_template
from bids_uad.models.validate import validate_model_file

LOG = logging.getLogger(__name__)
NORMALISATION = {"method": "dw / mean(b0), clipped to [0, 1], b0 removed, masked",
                 "b0_threshold": B0_THRESHOLD, "grid": "centre pad/crop"}


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when available, else CPU; 'cuda' without a GPU is a usage error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("device 'cuda' requested but no CUDA device is available")
    return torch.device(name)


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


def brain_of(data: np.ndarray) -> np.ndarray:
    """A subject's brain on the model grid (C, X, Y, Z): where the mean of its channels is positive
    (the inputs are zero outside its brain mask)."""
    return np.asarray(data).mean(0) > 0


@torch.no_grad()
def score_volume(model: torch.nn.Module, data: np.ndarray, device: torch.device | str | None = None,
                 route=None, raw: bool = False) -> np.ndarray:
    """Score map (X, Y, Z) float32 of one subject (C, X, Y, Z) on the model grid; ``route``: the
    subject's :class:`~bids_uad.algorithms.registration.TemplateRoute` for a model that works in
    template space (:func:`needs_template`), else None.  A network with a score reference
    (:mod:`bids_uad.models.normaliser`) gives its robust z against the controls' scores there;
    ``raw``: its score before that (what the reference is fitted on)."""
    if device is None:  # the baselines have buffers only
        first = next(iter(model.parameters()), None)
        first = next(iter(model.buffers()), None) if first is None else first
        device = torch.device("cpu") if first is None else first.device
    device = torch.device(device)
    model.eval()
    x = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None].to(device)
    if normaliser_of(model) is not None:
        scored = model.score(x)[0].float().cpu().numpy()
        return scored if raw else refer_score(model, scored, data, route)
    scored = model.score(x) if not needs_template(model) else model.score(x, routes=[route])
    return filtered_score(model, scored[0].float().cpu().numpy(), brain_of(data))


def refer_score(model: torch.nn.Module, raw: np.ndarray, data: np.ndarray, route) -> np.ndarray:
    """A network's raw score map of ``data`` (:func:`score_volume` with ``raw``) referred to its
    controls' (robust z), as :func:`score_volume` gives it without ``raw``."""
    brain = brain_of(data)
    return filtered_score(model, normaliser_of(model).zscore(raw, brain, route), brain)


def filtered_score(model: torch.nn.Module, score: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """The model's score map after its masked median filter (``model.score_median`` voxels wide,
    inside ``brain``: where the mean of the subject's channels is positive), the last step of every
    model's score, before calibration and thresholding."""
    width = model.settings.score_median
    if width == 1:
        return score
    return masked_median_filter(score, brain, width).astype(np.float32)


def signed_score(model: torch.nn.Module, data: np.ndarray, route) -> tuple[np.ndarray, np.ndarray]:
    """A referred network's z maps of ``data`` before they are folded into its score
    (:meth:`~bids_uad.models.normaliser.ScoreNormaliser.signed`: (M, X, Y, Z), where defined): what a
    fold ensemble averages."""
    raw = score_volume(model, data, raw=True)
    return normaliser_of(model).signed(raw, brain_of(data), route)


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
    #: every control's out-of-fold scores pooled (:func:`bids_uad.training.trainer.calibrate_out_of_fold`):
    #: the calibration of the model that is used, when present (older model files lack it)
    out_of_fold: Calibration | None = None

    @property
    def name(self) -> str:
        return self.settings.model.name

    def best_fold(self) -> int:
        """Index of the fold with the lowest validation loss (the default single model)."""
        return int(np.argmin([f.best_val_loss for f in self.folds]))

    def calibration(self, ensemble: bool = False, fold: int | None = None) -> Calibration | None:
        """The calibration of the model that is used: the out-of-fold one over every control when the
        file has it (best fold and ensemble alike), else the best fold's own or, for the ensemble,
        the folds' pooled; ``fold`` = that fold's own (its held-out controls only)."""
        if fold is None and self.out_of_fold is not None:
            return self.out_of_fold
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
                       "calibration": None if f.calibration is None else _calibration_meta(
                           f.calibration, self.settings.scoring.fpr)}
                      for f in self.folds],
            "calibration": None if self.out_of_fold is None else {
                "method": "out-of-fold: every training control scored by the fold that held it out",
                **_calibration_meta(self.out_of_fold, self.settings.scoring.fpr)},
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
        if self.out_of_fold is not None:
            tensors["calibration.null"] = torch.from_numpy(self.out_of_fold.null)
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
        cm = fm.get("calibration") or {}
        index = {s: i for i, s in enumerate(subjects)}
        folds.append(FoldResult(k, model, [index[s] for s in fm["train_subjects"]],
                                [index[s] for s in fm["heldout_subjects"]], fm["best_epoch"],
                                fm["best_val_loss"], fm["history"],
                                None if null is None else _calibration_from(null, cm)))
    stem = Path(path).with_suffix("") if Path(path).suffix in (".json", ".safetensors") else Path(path)
    return ModelBundle(settings, folds, np.asarray(meta["reference_gradients"]["bvals"]),
                       np.asarray(meta["reference_gradients"]["bvecs"]), subjects, meta["data_hash"],
                       meta["versions"], stem.with_suffix(".json"), meta["tensor_sha256"],
                       None if "calibration.null" not in tensors else _calibration_from(
                           tensors["calibration.null"], meta.get("calibration") or {}))


def _calibration_meta(cal: Calibration, fpr: float) -> dict:
    """JSON record of a calibration (its null sample is a tensor)."""
    return {"n_healthy_voxels": cal.n, "threshold_at_fpr": cal.threshold_for(fpr), "fpr": fpr,
            "voxelwise_threshold_at_fpr": cal.threshold(fpr), "written_map_level": cal.level,
            "written_map_target_fpr": cal.target_fpr, "written_map_fpr_on_calibration_controls": cal.written_fpr,
            "written_map_fpr_left_out": cal.written_fpr_left_out, "finding_min_volume_ml": cal.finding_min_ml}


def _calibration_from(null: torch.Tensor, record: dict) -> Calibration:
    return Calibration(null.numpy(), record.get("written_map_level"), record.get("written_map_target_fpr"),
                       record.get("written_map_fpr_on_calibration_controls"), record.get("finding_min_volume_ml"),
                       record.get("written_map_fpr_left_out"))
