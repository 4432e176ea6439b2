"""Scheduling overhead per node: trivial nodes run next to a real participant graph in memory.

``python benchmarks/scheduler.py [--preset tiny] [--nodes 60]``

Builds the participant graph of a synthetic dataset (not run: it only populates the process
with its objects, as a real run does), then runs a chain of ``--nodes`` nodes that do no work
through :func:`bids_uad.workflows.execution.run_workflow` on 2 processes, once with nipype's
own MultiProc scheduler and once with bids_uad's (the graph frozen for nipype's per-loop
``gc.collect()``).  Prints per variant: wall, seconds per node, the scheduler's CPU, the cost
of one full ``gc.collect()``; writes ``benchmarks/results/scheduler_<preset>.json``; JSON last line.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _measure import markdown_table, publish, scratch_folder  # noqa: E402


def _same(x):
    return x


def _chain(name: str, length: int):
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    workflow = pe.Workflow(name=name)
    previous = None
    for i in range(length):
        node = pe.Node(niu.Function(input_names=["x"], output_names=["x"], function=_same), name=f"n{i}")
        if previous is None:
            node.inputs.x = 0
        else:
            workflow.connect(previous, "x", node, "x")
        previous = node
    return workflow


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--nodes", type=int, default=60)
    parser.add_argument("--workdir", type=Path, help="keep the dataset and work files here (default: a temporary folder, removed at the end)")
    args = parser.parse_args(argv)
    with scratch_folder(args.workdir, "bids_uad_bench_sched_") as root:
        return _run(args, root)


def _run(args, root: Path) -> int:
    import bids_uad.workflows.execution as execution
    from bids_uad.bids.layout import BIDSInputs
    from bids_uad.cli.run import settings_from_args
    from bids_uad.synthetic import generate_dataset
    from bids_uad.workflows.base import collect_participant_inputs, init_participant_wf
    from nipype.pipeline.plugins.multiproc import MultiProcPlugin as NipypeMultiProc

    for name in ("bids_uad", "nipype.workflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    bids = root / "bids"
    if not (bids / "dataset_description.json").exists():
        generate_dataset(bids, preset=args.preset, seed=0)
    settings = settings_from_args([str(bids), str(root / "out"), "participant", "-w", str(root / "work"),
                                   "--nprocs", "2", "--skip-bids-validation"])
    inputs = BIDSInputs(settings.bids_dir, validate=False)
    plan = collect_participant_inputs(settings, inputs, inputs.select_subjects(()))
    graph = init_participant_wf(settings, plan)  # kept alive: the objects a real run holds
    graph_nodes = sum(1 for _ in graph._get_all_nodes())
    t0 = time.perf_counter()
    gc.collect()
    full_gc_s = time.perf_counter() - t0
    objects = len(gc.get_objects())

    rows = []
    own = execution.multiproc_plugin_class
    for variant, plugin_class in (("nipype MultiProc", lambda: NipypeMultiProc), ("bids_uad MultiProc", own)):
        execution.multiproc_plugin_class = plugin_class
        progress = {}
        real = execution.summarize_run

        def keep(*a, **k):
            progress["summary"] = real(*a, **k)
            return progress["summary"]

        execution.summarize_run = keep
        try:
            execution.run_workflow(_chain(f"chain_{len(rows)}", args.nodes), settings, f"sched{len(rows)}")
        finally:
            execution.summarize_run = real
            execution.multiproc_plugin_class = own
        s = progress["summary"]
        rows.append({"variant": variant, "nodes": s.nodes, "wall_s": round(s.wall_s, 2),
                     "s_per_node": round(s.wall_s / max(1, s.nodes), 3), "work_s": round(s.work_s, 2),
                     "scheduler_cpu_s": round(s.scheduler_cpu_s, 2), "load_1min": round(os.getloadavg()[0], 2)})
        print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "scheduler", "preset": args.preset, "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "graph_nodes_in_memory": graph_nodes, "gc_objects": objects, "full_gc_collect_s": round(full_gc_s, 3),
              "chain_nodes": args.nodes, "variants": rows}
    table = markdown_table(rows)
    print(f"\n{args.nodes} no-work nodes in a chain, 2 processes, a {graph_nodes}-node participant graph in memory "
          f"({objects} objects; one full gc.collect() {full_gc_s:.3f} s):\n{table}")
    return publish(f"scheduler_{args.preset}", result,
                   f"# Scheduling cost per node ({result['date']}, {result['machine']})\n\n"
                   f"{args.nodes} no-work nodes in a chain, 2 processes, a {graph_nodes}-node participant graph "
                   f"in memory ({objects} objects; one full gc.collect() {full_gc_s:.3f} s)\n\n{table}\n")


if __name__ == "__main__":
    raise SystemExit(main())
