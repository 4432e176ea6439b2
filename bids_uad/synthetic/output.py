"""The output folder of ``bids_uad-synth``: prepared in place, published world-readable.

The dataset is simulated in a hidden staging folder *inside* the output folder and moved into
place at the end, entry by entry.  The output folder itself is never removed or renamed, so it
may be a mount point (``docker run -v host:/data``, where removing it fails with "Device or
resource busy") or a folder in a parent the user cannot write to (``/`` in a container).  A
killed generation leaves only the staging folder, which the next run removes.

Every folder ends up mode 0755 and every file 0644, whatever the umask: the dataset is input
for containers that run under another uid (the image's user, ``--user``), which must read it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from bids_uad.errors import OutputNotWritableError, UsageError

#: name prefix of the staging folder (hidden, so BIDS tools skip it)
STAGING_PREFIX = ".bids_uad-synth."
DIR_MODE = 0o755
FILE_MODE = 0o644


def _content(out: Path) -> list[Path]:
    """Entries of ``out`` other than staging folders left by a killed generation."""
    return [p for p in out.iterdir() if not p.name.startswith(STAGING_PREFIX)]


def prepare_output(out: Path, replaceable: Callable[[Path], bool]) -> Path:
    """Check ``out`` may receive a dataset, create it if needed; return a new staging folder in it.

    ``out`` must be missing, empty, or a folder that ``replaceable`` accepts (a previous
    synthetic dataset, which :func:`publish` then replaces).
    """
    if out.exists() and (not out.is_dir() or (_content(out) and not replaceable(out))):
        raise UsageError(f"{out} exists and is not empty (nor a previous synthetic dataset); choose a new folder")
    try:
        if not out.exists():
            out.mkdir(parents=True)
            out.chmod(DIR_MODE)  # a folder we create is readable by all; an existing one keeps its mode
        return Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
    except OSError as exc:
        raise OutputNotWritableError(f"cannot create the dataset folder ({exc.strerror})", out) from exc


def make_world_readable(root: Path) -> None:
    """Folders under ``root`` 0755, files 0644 (``root`` itself included when it is a folder)."""
    for folder, dirs, files in os.walk(root):
        os.chmod(folder, DIR_MODE)
        for name in files:
            os.chmod(os.path.join(folder, name), FILE_MODE)


def publish(staging: Path, out: Path) -> None:
    """Replace the content of ``out`` (a previous dataset, old staging folders) with ``staging``'s."""
    make_world_readable(staging)
    for old in out.iterdir():
        if old == staging:
            continue
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    for entry in staging.iterdir():
        os.replace(entry, out / entry.name)
    staging.rmdir()


def discard(staging: Path) -> None:
    """Remove a staging folder after a failure (best effort)."""
    shutil.rmtree(staging, ignore_errors=True)
