"""`make image` / `make image-test` scripts without an engine (a fake docker), and compare_runs.py."""
from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]

FAKE_DOCKER = r"""#!/bin/bash
printf '%q ' "$@" >> "$FAKE_LOG"; echo >> "$FAKE_LOG"
case $1 in
    info) exit 0 ;;
    image)
        if [ "$2" = inspect ] && [[ " $* " == *" --format "* ]]; then
            case $* in *Size*) echo 1960000000 ;; *) echo "with-fsl=false with-templateflow=false" ;; esac
            exit 0
        fi
        for name in "${@:3}"; do [[ $name == local/* ]] && [ -z "${FAKE_STANDINS:-}" ] && exit 1; done
        exit 0 ;;
    build) exit 0 ;;
esac
exit 0
"""


def _build(tmp_path: Path, **env) -> tuple[subprocess.CompletedProcess, list[str]]:
    (tmp_path / "docker").write_text(FAKE_DOCKER)
    (tmp_path / "docker").chmod(0o755)
    log = tmp_path / "calls"
    log.unlink(missing_ok=True)
    full_env = {"PATH": os.environ["PATH"], "DOCKER": str(tmp_path / "docker"), "FAKE_LOG": str(log), **env}
    result = subprocess.run([str(REPO / "docker" / "build_image.sh"), "bids_uad"], env=full_env,
                            capture_output=True, text=True, timeout=60)
    build = next((shlex.split(line) for line in log.read_text().splitlines() if line.startswith("build")), [])
    return result, build


def _build_args(build: list[str]) -> dict[str, str]:
    return dict(build[i + 1].split("=", 1) for i, a in enumerate(build) if a == "--build-arg")


def test_build_uses_the_official_defaults_without_stand_ins(tmp_path):
    result, build = _build(tmp_path, STANDINS="no")
    assert result.returncode == 0, result.stderr
    assert _build_args(build) == {"VERSION": "0.1.0"}, "the Dockerfile's defaults: official images and servers"
    assert "--network" not in build
    assert build[-5:] == ["-t", "bids_uad:0.1.0", "-t", "bids_uad:latest", str(REPO)]
    assert "image size 1.96 GB" in result.stdout


def test_build_uses_docker_engine_stand_ins(tmp_path):
    result, build = _build(tmp_path, STANDINS="yes", BUILD_CA_CERTS="-----BEGIN CERTIFICATE----- MIIB")
    assert result.returncode == 0, result.stderr
    args = _build_args(build)
    assert args["RUNTIME_IMAGE"] == "local/python:3.11-slim-bookworm"
    assert args["BUILD_IMAGE"] == "local/python-build:3.11-slim-bookworm"
    assert args["TORCH_PIP_ARGS"] == "--find-links http://127.0.0.1:8765/"
    assert args["WITH_TEMPLATEFLOW"] == "false" and args["WITH_FSL"] == "false"
    assert args["BUILD_CA_CERTS"].startswith("-----BEGIN CERTIFICATE-----")
    assert build[build.index("--network") + 1] == "host", "the wheel server listens on the host"
    # an explicit choice wins over the stand-in default
    _, build = _build(tmp_path, STANDINS="yes", WITH_FSL="true")
    assert _build_args(build)["WITH_FSL"] == "true"


def test_build_detects_stand_ins_and_refuses_without_an_engine(tmp_path):
    result, build = _build(tmp_path)  # auto: the fake has no local/ images
    assert result.returncode == 0 and "RUNTIME_IMAGE" not in _build_args(build)
    (tmp_path / "nodocker").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "nodocker").chmod(0o755)
    result = subprocess.run([str(REPO / "docker" / "build_image.sh")], capture_output=True, text=True,
                            env={"PATH": os.environ["PATH"], "DOCKER": str(tmp_path / "nodocker")})
    assert result.returncode == 69 and "no Docker engine" in result.stderr


def test_make_targets_and_scripts():
    makefile = (REPO / "Makefile").read_text()
    assert "\ndocker/build_image.sh $(IMAGE)" in makefile.replace("\t", "")
    assert "docker/test_image.sh $(IMAGE):latest $(E2E_WORKSPACE)" in makefile
    for script in ("build_image.sh", "test_image.sh"):
        path = REPO / "docker" / script
        assert os.access(path, os.X_OK)
        subprocess.run(["bash", "-n", str(path)], check=True)
    text = (REPO / "docker" / "test_image.sh").read_text()
    assert ".circleci/e2e_tiny.sh\" \"$IMAGE\"" in text and ".circleci/e2e_tiny.sh\" local" in text
    assert "compare_runs.py" in text


# --------------------------------------------------------------------------- compare_runs ----

@pytest.fixture(scope="module")
def compare_runs():
    spec = importlib.util.spec_from_file_location("compare_runs", REPO / ".circleci" / "compare_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _save(path: Path, data: np.ndarray, affine=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))


def _runs(tmp_path: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    score = rng.random((6, 6, 4)).astype(np.float32)
    labels = rng.integers(0, 4, (6, 6, 4)).astype(np.uint8)
    for run, name in (("a", "run-20261205-230954_bf556dea"), ("b", "run-20261205-231500_0a1b2c3d")):
        root = tmp_path / run
        _save(root / "sub-01/dwi/sub-01_space-MNI152NLin2009aSym_stat-score_anomaly.nii.gz", score)
        _save(root / "sub-01/anat/sub-01_dseg.nii.gz", labels)
        (root / "logs").mkdir()
        (root / "logs" / f"{name}.log").write_text(run)
    return tmp_path / "a", tmp_path / "b", score, labels


def test_compare_runs_agree_within_tolerance(tmp_path, compare_runs, capsys):
    a, b, score, _ = _runs(tmp_path)
    _save(b / "sub-01/dwi/sub-01_space-MNI152NLin2009aSym_stat-score_anomaly.nii.gz", score * (1 + 1e-5))
    # the other template variant (TemplateFlow's in an image) is the same output
    (b / "sub-01/dwi/sub-01_space-MNI152NLin2009aSym_stat-score_anomaly.nii.gz").rename(
        b / "sub-01/dwi/sub-01_space-MNI152NLin2009cAsym_stat-score_anomaly.nii.gz")
    assert compare_runs.main([str(a), str(b), "--report", str(tmp_path / "r.tsv")]) == 0
    assert "2 of 2 images agree" in capsys.readouterr().out
    assert (tmp_path / "r.tsv").read_text().count("\tok\t") == 2


@pytest.mark.parametrize("change, message", [
    (lambda b, score, labels: _save(b / "sub-01/dwi/sub-01_space-MNI152NLin2009aSym_stat-score_anomaly.nii.gz",
                                    score + 0.01), "largest difference"),
    (lambda b, score, labels: _save(b / "sub-01/anat/sub-01_dseg.nii.gz", (labels + 1).astype(np.uint8)),
     "of the voxels differ"),
    (lambda b, score, labels: _save(b / "sub-01/anat/sub-01_dseg.nii.gz", labels, np.diag([2, 2, 2, 1])),
     "affines differ"),
    (lambda b, score, labels: (b / "sub-01/anat/sub-01_dseg.nii.gz").unlink(), "only in"),
])
def test_compare_runs_reports_differences(tmp_path, compare_runs, capsys, change, message):
    a, b, score, labels = _runs(tmp_path)
    change(b, score, labels)
    assert compare_runs.main([str(a), str(b)]) == 1
    assert message in capsys.readouterr().out
    assert compare_runs.main([str(a), str(tmp_path / "missing")]) == 2
