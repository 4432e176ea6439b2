"""Query the input BIDS dataset: subjects, sessions, dwi runs, reverse-PE images, anatomicals.

Only file names and sidecars are read here (pybids resolves sidecar inheritance); images are
opened later, by :mod:`bids_uad.bids.validate`, and only the ones a run uses.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from bids_uad.bids.derivatives import validate_label
from bids_uad.errors import InputMissingError, InputValidationError, NoFilesSelectedError

LOGGER = logging.getLogger("bids_uad.bids")

#: the opposite of each BIDS PhaseEncodingDirection
OPPOSITE_PE = {"i": "i-", "i-": "i", "j": "j-", "j-": "j", "k": "k-", "k-": "k"}

#: the suffixes this app queries, i.e. the top-level keys a ``--bids-filter-file`` may use
FILTER_SUFFIXES = ("dwi", "epi", "T1w", "FLAIR")
#: other spellings accepted for them (fMRIPrep's filter files use lower-case query names)
FILTER_ALIASES = {"t1w": "T1w", "flair": "FLAIR", "fmap": "epi", "DWI": "dwi"}
#: entities the app sets itself in every query: a filter on them would be ignored
FILTER_OVERRIDDEN = {"subject": "--participant-label", "session": "--session-label",
                     "suffix": "the filter file's top-level key", "extension": "the app (.nii/.nii.gz)"}
#: a valid subject folder name
_SUBJECT_DIR_RE = re.compile(r"^sub-[A-Za-z0-9]+$")


def bids_entities() -> set[str]:
    """Names of the BIDS entities pybids knows (the keys a filter may use)."""
    from bids.layout.models import Config

    return set(Config.load("bids").entities)


def check_filters(data: Any, path: str | Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Check a ``--bids-filter-file``'s content; return (filters by suffix, warnings).

    An unknown entity or a pybids query option (``return_type``, ``scope``...) is a usage
    error (64) naming the key; keys the app sets itself are dropped with a warning naming
    them, and other spellings of the suffixes (``t1w``) are mapped with a warning.
    """
    from bids_uad.errors import UsageError

    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise UsageError('BIDS filter file must map suffixes to filters, e.g. {"dwi": {"run": 1}}', path)
    entities, warnings, out = bids_entities(), [], {}
    for key, query in data.items():
        suffix = key if key in FILTER_SUFFIXES else FILTER_ALIASES.get(key) or next(
            (s for s in FILTER_SUFFIXES if s.lower() == str(key).lower()), None)
        if suffix is None:
            warnings.append(f"{path}: key {key!r} is not a suffix this app reads "
                            f"({', '.join(FILTER_SUFFIXES)}): ignored")
            continue
        if suffix != key:
            warnings.append(f"{path}: key {key!r} taken as the suffix {suffix!r}")
        if suffix in out:
            raise UsageError(f"BIDS filter file names the suffix {suffix!r} twice (key {key!r})", path)
        kept = {}
        for name, value in query.items():
            if name not in entities:
                raise UsageError(f"BIDS filter file: {key!r} has the key {name!r}, which is not a BIDS "
                                 "entity (filters may only name entities such as run, acquisition, session)",
                                 path)
            if name in FILTER_OVERRIDDEN:
                warnings.append(f"{path}: {key}.{name} is ignored: the app sets {name!r} itself "
                                f"(use {FILTER_OVERRIDDEN[name]})")
                continue
            if not (value is None or isinstance(value, (str, int, bool))
                    or (isinstance(value, list) and all(isinstance(v, (str, int)) for v in value))):
                raise UsageError(f"BIDS filter file: {key}.{name} must be a string, a number, null or "
                                 f"a list of them, not {type(value).__name__}", path)
            kept[name] = value
        out[suffix] = kept
    return out, warnings


def _invalid_subject_folders(bids_dir: Path) -> list[str]:
    """Top-level ``sub-*`` folders whose name is not a valid label (``sub-pat02 x``)."""
    try:
        return sorted(p.name for p in bids_dir.iterdir()
                      if p.name.startswith("sub-") and p.is_dir() and not _SUBJECT_DIR_RE.match(p.name))
    except OSError:
        return []


def read_sessions_table(bids_dir: str | Path, subject: str) -> list[dict[str, str]]:
    """Rows of ``sub-X/sub-X_sessions.tsv`` (empty when absent)."""
    path = Path(bids_dir) / f"sub-{subject}" / f"sub-{subject}_sessions.tsv"
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def session_entities(subject: str, session: str | None) -> dict[str, str]:
    """pybids-style entities of a subject/session (no session entity when there is none)."""
    return {"subject": subject, **({"session": session} if session else {})}



def sidecar_of(path: str | Path | None) -> Path | None:
    """The JSON sidecar path of a BIDS file: ``x.nii.gz``, ``x.nii``, ``x.tsv`` -> ``x.json``
    (any other single extension is replaced); ``None`` for ``None``."""
    if path is None:
        return None
    path = Path(path)
    name = path.name
    for ext in (".nii.gz", ".nii", ".tsv"):
        if name.endswith(ext):
            return path.with_name(name[: -len(ext)] + ".json")
    return path.with_suffix(".json")

@dataclass(frozen=True)
class ReversePE:
    """An image with the opposite phase encoding to a dwi run, for susceptibility correction."""

    path: Path
    metadata: Mapping[str, Any]
    kind: str  # "fmap-epi" or "dwi"


@dataclass(frozen=True)
class DwiRun:
    """One diffusion series with its gradient files and resolved sidecar."""

    path: Path
    bval: Path | None
    bvec: Path | None
    metadata: Mapping[str, Any]
    entities: Mapping[str, Any]
    reverse_pe: ReversePE | None = None


@dataclass(frozen=True)
class SessionInputs:
    """What one subject/session offers to the pipeline."""

    subject: str
    session: str | None
    dwi: tuple[DwiRun, ...] = ()
    t1w: tuple[Path, ...] = ()
    flair: tuple[Path, ...] = ()

    @property
    def entities(self) -> dict[str, str]:
        return session_entities(self.subject, self.session)


@dataclass(frozen=True)
class SubjectInputs:
    subject: str
    sessions: tuple[SessionInputs, ...] = field(default_factory=tuple)


def _pybids_layout(bids_dir: Path, validate: bool, skip: list[str] = ()):
    import bids
    from bids.layout.validation import DEFAULT_LOCATIONS_TO_IGNORE

    extra = {}
    if skip:
        from bids.layout import BIDSLayoutIndexer

        ignore = [*DEFAULT_LOCATIONS_TO_IGNORE, *(re.compile("^/" + re.escape(n) + "(/|$)") for n in skip)]
        extra["indexer"] = BIDSLayoutIndexer(validate=validate, ignore=ignore)
    try:
        return bids.BIDSLayout(str(bids_dir), validate=validate, derivatives=False, **extra)
    except Exception as exc:  # pybids raises several types for a broken dataset
        raise InputValidationError(f"not a valid BIDS dataset ({exc})", bids_dir) from exc


def check_dataset_description(bids_dir: Path) -> dict[str, Any]:
    """Read ``dataset_description.json``; missing or broken is a validation error (16)."""
    path = bids_dir / "dataset_description.json"
    if not path.is_file():
        raise InputValidationError("dataset_description.json is missing: not a BIDS dataset", path)
    try:
        desc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputValidationError(f"cannot parse JSON ({exc})", path) from exc
    missing = [k for k in ("Name", "BIDSVersion") if k not in desc]
    if missing:
        raise InputValidationError(f"required fields missing: {', '.join(missing)}", path)
    return desc


class BIDSInputs:
    """The input dataset, read-only: a thin layer over pybids with the queries this app needs."""

    def __init__(self, bids_dir: str | Path, validate: bool = True, filters: Mapping[str, Any] | None = None):
        self.bids_dir = Path(bids_dir).resolve()
        if not self.bids_dir.exists():
            raise InputMissingError("input BIDS folder does not exist", self.bids_dir)
        if not self.bids_dir.is_dir():
            raise InputMissingError("input BIDS path is not a folder", self.bids_dir)
        try:
            next(iter(self.bids_dir.iterdir()), None)
        except PermissionError as exc:
            raise InputMissingError("input BIDS folder is not readable", self.bids_dir) from exc
        if validate:
            check_dataset_description(self.bids_dir)
        skipped = _invalid_subject_folders(self.bids_dir)
        for name in skipped:
            LOGGER.warning("%s: skipped: not a valid subject folder name (labels are letters and digits only)",
                           self.bids_dir / name)
        self.layout = _pybids_layout(self.bids_dir, validate, skipped)
        self.filters = dict(filters or {})

    # -- participants -------------------------------------------------------------------
    def subjects(self) -> list[str]:
        return sorted(self.layout.get_subjects())

    def select_subjects(self, labels: tuple[str, ...] | list[str] = ()) -> list[str]:
        """Subjects to process: all, or the requested labels (unknown ones exit 18)."""
        available = self.subjects()
        if not labels:
            if not available:
                raise NoFilesSelectedError("the dataset holds no subjects", self.bids_dir)
            return available
        wanted = [validate_label(label, "sub") for label in labels]
        unknown = [w for w in wanted if w not in available]
        if unknown:
            raise NoFilesSelectedError(
                f"participant label(s) not found in the dataset: {', '.join('sub-' + u for u in unknown)} "
                f"(available: {', '.join(available[:10])}{' ...' if len(available) > 10 else ''})",
                self.bids_dir,
            )
        return sorted(dict.fromkeys(wanted))

    def participants(self) -> list[dict[str, str]]:
        """Rows of ``participants.tsv`` (empty when the file is absent)."""
        path = self.bids_dir / "participants.tsv"
        if not path.is_file():
            return []
        try:
            with path.open(newline="") as handle:
                rows = list(csv.DictReader(handle, delimiter="\t"))
        except (OSError, csv.Error, UnicodeDecodeError) as exc:
            raise InputValidationError(f"cannot read participants table ({exc})", path) from exc
        seen: set[str] = set()
        for row in rows:
            if "participant_id" not in row:
                raise InputValidationError("participants.tsv has no participant_id column", path)
            label = str(row["participant_id"] or "").strip()
            if label in seen:
                raise InputValidationError(f"participant_id {label!r} appears more than once", path)
            seen.add(label)
        return rows

    def controls(self, column: str = "group", value: str = "control") -> list[str]:
        """Labels of the healthy controls named by ``participants.tsv`` (column and value are settings)."""
        path = self.bids_dir / "participants.tsv"
        rows = self.participants()
        if not rows:
            raise InputValidationError(
                "participants.tsv is missing or empty: it must name the controls to train on", path
            )
        if column not in rows[0]:
            raise InputValidationError(
                f"participants.tsv has no column {column!r} (columns: {', '.join(rows[0])})", path
            )
        return sorted(
            r["participant_id"].removeprefix("sub-")
            for r in rows
            if str(r.get(column, "")).strip().lower() == value.strip().lower()
        )

    # -- sessions and files -------------------------------------------------------------
    def sessions(self, subject: str, labels: tuple[str, ...] | list[str] = ()) -> list[str | None]:
        found = sorted(self.layout.get_sessions(subject=subject))
        if not found:
            return [None]
        if labels:
            wanted = [validate_label(s, "ses") for s in labels]
            found = [s for s in found if s in wanted]
        return found

    def _get(self, **query) -> list:
        query = {**self.filters.get(query.get("suffix", ""), {}), **query}
        return self.layout.get(return_type="object", **query)

    def session_inputs(self, subject: str, session: str | None) -> SessionInputs:
        """Files of one subject/session: dwi runs (with reverse-PE partners), T1w, FLAIR."""
        ses = {"session": session} if session else {}
        dwi_files = self._get(subject=subject, suffix="dwi", extension=[".nii.gz", ".nii"], **ses)
        epi_files = self._get(subject=subject, suffix="epi", datatype="fmap", extension=[".nii.gz", ".nii"], **ses)
        t1w = tuple(Path(f.path) for f in self._get(subject=subject, suffix="T1w", extension=[".nii.gz", ".nii"], **ses))
        flair = tuple(Path(f.path) for f in self._get(subject=subject, suffix="FLAIR", extension=[".nii.gz", ".nii"], **ses))
        runs = []
        dwi_meta = {f.path: dict(self.layout.get_metadata(f.path)) for f in dwi_files}
        for f in dwi_files:
            bval = self._nearest(f.path, "bval")
            bvec = self._nearest(f.path, "bvec")
            entities = {k: v for k, v in f.get_entities().items() if k not in ("suffix", "extension", "datatype")}
            runs.append(DwiRun(
                path=Path(f.path),
                bval=Path(bval) if bval else None,
                bvec=Path(bvec) if bvec else None,
                metadata=dwi_meta[f.path],
                entities=entities,
                reverse_pe=self._find_reverse_pe(f.path, dwi_meta, epi_files, subject),
            ))
        # a dwi run that only serves as another run's reverse-PE partner is still a run of its own
        return SessionInputs(subject=subject, session=session, dwi=tuple(runs), t1w=t1w, flair=flair)

    def _find_reverse_pe(self, dwi_path: str, dwi_meta: dict[str, dict], epi_files: list, subject: str) -> ReversePE | None:
        meta = dwi_meta[dwi_path]
        pe = meta.get("PhaseEncodingDirection")
        # relative to the dataset as indexed, never through symbolic links: in DataLad/git-annex
        # datasets every image is a link into .git/annex/objects
        rel_dataset = Path(os.path.relpath(dwi_path, self.bids_dir)).as_posix()
        rel_subject = rel_dataset.removeprefix(f"sub-{subject}/")
        source = meta.get("B0FieldSource")
        sources = set(source if isinstance(source, list) else [source]) - {None}
        for epi in epi_files:
            emeta = dict(self.layout.get_metadata(epi.path))
            intended = emeta.get("IntendedFor", [])
            intended = intended if isinstance(intended, list) else [intended]
            targets = {str(t).removeprefix("bids::").removeprefix(f"sub-{subject}/") for t in intended}
            ident = emeta.get("B0FieldIdentifier")
            idents = set(ident if isinstance(ident, list) else [ident]) - {None}
            if rel_subject in targets or (sources & idents):
                if pe and emeta.get("PhaseEncodingDirection") == pe:
                    raise InputValidationError(
                        f"reverse phase-encoding image has the same PhaseEncodingDirection ({pe}) "
                        f"as the dwi it is intended for ({Path(dwi_path).name})",
                        sidecar_of(epi.path),
                    )
                return ReversePE(path=Path(epi.path), metadata=emeta, kind="fmap-epi")
        if pe:
            for other, ometa in dwi_meta.items():
                if other != dwi_path and ometa.get("PhaseEncodingDirection") == OPPOSITE_PE.get(pe):
                    return ReversePE(path=Path(other), metadata=ometa, kind="dwi")
        return None

    def _nearest(self, image_path: str, kind: str) -> str | None:
        """The ``.bval``/``.bvec`` of a dwi, next to it or inherited; None when there is none."""
        getter = self.layout.get_bval if kind == "bval" else self.layout.get_bvec
        try:
            return getter(image_path) or None
        except (IndexError, ValueError):  # pybids raises these when nothing matches
            return None

    def subject_inputs(self, subject: str, session_labels: tuple[str, ...] | list[str] = ()) -> SubjectInputs:
        sessions = tuple(self.session_inputs(subject, s) for s in self.sessions(subject, session_labels))
        return SubjectInputs(subject=subject, sessions=sessions)

    def sessions_table(self, subject: str) -> list[dict[str, str]]:
        """Rows of ``sub-X/sub-X_sessions.tsv`` (empty when absent)."""
        return read_sessions_table(self.bids_dir, subject)
