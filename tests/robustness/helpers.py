"""Shared helpers of the robustness tests: run the real CLI, snapshot trees, compare outputs."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: exit codes a participant run may end with: success (every stage exists)
ALLOWED = (0,)
RUN_ID = re.compile(r"\d{8}-\d{6}_[0-9a-f]{8}")


def small_dwi_bids(root: Path, **kwargs) -> Path:
    """``build_small_bids`` without the anatomical images.

    Its T1w/FLAIR are 10x12x10 random noise, which the anatomical stage cannot skull-strip
    or register (the run then crashes in anat.skull_strip); the properties tested here are
    about files, processes and folders, so the diffusion stage alone exercises them.
    """
    from tests.conftest import build_small_bids

    bids = build_small_bids(root, **kwargs)
    for anat in bids.glob("sub-*/ses-*/anat"):
        shutil.rmtree(anat)
    return bids


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(REPO)})
    env.update(extra)
    return env


#: The hand-built dwi-only subjects are 10x12x10 toy volumes that no template registration can
#: align (dwi-only subjects register FA to the template when an MNI space is asked for); these tests
#: are about files, processes and exit codes, so their participant runs ask for dwi space only.
DWI_SPACE_ONLY = ("--output-spaces", "dwi")


def participant_args(args) -> list[str]:
    """``args`` with :data:`DWI_SPACE_ONLY` added to a participant-level run that names no spaces."""
    args = [str(a) for a in args]
    if "participant" in args and "--output-spaces" not in args and "--version" not in args:
        args += list(DWI_SPACE_ONLY)
    return args


def cli_argv(*args) -> list[str]:
    return [sys.executable, "-m", "bids_uad", *participant_args(args)]


def run_cli(*args, timeout: float = 900, prefix: list[str] | None = None, **popen) -> subprocess.CompletedProcess:
    """Run ``bids_uad ARGS`` in a subprocess (optionally behind a wrapper such as unshare)."""
    return subprocess.run((prefix or []) + cli_argv(*args), env=cli_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=popen.pop("cwd", None), **popen)


def assert_allowed(result: subprocess.CompletedProcess) -> None:
    """The run succeeded."""
    assert result.returncode in ALLOWED, f"exit {result.returncode}\n{result.stderr[-3000:]}"


def assert_preprocessed(out: Path, label: str) -> None:
    """A participant run leaves its preprocessed dwi."""
    found = list(out.glob(f"sub-{label}/**/dwi/*_desc-preproc_dwi.nii.gz"))
    assert found, f"no preprocessed dwi for sub-{label} in {out}"


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (itself included): type, mode, mtime and, for files, content hash.

    Folder mtimes change when anything is created in them, even a temporary file that was
    removed again, so equal snapshots mean nothing was written at all.
    """
    out: dict[str, tuple] = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[rel] = ("link", os.readlink(path), st.st_mtime_ns)
        elif path.is_dir():
            out[rel] = ("dir", st.st_mode, st.st_mtime_ns)
        else:
            out[rel] = ("file", st.st_mode, st.st_mtime_ns, st.st_size,
                        hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def snapshot_diff(before: dict, after: dict) -> list[str]:
    lines = [f"added: {k}" for k in sorted(set(after) - set(before))]
    lines += [f"removed: {k}" for k in sorted(set(before) - set(after))]
    lines += [f"changed: {k} {before[k]} -> {after[k]}" for k in sorted(set(before) & set(after))
              if before[k] != after[k]]
    return lines


def chmod_tree(root: Path, writable: bool) -> None:
    """``chmod -R a-w`` (or back to u+w)."""
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        path.chmod((mode | 0o200) if writable else (mode & ~0o222))


def unshare_available() -> bool:
    """True when a private mount namespace with a read-only bind mount can be made here."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                            "mount --bind /tmp /tmp && mount -o remount,bind,ro /tmp && ! touch /tmp/.ro_probe"],
                           capture_output=True, text=True)
    return probe.returncode == 0


def read_only_prefix(*folders: Path, offline: bool = False) -> list[str]:
    """A command prefix running the rest in a mount namespace where ``folders`` are read-only.

    ``offline`` adds a new network namespace (loopback only, down): no network at all.

    The shell checks that writing really fails there before exec'ing the command (exit 99
    otherwise), so a test using it cannot pass vacuously.
    """
    script = ['for d in "$@"; do [ "$d" = -- ] && break;',
              'mount --bind "$d" "$d" && mount -o remount,bind,ro "$d" || exit 98;',
              'if touch "$d/.ro_probe" 2>/dev/null; then echo "$d still writable" >&2; exit 99; fi;',
              'done; while [ "$1" != -- ]; do shift; done; shift; exec "$@"']
    return ["unshare", "--mount", *(["--net"] if offline else []), "--propagation", "private", "--",
            "sh", "-c", " ".join(script), "sh",
            *[str(f) for f in folders], "--"]


def output_files(root: Path) -> dict[str, Path]:
    """Files of an output folder by normalized relative path (run ids replaced by ``*``)."""
    return {RUN_ID.sub("*", p.relative_to(root).as_posix()): p for p in sorted(root.rglob("*")) if p.is_file()}


def leftover_temporaries(root: Path) -> list[str]:
    """Hidden files left by interrupted atomic writes (``.name.XXXX.ext``)."""
    return [p.relative_to(root).as_posix() for p in root.rglob(".*") if p.is_file()]


def assert_valid_json_and_tsv(root: Path) -> None:
    """Every JSON file parses and every TSV has one column count (no torn concurrent writes)."""
    for path in root.rglob("*.json"):
        json.loads(path.read_text())
    for path in root.rglob("*.tsv"):
        lines = [line for line in path.read_text().split("\n") if line]
        assert lines, f"{path} is empty"
        widths = {line.count("\t") for line in lines}
        assert len(widths) == 1, f"{path}: rows with different column counts"


#: sidecar keys that record how long something took or when: they differ between equal runs
VOLATILE_KEYS = {"seconds", "elapsed", "elapsed_seconds", "ElapsedTime", "Duration", "DateTime", "timestamp"}


def _stable(value):
    """JSON content without the volatile keys (at any depth)."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def compare_outputs(a: Path, b: Path) -> list[str]:
    """Differences between two output folders, ignoring logs and what legitimately varies."""
    import nibabel as nib
    import numpy as np

    fa = {k: v for k, v in output_files(a).items() if not k.startswith("logs/")}
    fb = {k: v for k, v in output_files(b).items() if not k.startswith("logs/")}
    problems = [f"only in first: {k}" for k in sorted(set(fa) - set(fb))]
    problems += [f"only in second: {k}" for k in sorted(set(fb) - set(fa))]
    for key in sorted(set(fa) & set(fb)):
        pa, pb = fa[key], fb[key]
        if key.endswith((".nii.gz", ".nii")):
            ia, ib = nib.load(str(pa)), nib.load(str(pb))
            if ia.shape != ib.shape or not np.allclose(ia.affine, ib.affine) or \
                    not np.array_equal(np.asanyarray(ia.dataobj), np.asanyarray(ib.dataobj)):
                problems.append(f"image differs: {key}")
        elif key.endswith(".json"):
            ja, jb = _stable(json.loads(pa.read_text())), _stable(json.loads(pb.read_text()))
            if key == "dataset_description.json":
                ja.pop("SourceDatasets", None), jb.pop("SourceDatasets", None)
            if ja != jb:
                problems.append(f"JSON differs: {key}")
        elif key.endswith((".svg", ".png", ".html")):
            continue  # figures and reports may embed times and ids; their presence is compared
        elif pa.read_bytes() != pb.read_bytes():
            problems.append(f"content differs: {key}")
    return problems


def nipype_results(work: Path) -> dict[str, int]:
    """Finished nipype nodes in a work folder: result file -> mtime (ns)."""
    return {p.relative_to(work).as_posix(): p.stat().st_mtime_ns for p in work.rglob("result_*.pklz")}


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def wait_for(predicate, proc: subprocess.Popen, timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it holds (True) or the process ended / time ran out (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return predicate()
        time.sleep(interval)
    return False
