#!/usr/bin/env python3
"""Compare the files of a bids_uad output folder with an expected list (CI end-to-end check).

    compare_outputs.py OUTPUT_DIR EXPECTED_LIST            # exit 0 when they match, 1 when not
    compare_outputs.py OUTPUT_DIR EXPECTED_LIST --write    # record a good run as the expectation
    compare_outputs.py OUTPUT_DIR --list                   # print the normalized file list

The list holds one pattern per line (``#`` comments, blank lines ignored), relative to
OUTPUT_DIR: ``*`` and ``?`` stay within one folder, ``**/`` spans folders.  Run identifiers
(``run-20260101-120000_1a2b3c4d``) are written as ``run-*`` so runs compare.  Every file
must match a pattern and every pattern must match a file: a missing derivative, a leftover
temporary file (``.name.XXXX.nii.gz`` from an interrupted atomic write) or a crash report
(``logs/crash-*``) all fail the comparison.  Exit 2: the folder or the list is missing.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

RUN_ID = re.compile(r"\d{8}-\d{6}_[0-9a-f]{8}")


def normalize(relpath: str) -> str:
    """The path with run identifiers replaced by ``*``."""
    return RUN_ID.sub("*", relpath)


def list_outputs(output_dir: Path) -> list[str]:
    """Relative paths of every file (and link) under ``output_dir``, normalized and sorted."""
    found = set()
    for path in output_dir.rglob("*"):
        if path.is_file() or path.is_symlink():
            found.add(normalize(path.relative_to(output_dir).as_posix()))
    return sorted(found)


def pattern_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:[^/]+/)*", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def read_expected(path: Path) -> list[str]:
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def compare(actual: list[str], expected: list[str]) -> tuple[list[str], list[str]]:
    """(patterns that match no file, files that match no pattern)."""
    regexes = [(p, pattern_regex(p)) for p in expected]
    missing = [p for p, rx in regexes if not any(rx.match(f) for f in actual)]
    unexpected = [f for f in actual if not any(rx.match(f) for _, rx in regexes)]
    return missing, unexpected


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("expected", type=Path, nargs="?")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="write the expected list from OUTPUT_DIR")
    mode.add_argument("--list", action="store_true", help="print the normalized file list")
    args = parser.parse_args(argv)
    if not args.output_dir.is_dir():
        print(f"compare_outputs: {args.output_dir}: no such output folder", file=sys.stderr)
        return 2
    actual = list_outputs(args.output_dir)
    if args.list:
        print("\n".join(actual))
        return 0
    if args.expected is None:
        parser.error("EXPECTED_LIST is needed unless --list")
    if args.write:
        header = ("# files of a good CI run of the tiny synthetic dataset (participant, group --train-preset\n"
                  "# quick, participant --model); regenerate: .circleci/compare_outputs.py OUT THIS_FILE --write\n")
        args.expected.write_text(header + "\n".join(actual) + "\n")
        print(f"wrote {len(actual)} entries to {args.expected}")
        return 0
    if not args.expected.is_file():
        print(f"compare_outputs: {args.expected}: no expected list yet; create it from a good run with "
              f"--write (files now: {len(actual)})", file=sys.stderr)
        return 2
    missing, unexpected = compare(actual, read_expected(args.expected))
    for pattern in missing:
        print(f"missing:    {pattern}")
    for name in unexpected:
        print(f"unexpected: {name}")
    if missing or unexpected:
        print(f"compare_outputs: {len(missing)} missing, {len(unexpected)} unexpected "
              f"(of {len(actual)} files)", file=sys.stderr)
        return 1
    print(f"compare_outputs: all {len(actual)} files as expected")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
