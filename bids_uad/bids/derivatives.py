"""BIDS-derivatives writer: names, JSON sidecars, ``dataset_description.json``, atomic writes.

Every file goes through :func:`atomic_write` (temporary file in the same folder, then
``os.replace``), so a killed run never leaves a half-written output and two concurrent runs
never interleave bytes.  Paths are built only from validated labels and never leave the
output folder; nothing is ever written under the input BIDS folder.
"""
from __future__ import annotations

import json
import os
import re
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from bids_uad import __version__
from bids_uad.errors import OutputNotWritableError, UsageError

#: Entity order of BIDS (derivatives) file names (BIDS specification, Appendix "Entity table"),
#: with the derivative entities of fMRIPrep/QSIPrep (cohort, from, to, mode, model, param, stat).
#: Every raw entity is here so that a source's distinguishing entities reach its derivatives.
ENTITY_ORDER: tuple[str, ...] = (
    "sub", "ses", "sample", "task", "tracksys", "acq", "nuc", "voi", "ce", "trc", "stain", "rec", "dir",
    "run", "mod", "echo", "flip", "inv", "mt", "part", "proc", "hemi", "space", "cohort", "split",
    "recording", "chunk", "seg", "res", "den", "from", "to", "mode", "model", "param", "label", "stat",
    "desc",
)
#: pybids' long entity names mapped to the short keys used in file names.
LONG_TO_SHORT = {
    "subject": "sub", "session": "ses", "acquisition": "acq", "direction": "dir",
    "reconstruction": "rec", "ceagent": "ce", "hemisphere": "hemi",
    "resolution": "res", "density": "den", "description": "desc", "tracer": "trc",
    "modality": "mod", "staining": "stain", "nucleus": "nuc", "volume": "voi",
}
_LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")
_SUFFIX_RE = re.compile(r"^[A-Za-z0-9]+$")
_EXT_RE = re.compile(r"^(\.[A-Za-z0-9]+)+$")


def validate_label(label: str, entity: str = "label") -> str:
    """Return a BIDS label (alphanumeric) or raise :class:`UsageError` (exit 64).

    Accepts the value with or without its ``<entity>-`` prefix; rejects anything that
    could build a path (``/``, ``\\``, ``..``) or is not alphanumeric.
    """
    text = str(label).strip()
    if text.startswith(f"{entity}-"):
        text = text[len(entity) + 1:]
    if not text or not _LABEL_RE.match(text):
        raise UsageError(
            f"invalid {entity} label {label!r}: BIDS labels are letters and digits only "
            "(no '/', '\\', '..', '-' or '_')"
        )
    return text


def bids_name(entities: Mapping[str, Any], suffix: str, extension: str) -> str:
    """Build ``sub-01_ses-pre_space-dwi_desc-preproc_dwi.nii.gz`` from entities in BIDS order."""
    short = {LONG_TO_SHORT.get(k, k): v for k, v in entities.items() if v not in (None, "")}
    unknown = set(short) - set(ENTITY_ORDER)
    if unknown:
        raise ValueError(f"unknown BIDS entities {sorted(unknown)}")
    if "sub" not in short:
        raise ValueError("a derivative name needs a subject entity")
    if not _SUFFIX_RE.match(suffix):
        raise ValueError(f"invalid suffix {suffix!r}")
    if not _EXT_RE.match(extension):
        raise ValueError(f"invalid extension {extension!r}")
    parts = [f"{key}-{validate_label(str(short[key]), key)}" for key in ENTITY_ORDER if key in short]
    return "_".join(parts + [suffix]) + extension


def safe_join(root: str | Path, *parts: str) -> Path:
    """Join parts under ``root`` and refuse any result outside it."""
    root = Path(root).resolve()
    path = root.joinpath(*parts).resolve()
    if path != root and root not in path.parents:
        raise UsageError(f"refusing to build a path outside {root}: {'/'.join(parts)}")
    return path


def is_within(path: str | Path, parent: str | Path) -> bool:
    """True when ``path`` equals ``parent`` or lies below it (after resolving links)."""
    p, q = Path(path).resolve(), Path(parent).resolve()
    return p == q or q in p.parents


#: Temporary files of atomic writes: ``.<stem>.tmp-<host>-<pid>-<random><extension>``.
_TEMPORARY_RE = re.compile(r"^\.[^/]*\.tmp-(?P<host>[A-Za-z0-9_-]+)-(?P<pid>[0-9]+)-[A-Za-z0-9_]+(\.[A-Za-z0-9]+)*$")
#: Temporaries written by another host are removed only when older than this (seconds).
FOREIGN_TEMPORARY_MAX_AGE_S = 7 * 24 * 3600


def _host_tag() -> str:
    """This machine's name reduced to the characters allowed in a temporary file's name."""
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"


def _make_temporary(path: Path) -> tuple[int, str]:
    """Create the temporary file of an atomic write next to ``path``, keeping its extension.

    The name records host and process id so that a later run can tell a temporary left by a
    killed process (removed by :func:`remove_orphaned_temporaries`) from one a live run is writing.
    """
    suffix = "".join(path.suffixes) or ".tmp"
    prefix = f".{path.name.split('.')[0]}.tmp-{_host_tag()}-{os.getpid()}-"
    return tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_orphaned_temporaries(root: str | Path, now: float | None = None,
                                exclude: Iterable[str | Path] = ()) -> list[Path]:
    """Delete temporaries of atomic writes under ``root`` whose writer is gone; return them.

    A temporary from this host is orphaned when its process no longer runs (a run killed with
    SIGKILL cannot clean up after itself); one from another host (a shared HPC file system) only
    when it is older than :data:`FOREIGN_TEMPORARY_MAX_AGE_S`.  Live runs' temporaries are kept.
    Folders in ``exclude`` (the input dataset and the work folder when OUTPUT_DIR holds them)
    are not walked at all, and links are not followed.
    """
    import time

    root, now = Path(root), time.time() if now is None else now
    if not root.is_dir():
        return []
    skip = {os.path.realpath(p) for p in exclude}
    host, removed = _host_tag(), []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if os.path.realpath(os.path.join(folder, d)) not in skip]
        for name in files:
            match = _TEMPORARY_RE.match(name)
            candidate = Path(folder) / name
            if match is None or not candidate.is_file() or candidate.is_symlink():
                continue
            try:
                if match["host"] == host:
                    orphaned = not _process_alive(int(match["pid"]))
                else:
                    orphaned = now - candidate.stat().st_mtime > FOREIGN_TEMPORARY_MAX_AGE_S
                if orphaned:
                    candidate.unlink()
                    removed.append(candidate)
            except FileNotFoundError:  # another run removed it first
                continue
    return removed


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file next to ``path``; on success rename it over ``path``.

    The temporary name keeps the final extension (nibabel chooses compression from it).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputNotWritableError(f"cannot create folder ({exc.strerror})", path.parent) from exc
    try:
        fd, tmp = _make_temporary(path)
    except OSError as exc:
        raise OutputNotWritableError(f"cannot write ({exc.strerror})", path.parent) from exc
    tmp_path = Path(tmp)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path (same folder, same extension) that becomes ``path`` on success.

    For writers that want a file name rather than a handle (nibabel, antspyx, torch).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _make_temporary(path)
        os.close(fd)
    except OSError as exc:
        raise OutputNotWritableError(f"cannot write ({exc.strerror})", path.parent) from exc
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_json(path: str | Path, data: Mapping[str, Any]) -> Path:
    """Write JSON atomically (sorted keys, indented)."""
    with atomic_write(path, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True, default=_json_default)
        handle.write("\n")
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write text atomically."""
    with atomic_write(path, "w") as handle:
        handle.write(text)
    return Path(path)


def read_tsv(path: str | Path) -> list[dict[str, str]]:
    """Rows of a BIDS TSV as dicts of strings; an empty list when the file cannot be read.

    BIDS TSVs have no quoting: each line is split on tabs, blank lines are skipped.
    """
    try:
        lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
    except OSError:
        return []
    if not lines:
        return []
    header = lines[0].split("\t")
    return [dict(zip(header, ln.split("\t"))) for ln in lines[1:]]


def write_tsv(path: str | Path, rows: list[Mapping[str, Any]], columns: list[str] | None = None) -> Path:
    """Write rows as a BIDS TSV (``n/a`` for missing values) atomically."""
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))

    def fmt(value: Any) -> str:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return "n/a"
        if isinstance(value, (float, np.floating)):
            return f"{float(value):.6g}"
        return str(value).replace("\t", " ").replace("\n", " ")

    lines = ["\t".join(columns)] + ["\t".join(fmt(row.get(c)) for c in columns) for row in rows]
    return write_text(path, "\n".join(lines) + "\n")


def software_versions() -> dict[str, str]:
    """Versions of the packages that shape the numbers, for sidecars and logs."""
    from importlib import metadata

    versions = {"bids_uad": __version__}
    for dist in ("numpy", "scipy", "nibabel", "dipy", "antspyx", "torch", "nipype", "pybids"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


def dataset_description(bids_dir: str | Path | None = None, name: str = "bids_uad outputs") -> dict:
    """The derivative ``dataset_description.json`` content (``DatasetType: derivative``)."""
    desc: dict[str, Any] = {
        "Name": name,
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [
            {
                "Name": "bids_uad",
                "Version": __version__,
                "Description": "Unsupervised anomaly detection in diffusion MRI",
            }
        ],
        "HowToAcknowledge": "Please cite bids_uad and the tools listed in the reports' Methods.",
    }
    if bids_dir is not None:
        desc["SourceDatasets"] = [{"URL": Path(bids_dir).resolve().as_uri()}]
    return desc


class DerivativesWriter:
    """Writes BIDS-derivative files under one output folder, never under the input dataset."""

    def __init__(self, output_dir: str | Path, bids_dir: str | Path | None = None):
        self.output_dir = Path(output_dir).resolve()
        self.bids_dir = None if bids_dir is None else Path(bids_dir).resolve()
        if self.bids_dir is not None and is_within(self.output_dir, self.bids_dir):
            raise UsageError(
                f"output folder {self.output_dir} is inside the input dataset {self.bids_dir}; "
                "choose a folder outside it (e.g. BIDS_DIR/../derivatives/bids_uad)"
            )

    def ensure_dataset_description(self) -> Path:
        """Write ``dataset_description.json`` unless a valid one is already there."""
        path = self.output_dir / "dataset_description.json"
        if path.exists():
            try:
                if json.loads(path.read_text()).get("DatasetType") == "derivative":
                    return path
            except (OSError, json.JSONDecodeError):
                pass
        return write_json(path, dataset_description(self.bids_dir))

    def path(
        self,
        entities: Mapping[str, Any],
        suffix: str,
        extension: str,
        datatype: str | None = None,
    ) -> Path:
        """Where a derivative with these entities goes: ``sub-X[/ses-Y][/datatype]/name``."""
        short = {LONG_TO_SHORT.get(k, k): v for k, v in entities.items() if v not in (None, "")}
        name = bids_name(short, suffix, extension)
        parts = [f"sub-{validate_label(short['sub'], 'sub')}"]
        if short.get("ses"):
            parts.append(f"ses-{validate_label(short['ses'], 'ses')}")
        if datatype:
            if datatype not in {"anat", "dwi", "fmap", "func", "figures", "xfm"}:
                raise ValueError(f"unknown datatype folder {datatype!r}")
            parts.append(datatype)
        return safe_join(self.output_dir, *parts, name)

    def sidecar_base(self, sources: list[str | Path] | None = None, **fields: Any) -> dict:
        """Common sidecar fields: sources (relative to the dataset) and software versions."""
        meta: dict[str, Any] = {"SoftwareVersions": software_versions()}
        if sources:
            meta["Sources"] = [self._source_uri(s) for s in sources]
        meta.update(fields)
        return meta

    def _source_uri(self, source: str | Path) -> str:
        # the input's own name, not its link target: DataLad/git-annex images are symbolic
        # links into .git/annex/objects
        unresolved = Path(os.path.abspath(source))
        if self.bids_dir is not None and self.bids_dir in unresolved.parents:
            return "bids:raw:" + unresolved.relative_to(self.bids_dir).as_posix()
        path = Path(source).resolve()
        if self.bids_dir is not None and is_within(path, self.bids_dir):
            return "bids:raw:" + path.relative_to(self.bids_dir).as_posix()
        if is_within(path, self.output_dir):
            return "bids::" + path.relative_to(self.output_dir).as_posix()
        return path.name

    def write_image(
        self,
        image: Any,
        entities: Mapping[str, Any],
        suffix: str,
        sidecar: Mapping[str, Any] | None = None,
        datatype: str | None = None,
        sources: list[str | Path] | None = None,
        extension: str = ".nii.gz",
    ) -> Path:
        """Write a nibabel image and its JSON sidecar atomically; returns the image path."""
        import nibabel as nib

        target = self.path(entities, suffix, extension, datatype)
        with atomic_path(target) as tmp:
            nib.save(image, str(tmp))
        meta = self.sidecar_base(sources)
        meta.update(dict(sidecar or {}))
        write_json(target.with_name(target.name[: -len(extension)] + ".json"), meta)
        return target

    def write_json(self, entities: Mapping[str, Any], suffix: str, data: Mapping[str, Any],
                   datatype: str | None = None) -> Path:
        return write_json(self.path(entities, suffix, ".json", datatype), data)

    def write_tsv(self, entities: Mapping[str, Any], suffix: str, rows: list[Mapping[str, Any]],
                  datatype: str | None = None, columns: list[str] | None = None) -> Path:
        return write_tsv(self.path(entities, suffix, ".tsv", datatype), rows, columns)
