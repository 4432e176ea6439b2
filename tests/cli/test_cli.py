"""The command line: every documented exit code, one-line messages, options, settings log."""
from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from bids_uad.cli.parser import build_parser
from bids_uad.cli.run import main, settings_from_args
from bids_uad.config import Settings


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def test_help_documents_every_option(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--participant-label", "--session-label", "--work-dir", "--nprocs", "--omp-nthreads",
                   "--mem-gb", "--skip-bids-validation", "--bids-filter-file", "--preproc-backend",
                   "--model", "--output-spaces", "--reports-only", "--stop-on-first-crash", "--seed",
                   "--verbose", "--version", "exit codes"):
        assert option in out, option


def test_version(capsys):
    assert main(["--version"]) == 0
    assert "bids_uad" in capsys.readouterr().out


def test_missing_bids_dir_exits_66(capsys, tmp_path):
    code, err = _run(capsys, "/nonexistent", tmp_path / "out", "participant")
    assert code == 66
    assert err.count("\n") == 1 and "/nonexistent" in err and "does not exist" in err


def test_unknown_level_exits_17(capsys, small_bids, tmp_path):
    code, err = _run(capsys, small_bids, tmp_path / "out", "session")
    assert code == 17 and "unknown analysis level" in err


def test_unknown_participant_exits_18_and_writes_nothing(capsys, small_bids, tmp_path):
    out = tmp_path / "out"
    code, err = _run(capsys, small_bids, out, "participant", "--participant-label", "nobody", "-w", tmp_path / "w")
    assert code == 18 and "sub-nobody" in err
    assert not (out / "logs").exists()


@pytest.mark.parametrize("label", ["../x", "a/b", "sub-..", "x\\y"])
def test_path_like_label_exits_64(capsys, small_bids, tmp_path, label):
    code, err = _run(capsys, small_bids, tmp_path / "out", "participant", "--participant-label", label)
    assert code == 64 and "invalid sub label" in err


def test_usage_errors_exit_64(capsys, small_bids, tmp_path):
    assert _run(capsys, small_bids)[0] == 64  # missing positionals
    assert _run(capsys, small_bids, tmp_path / "o", "participant", "--nprocs", "0")[0] == 64
    assert _run(capsys, small_bids, tmp_path / "o", "participant", "--bogus")[0] == 64
    assert _run(capsys, small_bids, tmp_path / "o", "participant", "--findings-min-volume", "-1")[0] == 64
    code, err = _run(capsys, small_bids, small_bids / "derivatives" / "x", "participant")
    assert code == 64 and "inside" in err
    assert _run(capsys, small_bids, small_bids, "participant")[0] == 64
    code, err = _run(capsys, small_bids, tmp_path / "o", "participant", "-w", small_bids / "work")
    assert code == 64 and "work folder" in err
    assert not (small_bids / "work").exists() and not (small_bids / "derivatives").exists()


def test_fsl_backend_without_fsl_is_usage_error(capsys, small_bids, tmp_path, monkeypatch):
    monkeypatch.delenv("FSLDIR", raising=False)
    code, err = _run(capsys, small_bids, tmp_path / "o", "participant", "--preproc-backend", "fsl")
    assert code == 64 and "FSL is not installed" in err


def test_unwritable_output_exits_73(capsys, small_bids, tmp_path):
    if os.geteuid() == 0:
        # root ignores permission bits: use a path under a regular file instead
        blocker = tmp_path / "file"
        blocker.write_text("x")
        code, err = _run(capsys, small_bids, blocker / "out", "participant", "-w", tmp_path / "w")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
        code, err = _run(capsys, small_bids, ro / "out", "participant", "-w", tmp_path / "w")
    assert code == 73 and "cannot create the output folder" in err


def test_invalid_dataset_exits_16(capsys, tmp_path):
    (tmp_path / "bids").mkdir()
    code, err = _run(capsys, tmp_path / "bids", tmp_path / "out", "participant", "-w", tmp_path / "w")
    assert code == 16 and "dataset_description.json" in err


def test_bad_dwi_exits_16_naming_the_file(capsys, small_bids, tmp_path):
    bval = small_bids / "sub-pat01/ses-pre/dwi/sub-pat01_ses-pre_dir-AP_dwi.bval"
    bval.write_text("0 1000")
    code, err = _run(capsys, small_bids, tmp_path / "out", "participant", "--participant-label", "pat01",
                     "-w", tmp_path / "w")
    assert code == 16 and "sub-pat01_ses-pre_dir-AP_dwi.bval" in err and "mismatch" in err


def test_group_needs_three_controls(capsys, tmp_path):
    from tests.conftest import build_small_bids

    bids = build_small_bids(tmp_path / "bids", n_controls=2, n_patients=1)
    code, err = _run(capsys, bids, tmp_path / "out", "group", "-w", tmp_path / "w")
    assert code == 16 and "only 2 control(s)" in err and "participants.tsv" in err
    code, err = _run(capsys, bids, tmp_path / "out", "group", "-w", tmp_path / "w", "--control-value", "healthy")
    assert code == 16 and "only 0 control(s)" in err


def test_filter_file_errors(capsys, small_bids, tmp_path):
    assert _run(capsys, small_bids, tmp_path / "o", "participant", "--bids-filter-file", tmp_path / "none.json")[0] == 66
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert _run(capsys, small_bids, tmp_path / "o", "participant", "--bids-filter-file", bad)[0] == 64


def test_settings_are_frozen_and_round_trip(small_bids, tmp_path):
    s = settings_from_args([str(small_bids), str(tmp_path / "o"), "participant", "--participant_label", "sub-pat01",
                            "--session-label", "ses-pre", "--nprocs", "2", "--mem-gb", "3.5", "--seed", "7"])
    assert s.participant_labels == ("pat01",) and s.session_labels == ("pre",)
    assert s.nprocs == 2 and s.mem_gb == 3.5 and s.seed == 7
    with pytest.raises(Exception):
        s.seed = 3  # type: ignore[misc]
    assert Settings.from_dict(json.loads(json.dumps(s.to_dict()))) == s



def test_ensemble_flag_is_tri_state(small_bids, tmp_path):
    """--ensemble / --no-ensemble override the model file; absent, the model file decides (None),
    and at the group level the choice is stored in the model files' scoring settings."""
    from bids_uad.workflows.group import model_settings_for

    base = [str(small_bids), str(tmp_path / "o"), "participant"]
    assert settings_from_args(base).ensemble is None
    assert settings_from_args(base + ["--ensemble"]).ensemble is True
    assert settings_from_args(base + ["--no-ensemble"]).ensemble is False
    group = [str(small_bids), str(tmp_path / "o"), "group", "--train-preset", "quick"]
    from bids_uad.models.settings import preset

    # absent: the fold ensemble for a network whose score is referred to the controls' (cdae), the
    # preset's choice for the others (RecDiscNet, the baselines)
    for flag, want in (([], True), (["--ensemble"], True), (["--no-ensemble"], False)):
        run = settings_from_args(group + flag)
        assert model_settings_for(run, "cdae", np.full(8, 1000.0), (16, 16, 16)).scoring.ensemble is want
    run = settings_from_args(group)
    for model in ("recdisc", "normative", "meansignal"):
        assert model_settings_for(run, model, np.full(8, 1000.0), (16, 16, 16)).scoring.ensemble is preset("quick", model).scoring.ensemble


def test_model_inputs_reach_the_networks_model_files_not_the_baselines(small_bids, tmp_path, capsys):
    """--model-inputs sets the networks' input representation (stored in their model files and named
    in the methods text); the baselines read the dw volumes whatever it says; a wrong value is one
    usage line (64)."""
    from bids_uad.models import describe_model
    from bids_uad.workflows.group import model_settings_for

    group = [str(small_bids), str(tmp_path / "o"), "group", "--train-preset", "quick"]
    # the defaults: the cdae sees the dw volumes and the features, the other networks the dw volumes
    defaults = settings_from_args(group)
    assert [model_settings_for(defaults, m, np.full(8, 1000.0), (16, 16, 16)).model.inputs
            for m in ("cdae", "dae", "cevae", "recdisc", "normative")] == ["both", "dwi", "dwi", "dwi", "dwi"]
    # eight directions determine the SH power up to order 2 only: the default's features are sized to them
    sparse = model_settings_for(defaults, "cdae", np.full(8, 1000.0), (16, 16, 16)).model
    assert (sparse.invariant_sh_order, sparse.n_channels, sparse.feature_channels) == (2, 12, 4)
    run = settings_from_args(group + ["--model-inputs", "invariant"])
    for model, want in (("cdae", "invariant"), ("dae", "invariant"), ("recdisc", "invariant"),
                        ("normative", "dwi"), ("meansignal", "dwi")):
        assert model_settings_for(run, model, np.full(8, 1000.0), (16, 16, 16)).model.inputs == want, model
    invariant = dataclasses.asdict(model_settings_for(run, "cdae", np.full(8, 1000.0), (16, 16, 16)).model)
    assert "protocol-invariant features" in describe_model("cdae", invariant)
    dwi_run = settings_from_args(group + ["--model-inputs", "dwi"])
    assert "protocol-invariant" not in describe_model(
        "cdae", dataclasses.asdict(model_settings_for(dwi_run, "cdae", np.full(8, 1000.0), (16, 16, 16)).model))
    # a referred network on the dw volumes scores the signed residual sum; on invariant features not
    assert [model_settings_for(dwi_run, m, np.full(8, 1000.0), (16, 16, 16)).model.score_reduction
            for m in ("cdae", "dae", "cevae", "recdisc")] == ["sum", "sum", "sum", "abs-sum"]
    assert model_settings_for(run, "cdae", np.full(8, 1000.0), (16, 16, 16)).model.score_reduction == "abs-sum"
    both = model_settings_for(settings_from_args(group + ["--model-inputs", "both"]), "cdae", np.full(32, 1000.0),
                              (16, 16, 16)).model
    assert (both.inputs, both.n_channels, both.feature_channels) == ("both", 37, 5)  # 32 dw + 3 shell + FA, MD
    assert both.score_reduction == "sum" and both.n_score_maps == 2
    assert "signed sum over the dw volumes and of that over the features" in describe_model(
        "cdae", dataclasses.asdict(both))
    assert "the dw volumes and protocol-invariant features" in describe_model("cdae", dataclasses.asdict(both))
    code, err = _run(capsys, *group, "--model-inputs", "tensor")
    assert code == 64 and "--model-inputs" in err and len(err.strip().splitlines()) == 1


def test_train_repeats_reach_the_networks_model_settings_not_the_baselines(small_bids, tmp_path, capsys):
    """--train-repeats N: the networks train N k-fold runs (TrainingSettings.repeats, stored in their
    model files); the baselines fit once; 0 is one usage line (64)."""
    from bids_uad.workflows.group import model_settings_for

    group = [str(small_bids), str(tmp_path / "o"), "group", "--train-preset", "quick"]
    assert model_settings_for(settings_from_args(group), "cdae", np.full(8, 1000.0), (16, 16, 16)).training.repeats == 1
    run = settings_from_args(group + ["--train-repeats", "2"])
    for model, want in (("cdae", 2), ("dae", 2), ("recdisc", 2), ("normative", 1), ("meansignal", 1)):
        assert model_settings_for(run, model, np.full(8, 1000.0), (16, 16, 16)).training.repeats == want, model
    code, err = _run(capsys, *group, "--train-repeats", "0")
    assert code == 64 and "--train-repeats" in err and len(err.strip().splitlines()) == 1


def test_device_cuda_is_plumbed_and_refused_without_a_gpu(small_bids, tmp_path, monkeypatch, capsys):
    """--device cuda without a GPU: one usage line (64) before any work.  With one (simulated: no
    test needs a GPU) the device reaches the training settings and the inference nodes."""
    import torch

    from bids_uad.workflows.group import model_settings_for

    base = [str(small_bids), str(tmp_path / "o"), "group", "--train-preset", "quick", "--device", "cuda"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = _run(capsys, *base)
    assert code == 64 and "no CUDA device" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    run = settings_from_args(base + ["--nprocs", "4"])
    training = model_settings_for(run, "cdae", np.full(8, 1000.0), (16, 16, 16)).training
    assert run.device == "cuda" and training.device == "cuda"
    assert training.processes == 1  # data-parallel processes: at most one per GPU (batch 2 allows 2)

def _no_stages(monkeypatch) -> None:
    """Run the participant level's start-up only: an empty graph and no reports."""
    from nipype.pipeline import engine as pe

    import bids_uad.cli.levels as levels

    monkeypatch.setattr(levels, "init_participant_wf", lambda settings, plan: pe.Workflow(name="empty"))
    monkeypatch.setattr(levels, "_build_participant_reports", lambda *args: None)


def test_settings_written_to_logs_and_input_untouched(capsys, small_bids, tmp_path, monkeypatch):
    _no_stages(monkeypatch)  # foundation only: no stage runs
    before = sorted((p.relative_to(small_bids), p.stat().st_mtime_ns) for p in small_bids.rglob("*"))
    out = tmp_path / "out"
    code, err = _run(capsys, small_bids, out, "participant", "-w", tmp_path / "w", "--participant-label", "pat01")
    assert code == 0, err
    logs = list((out / "logs").glob("run-*_settings.json"))
    assert len(logs) == 1 and json.loads(logs[0].read_text())["participant_labels"] == ["pat01"]
    assert json.loads((out / "dataset_description.json").read_text())["DatasetType"] == "derivative"
    after = sorted((p.relative_to(small_bids), p.stat().st_mtime_ns) for p in small_bids.rglob("*"))
    assert before == after


def test_parser_accepts_underscore_aliases():
    args = build_parser().parse_args(["b", "o", "participant", "--participant_label", "01", "02"])
    assert args.participant_label == ["01", "02"]


def test_python_dash_m_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bids_uad", "/nonexistent", str(tmp_path / "o"), "participant"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 66 and "does not exist" in proc.stderr


def test_plugin_file(small_bids, tmp_path, capsys):
    from bids_uad.workflows.execution import nipype_plugin

    plugin = tmp_path / "plugin.yml"
    plugin.write_text("plugin: MultiProc\nplugin_args:\n  maxtasksperchild: 1\n")
    s = settings_from_args([str(small_bids), str(tmp_path / "o"), "participant", "--use-plugin", str(plugin),
                            "--nprocs", "2", "--mem-gb", "4"])
    assert nipype_plugin(s) == ("MultiProc", {"mp_context": "forkserver", "n_procs": 2, "maxtasksperchild": 1, "memory_gb": 4.0})
    s = settings_from_args([str(small_bids), str(tmp_path / "o"), "participant"])
    assert nipype_plugin(s) == ("Linear", {})
    plugin.write_text("plugin_args: {}\n")
    assert main([str(small_bids), str(tmp_path / "o"), "participant", "--use-plugin", str(plugin)]) == 64
    assert "must name a 'plugin'" in capsys.readouterr().err


def test_command_line_overrides_plugin_file(small_bids, tmp_path):
    from bids_uad.workflows.execution import nipype_plugin

    plugin = tmp_path / "plugin.yml"
    plugin.write_text("plugin: MultiProc\nplugin_args: {n_procs: 8, memory_gb: 16}\n")
    base = [str(small_bids), str(tmp_path / "o"), "participant", "--use-plugin", str(plugin)]
    assert nipype_plugin(settings_from_args(base)) == ("MultiProc", {"mp_context": "forkserver", "n_procs": 8, "memory_gb": 16})
    s = settings_from_args(base + ["--nprocs", "2", "--mem-gb", "3"])
    assert nipype_plugin(s) == ("MultiProc", {"mp_context": "forkserver", "n_procs": 2, "memory_gb": 3.0})


def test_run_removes_temporaries_left_by_a_killed_run(capsys, small_bids, tmp_path, monkeypatch):
    """A SIGKILLed run leaves hidden ``.*.tmp-<host>-<pid>-*`` files; the next run removes them."""
    import subprocess
    import sys

    from bids_uad.bids import derivatives

    _no_stages(monkeypatch)  # no stage runs: only the start-up
    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                                  capture_output=True, text=True, check=True).stdout)
    out = tmp_path / "out"
    orphan = out / "sub-pat01" / "ses-pre" / "dwi" / f".sub-pat01_ses-pre_dwi.tmp-{derivatives._host_tag()}-{dead_pid}-x1.nii.gz"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"half written")
    code, _ = _run(capsys, small_bids, out, "participant", "-w", tmp_path / "w", "--participant-label", "pat01")
    assert code == 0
    assert not orphan.exists()
    log = next((out / "logs").glob("run-*.log")).read_text()
    assert "removed 1 temporary file(s) left by a killed run" in log
