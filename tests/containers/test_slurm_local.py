"""workflows/submit.sh for real on the tiny study, with a fake ``sbatch`` that runs the jobs here.

The fake ``sbatch`` runs each submitted job at once on this machine, with the environment
SLURM would give it (#SBATCH headers overridden by command-line options, ``--export``,
``--dependency=afterok`` honoured, array tasks ``%N`` at a time, ``--output`` files); the fake
``apptainer run`` maps the container paths of the recipe's binds onto the host folders and
runs this checkout's bids_uad, refusing any path that is not inside a bind.  So the recipe's
paths and variables are exercised end to end: the array tasks (two at a time) preprocess the
tiny study's three controls, then the group job trains on their outputs.  Slow: about 10 min on
2 idle cores; 35 min on the shared development machine at load 24-26.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "workflows"

FAKE_SBATCH = r'''#!{python}
"""Fake sbatch: run the job now, here; print "<job id>;fake" as sbatch --parsable does."""
import json, os, re, subprocess, sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

state = Path(os.environ["FAKE_SLURM_STATE"])
state.mkdir(parents=True, exist_ok=True)
counter = state / "next_id"
job = int(counter.read_text()) if counter.exists() else 100
counter.write_text(str(job + 1))
*cli, script = sys.argv[1:]
headers = [line.split(None, 1)[1].strip() for line in Path(script).read_text().splitlines()
           if line.startswith("#SBATCH ")]

def options(items):
    out = {{}}
    for item in items:
        if item.startswith("--"):
            key, _, value = item[2:].partition("=")
            out[key] = value
    return out

opts = {{**options(headers), **options(cli)}}   # the command line wins over the headers
env = dict(os.environ)
if "export" in opts:
    names = opts["export"].split(",")
    assert names[0] == "ALL", opts["export"]
    for pair in names[1:]:
        key, _, value = pair.partition("=")
        env[key] = value
with open(state / "calls.jsonl", "a") as log:
    log.write(json.dumps({{"job": job, "cli": cli, "script": script}}) + "\n")
for dep in filter(None, opts.get("dependency", "").split(",")):
    kind, _, ids = dep.partition(":")
    assert kind == "afterok", dep
    for other in ids.split(":"):
        if json.loads((state / f"job-{{other}}.json").read_text())["failed"]:
            (state / f"job-{{job}}.json").write_text(json.dumps({{"failed": -1, "cancelled": True}}))
            print(f"{{job}};fake")
            sys.exit(0)
mem = opts.get("mem", "")
mem_mb = int(float(mem[:-1]) * 1024) if mem.upper().endswith("G") else (int(mem) if mem.isdigit() else None)
env.update(SLURM_JOB_ID=str(job), SLURM_SUBMIT_DIR=os.getcwd(), SLURM_CPUS_PER_TASK=opts.get("cpus-per-task", "1"),
           SLURM_JOB_NAME=opts.get("job-name", Path(script).name))
if mem_mb:
    env["SLURM_MEM_PER_NODE"] = str(mem_mb)

def run(task):
    task_env = dict(env)
    name = opts.get("output", "slurm-%j.out").replace("%A", str(job)).replace("%j", str(job))
    if task is not None:
        task_env.update(SLURM_ARRAY_JOB_ID=str(job), SLURM_ARRAY_TASK_ID=str(task),
                        SLURM_JOB_ID=str(job * 1000 + task))
        name = name.replace("%a", str(task))
    with open(name, "w") as output:
        return subprocess.run(["bash", script], env=task_env, stdout=output, stderr=subprocess.STDOUT).returncode

array = opts.get("array")
if array:
    match = re.fullmatch(r"(\d+)-(\d+)(?:%(\d+))?", array)
    first, last, limit = int(match[1]), int(match[2]), int(match[3] or 1)
    with ThreadPoolExecutor(limit) as pool:
        codes = list(pool.map(run, range(first, last + 1)))
else:
    codes = [run(None)]
(state / f"job-{{job}}.json").write_text(json.dumps({{"failed": sum(c != 0 for c in codes), "codes": codes}}))
print(f"{{job}};fake")
'''

FAKE_APPTAINER = r'''#!{python}
"""Fake apptainer run: the binds' container paths mapped onto the host, this checkout's bids_uad."""
import json, os, subprocess, sys
from pathlib import Path

args = sys.argv[1:]
if not args or args[0] != "run":
    sys.exit("fake apptainer: only 'run' is supported")
binds, cleanenv, i = {{}}, False, 1
while args[i].startswith("-"):
    if args[i] in ("-B", "--bind"):
        host, container, *mode = args[i + 1].split(":")
        if not Path(host).exists():
            sys.exit(f"fake apptainer: bind source {{host}} does not exist")
        binds[container] = host
        i += 2
    elif args[i] == "--cleanenv":
        cleanenv, i = True, i + 1
    else:
        sys.exit(f"fake apptainer: unknown option {{args[i]}}")
image, rest = args[i], args[i + 1:]
if not Path(image).is_file():
    sys.exit(f"fake apptainer: no image {{image}}")

def host_path(arg):
    for container in sorted(binds, key=len, reverse=True):
        if arg == container or arg.startswith(container + "/"):
            return binds[container] + arg[len(container):]
    if arg.startswith("/"):
        sys.exit(f"fake apptainer: {{arg}} is not inside a bound folder ({{', '.join(binds)}})")
    return arg

command = [sys.executable, "-m", "bids_uad"] + [host_path(a) for a in rest]
keep = ("PATH", "HOME", "PYTHONPATH", "LANG", "OMP_NUM_THREADS", "TMPDIR")
env = {{k: v for k, v in os.environ.items() if k in keep}} if cleanenv else dict(os.environ)
with open(os.environ["FAKE_APPTAINER_LOG"], "a") as log:
    log.write(json.dumps({{"binds": binds, "args": rest, "cleanenv": cleanenv}}) + "\n")
sys.exit(subprocess.run(command, env=env).returncode)
'''


def _install(bin_dir: Path, name: str, text: str) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    path.write_text(text.format(python=sys.executable))
    path.chmod(0o755)


def _cluster(tmp_path: Path, **extra) -> dict:
    bin_dir = tmp_path / "bin"
    _install(bin_dir, "sbatch", FAKE_SBATCH)
    _install(bin_dir, "apptainer", FAKE_APPTAINER)
    (tmp_path / "bids_uad.sif").write_text("not a real image: the fake apptainer runs the checkout")
    return {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": os.environ.get("HOME", str(tmp_path)),
        "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
        "SIF": str(tmp_path / "bids_uad.sif"), "FAKE_SLURM_STATE": str(tmp_path / "slurm"),
        "FAKE_APPTAINER_LOG": str(tmp_path / "apptainer.jsonl"), **extra,
    }


def test_the_fake_cluster_runs_the_whole_chain_quickly(tmp_path):
    """The same fakes with ``--version`` (bids_uad parses the translated command line and exits):
    array tasks three at a time, the group after them, the inference array after the group."""
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "participants.tsv").write_text("participant_id\tgroup\nsub-a\tcontrol\nsub-b\tcontrol\nsub-c\tpatient\n")
    env = _cluster(tmp_path, BIDS_UAD_ARGS="--version", BIDS_UAD_GROUP_ARGS="--version")
    result = subprocess.run([str(RECIPES / "submit.sh"), "--inference", "--max-parallel", "3", str(bids),
                             str(tmp_path / "out"), str(tmp_path / "work"), "--", "--mem=2G"],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["participant\t100", "group\t101", "inference\t102"]
    calls = [json.loads(line) for line in (tmp_path / "apptainer.jsonl").read_text().splitlines()]
    assert len(calls) == 7
    inference = [c for c in calls if "--model" in c["args"]]
    assert len(inference) == 3 and all(c["args"][c["args"].index("--model") + 1] == "/out/models" for c in inference)
    for task in (1, 2, 3):
        for job in (100, 102):
            out = (tmp_path / f"bids_uad-participant-{job}_{task}.out").read_text()
            assert "bids_uad " in out and "not inside a bound folder" not in out, out
    status = tmp_path / "out" / "logs" / "slurm"
    assert sorted(p.name for p in status.glob("job-10[02]_task-*.tsv")) == \
        [f"job-{j}_task-{t}.tsv" for j in (100, 102) for t in (1, 2, 3)]
    # a failed array keeps the group job from running (afterok)
    env["BIDS_UAD_ARGS"] = "--no-such-option"
    result = subprocess.run([str(RECIPES / "submit.sh"), str(bids), str(tmp_path / "out2"), str(tmp_path / "work2")],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.splitlines() == ["participant\t103", "group\t104"]
    assert json.loads((tmp_path / "slurm" / "job-104.json").read_text()).get("cancelled") is True
    assert not (tmp_path / "out2" / "logs" / "slurm" / "job-104_task-group.tsv").exists()


@pytest.mark.slow
def test_submit_runs_the_array_then_the_group_on_the_tiny_study(tmp_path):
    from bids_uad.synthetic import generate_dataset

    # the tiny study's three controls (the group level needs three; patients only add time)
    bids = generate_dataset(tmp_path / "bids", preset="tiny", n_patients=0, seed=0, progress=False)
    labels = [row["participant_id"][4:] for row in csv.DictReader(open(bids / "participants.tsv"), delimiter="\t")]
    out, work = tmp_path / "out", tmp_path / "work"
    env = _cluster(tmp_path, BIDS_UAD_ARGS="--seed 0", BIDS_UAD_GROUP_ARGS="--train-preset quick --seed 0")
    result = subprocess.run(
        [str(RECIPES / "submit.sh"), "--max-parallel", "2", str(bids), str(out), str(work),
         "--", "--cpus-per-task=1", "--mem=6G"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=3600)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("*.out")))
    assert result.returncode == 0, result.stderr + logs
    assert result.stdout.splitlines() == ["participant\t100", "group\t101"]

    # one array task per participant, each with its own work folder; then the group job
    status = out / "logs" / "slurm"
    for task, label in enumerate(labels, 1):
        line = (status / f"job-100_task-{task}.tsv").read_text().split("\t")
        assert line[2:4] == [f"sub-{label}", "0"], logs
        assert (tmp_path / f"bids_uad-participant-100_{task}.out").is_file()
        assert (work / f"sub-{label}").is_dir()
    with open(status / "job-100_summary.tsv", newline="") as handle:
        assert [r["exit_code"] for r in csv.DictReader(handle, delimiter="\t")] == ["0"] * len(labels)
    assert (status / "job-101_task-group.tsv").read_text().split("\t")[3] == "0"
    assert "0 failed task(s)" in (tmp_path / "bids_uad-group-101.out").read_text()

    # what the recipe passed: SLURM's cpus and memory, the per-participant work bind, clean env
    calls = [json.loads(line) for line in (tmp_path / "apptainer.jsonl").read_text().splitlines()]
    assert len(calls) == len(labels) + 1 and all(c["cleanenv"] for c in calls)
    participant_calls = sorted((c for c in calls if "participant" in c["args"]),
                               key=lambda c: c["args"][c["args"].index("--participant-label") + 1])
    for call, label in zip(participant_calls, sorted(labels)):
        assert call["args"][call["args"].index("--participant-label") + 1] == label
        assert call["binds"] == {"/data": str(bids), "/out": str(out), "/work": str(work / f"sub-{label}")}
        assert call["args"][call["args"].index("--nprocs") + 1] == "1"
        assert call["args"][call["args"].index("--mem-gb") + 1] == "5.4"
    group = next(c for c in calls if "group" in c["args"])
    assert group["binds"]["/work"] == str(work / "group") and "--train-preset" in group["args"]

    # and the real outputs: every participant preprocessed, the group level trained and reported
    for label in labels:
        assert list((out / f"sub-{label}").rglob("*_space-dwi_desc-preproc_dwi.nii.gz")), label
    assert (out / "models" / "model-dae.safetensors").is_file()
    assert (out / "models" / "model-recdisc.safetensors").is_file()
    assert (out / "group.html").is_file()
