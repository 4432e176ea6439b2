"""The one settings object of a run: frozen, built from the command line, logged per run.

Every stage reads what it needs from :class:`Settings`; nothing reads ``sys.argv`` or the
environment behind its back.  ``Settings.write`` records it under ``OUTPUT_DIR/logs/`` as
JSON so a run can be reproduced exactly.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bids_uad import __version__
from bids_uad.errors import InputMissingError, UsageError
from bids_uad.models.settings import (DEFAULT_MODELS, INPUT_REPRESENTATIONS, MODEL_NAMES, NETWORK_SPACES,
                                     THRESHOLD_METHODS)

ANALYSIS_LEVELS = ("participant", "group")
PREPROC_BACKENDS = ("auto", "fsl", "python")
DEVICES = ("auto", "cpu", "cuda")
TRAIN_PRESETS = ("quick", "standard", "paper")
#: FSL programs the ``fsl`` backend needs on PATH (with ``FSLDIR`` set).
FSL_PROGRAMS = ("topup", "applytopup", "eddy", "bet", "fast")


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """12 hex digits of the SHA-1 of the package's Python sources (their paths and contents)."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha1()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def code_work_subdir() -> str:
    """The work folder's subfolder of this code, ``bids_uad_<version>_<code fingerprint>``.

    Steps are reused by their inputs only (nipype's timestamp hashing), so a step whose code
    changed but whose inputs did not would be reused with its old result.  As fMRIPrep names its
    graph ``fmriprep_<version>_wf`` for this reason, each code version here gets its own
    subfolder: a killed run resumes (same code), an updated bids_uad starts afresh.  The
    fingerprint covers every source file, so an edit in a development checkout counts too.
    """
    return f"bids_uad_{__version__}_{code_fingerprint()}"


@dataclass(frozen=True)
class Settings:
    """Everything a run needs to know, immutable once built."""

    bids_dir: Path
    output_dir: Path
    analysis_level: str
    work_dir: Path
    participant_labels: tuple[str, ...] = ()
    session_labels: tuple[str, ...] = ()
    nprocs: int = 1
    omp_nthreads: int = 1
    mem_gb: float | None = None
    skip_bids_validation: bool = False
    bids_filters: dict[str, Any] = field(default_factory=dict)
    preproc_backend: str = "auto"
    model: Path | None = None
    output_spaces: tuple[str, ...] = ("dwi", "MNI152NLin2009cAsym")
    reports_only: bool = False
    stop_on_first_crash: bool = False
    seed: int = 0
    verbosity: int = 0
    group_column: str = "group"
    control_value: str = "control"
    lesion_masks: Path | None = None
    threshold: str | None = None  # None: the model file's method (healthy-fpr from the group level)
    device: str = "auto"
    models: tuple[str, ...] = DEFAULT_MODELS
    train_preset: str = "paper"
    # the networks' input representation (ModelSettings.inputs), group level; None: each network's
    # default (bids_uad.models.settings.default_inputs: "both" for the cdae, "dwi" for the others)
    model_inputs: str | None = None
    # group level: the grid the networks referred to their controls see the subjects on
    # (ModelSettings.network_space): "template" or each subject's own "dwi" grid
    network_space: str = "template"
    train_repeats: int | None = None  # group level: k-fold trainings per network (TrainingSettings.repeats); None: the preset's
    ensemble: bool | None = None  # None: the model file's setting (scoring.ensemble, set at the group level)
    findings_min_volume: float | None = None  # mL; None: the model file's min_cluster_ml
    use_plugin: Path | None = None
    baseline_session: str | None = None
    pe_polarity: tuple[str, ...] = ()
    command_line: tuple[str, ...] = ()
    version: str = __version__

    @property
    def code_work_dir(self) -> Path:
        """This code's part of the work folder (:func:`code_work_subdir`): every step's results and
        training checkpoints; a run of other code finds none of them to reuse."""
        return self.work_dir / code_work_subdir()

    def resolved_backend(self) -> str:
        """``fsl`` or ``python``: the choice of ``--preproc-backend`` made in one place."""
        return resolve_preproc_backend(self.preproc_backend)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Settings":
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            if f.name in {"bids_dir", "output_dir", "work_dir"} or (
                f.name in {"model", "lesion_masks", "use_plugin"} and value is not None
            ):
                value = Path(value)
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[f.name] = value
        return cls(**kwargs)

    def write(self, logs_dir: Path, run_id: str) -> Path:
        """Record the settings of this run as ``logs/run-<id>_settings.json`` (atomic)."""
        from bids_uad.bids.derivatives import write_json

        return write_json(Path(logs_dir) / f"run-{run_id}_settings.json", self.to_dict())


def fsl_available() -> bool:
    """True when ``FSLDIR`` is set and the FSL programs this tool uses are on PATH."""
    if not os.environ.get("FSLDIR"):
        return False
    return all(shutil.which(p) for p in FSL_PROGRAMS)


def resolve_preproc_backend(requested: str) -> str:
    """Map ``auto|fsl|python`` to the backend that will actually run.

    ``auto`` picks FSL when it is installed, else the pure-Python implementations;
    ``fsl`` without FSL is an error rather than a silent fallback.
    """

    if requested not in PREPROC_BACKENDS:
        raise UsageError(f"--preproc-backend must be one of {', '.join(PREPROC_BACKENDS)}")
    if requested == "auto":
        return "fsl" if fsl_available() else "python"
    if requested == "fsl" and not fsl_available():
        raise UsageError(
            "--preproc-backend fsl asked for, but FSL is not installed "
            f"(need FSLDIR and {', '.join(FSL_PROGRAMS)} on PATH); use auto or python"
        )
    return requested


def load_plugin_settings(path: Path) -> tuple[str, dict]:
    """Read a nipype plugin file: ``{plugin: NAME, plugin_args: {...}}`` in YAML or JSON."""
    import yaml

    if not path.is_file():
        raise InputMissingError("plugin settings file does not exist", path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"plugin settings file is not valid YAML/JSON ({exc})", path) from exc
    if not isinstance(data, dict) or not isinstance(data.get("plugin"), str):
        raise UsageError("plugin settings file must name a 'plugin' (e.g. MultiProc, SLURM)", path)
    args = data.get("plugin_args") or {}
    if not isinstance(args, dict):
        raise UsageError("'plugin_args' must be a mapping", path)
    return data["plugin"], args
