"""The declared table of every derivative this app writes, used by writers and readers alike.

Each :class:`Output` says where a file goes (datatype folder), its own entities, suffix and
extension, whose entities it inherits (``source``: a dwi run, the T1w, or only subject and
session) and the keys its JSON sidecar declares.  Writers name files with :func:`entities_for`
(through :class:`~bids_uad.interfaces.derivatives.DerivativesDataSink`), readers find them with
:func:`find` — no module spells a derivative file name by hand.

Sinks derive the inherited entities from the *source file*'s name (as niworkflows'
``DerivativesDataSink`` does): every entity that tells two inputs apart (``acq``, ``dir``,
``rec``, ``run``, ``echo``, ...) tells their outputs apart, so ``sub-01_dir-AP_dwi`` and
``sub-01_dir-PA_dwi`` give ``sub-01_dir-AP_space-dwi_desc-preproc_dwi`` and
``sub-01_dir-PA_space-dwi_desc-preproc_dwi``.  :func:`check_unique` turns a collision between
two planned outputs into an error before anything is written.

The table is parametric: ``{model}`` (an anomaly model's name: dae, recdisc, ...) and
``{template}`` (the template space actually used) are filled in by :func:`entities_for`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from bids_uad.bids.derivatives import ENTITY_ORDER, LONG_TO_SHORT, bids_name, validate_label
from bids_uad.errors import InputValidationError

#: entities a derivative adds to its source; never inherited from a source file
DERIVED_ENTITIES = ("space", "cohort", "res", "den", "from", "to", "mode", "model", "param", "label",
                    "stat", "desc")
#: inherited entities that never tell two inputs apart in a file name
_NOT_INHERITED = ("suffix", "extension", "datatype", "fmap")

# -- sidecar keys (BIDS CamelCase; one spelling, written and read through these names) -----
THRESHOLD = "Threshold"
THRESHOLD_METHOD = "ThresholdMethod"
MODEL_SHA256 = "ModelSHA256"
SOURCES = "Sources"
#: snake_case names of in-memory records whose CamelCase is not the plain conversion
_CAMEL_EXCEPTIONS = {"fpr": "FPR", "fdr_q": "FDRq", "model_sha256": MODEL_SHA256, "voxel_volume_mm3": "VoxelVolumeMm3",
                     "n_anomalous_voxels": "AnomalousVoxels"}


def camel_case(key: str) -> str:
    """The BIDS sidecar spelling of a Python record key: ``threshold_method`` → ``ThresholdMethod``."""
    if key in _CAMEL_EXCEPTIONS:
        return _CAMEL_EXCEPTIONS[key]
    if "_" not in key and key[:1].isupper():
        return key
    return "".join(part[:1].upper() + part[1:] for part in key.split("_"))


def sidecar_fields(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record (e.g. inference info) with its top-level keys in BIDS CamelCase, for a sidecar."""
    return {camel_case(k): v for k, v in record.items()}

_ENTITY_RE = re.compile(r"^([a-zA-Z]+)-([a-zA-Z0-9]+)$")


@dataclass(frozen=True)
class Output:
    """One kind of derivative file (see the module docstring)."""

    key: str
    datatype: str
    suffix: str
    entities: Mapping[str, str] = field(default_factory=dict)
    extension: str = ".nii.gz"
    source: str = "dwi"          # "dwi": a dwi run's entities; "t1w": the T1w's; "session": sub/ses
    sidecar: tuple[str, ...] = ()
    description: str = ""

    def own_entities(self, **params: str) -> dict[str, str]:
        """This output's own entities with ``{model}``/``{template}``/... filled in."""
        out = {}
        for key, value in self.entities.items():
            try:
                out[key] = value.format(**params)
            except KeyError as exc:
                raise ValueError(f"output {self.key!r} needs the parameter {exc.args[0]!r}") from exc
        return out


def _o(key, datatype, suffix, extension=".nii.gz", source="dwi", sidecar=(), description="", **entities):
    return Output(key, datatype, suffix, dict(entities), extension, source, tuple(sidecar), description)


_DWI = {"space": "dwi"}
_ANOMALY_SIDECAR = (THRESHOLD, THRESHOLD_METHOD, MODEL_SHA256)

#: every derivative of the participant level, by key
OUTPUTS: dict[str, Output] = {o.key: o for o in (
    # -- diffusion preprocessing: one set per dwi run (entities of the raw dwi) -------------------
    _o("dwi_preproc", "dwi", "dwi", **_DWI, desc="preproc",
       sidecar=("SusceptibilityDistortionCorrection",), description="preprocessed dwi series"),
    _o("dwi_bval", "dwi", "dwi", ".bval", **_DWI, desc="preproc"),
    _o("dwi_bvec", "dwi", "dwi", ".bvec", **_DWI, desc="preproc"),
    _o("b0_ref", "dwi", "dwiref", **_DWI, desc="b0"),
    _o("brain_mask", "dwi", "mask", **_DWI, desc="brain"),
    _o("fieldmap", "dwi", "fieldmap", **_DWI, desc="susceptibility", sidecar=("Units",)),
    _o("motion", "dwi", "timeseries", ".tsv", desc="motion"),
    *(_o(p, "dwi", "dwimap", **_DWI, model="tensor", param=p) for p in ("fa", "md", "ad", "rd", "s0")),
    # -- anatomy in T1w space: one set per session (entities of the T1w) --------------------------
    _o("t1w_preproc", "anat", "T1w", source="t1w", desc="preproc"),
    _o("t1w_mask", "anat", "mask", source="t1w", desc="brain"),
    _o("t1w_dseg", "anat", "dseg", source="t1w"),
    _o("t1w_dseg_tsv", "anat", "dseg", ".tsv", source="t1w"),
    *(_o(f"t1w_{t.lower()}", "anat", "probseg", source="t1w", label=t) for t in ("GM", "WM", "CSF")),
    _o("t1w_ventricles", "anat", "mask", source="t1w", desc="ventricles"),
    _o("flair_t1w", "anat", "FLAIR", source="t1w", space="T1w", desc="preproc"),
    _o("t1w_template", "anat", "T1w", source="t1w", space="{template}", desc="brain"),
    _o("xfm_t1w_to_template", "anat", "xfm", ".h5", source="t1w", **{"from": "T1w", "to": "{template}"},
       mode="image"),
    _o("xfm_template_to_t1w", "anat", "xfm", ".h5", source="t1w", **{"from": "{template}", "to": "T1w"},
       mode="image"),
    # -- anatomy registered to a dwi run: named with that run's entities ---------------------------
    _o("xfm_t1w_to_dwi", "anat", "xfm", ".h5", **{"from": "T1w", "to": "dwi"}, mode="image"),
    _o("xfm_dwi_to_t1w", "anat", "xfm", ".h5", **{"from": "dwi", "to": "T1w"}, mode="image"),
    # -- dwi-only sessions: the tensor FA registered to the template -----------------------------
    _o("xfm_dwi_to_template", "dwi", "xfm", ".h5", **{"from": "dwi", "to": "{template}"}, mode="image"),
    _o("fa_template", "dwi", "dwimap", space="{template}", model="tensor", param="fa",
       description="FA registered to the template (dwi-only sessions)"),
    _o("dwi_dseg", "dwi", "dseg", **_DWI),
    _o("dwi_dseg_tsv", "dwi", "dseg", ".tsv", **_DWI),
    *(_o(f"dwi_{t.lower()}", "dwi", "probseg", **_DWI, label=t) for t in ("GM", "WM", "CSF")),
    _o("dwi_ventricles", "dwi", "mask", **_DWI, desc="ventricles"),
    _o("analysis_mask", "dwi", "mask", **_DWI, desc="analysis",
       description="GM and WM minus the lateral ventricles, within the dwi brain mask"),
    # -- anomaly maps: per dwi run and model ------------------------------------------------------
    _o("anomaly_score", "dwi", "anomaly", **_DWI, model="{model}", stat="score", sidecar=_ANOMALY_SIDECAR),
    _o("anomaly_pvalue", "dwi", "anomaly", **_DWI, model="{model}", stat="pvalue", sidecar=_ANOMALY_SIDECAR),
    _o("anomaly_mask", "dwi", "mask", **_DWI, model="{model}", desc="anomaly", sidecar=_ANOMALY_SIDECAR),
    _o("anomaly_score_template", "dwi", "anomaly", space="{template}", model="{model}", stat="score",
       sidecar=_ANOMALY_SIDECAR + ("Transforms",)),
    _o("anomaly_mask_template", "dwi", "mask", space="{template}", model="{model}", desc="anomaly",
       sidecar=_ANOMALY_SIDECAR + ("Transforms",)),
    _o("findings_table", "dwi", "table", ".tsv", model="{model}", desc="findings",
       sidecar=("Findings", "MinimumVolumeMl", "Atlases", "DeviationReference", MODEL_SHA256),
       description="one row per finding (cluster of the written anomaly mask): volume, centre, atlas regions, "
                   "score, p-value, deviation signature; the sidecar describes each column"),
    _o("findings_dseg", "dwi", "dseg", **_DWI, model="{model}", desc="findings", sidecar=(MODEL_SHA256,),
       description="finding label image: voxel value k = row 'finding' k of the findings table"),
    _o("findings_matches", "dwi", "table", ".tsv", source="session", model="{model}", desc="findingsmatch",
       description="longitudinal: each baseline finding matched to this follow-up's findings"),
    # -- longitudinal comparison: per session (baseline dwi space: ``dwibaseline``) -------------
    _o("lesion_t1w", "anat", "mask", source="session", desc="{lesion}"),
    _o("lesion_dwi", "dwi", "mask", source="session", **_DWI, desc="{lesion}"),
    _o("lesion_baseline", "dwi", "mask", source="session", space="dwibaseline", desc="{lesion}"),
    _o("background_baseline", "dwi", "{contrast}", source="session", space="dwibaseline", desc="preproc"),
    _o("t1w_baseline", "anat", "T1w", source="session", space="T1wbaseline", desc="preproc"),
    _o("xfm_t1w_to_baseline", "anat", "xfm", ".h5", source="session",
       **{"from": "T1w", "to": "T1wbaseline"}, mode="image"),
    _o("xfm_baseline_to_t1w", "anat", "xfm", ".h5", source="session",
       **{"from": "T1wbaseline", "to": "T1w"}, mode="image"),
    _o("mismatch", "dwi", "mask", source="session", **_DWI, model="{model}", desc="mismatch"),
    _o("score_change", "dwi", "anomaly", source="session", space="dwibaseline", model="{model}",
       stat="scorechange"),
    _o("longitudinal_figure", "figures", "anomaly", ".svg", source="subject", model="{model}",
       desc="longitudinal{followup}"),
    _o("longitudinal_subject_tsv", "", "stats", ".tsv", source="subject", desc="longitudinal"),
)}


#: group-level files (not per subject), relative to OUTPUT_DIR; parametric in the model
GROUP_OUTPUTS: dict[str, str] = {
    "model_json": "models/model-{model}.json",
    "model_weights": "models/model-{model}.safetensors",
    "folds_tsv": "group/model-{model}_folds.tsv",
    "evaluation_tsv": "group/model-{model}_evaluation.tsv",
    "evaluation_summary_tsv": "group/model-{model}_evaluation_summary.tsv",
    "training_loss_figure": "group/figures/model-{model}_desc-training_loss.svg",
    "longitudinal_group_tsv": "group/desc-longitudinal_stats.tsv",
}


def group_path(output_dir: str | Path, key: str, **params: str) -> Path:
    """Where group-level file ``key`` goes (model names validated as BIDS labels)."""
    params = {k: validate_label(v, k) for k, v in params.items()}
    return Path(output_dir) / GROUP_OUTPUTS[key].format(**params)


def parse_name(name: str) -> tuple[dict[str, str], str, str] | None:
    """``(entities, suffix, extension)`` of a BIDS file name (short keys), or None when it is not one."""
    stem, dot, ext = Path(name).name.partition(".")
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


def source_entities(source: str | Path | Mapping[str, Any]) -> dict[str, str]:
    """The entities a derivative inherits from its source: every entity of the source's name
    (or of a pybids entity dict) except the derivative ones (space, desc, model, ...).

    ``sub-01_ses-pre_acq-hb_dir-AP_run-2_dwi.nii.gz`` → ``{sub: 01, ses: pre, acq: hb, dir: AP, run: 2}``.
    """
    if isinstance(source, Mapping):
        raw = {LONG_TO_SHORT.get(k, k): v for k, v in source.items() if k not in _NOT_INHERITED}
    else:
        parsed = parse_name(str(source))
        if parsed is None:
            raise InputValidationError("not a BIDS file name: derivative entities cannot be derived", source)
        raw = parsed[0]
    out = {k: str(v) for k, v in raw.items() if k in ENTITY_ORDER and k not in DERIVED_ENTITIES
           and v not in (None, "")}
    if "sub" not in out:
        raise InputValidationError("source has no subject entity", str(source))
    return out


def _inherited(output: Output, source: Mapping[str, str]) -> dict[str, str]:
    if output.source == "subject":
        return {"sub": source["sub"]}
    if output.source == "session":
        return {k: source[k] for k in ("sub", "ses") if source.get(k)}
    return dict(source)


def entities_for(key: str, source: str | Path | Mapping[str, Any], **params: str) -> dict[str, str]:
    """Entities of output ``key`` made from ``source`` (a file name or entity dict)."""
    output = OUTPUTS[key]
    return {**_inherited(output, source_entities(source)), **output.own_entities(**params)}


def suffix_of(key: str, **params: str) -> str:
    return OUTPUTS[key].suffix.format(**params)


def name_for(key: str, source: str | Path | Mapping[str, Any], **params: str) -> str:
    """The file name of output ``key`` made from ``source``."""
    output = OUTPUTS[key]
    return bids_name(entities_for(key, source, **params), suffix_of(key, **params), output.extension)


def relpath_for(key: str, source: str | Path | Mapping[str, Any], **params: str) -> Path:
    """Path of output ``key`` relative to OUTPUT_DIR: ``sub-X[/ses-Y][/datatype]/name``."""
    output = OUTPUTS[key]
    ents = entities_for(key, source, **params)
    parts = [f"sub-{validate_label(ents['sub'], 'sub')}"]
    if ents.get("ses") and output.source != "subject":
        parts.append(f"ses-{validate_label(ents['ses'], 'ses')}")
    if output.datatype:
        parts.append(output.datatype)
    return Path(*parts, name_for(key, source, **params))


def path_for(output_dir: str | Path, key: str, source, **params: str) -> Path:
    return Path(output_dir) / relpath_for(key, source, **params)


def _template_regex(template: str, params: Mapping[str, str]) -> str:
    """A regex for a table value such as ``longitudinal{followup}``: given parameters literally,
    the others as any label."""
    parts = re.split(r"\{(\w+)\}", template)  # literal, name, literal, name, ...
    return "".join(re.escape(part) if i % 2 == 0 else
                   (re.escape(str(params[part])) if part in params else "[A-Za-z0-9]+")
                   for i, part in enumerate(parts))


def matches(name: str, key: str, **params: str) -> dict[str, str] | None:
    """The entities of ``name`` when it is a file of output ``key`` (None otherwise).

    A parameter not given (e.g. ``model``) matches any value; every derivative entity the
    output does not declare must be absent; inherited entities (acq, dir, run, ...) are free.
    """
    parsed = parse_name(name)
    if parsed is None:
        return None
    entities, suffix, ext = parsed
    output = OUTPUTS[key]
    if ext != output.extension or not re.fullmatch(_template_regex(output.suffix, params), suffix):
        return None
    for ent in DERIVED_ENTITIES:
        wanted = output.entities.get(ent)
        if wanted is None and ent in entities:
            return None
        if wanted is not None and not re.fullmatch(_template_regex(wanted, params), entities.get(ent, "")):
            return None
    return entities


def find(output_dir: str | Path, key: str, subject: str, session: str | None = None,
         source: Mapping[str, str] | None = None, **params: str) -> list[Path]:
    """Every file of output ``key`` of one subject/session in ``output_dir`` (sorted).

    ``source``: inherited entities the file must carry (e.g. ``{"dir": "AP"}``: one dwi run).
    """
    output = OUTPUTS[key]
    subject = validate_label(subject, "sub")
    folder = Path(output_dir) / f"sub-{subject}"
    if session and output.source != "subject":
        folder = folder / f"ses-{validate_label(session, 'ses')}"
    if output.datatype:
        folder = folder / output.datatype
    if not folder.is_dir():
        return []
    hits = []
    for path in sorted(folder.iterdir()):
        entities = matches(path.name, key, **params)
        if entities is None or entities.get("sub") != subject:
            continue
        if output.source != "subject" and entities.get("ses") != (session or None):
            continue
        if source and any(entities.get(k) != str(v) for k, v in source.items()):
            continue
        hits.append(path)
    return hits


def find_run(output_dir: str | Path, key: str, subject: str, session: str | None, run: Mapping[str, str],
             **params: str) -> list[Path]:
    """The files of output ``key`` of exactly one dwi run (its :func:`run_entities` equal ``run``)."""
    run = {k: str(v) for k, v in run.items()}
    return [p for p in find(output_dir, key, subject, session, source=run, **params) if run_entities(p.name) == run]


def run_entities(source: str | Path | Mapping[str, Any]) -> dict[str, str]:
    """The entities that tell one dwi run of a session from another (all but sub and ses).

    ``source``: a file name, or entities (with or without sub/ses).
    """
    if isinstance(source, Mapping) and not {"sub", "subject"} & set(source):
        source = {"sub": "x", **source}
    return {k: v for k, v in source_entities(source).items() if k not in ("sub", "ses")}


def run_label(source: str | Path | Mapping[str, Any]) -> str:
    """``acq-hb_dir-AP`` for a run (in BIDS order), '' for a session's only unnamed run."""
    ents = run_entities(source)
    return "_".join(f"{k}-{ents[k]}" for k in ENTITY_ORDER if k in ents)


def common_source(sources: Iterable[str | Path]) -> str:
    """A source name for a series made from several runs: the entities they all share.

    ``sub-01_dir-AP_dwi.nii.gz`` + ``sub-01_dir-PA_dwi.nii.gz`` → ``sub-01_dwi.nii.gz`` (what a
    combined opposite-PE pair's derivatives inherit, as QSIPrep names a merged series).  Only
    the name matters (:func:`source_entities` reads it); no such file needs to exist.
    """
    parsed = [source_entities(s) for s in sources]
    if not parsed:
        raise ValueError("common_source needs at least one source")
    shared = {k: v for k, v in parsed[0].items() if all(p.get(k) == v for p in parsed[1:])}
    return bids_name(shared, "dwi", ".nii.gz")


def check_unique(planned: Iterable[tuple[str | Path, str | Path]]) -> None:
    """Raise :class:`InputValidationError` when two planned outputs share a path.

    ``planned``: (output path, input it is made from).  Two inputs whose names differ only in
    something the outputs do not carry would silently overwrite each other's derivatives.
    """
    seen: dict[str, str] = {}
    for path, source in planned:
        path, source = str(path), str(source)
        if path in seen and seen[path] != source:
            raise InputValidationError(
                f"{Path(seen[path]).name} and {Path(source).name} would both write {Path(path).name}: "
                "their names differ only in what derivative names do not carry; rename one (e.g. run-1/run-2)",
                source)
        seen[path] = source
