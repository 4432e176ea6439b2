"""Which transforms carry a dwi run's maps to the template: via the T1w, or the run's own FA registration."""
from __future__ import annotations

from bids_uad.bids import outputs
from bids_uad.interfaces.anomaly import template_transforms

TPL = "MNI152NLin2009aSym"


def _touch(out, key, source, **params):
    path = outputs.path_for(out, key, source, **params)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x")
    return path


def test_dwi_only_run_uses_its_own_template_registration(tmp_path):
    direct = _touch(tmp_path, "xfm_dwi_to_template", "sub-01_dwi.nii.gz", template=TPL)
    assert template_transforms(tmp_path, "sub-01_dwi.nii.gz", TPL) == (direct,)
    assert template_transforms(tmp_path, "sub-01_acq-b2_dwi.nii.gz", TPL) is None  # another run's: not used


def test_t1w_chain_wins_when_present(tmp_path):
    _touch(tmp_path, "xfm_dwi_to_template", "sub-01_dwi.nii.gz", template=TPL)
    t1w2tpl = _touch(tmp_path, "xfm_t1w_to_template", "sub-01_T1w.nii.gz", template=TPL)
    dwi2t1w = _touch(tmp_path, "xfm_dwi_to_t1w", "sub-01_dwi.nii.gz")
    assert template_transforms(tmp_path, "sub-01_dwi.nii.gz", TPL) == (t1w2tpl, dwi2t1w)


def test_template_route_needs_both_directions_and_names_what_is_missing(tmp_path):
    import numpy as np

    from bids_uad.interfaces.anomaly import template_route

    route, missing = template_route(tmp_path, "sub-01_dwi.nii.gz", TPL, np.eye(4))
    assert route is None and missing == ["from-dwi_to-T1w", f"from-T1w_to-{TPL}", "from-T1w_to-dwi",
                                         f"from-{TPL}_to-T1w"]
    # the dwi-only route carries maps there but has no way back: refused, and said why
    _touch(tmp_path, "xfm_dwi_to_template", "sub-01_dwi.nii.gz", template=TPL)
    route, missing = template_route(tmp_path, "sub-01_dwi.nii.gz", TPL, np.eye(4))
    assert route is None and "writes no inverse" in missing[-1]
    t1w2tpl = _touch(tmp_path, "xfm_t1w_to_template", "sub-01_T1w.nii.gz", template=TPL)
    tpl2t1w = _touch(tmp_path, "xfm_template_to_t1w", "sub-01_T1w.nii.gz", template=TPL)
    dwi2t1w = _touch(tmp_path, "xfm_dwi_to_t1w", "sub-01_dwi.nii.gz")
    route, missing = template_route(tmp_path, "sub-01_dwi.nii.gz", TPL, np.eye(4))
    assert route is None and missing == ["from-T1w_to-dwi"]
    t1w2dwi = _touch(tmp_path, "xfm_t1w_to_dwi", "sub-01_dwi.nii.gz")
    route, missing = template_route(tmp_path, "sub-01_dwi.nii.gz", TPL, 2 * np.eye(4))
    assert missing == [] and route.template == TPL and np.array_equal(route.matrix, 2 * np.eye(4))
    # antspyx applies the last transform first: dwi -> T1w -> template, and template -> T1w -> dwi
    assert route.to_template == (str(t1w2tpl), str(dwi2t1w)) and route.to_dwi == (str(t1w2dwi), str(tpl2t1w))
    # composites along the graph's edges come first
    given = template_route(tmp_path, "sub-01_dwi.nii.gz", TPL, np.eye(4), {"xfm_t1w_to_dwi": "/x/edge.h5"})[0]
    assert given.to_dwi[0] == "/x/edge.h5"


def test_group_level_refuses_controls_without_transforms(tmp_path):
    import numpy as np
    import pytest

    from bids_uad.bids.preprocessed import PreprocessedDwi
    from bids_uad.errors import InputMissingError
    from bids_uad.workflows.group import template_routes

    class Settings:
        output_dir = tmp_path

    for key, source in (("xfm_t1w_to_template", "sub-01_T1w.nii.gz"), ("xfm_template_to_t1w", "sub-01_T1w.nii.gz"),
                        ("xfm_dwi_to_t1w", "sub-01_dwi.nii.gz"), ("xfm_t1w_to_dwi", "sub-01_dwi.nii.gz")):
        _touch(tmp_path, key, source, template=TPL)
    runs = [PreprocessedDwi(s, None, tmp_path / f"sub-{s}" / "dwi" / f"sub-{s}_space-dwi_desc-preproc_dwi.nii.gz",
                            tmp_path, tmp_path, tmp_path, None) for s in ("01", "02")]
    items = [{"affine": np.eye(4)}, {"affine": np.eye(4)}]
    with pytest.raises(InputMissingError, match=r"sub-02: from-dwi_to-T1w.*--output-spaces dwi MNI.*--models"):
        template_routes(Settings, runs, items, TPL)
    routes = template_routes(Settings, runs, items, TPL, refuse=False)
    assert routes[0] is not None and routes[1] is None and items[1]["route"] is None


def test_template_maps_are_written_at_the_maps_own_resolution(tmp_path):
    """ToTemplateSpace (identity registration) writes on a grid covering the template brain at the
    diffusion map's voxel size (res-native), not the template's 1 mm; values land where they were."""
    import json

    import ants
    import nibabel as nib
    import numpy as np

    from bids_uad.algorithms.templates import find_template, template_grid
    from bids_uad.interfaces.anomaly import ToTemplateSpace

    template = find_template()
    out = tmp_path / "out"
    xfm = outputs.path_for(out, "xfm_dwi_to_template", "sub-01_dwi.nii.gz", template=template.name)
    xfm.parent.mkdir(parents=True)
    ants.write_transform(ants.create_ants_transform(transform_type="AffineTransform", dimension=3), str(xfm))
    affine = np.diag([2.0, 2.5, 3.2, 1.0])  # anisotropic: 16 mm^3, res-native 2.52 mm
    affine[:3, 3] = [-90, -126, -72]
    score = np.zeros((91, 88, 57), np.float32)
    world_to_vox = np.linalg.inv(affine)
    i, j, k = np.round(world_to_vox @ [30.0, -20.0, 20.0, 1.0])[:3].astype(int)
    score[i - 3:i + 4, j - 3:j + 4, k - 3:k + 4] = 5.0
    nib.save(nib.Nifti1Image(score, affine), str(tmp_path / "score.nii.gz"))
    (tmp_path / "work").mkdir()
    node = ToTemplateSpace(in_file=str(tmp_path / "score.nii.gz"), output_dir=str(out), source_file="sub-01_dwi.nii.gz",
                           template_name=template.name, template_mask=str(template.brain_mask),
                           in_meta={"Model": "x"})
    result = node.run(cwd=str(tmp_path / "work"))
    warped = nib.load(result.outputs.out_file)
    shape, grid_affine = template_grid(template.brain_mask, 2.52)
    assert warped.shape == shape and np.allclose(warped.affine, grid_affine)
    assert np.allclose(warped.header.get_zooms()[:3], 2.52)
    at = np.round(np.linalg.inv(warped.affine) @ [30.0, -20.0, 20.0, 1.0])[:3].astype(int)
    assert warped.get_fdata()[tuple(at)] == 5.0
    assert "2.52 mm" in result.outputs.meta["Resolution"] and json.dumps(result.outputs.meta)
