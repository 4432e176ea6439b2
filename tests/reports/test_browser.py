"""Open the participant and group reports in headless Chromium: screenshot, DOM, console.

Chromium (Debian's ``chromium`` package) is installed with apt-get when it is missing and the
tests run as root; elsewhere the test is skipped with the reason.  Set
``BIDS_UAD_SCREENSHOT_DIR`` to keep the screenshots.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=10000"]
SECTIONS = ("summary", "anatomical", "diffusion", "anomaly", "longitudinal", "about", "errors")


def _find() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _apt(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(["apt-get", *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of the chromium program, installing Debian's package when missing and allowed."""
    exe = _find()
    if exe:
        return exe
    if not shutil.which("apt-get"):
        pytest.skip("headless Chromium not found and apt-get is not available: install 'chromium'")
    if os.geteuid() != 0:
        pytest.skip("headless Chromium not found and not running as root: run 'apt-get install chromium'")
    try:
        result = _apt("install", "-y", "--no-install-recommends", "chromium")
        if result.returncode != 0:
            _apt("update", timeout=300)
            result = _apt("install", "-y", "--no-install-recommends", "chromium")
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"could not install chromium with apt-get: {exc}")
    exe = _find()
    if result.returncode != 0 or not exe:
        pytest.skip("could not install chromium with apt-get: " + (result.stderr or result.stdout)[-400:])
    try:  # a font for the screenshots; the test does not depend on it
        _apt("install", "-y", "--no-install-recommends", "fonts-dejavu-core", timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        pass
    return exe


def _run(chromium: str, profile: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    profile.mkdir(parents=True, exist_ok=True)
    cmd = [chromium, *FLAGS, f"--user-data-dir={profile}", *extra, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _console(stderr: str) -> list[str]:
    """Console messages and uncaught errors the page produced (our pages log nothing)."""
    return [ln for ln in stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]


def _check_page(chromium: str, html: Path, tmp_path: Path, name: str, ids: tuple[str, ...]) -> Path:
    url = html.resolve().as_uri()
    dom = _run(chromium, tmp_path / f"profile-{name}-dom", url, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = dom.stdout
    assert not _console(dom.stderr), _console(dom.stderr)
    for section in ids:
        assert f'id="{section}"' in text, section
    n_img = len(re.findall(r"<img\b", html.read_text()))
    assert n_img > 0
    match = re.search(r'data-images="(\d+)"', text)
    assert match, "the page's image check did not run (no data-images on <body>)"
    assert int(match.group(1)) == n_img
    assert 'data-broken-images="0"' in text, re.findall(r'<img[^>]*class="[^"]*broken[^>]*>', text)
    for src in re.findall(r'<img[^>]*\bsrc="([^"]+)"', text):
        assert (html.parent / src).is_file(), src
    shot = tmp_path / f"{name}.png"
    result = _run(chromium, tmp_path / f"profile-{name}-shot", url, f"--screenshot={shot}",
                  "--window-size=1280,4000")
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    import matplotlib.image as mpimg

    pixels = mpimg.imread(str(shot))
    assert pixels.shape[0] >= 4000 and pixels.std() > 0.05  # not a blank page
    keep = os.environ.get("BIDS_UAD_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)
    return shot


def test_participant_report_in_browser(chromium, built_reports, tmp_path):
    _check_page(chromium, built_reports["html"], tmp_path, "sub-01", SECTIONS)


def test_group_report_in_browser(chromium, built_reports, tmp_path):
    _check_page(chromium, built_reports["group"], tmp_path, "group",
                ("cohort", "training", "calibration", "evaluation", "about", "errors"))


def test_console_errors_are_detected(chromium, tmp_path):
    """The console check itself works: a page with an uncaught error is caught."""
    page = tmp_path / "bad.html"
    page.write_text("<!DOCTYPE html><html><body><script>undefinedFunction();</script></body></html>")
    result = _run(chromium, tmp_path / "profile-bad", page.as_uri(), "--dump-dom")
    assert any("Uncaught" in line for line in _console(result.stderr))
