"""Find what the workflows wrote for one subject: derivatives, sidecars, crash files, logs.

The report is built from the derivatives on disk only (which is what makes
``--reports-only`` work).  :data:`LOOKUP` is the one table saying which file is what; each
entry lists candidate specifications tried in order, so a renamed output is a one-line
change here.  A specification gives the suffix, the extension and the values of the
*distinguishing* entities (space, desc, model, param, label, stat, from, to): a value must
match, ``None`` means the entity must be absent, ``ANY`` means any value (or none).
Entities not listed there (acq, dir, run, rec, ...) are ignored.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bids_uad.bids.layout import sidecar_of

ANY = "*"
DISTINGUISHING = ("space", "desc", "model", "param", "label", "stat", "from", "to")
NII = ".nii.gz"


def spec(suffix: str, ext: str = NII, **entities: str | None) -> dict[str, Any]:
    return {"suffix": suffix, "ext": ext, "entities": entities}


#: key -> (datatype folders searched, candidate specifications in order of preference)
LOOKUP: dict[str, tuple[tuple[str, ...], list[dict[str, Any]]]] = {
    "dwi_preproc": (("dwi",), [spec("dwi", space="dwi", desc="preproc")]),
    "b0": (("dwi",), [spec("dwiref", space="dwi", desc="b0"), spec("dwiref", space="dwi", desc=None)]),
    "b0_uncorrected": (("dwi",), [spec("dwiref", space=ANY, desc="uncorrected"),
                                  spec("dwiref", space=ANY, desc="nosdc"),
                                  spec("dwiref", space=ANY, desc="orig")]),
    "dwi_mask": (("dwi",), [spec("mask", space="dwi", desc="brain")]),
    "fa": (("dwi",), [spec("dwimap", space="dwi", model="tensor", param="fa")]),
    "md": (("dwi",), [spec("dwimap", space="dwi", model="tensor", param="md")]),
    "fieldmap": (("dwi", "fmap"), [spec("fieldmap", space=ANY, desc="susceptibility")]),
    "motion": (("dwi",), [spec("timeseries", ".tsv", space=ANY, desc="motion"),
                          spec("confounds", ".tsv", space=ANY, desc=ANY)]),
    "dwi_dseg": (("dwi",), [spec("dseg", space="dwi", desc=ANY)]),
    "analysis_mask": (("dwi",), [spec("mask", space="dwi", desc="analysis")]),
    "truth": (("dwi",), [spec("mask", space="dwi", desc="tumor"), spec("mask", space="dwi", label="tumor"),
                         spec("mask", space="dwi", desc="lesion"), spec("dseg", space="dwi", desc="tumor")]),
    "t1w": (("anat",), [spec("T1w", space=None, desc="preproc"), spec("T1w", space="T1w", desc="preproc")]),
    "t1w_mask": (("anat",), [spec("mask", space=None, desc="brain"), spec("mask", space="T1w", desc="brain")]),
    "t1w_dseg": (("anat",), [spec("dseg", space=None, desc=ANY), spec("dseg", space="T1w", desc=ANY)]),
    "t1w_gm": (("anat",), [spec("probseg", space=None, label="GM")]),
    "t1w_wm": (("anat",), [spec("probseg", space=None, label="WM")]),
    "t1w_csf": (("anat",), [spec("probseg", space=None, label="CSF")]),
    "t1w_dwi": (("anat", "dwi"), [spec("T1w", space="dwi", desc="preproc"), spec("T1w", space="dwi", desc=ANY)]),
}
#: the template-space T1w: any space that is not native/dwi
TEMPLATE_T1W = spec("T1w", space=ANY, desc="preproc")
NATIVE_SPACES = {None, "T1w", "dwi", "orig"}
#: spaces of the subject's own images (e.g. T1wbaseline, dwibaseline of the longitudinal stage)
NATIVE_PREFIXES = ("T1w", "T2w", "FLAIR", "dwi", "orig", "fsnative")


def is_template_space(space: str | None) -> bool:
    """True for a standard template (MNI152NLin2009cAsym, ...), False for subject spaces."""
    return bool(space) and space not in NATIVE_SPACES and not space.startswith(NATIVE_PREFIXES)
TEMPLATE_XFM = spec("xfm", ".h5", space=None, **{"from": "T1w", "to": ANY})
ANOMALY_KINDS = {"score": spec("anomaly", space="dwi", model=ANY, stat="score"),
                 "pvalue": spec("anomaly", space="dwi", model=ANY, stat="pvalue"),
                 "mask": spec("mask", space="dwi", model=ANY, desc="anomaly")}

_ENTITY_RE = re.compile(r"^([a-zA-Z]+)-([a-zA-Z0-9]+)$")


def parse_name(name: str) -> tuple[dict[str, str], str, str] | None:
    """``(entities, suffix, extension)`` of a BIDS file name, or None when it is not one."""
    stem, dot, ext = name.partition(".")
    parts = stem.split("_")
    if len(parts) < 2 or not parts[0].startswith("sub-"):
        return None
    entities = {}
    for part in parts[:-1]:
        match = _ENTITY_RE.match(part)
        if not match:
            return None
        entities[match.group(1)] = match.group(2)
    return entities, parts[-1], dot + ext


def matches(name: str, wanted: dict[str, Any]) -> bool:
    """True when the file name fits a specification (see the module docstring)."""
    parsed = parse_name(name)
    if parsed is None:
        return False
    entities, suffix, ext = parsed
    if suffix != wanted["suffix"] or ext != wanted["ext"]:
        return False
    for key in DISTINGUISHING:
        value = wanted["entities"].get(key)
        if key not in wanted["entities"]:
            if key in entities:
                return False
        elif value is None:
            if key in entities:
                return False
        elif value != ANY and entities.get(key) != value:
            return False
    return True


def read_json(path: Path | None) -> dict:
    """A JSON object from disk, or {} when missing or unreadable (reports never crash on it)."""
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def meta_value(meta: dict, *keys: str, default: Any = None) -> Any:
    """The first of ``keys`` present in a sidecar (BIDS CamelCase or the snake_case some stages use)."""
    for key in keys:
        if meta.get(key) not in (None, ""):
            return meta[key]
    return default


def to_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


@dataclass
class SessionDerivatives:
    """Derivatives of one session (or of a subject without sessions)."""

    subject: str
    session: str | None
    root: Path                      # sub-X[/ses-Y]
    files: dict[str, Path] = field(default_factory=dict)
    template_t1w: dict[str, Path] = field(default_factory=dict)   # space -> file
    template_xfm: dict[str, Path] = field(default_factory=dict)   # space -> T1w-to-template transform
    anomaly: dict[str, dict[str, Path]] = field(default_factory=dict)  # model -> kind -> file

    @property
    def prefix(self) -> str:
        return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session else "")

    @property
    def title(self) -> str:
        return f"session {self.session}" if self.session else "no session"

    def get(self, key: str) -> Path | None:
        return self.files.get(key)

    def sidecar(self, key: str) -> dict:
        return read_json(sidecar_of(self.files.get(key)))


@dataclass
class SubjectDerivatives:
    subject: str
    root: Path
    output_dir: Path
    sessions: list[SessionDerivatives] = field(default_factory=list)
    crashes: list[Path] = field(default_factory=list)
    longitudinal: list[Path] = field(default_factory=list)   # figures and tables
    log_warnings: list[str] = field(default_factory=list)
    bids_dir: Path | None = None   # the input dataset (read only), for the raw b0 of the SDC check

    @property
    def figures_dir(self) -> Path:
        return self.root / "figures"


def _files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def collect_session(root: Path, subject: str, session: str | None) -> SessionDerivatives:
    """Look up every :data:`LOOKUP` key (first match wins) and the anomaly outputs per model."""
    ses = SessionDerivatives(subject, session, root)
    prefix = ses.prefix + "_"
    by_type = {d: [p for p in _files_in(root / d) if p.name.startswith(prefix)]
               for d in ("dwi", "anat", "fmap")}
    for key, (datatypes, candidates) in LOOKUP.items():
        found = None
        for wanted in candidates:
            hits = [p for d in datatypes for p in by_type.get(d, []) if matches(p.name, wanted)]
            if hits:
                # fewest entities first: the series combined from an opposite-PE pair (no dir-)
                # before its runs; then by name
                found = min(hits, key=lambda p: (p.name.count("_"), p.name))
                break
        if found is not None:
            ses.files[key] = found
    for path in by_type["anat"]:
        if matches(path.name, TEMPLATE_T1W):
            space = parse_name(path.name)[0].get("space")
            if is_template_space(space):
                ses.template_t1w.setdefault(space, path)
        elif matches(path.name, TEMPLATE_XFM):
            space = parse_name(path.name)[0].get("to")
            if is_template_space(space):
                ses.template_xfm.setdefault(space, path)
    for path in by_type["dwi"]:
        for kind, wanted in ANOMALY_KINDS.items():
            if matches(path.name, wanted):
                model = parse_name(path.name)[0]["model"]
                ses.anomaly.setdefault(model, {}).setdefault(kind, path)
    return ses


def _crash_files(output_dir: Path, subject: str, run_id: str | None) -> list[Path]:
    """Crash files of this subject: nipype node names carry ``sub_<label>``."""
    logs = output_dir / "logs"
    if not logs.is_dir():
        return []
    dirs = sorted(logs.glob(f"crash-{run_id}" if run_id else "crash-*"))
    tags = (f"sub_{subject}_", f"sub-{subject}_", f"sub_{subject}.", f"sub-{subject}/")
    found = []
    for folder in dirs:
        for path in _files_in(folder):
            try:
                text = path.read_text(errors="replace")[:20000]
            except OSError:
                continue
            mentions_any = "sub_" in text or "sub-" in text
            if any(t in path.name or t in text for t in tags) or not mentions_any:
                found.append(path)
    return found


def _log_warnings(output_dir: Path, subject: str, run_id: str | None) -> list[str]:
    """WARNING lines of the run log(s) that name this subject."""
    logs = output_dir / "logs"
    paths = [logs / f"run-{run_id}.log"] if run_id else sorted(logs.glob("run-*.log"))[-1:]
    out: list[str] = []
    pattern = re.compile(rf"sub[-_]{re.escape(subject)}(?![A-Za-z0-9])")
    for path in paths:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            if "WARNING" in line and pattern.search(line):
                message = line.split("WARNING", 1)[1].lstrip(" :-|]")
                message = re.sub(r"^[A-Za-z_][\w.]*:\s+", "", message)  # logger name
                if message not in out:
                    out.append(message)
    return out


def collect_subject(output_dir: str | Path, subject: str, run_id: str | None = None,
                    lesion_masks: str | Path | None = None,
                    bids_dir: str | Path | None = None) -> SubjectDerivatives:
    """Everything the participant report of ``sub-<subject>`` can show.

    ``lesion_masks`` (``--lesion-masks``): where a dwi-space ground truth is looked up when
    the derivatives hold none.
    """
    output_dir = Path(output_dir)
    root = output_dir / f"sub-{subject}"
    subj = SubjectDerivatives(subject, root, output_dir,
                              bids_dir=Path(bids_dir) if bids_dir and Path(bids_dir).is_dir() else None)
    session_dirs = sorted(p for p in root.glob("ses-*") if p.is_dir()) if root.is_dir() else []
    if subj.bids_dir is not None:  # chronological, by acq_time in sessions.tsv
        from bids_uad.bids.layout import read_sessions_table
        from bids_uad.bids.preprocessed import order_sessions

        order = order_sessions([p.name[4:] for p in session_dirs], read_sessions_table(subj.bids_dir, subject))
        session_dirs = sorted(session_dirs, key=lambda p: order.index(p.name[4:]))
    for folder in session_dirs:
        subj.sessions.append(collect_session(folder, subject, folder.name[4:]))
    if any((root / d).is_dir() for d in ("dwi", "anat")):
        subj.sessions.insert(0, collect_session(root, subject, None))
    if lesion_masks is not None:
        from bids_uad.bids.lesions import find_lesion_mask

        for ses in subj.sessions:
            if "truth" not in ses.files:
                found = find_lesion_mask(lesion_masks, subject, ses.session, space="dwi")
                if found is not None:
                    ses.files["truth"] = found
    subj.longitudinal = sorted(
        p for p in list(root.glob("**/*desc-longitudinal*")) + list(root.glob("**/*_longitudinal.*"))
        if p.is_file() and p.suffix in (".svg", ".png", ".tsv")
    )
    subj.crashes = _crash_files(output_dir, subject, run_id)
    subj.log_warnings = _log_warnings(output_dir, subject, run_id)
    return subj


def list_subjects(output_dir: str | Path) -> list[str]:
    """Labels of the subjects that have a folder in the derivatives."""
    return sorted(p.name[4:] for p in Path(output_dir).glob("sub-*") if p.is_dir())
