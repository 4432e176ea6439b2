"""Several dwi runs in one session: each its own derivatives; a name collision is refused.

The data-loss bug of issue 20: ``sub-canon61`` has two full-DTI runs (``dir-AP``, ``dir-PA``) and
got one set of derivatives (the ``dir`` entity was dropped, the second run overwrote the first).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import pytest

from bids_uad.bids import outputs
from bids_uad.bids.layout import BIDSInputs
from bids_uad.cli.run import main
from bids_uad.config import Settings
from bids_uad.errors import InputValidationError
from bids_uad.workflows.base import collect_participant_inputs, init_participant_wf, planned_outputs
from tests.conftest import _write_dwi, build_small_bids

VENDORS = Path(__file__).resolve().parents[2] / ".." / "shared" / "realdata" / "vendors_bids"


def _two_run_dataset(root: Path) -> Path:
    """sub-ctrl01 with a T1w and two full-DTI runs in opposite phase encoding (canon61-style)."""
    bids = build_small_bids(root, n_controls=1, n_patients=0, with_rpe=False)
    _write_dwi(bids / "sub-ctrl01" / "ses-pre" / "dwi", "sub-ctrl01_ses-pre_dir-PA", pe="j")
    return bids


def _settings(tmp_path, bids) -> Settings:
    return Settings(bids_dir=bids, output_dir=tmp_path / "out", analysis_level="participant",
                    work_dir=tmp_path / "work")


def test_two_runs_plan_two_derivative_sets(tmp_path):
    bids = _two_run_dataset(tmp_path / "bids")
    settings = _settings(tmp_path, bids)
    plan = collect_participant_inputs(settings, BIDSInputs(bids), ["ctrl01"])
    assert [run.path.name for run in plan.sessions[0].dwi] == ["sub-ctrl01_ses-pre_dir-AP_dwi.nii.gz",
                                                               "sub-ctrl01_ses-pre_dir-PA_dwi.nii.gz"]
    planned = planned_outputs(settings, plan)
    preproc = sorted(p.name for p, _ in planned if p.name.endswith("_desc-preproc_dwi.nii.gz"))
    # each run's own series, and their combination (an opposite-PE pair) named by what they share
    assert preproc == ["sub-ctrl01_ses-pre_dir-AP_space-dwi_desc-preproc_dwi.nii.gz",
                       "sub-ctrl01_ses-pre_dir-PA_space-dwi_desc-preproc_dwi.nii.gz",
                       "sub-ctrl01_ses-pre_space-dwi_desc-preproc_dwi.nii.gz"]
    assert len({p for p, _ in planned}) == len(planned)
    workflow = init_participant_wf(settings, plan)
    sources = sorted(workflow.get_node(f"dwi_sub_ctrl01_ses_pre_{i}").inputs.inputnode.source_file for i in (0, 1))
    assert [Path(s).name for s in sources] == ["sub-ctrl01_ses-pre_dir-AP_dwi.nii.gz",
                                               "sub-ctrl01_ses-pre_dir-PA_dwi.nii.gz"]
    # the T1w is registered to the combined series: its dwi-space outputs carry only the shared entities
    anat = workflow.get_node("anat_sub_ctrl01_ses_pre")
    assert Path(anat.inputs.inputnode.dwi_source_file).name == "sub-ctrl01_ses-pre_dwi.nii.gz"
    # the pair's field is fitted once, in the first run; the second run reuses it
    first, second = (workflow.get_node(f"dwi_sub_ctrl01_ses_pre_{i}") for i in (0, 1))
    assert type(first.get_node("sdc").interface).__name__ == "EstimateSDC"
    assert type(second.get_node("sdc").interface).__name__ == "TransferSDC"
    edges = {(a.name, b.name, x, y) for a, b, d in workflow._graph.edges(data=True) for x, y in d["connect"]}
    assert (first.name, second.name, "outputnode.sdc_partner", "inputnode.sdc_partner") in edges


def test_collision_between_two_runs_is_refused(tmp_path, capsys):
    """Two inputs whose names differ only in what derivative names do not carry (here the
    extension) would overwrite each other's derivatives: refused before anything runs."""
    bids = build_small_bids(tmp_path / "bids", n_controls=1, n_patients=0, with_rpe=False)
    folder = bids / "sub-ctrl01" / "ses-pre" / "dwi"
    img = nib.load(folder / "sub-ctrl01_ses-pre_dir-AP_dwi.nii.gz")
    nib.save(img, folder / "sub-ctrl01_ses-pre_dir-AP_dwi.nii")
    settings = _settings(tmp_path, bids)
    plan = collect_participant_inputs(settings, BIDSInputs(bids), ["ctrl01"])
    with pytest.raises(InputValidationError, match="would both write"):
        init_participant_wf(settings, plan)
    code = main([str(bids), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "work")])
    err = capsys.readouterr().err
    assert code == 16
    line = next(ln for ln in err.splitlines() if "would both write" in ln)
    assert "sub-ctrl01_ses-pre_dir-AP_dwi.nii and" in line or "sub-ctrl01_ses-pre_dir-AP_dwi.nii would" in line
    assert "sub-ctrl01_ses-pre_dir-AP_space-dwi_desc-preproc_dwi.nii.gz" in line
    assert not list((tmp_path / "out").glob("sub-*/**/*_dwi.nii.gz"))


@pytest.mark.skipif(not (VENDORS / "sub-canon61").is_dir(), reason="shared real data not available")
def test_canon61_layout_plans_distinct_outputs(tmp_path):
    """The real canon61 session: its two runs are planned to distinct derivatives (names only)."""
    settings = Settings(bids_dir=VENDORS.resolve(), output_dir=tmp_path / "out", analysis_level="participant",
                        work_dir=tmp_path / "work")
    ses = BIDSInputs(VENDORS.resolve()).session_inputs("canon61", None)
    names = sorted(outputs.name_for("dwi_preproc", run.path) for run in ses.dwi)
    assert names == ["sub-canon61_dir-AP_space-dwi_desc-preproc_dwi.nii.gz",
                     "sub-canon61_dir-PA_space-dwi_desc-preproc_dwi.nii.gz"]
    outputs.check_unique(planned_outputs(settings, type("Plan", (), {"sessions": (ses,)})()))


@pytest.mark.slow
@pytest.mark.skipif(not (VENDORS / "sub-canon61").is_dir(), reason="shared real data not available")
def test_canon61_participant_keeps_both_runs(tmp_path):
    """Real canon61 through the participant level: no run's derivatives are lost.

    Each preprocessed series names the raw run(s) it was made from in its sidecar; together
    they cover both runs (two sets today; one combined series once opposite-PE pairs are
    combined), and no two series share a name.
    """
    out = tmp_path / "out"
    code = main([str(VENDORS.resolve()), str(out), "participant", "--participant-label", "canon61",
                 "-w", str(tmp_path / "work"), "--skip-bids-validation"])
    assert code == 0
    series = outputs.find(out, "dwi_preproc", "canon61", None)
    assert series
    sources = set()
    for path in series:
        meta = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())
        sources |= {Path(s).name for s in meta["Sources"]}
        for key in ("dwi_bval", "dwi_bvec", "brain_mask", "fa"):
            assert outputs.find_run(out, key, "canon61", None, outputs.run_entities(path.name)), (key, path.name)
    assert {"sub-canon61_dir-AP_dwi.nii.gz", "sub-canon61_dir-PA_dwi.nii.gz"} <= sources
    shutil.rmtree(tmp_path / "work", ignore_errors=True)
