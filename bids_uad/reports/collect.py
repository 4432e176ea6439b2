"""Find what the workflows wrote for one subject: derivatives, sidecars, crash files, logs.

The report is built from the derivatives on disk only (which is what makes
``--reports-only`` work).  This app's own outputs are found through the declared outputs
table (:mod:`bids_uad.bids.outputs`, :data:`TABLE_KEYS`); :data:`LOOKUP` lists only files the
table does not declare (ground truth, a raw b0 written by another tool).  A session with
several dwi runs (``acq-``, ``dir-``, ``run-``) gives one :class:`SessionDerivatives` per run,
so each run's preprocessing and anomaly maps are shown; the T1w's files go with the first.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bids_uad.bids import outputs
from bids_uad.bids.layout import sidecar_of  # noqa: F401  (re-exported for the sections)
from bids_uad.bids.outputs import parse_name  # noqa: F401  (re-exported for the sections)

ANY = "*"
DISTINGUISHING = ("space", "desc", "model", "param", "label", "stat", "from", "to")
NII = ".nii.gz"


def spec(suffix: str, ext: str = NII, **entities: str | None) -> dict[str, Any]:
    return {"suffix": suffix, "ext": ext, "entities": entities}


#: report key -> key of the outputs table (what this app writes)
TABLE_KEYS: dict[str, str] = {
    "dwi_preproc": "dwi_preproc", "b0": "b0_ref", "dwi_mask": "brain_mask", "fa": "fa", "md": "md",
    "fieldmap": "fieldmap", "motion": "motion", "dwi_dseg": "dwi_dseg", "analysis_mask": "analysis_mask",
    "t1w": "t1w_preproc", "t1w_mask": "t1w_mask", "t1w_dseg": "t1w_dseg", "t1w_gm": "t1w_gm",
    "t1w_wm": "t1w_wm", "t1w_csf": "t1w_csf",
}
#: key -> (datatype folders searched, candidate specifications in order of preference), for
#: files the outputs table does not declare
LOOKUP: dict[str, tuple[tuple[str, ...], list[dict[str, Any]]]] = {
    "b0_uncorrected": (("dwi",), [spec("dwiref", space=ANY, desc="uncorrected"),
                                  spec("dwiref", space=ANY, desc="nosdc"),
                                  spec("dwiref", space=ANY, desc="orig")]),
    "truth": (("dwi",), [spec("mask", space="dwi", desc="tumor"), spec("mask", space="dwi", label="tumor"),
                         spec("mask", space="dwi", desc="lesion"), spec("dseg", space="dwi", desc="tumor")]),
    "t1w_dwi": (("anat", "dwi"), [spec("T1w", space="dwi", desc="preproc"), spec("T1w", space="dwi", desc=ANY)]),
}
#: every key a session may hold, in pipeline order
REPORT_KEYS: tuple[str, ...] = tuple(TABLE_KEYS) + tuple(LOOKUP)


def pattern_of(key: str, prefix: str) -> str:
    """Where report key ``key`` is looked for, as a glob-like path for "not available" notes."""
    if key in TABLE_KEYS:
        out = outputs.OUTPUTS[TABLE_KEYS[key]]
        ents = "_".join(f"{k}-{v}" for k, v in out.entities.items())
        return f"{out.datatype}/{prefix}_*{ents}_{out.suffix}{out.extension}"
    folders, candidates = LOOKUP[key]
    spec_ = candidates[0]
    ents = "_".join(f"{k}-{v}" for k, v in spec_["entities"].items() if v not in (None, "*"))
    return f"{'|'.join(folders)}/{prefix}_*{ents}_{spec_['suffix']}{spec_['ext']}"


NATIVE_SPACES = {None, "T1w", "dwi", "orig"}
#: spaces of the subject's own images (e.g. T1wbaseline, dwibaseline of the longitudinal stage)
NATIVE_PREFIXES = ("T1w", "T2w", "FLAIR", "dwi", "orig", "fsnative")


def is_template_space(space: str | None) -> bool:
    """True for a standard template (MNI152NLin2009cAsym, ...), False for subject spaces."""
    return bool(space) and space not in NATIVE_SPACES and not space.startswith(NATIVE_PREFIXES)


#: report kind of an anomaly map -> key of the outputs table
ANOMALY_KINDS = {"score": "anomaly_score", "pvalue": "anomaly_pvalue", "mask": "anomaly_mask",
                 "findings": "findings_table"}

_ENTITY_RE = re.compile(r"^([a-zA-Z]+)-([a-zA-Z0-9]+)$")


def matches(name: str, wanted: dict[str, Any]) -> bool:
    """True when the file name fits a :data:`LOOKUP` specification: a listed entity must have
    that value (``None``: be absent, ``ANY``: any value or none); an unlisted distinguishing
    entity must be absent; others (acq, dir, run, ...) are ignored."""
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
    """The first of ``keys`` present in a sidecar (alternatives, e.g. a setting or its default)."""
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
    """Derivatives of one dwi run of a session (or of a session without dwi / without sessions)."""

    subject: str
    session: str | None
    root: Path                      # sub-X[/ses-Y]
    files: dict[str, Path] = field(default_factory=dict)
    template_t1w: dict[str, Path] = field(default_factory=dict)   # space -> file
    template_xfm: dict[str, Path] = field(default_factory=dict)   # space -> T1w-to-template transform
    anomaly: dict[str, dict[str, Path]] = field(default_factory=dict)  # model -> kind -> file
    run: str = ""                   # acq-hb_dir-AP: what tells this dwi run from the session's others

    @property
    def session_prefix(self) -> str:
        """``sub-X_ses-Y``: names of the session's figures (the T1w's)."""
        return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session else "")

    @property
    def prefix(self) -> str:
        """``sub-X_ses-Y[_acq-.._dir-..]``: names of this run's figures."""
        return self.session_prefix + (f"_{self.run}" if self.run else "")

    @property
    def session_title(self) -> str:
        """``session pre``; a dataset without sessions: the subject (``sub-01``)."""
        return f"session {self.session}" if self.session else f"sub-{self.subject}"

    @property
    def title(self) -> str:
        """The session, and the run when the session has several (``session pre · dir-AP``)."""
        return self.session_title + (f" · {self.run.replace('_', ' ')}" if self.run else "")

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


def _runs(output_dir: Path, subject: str, session: str | None) -> list[dict[str, str]]:
    """Run entities of every dwi run with derivatives in this session (in name order)."""
    runs: list[dict[str, str]] = []
    for key in ("dwi_preproc", "brain_mask", "b0_ref", "anomaly_score"):
        for path in outputs.find(output_dir, key, subject, session):
            ents = outputs.run_entities(path.name)
            if ents not in runs:
                runs.append(ents)
    return sorted(runs, key=lambda r: outputs.run_label(r) if r else "")


def collect_session(output_dir: Path, subject: str, session: str | None) -> list[SessionDerivatives]:
    """One :class:`SessionDerivatives` per dwi run of the session (one when it has none).

    Each holds its run's files (outputs table), its anomaly maps per model, and — the first
    one only — the T1w's files, templates and the files :data:`LOOKUP` finds.
    """
    root = output_dir / f"sub-{subject}" / (f"ses-{session}" if session else "")
    runs = _runs(output_dir, subject, session) or [None]
    found = []
    for index, run in enumerate(runs):
        ses = SessionDerivatives(subject, session, root.resolve() if root.exists() else root,
                                 run=outputs.run_label(run) if run else "")
        for key, table_key in TABLE_KEYS.items():
            if outputs.OUTPUTS[table_key].source == "dwi" and run is not None:
                hits = outputs.find_run(output_dir, table_key, subject, session, run)
            elif index == 0:
                hits = outputs.find(output_dir, table_key, subject, session)
            else:
                hits = []
            if hits:
                ses.files[key] = hits[0]
        if run is not None:
            for kind, table_key in ANOMALY_KINDS.items():
                for path in outputs.find_run(output_dir, table_key, subject, session, run):
                    ses.anomaly.setdefault(parse_name(path.name)[0]["model"], {}).setdefault(kind, path)
        if index == 0:
            _first_run_extras(ses, root, output_dir, subject, session)
        found.append(ses)
    return found


def _first_run_extras(ses: SessionDerivatives, root: Path, output_dir: Path, subject: str,
                      session: str | None) -> None:
    """Template-space T1w and transforms, and the :data:`LOOKUP` files, of a session."""
    prefix = ses.session_prefix + "_"
    by_type = {d: [p for p in _files_in(root / d) if p.name.startswith(prefix)] for d in ("dwi", "anat", "fmap")}
    for key, (datatypes, candidates) in LOOKUP.items():
        for wanted in candidates:
            hits = [p for d in datatypes for p in by_type.get(d, []) if matches(p.name, wanted)]
            if hits:
                ses.files[key] = sorted(hits)[0]
                break
    for path in outputs.find(output_dir, "t1w_template", subject, session):
        space = parse_name(path.name)[0].get("space")
        if is_template_space(space):
            ses.template_t1w.setdefault(space, path)
    for path in outputs.find(output_dir, "xfm_t1w_to_template", subject, session):
        space = parse_name(path.name)[0].get("to")
        if is_template_space(space):
            ses.template_xfm.setdefault(space, path)


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
        subj.sessions.extend(collect_session(output_dir, subject, folder.name[4:]))
    if any((root / d).is_dir() for d in ("dwi", "anat")):
        subj.sessions[:0] = collect_session(output_dir, subject, None)
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
