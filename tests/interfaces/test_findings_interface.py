"""The Findings interface on a subject that sits in the template (identity transform): a lesion placed
in the right precentral gyrus is reported there, with its size, centre, FDR survival and signature."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from bids_uad.algorithms.templates import find_template
from bids_uad.bids import outputs
from bids_uad.bids.derivatives import read_tsv
from bids_uad.interfaces.findings import Findings
from bids_uad.scoring.findings import COLUMNS


def _save(array, affine, path):
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return str(path)


@pytest.fixture()
def subject(tmp_path):
    import ants

    template = find_template()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-90, -126, -72]
    shape = (91, 109, 91)
    ijk = np.indices(shape).reshape(3, -1).T
    world = ijk * 2.0 + affine[:3, 3]
    brain = (np.linalg.norm((world - [0, -18, 18]) / [70, 90, 70], axis=1) < 1).reshape(shape)
    centre = np.array([40.0, -20.0, 55.0])                        # right precentral gyrus
    lesion = (np.linalg.norm(world - centre, axis=1) < 7).reshape(shape) & brain
    rng = np.random.default_rng(1)
    md = np.where(brain, 0.8e-3, 0) + rng.normal(0, 0.03e-3, shape)
    md[lesion] *= 1.5
    fa = np.where(brain, 0.4, 0) + rng.normal(0, 0.02, shape)
    fa[lesion] *= 0.6
    score = np.where(brain, rng.random(shape), 0).astype(np.float32)
    score[lesion] += 5
    pvalue = np.where(lesion, 1e-5, 0.5).astype(np.float32)
    source = "sub-01_dwi.nii.gz"
    xfm = outputs.path_for(tmp_path / "out", "xfm_dwi_to_template", source, template=template.name)
    xfm.parent.mkdir(parents=True)
    ants.write_transform(ants.create_ants_transform(transform_type="AffineTransform", dimension=3), str(xfm))
    files = {k: _save(v, affine, tmp_path / f"{k}.nii.gz") for k, v in
             {"mask": lesion.astype(np.uint8), "score": score, "pvalue": pvalue, "brain": brain.astype(np.uint8),
              "md": md.astype(np.float32), "fa": fa.astype(np.float32)}.items()}
    return template, files, source, tmp_path / "out", lesion


def test_findings_table_names_region_centre_and_signature(subject, tmp_path):
    template, files, source, out, lesion = subject
    node = Findings(mask=files["mask"], score=files["score"], pvalue=files["pvalue"], brain_mask=files["brain"],
                    md=files["md"], fa=files["fa"], scoring={"fdr_q": 0.05, "min_cluster_ml": 0.5},
                    source_file=source, output_dir=str(out), template_name=template.name,
                    template_file=str(template.t1w), in_meta={"Model": "x", "ThresholdMethod": "healthy-fpr"})
    (tmp_path / "work").mkdir()
    result = node.run(cwd=str(tmp_path / "work"))
    rows = read_tsv(result.outputs.out_table)
    assert len(rows) == 1 and result.outputs.n_findings == 1
    row = rows[0]
    assert float(row["volume_ml"]) == pytest.approx(lesion.sum() * 0.008)
    assert [float(row[f"centre_{a}"]) for a in "xyz"] == pytest.approx([40, -20, 55], abs=1)
    assert [float(row[f"template_{a}"]) for a in "xyz"] == pytest.approx([40, -20, 55], abs=1.5)
    assert row["region_harvard_oxford"].startswith("Right_Precentral_Gyrus")
    assert "Precentral_R" in row["region_aal"]
    assert row["fdr_survives"] == "yes" and float(row["min_pvalue"]) == pytest.approx(1e-5)
    assert float(row["md_percent"]) == pytest.approx(50, abs=3) and float(row["fa_percent"]) == pytest.approx(-40, abs=3)
    assert "MD +50 %" in row["signature"] and row["ad_median"] == "n/a"
    meta = result.outputs.meta
    assert set(COLUMNS) <= set(meta) and all(meta[c]["Description"] for c in row)   # every column described
    assert meta["Atlases"][0]["Key"] == "harvard_oxford" and "FSL" in meta["Atlases"][0]["License"]
    assert meta["Findings"] == 1 and meta["Template"] == template.name
    json.dumps(meta)                                                 # a valid sidecar


def test_no_transforms_leaves_template_columns_empty(subject, tmp_path):
    template, files, source, out, _ = subject
    node = Findings(mask=files["mask"], score=files["score"], brain_mask=files["brain"], source_file=source,
                    output_dir=str(tmp_path / "elsewhere"), template_name=template.name,
                    template_file=str(template.t1w), min_volume_ml=0.0)
    (tmp_path / "work2").mkdir()
    result = node.run(cwd=str(tmp_path / "work2"))
    row = read_tsv(result.outputs.out_table)[0]
    assert row["template_x"] == "n/a" and row["region_harvard_oxford"] == "n/a"
    assert row["min_pvalue"] == "n/a" and row["fdr_survives"] == "n/a"      # uncalibrated: no p-values
    assert "no transforms" in result.outputs.meta["TemplateLocation"]


def test_smallest_finding_option_then_calibrated_volume_then_post_processing_minimum():
    from bids_uad.interfaces.findings import _minimum_volume

    scoring = {"min_cluster_ml": 0.5, "finding_min_ml": 2.3}
    assert _minimum_volume(1.0, scoring) == (1.0, "--findings-min-volume")
    ml, why = _minimum_volume(-1.0, scoring)
    assert ml == 2.3 and why.startswith("calibrated on the model's healthy calibration controls")
    ml, why = _minimum_volume(-1.0, {"min_cluster_ml": 0.5, "finding_min_ml": None})
    assert ml == 0.5 and "min_cluster_ml" in why
