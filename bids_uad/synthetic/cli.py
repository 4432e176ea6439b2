"""``bids_uad-synth OUTPUT_DIR --preset {tiny,small,paper}``: write a synthetic BIDS dataset."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bids_uad.errors import BidsUadError, UsageError

from .lesions import LESION_GENERATORS
from .presets import PRESETS


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bids_uad-synth",
                     description="Write a synthetic BIDS dataset (healthy controls and glioma patients with "
                                 "diffusion, T1w, FLAIR, reverse phase-encoding b0s, two sessions for patients) "
                                 "and its ground truth in derivatives/synthetic-truth/.")
    parser.add_argument("output_dir", type=Path, help="folder for the dataset: new, empty, or a previous synthetic dataset (replaced); "
                             "an existing folder is kept (it may be a mount point)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                        help="tiny: 3 controls + 2 patients, 2 mm T1w, 4 mm dwi (seconds); small: 6 + 6 at "
                             "1 mm / 3 mm; paper: 28 + 32 at the reference geometry (default: tiny)")
    parser.add_argument("--controls", type=int, help="number of healthy controls (default: the preset's)")
    parser.add_argument("--patients", type=int, help="number of patients (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--lesion-generator", choices=LESION_GENERATORS, default="mixed",
                        help="tumour shapes: ellipsoid, irregular (lobulated, grown along WM) or mixed")
    parser.add_argument("--no-reverse-pe-fraction", type=float, metavar="F",
                        help="fraction of subjects without a reverse phase-encoding b0 (default: the preset's)")
    parser.add_argument("--no-clean-dwi", action="store_true",
                        help="do not write the artefact-free diffusion series into the truth folder")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: up to 2)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from .generate import generate_dataset

    try:
        args = build_parser().parse_args(argv)
        start = time.monotonic()
        path = generate_dataset(args.output_dir, preset=args.preset, n_controls=args.controls,
                                n_patients=args.patients, seed=args.seed, lesion_generator=args.lesion_generator,
                                no_reverse_pe_fraction=args.no_reverse_pe_fraction,
                                write_clean_dwi=not args.no_clean_dwi, n_jobs=args.jobs)
    except SystemExit as exc:
        return int(exc.code or 0)
    except BidsUadError as exc:
        print(f"bids_uad-synth: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    print(f"wrote {path} in {time.monotonic() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
