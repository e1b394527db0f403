"""A browser job that fails says what happened in plain words; Playwright's own text (API names
like ``BrowserType.launch:``) goes to the server log, never to the page."""

from __future__ import annotations

import logging

import plotly.graph_objects as go
import pytest

pytest.importorskip("playwright.sync_api")
import playwright.sync_api as pw_api  # noqa: E402

from webapp import export  # noqa: E402

LAUNCH_CLOSED = (
    "BrowserType.launch: Target page, context or browser has been closed\n"
    "Browser logs:\n\n<launching> /usr/bin/chromium --no-sandbox\n"
    "[pid=77][err] chromium: cannot start here\n[pid=77] <process did exit: exitCode=1>"
)
CASES = {
    # Playwright's text: (kind, words the user reads)
    LAUNCH_CLOSED: ("start", "Chromium could not be started on the server"),
    "BrowserType.launch: spawn /usr/bin/chromium EACCES": (
        "start",
        "Chromium could not be started on the server",
    ),
    "Page.set_content: Target page, context or browser has been closed": (
        "closed",
        "Chromium closed before it was done (it may have run out of memory or crashed)",
    ),
    "Page.evaluate: Target crashed": ("closed", "Chromium closed before it was done"),
    "Page.goto: Timeout 60000ms exceeded.": ("timeout", "Chromium did not finish in time"),
    "Page.pdf: Protocol error (Page.printToPDF): Printing failed": (
        "error",
        "Chromium stopped with an error",
    ),
}
API_NAMES = ("BrowserType.", "Page.", "Browser.", "Playwright", "Target page", "exitCode")


@pytest.mark.parametrize("text", list(CASES))
def test_each_kind_of_failure_gets_plain_words(text):
    kind, reason = export.chromium_failure_reason(text)
    assert kind == CASES[text][0]
    assert reason.startswith(CASES[text][1])
    assert not any(name in reason for name in API_NAMES)


class _FakeChromium:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def launch(self, **kwargs):
        raise self.error


class _FakePlaywright:
    """Stands in for ``sync_playwright()``: its Chromium fails with ``error`` on launch."""

    def __init__(self, error: Exception) -> None:
        self.chromium = _FakeChromium(error)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        return None


@pytest.mark.parametrize(
    ("text", "kind", "todo"),
    [
        (LAUNCH_CLOSED, "start", "the operator should check that Chromium runs on the server"),
        ("Page.set_content: Target page, context or browser has been closed", "closed", "Try"),
        ("Page.goto: Timeout 60000ms exceeded.", "timeout", "show fewer channels"),
    ],
)
def test_a_failed_png_is_told_plainly_and_logged_in_full(monkeypatch, caplog, text, kind, todo):
    monkeypatch.setattr(export, "chromium_path", lambda: "/usr/bin/chromium")
    monkeypatch.setattr(pw_api, "sync_playwright", lambda: _FakePlaywright(pw_api.Error(text)))
    with caplog.at_level(logging.WARNING, logger="webapp.export"):
        with pytest.raises(export.ChromiumFailed) as info:
            export.figure_png(go.Figure())
    assert info.value.kind == kind
    message = export.render_failure_message(info.value, "png")
    assert message.startswith(f"The PNG could not be drawn: {CASES[text][1]}")
    assert todo in message
    assert "Nothing on this page is lost" in message
    for name in API_NAMES:
        assert name not in message, name
        assert name not in str(info.value), name
    # The operator finds Playwright's full text in the server log.
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert text.splitlines()[0] in logged
    assert "/usr/bin/chromium" in logged


def test_the_pdf_failure_names_the_job_in_plain_words(monkeypatch):
    monkeypatch.setattr(export, "chromium_path", lambda: "/usr/bin/chromium")
    error = pw_api.Error("Page.pdf: Target page, context or browser has been closed")
    monkeypatch.setattr(pw_api, "sync_playwright", lambda: _FakePlaywright(error))
    with pytest.raises(export.ChromiumFailed) as info:
        export.html_pdf("<p>report</p>")
    assert str(info.value) == (
        "Printing the PDF failed: Chromium closed before it was done (it may have run out of "
        "memory or crashed)."
    )
