"""Participant runs of different subjects in parallel into one output folder (as a SLURM array does).

Both complete, and the files they share (``dataset_description.json``, ``logs/``) stay valid:
every JSON parses, every TSV has one column count, each run has its own log and settings,
and no temporary file of an atomic write is left behind.
"""
from __future__ import annotations

import json
import multiprocessing
import subprocess

import pytest

from tests.robustness.helpers import (
    assert_allowed,
    assert_preprocessed,
    assert_valid_json_and_tsv,
    cli_argv,
    cli_env,
    leftover_temporaries,
    small_dwi_bids,
)

pytestmark = pytest.mark.timeout(900)


def _run_in_parallel(commands: list[list[str]], timeout: float = 900) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in commands]
    results = []
    for cmd, proc in zip(commands, procs):
        out, err = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    return results


@pytest.mark.parametrize("shared_work", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["own-work-dirs", "shared-work-dir"])
def test_two_participants_in_parallel_share_one_output_folder(tmp_path, shared_work):
    bids = small_dwi_bids(tmp_path / "bids", n_controls=3, n_patients=1)
    out = tmp_path / "out"
    labels = ["ctrl01", "pat01"]
    commands = [cli_argv(bids, out, "participant", "--participant-label", label,
                         "-w", tmp_path / ("work" if shared_work else f"work-{label}"))
                for label in labels]
    results = _run_in_parallel(commands)
    for result in results:
        assert_allowed(result)
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "bids_uad"
    assert_valid_json_and_tsv(out)
    settings = sorted((out / "logs").glob("run-*_settings.json"))
    assert len(settings) == 2, "each run records its own settings"
    assert sorted(json.loads(p.read_text())["participant_labels"][0] for p in settings) == sorted(labels)
    logs = sorted((out / "logs").glob("run-*.log"))
    assert len(logs) == 2 and all(p.stat().st_size > 0 for p in logs)
    assert not list((out / "logs").glob("crash-*")), "a node crashed"
    assert leftover_temporaries(out) == []
    for label in labels:
        assert_preprocessed(out, label)
    # nothing of one subject ended up in the other's folders
    for label, other in (("ctrl01", "pat01"), ("pat01", "ctrl01")):
        assert not [p for p in (out / f"sub-{label}").rglob("*") if other in p.name]


def _write_description(args) -> str:
    out, barrier = args
    from bids_uad.bids.derivatives import DerivativesWriter

    barrier.wait()
    return str(DerivativesWriter(out).ensure_dataset_description())


def test_concurrent_dataset_description_writers(tmp_path):
    """Eight processes racing to create dataset_description.json: one valid file, no temporaries."""
    out = tmp_path / "out"
    out.mkdir()
    ctx = multiprocessing.get_context("fork")
    for _ in range(3):
        (out / "dataset_description.json").unlink(missing_ok=True)
        barrier = ctx.Manager().Barrier(8)
        with ctx.Pool(8) as pool:
            paths = pool.map(_write_description, [(out, barrier)] * 8)
        assert set(paths) == {str(out / "dataset_description.json")}
        assert json.loads((out / "dataset_description.json").read_text())["DatasetType"] == "derivative"
        assert leftover_temporaries(out) == []
