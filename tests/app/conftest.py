"""Fixtures for the AppTest suites (helpers live in ``apphelpers``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# tests/hostile.py (hostile files shared with the library tests) is imported from tests/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apphelpers import APP, TIMEOUT  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402


@pytest.fixture
def app() -> AppTest:
    """The app after its first run (the Model & images page on the built-in model)."""
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at
