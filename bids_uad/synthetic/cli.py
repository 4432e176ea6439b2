"""``bids_uad-synth OUTPUT_DIR --preset {tiny,small,paper}``: write a synthetic BIDS dataset."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bids_uad.errors import BidsUadError, UsageError

from .lesion_types import DEFAULT_GENERATOR, LESION_GENERATORS
from .presets import PRESETS


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bids_uad-synth",
                     description="Write a synthetic BIDS dataset (healthy controls and patients with lesions, "
                                 "with diffusion, T1w, FLAIR, reverse phase-encoding b0s, two sessions for patients) "
                                 "and its ground truth in derivatives/synthetic-truth/.")
    parser.add_argument("output_dir", type=Path, help="folder for the dataset: new, empty, or a previous synthetic dataset (replaced); "
                             "an existing folder is kept (it may be a mount point)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                        help="tiny: 3 controls + 2 patients, 2 mm T1w, 4 mm dwi (seconds); small: 5 + 3 on "
                             "tiny's grids (the demo); paper: 28 + 32 at the reference geometry (default: tiny)")
    parser.add_argument("--controls", type=int, help="number of healthy controls (default: the preset's)")
    parser.add_argument("--patients", type=int, help="number of patients (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--lesion-generator", choices=LESION_GENERATORS, default=DEFAULT_GENERATOR,
                        help="the patients' lesions: glioma (necrotic glioma with oedema, infiltration zone and "
                             "mass effect; ellipsoid or irregular fix its shape, mixed is its old name), or a "
                             "graded type: infiltration (anisotropy loss along WM, MD within +-5 %%), oedema "
                             "(MD +10-30 %%), restricted (MD -20-40 %%, brighter diffusion-weighted signal), "
                             "mass-effect (displaced tracts, near-normal scalars), or mixed-hard (1-3 lesions of "
                             "different graded types per patient) (default: %(default)s)")
    parser.add_argument("--severity", type=float, metavar="S",
                        help="severity of the graded lesion types in [0, 1] (0: mild end of the type's range, "
                             "1: strong end; default: drawn per lesion)")
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
                                severity=args.severity,
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
