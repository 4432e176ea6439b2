"""apptainer.def and docs/containers.md agree with the Dockerfile and with the real CLI."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

import bids_uad
from bids_uad.cli.parser import build_parser
from tests.containers.dockerfile_parser import Dockerfile

REPO = Path(__file__).resolve().parents[2]


def _sections(text: str) -> tuple[dict[str, str], dict[str, str]]:
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("%"):
            current = line.split()[0][1:]
            sections[current] = []
        elif current is None:
            if line.strip() and not line.startswith("#") and ":" in line:
                key, _, value = line.partition(":")
                header[key.strip()] = value.strip()
        else:
            sections[current].append(line)
    return header, {k: "\n".join(v) for k, v in sections.items()}


def test_apptainer_def_bootstraps_from_the_image_of_this_version():
    header, sections = _sections((REPO / "apptainer.def").read_text())
    assert header["Bootstrap"] in ("docker-daemon", "docker")
    assert header["From"].rsplit("/", 1)[-1] == f"bids_uad:{bids_uad.__version__}"
    entry = Dockerfile(REPO / "Dockerfile").final.find("ENTRYPOINT")[-1].positional()[0]
    runscript = [line.strip() for line in sections["runscript"].splitlines() if line.strip()]
    assert runscript == [f'exec {entry} "$@"'], "the runscript runs the same entry point as Docker"
    assert "%test" in (REPO / "apptainer.def").read_text()
    env = Dockerfile(REPO / "Dockerfile").final.env()
    for line in sections["environment"].splitlines():
        match = re.match(r"\s*export (\w+)=(\S+)", line)
        if match:
            assert env.get(match.group(1)) == match.group(2), f"{match.group(1)} differs from the Dockerfile"


def _doc_commands(prefix: str) -> list[str]:
    text = (REPO / "docs" / "containers.md").read_text()
    text = text.replace("\\\n", " ")
    return [re.sub(r"\s+", " ", line.strip()) for line in text.splitlines() if line.strip().startswith(prefix)]


def test_docs_give_the_exact_docker_and_apptainer_commands():
    docker = _doc_commands("docker run")
    apptainer = _doc_commands("apptainer run")
    assert "docker run --rm -v /data:/data:ro -v /out:/out bids_uad /data /out participant --participant-label 01" in docker
    assert any(c.startswith("apptainer run --cleanenv -B /data:/data:ro -B /out:/out -B /work:/work "
                            "bids_uad.sif /data /out participant -w /work") for c in apptainer)
    for command in docker + apptainer:
        assert ":ro" in command.split(" bids_uad")[0], f"data not mounted read-only: {command}"


def test_docs_give_the_apptainer_build_path_and_say_why_it_is_not_run_here():
    builds = _doc_commands("apptainer build")
    assert "apptainer build bids_uad.sif docker-daemon://bids_uad:latest # the documented path" in builds
    text = (REPO / "docs" / "containers.md").read_text()
    assert "not packaged in Debian\nbookworm" in text or "not packaged in Debian bookworm" in text
    # `make image` tags :latest, which the documented build path reads
    assert '-t "$IMAGE:latest"' in (REPO / "docker" / "build_image.sh").read_text()


@pytest.mark.parametrize("command", _doc_commands("docker run") + _doc_commands("apptainer run"))
def test_documented_commands_parse_with_the_real_cli(command):
    tokens = shlex.split(command.split("#")[0])
    image = next(i for i, t in enumerate(tokens) if t in ("bids_uad", "bids_uad.sif"))
    args = build_parser().parse_args(tokens[image + 1:])  # raises UsageError on a bad option
    assert args.bids_dir == Path("/data") and args.output_dir == Path("/out")
    assert args.analysis_level in ("participant", "group")
