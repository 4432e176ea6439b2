"""``--nprocs`` and ``--mem-gb`` reach nipype and hold in a real run.

Unit level: the plugin and its arguments that ``run_workflow`` hands to ``workflow.run``.
Run level: a participant run in a fresh intermediate process that samples the CLI's worker
processes from /proc and reports its children's peak RSS (``getrusage(RUSAGE_CHILDREN)``:
the largest single descendant that was waited for).
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bids_uad.config import Settings
from bids_uad.workflows.execution import nipype_plugin, run_workflow
from tests.robustness.helpers import REPO, assert_allowed, assert_preprocessed, cli_argv, cli_env, small_dwi_bids

pytestmark = pytest.mark.timeout(900)


def _settings(tmp_path, **kw) -> Settings:
    return Settings(bids_dir=tmp_path / "bids", output_dir=tmp_path / "out", analysis_level="participant",
                    work_dir=tmp_path / "work", **kw)


class FakeWorkflow:
    """Records what run_workflow asks nipype for."""

    def __init__(self):
        self.name = "fake_wf"
        self.base_dir = None
        self.config = {"execution": {}}
        self.calls = []

    def run(self, plugin=None, plugin_args=None):
        if not isinstance(plugin, str):  # a plugin object (bids_uad's MultiProc) carries its arguments
            plugin, plugin_args = type(plugin).__name__.removesuffix("Plugin"), plugin.plugin_args
        self.calls.append((plugin, dict(plugin_args or {})))


@pytest.mark.parametrize("nprocs, mem_gb, plugin, expected", [
    (1, None, "Linear", {}),
    (1, 4.0, "Linear", {}),
    (3, None, "MultiProc", {"n_procs": 3}),
    (4, 2.5, "MultiProc", {"n_procs": 4, "memory_gb": 2.5}),
])
def test_run_workflow_passes_nprocs_and_memory(tmp_path, nprocs, mem_gb, plugin, expected):
    wf = FakeWorkflow()
    settings = _settings(tmp_path, nprocs=nprocs, mem_gb=mem_gb)
    run_workflow(wf, settings, "r1")
    (used, args), = wf.calls
    assert used == plugin
    for key, value in expected.items():
        assert args[key] == value
    if plugin == "MultiProc" and mem_gb is None:
        assert "memory_gb" not in args
    assert wf.base_dir == str(settings.code_work_dir) and settings.code_work_dir.parent == tmp_path / "work"
    assert wf.config["execution"]["crashdump_dir"] == str(tmp_path / "out" / "logs" / "crash-r1")
    assert wf.config["execution"]["hash_method"] == "timestamp"


def test_plugin_file_overrides_are_visible(tmp_path):
    """With --use-plugin, MultiProc still gets --nprocs/--mem-gb unless the file sets them."""
    plugin_file = tmp_path / "p.yml"
    plugin_file.write_text("plugin: MultiProc\nplugin_args: {raise_insufficient: false}\n")
    plugin, args = nipype_plugin(_settings(tmp_path, nprocs=2, mem_gb=3.0, use_plugin=plugin_file))
    assert plugin == "MultiProc" and args == {"n_procs": 2, "memory_gb": 3.0, "raise_insufficient": False, "mp_context": "forkserver"}


MONITOR = textwrap.dedent('''
    """Run argv[1:], sample its python child processes, print rc, peak child RSS and the most workers.

    Workers are children with the CLI's own command name (forked pool processes, the
    resource tracker); short helpers such as ``uname`` are not counted.
    """
    import json, os, resource, subprocess, sys, time

    proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    most = 0
    name = None
    while proc.poll() is None:
        if name is None:
            try:
                with open(f"/proc/{proc.pid}/stat") as handle:
                    name = handle.read().split("(", 1)[1].rsplit(")", 1)[0]
            except OSError:
                pass
        children = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as handle:
                        stat = handle.read()
                except OSError:
                    continue
                comm = stat.split("(", 1)[1].rsplit(")", 1)[0]
                fields = stat.rsplit(")", 1)[1].split()
                if int(fields[1]) == proc.pid and comm == name:
                    children.append(entry)
        most = max(most, len(children))
        time.sleep(0.02)
    err = proc.stderr.read().decode(errors="replace")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"rc": proc.returncode, "maxrss_kb": usage.ru_maxrss, "most_children": most,
                      "stderr": err[-3000:]}))
''')


def _monitored_run(tmp_path: Path, *args) -> dict:
    script = tmp_path / "monitor.py"
    script.write_text(MONITOR)
    result = subprocess.run([sys.executable, str(script), *cli_argv(*args)], env=cli_env(), capture_output=True,
                            text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("nprocs", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_real_run_respects_nprocs_and_mem_gb(tmp_path, nprocs):
    bids = small_dwi_bids(tmp_path / "bids", n_controls=3, n_patients=1)
    out = tmp_path / "out"
    mem_gb = 3.0
    report = _monitored_run(tmp_path, bids, out, "participant", "--participant-label", "ctrl01",
                            "-w", tmp_path / "work", "--nprocs", nprocs, "--mem-gb", mem_gb)
    assert_allowed(subprocess.CompletedProcess([], report["rc"], "", report["stderr"]))
    settings = json.loads(next((out / "logs").glob("run-*_settings.json")).read_text())
    assert settings["nprocs"] == nprocs and settings["mem_gb"] == mem_gb
    log = next((out / "logs").glob("run-*.log")).read_text()
    if "running bids_uad_participant_wf" in log:
        expected_plugin = "MultiProc" if nprocs > 1 else "Linear"
        assert f"with the {expected_plugin} plugin" in log
        if nprocs > 1:
            assert report["most_children"] >= 1, "the sampler saw no MultiProc worker"
    # workers: nprocs pool processes (+1 for multiprocessing's resource tracker); none for Linear
    allowed_children = 0 if nprocs == 1 else nprocs + 1
    assert report["most_children"] <= allowed_children, report
    peak_gb = report["maxrss_kb"] / 1024 ** 2
    assert peak_gb < mem_gb, f"peak RSS {peak_gb:.2f} GB over --mem-gb {mem_gb}"
    assert_preprocessed(out, "ctrl01")
