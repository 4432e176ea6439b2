#!/usr/bin/env python3
"""Fetch the MNI152NLin2009cAsym files bids_uad uses into $TEMPLATEFLOW_HOME (image build time).

Run once while the container image is built (network available); at run time nothing is
fetched: ``bids_uad.algorithms.templates`` reads these files directly.  ``--check`` only
verifies that every file is present and is a real image (not an empty DataLad placeholder).
``--skip`` (image built with ``WITH_TEMPLATEFLOW=false``) fetches nothing and leaves a marker
file, so that ``--check`` accepts the missing files: bids_uad then uses nilearn's template.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

TEMPLATE = "MNI152NLin2009cAsym"
#: (templateflow.api.get query, file name in tpl-<TEMPLATE>/) for the 1 mm files bids_uad reads
FILES: tuple[tuple[dict, str], ...] = (
    ({"resolution": 1, "desc": None, "suffix": "T1w"}, f"tpl-{TEMPLATE}_res-01_T1w.nii.gz"),
    ({"resolution": 1, "desc": "brain", "suffix": "mask"}, f"tpl-{TEMPLATE}_res-01_desc-brain_mask.nii.gz"),
    ({"resolution": 1, "label": "GM", "suffix": "probseg"}, f"tpl-{TEMPLATE}_res-01_label-GM_probseg.nii.gz"),
    ({"resolution": 1, "label": "WM", "suffix": "probseg"}, f"tpl-{TEMPLATE}_res-01_label-WM_probseg.nii.gz"),
    ({"resolution": 1, "label": "CSF", "suffix": "probseg"}, f"tpl-{TEMPLATE}_res-01_label-CSF_probseg.nii.gz"),
)
MIN_BYTES = 1024  # DataLad/TemplateFlow placeholders are empty files
#: left in the TemplateFlow home by ``--skip``: the files are missing on purpose
SKIP_MARKER = "NO_TEMPLATEFLOW"


def expected_paths(home: Path) -> list[Path]:
    """Where each file lies under a TemplateFlow home."""
    return [home / f"tpl-{TEMPLATE}" / name for _, name in FILES]


def skipped(home: Path) -> bool:
    """True when the image was built without TemplateFlow (``--skip`` left its marker)."""
    return (home / SKIP_MARKER).is_file()


def skip(home: Path) -> None:
    """Fetch nothing; mark ``home`` so that ``--check`` knows the files were left out on purpose."""
    home.mkdir(parents=True, exist_ok=True)
    (home / SKIP_MARKER).write_text(
        f"Built without TemplateFlow (WITH_TEMPLATEFLOW=false): {TEMPLATE} is not included;\n"
        "bids_uad uses the MNI152NLin2009aSym template bundled with nilearn (outputs named space-MNI152NLin2009aSym).\n")


def check(home: Path) -> list[str]:
    """Problems with the files under ``home`` (an empty list when all are usable)."""
    import nibabel as nib

    problems = []
    for path in expected_paths(home):
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size < MIN_BYTES:
            problems.append(f"{path}: only {path.stat().st_size} bytes (placeholder?)")
        else:
            try:
                nib.load(str(path)).header  # noqa: B018 - parse the header
            except Exception as exc:  # noqa: BLE001 - report any unreadable file
                problems.append(f"{path}: unreadable ({exc})")
    return problems


def fetch(home: Path) -> None:
    """Download the files with TemplateFlow's python API (needs the network)."""
    os.environ["TEMPLATEFLOW_HOME"] = str(home)
    home.mkdir(parents=True, exist_ok=True)
    from templateflow import api as tflow  # import after TEMPLATEFLOW_HOME is set

    for query, name in FILES:
        got = tflow.get(TEMPLATE, extension=".nii.gz", raise_empty=True, **query)
        got = got if isinstance(got, list) else [got]
        names = sorted(Path(p).name for p in got)
        if names != [name]:
            raise SystemExit(f"templateflow query {query} gave {names}, expected [{name}]")
        print(f"fetched {got[0]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=os.environ.get("TEMPLATEFLOW_HOME"),
                        help="TemplateFlow home (default: $TEMPLATEFLOW_HOME)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="only verify the files, fetch nothing")
    mode.add_argument("--skip", action="store_true",
                      help="fetch nothing and mark the folder as built without TemplateFlow")
    args = parser.parse_args(argv)
    if args.home is None:
        parser.error("set TEMPLATEFLOW_HOME or pass --home")
    home = Path(args.home)
    if args.skip:
        skip(home)
    if args.skip or (args.check and skipped(home)):
        print(f"{home}: built without TemplateFlow; bids_uad uses nilearn's MNI152NLin2009aSym")
        return 0
    if not args.check:
        fetch(home)
    problems = check(home)
    for line in problems:
        print(line, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
