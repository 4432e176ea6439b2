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
3. runs ``bids_uad participant --model`` for the patient's baseline session in-process with the
   Linear plugin, timing every nipype node and sampling the process's resident memory, and
   sums nodes into stages (dwi preprocessing, anatomy, anomaly inference, reports);
4. prints a table, gathers the other benchmarks' last results from ``benchmarks/results/``,
   writes ``benchmarks/results/run_all_<preset>.json`` and ``.md``, and prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _measure import current_rss_mb, markdown_table, measure, publish, scratch_folder, tree_cpu  # noqa: E402

from bids_uad.bids.gradients import B0_THRESHOLD  # noqa: E402
from bids_uad.synthetic.lesion_types import DEFAULT_GENERATOR as DEFAULT_LESIONS, LESION_GENERATORS  # noqa: E402

STAGE_PREFIXES = (("dwi_", "dwi_preproc"), ("anat_", "anat"), ("anomaly_", "anomaly"),
                  ("longitudinal_", "longitudinal"))


_SAMPLER: dict = {"peak": 0.0, "stop": None, "open": {}}


class NodeMeter:
    """Stands in for the pipeline's progress callback: wall time and peak RSS per node.

    nipype pickles its plugin arguments with the nodes, so the callback keeps no thread
    objects itself (they live in the module-level ``_SAMPLER``).
    """

    records: list[dict] = []

    def __init__(self, workflow):
        self.workflow_name = workflow.name

    def __call__(self, node, status):
        if node.name.startswith("_"):
            return
        if status == "start":
            _SAMPLER["peak"] = current_rss_mb()
            _SAMPLER["open"][node.fullname] = time.perf_counter()
            _start_sampler()
            return
        t0 = _SAMPLER["open"].pop(node.fullname, time.perf_counter())
        if _SAMPLER["stop"] is not None:
            _SAMPLER["stop"].set()
        name = node.fullname.removeprefix("bids_uad_participant_wf.")
        stage = next((s for p, s in STAGE_PREFIXES if name.startswith(p)), "other")
        NodeMeter.records.append({"node": name, "stage": stage, "wall_s": time.perf_counter() - t0,
                                  "peak_rss_mb": max(_SAMPLER["peak"], current_rss_mb()), "status": status})


def _start_sampler() -> None:
    stop = threading.Event()
    _SAMPLER["stop"] = stop

    def run():
        while not stop.wait(0.05):
            _SAMPLER["peak"] = max(_SAMPLER["peak"], current_rss_mb())

    threading.Thread(target=run, daemon=True).start()


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
    parser.add_argument("--nprocs", type=int, default=2, help="--nprocs of the levels (--preset small)")
    parser.add_argument("--threads", type=int, default=2, help="--omp-nthreads of the run (default 2)")
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


def run_subject(args) -> int:
    """--preset tiny/paper: one subject through the participant level (``args.workdir``)."""
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import bids_uad.cli.levels as levels
    import bids_uad.workflows.execution as execution
    from bids_uad.cli.run import main as bids_uad_main
    from bids_uad.synthetic import generate_dataset

    root = args.workdir
    bids, out, models_dir = root / "bids", root / "out", root / "models"
    print(f"benchmark folder: {root}", flush=True)
    with measure("generate") as gen:
        if not (bids / "dataset_description.json").exists():
            generate_dataset(bids, preset=args.preset, n_controls=3, n_patients=1, seed=0,
                             no_reverse_pe_fraction=0.0, progress=True)
    with measure("train_timing_models") as train:
        train_info = train_timing_models(bids, models_dir, args.models, args.threads)

    NodeMeter.records = []
    execution.NodeProgress = NodeMeter  # per-node figures instead of progress lines
    reports_meter = {}
    real_reports = levels._build_participant_reports

    def timed_reports(*a, **k):
        with measure("reports") as m:
            real_reports(*a, **k)
        reports_meter["m"] = m

    levels._build_participant_reports = timed_reports
    argv_run = [str(bids), str(out), "participant", "--participant-label", "pat01", "--session-label", "pre",
                "--model", str(models_dir), "-w", str(root / "work"), "--omp-nthreads", str(args.threads),
                "--lesion-masks", str(bids / "derivatives" / "synthetic-truth")]
    with measure("participant") as part:
        code = bids_uad_main(argv_run)
    if code != 0:
        print(f"participant level failed with exit code {code}", file=sys.stderr)
        return code

    stages: dict[str, dict] = {}
    for rec in NodeMeter.records:
        st = stages.setdefault(rec["stage"], {"wall_s": 0.0, "peak_rss_mb": 0.0, "nodes": 0})
        st["wall_s"] += rec["wall_s"]
        st["peak_rss_mb"] = max(st["peak_rss_mb"], rec["peak_rss_mb"])
        st["nodes"] += 1
    if "m" in reports_meter:
        stages["reports"] = {"wall_s": reports_meter["m"].wall_s, "peak_rss_mb": reports_meter["m"].peak_rss_mb,
                             "nodes": 0}
    accounted = sum(s["wall_s"] for s in stages.values())
    stages["overhead"] = {"wall_s": max(part.wall_s - accounted, 0.0), "peak_rss_mb": part.peak_rss_mb, "nodes": 0}
    for st in stages.values():
        st["wall_s"] = round(st["wall_s"], 2)
        st["peak_rss_mb"] = round(st["peak_rss_mb"], 1)
    slowest = sorted(NodeMeter.records, key=lambda r: -r["wall_s"])[:8]

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
    result = {
        "benchmark": "run_all", "preset": args.preset, "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "threads": args.threads, "dwi_shape": list(dwi_shape), "t1w_shape": list(t1_shape),
        "models": args.models, "model_note": "timing-only models (reference architecture, 1 epoch)",
        "participant_wall_s": round(part.wall_s, 2), "participant_peak_rss_mb": round(part.peak_rss_mb, 1),
        "targets": {"participant_wall_s<=300": part.wall_s <= 300, "participant_peak_rss_mb<=6144":
                    part.peak_rss_mb <= 6144},
        "stages": stages,
        "slowest_nodes": [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()} for r in slowest],
        "generate_s": round(gen.wall_s, 1), "train_timing_models": train_info,
        "other_benchmarks": {name: {k: v for k, v in data.items() if not isinstance(v, (list, dict))}
                             for name, data in others.items()},
    }
    rows = [{"stage": k, **v} for k, v in stages.items()]
    table = markdown_table(rows, ["stage", "wall_s", "peak_rss_mb", "nodes"])
    print(f"\nparticipant level, one {args.preset} subject ({dwi_shape} dwi, {t1_shape} T1w), "
          f"{args.threads} threads: {part.wall_s:.1f} s, peak {part.peak_rss_mb:.0f} MB\n{table}")
    return publish(f"run_all_{args.preset}", result,
                   f"# Whole participant level, {args.preset} preset ({result['date']}, {result['machine']})\n\n"
                   f"dwi {dwi_shape}, T1w {t1_shape}, {args.threads} threads; total {part.wall_s:.1f} s, "
                   f"peak {part.peak_rss_mb:.0f} MB\n\n{table}\n")


if __name__ == "__main__":
    raise SystemExit(main())
