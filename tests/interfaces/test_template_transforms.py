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
