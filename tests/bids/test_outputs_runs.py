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


def test_table_covers_every_derivative_of_the_tiny_run():
    """Every file the tiny end-to-end run writes under sub-*/[ses-*/]{anat,dwi}/ (and the subject
    tables) is a declared output (sidecars through their image), with the run's dir-AP wherever
    the output inherits a dwi run's entities."""
    listing = Path(__file__).resolve().parents[2] / ".circleci" / "expected_outputs_tiny.txt"
    names = [ln.strip() for ln in listing.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    checked = 0
    for line in names:
        parts = line.split("/")
        if not line.startswith("sub-") or "figures" in parts or len(parts) < 2 or line.endswith(".html"):
            continue
        name = parts[-1].replace("MNI152NLin2009*", "MNI152NLin2009cAsym")
        candidates = [name] if not name.endswith(".json") else \
            [name[:-5] + ext for ext in (".nii.gz", ".tsv", ".h5", ".bval")]
        keys = [k for k in outputs.OUTPUTS for c in candidates if outputs.matches(c, k)]
        assert keys, line
        if any(outputs.OUTPUTS[k].source == "dwi" for k in keys):
            assert "_dir-AP_" in name, line
        checked += 1
    assert checked > 300


def test_common_source_of_a_combined_pair():
    src = outputs.common_source(["/b/sub-01/ses-pre/dwi/sub-01_ses-pre_acq-hb_dir-AP_dwi.nii.gz",
                                 "/b/sub-01/ses-pre/dwi/sub-01_ses-pre_acq-hb_dir-PA_dwi.nii.gz"])
    assert src == "sub-01_ses-pre_acq-hb_dwi.nii.gz"
    assert outputs.name_for("dwi_preproc", src) == "sub-01_ses-pre_acq-hb_space-dwi_desc-preproc_dwi.nii.gz"


def test_template_transforms_of_each_run(tmp_path):
    """ToTemplateSpace finds the dwi→T1w transform of the map's own run (through the table)."""
    from bids_uad.interfaces.anomaly import template_transforms

    tpl = "MNI152NLin2009cAsym"
    t1w = "sub-01_ses-pre_T1w.nii.gz"
    ap, pa = "sub-01_ses-pre_dir-AP_dwi.nii.gz", "sub-01_ses-pre_dir-PA_dwi.nii.gz"
    for key, source in (("xfm_t1w_to_template", t1w), ("xfm_dwi_to_t1w", ap)):
        path = outputs.path_for(tmp_path, key, source, template=tpl)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    found = template_transforms(tmp_path, "sub-01_ses-pre_dir-AP_space-dwi_desc-preproc_dwi.nii.gz", tpl)
    assert [p.name for p in found] == [f"sub-01_ses-pre_from-T1w_to-{tpl}_mode-image_xfm.h5",
                                       "sub-01_ses-pre_dir-AP_from-dwi_to-T1w_mode-image_xfm.h5"]
    assert template_transforms(tmp_path, pa, tpl) is None  # the T1w was registered to dir-AP only
