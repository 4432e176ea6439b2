"""CircleCI: the config's jobs, the end-to-end script (with a fake docker) and compare_outputs.py."""
from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from bids_uad.cli.parser import build_parser

REPO = Path(__file__).resolve().parents[2]
CI = REPO / ".circleci"


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare_outputs", CI / "compare_outputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _steps(job: dict) -> list[str]:
    out = []
    for step in job["steps"]:
        if isinstance(step, dict) and "run" in step:
            run = step["run"]
            out.append(run if isinstance(run, str) else run["command"])
    return out


def test_config_runs_the_tests_and_the_container_end_to_end():
    config = yaml.safe_load((CI / "config.yml").read_text())
    assert config["version"] == 2.1
    jobs = config["jobs"]
    assert any(cmd.strip() == "make test" for cmd in _steps(jobs["test"]))
    container = jobs["container"]
    executor = config.get("executors", {}).get(container.get("executor"), container)
    has_docker = "machine" in executor or any(
        s == "setup_remote_docker" or (isinstance(s, dict) and "setup_remote_docker" in s) for s in container["steps"])
    assert has_docker, "the container job needs a Docker engine"
    commands = "\n".join(_steps(container))
    assert "docker build" in commands
    assert ".circleci/e2e_tiny.sh" in commands
    listed = {name for wf in config["workflows"].values() if isinstance(wf, dict)
              for job in wf["jobs"] for name in ([job] if isinstance(job, str) else job)}
    assert {"test", "container"} <= listed


def test_e2e_script_parses():
    subprocess.run(["bash", "-n", str(CI / "e2e_tiny.sh")], check=True)
    assert os.access(CI / "e2e_tiny.sh", os.X_OK)


FAKE_DOCKER = r"""#!/bin/bash
printf '%q ' "$@" >> "$FAKE_LOG"; echo >> "$FAKE_LOG"
# the synthetic-data call writes a file into the folder mounted at /data
data=""
prev=""
for arg in "$@"; do
    if [ "$prev" = "-v" ] && [[ $arg == *:/data ]]; then data=${arg%:/data}; fi
    if [ "$prev" = "-v" ] && [[ $arg == *:/data:ro ]] && [ -n "${FAKE_TAMPER:-}" ]; then
        echo changed >> "${arg%:/data:ro}/dataset_description.json"
    fi
    prev=$arg
done
if [ -n "$data" ]; then echo '{"Name": "tiny"}' > "$data/dataset_description.json"; fi
exit 0
"""


def _run_e2e(tmp_path: Path, tamper: bool = False) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(FAKE_DOCKER)
    (bin_dir / "docker").chmod(0o755)
    log = tmp_path / "docker_calls"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log), "HOME": str(tmp_path)}
    if tamper:
        env["FAKE_TAMPER"] = "1"
    result = subprocess.run([str(CI / "e2e_tiny.sh"), "bids_uad:ci", str(tmp_path / "ws")], env=env,
                            capture_output=True, text=True, timeout=60)
    calls = [shlex.split(line) for line in log.read_text().splitlines()] if log.exists() else []
    return result, calls


def test_e2e_script_runs_the_three_levels_offline_and_read_only(tmp_path):
    result, calls = _run_e2e(tmp_path)
    assert len(calls) == 4, result.stderr
    synth, *levels = calls
    assert synth[0] == "run" and "--network" in synth and "bids_uad-synth" in synth
    image = synth.index("bids_uad:ci")
    assert synth[image + 1:] == ["/data", "--preset", "tiny", "--seed", "0"]
    parsed = []
    for call in levels:
        assert call[0] == "run"
        assert call[call.index("--network") + 1] == "none"
        assert "--read-only" in call
        mounts = [call[i + 1] for i, a in enumerate(call) if a == "-v"]
        assert any(m.endswith(":/data:ro") for m in mounts), "data mounted read-only"
        image = call.index("bids_uad:ci")
        parsed.append(build_parser().parse_args(call[image + 1:]))
    assert [p.analysis_level for p in parsed] == ["participant", "group", "participant"]
    assert parsed[1].train_preset == "quick"
    assert parsed[0].model is None and parsed[2].model == Path("/out/models")
    # the fake runs produce nothing, so the comparison (last step) is what fails
    assert result.returncode in (1, 2)
    assert "compare_outputs" in result.stderr
    assert (tmp_path / "ws" / "outputs.txt").exists()


def test_e2e_script_fails_when_the_input_changes(tmp_path):
    result, _ = _run_e2e(tmp_path, tamper=True)
    assert result.returncode == 1 and "the input dataset changed" in result.stderr


# --------------------------------------------------------------------- compare_outputs ----

def _make_outputs(root: Path, names: list[str]) -> Path:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    return root


GOOD = [
    "dataset_description.json",
    "logs/run-20261121-052732_6f5cfcf2.log",
    "logs/run-20261121-052732_6f5cfcf2_settings.json",
    "logs/run-20261121-060101_0a1b2c3d.log",
    "logs/run-20261121-060101_0a1b2c3d_settings.json",
    "sub-01/ses-pre/dwi/sub-01_ses-pre_space-dwi_desc-preproc_dwi.nii.gz",
    "sub-01/ses-pre/dwi/sub-01_ses-pre_space-dwi_desc-preproc_dwi.json",
    "models/model-dae.safetensors",
]


def test_list_normalizes_run_ids(tmp_path, compare):
    out = _make_outputs(tmp_path / "out", GOOD)
    listed = compare.list_outputs(out)
    assert "logs/run-*.log" in listed and "logs/run-*_settings.json" in listed
    assert len(listed) == 6  # the two runs collapse into one pattern each


def test_write_then_compare_round_trip(tmp_path, compare, capsys):
    out = _make_outputs(tmp_path / "out", GOOD)
    expected = tmp_path / "expected.txt"
    assert compare.main([str(out), str(expected), "--write"]) == 0
    assert expected.read_text().startswith("#")
    assert compare.main([str(out), str(expected)]) == 0
    # a second output folder from other runs (other ids) still matches
    other = _make_outputs(tmp_path / "other", [n.replace("6f5cfcf2", "deadbeef") for n in GOOD])
    assert compare.main([str(other), str(expected)]) == 0


@pytest.mark.parametrize("change, kind", [
    (lambda names: names[:-1], "missing:    models/model-dae.safetensors"),
    (lambda names: names + ["sub-01/ses-pre/dwi/.sub-01_ses-pre_space-dwi.k2j3h4.nii.gz"], "unexpected: sub-01/ses-pre/dwi/.sub-01"),
    (lambda names: names + ["logs/crash-20261121-052732_6f5cfcf2/crash-node.txt"], "unexpected: logs/crash-*/crash-node.txt"),
])
def test_mismatches_are_reported(tmp_path, compare, capsys, change, kind):
    expected = tmp_path / "expected.txt"
    compare.main([str(_make_outputs(tmp_path / "good", GOOD)), str(expected), "--write"])
    capsys.readouterr()
    out = _make_outputs(tmp_path / "out", change(list(GOOD)))
    assert compare.main([str(out), str(expected)]) == 1
    assert kind in capsys.readouterr().out


def test_patterns(compare):
    missing, unexpected = compare.compare(
        ["sub-01/figures/a.svg", "sub-01/ses-pre/dwi/x.nii.gz", "dataset_description.json"],
        ["sub-*/figures/*.svg", "**/dwi/*.nii.gz", "dataset_description.json", "models/*.json"])
    assert missing == ["models/*.json"] and unexpected == []
    _, unexpected = compare.compare(["sub-01/ses-pre/x.svg"], ["sub-*/*.svg"])
    assert unexpected == ["sub-01/ses-pre/x.svg"], "* stays within one folder"


def test_missing_list_or_folder_exits_2(tmp_path, compare, capsys):
    out = _make_outputs(tmp_path / "out", GOOD)
    assert compare.main([str(out), str(tmp_path / "nope.txt")]) == 2
    assert "--write" in capsys.readouterr().err
    assert compare.main([str(tmp_path / "nothing"), str(tmp_path / "nope.txt")]) == 2


def test_expected_list_in_the_repo_is_well_formed(compare):
    path = CI / "expected_outputs_tiny.txt"
    if not path.exists():
        pytest.skip("expected_outputs_tiny.txt missing: record it with .circleci/e2e_tiny.sh local WORKSPACE --record")
    patterns = compare.read_expected(path)
    assert "dataset_description.json" in patterns
    assert not any(p.startswith("logs/crash-") or "/." in p for p in patterns)
    assert len(patterns) == len(set(patterns))
    # every level left its mark: preprocessing, models, evaluation, inference in both spaces, reports
    for needed in ("models/model-dae.safetensors", "models/model-recdisc.safetensors", "group.html",
                   "group/model-recdisc_evaluation_summary.tsv", "sub-pat01.html"):
        assert needed in patterns
    assert any("space-MNI152NLin2009*_model-dae_stat-score_anomaly.nii.gz" in p for p in patterns)
    assert any(p.endswith("space-dwi_desc-preproc_dwi.nii.gz") for p in patterns)
