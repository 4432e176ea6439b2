"""Layout queries on real BIDS layouts (0-byte placeholder images) and a hand-built dataset."""
from __future__ import annotations

import json

import pytest

from bids_uad.bids.layout import BIDSInputs
from bids_uad.bids.lesions import find_lesion_mask
from bids_uad.errors import InputMissingError, InputValidationError, NoFilesSelectedError, UsageError


def test_ds114_two_sessions_inherited_gradients(realdata):
    bids = BIDSInputs(realdata / "bids_examples" / "ds114")
    assert bids.subjects()[:2] == ["01", "02"]
    subj = bids.subject_inputs("01")
    assert [s.session for s in subj.sessions] == ["retest", "test"]
    for ses in subj.sessions:
        assert len(ses.dwi) == 1 and len(ses.t1w) == 1
        run = ses.dwi[0]
        assert run.bval.name == "dwi.bval" and run.bval.parent == bids.bids_dir  # root-level, inherited
        assert run.entities["session"] == ses.session
    only_test = bids.subject_inputs("01", ["ses-test"])
    assert [s.session for s in only_test.sessions] == ["test"]


def test_genetics_ukbb_inherited_sidecars(realdata):
    bids = BIDSInputs(realdata / "bids_examples" / "genetics_ukbb")
    ses = bids.subject_inputs("03").sessions[0]
    assert ses.session is None
    run = ses.dwi[0]
    assert run.metadata["PhaseEncodingDirection"] == "j-"  # from the dataset-level dwi.json
    assert run.bvec.name == "dwi.bvec"
    assert ses.t1w[0].name.endswith("_acq-MPRAGE_T1w.nii.gz") and ses.flair


def test_select_subjects(realdata):
    bids = BIDSInputs(realdata / "bids_examples" / "ds114")
    assert bids.select_subjects(["sub-02", "03", "02"]) == ["02", "03"]
    with pytest.raises(NoFilesSelectedError, match="sub-99"):
        bids.select_subjects(["99"])
    with pytest.raises(UsageError):
        bids.select_subjects(["../01"])


def test_reverse_pe_from_intended_for(small_bids):
    bids = BIDSInputs(small_bids)
    run = bids.session_inputs("pat01", "pre").dwi[0]
    assert run.reverse_pe is not None and run.reverse_pe.kind == "fmap-epi"
    assert run.reverse_pe.metadata["PhaseEncodingDirection"] == "j"


def test_reverse_pe_from_b0field_identifier(small_bids):
    fmap_json = small_bids / "sub-pat01/ses-pre/fmap/sub-pat01_ses-pre_dir-PA_epi.json"
    meta = json.loads(fmap_json.read_text())
    meta.pop("IntendedFor")
    meta["B0FieldIdentifier"] = "pepolar0"
    fmap_json.write_text(json.dumps(meta))
    dwi_json = small_bids / "sub-pat01/ses-pre/dwi/sub-pat01_ses-pre_dir-AP_dwi.json"
    dmeta = json.loads(dwi_json.read_text())
    dmeta["B0FieldSource"] = "pepolar0"
    dwi_json.write_text(json.dumps(dmeta))
    run = BIDSInputs(small_bids).session_inputs("pat01", "pre").dwi[0]
    assert run.reverse_pe is not None and run.reverse_pe.path.name.endswith("_epi.nii.gz")


def test_reverse_pe_as_opposite_dwi_run(tmp_path):
    from tests.conftest import _write_dwi, build_small_bids

    root = build_small_bids(tmp_path / "b", n_controls=0, n_patients=1, with_rpe=False)
    _write_dwi(root / "sub-pat01/ses-pre/dwi", "sub-pat01_ses-pre_dir-PA", pe="j")
    runs = BIDSInputs(root).session_inputs("pat01", "pre").dwi
    assert len(runs) == 2
    assert all(r.reverse_pe is not None and r.reverse_pe.kind == "dwi" for r in runs)


def test_same_polarity_reverse_pe_is_an_error_naming_the_sidecar(small_bids):
    fmap_json = small_bids / "sub-pat01/ses-pre/fmap/sub-pat01_ses-pre_dir-PA_epi.json"
    meta = json.loads(fmap_json.read_text())
    meta["PhaseEncodingDirection"] = "j-"
    fmap_json.write_text(json.dumps(meta))
    with pytest.raises(InputValidationError) as err:
        BIDSInputs(small_bids).session_inputs("pat01", "pre")
    assert "sub-pat01_ses-pre_dir-PA_epi.json" in err.value.one_line()


def test_controls_from_participants_tsv(small_bids):
    bids = BIDSInputs(small_bids)
    assert bids.controls() == ["ctrl01", "ctrl02", "ctrl03"]
    assert bids.controls("group", "patient") == ["pat01"]
    with pytest.raises(InputValidationError, match="no column 'diagnosis'"):
        bids.controls("diagnosis", "HC")


def test_missing_dataset(tmp_path):
    with pytest.raises(InputMissingError):
        BIDSInputs(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputValidationError, match="dataset_description.json"):
        BIDSInputs(tmp_path / "empty")


def test_find_lesion_mask(tmp_path):
    anat = tmp_path / "sub-pat01" / "ses-pre" / "anat"
    anat.mkdir(parents=True)
    (anat / "sub-pat01_ses-pre_space-T1w_desc-tumor_mask.nii.gz").write_bytes(b"")
    (anat / "sub-pat01_ses-pre_space-dwi_desc-tumor_mask.nii.gz").write_bytes(b"")
    assert find_lesion_mask(tmp_path, "pat01", "pre").name == "sub-pat01_ses-pre_space-T1w_desc-tumor_mask.nii.gz"
    assert "space-dwi" in find_lesion_mask(tmp_path, "pat01", "pre", space="dwi").name
    assert find_lesion_mask(tmp_path, "pat02", "pre") is None
    assert find_lesion_mask(None, "pat01") is None
    with pytest.raises(UsageError):
        find_lesion_mask(tmp_path, "../pat01")


def test_reverse_pe_with_unknown_polarity_is_skipped_not_an_error(small_bids, caplog):
    """PhaseEncodingAxis only and no anatomical dir- entity on the fmap: no pair, a warning."""
    fmap_json = small_bids / "sub-pat01/ses-pre/fmap/sub-pat01_ses-pre_dir-PA_epi.json"
    meta = json.loads(fmap_json.read_text())
    meta["PhaseEncodingAxis"] = meta.pop("PhaseEncodingDirection")[0]
    fmap_json.write_text(json.dumps(meta))
    renamed = {p: p.with_name(p.name.replace("dir-PA", "dir-rev")) for p in fmap_json.parent.iterdir()}
    for old, new in renamed.items():
        old.rename(new)
    caplog.set_level("WARNING")
    run = BIDSInputs(small_bids).session_inputs("pat01", "pre").dwi[0]
    assert run.reverse_pe is None
    assert "polarity unknown" in caplog.text and "--pe-polarity" in caplog.text
    stated = BIDSInputs(small_bids, pe_polarity=[("dir-rev", "j")]).session_inputs("pat01", "pre").dwi[0]
    assert stated.reverse_pe is not None and stated.reverse_pe.metadata["PhaseEncodingDirection"] == "j"
