"""Report page and the "Add this view to the report" rows: empty report, collecting views from the
pages, reordering and removing them, and export failures that keep every view."""

from __future__ import annotations

import pytest
from apphelpers import (
    PAGE_CONDUCTANCE,
    PAGE_CONVERGENCE,
    PAGE_NEURON,
    PAGE_OVERVIEW,
    PAGE_REPORT,
    error_text,
    open_page,
    plotly_specs,
    visible,
)
from downloadhelpers import capture, open_menu, row_files
from streamlit.testing.v1 import AppTest

from webapp import export
from webapp import report as R


def _button(at: AppTest, label: str):
    for button in at.button:
        if button.label == label:
            return button
    raise AssertionError(f"no button {label!r}; have {[b.label for b in at.button]}")


def _download(at: AppTest, key: str):
    for element in at.get("download_button"):
        if element.proto.id.endswith(key):
            return element
    raise AssertionError(f"no download button {key!r}")


def _add_view(at: AppTest, page: str) -> None:
    open_page(at, page)
    _button(at, "Add this view to the report").click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, error_text(at)


def test_empty_report_says_how_to_add_views_and_offers_no_download(app):
    open_page(app, PAGE_REPORT)
    assert app.title[0].value == "Report"
    message = visible(app.info[0].value)
    assert "The report is empty" in message and "Add this view to the report" in message
    assert not app.get("download_button")
    pages = {link.proto.page for link in app.main.get("page_link")}
    assert {"layer_conductance", "neuron_gradient", "convergence"} <= pages


def test_views_added_from_the_pages_are_listed_and_downloadable(app):
    _add_view(app, PAGE_CONDUCTANCE)
    views = app.session_state["report_views"]
    assert len(views) == 1 and views[0].kind == "conductance"
    # The snapshot is plain data: read-only arrays and figure JSON, no live objects.
    assert all(not a.flags.writeable for a in views[0].arrays.values())
    assert {f.name for f in views[0].figures} >= {"channel_totals", "channel_maps", "channel_map"}
    _add_view(app, PAGE_NEURON)
    assert [v.kind for v in app.session_state["report_views"]] == ["conductance", "neuron"]

    open_page(app, PAGE_REPORT)
    assert not app.error, error_text(app)
    titles = [visible(m.value) for m in app.markdown if m.value.startswith("**1.")]
    assert titles and "Layer conductance of" in titles[0]
    html_button = _download(app, "_w_report_html")
    assert not html_button.proto.disabled

    # Reorder: the neuron view moves to the top, then is removed.
    next(b for b in app.button if b.key == "_w_report_up_1").click()
    app.run()
    assert [v.kind for v in app.session_state["report_views"]] == ["neuron", "conductance"]
    next(b for b in app.button if b.key == "_w_report_remove_0").click()
    app.run()
    assert [v.kind for v in app.session_state["report_views"]] == ["conductance"]


def test_title_and_notes_go_into_the_report_escaped(app):
    _add_view(app, PAGE_CONDUCTANCE)
    open_page(app, PAGE_REPORT)
    app.text_input(key="_w_report_title").input("<b>Review</b> & check").run()
    app.text_area(key="_w_report_notes").input("<script>alert(1)</script>").run()
    assert app.session_state["report_title"] == "<b>Review</b> & check"
    views = app.session_state["report_views"]
    html = R.build_html(views, app.session_state["report_title"], app.session_state["report_notes"])
    assert "&lt;b&gt;Review&lt;/b&gt; &amp; check" in html
    assert "<script>alert(1)</script>" not in html


def test_pdf_failure_is_a_clear_message_and_keeps_the_views(app, monkeypatch):
    monkeypatch.setattr(export, "chromium_path", lambda: "/usr/bin/chromium")

    def broken(*args, **kwargs):
        raise export.ExportError("Printing the PDF failed in Chromium: the browser crashed")

    monkeypatch.setattr(export, "html_pdf", broken)
    _add_view(app, PAGE_CONDUCTANCE)
    open_page(app, PAGE_REPORT)
    _button(app, "Create PDF").click()
    app.run()
    assert not app.exception
    assert "Printing the PDF failed" in error_text(app)
    assert "the browser crashed" in error_text(app)
    assert len(app.session_state["report_views"]) == 1
    assert not _download(app, "_w_report_html").proto.disabled


def test_without_chromium_the_page_says_which_exports_need_it(app, monkeypatch):
    monkeypatch.setattr(export, "chromium_path", lambda: None)
    _add_view(app, PAGE_CONDUCTANCE)
    captions = " ".join(c.value for c in app.caption)
    assert "apt-get install chromium" in captions  # the download row of the page
    open_page(app, PAGE_REPORT)
    infos = " ".join(visible(i.value) for i in app.info)
    assert "apt-get install chromium" in infos and "HTML report works without it" in infos
    assert not _download(app, "_w_report_html").proto.disabled


def test_a_full_report_refuses_more_views_with_a_message(app, monkeypatch):
    monkeypatch.setattr(R, "MAX_VIEWS", 1)
    _add_view(app, PAGE_CONDUCTANCE)
    _button(app, "Add this view to the report").click()
    app.run()
    assert "already holds 1 views" in error_text(app)
    assert len(app.session_state["report_views"]) == 1


@pytest.mark.slow
def test_convergence_view_carries_the_sweep_and_the_verdict(app):
    open_page(app, PAGE_CONVERGENCE)
    if not any(b.label == "Add this view to the report" for b in app.button):
        _button(app, "Run sweep").click()
        app.run()
    _button(app, "Add this view to the report").click()
    app.run()
    assert not app.error, error_text(app)
    (view,) = app.session_state["report_views"]
    assert view.kind == "convergence" and view.verdict is not None
    assert view.verdict.tolerance == pytest.approx(app.session_state["tolerance"])
    assert view.arrays["sweep_n_steps"].size > 0
    assert [f.name for f in view.figures] == ["convergence"]


def test_a_png_that_cannot_be_drawn_is_a_clear_message_and_loses_nothing(
    app, monkeypatch, tmp_path
):
    """Chromium configured but missing on the server: the click's rerun says what happened
    and what still works; the page, its choices and the other downloads stay."""
    offered = capture(monkeypatch)
    missing = str(tmp_path / "no-chromium-here")
    monkeypatch.setattr(export, "chromium_path", lambda: missing)
    open_page(app, PAGE_OVERVIEW)
    open_menu(app, "ovw")
    settings = app.session_state["attr_settings"]
    files = row_files(offered, "overview_")
    (png,) = [name for name in files if name.endswith("_overview.png")]
    button = _download(app, "ovw_dl_overview_png")
    assert not button.proto.disabled
    # The server runs the download; it fails, and the page's next run explains it.
    with pytest.raises(export.ExportError):
        files[png].data()
    app.run()
    assert not app.exception
    message = error_text(app)
    assert "The PNG could not be drawn: the server's Chromium is missing" in message
    assert missing in message and "apt-get install chromium" in message
    assert "the CSV and NPZ downloads and the HTML report still work" in message
    assert "Traceback" not in message and "BrowserType" not in message
    # Said in the open menu too (it covers the message under the row), and under the row.
    said = [e for e in app.error if "could not be drawn" in e.value]
    assert len(said) == 2
    # Nothing is lost: the chart, the table, the settings, and the other downloads.
    assert "ovw_chart" in plotly_specs(app) and len(app.dataframe[0].value) == 16
    assert app.session_state["attr_settings"] == settings
    csv = png.replace("_overview.png", "_total_conductance.csv")
    assert export.read_array_csv(offered[csv].data()).shape == (16,)
    # The message is said once: the next click elsewhere does not repeat it.
    app.run()
    assert "could not be drawn" not in error_text(app)


def test_views_of_the_new_pages_go_into_the_report(app):
    open_page(app, PAGE_OVERVIEW)
    next(b for b in app.button if b.key == "ovw_add_report").click()
    app.run()
    assert not app.error, error_text(app)
    (view,) = app.session_state["report_views"]
    assert view.kind == "overview" and [f.name for f in view.figures] == ["overview"]
    assert all(not a.flags.writeable for a in view.arrays.values())
    html = R.build_html(app.session_state["report_views"])
    figures = R.embedded_figures(html)
    assert list(figures) == ["overview"]
    assert "Layer overview" in html and "Every layer of the model in network order" in html
    open_page(app, PAGE_REPORT)
    assert not app.error, error_text(app)
