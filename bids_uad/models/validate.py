"""Validation of trained-model files (``model-<name>.json`` + ``.safetensors``) before any work.

One function, :func:`validate_model_file`, is used at start-up (``--model``, by the CLI,
before anything is written or preprocessed) and by :func:`bids_uad.models.bundle.load_bundle`
when a node loads the model, so both see the same rules:

* the right kind of file (exit 64 otherwise): ``--model`` names a model JSON, its tensors, or
  a folder of them; the JSON says it is a bids_uad model; the tensors are safetensors (a
  pickle or a ``torch.save`` archive is refused by its first bytes, never unpickled);
* a well-formed model (exit 16 otherwise, naming the file and the field): schema and field
  types, a registered model name, architecture sizes within :data:`ARCHITECTURE_BOUNDS`
  (checked before any allocation: the network is built on torch's ``meta`` device), tensor
  names and shapes equal to the architecture's, the tensor file's SHA-256, and a referred
  network's fitted score reference (its small scale tensors are the only ones read).
"""
from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bids_uad.errors import BidsUadError, InputMissingError, InputValidationError, UsageError
from bids_uad.models.inputs import sized_to_inputs
from bids_uad.models.io import META_SUFFIX, TENSOR_SUFFIX, file_sha256, foreign_format, read_safetensors_header

#: the ``format`` field every model JSON carries (written by :func:`bids_uad.models.io.save_tensors`)
MODEL_FORMAT = "bids_uad-safetensors-json/1"
#: inclusive upper bounds of architecture fields; a model beyond them is refused unbuilt
ARCHITECTURE_BOUNDS = {"grid": 512, "grid_voxels": 256 ** 3, "n_channels": 1024, "features": 512,
                       "max_features": 2048, "depth": 8, "latent_size": 4096, "parameters": 500_000_000,
                       "noise_scale": 512, "noise_std": 10.0}


@dataclass(frozen=True)
class ModelFile:
    """A checked model file: its paths, JSON content, settings and tensor shapes (not loaded)."""

    json_path: Path
    tensor_path: Path
    meta: dict
    settings: Any  # bids_uad settings.Settings
    shapes: dict[str, tuple[int, ...]]


def _bad(path: Path, field: str, problem: str) -> InputValidationError:
    return InputValidationError(f"bad model file: {field}: {problem}", path)


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- which files -------------------------------------------------------------------------------
def model_files(path: str | Path) -> list[Path]:
    """``--model``: one ``model-<name>.json`` (or its ``.safetensors``) or a folder of them.

    A file of another kind is a usage error (64); a folder with no model, or a model JSON
    without its tensors, is missing input (66).
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("model-*.json"))
        if not files:
            raise InputMissingError("no trained model found (model-<name>.json with its .safetensors)", path)
    elif path.suffix in (META_SUFFIX, TENSOR_SUFFIX):
        files = [path.with_suffix(META_SUFFIX)]
    elif path.exists():
        raise UsageError("not a model file: --model takes model-<name>.json (with its .safetensors) "
                         "or a folder of them", path)
    else:
        raise InputMissingError("model file or folder does not exist", path)
    for f in files:
        for p in (f, f.with_suffix(TENSOR_SUFFIX)):
            if not p.is_file():
                raise InputMissingError("model file missing (a model is a .json with its .safetensors)", p)
    return files


def validate_model_argument(path: str | Path) -> list[ModelFile]:
    """Start-up check of ``--model``: every model it names, fully validated."""
    return [validate_model_file(f) for f in model_files(path)]


# -- the tensor file -----------------------------------------------------------------------------
def _refuse_foreign_format(path: Path) -> None:
    """A pickle or a zip archive given as a model is the wrong kind of file (64), never opened."""
    with open(path, "rb") as fh:
        kind = foreign_format(fh.read(8))
    if kind is not None:
        raise UsageError(f"wrong kind of file: {kind}, not safetensors/JSON (refused, never unpickled)", path)


# -- the JSON ------------------------------------------------------------------------------------
def _matches(value: Any, hint: Any) -> bool:
    """Does a JSON value fit a settings field's type hint (lists stand for tuples)?"""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    return True


def _check_settings_types(path: Path, data: Any, cls: type, where: str) -> None:
    """Every key known and every value of its field's type, recursively over the dataclasses."""
    if not isinstance(data, dict):
        raise _bad(path, where, f"expected an object, found {_short(data)}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key, value in data.items():
        if key not in known:
            raise _bad(path, f"{where}.{key}", f"unknown field (known: {', '.join(sorted(known))})")
        hint = hints[key]
        if is_dataclass(hint):
            _check_settings_types(path, value, hint, f"{where}.{key}")
        elif not _matches(value, hint):
            name = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
            raise _bad(path, f"{where}.{key}", f"expected {name}, found {_short(value)}")


def _check_bounds(path: Path, model: Any) -> None:
    b = ARCHITECTURE_BOUNDS
    grid = tuple(model.grid)
    if any(not 1 <= g <= b["grid"] for g in grid) or math.prod(grid) > b["grid_voxels"]:
        raise _bad(path, "settings.model.grid", f"{list(grid)} is outside the bounds (each side <= {b['grid']}, "
                   f"at most {b['grid_voxels']} voxels)")
    for key in ("n_channels", "features", "max_features", "depth", "latent_size", "noise_scale"):
        value = getattr(model, key)
        if not 1 <= value <= b[key]:
            raise _bad(path, f"settings.model.{key}", f"{value} is outside the bounds [1, {b[key]}]")
    if not 0 <= model.context_boxes <= 64:
        raise _bad(path, "settings.model.context_boxes", f"{model.context_boxes} is outside the bounds [0, 64]")
    if not 0 <= model.noise_std <= b["noise_std"]:
        raise _bad(path, "settings.model.noise_std", f"{model.noise_std} is outside the bounds [0, {b['noise_std']}]")


def _expected_shapes(path: Path, settings: Any) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the architecture, from a network built on the meta device (no memory)."""
    import torch

    from bids_uad.models import MODELS, get_model

    if settings.model.name not in MODELS:
        raise _bad(path, "settings.model.name",
                   f"unknown model {settings.model.name!r} (known: {', '.join(sorted(MODELS))})")
    try:
        with torch.device("meta"):
            net = get_model(settings.model.name, settings.model)
    except BidsUadError as exc:
        raise _bad(path, "settings.model", str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - an inconsistent architecture of any kind
        raise _bad(path, "settings.model", f"cannot build the architecture ({type(exc).__name__}: {exc})") from None
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    n_params = sum(math.prod(s) for s in shapes.values())
    if n_params > ARCHITECTURE_BOUNDS["parameters"]:
        raise _bad(path, "settings.model", f"{n_params} parameters exceed the bound of "
                   f"{ARCHITECTURE_BOUNDS['parameters']}")
    return shapes


def _require(path: Path, meta: dict, key: str, kind: type, what: str) -> Any:
    if key not in meta:
        raise _bad(path, key, "missing")
    value = meta[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise _bad(path, key, f"expected {what}, found {_short(value)}")
    return value


def _check_json(path: Path, meta: dict) -> Any:
    """Schema of the model JSON; returns the settings object."""
    from bids_uad.models.settings import Settings

    sha = _require(path, meta, "tensor_sha256", str, "a SHA-256 hex string")
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise _bad(path, "tensor_sha256", f"not a SHA-256 hex string: {_short(sha)}")
    _check_settings_types(path, _require(path, meta, "settings", dict, "an object"), Settings, "settings")
    try:
        settings = Settings.from_dict(meta["settings"])
    except BidsUadError as exc:
        raise _bad(path, "settings", str(exc)) from None
    arch = _require(path, meta, "architecture", dict, "an object")
    if arch.get("name") != settings.model.name:
        raise _bad(path, "architecture.name", f"{_short(arch.get('name'))} differs from settings.model.name "
                   f"{settings.model.name!r}")
    _check_bounds(path, settings.model)
    grads = _require(path, meta, "reference_gradients", dict, "an object")
    n = settings.model.n_channels
    try:
        bvals = np.asarray(grads.get("bvals"), dtype=float)
        bvecs = np.asarray(grads.get("bvecs"), dtype=float)
    except (TypeError, ValueError):
        raise _bad(path, "reference_gradients", "bvals/bvecs are not numeric arrays") from None
    if settings.model.inputs != "dwi":  # n_channels from the shells of the dw volumes (with them: "both")
        ok = bvals.ndim == 1 and bvals.size > 0 and np.all(np.isfinite(bvals)) and np.all(bvals > 0)
        if not ok or sized_to_inputs(settings.model, bvals) != settings.model:
            raise _bad(path, "reference_gradients.bvals", f"expected positive b-values that give {n} "
                       f"{settings.model.inputs} input channels ({settings.model.feature_channels} features; "
                       f"settings.model.n_channels, feature_channels), found shape {list(bvals.shape)}")
        n = bvals.size
    elif bvals.shape != (n,) or not np.all(np.isfinite(bvals)) or np.any(bvals <= 0):
        raise _bad(path, "reference_gradients.bvals", f"expected {n} positive b-values (settings.model.n_channels), "
                   f"found shape {list(bvals.shape)}")
    if bvecs.shape != (n, 3) or not np.all(np.isfinite(bvecs)):
        raise _bad(path, "reference_gradients.bvecs", f"expected {n} finite 3-vectors, found shape {list(bvecs.shape)}")
    subjects = _require(path, meta, "training_subjects", list, "a list of labels")
    if not all(isinstance(s, str) for s in subjects) or len(set(subjects)) != len(subjects):
        raise _bad(path, "training_subjects", "expected unique string labels")
    folds = _require(path, meta, "folds", list, "a list of folds")
    if not folds:
        raise _bad(path, "folds", "empty: a model has at least one fold")
    seen = set()
    for i, fold in enumerate(folds):
        where = f"folds[{i}]"
        if not isinstance(fold, dict):
            raise _bad(path, where, "expected an object")
        k = _require(path, fold, "fold", int, "a fold number") if "fold" in fold else None
        if k is None or k < 0 or k in seen:
            raise _bad(path, f"{where}.fold", f"missing, negative or repeated ({_short(fold.get('fold'))})")
        seen.add(k)
        for key in ("train_subjects", "heldout_subjects"):
            names = fold.get(key)
            if not isinstance(names, list) or not all(isinstance(s, str) and s in subjects for s in names):
                raise _bad(path, f"{where}.{key}", "expected a list of labels from training_subjects")
        if not _matches(fold.get("best_epoch"), int):
            raise _bad(path, f"{where}.best_epoch", f"expected int, found {_short(fold.get('best_epoch'))}")
        if not _matches(fold.get("best_val_loss"), float):
            raise _bad(path, f"{where}.best_val_loss", f"expected a finite number, found {_short(fold.get('best_val_loss'))}")
        if not isinstance(fold.get("history", []), list):
            raise _bad(path, f"{where}.history", "expected a list")
        if fold.get("calibration") is not None and not isinstance(fold["calibration"], dict):
            raise _bad(path, f"{where}.calibration", "expected an object or null")
    if meta.get("calibration") is not None and not isinstance(meta["calibration"], dict):
        raise _bad(path, "calibration", "expected an object or null")
    for key, kind in (("data_hash", str), ("versions", dict)):
        if key in meta and not isinstance(meta[key], kind):
            raise _bad(path, key, f"expected {kind.__name__}, found {_short(meta[key])}")
    return settings


def _check_tensors(path: Path, header: dict[str, dict], meta: dict, expected: dict[str, tuple[int, ...]]) -> None:
    """Tensor names and shapes: each fold's parameters exactly, plus optional 1-D calibrations (per fold
    and the out-of-fold one)."""
    wanted: set[str] = set()
    for fold in meta["folds"]:
        prefix = f"fold{fold['fold']}."
        for name, shape in expected.items():
            entry = header.get(prefix + name)
            if entry is None:
                raise _bad(path, f"tensor {prefix + name!r}", "missing for this architecture")
            if tuple(entry["shape"]) != shape:
                raise _bad(path, f"tensor {prefix + name!r}", f"shape {entry['shape']} but the architecture in the JSON "
                           f"(e.g. settings.model.n_channels={meta['settings'].get('model', {}).get('n_channels')}) "
                           f"needs {list(shape)}")
            wanted.add(prefix + name)
    for name in [f"fold{fold['fold']}.calibration.null" for fold in meta["folds"]] + ["calibration.null"]:
        null = header.get(name)  # optional: per fold, and the out-of-fold one over every control
        if null is not None:
            if len(null["shape"]) != 1 or not null["dtype"].startswith("F"):
                raise _bad(path, f"tensor {name!r}", "expected a 1-D float tensor")
            wanted.add(name)
    extra = sorted(set(header) - wanted)
    if extra:
        raise _bad(path, f"tensor {extra[0]!r}", f"not part of this model ({len(extra)} unexpected tensor(s))")


def _check_score_references(path: Path, header: dict[str, dict], meta: dict) -> None:
    """A network referred to its controls' scores (:mod:`bids_uad.models.normaliser`) needs each
    fold's fitted scale, (location, spread > 0) per raw map, finite: reads those small tensors only (a file
    saved before the reference was fitted, e.g. from a checkpoint, would otherwise fail at inference)."""
    from safetensors import safe_open

    names = [f"fold{fold['fold']}.normaliser.scale" for fold in meta["folds"]]
    if not any(n in header for n in names):
        return
    with safe_open(str(path), framework="np") as f:
        for name in names:
            for location, spread in f.get_tensor(name).reshape(-1, 2).astype(float):
                if not (math.isfinite(location) and math.isfinite(spread) and spread > 0):
                    raise _bad(path, f"tensor {name!r}", f"the score reference was never fitted (scale {location:g}, "
                               f"spread {spread:g}); retrain the model at the group level")


def validate_model_file(path: str | Path) -> ModelFile:
    """Check one model (JSON + safetensors) completely without loading its weights (of the tensors
    only a score reference's small scale tensors are read); see module doc."""
    path = Path(path)
    json_path = path.with_suffix(META_SUFFIX) if path.suffix in (META_SUFFIX, TENSOR_SUFFIX) else \
        path.with_name(path.name + META_SUFFIX)
    tensor_path = json_path.with_suffix(TENSOR_SUFFIX)
    for p in (json_path, tensor_path):
        if not p.is_file():
            raise InputMissingError("model file missing (a model is a .json with its .safetensors)", p)
    _refuse_foreign_format(json_path)
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"wrong kind of file: not a bids_uad model JSON ({type(exc).__name__})", json_path) from None
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise UsageError(f"wrong kind of file: not a bids_uad model JSON (format {_short(found)}, "
                         f"expected {MODEL_FORMAT!r})", json_path)
    settings = _check_json(json_path, meta)
    expected = _expected_shapes(json_path, settings)
    _refuse_foreign_format(tensor_path)
    header = read_safetensors_header(tensor_path)
    _check_tensors(tensor_path, header, meta, expected)
    if file_sha256(tensor_path) != meta["tensor_sha256"]:
        raise _bad(tensor_path, "tensor_sha256", "the tensor file does not match its JSON (hash differs)")
    _check_score_references(tensor_path, header, meta)
    return ModelFile(json_path, tensor_path, meta, settings, {k: tuple(v["shape"]) for k, v in header.items()})
