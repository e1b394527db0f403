"""Fixtures for the AppTest suites (helpers live in ``apphelpers``)."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# tests/hostile.py (hostile files shared with the library tests) is imported from tests/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apphelpers import APP, TIMEOUT  # noqa: E402

# Uploads the app keeps for links and reloads go to a folder of this test run, not the
# repository's working directory (the app's default).
_UPLOADS = tempfile.mkdtemp(prefix="explainer-test-uploads-")
os.environ["EXPLAINER_UPLOAD_DIR"] = _UPLOADS
atexit.register(shutil.rmtree, _UPLOADS, ignore_errors=True)
from streamlit.testing.v1 import AppTest  # noqa: E402


@pytest.fixture(autouse=True)
def _full_maps(monkeypatch):
    """Pages wait for the asked-for conductance map, never showing a first look, unless a test
    asks for one (tests/app/test_first_look.py): the other suites check the full map's values.
    Set per test, so that the browser tests' server (same pytest process) keeps the default."""
    monkeypatch.setenv("EXPLAINER_FIRST_LOOK_AFTER_S", "300")


@pytest.fixture
def app() -> AppTest:
    """The app after its first run (the Model & images page on the built-in model)."""
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at
