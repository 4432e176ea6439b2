"""Shared benchmark helper: wall time and peak resident memory of a stage.

``with measure("sdc") as m: ...`` then ``m.wall_s`` and ``m.peak_rss_mb``.  Peak memory is
sampled from ``/proc/self/statm`` by a background thread (every 20 ms) because
``resource.getrusage`` only reports the process-wide peak since start; both are recorded
(``ru_maxrss_mb`` is the process peak so far, an upper bound for the stage).
"""
from __future__ import annotations

import json
import os
import resource
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss_mb() -> float:
    """Resident set size of this process now (MB); falls back to getrusage's peak."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class Measurement:
    name: str
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0
    start_rss_mb: float = 0.0
    ru_maxrss_mb: float = 0.0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"stage": self.name, "wall_s": round(self.wall_s, 2), "peak_rss_mb": round(self.peak_rss_mb, 1),
                "start_rss_mb": round(self.start_rss_mb, 1), **self.extra}


def tree_memory_mb(root: int | None = None) -> float:
    """Memory of process ``root`` (default: this one) and all its descendants now (MB): the sum
    of their proportional set sizes (``Pss`` of ``/proc/<pid>/smaps_rollup``: pages shared by
    several processes, as a fork server's workers share their parent's, are split between
    them), or of their RSS where the kernel has no ``smaps_rollup``."""
    root = os.getpid() if root is None else root
    total = 0.0
    for pid in _tree_cpu_s(root):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as handle:
                total += next(int(line.split()[1]) for line in handle if line.startswith("Pss:")) / 1024.0
        except (OSError, StopIteration, ValueError):
            try:
                with open(f"/proc/{pid}/statm") as handle:
                    total += int(handle.read().split()[1]) * _PAGE / 2**20
            except OSError:
                continue
    return total


@contextmanager
def measure(name: str, interval: float = 0.02, tree: bool = False):
    """Time a block and sample its peak RSS in a background thread; ``tree``: the memory of this
    process and its descendants (:func:`tree_memory_mb`, sampled every 0.2 s at least) instead."""
    now = tree_memory_mb if tree else current_rss_mb
    interval = max(interval, 0.2) if tree else interval
    m = Measurement(name, start_rss_mb=now())
    peak = [m.start_rss_mb]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], now())
            stop.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    try:
        yield m
    finally:
        m.wall_s = time.perf_counter() - t0
        stop.set()
        thread.join()
        m.peak_rss_mb = max(peak[0], now())
        m.ru_maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@contextmanager
def scratch_folder(workdir: Path | None, prefix: str):
    """The benchmark's folder: ``workdir`` when given (kept), else a temporary folder that is removed
    at the end, also after an error (a demo-sized run leaves 1-3 GB)."""
    import shutil
    import tempfile

    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir
        return
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """Rows of dicts as a Markdown table."""
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _tree_cpu_s(root: int) -> dict[int, float]:
    """CPU seconds (user + system) of ``root`` and each of its descendants now, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(entry)] = int(fields[1])
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    keep = {root}
    changed = True
    while changed:
        changed = False
        for pid, ppid in parent.items():
            if ppid in keep and pid not in keep:
                keep.add(pid)
                changed = True
    return {pid: cpu[pid] for pid in keep if pid in cpu}


@contextmanager
def tree_cpu(interval: float = 0.5):
    """CPU seconds of this process and all its descendants during a block (``m.cpu_s``).

    Worker processes of a fork server are grandchildren that this process never waits for,
    so ``getrusage(RUSAGE_CHILDREN)`` misses them; they are sampled from /proc instead (a
    process that ends between two samples loses at most its last ``interval`` of CPU).
    """
    me = os.getpid()
    start = _tree_cpu_s(me)
    last: dict[int, float] = dict(start)
    stop = threading.Event()

    def sample():
        while not stop.wait(interval):
            last.update(_tree_cpu_s(me))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    m = Measurement("cpu")
    try:
        yield m
    finally:
        stop.set()
        thread.join()
        last.update(_tree_cpu_s(me))
        m.extra["cpu_s"] = sum(v - start.get(pid, 0.0) for pid, v in last.items())


def write_results(stem: str, result: dict, markdown: str) -> Path:
    """Keep a benchmark's figures: ``results/<stem>.json`` (the JSON line) and ``<stem>.md``."""
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    (results / f"{stem}.md").write_text(markdown)
    path = results / f"{stem}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def publish(stem: str, result: dict, markdown: str) -> int:
    """Keep the figures (:func:`write_results`) and print the benchmark's last line, its JSON;
    the exit status 0 for ``main``."""
    write_results(stem, result, markdown)
    print(json.dumps(result))
    return 0
