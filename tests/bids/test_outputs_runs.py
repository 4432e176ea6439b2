"""Derivative names from the outputs table: every distinguishing entity survives, collisions fail."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_uad.bids import outputs
from bids_uad.errors import InputValidationError
from bids_uad.interfaces.derivatives import DerivativesDataSink


def _image(tmp_path) -> Path:
    img = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), str(img))
    return img


def test_two_dwi_runs_get_distinct_derivatives(tmp_path):
    """canon61: dir-AP and dir-PA full-DTI runs wrote one set of derivatives (the second won)."""
    img, outs = _image(tmp_path), []
    for direction in ("AP", "PA"):
        source = tmp_path / "bids" / "sub-canon61" / "dwi" / f"sub-canon61_dir-{direction}_dwi.nii.gz"
        res = DerivativesDataSink(in_file=str(img), output_dir=str(tmp_path / "out"), output="dwi_preproc",
                                  source_file=str(source)).run(cwd=str(tmp_path))
        outs.append(Path(res.outputs.out_file).name)
    assert outs == ["sub-canon61_dir-AP_space-dwi_desc-preproc_dwi.nii.gz",
                    "sub-canon61_dir-PA_space-dwi_desc-preproc_dwi.nii.gz"]


@pytest.mark.parametrize("name, expected", [
    ("sub-01_ses-pre_acq-hb_dir-AP_run-2_dwi.nii.gz", {"sub": "01", "ses": "pre", "acq": "hb", "dir": "AP", "run": "2"}),
    ("sub-01_rec-mag_echo-1_part-mag_dwi.nii", {"sub": "01", "rec": "mag", "echo": "1", "part": "mag"}),
    ("sub-01_dir-AP_space-dwi_desc-preproc_dwi.nii.gz", {"sub": "01", "dir": "AP"}),
])
def test_source_entities_keep_every_raw_entity(name, expected):
    assert outputs.source_entities(name) == expected


def test_sink_inherits_source_entities_and_table_entities(tmp_path):
    img = _image(tmp_path)
    res = DerivativesDataSink(in_file=str(img), output_dir=str(tmp_path / "out"), output="anomaly_mask",
                              params={"model": "dae"}, meta={outputs.THRESHOLD_METHOD: "otsu"},
                              source_file="sub-01_ses-pre_acq-hb_run-2_space-dwi_desc-preproc_dwi.nii.gz"
                              ).run(cwd=str(tmp_path))
    out = Path(res.outputs.out_file)
    assert out.relative_to(tmp_path / "out").as_posix() == \
        "sub-01/ses-pre/dwi/sub-01_ses-pre_acq-hb_run-2_space-dwi_model-dae_desc-anomaly_mask.nii.gz"
    assert '"ThresholdMethod": "otsu"' in out.with_name(out.name.replace(".nii.gz", ".json")).read_text()


def test_collision_between_two_outputs_is_an_error():
    planned = [("/o/sub-01/dwi/sub-01_space-dwi_desc-preproc_dwi.nii.gz", "/b/sub-01/dwi/sub-01_dwi.nii.gz"),
               ("/o/sub-01/dwi/sub-01_space-dwi_desc-preproc_dwi.nii.gz", "/b/sub-01/dwi/sub-01_dwi.nii")]
    outputs.check_unique(planned[:1] * 2)  # the same input twice is no collision
    with pytest.raises(InputValidationError, match="sub-01_dwi.nii.gz and sub-01_dwi.nii would both write"):
        outputs.check_unique(planned)


def test_table_names_are_distinct_per_source():
    """No two declared outputs of one source share a name (the table itself cannot collide)."""
    source = "sub-01_ses-pre_dir-AP_dwi.nii.gz"
    params = {"model": "dae", "template": "MNI152NLin2009cAsym", "lesion": "lesion", "contrast": "FLAIR",
              "followup": "Followup"}
    paths = [outputs.relpath_for(key, source, **params) for key in outputs.OUTPUTS]
    assert len(set(paths)) == len(paths)
    for key in outputs.OUTPUTS:  # and each name is found again by the readers' matcher
        assert outputs.matches(paths[list(outputs.OUTPUTS).index(key)].name, key, **params) is not None, key


def test_models_are_parameters_of_the_table():
    names = {outputs.name_for("anomaly_score", "sub-01_dwi.nii.gz", model=m) for m in ("dae", "recdisc", "meansignal")}
    assert names == {f"sub-01_space-dwi_model-{m}_stat-score_anomaly.nii.gz" for m in ("dae", "recdisc", "meansignal")}
    assert outputs.matches("sub-01_space-dwi_model-meansignal_stat-score_anomaly.nii.gz", "anomaly_score")
    assert not outputs.matches("sub-01_space-dwi_model-dae_stat-score_anomaly.nii.gz", "anomaly_score", model="x")
    assert not outputs.matches("sub-01_space-dwi_model-dae_stat-pvalue_anomaly.nii.gz", "anomaly_score")


def test_find_selects_runs(tmp_path):
    folder = tmp_path / "sub-01" / "ses-pre" / "dwi"
    folder.mkdir(parents=True)
    for run in ("dir-AP_", "dir-PA_", ""):
        (folder / f"sub-01_ses-pre_{run}space-dwi_desc-preproc_dwi.nii.gz").touch()
    (folder / "sub-01_ses-pre_dir-AP_space-dwi_desc-brain_mask.nii.gz").touch()
    found = outputs.find(tmp_path, "dwi_preproc", "01", "pre")
    assert [outputs.run_label(p.name) for p in found] == ["dir-AP", "dir-PA", ""]
    assert [p.name for p in outputs.find(tmp_path, "dwi_preproc", "01", "pre", source={"dir": "PA"})] == \
        ["sub-01_ses-pre_dir-PA_space-dwi_desc-preproc_dwi.nii.gz"]
    assert outputs.find(tmp_path, "dwi_preproc", "01", None) == []
