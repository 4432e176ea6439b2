"""Entry point: parse, build the settings, run the level, turn errors into exit codes.

This is the only place that prints an error message and chooses an exit status.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from bids_uad import __version__
from bids_uad.bids.derivatives import DerivativesWriter, is_within, remove_orphaned_temporaries, validate_label
from bids_uad.bids.phase_encoding import parse_pe_polarity
from bids_uad.config import ANALYSIS_LEVELS, Settings, load_plugin_settings, resolve_preproc_backend
from bids_uad.errors import (
    BidsUadError,
    InputMissingError,
    OutputNotWritableError,
    UnknownAnalysisLevelError,
    UsageError,
)
from bids_uad.workflows.execution import FirstLineFormatter

LOGGER = logging.getLogger("bids_uad")
#: the run log's handler once the current run has one (errors are written there too)
_RUN_LOG: dict[str, logging.Handler | None] = {"handler": None}


def _load_filters(path: Path | None) -> dict:
    """Read and check ``--bids-filter-file`` (64 naming the key; warnings printed here)."""
    from bids_uad.bids.layout import check_filters

    if path is None:
        return {}
    if not path.is_file():
        raise InputMissingError("BIDS filter file does not exist", path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"BIDS filter file is not valid JSON ({exc})", path) from exc
    filters, warnings = check_filters(data, path)
    for line in warnings:
        print(f"bids_uad: warning: {line}", file=sys.stderr)
    return filters


def _check_writable_dir(path: Path, what: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputNotWritableError(f"cannot create the {what} ({exc.strerror})", path) from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputNotWritableError(f"the {what} is not writable", path)


def settings_from_args(argv: list[str] | None = None) -> Settings:
    """Parse the command line and check it; raises the error family with the right code."""
    from bids_uad.cli.parser import build_parser

    args = build_parser().parse_args(argv)
    if args.analysis_level not in ANALYSIS_LEVELS:
        raise UnknownAnalysisLevelError(
            f"unknown analysis level {args.analysis_level!r}: choose participant or group"
        )
    participants = tuple(validate_label(x, "sub") for x in args.participant_label)
    sessions = tuple(validate_label(x, "ses") for x in args.session_label)
    bids_dir = args.bids_dir.expanduser().resolve()
    output_dir = args.output_dir.expanduser().resolve()
    work_dir = args.work_dir.expanduser().resolve()
    if not bids_dir.exists():
        raise InputMissingError("input BIDS folder does not exist", bids_dir)
    if not bids_dir.is_dir() or not os.access(bids_dir, os.R_OK | os.X_OK):
        raise InputMissingError("input BIDS path is not a readable folder", bids_dir)
    if is_within(output_dir, bids_dir):
        raise UsageError(
            f"OUTPUT_DIR {output_dir} is the input dataset or inside it; outputs never go into BIDS_DIR "
            "(use e.g. BIDS_DIR/../derivatives/bids_uad)"
        )
    if is_within(work_dir, bids_dir):
        raise UsageError(f"work folder {work_dir} is inside the input dataset {bids_dir}; choose another -w")
    if args.lesion_masks is not None and not args.lesion_masks.is_dir():
        raise InputMissingError("lesion-mask folder does not exist", args.lesion_masks)
    if args.model is not None:
        if not args.model.exists():
            raise InputMissingError("model file or folder does not exist", args.model)
        from bids_uad.models.validate import validate_model_argument

        validate_model_argument(args.model)  # schema, types, sizes, shapes, hash: before any work
    filters = _load_filters(args.bids_filter_file)
    parse_pe_polarity(args.pe_polarity)  # a malformed statement is a usage error, early
    plugin_args: dict = {}
    if args.use_plugin is not None:
        plugin_args = load_plugin_settings(args.use_plugin)[1]  # fail early on a bad file
    resolve_preproc_backend(args.preproc_backend)  # fsl without FSL is a usage error, early
    if args.device == "cuda":  # cuda without a GPU is a usage error, early (torch only imported then)
        from bids_uad.models.bundle import resolve_device

        resolve_device(args.device)
    return Settings(
        bids_dir=bids_dir,
        output_dir=output_dir,
        analysis_level=args.analysis_level,
        work_dir=work_dir,
        participant_labels=participants,
        session_labels=sessions,
        nprocs=args.nprocs or int(plugin_args.get("n_procs", 1)),
        omp_nthreads=args.omp_nthreads,
        mem_gb=args.mem_gb or plugin_args.get("memory_gb"),
        skip_bids_validation=args.skip_bids_validation,
        bids_filters=filters,
        preproc_backend=args.preproc_backend,
        model=args.model.resolve() if args.model else None,
        output_spaces=tuple(args.output_spaces),
        reports_only=args.reports_only,
        stop_on_first_crash=args.stop_on_first_crash,
        seed=args.seed,
        verbosity=args.verbose,
        group_column=args.group_column,
        control_value=args.control_value,
        lesion_masks=args.lesion_masks.resolve() if args.lesion_masks else None,
        threshold=args.threshold,
        device=args.device,
        models=tuple(dict.fromkeys(args.models)),
        train_preset=args.train_preset,
        model_inputs=args.model_inputs,
        network_space=args.network_space,
        train_repeats=args.train_repeats,
        ensemble=args.ensemble,
        findings_min_volume=args.findings_min_volume,
        pe_polarity=tuple(args.pe_polarity),
        use_plugin=args.use_plugin.resolve() if args.use_plugin else None,
        baseline_session=validate_label(args.baseline_session, "ses") if args.baseline_session else None,
        command_line=tuple(["bids_uad", *(argv if argv is not None else sys.argv[1:])]),
    )


def _setup_logging(settings: Settings, log_file: Path) -> logging.Handler:
    level = logging.WARNING - 10 * min(settings.verbosity + 1, 2)
    root = logging.getLogger("bids_uad")
    root.setLevel(min(level, logging.INFO))
    for handler in list(root.handlers):
        root.removeHandler(handler)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(level)
    console.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s", "%H:%M:%S"))
    root.addHandler(console)
    to_file = logging.FileHandler(log_file)
    to_file.setLevel(logging.DEBUG)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(name)s [%(levelname)s] %(message)s"))
    root.addHandler(to_file)
    # nipype's loggers keep the stream they found at import; send them through ours instead
    nipype_console = logging.StreamHandler(sys.stderr)
    nipype_console.setLevel(logging.WARNING if settings.verbosity < 2 else logging.INFO)
    nipype_console.setFormatter(FirstLineFormatter("%(asctime)s [%(levelname)s] nipype: %(message)s", "%H:%M:%S"))
    for name in ("nipype.workflow", "nipype.interface", "nipype.utils"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.addHandler(nipype_console)
        logger.addHandler(to_file)
        logger.propagate = False
    return to_file


def _to_run_log(message: str, exc_info=None) -> None:
    """Write the error that ends a run into its run log as well (the console got one line)."""
    handler = _RUN_LOG["handler"]
    if handler is None:
        return
    record = LOGGER.makeRecord(LOGGER.name, logging.ERROR, __file__, 0, message, None, exc_info)
    try:
        handler.handle(record)
        handler.flush()
    except Exception:  # noqa: BLE001 - the log may be gone (disk full, folder removed)
        pass


def run(settings: Settings) -> int:
    """Run one analysis level with validated settings; returns 0 or raises."""
    from bids_uad.algorithms.registration import set_itk_threads
    from bids_uad.bids.layout import BIDSInputs
    from bids_uad.cli.levels import run_group, run_participant

    started, cpu_started = time.perf_counter(), time.process_time()
    # before any image exists in this process or its workers: ITK reads it once per process
    set_itk_threads(settings.omp_nthreads)
    _check_writable_dir(settings.output_dir, "output folder")
    _check_writable_dir(settings.work_dir, "work folder")
    writer = DerivativesWriter(settings.output_dir, settings.bids_dir)
    bids = BIDSInputs(settings.bids_dir, validate=not settings.skip_bids_validation,
                      filters=settings.bids_filters, pe_polarity=parse_pe_polarity(settings.pe_polarity))
    subjects = bids.select_subjects(settings.participant_labels) if settings.analysis_level == "participant" else []
    writer.ensure_dataset_description()
    # never walk the input (or the work folder) when OUTPUT_DIR is a parent of it
    inputs = [p for p in (settings.bids_dir, settings.work_dir, settings.lesion_masks) if p is not None]
    orphans = remove_orphaned_temporaries(settings.output_dir, exclude=inputs)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S") + "_" + uuid.uuid4().hex[:8]
    logs = settings.output_dir / "logs"
    _check_writable_dir(logs, "logs folder")
    settings.write(logs, run_id)
    _RUN_LOG["handler"] = _setup_logging(settings, logs / f"run-{run_id}.log")
    LOGGER.info("bids_uad %s, %s level, run %s", __version__, settings.analysis_level, run_id)
    LOGGER.info("preprocessing backend: %s", settings.resolved_backend())
    if orphans:
        LOGGER.info("removed %d temporary file(s) left by a killed run, e.g. %s", len(orphans), orphans[0])
    if settings.analysis_level == "participant":
        run_participant(settings, bids, subjects, run_id)
    else:
        run_group(settings, bids, run_id)
    LOGGER.info("finished in %.1f s wall (%.1f s CPU in this process); outputs in %s",
                time.perf_counter() - started, time.process_time() - cpu_started, settings.output_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit status.

    Every failure ends as one line on stderr (and in the run log once there is one); an
    unexpected exception too, with its traceback only in the run log.
    """
    _RUN_LOG["handler"] = None
    try:
        settings = settings_from_args(argv)
        from bids_uad.workflows.group import torchrun_worker_main  # torchrun ranks > 0 only train
        worker_status = torchrun_worker_main(settings)
        return run(settings) if worker_status is None else worker_status
    except SystemExit as exc:  # --help and --version
        return int(exc.code or 0)
    except BidsUadError as exc:
        print(f"bids_uad: error: {exc.one_line()}", file=sys.stderr)
        _to_run_log(f"error (exit {exc.exit_code}): {exc.one_line()}")
        return exc.exit_code
    except KeyboardInterrupt:
        print("bids_uad: interrupted", file=sys.stderr)
        _to_run_log("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug: one line here, the traceback in the run log
        handler = _RUN_LOG["handler"]
        where = f"; traceback in {handler.baseFilename}" if isinstance(handler, logging.FileHandler) else ""
        first = str(exc).splitlines()[0] if str(exc) else "no message"
        print(f"bids_uad: error: unexpected {type(exc).__name__}: {first}{where} "
              "(please report this as a bug)", file=sys.stderr)
        _to_run_log(f"unexpected error: {type(exc).__name__}: {first}", exc_info=sys.exc_info())
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
