"""Real-browser fixtures: the app served by ``streamlit run``, Debian's Chromium via Playwright."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
START_TIMEOUT_S = 90

# Uploads the app servers keep for links and reloads go to a folder of this test run (the
# servers inherit the environment), not the repository's working directory.
_UPLOADS = tempfile.mkdtemp(prefix="explainer-test-uploads-")
os.environ.setdefault("EXPLAINER_UPLOAD_DIR", _UPLOADS)
atexit.register(shutil.rmtree, _UPLOADS, ignore_errors=True)
# The running server of this test session: {"url": ..., "process": subprocess.Popen}.
SERVER: dict[str, object] = {}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """Debian's Chromium; missing is a failure in CI and a skip elsewhere."""
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        reason = f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)."
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")


@contextmanager
def serve_app(
    log_path: Path, env: dict[str, str] | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    """``streamlit run app.py`` on a free loopback port, with ``env`` as its environment (this
    process's by default), logging to ``log_path``; yields its address and process once it
    answers, and stops it afterwards."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "streamlit",
                "run",
                "app.py",
                "--server.port",
                str(port),
                "--server.headless",
                "true",
                "--server.fileWatcherType",
                "none",  # a file edited during a run must not re-import modules under the server
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not _healthy(url):
                if process.poll() is not None:
                    pytest.fail(f"streamlit exited with code {process.returncode}; see {log_path}")
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"streamlit did not answer within {START_TIMEOUT_S} s; see {log_path}"
                    )
                time.sleep(0.5)
            yield url, process
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=15)


@pytest.fixture(scope="session")
def app_url() -> Iterator[str]:
    """Start ``streamlit run app.py`` on a free port, wait until it answers, stop it at the end."""
    # The log is gitignored with the screenshots.
    with serve_app(SCREENSHOTS / "streamlit-server.log") as (url, process):
        SERVER.update(url=url, process=process)
        try:
            yield url
        finally:
            SERVER.clear()


@pytest.fixture(scope="session")
def browser(chromium_path: str):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            instance.close()


@pytest.fixture
def page(browser, app_url: str):
    """A fresh browser context (a new Streamlit session) with a wide, tall viewport.

    Streamlit scrolls inside its own container, so a full-page screenshot shows only the
    viewport: a tall one lets the screenshots show whole pages.
    """
    context = browser.new_context(viewport={"width": 1500, "height": 2400})
    tab = context.new_page()
    tab.set_default_timeout(60_000)
    try:
        yield tab
    finally:
        context.close()


@pytest.fixture(scope="session")
def app_server(app_url: str) -> tuple[str, subprocess.Popen]:
    """The app's address and its ``streamlit run`` process (for watching its worker processes)."""
    process = SERVER["process"]
    assert isinstance(process, subprocess.Popen)
    return app_url, process
