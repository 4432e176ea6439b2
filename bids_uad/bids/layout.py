"""Query the input BIDS dataset: subjects, sessions, dwi runs, reverse-PE images, anatomicals.

Only file names and sidecars are read here (pybids resolves sidecar inheritance); images are
opened later, by :mod:`bids_uad.bids.validate`, and only the ones a run uses.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from bids_uad.bids.derivatives import validate_label
from bids_uad.bids.phase_encoding import SOURCE_KEY as PE_SOURCE_KEY
from bids_uad.bids.phase_encoding import resolve_phase_encoding, spec_matches, with_phase_encoding
from bids_uad.errors import InputMissingError, InputValidationError, NoFilesSelectedError

LOGGER = logging.getLogger("bids_uad.bids")

#: the opposite of each BIDS PhaseEncodingDirection
OPPOSITE_PE = {"i": "i-", "i-": "i", "j": "j-", "j-": "j", "k": "k-", "k-": "k"}


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


def _pybids_layout(bids_dir: Path, validate: bool):
    import bids

    try:
        return bids.BIDSLayout(str(bids_dir), validate=validate, derivatives=False)
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

    def __init__(self, bids_dir: str | Path, validate: bool = True, filters: Mapping[str, Any] | None = None,
                 pe_polarity: Sequence[tuple[str, str]] = ()):
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
        self.layout = _pybids_layout(self.bids_dir, validate)
        self.filters = dict(filters or {})
        self.pe_polarity = tuple(pe_polarity or ())

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
        for row in rows:
            if "participant_id" not in row:
                raise InputValidationError("participants.tsv has no participant_id column", path)
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
        dwi_meta = {f.path: self._metadata_with_pe(f) for f in dwi_files}
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
        # not resolve(): a dataset of symbolic links (DataLad, git-annex) points outside itself
        absolute = Path(os.path.abspath(dwi_path))
        rel_subject = absolute.relative_to(self.bids_dir / f"sub-{subject}").as_posix()
        rel_dataset = absolute.relative_to(self.bids_dir).as_posix()
        source = meta.get("B0FieldSource")
        sources = set(source if isinstance(source, list) else [source]) - {None}
        for epi in epi_files:
            emeta = self._metadata_with_pe(epi)
            intended = emeta.get("IntendedFor", [])
            intended = intended if isinstance(intended, list) else [intended]
            targets = {str(t).removeprefix("bids::").removeprefix(f"sub-{subject}/") for t in intended}
            ident = emeta.get("B0FieldIdentifier")
            idents = set(ident if isinstance(ident, list) else [ident]) - {None}
            if rel_subject in targets or rel_dataset.removeprefix(f"sub-{subject}/") in targets or (sources & idents):
                if not pe or not emeta.get("PhaseEncodingDirection"):
                    unknown = Path(dwi_path).name if not pe else Path(epi.path).name
                    why = (meta if not pe else emeta).get(PE_SOURCE_KEY, "no PhaseEncodingDirection")
                    LOGGER.warning("%s: phase-encoding polarity unknown (%s): the reverse phase-encoding image "
                                   "%s is not used and susceptibility correction is skipped; state the "
                                   "polarity with --pe-polarity", unknown, why, Path(epi.path).name)
                    return None
                if pe and emeta.get("PhaseEncodingDirection") == pe:
                    raise InputValidationError(
                        f"reverse phase-encoding image has the same PhaseEncodingDirection ({pe}) "
                        f"as the dwi it is intended for ({Path(dwi_path).name})",
                        self._sidecar_of(epi.path),
                    )
                return ReversePE(path=Path(epi.path), metadata=emeta, kind="fmap-epi")
        if pe:
            for other, ometa in dwi_meta.items():
                if other != dwi_path and ometa.get("PhaseEncodingDirection") == OPPOSITE_PE.get(pe):
                    return ReversePE(path=Path(other), metadata=ometa, kind="dwi")
        elif len(dwi_meta) > 1:
            LOGGER.warning("%s: phase-encoding polarity unknown (%s): it cannot be paired with another "
                           "run for susceptibility correction; state it with --pe-polarity",
                           Path(dwi_path).name, meta.get(PE_SOURCE_KEY, "no PhaseEncodingDirection"))
        return None

    def _metadata_with_pe(self, bids_file) -> dict[str, Any]:
        """Sidecar metadata with ``PhaseEncodingDirection`` resolved (``bids.phase_encoding``)."""
        import nibabel as nib

        meta = dict(self.layout.get_metadata(bids_file.path))
        if not meta and not any(spec_matches(spec, bids_file.path) for spec, _ in self.pe_polarity):
            return meta  # no sidecar: validation says so
        if meta.get("PhaseEncodingDirection") and not self.pe_polarity:
            return {**meta, PE_SOURCE_KEY: "sidecar PhaseEncodingDirection"}
        try:
            affine = nib.load(bids_file.path).affine  # the header only
        except Exception:  # noqa: BLE001 - an unreadable image is reported by validation, with its name
            affine = None
        pe = resolve_phase_encoding(bids_file.path, meta, bids_file.get_entities(), affine, self.pe_polarity)
        if pe.direction is not None and pe.source.startswith("dir-"):
            LOGGER.info("%s: phase encoding %s from the %s", Path(bids_file.path).name, pe.direction, pe.source)
        return with_phase_encoding(meta, pe)

    def _nearest(self, image_path: str, kind: str) -> str | None:
        """The ``.bval``/``.bvec`` of a dwi, next to it or inherited; None when there is none."""
        getter = self.layout.get_bval if kind == "bval" else self.layout.get_bvec
        try:
            return getter(image_path) or None
        except (IndexError, ValueError):  # pybids raises these when nothing matches
            return None

    def _sidecar_of(self, image_path: str) -> Path:
        p = Path(image_path)
        name = p.name.removesuffix(".gz").removesuffix(".nii")
        return p.with_name(name + ".json")

    def subject_inputs(self, subject: str, session_labels: tuple[str, ...] | list[str] = ()) -> SubjectInputs:
        sessions = tuple(self.session_inputs(subject, s) for s in self.sessions(subject, session_labels))
        return SubjectInputs(subject=subject, sessions=sessions)

    def sessions_table(self, subject: str) -> list[dict[str, str]]:
        """Rows of ``sub-X/sub-X_sessions.tsv`` (empty when absent)."""
        return read_sessions_table(self.bids_dir, subject)
