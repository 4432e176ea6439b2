"""``make demo``: generate the synthetic dataset and run the whole pipeline on it, end to end.

participant (preprocessing) → group (training with the quick preset, calibration on held-out
controls, evaluation against the synthetic truth) → participant with the trained models
(anomaly maps in dwi and MNI space, longitudinal comparison, reports).  Each step is the
``bids_uad`` command line a user would type; they are printed before they run.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bids_uad.cli.run import main as bids_uad_main
from bids_uad.synthetic import generate_dataset
from bids_uad.synthetic.presets import PRESETS

#: the dataset ``make demo`` runs on (about 15 minutes on 2 cores, see README)
DEMO_PRESET = "small"


def _step(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def demo_commands(bids_dir: Path, deriv: Path, work: Path, seed: int, nprocs: int) -> list[tuple[str, list[str]]]:
    """The three ``bids_uad`` invocations of the demo, with their titles."""
    truth = bids_dir / "derivatives" / "synthetic-truth"
    common = ["-w", str(work), "--nprocs", str(nprocs), "--seed", str(seed), "--lesion-masks", str(truth)]
    return [
        ("2/4 participant level: preprocessing", [str(bids_dir), str(deriv), "participant", *common]),
        ("3/4 group level: training (quick preset), calibration, evaluation",
         [str(bids_dir), str(deriv), "group", "--train-preset", "quick", *common]),
        ("4/4 participant level with the trained models: anomaly maps, longitudinal, reports",
         [str(bids_dir), str(deriv), "participant", "--model", str(deriv / "models"), *common]),
    ]


def run_demo(output: Path, preset: str = DEMO_PRESET, seed: int = 0, nprocs: int = 2) -> int:
    output = output.resolve()
    bids_dir, deriv, work = output / "bids", output / "derivatives" / "bids_uad", output / "work"
    started = time.monotonic()
    _step(f"1/4 synthetic BIDS dataset ({preset} preset) -> {bids_dir}")
    if not (bids_dir / "dataset_description.json").exists():
        generate_dataset(bids_dir, preset=preset, seed=seed)
    else:
        print("already there, reused")
    for title, argv in demo_commands(bids_dir, deriv, work, seed, nprocs):
        step_started = time.monotonic()
        _step(title)
        print("bids_uad " + " ".join(argv), flush=True)
        code = bids_uad_main(argv)
        if code != 0:
            print(f"demo: '{title}' failed with exit code {code} (see the message above)", file=sys.stderr)
            return code
        print(f"({time.monotonic() - step_started:.0f} s)", flush=True)
    _step(f"done in {time.monotonic() - started:.0f} s")
    print(f"outputs: {deriv}")
    for report in sorted(deriv.glob("*.html")):
        print(f"report: {report}")
    table = deriv / "group" / "detection_summary.tsv"
    if table.is_file():
        print(f"\n{table.name}: every model next to the baselines, patients' anomaly maps against the synthetic "
              "truth (quick demo models, not the paper's; dice_calibrated = the written map):")
        print(table.read_text().rstrip())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run bids_uad end to end on a synthetic dataset.")
    parser.add_argument("--output", type=Path, default=Path("demo"), help="demo folder (default: ./demo)")
    parser.add_argument("--preset", default=DEMO_PRESET, choices=sorted(PRESETS),
                        help=f"synthetic dataset size (default: {DEMO_PRESET})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nprocs", type=int, default=2)
    args = parser.parse_args(argv)
    return run_demo(args.output, args.preset, args.seed, args.nprocs)


if __name__ == "__main__":
    raise SystemExit(main())
