"""Fixtures of the browser tests: the real dashboard server, a headless Chromium, one fresh page per test.

The server is the launcher's command (`streamlit run dashboard/serve.py`: the pages behind the Host
check) on a free port, an empty run store and the bundled mlp at 64 samples; analyses run in worker processes (no
QUANTLENS_SYNC_JOBS), so the progress fragment's polling is exercised too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from dashboard import launch

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SERVER_START_TIMEOUT_S = 90
VIEWPORT = {"width": 1440, "height": 1800}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _health(url: str) -> str:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=5) as response:
            return response.read().decode(errors="replace").strip()
    except (urllib.error.URLError, OSError):
        return ""


@pytest.fixture(scope="module")
def sync_playwright_api():
    """Playwright's sync API, or a skip saying what is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        pytest.skip(f"playwright is not installed ({exc})")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    return sync_playwright


@contextlib.contextmanager
def dashboard_server(root: Path, **env_extra: str):
    """The dashboard (the launcher's command) on a free port with its run store and uploads in `root`;
    yields (base url, run store). Killed (process group) on exit."""
    runs, uploads = root / "runs", root / "uploads"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QUANTLENS_", "STREAMLIT_"))}
    env.update(QUANTLENS_RUNS_DIR=str(runs), QUANTLENS_UPLOAD_DIR=str(uploads), PYTHONUNBUFFERED="1", **env_extra)
    command = launch.command(port=port)
    assert command[1:4] == ["-m", "streamlit", "run"] and Path(command[4]).is_absolute()
    log_path = root / "server.log"
    log = log_path.open("wb")
    proc = subprocess.Popen([sys.executable, *command[1:]], cwd=str(root), env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while _health(url) != "ok":
            if proc.poll() is not None:
                raise RuntimeError(f"the dashboard exited ({proc.returncode}):\n{log_path.read_text(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no healthy dashboard after {SERVER_START_TIMEOUT_S} s:\n"
                                   f"{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        yield url, runs
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        log.close()


@pytest.fixture(scope="module")
def server(sync_playwright_api, tmp_path_factory):
    """The dashboard on a free port, an empty store, the bundled mlp at 64 samples; yields (base url, run store)."""
    try:
        with dashboard_server(tmp_path_factory.mktemp("e2e"), QUANTLENS_DEFAULT_SAMPLE="mlp",
                              QUANTLENS_DEFAULT_SAMPLES="64") as served:
            yield served
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def browser(sync_playwright_api):
    with sync_playwright_api() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def screenshot_dir(tmp_path_factory) -> Path:
    """Where each page's screenshot goes: $QUANTLENS_SCREENSHOT_DIR, else a pytest tmp dir."""
    folder = os.environ.get("QUANTLENS_SCREENSHOT_DIR")
    path = Path(folder).expanduser() if folder else tmp_path_factory.mktemp("screens")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def page(browser, server):
    """A fresh browser session on the dashboard (a new Streamlit session per test)."""
    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True, device_scale_factor=1)
    context.set_default_timeout(60_000)
    tab = context.new_page()
    try:
        yield tab
    finally:
        context.close()

