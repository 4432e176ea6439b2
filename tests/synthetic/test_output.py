"""bids_uad-synth's output folder: written in place (a mount point survives), world-readable."""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from bids_uad.errors import UsageError
from bids_uad.synthetic import generate_dataset, output


def _modes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")}


@pytest.fixture()
def busy_folder(monkeypatch):
    """Make removing or renaming the folder given to ``busy(path)`` fail as a mount point does."""
    busy: set[Path] = set()
    real_rmtree, real_replace, real_rmdir = output.shutil.rmtree, os.replace, os.rmdir

    def guard(path):
        if Path(path).resolve() in busy:
            raise OSError(errno.EBUSY, "Device or resource busy", str(path))

    def rmtree(path, *args, **kwargs):
        guard(path)
        return real_rmtree(path, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        guard(src), guard(dst)
        return real_replace(src, dst, *args, **kwargs)

    def rmdir(path, *args, **kwargs):
        guard(path)
        return real_rmdir(path, *args, **kwargs)

    monkeypatch.setattr(output.shutil, "rmtree", rmtree)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rmdir", rmdir)
    return busy.add


def test_generates_into_an_existing_busy_folder_world_readable(tmp_path, busy_folder):
    """The docker case: /data is a mount point (cannot be removed) and the umask may be strict."""
    out = tmp_path / "data"
    out.mkdir(mode=0o750)
    (out / f"{output.STAGING_PREFIX}killed").mkdir()  # left by a killed generation
    (out / f"{output.STAGING_PREFIX}killed" / "x.nii.gz").write_bytes(b"half")
    busy_folder(out)
    inode = out.stat().st_ino
    old_umask = os.umask(0o077)
    try:
        generate_dataset(out, preset="tiny", n_controls=1, n_patients=0, seed=3, progress=False, n_jobs=1)
    finally:
        os.umask(old_umask)
    assert out.stat().st_ino == inode, "the folder itself was replaced"
    assert stat.S_IMODE(out.stat().st_mode) == 0o750, "an existing folder keeps its owner's mode"
    modes = _modes(out)
    assert "dataset_description.json" in modes and "sub-ctrl01/ses-pre/dwi" in modes
    assert not [name for name in modes if output.STAGING_PREFIX in name], "staging folders left behind"
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != (0o755 if (out / name).is_dir() else 0o644)}
    assert not wrong, f"not 0755/0644: {sorted(wrong.items())[:5]}"


def test_a_previous_dataset_is_replaced_in_place(tmp_path, busy_folder):
    out = tmp_path / "data"
    out.mkdir()
    busy_folder(out)
    (out / "sub-old").mkdir()
    (out / "sub-old" / "a.txt").write_text("old")
    (out / "stale.txt").write_text("old")
    staging = output.prepare_output(out, lambda path: True)
    assert staging.parent == out and staging.name.startswith(output.STAGING_PREFIX)
    (staging / "sub-new").mkdir()
    (staging / "sub-new" / "b.txt").write_text("new")
    (staging / "dataset_description.json").write_text("{}")
    (staging / "sub-new" / "b.txt").chmod(0o600)
    output.publish(staging, out)
    assert sorted(p.name for p in out.iterdir()) == ["dataset_description.json", "sub-new"]
    assert stat.S_IMODE((out / "sub-new" / "b.txt").stat().st_mode) == 0o644


def test_new_folder_is_created_readable_and_a_foreign_one_refused(tmp_path):
    old_umask = os.umask(0o077)
    try:
        out = tmp_path / "a" / "b"
        staging = output.prepare_output(out, lambda path: False)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    output.discard(staging)
    assert list(out.iterdir()) == []
    (out / "mine.txt").write_text("keep")
    with pytest.raises(UsageError, match="not empty"):
        output.prepare_output(out, lambda path: False)
    assert (out / "mine.txt").read_text() == "keep" and len(list(out.iterdir())) == 1
    with pytest.raises(UsageError):
        output.prepare_output(out / "mine.txt", lambda path: True)  # a file, not a folder
