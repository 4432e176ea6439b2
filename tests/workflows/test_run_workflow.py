"""run_workflow: scheduler settings for local plugins, per-node progress lines, worker start method."""
from __future__ import annotations

import logging
import time

import pytest
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from bids_uad.config import Settings
from bids_uad.workflows.execution import LOCAL_POLL_SLEEP_S, NodeProgress, run_workflow


def _add_one(x):
    return x + 1


def _chain(length: int, function=_add_one, name: str = "chain", prefix: str = "step") -> pe.Workflow:
    """A chain of ``length`` function nodes, each passing ``x`` to the next."""
    workflow = pe.Workflow(name=name)
    previous = None
    for i in range(length):
        node = pe.Node(niu.Function(input_names=["x"], output_names=["x"], function=function), name=f"{prefix}{i}")
        if previous is None:
            node.inputs.x = 0
        else:
            workflow.connect(previous, "x", node, "x")
        previous = node
    return workflow


def test_multiproc_runs_do_not_wait_two_seconds_per_node(tmp_path, caplog):
    settings = Settings(bids_dir=tmp_path, output_dir=tmp_path / "out", analysis_level="participant",
                        work_dir=tmp_path / "work", nprocs=2)
    workflow = _chain(4)
    with caplog.at_level(logging.INFO, logger="bids_uad"):
        run_workflow(workflow, settings, "test")
    assert workflow.config["execution"]["poll_sleep_duration"] == LOCAL_POLL_SLEEP_S < 0.5
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("bids_uad") and r.getMessage().startswith("[")]
    assert [line.split()[0] for line in lines] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    assert all(line.endswith(" s)") for line in lines)  # run in workers: each has its duration


class _Node:
    def __init__(self, name):
        self.name = self.fullname = name


def test_progress_line_without_a_start_has_no_duration(caplog):
    progress = NodeProgress(object())  # not a workflow: total unknown
    with caplog.at_level(logging.INFO, logger="bids_uad"):
        progress(_Node("reused"), "end")  # reused from the work folder: no "start" came
        progress(_Node("ran"), "start")
        time.sleep(0.01)
        progress(_Node("ran"), "end")
        progress(_Node("_ran0"), "end")  # a MapNode's child: not counted
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "[1/?] reused"
    assert messages[1].startswith("[2/?] ran (") and messages[1].endswith(" s)")
    assert len(messages) == 2


TORCH_AFTER_TORCH = '''
import sys
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from bids_uad.config import Settings
from bids_uad.workflows.execution import run_workflow


def convolve(threads):
    import torch
    torch.set_num_threads(threads)
    return float(torch.nn.Conv3d(4, 4, 3)(torch.ones(1, 4, 24, 24, 24)).sum())


def main():
    import torch
    torch.set_num_threads(2)  # like a group level run earlier in this process: an OpenMP pool exists
    torch.nn.Conv3d(4, 4, 3)(torch.ones(1, 4, 24, 24, 24))
    tmp = Path(sys.argv[1])
    workflow = pe.Workflow(name="torch_twice")
    for i in range(2):
        node = pe.Node(niu.Function(input_names=["threads"], output_names=["total"], function=convolve),
                       name=f"conv{i}")
        node.inputs.threads = 2
        workflow.add_nodes([node])
    settings = Settings(bids_dir=tmp, output_dir=tmp / "out", analysis_level="participant",
                        work_dir=tmp / "work", nprocs=2)
    run_workflow(workflow, settings, "test")
    print("finished")


if __name__ == "__main__":
    main()
'''


def test_multiproc_workers_run_torch_after_the_parent_did(tmp_path):
    """Regression: forked workers of a process that had used torch with 2 threads hung for ever
    in their first multi-threaded torch call (``make demo`` runs all levels in one process)."""
    import os
    import subprocess
    import sys

    script = tmp_path / "torch_twice.py"
    script.write_text(TORCH_AFTER_TORCH)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                            timeout=180, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "finished" in result.stdout


def two_node_script(function_source: str, function: str, value: str, **settings: object) -> str:
    """A script that runs ``run_workflow`` on two independent nodes of ``function`` (one argument,
    returned as its output) in MultiProc workers: ``value`` is the argument of node ``i``, an
    expression in ``i`` and ``tmp`` (the script's first command-line argument)."""
    extra = "".join(f", {key}={val!r}" for key, val in settings.items())
    return f'''import sys
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from bids_uad.config import Settings
from bids_uad.workflows.execution import run_workflow


{function_source}

def main():
    tmp = Path(sys.argv[1])
    workflow = pe.Workflow(name="{function}_twice")
    for i in range(2):
        node = pe.Node(niu.Function(input_names=["arg"], output_names=["arg"], function={function}), name=f"{function}{{i}}")
        node.inputs.arg = {value}
        workflow.add_nodes([node])
    settings = Settings(bids_dir=tmp, output_dir=tmp / "out", analysis_level="participant",
                        work_dir=tmp / "work", nprocs=2{extra})
    run_workflow(workflow, settings, "test")


if __name__ == "__main__":
    main()
'''


WORKER_CHATTER = two_node_script('''
def talk(arg):
    import logging
    logging.getLogger("bids_uad.interfaces.example").info("worker-info-line")
    logging.getLogger("bids_uad.interfaces.example").warning("worker-warning-line")
    return arg
''', "talk", "i")


def test_workers_print_warnings_but_not_nipype_chatter(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "chatter.py"
    script.write_text(WORKER_CHATTER)
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                            timeout=180, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert output.count("[WARNING] worker-warning-line") == 2
    assert "worker-info-line" not in output
    assert "[Node] Finished" not in output and "[Node] Executing" not in output


def _nap(x):
    import time

    time.sleep(0.3)
    return x + 1


def _napping_chain(length: int) -> pe.Workflow:
    return _chain(length, function=_nap, name="naps", prefix="nap")


def _summaries(caplog):
    from bids_uad.workflows.execution import RunSummary

    lines = [r.getMessage() for r in caplog.records if " nodes (" in r.getMessage()]
    return [RunSummary.parse(line) for line in lines]


def test_every_run_ends_with_nodes_work_wall_and_overhead(tmp_path, caplog):
    """The run log's closing figures: nodes that ran, their own work (from their result
    files), wall; a rerun on the same work folder reuses every node and adds no work."""
    settings = Settings(bids_dir=tmp_path, output_dir=tmp_path / "out", analysis_level="participant",
                        work_dir=tmp_path / "work", nprocs=1)
    with caplog.at_level(logging.INFO, logger="bids_uad"):
        run_workflow(_napping_chain(3), settings, "first")
        run_workflow(_napping_chain(3), settings, "again")
    first, again = _summaries(caplog)
    assert (first.workflow, first.nodes, first.reused, first.processes) == ("naps", 3, 0, 1)
    assert 0.9 <= first.work_s <= first.wall_s  # three naps of 0.3 s, one after the other
    assert first.overhead_s == pytest.approx(first.wall_s - first.work_s, abs=0.11)
    assert (again.nodes, again.reused, again.work_s) == (3, 3, 0.0)


def test_multiproc_run_figures_and_garbage_collector_left_as_found(tmp_path, caplog):
    import gc

    settings = Settings(bids_dir=tmp_path, output_dir=tmp_path / "out", analysis_level="participant",
                        work_dir=tmp_path / "work", nprocs=2)
    frozen_before = gc.get_freeze_count()
    with caplog.at_level(logging.INFO, logger="bids_uad"):
        run_workflow(_napping_chain(2), settings, "mp")
    assert gc.get_freeze_count() == frozen_before  # the scheduler's freeze is undone
    (summary,) = _summaries(caplog)
    assert (summary.nodes, summary.reused, summary.processes) == (2, 0, 2)
    assert summary.work_s >= 0.6
    assert summary.overhead_s == pytest.approx(summary.wall_s - summary.work_s / 2, abs=0.11)


def test_run_summary_line_reads_back():
    from bids_uad.workflows.execution import RunSummary

    summary = RunSummary(workflow="wf", nodes=12, reused=2, work_s=30.0, wall_s=20.0, processes=2,
                         scheduler_cpu_s=1.5)
    assert summary.overhead_s == 5.0 and summary.overhead_pct == 25.0
    line = summary.line()
    assert line.startswith("wf: 12 nodes (2 reused), work 30.0 s, wall 20.0 s") and "overhead 5.0 s (25 %" in line
    assert RunSummary.parse("12:00 [INFO] " + line + "\nlater lines") == summary
    assert RunSummary.parse("no figures here") is None


ITK_THREADS_IN_WORKERS = two_node_script('''
def rigid(arg):
    import os
    import tempfile
    from pathlib import Path

    import ants
    import nibabel as nib
    import numpy as np
    from scipy import ndimage as ndi
    from bids_uad.algorithms import registration as reg
    at_start = os.environ.get(reg.ITK_THREADS_VARIABLE)
    rng = np.random.default_rng(0)
    vol = ndi.gaussian_filter(rng.random((40, 44, 40)), 3).astype(np.float32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    fixed = nib.Nifti1Image(vol, affine)
    moving = nib.Nifti1Image((ndi.shift(vol, (1.3, -0.7, 0.4)) ** 2).astype(np.float32), affine)
    reg.to_ants(fixed)  # ITK's first use in this worker sets no thread count (a resampling node's)
    with tempfile.TemporaryDirectory() as xfm:  # the transform dies with it
        result = reg.register(fixed, moving, kind="Rigid", seed=0, threads=1, out_prefix=Path(xfm) / "rigid_")
        Path(arg).write_text(f"{at_start} {list(ants.read_transform(result.forward[0]).parameters)!r}")
    return arg
''', "rigid", 'str(tmp / f"rigid{i}.txt")', omp_nthreads=1)


def test_workers_start_with_the_itk_thread_count(tmp_path):
    """Every MultiProc worker starts with ITK's thread count set (``--omp-nthreads``), so a node
    whose first ITK call is not a registration still registers with that count, reproducibly.

    Regression: ITK reads the count once per process, at its first image; a worker that first
    resampled kept one thread per core, and ANTs' multi-threaded Mattes metric made the same
    registration differ between two processes (the image and the venv run of #16 disagreed).
    """
    import os
    import subprocess
    import sys

    script = tmp_path / "itk_threads.py"
    script.write_text(ITK_THREADS_IN_WORKERS)
    env = {k: v for k, v in os.environ.items() if k != "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"}
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                            timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    texts = [(tmp_path / f"rigid{i}.txt").read_text() for i in range(2)]
    assert all(t.startswith("1 [") for t in texts), texts  # set before the worker's first ITK call
    assert texts[0] == texts[1]  # two processes, one transform


def test_each_code_version_has_its_own_work_folder(tmp_path, monkeypatch, caplog):
    """Steps are reused by their inputs only; another code version must not find them."""
    import bids_uad.config as config

    settings = Settings(bids_dir=tmp_path, output_dir=tmp_path / "out", analysis_level="participant",
                        work_dir=tmp_path / "work", nprocs=1)
    run_workflow(_chain(2), settings, "first")
    first = settings.code_work_dir
    assert first.parent == tmp_path / "work" and first.name.startswith("bids_uad_")
    assert len(list(first.rglob("result_step*.pklz"))) == 2
    with caplog.at_level(logging.INFO, logger="bids_uad"):  # same code: both steps reused
        run_workflow(_chain(2), settings, "again")
    assert "2 reused" in " ".join(r.getMessage() for r in caplog.records)
    caplog.clear()
    monkeypatch.setattr(config, "code_fingerprint", lambda: "0123456789ab")  # an updated bids_uad
    assert settings.code_work_dir != first
    with caplog.at_level(logging.INFO, logger="bids_uad"):
        run_workflow(_chain(2), settings, "updated")
    assert len(list(settings.code_work_dir.rglob("result_step*.pklz"))) == 2  # ran afresh there
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "0 reused" in messages and first.name in messages  # and the old folder is named for removal


def test_downstream_depth_counts_the_longest_chain_to_a_sink():
    import networkx as nx

    from bids_uad.workflows.execution import downstream_depth

    graph = nx.DiGraph([("a", "b"), ("b", "c"), ("a", "d"), ("e", "c")])
    assert downstream_depth(graph) == {"a": 3, "b": 2, "c": 1, "d": 1, "e": 2}


def _stamp(x):
    import time as _time

    _time.sleep(0.05)
    return x


def test_ready_node_with_the_longest_chain_after_it_starts_first(tmp_path, caplog):
    """Each node takes both processes, so they run one at a time, in the scheduler's order: the
    head of the three-node chain and the next one (2 and 3 nodes to go) before the lone node
    (1), although the lone node comes first in the graph."""
    settings = Settings(bids_dir=tmp_path, output_dir=tmp_path / "out", analysis_level="participant",
                        work_dir=tmp_path / "work", nprocs=2)
    workflow = pe.Workflow(name="order")
    lone = pe.Node(niu.Function(input_names=["x"], output_names=["x"], function=_stamp), name="a_lone", n_procs=2)
    lone.inputs.x = 0
    workflow.add_nodes([lone])
    previous = None
    for i in range(3):
        node = pe.Node(niu.Function(input_names=["x"], output_names=["x"], function=_stamp), name=f"z_chain{i}",
                       n_procs=2)
        if previous is None:
            node.inputs.x = 0
        else:
            workflow.connect(previous, "x", node, "x")
        previous = node
    with caplog.at_level(logging.INFO, logger="bids_uad"):
        run_workflow(workflow, settings, "test")
    finished = [r.getMessage().split()[1] for r in caplog.records
                if r.name.startswith("bids_uad") and r.getMessage().startswith("[")]
    assert [name.split(".")[-1] for name in finished][:2] == ["z_chain0", "z_chain1"]


def test_one_process_on_several_cores_says_how_to_use_them(tmp_path, caplog, monkeypatch):
    import bids_uad.workflows.execution as execution

    monkeypatch.setattr(execution, "available_cores", lambda: 4)
    settings = Settings(bids_dir=tmp_path, output_dir=tmp_path / "out", analysis_level="participant",
                        work_dir=tmp_path / "work", nprocs=1)
    with caplog.at_level(logging.INFO, logger="bids_uad"):
        run_workflow(_chain(2), settings, "test")
    hints = [r.getMessage() for r in caplog.records if "--nprocs" in r.getMessage()]
    assert hints == ["one process on a machine with 4 cores: --nprocs 4 runs independent steps side by side"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bids_uad"):
        run_workflow(_chain(2, name="chain2"), Settings(bids_dir=tmp_path, output_dir=tmp_path / "out",
                                                        analysis_level="participant", work_dir=tmp_path / "work2",
                                                        nprocs=2), "test")
    assert not [r for r in caplog.records if "--nprocs" in r.getMessage()]


def _fail(x):
    raise ValueError("a sink that fails")


def _busy_chain_with_sink(sink_function) -> pe.Workflow:
    """``first`` feeds a sink run in the scheduler's process and a chain of three nodes, each
    taking both processes (so no worker's slot is free while the chain runs)."""
    workflow = pe.Workflow(name="busy")
    first = pe.Node(niu.Function(input_names=["x"], output_names=["x"], function=_stamp), name="first", n_procs=2)
    first.inputs.x = 0
    sink = pe.Node(niu.Function(input_names=["x"], output_names=["x"], function=sink_function), name="sink",
                   run_without_submitting=True)
    workflow.connect(first, "x", sink, "x")
    previous = first
    for i in range(3):
        node = pe.Node(niu.Function(input_names=["x"], output_names=["x"], function=_stamp), name=f"chain{i}",
                       n_procs=2)
        workflow.connect(previous, "x", node, "x")
        previous = node
    return workflow


def test_sinks_run_while_the_workers_are_busy(tmp_path, caplog):
    """nipype runs a run_without_submitting node only in a free worker's slot, which the deeper
    chain always took first: the sink waited for the end of the run."""
    settings = Settings(bids_dir=tmp_path, output_dir=tmp_path / "out", analysis_level="participant",
                        work_dir=tmp_path / "work", nprocs=2)
    with caplog.at_level(logging.INFO, logger="bids_uad"):
        run_workflow(_busy_chain_with_sink(_add_one), settings, "test")
    finished = [r.getMessage().split()[1].split(".")[-1] for r in caplog.records
                if r.name.startswith("bids_uad") and r.getMessage().startswith("[")]
    assert sorted(finished) == ["chain0", "chain1", "chain2", "first", "sink"]
    assert finished.index("sink") < finished.index("chain1"), finished


def test_a_failing_sink_run_in_the_scheduler_fails_the_run(tmp_path):
    from bids_uad.errors import PipelineCrashError

    settings = Settings(bids_dir=tmp_path, output_dir=tmp_path / "out", analysis_level="participant",
                        work_dir=tmp_path / "work", nprocs=2)
    with pytest.raises(PipelineCrashError, match="step"):
        run_workflow(_busy_chain_with_sink(_fail), settings, "test")
    crashes = list((tmp_path / "out" / "logs" / "crash-test").glob("crash-*"))
    assert crashes and "a sink that fails" in crashes[0].read_text()
