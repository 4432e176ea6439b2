"""The input dataset is never written to, even when it is read-only.

Three independent checks, because the tests run as root (permission bits are not enforced):
1. ``chmod -R a-w`` plus a snapshot of every entry (content hash, mode, mtime, folder mtimes)
   before and after a real CLI run in a subprocess;
2. the same run in a private mount namespace where BIDS_DIR is a read-only bind mount
   (``unshare``; the kernel refuses writes even for root);
3. an in-process run with ``open``/``os.open``/``mkdir``/``rename``/... patched to refuse and
   record any write under BIDS_DIR (catches Python-level writes the run might swallow).
"""
from __future__ import annotations

import builtins
import io
import os
import shutil
from pathlib import Path

import pytest

from bids_uad.cli.run import main
from tests.robustness.helpers import (
    participant_args,
    assert_allowed,
    assert_preprocessed,
    assert_valid_json_and_tsv,
    chmod_tree,
    read_only_prefix,
    small_dwi_bids,
    run_cli,
    snapshot,
    snapshot_diff,
    unshare_available,
)

pytestmark = pytest.mark.timeout(900)


@pytest.fixture()
def dataset(tmp_path):
    bids = small_dwi_bids(tmp_path / "bids", n_controls=3, n_patients=1)
    yield bids
    chmod_tree(bids, writable=True)  # let tmp_path cleanup remove it


def _check_outputs(out: Path, label: str) -> None:
    assert (out / "dataset_description.json").is_file()
    assert_preprocessed(out, label)
    assert_valid_json_and_tsv(out)


def test_chmod_read_only_input_is_untouched(dataset, tmp_path):
    chmod_tree(dataset, writable=False)
    before = snapshot(dataset)
    assert all(entry[1] & 0o222 == 0 for entry in before.values() if entry[0] != "link")
    out = tmp_path / "out"
    result = run_cli(dataset, out, "participant", "--participant-label", "ctrl01", "-w", tmp_path / "work")
    assert_allowed(result)
    assert snapshot_diff(before, snapshot(dataset)) == []
    _check_outputs(out, "ctrl01")


@pytest.mark.skipif(not unshare_available(), reason="no unshare/mount namespaces here")
def test_read_only_bind_mount_input(dataset, tmp_path):
    before = snapshot(dataset)
    out = tmp_path / "out"
    result = run_cli(dataset, out, "participant", "--participant-label", "pat01", "-w", tmp_path / "work",
                     prefix=read_only_prefix(dataset))
    assert result.returncode not in (98, 99), f"read-only mount not set up: {result.stderr}"
    assert_allowed(result)
    assert snapshot_diff(before, snapshot(dataset)) == []
    _check_outputs(out, "pat01")


@pytest.mark.skipif(not unshare_available(), reason="no unshare/mount namespaces here")
def test_read_only_bind_mount_input_group_level(tmp_path):
    """The group level reads participants.tsv and derivatives; it must not write to BIDS_DIR either."""
    bids = small_dwi_bids(tmp_path / "bids", n_controls=3, n_patients=1)
    before = snapshot(bids)
    result = run_cli(bids, tmp_path / "out", "group", "--train-preset", "quick", "-w", tmp_path / "work",
                     prefix=read_only_prefix(bids))
    assert result.returncode not in (98, 99), result.stderr
    # without participant derivatives the group level may refuse (16/66/70), but never by writing
    assert "Read-only file system" not in result.stderr, result.stderr[-2000:]
    assert snapshot_diff(before, snapshot(bids)) == []


class WriteGuard:
    """Patches the Python write paths to refuse (PermissionError) anything under ``root``."""

    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def __init__(self, root: Path):
        self.root = str(Path(root).resolve())
        self.attempts: list[str] = []

    def _under(self, path) -> bool:
        if isinstance(path, int):
            return False
        try:
            full = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return False
        return full == self.root or full.startswith(self.root + os.sep)

    def _refuse(self, what: str, path) -> None:
        self.attempts.append(f"{what} {os.fsdecode(path)}")
        raise PermissionError(13, f"write under the input dataset refused by the test ({what})", os.fsdecode(path))

    def install(self, monkeypatch) -> None:
        real_open, real_os_open = builtins.open, os.open

        def guarded_open(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+") and self._under(file):
                self._refuse(f"open({mode})", file)
            return real_open(file, mode, *args, **kwargs)

        def guarded_os_open(path, flags, *args, **kwargs):
            if flags & self.WRITE_FLAGS and self._under(path):
                self._refuse("os.open", path)
            return real_os_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", guarded_open)
        monkeypatch.setattr(io, "open", guarded_open)
        monkeypatch.setattr(os, "open", guarded_os_open)
        for name in ("mkdir", "rmdir", "remove", "unlink", "chmod", "utime", "truncate", "mkfifo"):
            self._wrap_path_function(monkeypatch, name, 0)
        for name in ("rename", "replace", "link", "symlink"):
            self._wrap_path_function(monkeypatch, name, 0, 1)
        for name in ("copyfile", "copy", "copy2", "copytree", "move", "rmtree"):
            self._wrap_shutil(monkeypatch, name)

    def _wrap_path_function(self, monkeypatch, name: str, *positions: int) -> None:
        real = getattr(os, name)

        def guarded(*args, **kwargs):
            for pos in positions:
                if len(args) > pos and self._under(args[pos]):
                    self._refuse(f"os.{name}", args[pos])
            return real(*args, **kwargs)

        monkeypatch.setattr(os, name, guarded)

    def _wrap_shutil(self, monkeypatch, name: str) -> None:
        real = getattr(shutil, name)
        target = 0 if name == "rmtree" else 1

        def guarded(*args, **kwargs):
            if len(args) > target and self._under(args[target]):
                self._refuse(f"shutil.{name}", args[target])
            return real(*args, **kwargs)

        monkeypatch.setattr(shutil, name, guarded)


def test_guard_refuses_writes_under_the_dataset(tmp_path, monkeypatch):
    """The guard itself: writes below the root are refused and recorded, others pass."""
    root = tmp_path / "bids"
    root.mkdir()
    (root / "a.txt").write_text("a")
    guard = WriteGuard(root)
    guard.install(monkeypatch)
    for attempt in (lambda: (root / "b.txt").write_text("b"),
                    lambda: open(root / "a.txt", "a"),
                    lambda: os.open(root / "c", os.O_CREAT | os.O_WRONLY),
                    lambda: (root / "d").mkdir(),
                    lambda: os.replace(tmp_path / "x", root / "a.txt"),
                    lambda: (root / "a.txt").unlink(),
                    lambda: shutil.copy(root / "a.txt", root / "e.txt")):
        with pytest.raises(PermissionError):
            attempt()
    monkeypatch.undo()
    assert len(guard.attempts) == 7
    assert (root / "a.txt").read_text() == "a" and sorted(p.name for p in root.iterdir()) == ["a.txt"]
    guard2 = WriteGuard(root)
    guard2.install(monkeypatch)
    (tmp_path / "elsewhere.txt").write_text("fine")
    assert (root / "a.txt").read_text() == "a"  # reading is fine
    assert guard2.attempts == []


def test_in_process_run_never_writes_under_the_dataset(dataset, tmp_path, monkeypatch, capsys):
    before = snapshot(dataset)
    guard = WriteGuard(dataset)
    guard.install(monkeypatch)
    out = tmp_path / "out"
    code = main(participant_args([str(dataset), str(out), "participant", "--participant-label", "ctrl02",
                 "-w", str(tmp_path / "work"), "--nprocs", "1"]))
    err = capsys.readouterr().err
    monkeypatch.undo()
    assert guard.attempts == [], f"writes attempted under BIDS_DIR: {guard.attempts}"
    assert code in (0, 70), err
    assert snapshot_diff(before, snapshot(dataset)) == []
    _check_outputs(out, "ctrl02")
