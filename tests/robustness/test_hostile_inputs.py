"""Hostile and odd inputs: each gets its documented exit code and one clear line, never a traceback.

Every case copies and alters a tiny hand-built dataset (``tests/conftest.py``) and runs the
real command line in a subprocess.  Validation-level failures must come back in seconds,
before any processing (no subject folder in OUTPUT_DIR); the few inputs that must *run*
(a DataLad dataset, no dwi sidecar, b = 10 000 only) run the diffusion stage (~10 s each).
The stderr of every run is kept, and the last test checks that none holds a traceback
(``grep -c Traceback`` over all of them is 0).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import shutil
import struct
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import build_small_bids
from tests.robustness.helpers import cli_argv, cli_env, small_dwi_bids

pytestmark = pytest.mark.timeout(300)

#: stderr of every CLI run of this module, for the traceback check at the end
STDERR: list[str] = []
#: a validation-level failure must come back within this many seconds (generous: shared 2-core machine)
FAST_S = 60.0

DWI = "sub-ctrl01/ses-pre/dwi/sub-ctrl01_ses-pre_dir-AP_dwi"
T1W = "sub-ctrl01/ses-pre/anat/sub-ctrl01_ses-pre_T1w"


# -- helpers -------------------------------------------------------------------------------------
def _cli(*args, timeout: float = 240) -> tuple[int, str, float]:
    start = time.monotonic()
    result = subprocess.run(cli_argv(*args), env=cli_env(), capture_output=True, text=True, timeout=timeout)
    STDERR.append(result.stderr)
    return result.returncode, result.stderr, time.monotonic() - start


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("bids_uad: error:")]


def _fails(bids: Path, tmp_path: Path, code: int, *names: str, extra=(), label="ctrl01") -> str:
    """Run the participant level; it must exit ``code`` fast with one error line naming ``names``."""
    out = tmp_path / "out"
    args = [bids, out, "participant", "-w", tmp_path / "work", *extra]
    if label:
        args += ["--participant-label", label]
    rc, err, seconds = _cli(*args)
    lines = _errors(err)
    assert rc == code, f"exit {rc}, expected {code}\n{err[-3000:]}"
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    for name in names:
        assert name in lines[0], f"{name!r} not in {lines[0]!r}"
    assert seconds < FAST_S, f"took {seconds:.0f} s"
    assert not list(out.glob("sub-*/")), "processing started before validation failed"
    return lines[0]


def _dwi_dataset(tmp_path: Path, rpe: bool = True) -> Path:
    return small_dwi_bids(tmp_path / "bids", n_controls=1, n_patients=0, with_rpe=rpe)


def _nii_bytes(img) -> bytes:
    """An image as uncompressed NIfTI-1 bytes (header + data)."""
    return img.to_bytes()


def _patch_header(path: Path, offset: int, fmt: str, *values) -> None:
    """Rewrite raw header bytes of a ``.nii.gz`` (nibabel would "fix" the values on save)."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    struct.pack_into(fmt, raw, offset, *values)
    path.write_bytes(gzip.compress(bytes(raw)))


def _write_model(folder: Path, name: str = "dae", n_channels: int = 6) -> Path:
    """An untrained but complete model file (the format the group level writes), in a second."""
    import torch

    from bids_uad.models import get_model
    from bids_uad.models.bundle import FoldResult, ModelBundle
    from bids_uad.models.calibration import Calibration
    from bids_uad.models.settings import preset

    s = preset("quick", name)
    s = replace(s, model=replace(s.model, n_channels=n_channels))
    torch.manual_seed(0)
    folds = [FoldResult(k, get_model(name, s.model), [0, 1], [2], 1, 0.5, [],
                        Calibration(np.linspace(0, 1, 50).astype(np.float32))) for k in range(2)]
    bvecs = np.eye(3)[np.arange(n_channels) % 3]
    return ModelBundle(s, folds, np.full(n_channels, 1000.0), bvecs, ["a", "b", "c"]).save(folder)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    _write_model(folder)
    return folder


def _copy_model(model_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "models"
    shutil.copytree(model_dir, dst)
    return dst / "model-dae.json"


def _edit_json(path: Path, edit) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


# -- the table ---------------------------------------------------------------------------
def test_truncated_dwi_exits_16_and_the_run_log_has_the_error(tmp_path):
    bids = _dwi_dataset(tmp_path)
    dwi = bids / f"{DWI}.nii.gz"
    data = dwi.read_bytes()
    dwi.write_bytes(data[:len(data) // 2])
    line = _fails(bids, tmp_path, 16, dwi.name, "truncated or corrupt")
    logs = list((tmp_path / "out" / "logs").glob("run-*.log"))
    assert len(logs) == 1 and line.removeprefix("bids_uad: error: ") in logs[0].read_text()


def test_every_bvalue_zero_exits_16(tmp_path):
    bids = _dwi_dataset(tmp_path)
    bval = bids / f"{DWI}.bval"
    bval.write_text(" ".join(["0"] * 7) + "\n")
    _fails(bids, tmp_path, 16, bval.name, "no diffusion-weighted volume")


def test_all_zero_dwi_exits_16_at_validation(tmp_path):
    bids = _dwi_dataset(tmp_path)
    dwi = bids / f"{DWI}.nii.gz"
    img = nib.load(dwi)
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine), dwi)
    _fails(bids, tmp_path, 16, dwi.name, "only zeros")


def _make_annexed(bids: Path) -> None:
    """Turn every image into a git-annex symlink into .git/annex/objects, as a DataLad clone has."""
    for image in sorted(p for p in bids.rglob("*.nii.gz") if ".git" not in p.parts):
        data = image.read_bytes()
        key = f"MD5E-s{len(data)}--{hashlib.md5(data).hexdigest()}.nii.gz"
        obj = bids / ".git" / "annex" / "objects" / "Xk" / "7q" / key / key
        obj.parent.mkdir(parents=True)
        obj.write_bytes(data)
        image.unlink()
        image.symlink_to(os.path.relpath(obj, image.parent))


def test_datalad_dataset_runs_with_unicode_sidecars(tmp_path):
    bids = _dwi_dataset(tmp_path)
    sidecar = bids / f"{DWI}.json"
    meta = json.loads(sidecar.read_text())
    meta.update({"InstitutionName": "Universitätsklinikum Zürich — Neuro-MRT ✓", "Übung": "naïve"})
    sidecar.write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    (bids / "participants.tsv").write_text("participant_id\tgroup\tsite\nsub-ctrl01\tcontrol\tZürich\n",
                                           encoding="utf-8")
    _make_annexed(bids)
    assert (bids / f"{DWI}.nii.gz").is_symlink()
    out = tmp_path / "out"
    rc, err, _ = _cli(bids, out, "participant", "-w", tmp_path / "work", "--participant-label", "ctrl01")
    assert rc == 0, err[-3000:]
    folder = out / "sub-ctrl01" / "ses-pre" / "dwi"
    found = sorted(p.name for p in folder.glob("*desc-preproc_dwi.nii.gz"))
    assert found, sorted(p.name for p in folder.iterdir())
    assert list(folder.glob("*desc-susceptibility_fieldmap.nii.gz")), "the reverse-PE pair was not found"
    for side in folder.glob("*.json"):  # provenance names the dataset's files, not annex keys
        assert "annex" not in side.read_text(), side


def test_annexed_file_without_content_exits_16_naming_datalad_get(tmp_path):
    bids = _dwi_dataset(tmp_path)
    _make_annexed(bids)
    shutil.rmtree(bids / ".git" / "annex" / "objects")  # a clone before `datalad get`
    _fails(bids, tmp_path, 16, "sub-ctrl01_ses-pre_dir-AP", "datalad get")


def test_subject_folder_with_a_space_is_skipped_with_a_warning(tmp_path):
    bids = build_small_bids(tmp_path / "bids", n_controls=1, n_patients=2)
    (bids / "sub-pat02").rename(bids / "sub-pat02 x")
    for flag in ([], ["--skip-bids-validation"]):
        line = _fails(bids, tmp_path, 18, "sub-pat02", extra=flag, label="pat02")
        assert "not found" in line
        assert "sub-pat02 x: skipped: not a valid subject folder name" in STDERR[-1]


@pytest.mark.parametrize("filters,key", [({"dwi": {"nonsense": 1}}, "nonsense"),
                                         ({"dwi": {"return_type": "filename"}}, "return_type"),
                                         ({"T1w": {"scope": "raw"}}, "scope")])
def test_filter_file_with_an_unknown_key_exits_64_naming_it(tmp_path, filters, key):
    bids = _dwi_dataset(tmp_path)
    path = tmp_path / "filters.json"
    path.write_text(json.dumps(filters))
    _fails(bids, tmp_path, 64, path.name, repr(key), extra=["--bids-filter-file", path])


def test_filter_removing_every_dwi_exits_18_and_overridden_keys_are_named(tmp_path):
    bids = build_small_bids(tmp_path / "bids", n_controls=1, n_patients=0)
    path = tmp_path / "filters.json"
    path.write_text(json.dumps({"dwi": {"acquisition": "nothere", "subject": "ctrl01", "extension": ".nii"}}))
    _fails(bids, tmp_path, 18, "dwi", "selected no dwi", extra=["--bids-filter-file", path])
    assert "dwi.subject is ignored" in STDERR[-1] and "dwi.extension is ignored" in STDERR[-1]


def test_lower_case_suffix_key_is_named_in_a_warning(tmp_path):
    bids = build_small_bids(tmp_path / "bids", n_controls=1, n_patients=0)
    path = tmp_path / "filters.json"
    path.write_text(json.dumps({"t1w": {"acquisition": "nothere"}, "bold": {"task": "rest"}}))
    _fails(bids, tmp_path, 18, "T1w", extra=["--bids-filter-file", path])
    assert "key 't1w' taken as the suffix 'T1w'" in STDERR[-1]
    assert "key 'bold' is not a suffix this app reads" in STDERR[-1]


# model files: each refused at start-up, before OUTPUT_DIR is even created
def _model_fails(tmp_path: Path, model: Path, code: int, *names: str) -> None:
    bids = _dwi_dataset(tmp_path)
    _fails(bids, tmp_path, code, *names, extra=["--model", model])
    assert not (tmp_path / "out").exists()


def test_model_with_a_wrong_hash(tmp_path, model_dir):
    model = _copy_model(model_dir, tmp_path)
    _edit_json(model, lambda m: m.update(tensor_sha256="0" * 64))
    _model_fails(tmp_path, model, 16, "model-dae.safetensors", "tensor_sha256", "hash differs")


def test_model_tensors_replaced_by_a_pickle(tmp_path, model_dir):
    model = _copy_model(model_dir, tmp_path)
    model.with_suffix(".safetensors").write_bytes(pickle.dumps({"fold0.w": [1.0, 2.0]}))
    _model_fails(tmp_path, model, 64, "model-dae.safetensors", "pickle", "never unpickled")


def test_model_given_as_a_pickle_or_an_image(tmp_path, model_dir):
    bids = _dwi_dataset(tmp_path)
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(pickle.dumps({"state": 1}))
    _fails(bids, tmp_path, 64, "model.pt", "not a model file", extra=["--model", ckpt])
    _fails(bids, tmp_path, 64, "dwi.nii.gz", "not a model file", extra=["--model", bids / f"{DWI}.nii.gz"])


def test_model_with_an_unknown_model_name(tmp_path, model_dir):
    model = _copy_model(model_dir, tmp_path)
    _edit_json(model, lambda m: (m["settings"]["model"].update(name="gan"), m["architecture"].update(name="gan")))
    _model_fails(tmp_path, model, 16, "model-dae.json", "settings.model.name", "unknown model 'gan'")


def _refused(model: Path, code: int, *names: str) -> None:
    """The start-up check, in process (the CLI path is exercised by the cases above and below)."""
    from bids_uad.errors import BidsUadError
    from bids_uad.models.validate import validate_model_argument

    with pytest.raises(BidsUadError) as err:
        validate_model_argument(model)
    assert err.value.exit_code == code and "\n" not in err.value.one_line()
    for name in names:
        assert name in err.value.one_line()


def test_model_with_wrong_field_types(tmp_path, model_dir):
    model = _copy_model(model_dir, tmp_path)
    _edit_json(model, lambda m: m["settings"]["model"].update(grid=["16", 16, 16]))
    _model_fails(tmp_path, model, 16, "model-dae.json", "settings.model.grid", "expected tuple")
    for where, field, value in [("model", "depth", 2.5), ("model", "kl_weight", "big"),
                                ("model", "latent_scaling", None), ("training", "n_folds", True),
                                ("scoring", "fpr", float("nan")), ("ood", "modes", "random")]:
        model = _copy_model(model_dir, tmp_path / f"{where}_{field}")
        _edit_json(model, lambda m: m["settings"][where].update({field: value}))
        _refused(model, 16, "model-dae.json", f"settings.{where}.{field}")
    for key, value in [("training_subjects", "abc"), ("reference_gradients", [1, 2]), ("tensor_sha256", 5)]:
        model = _copy_model(model_dir, tmp_path / key)
        _edit_json(model, lambda m: m.update({key: value}))
        _refused(model, 16, "model-dae.json", key)


def test_model_without_folds(tmp_path, model_dir):
    model = _copy_model(model_dir, tmp_path)
    _edit_json(model, lambda m: m.pop("folds"))
    _model_fails(tmp_path, model, 16, "model-dae.json", "folds: missing")


def test_model_with_a_wrong_channel_count(tmp_path, model_dir):
    model = _copy_model(model_dir, tmp_path)
    _edit_json(model, lambda m: (m["settings"]["model"].update(n_channels=7),
                                 m["reference_gradients"].update(bvals=[1000.0] * 7,
                                                                 bvecs=[[1.0, 0.0, 0.0]] * 7)))
    _model_fails(tmp_path, model, 16, "model-dae.safetensors", "n_channels=7", "shape")


def test_model_asking_for_a_huge_architecture_is_refused_before_allocating(tmp_path, model_dir):
    model = _copy_model(model_dir, tmp_path)
    _edit_json(model, lambda m: m["settings"]["model"].update(grid=[4096, 4096, 4096]))
    start = time.monotonic()
    _model_fails(tmp_path, model, 16, "model-dae.json", "settings.model.grid", "bounds")
    assert time.monotonic() - start < FAST_S
    model2 = _copy_model(model_dir, tmp_path / "b")
    _edit_json(model2, lambda m: m["settings"]["model"].update(features=100000, max_features=100000))
    _refused(model2, 16, "settings.model.features", "bounds")
    model3 = _copy_model(model_dir, tmp_path / "c")  # each bound kept, but 8 GB of parameters in all
    _edit_json(model3, lambda m: m["settings"]["model"].update(grid=[256, 256, 256], depth=2, latent_size=4096))
    _refused(model3, 16, "settings.model", "parameters exceed")


def test_no_dwi_sidecar_and_no_reverse_pe_runs_with_a_warning(tmp_path):
    bids = _dwi_dataset(tmp_path, rpe=False)
    (bids / f"{DWI}.json").unlink()
    rc, err, _ = _cli(bids, tmp_path / "out", "participant", "-w", tmp_path / "work", "--participant-label", "ctrl01")
    assert rc == 0, err[-3000:]
    assert "no JSON sidecar" in err and "sub-ctrl01_ses-pre_dir-AP_dwi.nii.gz" in err
    assert list((tmp_path / "out").glob("sub-ctrl01/ses-pre/dwi/*desc-preproc_dwi.nii.gz"))


def test_no_dwi_sidecar_with_a_reverse_pe_exits_16(tmp_path):
    """Where the sidecar's fields are needed (susceptibility correction) it stays required."""
    bids = _dwi_dataset(tmp_path)
    (bids / f"{DWI}.json").unlink()
    _fails(bids, tmp_path, 16, "dwi.nii.gz", "no JSON sidecar")


def test_bvalue_10000_only_runs_with_a_plausibility_warning(tmp_path):
    bids = _dwi_dataset(tmp_path)
    (bids / f"{DWI}.bval").write_text("0 " + " ".join(["10000"] * 6) + "\n")
    rc, err, _ = _cli(bids, tmp_path / "out", "participant", "-w", tmp_path / "work", "--participant-label", "ctrl01")
    assert rc == 0, err[-3000:]
    assert "unusually high" in err and "sub-ctrl01_ses-pre_dir-AP_dwi.bval" in err


# -- more hostile inputs ------------------------------------------------------------------------
def test_gzip_stream_corrupted_mid_file_exits_16(tmp_path):
    bids = _dwi_dataset(tmp_path)
    dwi = bids / f"{DWI}.nii.gz"
    data = bytearray(dwi.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = b"\xff" * 64
    dwi.write_bytes(bytes(data))
    _fails(bids, tmp_path, 16, dwi.name, "truncated or corrupt")


@pytest.mark.parametrize("value", [0.0, -2.0])
def test_zero_or_negative_voxel_size_exits_16(tmp_path, value):
    bids = _dwi_dataset(tmp_path)
    dwi = bids / f"{DWI}.nii.gz"
    _patch_header(dwi, 76 + 4 * 2, "<f", value)  # pixdim[2]
    _fails(bids, tmp_path, 16, dwi.name, "voxel sizes")


def test_qform_and_sform_disagreeing_exits_16(tmp_path):
    bids = _dwi_dataset(tmp_path)
    dwi = bids / f"{DWI}.nii.gz"
    img = nib.load(dwi)
    moved = img.affine.copy()
    moved[:3, 3] += [12.0, -5.0, 3.0]
    img = nib.Nifti1Image(np.asarray(img.dataobj), img.affine)
    img.set_sform(img.affine, code=1)
    img.set_qform(moved, code=1)
    nib.save(img, dwi)
    _fails(bids, tmp_path, 16, dwi.name, "qform and sform disagree")


def test_zero_length_bvec_for_a_weighted_volume_exits_16(tmp_path):
    bids = _dwi_dataset(tmp_path)
    bvec = bids / f"{DWI}.bvec"
    rows = [line.split() for line in bvec.read_text().splitlines()]
    for row in rows:
        row[3] = "0"
    bvec.write_text("\n".join(" ".join(r) for r in rows) + "\n")
    _fails(bids, tmp_path, 16, bvec.name, "not unit length")


def test_duplicated_subject_in_participants_tsv_exits_16_at_group_level(tmp_path):
    bids = _dwi_dataset(tmp_path)
    (bids / "participants.tsv").write_text("participant_id\tgroup\nsub-ctrl01\tcontrol\nsub-ctrl01\tcontrol\n")
    rc, err, seconds = _cli(bids, tmp_path / "out", "group", "-w", tmp_path / "work")
    lines = _errors(err)
    assert rc == 16 and len(lines) == 1, err[-3000:]
    assert "participants.tsv" in lines[0] and "appears more than once" in lines[0] and seconds < FAST_S


@pytest.mark.parametrize("label", ["ctrl01ü", "Zürich", "sub-日本"])
def test_unicode_participant_label_exits_64(tmp_path, label):
    bids = _dwi_dataset(tmp_path)
    _fails(bids, tmp_path, 64, "invalid sub label", label=label)


def test_sidecar_that_is_not_utf8_exits_16_naming_it(tmp_path):
    bids = _dwi_dataset(tmp_path)
    (bids / f"{DWI}.json").write_bytes(b'{"PhaseEncodingDirection": "j-", "TotalReadoutTime": 0.05, '
                                       b'"InstitutionName": "Z\xfcrich"}')
    _fails(bids, tmp_path, 16, "sub-ctrl01_ses-pre_dir-AP_dwi.json")


@pytest.mark.parametrize("compressed", [True, False])
def test_header_claiming_2gb_on_a_small_file_exits_16(tmp_path, compressed):
    bids = _dwi_dataset(tmp_path)
    dwi = bids / f"{DWI}.nii.gz"
    header = nib.load(dwi).header.copy()
    header.set_data_shape((512, 512, 256, 7))  # 7 volumes like the bval: 1.75 GiB of float32
    raw = header.binaryblock + b"\x00" * 4 + np.ones(1000, np.float32).tobytes()
    if compressed:
        dwi.write_bytes(gzip.compress(raw))
        target = dwi
    else:
        dwi.unlink()
        target = dwi.with_name(dwi.name.removesuffix(".gz"))
        target.write_bytes(raw)
    line = _fails(bids, tmp_path, 16, target.name)
    assert "truncated" in line


def test_orphan_sweep_does_not_walk_an_input_inside_output_dir(tmp_path):
    from bids_uad.bids.derivatives import _host_tag

    out = tmp_path / "out"
    bids = small_dwi_bids(out / "rawdata", n_controls=1, n_patients=0)  # OUTPUT_DIR is a parent of BIDS_DIR
    dwi = bids / f"{DWI}.nii.gz"
    img = nib.load(dwi)
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine), dwi)  # fails after the sweep
    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    name = f".x.tmp-{_host_tag()}-{dead}-abc123.nii.gz"
    in_input, in_output = bids / name, out / "sub-ctrl01" / name
    in_output.parent.mkdir(parents=True)
    in_input.write_bytes(b"input data")
    in_output.write_bytes(b"orphan")
    rc, err, _ = _cli(bids, out, "participant", "-w", tmp_path / "work", "--participant-label", "ctrl01")
    assert rc == 16, err[-3000:]
    assert in_input.exists(), "the sweep removed a file from the input dataset"
    assert not in_output.exists(), "the sweep did not run"


def test_model_files_are_written_with_unique_temporaries_and_mode_0644(tmp_path, monkeypatch):
    import re

    from bids_uad.bids import derivatives
    from bids_uad.models import io

    seen = []
    real = io.save_file

    def record(tensors, filename, *args, **kwargs):
        seen.append(Path(filename).name)
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(io, "save_file", record)
    old = os.umask(0o077)  # modes must not depend on the umask either
    try:
        out = _write_model(tmp_path)
        _write_model(tmp_path)
    finally:
        os.umask(old)
    assert len(seen) == 2 and seen[0] != seen[1]
    assert all(derivatives._TEMPORARY_RE.match(n) and re.match(r"^\.model-dae\.tmp-", n) for n in seen)
    for path in (out, out.with_suffix(".safetensors")):
        assert path.stat().st_mode & 0o777 == 0o644, oct(path.stat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-dae.json", "model-dae.safetensors"]


def test_one_validation_function_at_start_up_and_at_load(tmp_path, model_dir):
    """load_bundle (in the inference node) refuses what the start-up check refuses, with the same line."""
    from bids_uad.errors import BidsUadError
    from bids_uad.models.validate import validate_model_file
    from bids_uad.models.bundle import load_bundle

    model = _copy_model(model_dir, tmp_path)
    assert load_bundle(model).name == "dae"
    _edit_json(model, lambda m: m["folds"][0].update(best_epoch="three"))
    with pytest.raises(BidsUadError) as at_start:
        validate_model_file(model)
    with pytest.raises(BidsUadError) as at_load:
        load_bundle(model)
    assert at_start.value.one_line() == at_load.value.one_line()
    assert "folds[0].best_epoch" in at_load.value.one_line() and at_load.value.exit_code == 16


def test_no_traceback_in_any_stderr(tmp_path):
    """``grep -c Traceback`` over the stderr of every run above is 0."""
    if len(STDERR) < 20:
        pytest.skip("run with the whole module")
    log = tmp_path / "hostile_stderr.txt"
    log.write_text("\n".join(STDERR))
    count = subprocess.run(["grep", "-c", "Traceback", str(log)], capture_output=True, text=True).stdout.strip()
    assert count == "0", log.read_text()[-5000:]
