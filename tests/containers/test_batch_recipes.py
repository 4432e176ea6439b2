"""The SLURM recipes and nipype plugin files in workflows/, run without SLURM.

The sbatch scripts are plain bash: they run here with SLURM's environment variables set
by hand and fake ``apptainer``/``sbatch`` programs that record their arguments.
"""
from __future__ import annotations

import csv
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from bids_uad.cli.parser import build_parser
from bids_uad.config import load_plugin_settings
from bids_uad.config import Settings
from bids_uad.workflows.execution import nipype_plugin

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "workflows"
LIB = RECIPES / "slurm_lib.sh"
SCRIPTS = ["slurm_lib.sh", "slurm_participant.sbatch", "slurm_group.sbatch", "submit.sh"]


def bash(script: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **(env or {})}
    return subprocess.run(["bash", "-c", script], env=full_env, cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def lib(call: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return bash(f"source {shlex.quote(str(LIB))}; {call}", env)


@pytest.mark.parametrize("name", SCRIPTS)
def test_bash_syntax(name):
    result = subprocess.run(["bash", "-n", str(RECIPES / name)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", ["slurm_participant.sbatch", "slurm_group.sbatch", "submit.sh"])
def test_scripts_are_executable_bash(name):
    path = RECIPES / name
    assert path.read_text().startswith("#!/bin/bash\n")
    assert os.access(path, os.X_OK)


def test_sbatch_headers_come_before_any_command():
    for name in ("slurm_participant.sbatch", "slurm_group.sbatch"):
        lines = (RECIPES / name).read_text().splitlines()[1:]
        first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
        headers = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
        assert headers and max(headers) < first_command, f"{name}: #SBATCH after a command is ignored"


@pytest.fixture()
def participants(tmp_path) -> Path:
    """A participants.tsv with the id column second, a comment, blank lines and CRLF ends."""
    path = tmp_path / "participants.tsv"
    path.write_bytes(b"age\tparticipant_id\tgroup\r\n"
                     b"40\tsub-ctrl01\tcontrol\r\n"
                     b"41\tsub-ctrl02\tcontrol\r\n"
                     b"\r\n"
                     b"# a comment\n"
                     b"50\tpat01\tpatient\n")
    return path


@pytest.mark.parametrize("task, label", [("1", "ctrl01"), ("2", "ctrl02"), ("3", "pat01")])
def test_array_index_maps_to_participant_row(participants, task, label):
    result = lib(f"participant_for_task {participants}", {"SLURM_ARRAY_TASK_ID": task})
    assert result.returncode == 0, result.stderr
    assert result.stdout == label + "\n"
    # an explicit index wins over the environment
    assert lib(f"participant_for_task {participants} {task}", {"SLURM_ARRAY_TASK_ID": "99"}).stdout == label + "\n"


def test_participant_count_and_list(participants):
    assert lib(f"participant_count {participants}").stdout == "3\n"
    assert lib(f"participant_list {participants}").stdout.split() == ["ctrl01", "ctrl02", "pat01"]


@pytest.mark.parametrize("task, code", [("0", 65), ("4", 65), ("", 64), ("x", 64)])
def test_array_index_out_of_range_or_missing(participants, task, code):
    result = lib(f"participant_for_task {participants}", {"SLURM_ARRAY_TASK_ID": task} if task else {})
    assert result.returncode == code
    assert result.stdout == "" and result.stderr.strip()


def test_bad_participants_file(tmp_path):
    no_column = tmp_path / "p.tsv"
    no_column.write_text("subject\tgroup\nsub-01\tcontrol\n")
    assert lib(f"participant_for_task {no_column} 1").returncode == 65
    bad_label = tmp_path / "q.tsv"
    bad_label.write_text("participant_id\nsub-../x\n")
    result = lib(f"participant_for_task {bad_label} 1")
    assert result.returncode == 65 and "invalid participant label" in result.stderr
    assert lib(f"participant_count {tmp_path / 'missing.tsv'}").returncode == 66


def test_mapping_matches_the_small_dataset(tmp_path):
    from tests.conftest import build_small_bids

    bids = build_small_bids(tmp_path / "bids", n_controls=3, n_patients=2)
    labels = lib(f"participant_list {bids / 'participants.tsv'}").stdout.split()
    assert labels == ["ctrl01", "ctrl02", "ctrl03", "pat01", "pat02"]
    assert all((bids / f"sub-{label}").is_dir() for label in labels)


@pytest.mark.parametrize("env, expected", [
    ({"SLURM_MEM_PER_NODE": "32768"}, "28.8"),
    ({"SLURM_MEM_PER_CPU": "4096", "SLURM_CPUS_PER_TASK": "4"}, "14.4"),
    ({}, ""),
])
def test_mem_gb_from_slurm(env, expected):
    assert lib("mem_gb_from_slurm", env).stdout.strip() == expected


def test_status_lines_are_written_atomically_and_summarized(tmp_path):
    status = tmp_path / "logs" / "slurm"
    calls = "; ".join(f"record_task_status {status} 77 {task} p{task} {code} s e"
                      for task, code in [(3, 0), (1, 0), (2, 70), (10, 0)])
    assert lib(calls).returncode == 0
    files = sorted(p.name for p in status.iterdir())
    assert files == [f"job-77_task-{t}.tsv" for t in (1, 10, 2, 3)], "no temporaries left behind"
    line = (status / "job-77_task-2.tsv").read_text()
    assert line.endswith("\n") and line.count("\n") == 1 and line.split("\t")[:4] == ["77", "2", "sub-p2", "70"]
    result = lib(f"summarize_task_status {status} 77")
    assert result.stdout.strip() == "1"  # one failed task
    with open(status / "job-77_summary.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert [r["task_id"] for r in rows] == ["1", "2", "3", "10"]
    assert [r["exit_code"] for r in rows] == ["0", "70", "0", "0"]


# ------------------------------------------------------------ whole scripts, fake programs ----

def _fake(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / name).write_text("#!/bin/bash\n" + body)
    (bin_dir / name).chmod(0o755)


@pytest.fixture()
def cluster(tmp_path, participants):
    """Folders and a fake apptainer that records its arguments and exits with $FAKE_CODE."""
    bids = tmp_path / "bids"
    bids.mkdir()
    participants.rename(bids / "participants.tsv")
    bin_dir = tmp_path / "bin"
    _fake(bin_dir, "apptainer", 'printf "%s\\n" "$@" > "$FAKE_RECORD"\nexit "${FAKE_CODE:-0}"\n')
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "BIDS_DIR": str(bids), "OUTPUT_DIR": str(tmp_path / "out"), "WORK_DIR": str(tmp_path / "work"),
        "SIF": str(tmp_path / "bids_uad.sif"), "BIDS_UAD_RECIPES": str(RECIPES),
        "FAKE_RECORD": str(tmp_path / "apptainer_args"),
        "SLURM_ARRAY_JOB_ID": "1234", "SLURM_JOB_ID": "1236", "SLURM_ARRAY_TASK_ID": "2",
        "SLURM_CPUS_PER_TASK": "4", "SLURM_MEM_PER_NODE": "16384",
    }
    return tmp_path, env


def _bids_uad_args(record: Path) -> list[str]:
    """The arguments after the image in the recorded apptainer call."""
    args = record.read_text().splitlines()
    assert args[:2] == ["run", "--cleanenv"]
    sif = next(i for i, a in enumerate(args) if a.endswith(".sif"))
    return args[sif + 1:]


def _binds(record: Path) -> list[str]:
    args = record.read_text().splitlines()
    return [args[i + 1] for i, a in enumerate(args) if a == "-B"]


@pytest.mark.parametrize("code", [0, 70])
def test_participant_script_runs_one_participant_and_records_its_status(cluster, code):
    tmp, env = cluster
    result = bash(str(RECIPES / "slurm_participant.sbatch"),
                  {**env, "FAKE_CODE": str(code), "BIDS_UAD_ARGS": "--preproc-backend python"})
    assert result.returncode == code, result.stderr
    args = _bids_uad_args(tmp / "apptainer_args")
    assert args[:3] == ["/data", "/out", "participant"]
    parsed = build_parser().parse_args(args)  # what the container receives is a valid command line
    assert parsed.participant_label == ["ctrl02"] and parsed.work_dir == Path("/work")
    assert parsed.nprocs == 4 and parsed.mem_gb == pytest.approx(14.4)
    assert parsed.preproc_backend == "python"
    binds = _binds(tmp / "apptainer_args")
    assert f"{env['BIDS_DIR']}:/data:ro" in binds
    assert f"{env['OUTPUT_DIR']}:/out" in binds
    assert f"{env['WORK_DIR']}/sub-ctrl02:/work" in binds, "one work folder per participant"
    assert (Path(env["WORK_DIR"]) / "sub-ctrl02").is_dir()
    status = Path(env["OUTPUT_DIR"]) / "logs" / "slurm"
    assert [p.name for p in status.iterdir()] == ["job-1234_task-2.tsv"]
    fields = (status / "job-1234_task-2.tsv").read_text().rstrip("\n").split("\t")
    assert fields[:4] == ["1234", "2", "sub-ctrl02", str(code)] and len(fields) == 7


def test_participant_script_binds_site_templates(cluster):
    tmp, env = cluster
    result = bash(str(RECIPES / "slurm_participant.sbatch"), {**env, "TEMPLATEFLOW_HOST": "/site/tf"})
    assert result.returncode == 0, result.stderr
    assert "/site/tf:/opt/templateflow:ro" in _binds(tmp / "apptainer_args")


def test_participant_script_out_of_range_task_is_recorded(cluster):
    tmp, env = cluster
    result = bash(str(RECIPES / "slurm_participant.sbatch"), {**env, "SLURM_ARRAY_TASK_ID": "9"})
    assert result.returncode == 65 and "out of range" in result.stderr
    assert not (tmp / "apptainer_args").exists(), "nothing runs for a task without a participant"
    line = (Path(env["OUTPUT_DIR"]) / "logs/slurm/job-1234_task-9.tsv").read_text().split("\t")
    assert line[2:4] == ["sub-n/a", "65"]


def test_group_script_gathers_the_participant_statuses(cluster):
    tmp, env = cluster
    for task in ("1", "2", "3"):
        assert bash(str(RECIPES / "slurm_participant.sbatch"), {**env, "SLURM_ARRAY_TASK_ID": task}).returncode == 0
    result = bash(str(RECIPES / "slurm_group.sbatch"),
                  {**env, "PARTICIPANT_JOB_ID": "1234", "BIDS_UAD_GROUP_ARGS": "--train-preset quick"})
    assert result.returncode == 0, result.stderr
    assert "0 failed task(s)" in result.stdout
    args = _bids_uad_args(tmp / "apptainer_args")
    parsed = build_parser().parse_args(args)
    assert parsed.analysis_level == "group" and parsed.train_preset == "quick"
    assert f"{env['WORK_DIR']}/group:/work" in _binds(tmp / "apptainer_args")
    status = Path(env["OUTPUT_DIR"]) / "logs" / "slurm"
    summary = (status / "job-1234_summary.tsv").read_text().splitlines()
    assert len(summary) == 4 and summary[0].startswith("job_id\ttask_id")
    assert (status / "job-1236_task-group.tsv").read_text().split("\t")[3] == "0"


@pytest.fixture()
def fake_sbatch(cluster):
    tmp, env = cluster
    log = tmp / "sbatch_calls"
    _fake(tmp / "bin", "sbatch",
          f'n=$(( $(cat {log} 2>/dev/null | wc -l) + 100 ))\n'
          f'printf "%s\\n" "$(printf "%q " "$@")" >> {log}\n'
          'echo "$n;cluster1"\n')
    (tmp / "bids_uad.sif").write_text("image")
    return tmp, env, log


def test_submit_chains_participant_group_and_inference(fake_sbatch):
    tmp, env, log = fake_sbatch
    sub_env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    result = bash(f"{RECIPES / 'submit.sh'} --inference --max-parallel 2 {env['BIDS_DIR']} {env['OUTPUT_DIR']} "
                  f"{env['WORK_DIR']} -- --account=lab", sub_env, cwd=tmp)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["participant\t100", "group\t101", "inference\t102"]
    calls = [shlex.split(line) for line in log.read_text().splitlines()]
    assert len(calls) == 3 and all(c[0] == "--parsable" and "--account=lab" in c for c in calls)
    assert "--array=1-3%2" in calls[0] and calls[0][-1].endswith("slurm_participant.sbatch")
    assert "--dependency=afterok:100" in calls[1] and calls[1][-1].endswith("slurm_group.sbatch")
    assert any(a.startswith("--export=ALL,PARTICIPANT_JOB_ID=100") for a in calls[1])
    assert "--dependency=afterok:101" in calls[2] and "--array=1-3%2" in calls[2]
    assert any("--model /out/models" in a for a in calls[2])


def test_submit_refuses_a_missing_image(fake_sbatch):
    tmp, env, log = fake_sbatch
    (tmp / "bids_uad.sif").unlink()
    result = bash(f"{RECIPES / 'submit.sh'} {env['BIDS_DIR']} {env['OUTPUT_DIR']} {env['WORK_DIR']}",
                  {"PATH": env["PATH"], "SIF": env["SIF"]}, cwd=tmp)
    assert result.returncode == 66 and "image not found" in result.stderr
    assert not log.exists()


# ------------------------------------------------------------------------ plugin files ----

@pytest.mark.parametrize("name, plugin", [("plugin_multiproc.yml", "MultiProc"), ("plugin_slurm.yml", "SLURM")])
def test_plugin_files_load(name, plugin):
    loaded, args = load_plugin_settings(RECIPES / name)
    assert loaded == plugin and isinstance(args, dict)


def test_multiproc_file_takes_nprocs_and_memory_from_the_command_line(tmp_path):
    settings = Settings(bids_dir=tmp_path, output_dir=tmp_path / "o", analysis_level="participant",
                        work_dir=tmp_path / "w", nprocs=3, mem_gb=5.5,
                        use_plugin=RECIPES / "plugin_multiproc.yml")
    plugin, args = nipype_plugin(settings)
    assert plugin == "MultiProc" and args["n_procs"] == 3 and args["memory_gb"] == 5.5
    assert args["raise_insufficient"] is False


def test_plugin_arguments_are_understood_by_nipype(tmp_path):
    """Every key in the files is one the nipype plugin reads (a typo would be silently ignored)."""
    import inspect

    from nipype.pipeline.plugins import base, multiproc, slurm

    sources = {
        "MultiProc": inspect.getsource(multiproc.MultiProcPlugin) + inspect.getsource(base),
        "SLURM": inspect.getsource(slurm.SLURMPlugin) + inspect.getsource(base),
    }
    for name in ("plugin_multiproc.yml", "plugin_slurm.yml"):
        plugin, args = load_plugin_settings(RECIPES / name)
        for key in args:
            assert f'"{key}"' in sources[plugin], f"{name}: nipype's {plugin} plugin does not read {key!r}"
    # and the SLURM plugin really starts with them (it only checks sbatch is callable later)
    _, args = load_plugin_settings(RECIPES / "plugin_slurm.yml")
    plugin = slurm.SLURMPlugin(plugin_args=args)
    assert plugin._sbatch_args == args["sbatch_args"] and plugin.max_jobs == args["max_jobs"]
