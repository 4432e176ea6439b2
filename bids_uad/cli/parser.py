"""The BIDS-App command line: ``bids_uad BIDS_DIR OUTPUT_DIR participant|group [options]``."""
from __future__ import annotations

import argparse
from pathlib import Path

from bids_uad import __version__
from bids_uad.config import (DEFAULT_MODELS, DEVICES, INPUT_REPRESENTATIONS, MODEL_NAMES, NETWORK_SPACES,
                             PREPROC_BACKENDS, THRESHOLD_METHODS, TRAIN_PRESETS)
from bids_uad.errors import EXIT_CODES, UsageError


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` (exit 64) instead of exiting with 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(f"{self.prog}: {message} (see --help)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from exc
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from exc
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _epilog() -> str:
    codes = "\n".join(f"  {code:>3}  {what}" for what, code in EXIT_CODES.items())
    return (
        "exit codes:\n  0    success\n" + codes + "\n\n"
        "Outputs follow the BIDS-derivatives conventions; see README.md.  The input dataset is\n"
        "never written to."
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bids_uad",
        description=(
            "Unsupervised anomaly detection in diffusion MRI (BIDS-App).  The participant level "
            "preprocesses dMRI and anatomy (and, with --model, maps anomalies); the group level "
            "trains anomaly models on the healthy controls and calibrates their thresholds."
        ),
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("bids_dir", type=Path, help="the input BIDS dataset (read-only)")
    parser.add_argument("output_dir", type=Path,
                        help="the output folder (BIDS derivatives); must not be inside BIDS_DIR")
    parser.add_argument("analysis_level", metavar="{participant,group}",
                        help="participant: preprocessing and (with --model) anomaly maps per subject; "
                             "group: train and calibrate models on the controls, evaluate, group report")

    sel = parser.add_argument_group("selecting data")
    sel.add_argument("--participant-label", "--participant_label", dest="participant_label",
                     nargs="+", default=[], metavar="LABEL",
                     help="subjects to process, with or without 'sub-' (default: all)")
    sel.add_argument("--session-label", "--session_label", dest="session_label", nargs="+",
                     default=[], metavar="LABEL", help="sessions to process, with or without 'ses-'")
    sel.add_argument("--bids-filter-file", "--bids_filter_file", dest="bids_filter_file", type=Path,
                     metavar="FILE",
                     help="JSON file of pybids filters per suffix (dwi, epi, T1w, FLAIR), e.g. "
                          "{\"dwi\": {\"acquisition\": \"b1000\"}}; keys must be BIDS entities (exit 64 "
                          "otherwise), an entry selecting nothing exits 18")
    sel.add_argument("--baseline-session", metavar="LABEL",
                     help="longitudinal baseline session (default: the first session with dwi by acq_time "
                          "in sessions.tsv)")
    sel.add_argument("--skip-bids-validation", "--skip_bids_validation", dest="skip_bids_validation",
                     action="store_true", help="do not validate the input dataset layout")
    sel.add_argument("--group-column", default="group", metavar="COLUMN",
                     help="participants.tsv column naming the cohort (default: group)")
    sel.add_argument("--control-value", default="control", metavar="VALUE",
                     help="value of --group-column that marks healthy controls (default: control)")
    sel.add_argument("--lesion-masks", type=Path, metavar="DIR",
                     help="BIDS-derivatives folder of lesion masks (*_desc-tumor_mask.nii.gz), used to "
                          "mask registration and for evaluation")

    proc = parser.add_argument_group("processing")
    proc.add_argument("--preproc-backend", choices=PREPROC_BACKENDS, default="auto",
                      help="auto: FSL (TOPUP, EDDY, BET, FAST) when installed, else the Python "
                           "implementations; fsl or python force one (default: auto)")
    proc.add_argument("--pe-polarity", nargs="+", default=[], metavar="FILE_OR_ENTITY=DIR",
                      help="state the phase-encoding direction of dwi/epi runs whose sidecar gives only "
                           "PhaseEncodingAxis (or a wrong one): a file name or an entity of it, '=', a BIDS "
                           "direction (i, i-, j, j-, k, k-); e.g. dir-AP=j- dir-PA=j, or "
                           "sub-01_dwi.nii.gz=j-.  Without it the polarity comes from the sidecar, else "
                           "from an anatomical dir- entity (AP, PA, LR, RL, SI, IS); when neither tells, "
                           "susceptibility correction is skipped with a warning")
    proc.add_argument("--output-spaces", nargs="+", default=["dwi", "MNI152NLin2009cAsym"],
                      metavar="SPACE",
                      help="spaces for anomaly maps (default: dwi MNI152NLin2009cAsym; the MNI template "
                           "actually used is named in outputs)")
    proc.add_argument("--model", type=Path, metavar="PATH",
                      help="trained model (a models/ folder or one .json of a group-level run) for "
                           "participant-level anomaly inference")
    proc.add_argument("--threshold", choices=THRESHOLD_METHODS, default=None,
                      help="threshold method for binary anomaly maps.  Default: the method stored in "
                           "the model file, which the group level sets to healthy-fpr (calibrated on "
                           "held-out controls, each left out of its own threshold, so that the written map "
                           "flags 1%% of a new healthy subject's tissue).  "
                           "Given at the participant level it overrides the model file; at the group "
                           "level it is stored in the model files.  fixed is the reference's threshold "
                           "(0.3 DAE, 0.5 RecDiscNet), meaningful only on the reference's score scale (the "
                           "baselines have none and keep their model file's method); "
                           "otsu and meanpool are per-subject, uncalibrated")
    proc.add_argument("--findings-min-volume", dest="findings_min_volume", type=_nonnegative_float, default=None,
                      metavar="ML",
                      help="smallest finding in mL: clusters of the written anomaly map below it are not listed in "
                           "the findings table (default: the model file's finding volume, calibrated on the healthy "
                           "controls so that at most 5 %% of them would show any finding; else its 0.5 mL minimum "
                           "cluster)")
    proc.add_argument("--ensemble", action=argparse.BooleanOptionalAction, default=None,
                      help="score with the mean of all fold models (--ensemble; for a network referred to "
                           "its controls, the mean of the folds' z put back on one fold's null scale, so that "
                           "its calibration holds) or the fold with the lowest "
                           "validation loss (--no-ensemble).  Default: the choice stored in the model file.  "
                           "Given at the participant level it overrides the model file; at the group level "
                           "it is stored in the model files (default there: the ensemble for the networks whose "
                           "score is referred to the controls' in the template, dae, cdae and cevae; the best "
                           "fold for the others)")
    proc.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(DEFAULT_MODELS),
                      help="group level: models to train: the networks dae (variational autoencoder), "
                           "recdisc (RecDiscNet), cdae (U-Net denoising autoencoder trained to remove "
                           "coarse noise) and cevae (context-encoding VAE, StRegA's model), and the baseline detectors normative (voxelwise normative model "
                           "of FA, MD and mean dw signal from the controls, fitted in template space: every control needs "
                           "its transforms from a T1w, else exit 66) and meansignal (1 - mean dw "
                           "signal ratio) (default: " + " ".join(DEFAULT_MODELS) + ": the best measured first, "
                           "see README's Models)")
    proc.add_argument("--train-preset", choices=TRAIN_PRESETS, default="paper",
                      help="group level: paper (reference architecture, 7 folds), standard (a mid-size "
                           "network trained to its best validation loss with early stopping, 3 folds, the cdae "
                           "as two independent 3-fold runs: real training on a few CPU cores) or quick (a small model for demos and "
                           "tests) (default: paper)")
    proc.add_argument("--train-repeats", dest="train_repeats", type=_positive_int, default=None, metavar="N",
                      help="group level: train each network N times, each an independent k-fold training "
                           "(other splits, initialisations and training draws), and score with the mean of "
                           "all N x k networks (the fold ensemble); N times the training time.  Stored in "
                           "the model files (default: the preset's: 2 for the standard preset's cdae, else 1)")
    proc.add_argument("--model-inputs", dest="model_inputs", choices=INPUT_REPRESENTATIONS, default=None,
                      help="group level: what the networks see: dwi (the normalised dw volumes in the "
                           "controls' gradient order) or invariant (per shell the mean dw ratio and the "
                           "rotation-invariant spherical-harmonic power of each even order, with FA and MD: "
                           "independent of the gradient directions) or both (the dw volumes and the "
                           "features, each group scored on its own; SH orders up to 4, fewer where a shell "
                           "has too few directions).  The baselines always read the dw volumes.  Stored in "
                           "the model files (default: both for the cdae, measured the better on hard "
                           "lesions; dwi for the other networks)")
    proc.add_argument("--network-space", dest="network_space", choices=NETWORK_SPACES, default="template",
                      help="group level: where the reconstruction networks (dae, cdae, cevae) see the "
                           "subjects: template (each subject's normalised signal carried to the template "
                           "grid of the normative model through its own transforms, so that a voxel is the "
                           "same anatomical place in every brain; the score comes back to dwi space) or dwi "
                           "(each subject's own diffusion grid).  Needs every control's transforms (a T1w per "
                           "session); without them the networks fall back to dwi with a warning.  Stored in "
                           "the model files (default: template)")
    proc.add_argument("--device", choices=DEVICES, default="auto",
                      help="torch device for training and inference (default: auto)")
    proc.add_argument("--reports-only", action="store_true",
                      help="only rebuild the HTML reports from existing derivatives")
    proc.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")

    perf = parser.add_argument_group("resources and execution")
    perf.add_argument("-w", "--work-dir", dest="work_dir", type=Path, default=Path("work"),
                      help="work folder for intermediate files; reuse it to resume (default: ./work)")
    perf.add_argument("--nprocs", "--n-cpus", "--n_cpus", dest="nprocs", type=_positive_int, default=None,
                      help="processes run in parallel (default: the plugin file's n_procs, else 1); "
                           "overrides --use-plugin; group level: data-parallel training processes "
                           "(at most the batch size; on CUDA at most one per GPU)")
    perf.add_argument("--omp-nthreads", dest="omp_nthreads", type=_positive_int, default=1,
                      help="threads per process, for torch and ITK/ANTs (default: 1; more than 1 makes ANTs' "
                           "registrations differ from run to run)")
    perf.add_argument("--mem-gb", "--mem_gb", dest="mem_gb", type=_positive_float,
                      help="memory limit for scheduling parallel steps, in GB (overrides --use-plugin)")
    perf.add_argument("--use-plugin", "--use_plugin", dest="use_plugin", type=Path, metavar="FILE",
                      help="nipype plugin settings (YAML or JSON: {plugin: MultiProc|SLURM|..., plugin_args: {...}})")
    perf.add_argument("--stop-on-first-crash", action="store_true",
                      help="stop at the first failing step instead of finishing the others")
    perf.add_argument("-v", "--verbose", dest="verbose", action="count", default=0,
                      help="more log output (repeat for debug)")
    perf.add_argument("--version", action="version", version=f"bids_uad {__version__}")
    return parser
