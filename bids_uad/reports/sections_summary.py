"""Summary and Errors sections of the participant report."""
from __future__ import annotations

import numpy as np

from bids_uad.bids.layout import sidecar_of
from bids_uad.reports.collect import REPORT_KEYS, SessionDerivatives, SubjectDerivatives, meta_value, read_json
from bids_uad.reports.methods import steps_of, warnings_of
from bids_uad.reports.reportlets import heading, kv, note, pre, table, text, warning


def _protocol(ses: SessionDerivatives) -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = []
    path = ses.get("dwi_preproc")
    if path is not None:
        import nibabel as nib

        img = nib.load(str(path))
        zooms = img.header.get_zooms()[:3]
        rows.append(("dwi matrix", " × ".join(str(s) for s in img.shape)))
        rows.append(("dwi voxel size (mm)", " × ".join(f"{z:.2f}" for z in zooms)))
        bval = path.with_name(path.name.replace(".nii.gz", ".bval"))
        if bval.is_file():
            values = np.rint(np.loadtxt(bval, ndmin=1) / 50) * 50
            shells = ", ".join(f"b={int(b)}: {int((values == b).sum())}" for b in np.unique(values))
            rows.append(("b-values (volumes)", shells))
        meta = ses.sidecar("dwi_preproc")
        backend = meta_value(meta, "PreprocessingBackend", "Backend")
        if backend:
            rows.insert(0, ("preprocessing backend", backend))
        for key in ("PhaseEncodingDirection", "TotalReadoutTime", "EchoTime", "RepetitionTime"):
            if key in meta:
                rows.append((key, meta[key]))
        rows += _acquisition_handling(ses, meta)
    t1 = ses.get("t1w")
    if t1 is not None:
        import nibabel as nib

        img = nib.load(str(t1))
        rows.append(("T1w voxel size (mm)", " × ".join(f"{z:.2f}" for z in img.header.get_zooms()[:3])))
    return rows


def _acquisition_handling(ses: SessionDerivatives, meta: dict) -> list[tuple[str, object]]:
    """How the pipeline dealt with this acquisition's quirks, from the sidecars: where the
    phase-encoding polarity and readout time came from, runs combined, brain coverage, and
    where the tissue classes come from (T1w or the diffusion data)."""
    rows: list[tuple[str, object]] = []
    sdc = dict(ses.sidecar("fieldmap").get("SDCSettings") or meta.get("SDCSettings") or {})
    for run, per_run in (meta.get("PerRunPreprocessing") or {}).items():
        sdc = sdc or dict(per_run.get("SDCSettings") or {})
    for key, label in (("PhaseEncodingDirectionSource", "phase encoding from"),
                       ("ReversePhaseEncodingDirectionSource", "reverse phase encoding from"),
                       ("TotalReadoutTimeSource", "readout time from")):
        if sdc.get(key):
            value = sdc[key]
            if key == "TotalReadoutTimeSource" and str(value).startswith("nominal"):
                value = (f"{value}: {sdc.get('TotalReadoutTime')} s assumed; the correction does not depend on it "
                         "(both images share it), the field in Hz is in units of it")
            rows.append((label, value))
    if meta.get("CombinedRuns"):
        rows.append(("runs combined", " + ".join(meta["CombinedRuns"]) + " (corrected, aligned, concatenated)"))
    coverage = ses.sidecar("dwi_mask").get("Coverage") or {}
    if coverage:
        if coverage.get("WholeBrain"):
            touched = coverage.get("TouchedAxes") or []
            text = f"whole brain ({coverage.get('VolumeMl')} mL)" + (
                f"; the mask touches the field of view along {'/'.join(touched)} (less than "
                "a tenth of its largest cross-section there: not a cut)" if touched else "")
        else:
            text = (f"partial: the brain mask is cut by the field of view along {'/'.join(coverage.get('CutAxes', []))} "
                    f"(brain extent {coverage.get('BrainExtentMm')} mm, {coverage.get('VolumeMl')} mL); "
                    "measures and the analysis mask cover this part only")
        rows.append(("brain coverage", text))
    tissues = ses.sidecar("dwi_dseg").get("TissueClasses")
    if tissues:
        rows.append(("tissue classes", tissues))
    return rows


def summary_section(subj: SubjectDerivatives) -> list[dict]:
    items: list[dict] = []
    if not subj.sessions:
        return [note(f"Not available: no derivatives found under sub-{subj.subject}/.")]
    items.append(kv([("Subject", subj.subject),
                     ("Sessions", ", ".join(dict.fromkeys(s.session or "(none)" for s in subj.sessions))),
                     ("Anomaly models", ", ".join(sorted({m for s in subj.sessions for m in s.anomaly}))
                      or "none (run with --model)")]))
    all_warnings = list(subj.log_warnings)
    for ses in subj.sessions:
        items.append(heading(f"{ses.title}"))
        found = [(k, ses.files[k]) for k in REPORT_KEYS if k in ses.files]  # pipeline order
        inputs = [(key, path.name) for key, path in found]
        inputs += [(f"T1w in {space}", p.name) for space, p in ses.template_t1w.items()]
        inputs += [(f"anomaly {model} {kind}", p.name) for model, files in ses.anomaly.items()
                   for kind, p in files.items()]
        sources: list[str] = []
        steps_rows = []
        extra = [(f"T1w in {s}", p) for s, p in ses.template_t1w.items()]
        extra += [(f"T1w to {s} transform", p) for s, p in ses.template_xfm.items()]
        inputs += [(k, p.name) for k, p in extra if k.endswith("transform")]
        for key, path in list(found) + extra:
            meta = read_json(sidecar_of(path))
            for src in meta.get("Sources", []) if isinstance(meta.get("Sources"), list) else []:
                if str(src) not in sources:
                    sources.append(str(src))
            for step in steps_of(meta):
                row = [step.name, step.backend or "n/a", step.status, step.detail, path.name]
                if row[:3] not in [r[:3] for r in steps_rows]:
                    steps_rows.append(row)
            all_warnings.extend(w for w in warnings_of(meta) if w not in all_warnings)
        if ses.get("dwi_preproc") and not ses.get("fieldmap") and not ses.get("b0_uncorrected"):
            sdc = [s for s in steps_rows if "suscept" in s[0].lower() or "sdc" in s[0].lower()]
            if not sdc or all(s[2].lower().startswith("skip") for s in sdc):
                msg = "no susceptibility field found: susceptibility distortion correction was not applied"
                if not any("suscept" in w.lower() for w in all_warnings):
                    all_warnings.append(msg)
        found_table = table(["derivative", "file"], inputs, caption=f"Derivatives found ({len(inputs)} files)")
        found_table["collapsed"] = True
        items.append(found_table)
        if sources:
            items.append(table(["source"], [[s] for s in sources], caption="Input files (from the sidecars)"))
        protocol = _protocol(ses)
        if protocol:
            items.append(kv(protocol))
        if steps_rows:
            steps_table = table(["step", "backend", "status", "detail", "recorded in"], steps_rows,
                                caption="Processing steps and the backend that ran them")
            steps_table["css"] = "steps"
            items.append(steps_table)
        else:
            items.append(note("Not available: processing steps — no sidecar records its steps."))
    # a step skipped for a reason the run log already states is one warning, not two
    all_warnings = [w for w in all_warnings if not (" skipped: " in w and any(
        w.split(" skipped: ", 1)[1] in other for other in all_warnings if other != w))]
    if all_warnings:
        items.insert(1, heading("Warnings"))
        for i, w in enumerate(all_warnings):
            items.insert(2 + i, warning(w))
    return items


def errors_section(subj: SubjectDerivatives, figure_errors: list[str]) -> list[dict]:
    items: list[dict] = []
    for path in subj.crashes:
        try:
            body = path.read_text(errors="replace")
        except OSError as exc:
            body = f"(unreadable: {exc})"
        node = next((ln.split(":", 1)[1].strip() for ln in body.splitlines() if ln.lower().startswith("node:")), "")
        items.append(pre(f"{path.parent.name}/{path.name}" + (f" — node {node}" if node else ""), body[-20000:]))
    if figure_errors:
        items.append(pre("Report figures that could not be made", "\n".join(figure_errors), True))
    if not items:
        items.append(text("No errors to report: no crash files for this subject in logs/crash-*/."))
    return items
