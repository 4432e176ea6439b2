"""The constraints of the container, without a container: what the image promises holds for the code.

``docker run --read-only --network none -v data:/data:ro`` means: a read-only input, a
read-only root filesystem (cwd and HOME not writable unless HOME moves to /tmp), no
network, and TemplateFlow's folder read-only.  Emulated here with a private mount and
network namespace (``unshare``) and HOME/cache variables pointing below a regular file.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.robustness.helpers import (
    assert_allowed,
    assert_preprocessed,
    cli_argv,
    cli_env,
    read_only_prefix,
    small_dwi_bids,
    snapshot,
    snapshot_diff,
    unshare_available,
)

pytestmark = [pytest.mark.timeout(900),
              pytest.mark.skipif(not unshare_available(), reason="no unshare/mount namespaces here")]


NET_PROBE = """
import socket
try:
    socket.create_connection(("1.1.1.1", 443), timeout=2)
except OSError:
    raise SystemExit(0)
raise SystemExit(1)
"""


def test_the_emulation_is_offline(tmp_path):
    result = subprocess.run(read_only_prefix(tmp_path, offline=True) + [sys.executable, "-c", NET_PROBE],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_offline_read_only_run_with_unwritable_home(tmp_path):
    bids = small_dwi_bids(tmp_path / "bids", n_controls=3, n_patients=1)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    templates = tmp_path / "templateflow"
    templates.mkdir()
    blocker = tmp_path / "blocker"
    blocker.write_text("HOME and the caches cannot be created below a regular file")
    env = cli_env(HOME=str(blocker / "home"), XDG_CACHE_HOME=str(blocker / "cache"),
                  MPLCONFIGDIR=str(blocker / "mpl"), TORCH_HOME=str(blocker / "torch"),
                  NUMBA_CACHE_DIR=str(blocker / "numba"), TEMPLATEFLOW_HOME=str(templates),
                  TEMPLATEFLOW_AUTOUPDATE="0")
    before = {p: snapshot(p) for p in (bids, cwd, templates)}
    out, work = tmp_path / "out", tmp_path / "work"
    result = subprocess.run(read_only_prefix(bids, cwd, templates, offline=True)
                            + cli_argv(bids, out, "participant", "--participant-label", "ctrl01", "-w", work),
                            env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert result.returncode not in (98, 99), f"namespace not set up: {result.stderr}"
    assert_allowed(result)
    for path, snap in before.items():
        assert snapshot_diff(snap, snapshot(path)) == [], f"{path} was written to"
    assert blocker.read_text().startswith("HOME")
    assert_preprocessed(out, "ctrl01")
