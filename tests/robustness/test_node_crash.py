"""A crashing pipeline step ends the run with a defined exit status and one line naming the crash file.

The crash is injected: the diffusion stage builder is replaced by a one-node workflow whose
node raises.  ``run_workflow`` turns nipype's exception into a ``PipelineCrashError`` (exit 1)
whose one line names the crash folder; nipype's own console lines carry no traceback.
"""
from __future__ import annotations

import pytest

from bids_uad.cli.run import main
from tests.robustness.helpers import participant_args, small_dwi_bids


def _boom(dwi_file):
    raise RuntimeError("injected failure for the robustness test")


def _crashing_dwi_builder(settings, name, **_options):
    from nipype.interfaces.utility import Function, IdentityInterface
    from nipype.pipeline import engine as pe

    wf = pe.Workflow(name=name)
    inputnode = pe.Node(IdentityInterface(fields=["dwi_file", "bval_file", "bvec_file", "dwi_metadata", "rpe_file",
                                                  "rpe_metadata", "source_file"]), name="inputnode")
    from bids_uad.workflows.dwi import OUTPUT_FIELDS

    outputnode = pe.Node(IdentityInterface(fields=OUTPUT_FIELDS), name="outputnode")  # what base.py connects
    boom = pe.Node(Function(input_names=["dwi_file"], output_names=["out"], function=_boom), name="boom")
    wf.connect([(inputnode, boom, [("dwi_file", "dwi_file")]), (boom, outputnode, [("out", "dwi_preproc")])])
    return wf


def test_node_crash_gives_one_line_and_an_exit_code(tmp_path, monkeypatch, capsys):
    import bids_uad.workflows.base as base

    monkeypatch.setattr(base, "init_dwi_preproc_wf", _crashing_dwi_builder)
    bids = small_dwi_bids(tmp_path / "bids", n_controls=3, n_patients=1)
    out = tmp_path / "out"
    code = main(participant_args([str(bids), str(out), "participant", "--participant-label", "ctrl01", "-w", str(tmp_path / "w")]))
    err = capsys.readouterr().err
    crash_dirs = list((out / "logs").glob("crash-*"))
    assert crash_dirs and list(crash_dirs[0].glob("crash-*boom*.txt")), "nipype wrote a crash file"
    assert code not in (0, 70)
    lines = [line for line in err.splitlines() if line.startswith("bids_uad: error:")]
    assert len(lines) == 1 and str(crash_dirs[0]) in lines[0]
    assert "Traceback" not in err
