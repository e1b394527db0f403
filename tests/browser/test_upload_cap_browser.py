"""One upload limit: a model file above Streamlit's own cap but within EXPLAINER_MAX_UPLOAD_MB
reaches the app (which then judges the file) instead of failing behind Streamlit's small red
icon. The server here starts with Streamlit's cap at 1 MB and the project's limit at 3 MB."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import serve_app

pytestmark = pytest.mark.browser

SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"


@pytest.fixture
def small_cap_server(tmp_path: Path) -> Iterator[str]:
    env = dict(
        os.environ,
        STREAMLIT_SERVER_MAX_UPLOAD_SIZE="1",  # Streamlit's own cap, in MB
        EXPLAINER_MAX_UPLOAD_MB="3",  # the project's model file limit
    )
    with serve_app(tmp_path / "server.log", env) as (url, _process):
        yield url


def _upload(page, url: str, name: str, size: int) -> str:
    page.goto(url)
    page.get_by_text("Upload my own").click()
    uploader = page.locator('[data-testid="stFileUploader"]').filter(has_text="Model file")
    uploader.locator('input[type="file"]').set_input_files(
        {"name": name, "mimeType": "application/octet-stream", "buffer": b"\0" * size}
    )
    page.get_by_text(name).first.wait_for()
    page.wait_for_timeout(1500)  # let the upload finish or fail
    return uploader.inner_text()


def test_a_model_above_streamlits_cap_but_within_the_limit_is_accepted(
    browser, chromium_path, small_cap_server
):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    try:
        text = _upload(page, small_cap_server, "two_megabytes.pt", 2 * 2**20)
        body = page.locator('[data-testid="stMain"]').inner_text()
        assert "Model files up to 3 MB" in body and "EXPLAINER_MAX_UPLOAD_MB" in body
        assert "too large" not in text.lower() and "exceeds" not in text.lower(), text
        assert "AxiosError" not in text and "413" not in text, text
        assert page.get_by_role("button", name="Load model").is_enabled()
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "upload_cap_accepted.png"))
        # Above the project's limit, the browser says so before sending anything.
        _upload(page, small_cap_server, "four_megabytes.pt", 4 * 2**20)
        assert page.get_by_role("button", name="Load model").is_disabled()
        page.screenshot(path=str(SCREENSHOTS / "upload_cap_refused.png"))
    finally:
        context.close()
