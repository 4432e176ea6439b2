"""Layout and validation of the real five-vendor dataset (``../shared/realdata/vendors_bids``).

Reads names, sidecars and headers only (plus the gradient files and images validation opens):
fast.  Checks what a careful reader of this dataset sees: the AP/PA pairs of Canon and UIH are
recognised from their ``dir-`` entities although the sidecars give only ``PhaseEncodingAxis``,
and single runs with an unknown polarity are accepted (no correction, no crash).
"""
from __future__ import annotations

import pytest

from bids_uad.bids.layout import BIDSInputs
from bids_uad.bids.phase_encoding import SOURCE_KEY, parse_pe_polarity
from bids_uad.bids.validate import validate_anatomical, validate_dwi_run

SUBJECTS = ["canon61", "philipsdstream15", "siemenstrio40", "toshiba", "uih16"]


@pytest.fixture(scope="module")
def vendors(realdata):
    return BIDSInputs(realdata / "vendors_bids")


def test_every_subject_lays_out_and_validates(vendors):
    assert vendors.subjects() == SUBJECTS
    assert vendors.controls() == SUBJECTS
    for subject in SUBJECTS:
        (ses,) = vendors.subject_inputs(subject).sessions
        assert ses.dwi, subject
        for run in ses.dwi:
            table = validate_dwi_run(run)
            assert table.b0_mask.any() and (~table.b0_mask).any(), run.path.name
        for t1w in ses.t1w:
            validate_anatomical(t1w, "T1w")
    (uih,) = vendors.subject_inputs("uih16").sessions
    assert len(uih.t1w) == 1


@pytest.mark.parametrize("subject", ["canon61", "uih16"])
def test_full_dti_pairs_recognised_from_dir_entity(vendors, subject):
    (ses,) = vendors.subject_inputs(subject).sessions
    runs = {run.entities["direction"]: run for run in ses.dwi}
    assert set(runs) == {"AP", "PA"}
    assert runs["AP"].metadata["PhaseEncodingDirection"] == "j-"  # LAS images: AP points to -j
    assert runs["PA"].metadata["PhaseEncodingDirection"] == "j"
    for label, run in runs.items():
        assert "dir-" + label in run.metadata[SOURCE_KEY] and "PhaseEncodingAxis j" in run.metadata[SOURCE_KEY]
        assert run.reverse_pe is not None and run.reverse_pe.kind == "dwi"
    assert runs["AP"].reverse_pe.path == runs["PA"].path


@pytest.mark.parametrize("subject", ["toshiba", "philipsdstream15"])
def test_single_run_without_polarity_has_no_pair(vendors, subject):
    (ses,) = vendors.subject_inputs(subject).sessions
    (run,) = ses.dwi
    assert "PhaseEncodingDirection" not in run.metadata
    assert "without polarity" in run.metadata[SOURCE_KEY]
    assert run.reverse_pe is None


def test_sidecar_direction_is_kept(vendors):
    (ses,) = vendors.subject_inputs("siemenstrio40").sessions
    assert ses.dwi[0].metadata["PhaseEncodingDirection"] == "j-"
    assert ses.dwi[0].metadata[SOURCE_KEY] == "sidecar PhaseEncodingDirection"


def test_user_statement_wins(realdata):
    bids = BIDSInputs(realdata / "vendors_bids", pe_polarity=parse_pe_polarity(["sub-toshiba_dwi.nii.gz=j"]))
    (ses,) = bids.subject_inputs("toshiba").sessions
    assert ses.dwi[0].metadata["PhaseEncodingDirection"] == "j"
    assert ses.dwi[0].metadata[SOURCE_KEY] == "--pe-polarity sub-toshiba_dwi.nii.gz=j"


def test_pairs_and_their_shared_name(vendors):
    from bids_uad.workflows.base import opposite_pe_pairs, shared_source_name

    (ses,) = vendors.subject_inputs("canon61").sessions
    pairs = opposite_pe_pairs(ses.dwi)
    assert len(pairs) == 1
    assert shared_source_name([ses.dwi[i].path for i in pairs[0]]).name == "sub-canon61_dwi.nii.gz"
    (ses,) = vendors.subject_inputs("toshiba").sessions
    assert opposite_pe_pairs(ses.dwi) == []


def test_dataset_of_symbolic_links(realdata, tmp_path):
    """DataLad/git-annex datasets are links to files outside the dataset: no traceback."""
    src = realdata / "philips_dti_b1000" / "701_DTI_Biobank_2mm_MB3S2_EPI"
    (tmp_path / "sub-x" / "dwi").mkdir(parents=True)
    (tmp_path / "dataset_description.json").write_text('{"Name": "links", "BIDSVersion": "1.9.0"}')
    for ext in (".nii.gz", ".bval", ".bvec", ".json"):
        (tmp_path / "sub-x" / "dwi" / f"sub-x_dwi{ext}").symlink_to(f"{src}{ext}")
    (ses,) = BIDSInputs(tmp_path).subject_inputs("x").sessions
    assert ses.dwi[0].path.name == "sub-x_dwi.nii.gz" and ses.dwi[0].reverse_pe is None
    validate_dwi_run(ses.dwi[0])


def test_model_of_other_shells_refused_before_any_work(realdata, tmp_path, capsys):
    """participant --model on a real dwi-only subject whose shell (b1500) the model was not
    trained on: exit 16 at start-up, one line naming the run's .bval and the model."""
    from bids_uad.cli.run import main
    from tests.workflows.test_participant_graph import _model_file

    models = tmp_path / "models"
    models.mkdir()
    _model_file(models, bvalue=1000.0)
    code = main([str(realdata / "vendors_bids"), str(tmp_path / "out"), "participant", "--participant-label",
                 "toshiba", "-w", str(tmp_path / "work"), "--model", str(models)])
    assert code == 16
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "sub-toshiba_dwi.bval: b-values [1500] are not in the model's reference shells [1000]" in err
    assert not (tmp_path / "work" / "bids_uad_participant_wf").exists()  # nothing ran
