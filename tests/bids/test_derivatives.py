"""Derivative names, sidecars, dataset_description, atomic writes, path safety."""
from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest

from bids_uad.bids.derivatives import (
    DerivativesWriter,
    atomic_path,
    atomic_write,
    bids_name,
    safe_join,
    validate_label,
    write_tsv,
)
from bids_uad.errors import UsageError


def test_names_follow_entity_order():
    assert bids_name({"desc": "preproc", "space": "dwi", "ses": "pre", "sub": "01"}, "dwi", ".nii.gz") == \
        "sub-01_ses-pre_space-dwi_desc-preproc_dwi.nii.gz"
    assert bids_name({"subject": "01", "session": "pre", "space": "dwi", "model": "tensor", "param": "fa"},
                     "dwimap", ".nii.gz") == "sub-01_ses-pre_space-dwi_model-tensor_param-fa_dwimap.nii.gz"
    assert bids_name({"sub": "01", "from": "T1w", "to": "dwi", "mode": "image"}, "xfm", ".h5") == \
        "sub-01_from-T1w_to-dwi_mode-image_xfm.h5"
    assert bids_name({"sub": "01", "space": "dwi", "model": "dae", "stat": "score"}, "anomaly", ".nii.gz") == \
        "sub-01_space-dwi_model-dae_stat-score_anomaly.nii.gz"


@pytest.mark.parametrize("bad", ["../x", "a/b", "a\\b", "..", "", "a_b", "a-b", "sub-", "x y"])
def test_bad_labels_rejected(bad):
    with pytest.raises(UsageError):
        validate_label(bad, "sub")


def test_label_prefix_stripped():
    assert validate_label("sub-01", "sub") == "01" and validate_label("01", "sub") == "01"


def test_safe_join_refuses_escape(tmp_path):
    assert safe_join(tmp_path, "sub-01", "a.nii.gz").parent.name == "sub-01"
    with pytest.raises(UsageError):
        safe_join(tmp_path, "..", "x")


def test_writer_refuses_output_inside_input(tmp_path):
    with pytest.raises(UsageError, match="inside the input dataset"):
        DerivativesWriter(tmp_path / "bids" / "derivatives", tmp_path / "bids")


def test_write_image_with_sidecar(tmp_path):
    bids_dir = tmp_path / "bids"
    (bids_dir / "sub-01").mkdir(parents=True)
    src = bids_dir / "sub-01" / "x.nii.gz"
    writer = DerivativesWriter(tmp_path / "out", bids_dir)
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    path = writer.write_image(img, {"subject": "01", "session": "pre", "space": "dwi", "desc": "brain"}, "mask",
                              sidecar={"Type": "Brain"}, datatype="dwi", sources=[src])
    assert path == tmp_path / "out/sub-01/ses-pre/dwi/sub-01_ses-pre_space-dwi_desc-brain_mask.nii.gz"
    meta = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())
    assert meta["Type"] == "Brain" and meta["Sources"] == ["bids:raw:sub-01/x.nii.gz"]
    assert "bids_uad" in meta["SoftwareVersions"]
    assert nib.load(path).shape == (2, 2, 2)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_dataset_description(tmp_path):
    writer = DerivativesWriter(tmp_path / "out", tmp_path / "bids")
    desc = json.loads(writer.ensure_dataset_description().read_text())
    assert desc["DatasetType"] == "derivative"
    assert desc["GeneratedBy"][0]["Name"] == "bids_uad" and desc["GeneratedBy"][0]["Version"]


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as handle:
            handle.write("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.json"]


def test_tsv_na(tmp_path):
    write_tsv(tmp_path / "t.tsv", [{"a": 1.5, "b": None}, {"a": float("nan"), "b": "x"}])
    assert (tmp_path / "t.tsv").read_text() == "a\tb\n1.5\tn/a\nn/a\tx\n"


def _leave_temporary(folder, pid: int, host: str | None = None):
    """Create the temporary an atomic write by process ``pid`` would leave when killed."""
    from bids_uad.bids import derivatives

    name = f".sub-01_dwi.tmp-{host or derivatives._host_tag()}-{pid}-abc123.nii.gz"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(b"partial")
    return folder / name


def test_temporary_names_are_recognised_by_the_cleanup(tmp_path):
    from bids_uad.bids import derivatives

    with atomic_path(tmp_path / "sub-01_dwi.nii.gz") as tmp:
        assert tmp.name.endswith(".nii.gz")
        assert derivatives._TEMPORARY_RE.match(tmp.name)
        # the writer is alive: its temporary is kept
        assert derivatives.remove_orphaned_temporaries(tmp_path) == []
        tmp.write_bytes(b"x")
    assert os.listdir(tmp_path) == ["sub-01_dwi.nii.gz"]


def test_orphaned_temporaries_of_dead_processes_are_removed(tmp_path):
    import subprocess
    import sys
    import time

    from bids_uad.bids.derivatives import FOREIGN_TEMPORARY_MAX_AGE_S, remove_orphaned_temporaries

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    orphan = _leave_temporary(tmp_path / "sub-01" / "dwi", dead_pid)
    live = _leave_temporary(tmp_path / "sub-02" / "dwi", os.getpid())
    foreign_recent = _leave_temporary(tmp_path / "sub-03", 1234, host="othernode")
    foreign_old = _leave_temporary(tmp_path / "sub-04", 1234, host="othernode")
    old = time.time() - FOREIGN_TEMPORARY_MAX_AGE_S - 60
    os.utime(foreign_old, (old, old))
    lookalike = tmp_path / "sub-05" / ".hidden.nii.gz"
    lookalike.parent.mkdir()
    lookalike.write_text("not ours")

    removed = remove_orphaned_temporaries(tmp_path)
    assert sorted(removed) == sorted([orphan, foreign_old])
    assert not orphan.exists() and not foreign_old.exists()
    assert live.exists() and foreign_recent.exists() and lookalike.exists()
