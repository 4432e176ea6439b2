"""One exception family for every user-facing failure, each carrying its exit code.

Only :mod:`bids_uad.cli.run` turns these into a message and an exit status; everything
else raises.  Codes follow the BIDS-Apps execution specification and sysexits.h.
"""
from __future__ import annotations

from pathlib import Path


class BidsUadError(Exception):
    """Base class: a failure the user can act on, reported as one line."""

    exit_code: int = 1

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = None if path is None else str(path)
        super().__init__(message)

    def one_line(self) -> str:
        """The message as printed by the CLI: ``<file>: <what is wrong>`` on one line."""
        text = str(self).replace("\n", " ").strip()
        if self.path and self.path not in text:
            text = f"{self.path}: {text}"
        return text


class InputValidationError(BidsUadError):
    """The input dataset or one of its files is invalid (BIDS-Apps code 16)."""

    exit_code = 16


class UnknownAnalysisLevelError(BidsUadError):
    """The analysis level is not ``participant`` or ``group`` (code 17)."""

    exit_code = 17


class NoFilesSelectedError(BidsUadError):
    """Labels or filters selected nothing (code 18)."""

    exit_code = 18


class UsageError(BidsUadError):
    """Bad command-line usage (sysexits EX_USAGE, 64)."""

    exit_code = 64


class InputMissingError(BidsUadError):
    """An input path does not exist or cannot be read (sysexits EX_NOINPUT, 66)."""

    exit_code = 66


class PipelineCrashError(BidsUadError):
    """A processing step crashed; nipype wrote crash files (exit 1, as other BIDS-Apps)."""

    exit_code = 1


class OutputNotWritableError(BidsUadError):
    """The output (or work) directory cannot be created or written (sysexits EX_CANTCREAT, 73)."""

    exit_code = 73


EXIT_CODES: dict[str, int] = {
    "a processing step crashed (crash files in OUTPUT_DIR/logs/crash-*)": PipelineCrashError.exit_code,
    "input validation failed": InputValidationError.exit_code,
    "unknown analysis level": UnknownAnalysisLevelError.exit_code,
    "filters selected no files": NoFilesSelectedError.exit_code,
    "usage error": UsageError.exit_code,
    "input missing or unreadable": InputMissingError.exit_code,
    "output cannot be created": OutputNotWritableError.exit_code,
}
