"""The Dockerfile, read without a Docker engine: every path, stage, pin and setting it relies on.

No engine runs on the test machines, so these tests keep the file honest instead: COPY
sources exist and are in the build context, ``COPY --from`` names real stages (for both
values of ``WITH_FSL``), the CPU torch 2.13.0 goes in before the package and the package
goes in with the constraints file, the ENV paths point where files are copied, the entry
point reaches the ``bids_uad`` console script, and the image runs as a non-root user.
"""
from __future__ import annotations

import configparser
import os
import re
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import bids_uad
from tests.containers.dockerfile_parser import Dockerfile, dockerignore_excludes, substitute

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return Dockerfile(DOCKERFILE)


def _console_scripts() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict((part.strip() for part in line.split("=", 1)) for line in lines if "=" in line)


def _copies(dockerfile: Dockerfile):
    for stage in dockerfile.stages:
        for ins in stage.find("COPY") + stage.find("ADD"):
            yield stage, ins


def _runs(stage) -> list[str]:
    return [ins.args for ins in stage.find("RUN")]


def test_multi_stage_with_a_slim_pinned_runtime(dockerfile):
    assert len(dockerfile.stages) >= 3
    names = dockerfile.stage_names()
    assert len(names) == len([s for s in dockerfile.stages if s.name]), "duplicate stage names"
    for stage in dockerfile.stages:
        base = dockerfile.base_of(stage)
        if base in names:
            continue
        assert ":" in base and not base.endswith(":latest"), f"unpinned base image {base}"
    runtime_base = dockerfile.base_of(dockerfile.final)
    assert "slim" in runtime_base, "the runtime stage should start from a slim image"
    # nothing heavy in the runtime stage: no compilers, no pip install of packages
    for run in _runs(dockerfile.final):
        assert "pip install" not in run and "apt-get install" not in run and "micromamba" not in run, run


def test_copy_sources_exist_and_are_in_the_build_context(dockerfile):
    checked = 0
    for _, ins in _copies(dockerfile):
        if "from" in ins.flags():
            continue
        *sources, _dest = ins.positional()
        for source in sources:
            source = substitute(source, dockerfile.args)
            assert not source.startswith(("/", "..")), f"line {ins.line}: {source} is outside the context"
            assert (REPO / source).exists(), f"line {ins.line}: COPY source {source} does not exist"
            assert not dockerignore_excludes(DOCKERIGNORE, source), \
                f"line {ins.line}: {source} is excluded by .dockerignore"
            checked += 1
    assert checked >= 5


@pytest.mark.parametrize("with_templateflow", ["true", "false"])
@pytest.mark.parametrize("with_fsl", ["true", "false"])
def test_copy_from_names_an_earlier_stage(with_fsl, with_templateflow):
    dockerfile = Dockerfile(DOCKERFILE, {"WITH_FSL": with_fsl, "WITH_TEMPLATEFLOW": with_templateflow})
    seen: set[str] = set()
    for stage in dockerfile.stages:
        base = dockerfile.base_of(stage)
        if "$" in base:
            pytest.fail(f"FROM {stage.base}: build argument without a default")
        if base.startswith(("fsl-", "templates-")):
            assert base in seen, f"FROM {base}: no such earlier stage for WITH_FSL={with_fsl}, " \
                                 f"WITH_TEMPLATEFLOW={with_templateflow}"
        for ins in stage.find("COPY"):
            source_stage = ins.flags().get("from")
            if source_stage is not None:
                source_stage = substitute(source_stage, dockerfile.args)
                assert source_stage in seen, f"line {ins.line}: COPY --from={source_stage} is not an earlier stage"
        if stage.name:
            seen.add(stage.name)
            seen.add(str(stage.index))


def test_fsl_stage_behind_with_fsl_build_arg(dockerfile):
    assert dockerfile.global_args.get("WITH_FSL") == "true", "FSL is on by default"
    assert {"fsl-true", "fsl-false"} <= dockerfile.stage_names()
    fsl = dockerfile.stage("fsl-true")
    text = " ".join(_runs(fsl) + [i.args for i in fsl.find("ARG")])
    assert "fsl.fmrib.ox.ac.uk/fsldownloads/fslconda/public" in text
    assert "conda-forge" in text
    for package in ("fsl-topup", "fsl-eddy", "fsl-bet2", "fsl-fast4"):
        assert package in text, package
    assert "cuda" not in text.lower(), "the CPU eddy only"
    # the programs bids_uad looks for (config.FSL_PROGRAMS) are checked in the build
    from bids_uad.config import FSL_PROGRAMS

    for program in FSL_PROGRAMS:
        assert re.search(rf"\b{program}\b", text), f"FSL program {program} not checked in the build"
    fsl_dirs = {ins.positional()[-1] for ins in dockerfile.final.find("COPY") if ins.flags().get("from") == "fsl"}
    env = dockerfile.final.env()
    assert env.get("FSLDIR") in fsl_dirs
    assert env.get("FSLOUTPUTTYPE") == "NIFTI_GZ"
    assert f"{env['FSLDIR']}/bin" in env["PATH"].split(":")


def _package_install_stage(dockerfile):
    for stage in dockerfile.stages:
        for index, run in enumerate(_runs(stage)):
            if re.search(r"pip install[^&;]*\s-c\s+\S*constraints\.txt[^&;]*\s\.(\s|$)", run):
                return stage, index, run
    pytest.fail("no RUN installs the package (pip install -c constraints.txt .)")


def test_package_installed_with_the_constraints_file(dockerfile):
    stage, _, _ = _package_install_stage(dockerfile)
    copied = [src for ins in stage.find("COPY") for src in ins.positional()[:-1]]
    assert "constraints.txt" in copied
    pins = dict(line.split("==", 1) for line in (REPO / "constraints.txt").read_text().split() if "==" in line)
    assert pins.get("torch") == "2.13.0", "constraints.txt pins torch 2.13.0"


def test_cpu_torch_pinned_and_installed_before_the_package(dockerfile):
    stage, package_index, _ = _package_install_stage(dockerfile)
    runs = _runs(stage)
    torch_runs = [i for i, run in enumerate(runs) if re.search(r"torch", run) and "pip install" in run]
    assert torch_runs, "torch is not installed on its own"
    first = torch_runs[0]
    assert first < package_index or (first == package_index and runs[first].index("torch==")
                                     < runs[first].index("constraints.txt")), "torch must go in first"
    torch_run = runs[first]
    assert re.search(r"[\"']?torch==2\.13\.0[\"']?", torch_run), "torch pinned to 2.13.0"
    assert "${TORCH_PIP_ARGS}" in torch_run and any(a.args == "TORCH_PIP_ARGS" for a in stage.find("ARG")), \
        "where pip finds torch is the TORCH_PIP_ARGS build argument, declared in the stage"
    assert "--index-url https://download.pytorch.org/whl/cpu" in substitute(torch_run, dockerfile.args), \
        "by default torch comes from the CPU wheel index"
    setup_pin = [line.strip() for line in (REPO / "setup.cfg").read_text().splitlines() if line.strip().startswith("torch")]
    assert setup_pin == ["torch==2.13.0"], "setup.cfg and the Dockerfile disagree on torch"


def test_entrypoint_reaches_the_console_script(dockerfile):
    scripts = _console_scripts()
    assert "bids_uad" in scripts and scripts["bids_uad"] == "bids_uad.cli.run:main"
    entry = dockerfile.final.find("ENTRYPOINT")
    assert entry, "no ENTRYPOINT"
    assert entry[-1].args.strip().startswith("["), "ENTRYPOINT in exec (JSON) form, so signals reach bids_uad"
    program = entry[-1].positional()[0]
    if program == "bids_uad":
        return
    # a wrapper script: copied from the repo to that path, ending in exec bids_uad "$@"
    sources = [ins.positional()[0] for ins in dockerfile.final.find("COPY")
               if "from" not in ins.flags() and ins.positional()[-1] == program]
    assert sources, f"ENTRYPOINT {program} is not copied into the runtime stage"
    text = (REPO / sources[0]).read_text().strip().splitlines()
    assert text[-1].strip() == 'exec bids_uad "$@"'
    assert os.access(REPO / sources[0], os.X_OK), f"{sources[0]} is not executable"
    assert any(program in run and "chmod" in run for run in _runs(dockerfile.final))


def test_env_paths_are_consistent(dockerfile):
    env = dockerfile.final.env()
    copied = {ins.positional()[-1] for ins in dockerfile.final.find("COPY")}
    path = env["PATH"].split(":")
    assert path[0] == "/opt/venv/bin", "the virtualenv comes first on PATH"
    assert "/opt/venv" in copied
    build_runs = " ".join(_runs(dockerfile.stage("build")))
    assert "python -m venv /opt/venv" in build_runs
    assert env["TEMPLATEFLOW_HOME"] == "/opt/templateflow" and "/opt/templateflow" in copied
    for name in ("templates-true", "templates-false"):
        templates = dockerfile.stage(name)
        assert templates.env().get("TEMPLATEFLOW_HOME") == env["TEMPLATEFLOW_HOME"], name
    assert any("bids_uad-fetch-templates" in run and "--skip" not in run and "--check" not in run
               for run in _runs(dockerfile.stage("templates-true"))), "templates are fetched at build time"
    assert any("bids_uad-fetch-templates --skip" in run for run in _runs(dockerfile.stage("templates-false")))
    assert env.get("TEMPLATEFLOW_AUTOUPDATE") == "0"
    home = env["HOME"]
    assert home.startswith("/tmp/"), "HOME under /tmp: writable with a read-only root filesystem"
    for var in ("MPLCONFIGDIR", "NUMBA_CACHE_DIR", "TORCH_HOME", "XDG_CACHE_HOME", "BIDS_UAD_CACHE"):
        assert env[var].startswith(home + "/") or env[var].startswith("/tmp/"), var
    # the entry point knows every cache variable the image sets
    entrypoint = (REPO / "docker" / "entrypoint.sh").read_text()
    for var in ("MPLCONFIGDIR", "NUMBA_CACHE_DIR", "TORCH_HOME", "XDG_CACHE_HOME", "BIDS_UAD_CACHE"):
        assert var in entrypoint, var


def test_build_arguments_default_to_todays_behaviour(dockerfile):
    """Base images, torch source, TemplateFlow and extra CAs are build arguments (air-gapped or
    TLS-intercepting networks); their defaults give the image built from the official sources."""
    args = dockerfile.global_args
    assert args["RUNTIME_IMAGE"] == "python:3.11-slim-bookworm"
    assert args["BUILD_IMAGE"] == "python:3.11-slim-bookworm", "the build's Python must be the runtime's"
    assert args["TORCH_PIP_ARGS"] == "--index-url https://download.pytorch.org/whl/cpu"
    assert args["WITH_TEMPLATEFLOW"] == "true"
    assert dockerfile.final.base == "${RUNTIME_IMAGE}"
    assert dockerfile.stage("build").base == "${BUILD_IMAGE}"
    assert dockerfile.stage("templates-true").base == "build" and dockerfile.stage("templates-false").base == "build"
    labels = " ".join(i.args for i in dockerfile.final.find("LABEL"))
    assert 'bids_uad.with-templateflow="${WITH_TEMPLATEFLOW}"' in labels
    assert any(i.args == "WITH_TEMPLATEFLOW" for i in dockerfile.final.find("ARG")), "the label needs the ARG"


def test_no_syntax_directive():
    """A ``# syntax=`` line makes BuildKit fetch a frontend image from Docker Hub."""
    first = DOCKERFILE.read_text().splitlines()
    assert not any(re.match(r"#\s*syntax\s*=", line) for line in first), "no # syntax= directive"


def test_extra_ca_certificates_reach_the_build_stages_only(dockerfile):
    build = dockerfile.stage("build")
    assert any(a.args.startswith("BUILD_CA_CERTS=") for a in build.find("ARG")), "BUILD_CA_CERTS declared in build"
    assert dockerfile.global_args.get("BUILD_CA_CERTS") is None, "not a global default: empty unless given"
    ca_run = next(run for run in _runs(build) if "BUILD_CA_CERTS" in run)
    assert "update-ca-certificates" in ca_run and "/etc/pip.conf" in ca_run
    assert ca_run.index("BUILD_CA_CERTS") < ca_run.index("update-ca-certificates")
    runs = _runs(build)
    torch_index = next(i for i, run in enumerate(runs) if "torch==" in run)
    assert runs.index(ca_run) < torch_index, "the certificates are trusted before pip runs"
    assert "REQUESTS_CA_BUNDLE" in " ".join(_runs(dockerfile.stage("templates-true")))
    final_text = " ".join(i.args for i in dockerfile.final.instructions)
    assert "BUILD_CA_CERTS" not in final_text and "ca-certificates" not in final_text
    # the runtime copies only the virtualenv, FSL and the templates out of the build stages
    copied = {ins.positional()[0] for ins in dockerfile.final.find("COPY") if "from" in ins.flags()}
    assert copied == {"/opt/venv", "/opt/fsl", "/opt/templateflow"}


def test_runs_as_non_root(dockerfile):
    users = dockerfile.final.find("USER")
    assert users, "no USER in the runtime stage"
    user = users[-1].args.strip().split(":")[0]
    assert user not in ("root", "0")
    runs = " ".join(_runs(dockerfile.final))
    if not user.isdigit():
        assert re.search(rf"useradd\b[^&;]*\b{re.escape(user)}\b", runs), f"user {user} is never created"
    # nothing after USER switches back
    last_user = dockerfile.final.instructions.index(users[-1])
    assert all(i.keyword != "RUN" or "sudo" not in i.args for i in dockerfile.final.instructions[last_user:])


def test_dockerignore_keeps_the_context_small():
    for path in (".venv/bin/python", ".git/HEAD", "work/x", "demo/x", "tests/conftest.py",
                 "benchmarks/results/x.json", "bids_uad/__pycache__/run.cpython-311.pyc"):
        assert dockerignore_excludes(DOCKERIGNORE, path), path
    for path in ("bids_uad/cli/run.py", "setup.cfg", "constraints.txt", "docker/entrypoint.sh"):
        assert not dockerignore_excludes(DOCKERIGNORE, path), path


def test_package_data_is_in_the_build_context():
    for path in (REPO / "bids_uad").rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts:
            rel = path.relative_to(REPO).as_posix()
            assert not dockerignore_excludes(DOCKERIGNORE, rel), rel


def test_image_version_matches_the_package(dockerfile):
    versions = [ins.args.split("=", 1)[1].strip('"') for ins in dockerfile.final.find("ARG")
                if ins.args.startswith("VERSION=")]
    assert versions == [bids_uad.__version__]


# ------------------------------------------------------------------ the helper scripts ----

@pytest.fixture()
def docker_fetch():
    """docker/fetch_templates.py as a module (it is a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fetch_templates", REPO / "docker" / "fetch_templates.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_template_files_are_those_bids_uad_reads(tmp_path, docker_fetch):
    """The files the build fetches are exactly the ones ``algorithms.templates`` looks for."""
    from bids_uad.algorithms.templates import _templateflow_files

    assert _templateflow_files(tmp_path) is None
    assert docker_fetch.check(tmp_path)  # everything missing
    rng = np.random.default_rng(0)
    for path in docker_fetch.expected_paths(tmp_path):
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(rng.random((12, 12, 12)).astype(np.float32), np.eye(4)), path)
    assert docker_fetch.check(tmp_path) == []
    found = _templateflow_files(tmp_path)
    assert found is not None, "the fetched names differ from what bids_uad reads"
    assert sorted(Path(p).name for p in found.values()) == sorted(name for _, name in docker_fetch.FILES)
    queries = [query for query, _ in docker_fetch.FILES]
    assert all(q["resolution"] == 1 for q in queries)
    assert {q.get("label") for q in queries} >= {"GM", "WM", "CSF"}


def test_fetch_script_check_mode_fetches_nothing(tmp_path, docker_fetch, monkeypatch):
    monkeypatch.setattr(docker_fetch, "fetch", lambda home: pytest.fail("--check must not fetch"))
    assert docker_fetch.main(["--check", "--home", str(tmp_path)]) == 1


def test_fetch_script_skip_mode_marks_the_folder_for_the_nilearn_fallback(tmp_path, docker_fetch, monkeypatch,
                                                                         capsys):
    """WITH_TEMPLATEFLOW=false: nothing fetched, ``--check`` passes, bids_uad uses nilearn's template."""
    from bids_uad.algorithms.templates import NILEARN_NAME, _templateflow_files

    monkeypatch.setattr(docker_fetch, "fetch", lambda home: pytest.fail("--skip must not fetch"))
    home = tmp_path / "templateflow"
    assert docker_fetch.main(["--skip", "--home", str(home)]) == 0
    assert sorted(p.name for p in home.iterdir()) == [docker_fetch.SKIP_MARKER]
    assert docker_fetch.main(["--check", "--home", str(home)]) == 0
    assert "nilearn" in capsys.readouterr().out
    assert _templateflow_files(home) is None, "the marker is not mistaken for TemplateFlow files"
    assert NILEARN_NAME in (home / docker_fetch.SKIP_MARKER).read_text()


def _fake_program(folder: Path, name: str, body: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def test_entrypoint_wrapper_makes_home_and_passes_arguments(tmp_path):
    bin_dir = tmp_path / "bin"
    record = tmp_path / "record"
    _fake_program(bin_dir, "bids_uad", f'printf "%s\\n" "$HOME" "$MPLCONFIGDIR" "$@" > {record}\nexit 7\n')
    blocker = tmp_path / "file"
    blocker.write_text("a regular file: nothing can be created below it")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(blocker / "home"),
           "MPLCONFIGDIR": str(blocker / "mpl")}
    result = subprocess.run(["sh", str(REPO / "docker" / "entrypoint.sh"), "/data", "/out", "participant",
                             "--participant-label", "a b"], env=env, capture_output=True, text=True)
    assert result.returncode == 7, result.stderr  # bids_uad's exit status comes through
    home, mpl, *args = record.read_text().splitlines()
    assert home == f"/tmp/home-{os.getuid()}" and Path(home).is_dir()
    assert mpl == f"{home}/.config/matplotlib" and Path(mpl).is_dir()
    assert args == ["/data", "/out", "participant", "--participant-label", "a b"]


def test_entrypoint_wrapper_keeps_a_writable_home(tmp_path):
    bin_dir = tmp_path / "bin"
    record = tmp_path / "record"
    _fake_program(bin_dir, "bids_uad", f'echo "$HOME $TORCH_HOME" > {record}\n')
    home = tmp_path / "home"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home), "TORCH_HOME": str(home / "torch")}
    result = subprocess.run(["sh", str(REPO / "docker" / "entrypoint.sh"), "--version"], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert record.read_text().split() == [str(home), str(home / "torch")]
    assert (home / "torch").is_dir()


def test_shell_scripts_parse():
    for script in [REPO / "docker" / "entrypoint.sh"]:
        subprocess.run(["sh", "-n", str(script)], check=True)
