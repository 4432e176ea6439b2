"""A run killed with SIGKILL part-way and restarted with the same ``-w`` completes, reuses the
nipype nodes that had finished (their result files are not rewritten) and gives the same
outputs as an uninterrupted run.

The trigger is reliable: the work folder is polled for nipype's ``result_<node>.pklz`` files,
and the whole process group is killed as soon as a few nodes have finished.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.robustness.helpers import (
    REPO,
    assert_allowed,
    assert_preprocessed,
    cli_argv,
    cli_env,
    compare_outputs,
    kill_group,
    leftover_temporaries,
    nipype_results,
    run_cli,
    small_dwi_bids,
    wait_for,
)

pytestmark = pytest.mark.timeout(900)


# --------------------------------------------------------- the mechanism, on a small graph ----

RUNNER = textwrap.dedent('''
    """Run a three-node nipype graph through bids_uad's own run_workflow (argv: work out markers gate)."""
    import sys
    from pathlib import Path

    from nipype.pipeline import engine as pe
    from nipype.interfaces.utility import Function

    from bids_uad.config import Settings
    from bids_uad.workflows.execution import run_workflow


    def first(marker_dir):
        import os, time
        open(os.path.join(marker_dir, "first-%d" % time.time_ns()), "w").close()
        return 21


    def second(value, marker_dir, gate):
        import os, time
        open(os.path.join(marker_dir, "second-%d" % time.time_ns()), "w").close()
        while os.path.exists(gate):  # the first run blocks here until it is killed
            time.sleep(0.05)
        return value * 2


    def last(value, marker_dir):
        import os, time
        open(os.path.join(marker_dir, "last-%d" % time.time_ns()), "w").close()
        return value + 0


    def main():
        work, out, markers, gate = sys.argv[1:5]
        wf = pe.Workflow(name="resume_wf")
        a = pe.Node(Function(input_names=["marker_dir"], output_names=["value"], function=first), name="a")
        b = pe.Node(Function(input_names=["value", "marker_dir", "gate"], output_names=["value"],
                             function=second), name="b")
        c = pe.Node(Function(input_names=["value", "marker_dir"], output_names=["value"], function=last), name="c")
        for node in (a, b, c):
            node.inputs.marker_dir = markers
        b.inputs.gate = gate
        wf.connect([(a, b, [("value", "value")]), (b, c, [("value", "value")])])
        settings = Settings(bids_dir=Path(out).parent, output_dir=Path(out), analysis_level="participant",
                            work_dir=Path(work), nprocs=int(sys.argv[5]))
        run_workflow(wf, settings, "test")


    # MultiProc workers start from a fork server, which imports this file again: guard the run
    if __name__ == "__main__":
        main()
''')


@pytest.mark.parametrize("nprocs", [1, 2], ids=["Linear", "MultiProc"])
def test_run_workflow_resumes_after_sigkill(tmp_path, nprocs):
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    work, out, markers, gate = tmp_path / "work", tmp_path / "out", tmp_path / "markers", tmp_path / "gate"
    markers.mkdir()
    gate.write_text("hold")
    argv = [sys.executable, str(script), str(work), str(out), str(markers), str(gate), str(nprocs)]
    proc = subprocess.Popen(argv, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, cwd=tmp_path)
    try:
        started = wait_for(lambda: any(p.name.startswith("second-") for p in markers.iterdir()), proc, 300)
        assert started, proc.stderr.read() if proc.poll() is not None else "node b never started"
        finished = nipype_results(work)
        assert [Path(k).name for k in finished] == ["result_a.pklz"], finished
    finally:
        kill_group(proc)
    assert proc.returncode == -9
    time.sleep(0.05)  # a different mtime if anything were rewritten
    gate.unlink()
    result = subprocess.run(argv, env=cli_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    after = nipype_results(work)
    for key, mtime in finished.items():
        assert after[key] == mtime, f"{key} was recomputed"
    runs = sorted(p.name.split("-")[0] for p in markers.iterdir())
    assert runs == ["first", "last", "second", "second"], "a ran once, b again (killed), c once"
    from nipype.utils.filemanip import loadpkl

    result_c = loadpkl(next(work.rglob("result_c.pklz")))
    assert result_c.outputs.value == 42


# ------------------------------------------------------------------ the real participant run ----

def test_participant_run_killed_and_resumed(tmp_path):
    bids = small_dwi_bids(tmp_path / "bids", n_controls=3, n_patients=1)
    label = "ctrl01"

    # the reference: one uninterrupted run
    reference = run_cli(bids, tmp_path / "ref_out", "participant", "--participant-label", label,
                        "-w", tmp_path / "ref_work")
    assert_allowed(reference)
    total = len(nipype_results(tmp_path / "ref_work"))
    if total < 3:
        pytest.skip(f"the participant pipeline runs only {total} nipype node(s) so far: nothing to interrupt")

    out, work = tmp_path / "out", tmp_path / "work"
    argv = cli_argv(bids, out, "participant", "--participant-label", label, "-w", work)
    proc = subprocess.Popen(argv, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    wanted = max(1, total // 3)
    try:
        reached = wait_for(lambda: len(nipype_results(work)) >= wanted, proc, 600, interval=0.01)
    finally:
        still_running = proc.poll() is None
        kill_group(proc)
    assert reached, "no node finished before the run ended"
    if not still_running:
        pytest.skip("the run finished before it could be killed")
    finished = nipype_results(work)
    assert 0 < len(finished) < total, f"killed after {len(finished)} of {total} nodes"

    time.sleep(0.05)
    resumed = run_cli(bids, out, "participant", "--participant-label", label, "-w", work)
    assert_allowed(resumed)
    assert resumed.returncode == reference.returncode
    after = nipype_results(work)
    recomputed = [key for key, mtime in finished.items() if after.get(key) != mtime]
    assert recomputed == [], f"finished nodes were recomputed: {recomputed}"
    assert set(after) >= set(nipype_results(tmp_path / "ref_work")), "the resumed run skipped nodes"
    assert_preprocessed(out, label)
    assert leftover_temporaries(out) == [], "an atomic write left its temporary file behind"
    assert compare_outputs(tmp_path / "ref_out", out) == []


def test_outputs_stay_readable_after_sigkill(tmp_path):
    """Kill runs at several points: every derivative present is complete (atomic writes)."""
    import nibabel as nib

    from tests.robustness.helpers import assert_valid_json_and_tsv

    bids = small_dwi_bids(tmp_path / "bids", n_controls=3, n_patients=1)
    out = tmp_path / "out"
    for index, delay in enumerate([0.5, 2.0, 4.0, 6.0]):
        proc = subprocess.Popen(cli_argv(bids, out, "participant", "--participant-label", "ctrl02",
                                         "-w", tmp_path / f"work{index}"),
                                env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        time.sleep(delay)
        kill_group(proc)
        assert_valid_json_and_tsv(out)
        for image in out.rglob("*.nii.gz"):
            if not image.name.startswith("."):  # hidden: a temporary orphaned by the kill
                nib.load(str(image)).get_fdata()
