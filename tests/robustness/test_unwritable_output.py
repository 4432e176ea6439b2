"""An output (or work) folder that cannot be written: exit 73, one clear line, nothing else done.

As root, permission bits do not stop writes, so the unwritable folders here are a path
below a regular file and a read-only bind mount in a private mount namespace.
"""
from __future__ import annotations

import pytest

from tests.robustness.helpers import read_only_prefix, run_cli, small_dwi_bids, snapshot, snapshot_diff, \
    unshare_available

pytestmark = pytest.mark.timeout(300)


@pytest.fixture()
def bids(tmp_path):
    return small_dwi_bids(tmp_path / "bids", n_controls=3, n_patients=1)


def _assert_exit_73(result, path) -> None:
    assert result.returncode == 73, f"exit {result.returncode}: {result.stderr[-2000:]}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert lines[0].startswith("bids_uad: error:") and str(path) in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("level", ["participant", "group"])
def test_output_below_a_regular_file(bids, tmp_path, level):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file")
    out = blocker / "derivatives"
    result = run_cli(bids, out, level, "-w", tmp_path / "work", timeout=120)
    _assert_exit_73(result, out)
    assert blocker.read_text() == "a file"


def test_output_is_a_regular_file(bids, tmp_path):
    out = tmp_path / "out"
    out.write_text("a file")
    result = run_cli(bids, out, "participant", "-w", tmp_path / "work", timeout=120)
    _assert_exit_73(result, out)


def test_work_dir_below_a_regular_file(bids, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run_cli(bids, tmp_path / "out", "participant", "-w", blocker / "work", timeout=120)
    _assert_exit_73(result, blocker / "work")


def test_logs_folder_blocked(bids, tmp_path):
    """OUTPUT_DIR writable but OUTPUT_DIR/logs is a file: still 73, naming logs."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "logs").write_text("not a folder")
    result = run_cli(bids, out, "participant", "--participant-label", "ctrl01", "-w", tmp_path / "work",
                     timeout=120)
    _assert_exit_73(result, out / "logs")


@pytest.mark.skipif(not unshare_available(), reason="no unshare/mount namespaces here")
def test_read_only_mounted_output(bids, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(out)
    result = run_cli(bids, out, "participant", "--participant-label", "ctrl01", "-w", tmp_path / "work",
                     prefix=read_only_prefix(out), timeout=120)
    assert result.returncode not in (98, 99), f"read-only mount not set up: {result.stderr}"
    _assert_exit_73(result, out)
    assert snapshot_diff(before, snapshot(out)) == []
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir()), \
        "nothing should run when the outputs cannot be written"


@pytest.mark.skipif(not unshare_available(), reason="no unshare/mount namespaces here")
def test_read_only_mounted_output_with_existing_description(bids, tmp_path):
    """A read-only output that already holds a valid dataset_description.json (a previous run)."""
    first = run_cli(bids, tmp_path / "out", "participant", "--participant-label", "nobody",
                    "-w", tmp_path / "work", timeout=120)
    assert first.returncode == 18
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "dataset_description.json").write_text('{"DatasetType": "derivative", "Name": "x", "BIDSVersion": "1.9.0"}')
    result = run_cli(bids, out, "participant", "--participant-label", "ctrl01", "-w", tmp_path / "work",
                     prefix=read_only_prefix(out), timeout=120)
    assert result.returncode not in (98, 99), result.stderr
    _assert_exit_73(result, out)
