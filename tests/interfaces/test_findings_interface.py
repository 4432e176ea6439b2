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


def _normative_model_file(directory):
    """A template-space normative model file fitted on 4 toy controls (template frame = their world frame)."""
    from dataclasses import replace

    from bids_uad.algorithms.registration import TemplateRoute
    from bids_uad.models.settings import preset
    from bids_uad.training.fit import train_from_dwi
    from bids_uad.training.toydata import fibonacci_directions, make_toy_subject

    grid, bvecs = (20, 20, 16), fibonacci_directions(12)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-20.0, -22.0, -14.0]
    tpl_affine = np.diag([3.0, 3.0, 3.0, 1.0])
    tpl_affine[:3, 3] = [-21.0, -24.0, -15.0]
    s = preset("quick", "normative")
    model = replace(s.model, grid=grid, n_channels=12, normative_space="template", normative_template="tplTest",
                    normative_template_shape=(15, 15, 12), normative_template_affine=tuple(tpl_affine.ravel()))
    settings = replace(s, model=model, scoring=s.scoring.sized_to(0.008))
    bvals, bvecs_b0 = np.r_[0.0, np.full(12, 1000.0)], np.vstack([[0, 0, 0], bvecs])

    def raw(sub):
        s0 = 1000.0 * sub.mask[..., None].astype(np.float32)
        return np.concatenate([s0, s0 * sub.data], -1)

    subs = [make_toy_subject(grid, bvecs, 100 + i) for i in range(4)]
    bundle = train_from_dwi(settings, [raw(x) for x in subs], [bvals] * 4, [bvecs_b0] * 4, [x.mask for x in subs],
                            list("abcd"), routes=[TemplateRoute("tplTest", tuple(affine.ravel()))] * 4)
    patient = make_toy_subject(grid, bvecs, 900, lesion=True)
    return bundle.save(directory), patient, raw(patient), affine, bvals, bvecs_b0


def test_controls_reference_serves_the_signature(tmp_path):
    """With a template-space normative model and the run's transforms (identity here), FA, MD and the
    mean DW ratio of a finding are compared with the controls at the same voxels; AD with the subject's
    tissue; without the transforms every metric falls back to the subject's tissue, and says so."""
    import ants

    from bids_uad.algorithms.tensor import tensor_metrics_from_ratios
    from bids_uad.interfaces.findings import ControlsReference

    model_file, patient, dwi, affine, bvals, bvecs = _normative_model_file(tmp_path / "models")
    xfms = {}
    for name in ("dwi2t1w_xfm", "t1w2template_xfm", "t1w2dwi_xfm", "template2t1w_xfm"):
        xfms[name] = str(tmp_path / f"{name}.mat")
        ants.write_transform(ants.create_ants_transform(transform_type="AffineTransform", dimension=3), xfms[name])
    maps = tensor_metrics_from_ratios(np.moveaxis(patient.data, -1, 0), bvals[1:], bvecs[1:], patient.mask)
    files = {k: _save(v, affine, tmp_path / f"{k}.nii.gz") for k, v in
             {"dwi": dwi, "mask": patient.lesion.astype(np.uint8), "score": patient.lesion.astype(np.float32),
              "brain": patient.mask.astype(np.uint8), "fa": maps["fa"], "md": maps["md"],
              "ad": maps["md"] * 1.2}.items()}
    np.savetxt(tmp_path / "dwi.bval", bvals[None])
    np.savetxt(tmp_path / "dwi.bvec", bvecs.T)
    common = dict(mask=files["mask"], score=files["score"], brain_mask=files["brain"], fa=files["fa"],
                  md=files["md"], ad=files["ad"], dwi_file=files["dwi"], bval_file=str(tmp_path / "dwi.bval"),
                  bvec_file=str(tmp_path / "dwi.bvec"), source_file="sub-01_dwi.nii.gz",
                  output_dir=str(tmp_path / "out"), min_volume_ml=0.0)
    for k in ("with", "without", "ref", "noref"):
        (tmp_path / k).mkdir()
    reference = ControlsReference(model_file=str(model_file), dwi_file=files["dwi"], source_file="sub-01_dwi.nii.gz",
                                  output_dir=str(tmp_path / "out"), **xfms).run(cwd=str(tmp_path / "ref"))
    assert reference.outputs.out_file and "model-normative.json" in reference.outputs.meta["Description"]
    result = Findings(controls_reference=reference.outputs.out_file, controls_meta=reference.outputs.meta,
                      **common).run(cwd=str(tmp_path / "with"))
    row = read_tsv(result.outputs.out_table)[0]
    assert (row["fa_reference"], row["md_reference"], row["dwratio_reference"], row["ad_reference"]) == \
        ("controls", "controls", "controls", "subject")
    # the numbers: the cluster's median against the controls' median centre over the same voxels
    carried = nib.load(reference.outputs.out_file).get_fdata()
    labels = nib.load(result.outputs.out_labels).get_fdata() == 1
    covered = labels & (carried[..., 7] > 0.5)
    centre, spread = np.median(carried[..., 1][covered]), np.median(carried[..., 4][covered])
    inside = np.median(maps["md"][covered])
    assert float(row["md_percent"]) == pytest.approx(100 * (inside - centre) / centre, rel=1e-3)
    assert float(row["md_z"]) == pytest.approx((inside - centre) / spread, rel=1e-3)
    assert float(row["md_percent"]) > 20 and float(row["md_z"]) > 2          # the toy lesion raises MD
    meta = result.outputs.meta
    assert "healthy controls at the same template locations" in meta["DeviationReference"]
    assert "model-normative.json" in meta["DeviationReference"] and set(meta["md_reference"]["Levels"]) == \
        {"controls", "subject"}
    json.dumps(meta)
    # no transforms for this run: no controls' reference, every metric against the subject's tissue
    none = ControlsReference(model_file=str(model_file), dwi_file=files["dwi"], source_file="sub-01_dwi.nii.gz",
                             output_dir=str(tmp_path / "out")).run(cwd=str(tmp_path / "noref"))
    assert none.outputs.out_file == "" and "no transforms" in none.outputs.meta["Note"]
    result = Findings(controls_reference="", controls_meta=none.outputs.meta, **common).run(cwd=str(tmp_path / "without"))
    row = read_tsv(result.outputs.out_table)[0]
    assert {row[f"{k}_reference"] for k in ("fa", "md", "ad", "dwratio")} == {"subject"}
    assert "not the reference (this run has no transforms" in result.outputs.meta["DeviationReference"]
