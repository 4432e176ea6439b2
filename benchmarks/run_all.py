"""Whole-pipeline benchmark: one subject through the participant level, per-stage figures.

``python benchmarks/run_all.py [--preset paper|tiny]`` (``make bench``)

``--preset small`` instead runs the demo's dataset through the demo's three levels
(participant, group, participant ``--model``; :func:`run_levels`) and reports per level: wall,
CPU of the whole process tree, the nodes of its nipype graph, their summed own work and the
scheduling overhead (wall − work / processes), read from the run log's closing line.

One subject (``tiny``/``paper``):

1. generates a synthetic dataset (3 controls + 1 patient) at the preset's geometry;
2. trains a *timing-only* model of each kind at the reference architecture on the controls'
   artefact-free series (1 epoch; its accuracy means nothing — the models benchmark reports
   accuracy), so that inference runs at its real size;
3. runs ``bids_uad participant --model`` for the patient's baseline session in a new process, as
   a user runs it, from an empty work folder and as the demo runs on 2 cores (``--nprocs 2
   --omp-nthreads 1``: MultiProc, nodes in parallel; ``--nprocs 1 --threads 2``: one process,
   nodes one after the other), sampling the memory (summed proportional set size) and CPU time
   of its whole process tree, and reads each node's own time from the run log, summed into
   stages (dwi preprocessing, anatomy, anomaly inference, reports);
4. prints a table, gathers the other benchmarks' last results from ``benchmarks/results/``,
   writes ``benchmarks/results/run_all_<preset>.json`` and ``.md``, and prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _measure import markdown_table, measure, publish, scratch_folder, tree_cpu  # noqa: E402

from bids_uad.bids.gradients import B0_THRESHOLD  # noqa: E402
from bids_uad.synthetic.lesion_types import DEFAULT_GENERATOR as DEFAULT_LESIONS, LESION_GENERATORS  # noqa: E402

STAGE_PREFIXES = (("dwi_", "dwi_preproc"), ("anat_", "anat"), ("anomaly_", "anomaly"),
                  ("longitudinal_", "longitudinal"))


def train_timing_models(bids: Path, out: Path, models: list[str], threads: int) -> dict:
    """Reference-architecture models trained for one epoch on the controls' clean series."""
    import nibabel as nib
    import numpy as np

    from bids_uad.bids.gradients import load_gradients
    from bids_uad.training.fit import train_from_dwi
    from bids_uad.models.settings import preset
    from bids_uad.workflows.group import model_settings_for  # noqa: F401 (grid rule documented there)

    truth = bids / "derivatives" / "synthetic-truth"
    dwis, bvals, bvecs, masks, subjects = [], [], [], [], []
    for sub in sorted(p.name for p in truth.glob("sub-ctrl*")):
        d = truth / sub / "ses-pre" / "dwi"
        stem = f"{sub}_ses-pre_space-dwi_desc-clean_dwi"
        img = nib.load(str(d / f"{stem}.nii.gz"))
        table = load_gradients(d / f"{stem}.bval", d / f"{stem}.bvec")
        dwis.append(np.asarray(img.dataobj, np.float32))
        bvals.append(table.bvals)
        bvecs.append(table.bvecs)
        masks.append(np.asarray(nib.load(str(d / f"{sub}_ses-pre_space-dwi_desc-brain_mask.nii.gz")).dataobj) > 0)
        subjects.append(sub.removeprefix("sub-"))
    timings = {}
    shape = dwis[0].shape[:3]
    for name in models:
        base = preset("paper", name)
        div = 2 ** base.model.depth
        grid = tuple(int(-(-s // div) * div) for s in shape)
        settings = replace(base, model=replace(base.model, grid=grid, n_channels=int((bvals[0] > B0_THRESHOLD).sum())),
                           training=replace(base.training, epochs=1, n_folds=2, steps_per_epoch=1,
                                            threads=threads, progress=False))
        with measure(f"train_{name}") as m:
            bundle = train_from_dwi(settings, dwis, bvals, bvecs, masks, subjects)
            bundle.save(out)
        timings[name] = m.as_dict()
    return timings


#: issue #21's targets for one subject through the participant level, 2 cores
TARGETS = {"paper": {"wall_s": 90, "memory_mb": 3072}}

#: the demo's levels as run_levels names them (in demo_commands' order)
LEVELS = ("participant", "group", "participant --model")


def run_levels(args) -> int:
    """The demo's dataset through its three levels; per level wall, CPU, nodes, work, overhead."""
    import shutil

    from bids_uad.cli.demo import demo_commands
    from bids_uad.cli.run import main as bids_uad_main
    from bids_uad.synthetic import generate_dataset
    from bids_uad.workflows.execution import RunSummary

    root = args.workdir
    bids, deriv, work = root / "bids", root / "derivatives" / "bids_uad", root / "work"
    print(f"benchmark folder: {root}", flush=True)
    with measure("generate") as gen:
        if not (bids / "dataset_description.json").exists():
            generate_dataset(bids, preset=args.preset, seed=args.seed, lesion_generator=args.lesions)
        elif f"lesion generator {args.lesions}" not in (bids / "dataset_description.json").read_text():
            raise SystemExit(f"{bids} holds another lesion generator's dataset; use a new --workdir")
    for folder in (deriv, work):  # every level from scratch (the dataset is kept)
        shutil.rmtree(folder, ignore_errors=True)
    rows = []
    for level, (title, argv) in zip(LEVELS, demo_commands(bids, deriv, work, args.seed, args.nprocs)):
        print(f"\n=== {title} ===\nbids_uad {' '.join(argv)}", flush=True)
        logs_before = set((deriv / "logs").glob("run-*.log"))
        load_start = os.getloadavg()[0]
        with measure(level) as m, tree_cpu() as cpu:
            code = bids_uad_main(argv)
        if code != 0:
            print(f"{level} failed with exit code {code}", file=sys.stderr)
            return code
        new_logs = sorted(set((deriv / "logs").glob("run-*.log")) - logs_before)
        summary = RunSummary.parse(new_logs[-1].read_text()) if new_logs else None
        row = {"level": level, "wall_s": round(m.wall_s, 1), "cpu_s": round(cpu.extra["cpu_s"], 1),
               "nodes": summary.nodes if summary else 0, "reused": summary.reused if summary else 0,
               "work_s": round(summary.work_s, 1) if summary else None,
               "graph_wall_s": round(summary.wall_s, 1) if summary else None,
               "overhead_s": round(summary.overhead_s, 1) if summary else None,
               "overhead_pct_of_level": round(100 * summary.overhead_s / m.wall_s, 1) if summary else None,
               "scheduler_cpu_s": round(summary.scheduler_cpu_s, 1) if summary else None,
               "load_1min_start": round(load_start, 2), "load_1min_end": round(os.getloadavg()[0], 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    stem = (f"run_all_{args.preset}" + ("" if args.lesions == DEFAULT_LESIONS else f"_{args.lesions}")
            + ("" if args.seed == 0 else f"_seed{args.seed}"))
    path = HERE / "results" / f"{stem}.json"
    previous = json.loads(path.read_text()) if path.is_file() else None
    participant = rows[0]
    result = {
        "benchmark": "run_all", "preset": args.preset, "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "nprocs": args.nprocs, "lesions": args.lesions, "seed": args.seed, "levels": rows,
        "detection": _detection_tables(deriv / "group"), "total_wall_s": round(sum(r["wall_s"] for r in rows), 1),
        "total_cpu_s": round(sum(r["cpu_s"] for r in rows), 1), "generate_s": round(gen.wall_s, 1),
        "targets": {"participant_overhead_pct<=10": (participant["overhead_pct_of_level"] or 0) <= 10},
        "previous": {k: previous.get(k) for k in ("date", "levels", "total_wall_s")} if previous else None,
    }
    columns = ["level", "wall_s", "cpu_s", "nodes", "work_s", "overhead_s", "overhead_pct_of_level",
               "scheduler_cpu_s", "load_1min_start", "load_1min_end"]
    table = markdown_table(rows, columns)
    print(f"\nthe demo's levels ({args.preset} dataset, {args.nprocs} processes):\n{table}")
    if previous:
        print(f"\nprevious run ({previous.get('date')}):\n{markdown_table(previous.get('levels', []), columns)}")
    detection = _detection_markdown(result["detection"])
    print(f"\n{detection}")
    return publish(stem, result,
                   f"# The demo's three levels, {args.preset} dataset, {args.lesions} lesions, seed {args.seed} "
                   f"({result['date']}, "
                   f"{result['machine']})\n\n"
                   f"{args.nprocs} processes; overhead = graph wall − Σ node work / processes (run log's closing "
                   f"line); cpu_s = the whole process tree; load = 1-min load average\n\n{table}\n\n{detection}\n")


def _detection_tables(group_dir: Path) -> dict:
    """The group level's evaluation (``detection_summary.tsv``, ``detection_groups.tsv``) as rows."""
    from bids_uad.bids.derivatives import read_tsv

    tables = {}
    for key in ("summary", "groups"):
        path = group_dir / f"detection_{key}.tsv"
        tables[key] = read_tsv(path) if path.is_file() else []
    return tables


def _three(value):
    """A TSV cell as a number with 3 decimals when it is one."""
    try:
        return f"{float(value):.3f}"
    except (TypeError, ValueError):
        return value


def _detection_markdown(tables: dict) -> str:
    """AUPRC per detector, overall and per lesion type (the group level's evaluation)."""
    summary = tables.get("summary") or []
    if not summary:
        return "(no group evaluation: no lesion masks)"
    types = sorted({r["group"] for r in tables.get("groups") or [] if r.get("grouping") == "type"})
    rows = []
    for r in summary:
        row = {"detector": r["detector"], "AUPRC": r.get("auprc"), "AUROC": r.get("auroc"),
               "Dice (written map)": r.get("dice_calibrated"), "held-out control FPR": r.get("heldout_control_fpr")}
        for t in types:
            row[t] = next((g.get("auprc") for g in tables["groups"]
                           if g["detector"] == r["detector"] and g["grouping"] == "type" and g["group"] == t), None)
        rows.append({k: _three(v) for k, v in row.items()})
    return ("Detection (group level, every patient's lesion voxels against the analysis mask's others; "
            "AUPRC per lesion type):\n\n" + markdown_table(rows, list(rows[0])))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["tiny", "paper", "small"], default="paper",
                        help="tiny/paper: one subject through the participant level; small: the demo's "
                             "dataset through its three levels")
    parser.add_argument("--nprocs", type=int, default=2, help="--nprocs of the run(s) (default 2, as make demo)")
    parser.add_argument("--threads", type=int, default=1,
                        help="--preset tiny/paper: --omp-nthreads of the run (default 1, as make demo; "
                             "--nprocs 1 --threads 2: one process, nodes one after the other)")
    parser.add_argument("--workdir", type=Path, help="keep intermediate files here (default: a temporary folder, removed at the end)")
    parser.add_argument("--models", nargs="+", default=["dae", "recdisc"])
    parser.add_argument("--lesions", default=DEFAULT_LESIONS, choices=LESION_GENERATORS,
                        help="--preset small: the patients' lesion generator (bids_uad.synthetic.lesion_types; "
                             "default glioma, the demo's); results go to run_all_small_<lesions>.* when not the default")
    parser.add_argument("--seed", type=int, default=0,
                        help="--preset small: the dataset's and the levels' seed (results: ..._seed<N>.* when not 0)")
    args = parser.parse_args(argv)
    with scratch_folder(args.workdir, "bids_uad_bench_") as root:
        args.workdir = root
        if args.preset == "small":
            os.environ.setdefault("OMP_NUM_THREADS", "1")  # as make demo (Makefile)
            return run_levels(args)
        return run_subject(args)


_NODE_LINE = re.compile(r"^(\S+ \S+) bids_uad\.workflows \[INFO\] \[\d+/\d+\] (\S+) \(([\d.]+) s\)$")
_REPORT_LINE = re.compile(r"^(\S+ \S+) bids_uad\.workflows \[INFO\] report: ")


def _log_time(stamp: str) -> float:
    from datetime import datetime

    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def run_cli_measured(argv: list[str], env: dict, interval: float = 0.5) -> dict:
    """``bids_uad ARGV`` in a new process, as a user runs it; its wall time, the CPU time and the
    peak memory of its process tree (fork server and workers included), and the tree's memory
    over time ((unix time, MB) samples every ``interval`` s)."""
    import subprocess

    from _measure import tree_memory_mb

    t0 = time.perf_counter()
    samples: list[tuple[float, float]] = []
    with tree_cpu() as cpu:  # the new process and its workers are this one's descendants
        proc = subprocess.Popen([sys.executable, "-m", "bids_uad", *argv], env=env)
        while proc.poll() is None:
            samples.append((time.time(), tree_memory_mb(proc.pid)))
            time.sleep(interval)
    return {"code": proc.returncode, "wall_s": time.perf_counter() - t0, "cpu_s": cpu.extra["cpu_s"],
            "peak_memory_mb": max((m for _, m in samples), default=0.0), "samples": samples}


def node_records(log_text: str, samples: list[tuple[float, float]]) -> list[dict]:
    """Per node of a run log: its stage, own time and the process tree's peak memory while it ran."""
    records = []
    for line in log_text.splitlines():
        match = _NODE_LINE.match(line)
        if not match:
            continue
        end, name, seconds = _log_time(match.group(1)), match.group(2), float(match.group(3))
        during = [m for t, m in samples if end - seconds - 0.5 <= t <= end + 0.5]
        stage = next((st for prefix, st in STAGE_PREFIXES if name.startswith(prefix)), "other")
        records.append({"node": name, "stage": stage, "wall_s": seconds,
                        "peak_memory_mb": round(max(during), 1) if during else None})
    return records


def run_subject(args) -> int:
    """--preset tiny/paper: one subject through the participant level (``args.workdir``)."""
    import shutil

    from bids_uad.synthetic import generate_dataset
    from bids_uad.workflows.execution import RunSummary

    root = args.workdir
    bids, out, models_dir = root / "bids", root / "out", root / "models"
    print(f"benchmark folder: {root}", flush=True)
    with measure("generate") as gen:
        if not (bids / "dataset_description.json").exists():
            generate_dataset(bids, preset=args.preset, n_controls=3, n_patients=1, seed=0,
                             no_reverse_pe_fraction=0.0, progress=True)
    with measure("train_timing_models"):
        train_info = train_timing_models(bids, models_dir, args.models, max(args.threads, args.nprocs))
    for folder in (out, root / "work"):  # the participant level from scratch (the dataset and models are kept)
        shutil.rmtree(folder, ignore_errors=True)

    argv_run = [str(bids), str(out), "participant", "--participant-label", "pat01", "--session-label", "pre",
                "--model", str(models_dir), "-w", str(root / "work"), "--nprocs", str(args.nprocs),
                "--omp-nthreads", str(args.threads), "--lesion-masks", str(bids / "derivatives" / "synthetic-truth")]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(HERE.parent)}
    time.sleep(30)  # the load average of the training above settles a little
    load_start = os.getloadavg()[0]
    run = run_cli_measured(argv_run, env)
    if run["code"] != 0:
        print(f"participant level failed with exit code {run['code']}", file=sys.stderr)
        return run["code"]
    log_text = sorted((out / "logs").glob("run-*.log"))[-1].read_text()
    summary = RunSummary.parse(log_text)
    records = node_records(log_text, run["samples"])

    stages: dict[str, dict] = {}
    for rec in records:
        st = stages.setdefault(rec["stage"], {"work_s": 0.0, "peak_memory_mb": 0.0, "nodes": 0})
        st["work_s"] += rec["wall_s"]
        st["peak_memory_mb"] = max(st["peak_memory_mb"], rec["peak_memory_mb"] or 0.0)
        st["nodes"] += 1
    summary_at = next((_log_time(line[:23]) for line in log_text.splitlines() if " nodes (" in line
                       and "bids_uad_participant_wf:" in line), None)
    report_at = next((_log_time(m.group(1)) for m in map(_REPORT_LINE.match, log_text.splitlines()) if m), None)
    if summary_at is not None and report_at is not None:
        stages["reports"] = {"work_s": report_at - summary_at, "peak_memory_mb": max(
            (m for t, m in run["samples"] if summary_at <= t <= report_at), default=0.0), "nodes": 0}
    for st in stages.values():
        st["work_s"] = round(st["work_s"], 2)
        st["peak_memory_mb"] = round(st["peak_memory_mb"], 1)
    slowest = sorted(records, key=lambda r: -r["wall_s"])[:8]

    import nibabel as nib

    dwi_shape = nib.load(str(next((bids / "sub-pat01" / "ses-pre" / "dwi").glob("*_dwi.nii.gz")))).shape
    t1_shape = nib.load(str(next((bids / "sub-pat01" / "ses-pre" / "anat").glob("*_T1w.nii.gz")))).shape
    others = {}
    for path in sorted((HERE / "results").glob("*.json")):
        if path.name.startswith("run_all"):
            continue
        try:
            others[path.stem] = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
    limits = TARGETS.get(args.preset, {})
    wall, peak = run["wall_s"], run["peak_memory_mb"]
    result = {
        "benchmark": "run_all", "preset": args.preset, "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "load_1min_start": round(load_start, 2), "load_1min_end": round(os.getloadavg()[0], 2),
        "nprocs": args.nprocs, "threads": args.threads, "dwi_shape": list(dwi_shape), "t1w_shape": list(t1_shape),
        "models": args.models, "model_note": "timing-only models (reference architecture, 1 epoch)",
        "participant_wall_s": round(wall, 2), "participant_cpu_s": round(run["cpu_s"], 1),
        "participant_peak_memory_mb": round(peak, 1),
        "memory_note": "the bids_uad process tree (main process, fork server, workers): peak of its summed "
                       "proportional set size, sampled every 0.5 s",
        "graph": None if summary is None else {
            "nodes": summary.nodes, "work_s": round(summary.work_s, 1), "wall_s": round(summary.wall_s, 1),
            "overhead_s": round(summary.overhead_s, 1), "processes": summary.processes},
        "targets": {f"participant_wall_s<={limits['wall_s']}": wall <= limits["wall_s"],
                    f"participant_peak_memory_mb<={limits['memory_mb']}": peak <= limits["memory_mb"]}
        if limits else {},
        "stages": stages,
        "slowest_nodes": slowest,
        "generate_s": round(gen.wall_s, 1), "train_timing_models": train_info,
        "other_benchmarks": {name: {k: v for k, v in data.items() if not isinstance(v, (list, dict))}
                             for name, data in others.items()},
    }
    rows = [{"stage": k, **v} for k, v in stages.items()]
    table = markdown_table(rows, ["stage", "work_s", "peak_memory_mb", "nodes"])
    how = (f"{args.nprocs} processes x {args.threads} thread(s)" if args.nprocs > 1
           else f"one process (Linear), {args.threads} thread(s)")
    graph = ("" if summary is None else f"; graph: {summary.nodes} nodes, work {summary.work_s:.1f} s, "
             f"wall {summary.wall_s:.1f} s")
    headline = (f"{how}: {wall:.1f} s wall, {run['cpu_s']:.0f} s CPU, peak memory {peak:.0f} MB{graph}; "
                f"load {load_start:.2f} -> {os.getloadavg()[0]:.2f}")
    print(f"\nparticipant level, one {args.preset} subject ({dwi_shape} dwi, {t1_shape} T1w), {headline}\n{table}")
    return publish(f"run_all_{args.preset}", result,
                   f"# Whole participant level, {args.preset} preset ({result['date']}, {result['machine']})\n\n"
                   f"dwi {dwi_shape}, T1w {t1_shape}, {headline}\n\n"
                   f"`bids_uad participant` in its own process, as a user runs it.  work_s: the nodes' own time "
                   f"summed per stage (nodes of different stages run at the same time on several processes); "
                   f"peak_memory_mb: the whole process tree while the stage's nodes ran; nodes: those run in worker "
                   f"processes (the derivative sinks run in the main process, untimed); reports: built after "
                   f"the graph, in the main process\n\n{table}\n")


if __name__ == "__main__":
    raise SystemExit(main())
