"""Array and figure exports: CSV and NPZ read back exactly; PNG and SVG are drawn by Chromium."""

from __future__ import annotations

import io
import os

import numpy as np
import plotly.graph_objects as go
import pytest
from PIL import Image

from webapp import export


@pytest.mark.parametrize(
    "array",
    [
        np.array([1.5, -2.25, 1e-300, np.pi]),
        np.arange(12, dtype=np.int64).reshape(3, 4) - 5,
        np.random.default_rng(0).standard_normal((2, 3, 4)),
        np.random.default_rng(1).standard_normal((2, 3, 4)).astype(np.float32),
        np.array([[0.1, 0.2, 0.30000000000000004]]),
    ],
)
def test_csv_round_trip_is_exact(array):
    data = export.array_csv(array)
    back = export.read_array_csv(data)
    assert back.shape == array.shape
    np.testing.assert_array_equal(back, array.astype(back.dtype))
    assert np.array_equal(back.astype(array.dtype), array)


def test_csv_names_the_dimensions_and_has_one_row_per_value():
    array = np.arange(6.0).reshape(2, 3)
    lines = export.array_csv(array, ("y", "x")).decode().splitlines()
    assert lines[0] == "y,x,value"
    assert len(lines) == 1 + array.size
    assert lines[1 + 4] == "1,1,4.0"  # row-major order: (1, 1) is the fifth value


def test_csv_refuses_non_numbers_and_huge_arrays(monkeypatch):
    with pytest.raises(export.ExportError, match="only numbers"):
        export.array_csv(np.array(["a", "b"]))
    monkeypatch.setattr(export, "MAX_CSV_VALUES", 10)
    with pytest.raises(export.ExportError, match="NPZ"):
        export.array_csv(np.zeros(11))


def test_npz_round_trip_is_exact_and_needs_no_pickle():
    arrays = {
        "attributions": np.random.default_rng(2).standard_normal((4, 5, 6)),
        "image": np.random.default_rng(3).integers(0, 255, (8, 8, 3), dtype=np.uint8),
        "odd name/../x": np.arange(3),
        "missing": None,
    }
    back = export.read_npz(export.arrays_npz(arrays))
    assert set(back) == {"attributions", "image", "odd_name____x"}
    np.testing.assert_array_equal(back["attributions"], arrays["attributions"])
    np.testing.assert_array_equal(back["image"], arrays["image"])
    assert back["image"].dtype == np.uint8
    with pytest.raises(export.ExportError):
        export.arrays_npz({"x": np.array([object()])})
    with pytest.raises(export.ExportError, match="no array"):
        export.arrays_npz({})
    with pytest.raises(export.ExportError, match="could not be read"):
        export.read_npz(b"not a zip file")


def test_plotly_js_comes_from_the_installed_package():
    js = export.plotly_js()
    assert len(js) > 1_000_000
    assert "plotly.js v" in js[:2000].lower()


def test_oversized_figures_are_refused(monkeypatch):
    monkeypatch.setattr(export, "MAX_FIGURE_BYTES", 100)
    with pytest.raises(export.ExportError, match="too large"):
        export.figure_json(go.Figure(go.Heatmap(z=np.zeros((20, 20)))))


def test_missing_chromium_names_the_exports_and_the_fix(monkeypatch):
    monkeypatch.setattr(export, "chromium_path", lambda: None)
    with pytest.raises(export.ChromiumMissing) as info:
        export.figure_png(go.Figure())
    text = str(info.value)
    assert "apt-get install chromium" in text and "CSV, NPZ and HTML" in text
    assert not export.chromium_available()


def test_a_stuck_job_stops_at_the_timeout():
    import threading

    release = threading.Event()
    with pytest.raises(export.ExportError, match="longer than"):
        export._with_timeout(lambda: release.wait(5), 0.2, "Drawing")
    release.set()


needs_chromium = pytest.mark.skipif(
    export.chromium_path() is None and os.environ.get("CI") != "true",
    reason="Chromium is not installed (apt-get install chromium)",
)


@needs_chromium
@pytest.mark.slow
def test_png_and_svg_are_drawn_offline_by_chromium():
    z = np.array([[0.0, 1.0], [2.0, 3.0]])
    fig = go.Figure(go.Heatmap(z=z, colorscale="Viridis"))
    fig.update_layout(width=320, height=240)
    png, svg = export.render_figures([fig], "png")[0], export.render_figures([fig], "svg")[0]
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (640, 480)  # drawn at twice the size
    colours = np.asarray(image.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(colours, axis=0)) > 4  # the heatmap is there, not a blank page
    text = svg.decode("utf-8")
    assert text.startswith("<svg") and "heatmaplayer" in text


def test_the_render_page_may_load_nothing_from_outside():
    class Route:
        def __init__(self, url):
            self.request = type("Request", (), {"url": url})()
            self.outcome = None

        def continue_(self):
            self.outcome = "continued"

        def abort(self):
            self.outcome = "aborted"

    outcomes = {}
    for url in (
        "data:image/png;base64,AAAA",
        "about:blank",
        "https://cdn.plot.ly/x.js",
        "http://127.0.0.1:8501/",
        "file:///etc/passwd",
    ):
        route = Route(url)
        export._offline(route)
        outcomes[url.split(":")[0]] = route.outcome
    assert outcomes == {
        "data": "continued",
        "about": "continued",
        "https": "aborted",
        "http": "aborted",
        "file": "aborted",
    }


@needs_chromium
@pytest.mark.slow
def test_html_prints_to_pdf():
    pdf = export.html_pdf("<h1>Report</h1><p>Hello</p>")
    assert pdf.startswith(b"%PDF-")


# --- a failed PNG or SVG, in words ---------------------------------------------------------------
def test_a_missing_chromium_executable_is_named_and_the_fix_given(monkeypatch, tmp_path):
    """Chromium configured but not there (a removed package, a wrong CHROMIUM_PATH): the launch
    fails, and the message says what happened and what still works."""
    missing = str(tmp_path / "no-such-chromium")
    monkeypatch.setattr(export, "chromium_path", lambda: missing)
    with pytest.raises(export.ChromiumMissing) as info:
        export.figure_png(go.Figure())
    assert info.value.path == missing
    message = export.render_failure_message(info.value, "png")
    assert message.startswith("The PNG could not be drawn: the server's Chromium is missing")
    assert missing in message and "apt-get install chromium" in message
    assert "CSV and NPZ downloads and the HTML report still work" in message


def test_a_timeout_and_a_crash_say_what_happened():
    import threading

    release = threading.Event()
    with pytest.raises(export.ExportTimeout) as info:
        export._with_timeout(lambda: release.wait(5), 0.2, "Drawing SVG files")
    release.set()
    message = export.render_failure_message(info.value, "svg")
    assert message.startswith("The SVG could not be drawn: drawing took longer than")
    assert "still work" in message
    kind, reason = export.chromium_failure_reason("Page.set_content: Target crashed")
    crash = export.ChromiumFailed("Drawing PNG files", reason, kind)
    message = export.render_failure_message(crash, "png")
    assert "Chromium closed before it was done" in message and "crashed" in message
    assert "still work" in message
    # A figure too large to draw keeps its own sentence.
    message = export.render_failure_message(export.ExportError("The figure is too large."), "png")
    assert "The figure is too large" in message
