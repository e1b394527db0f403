"""Downloads: figures as PNG and SVG, arrays as CSV and NPZ, HTML pages as PDF.

Arrays are written with numpy and the standard library only, so CSV and NPZ always work. Figures
and PDFs are drawn by a real browser: Debian's Chromium (``/usr/bin/chromium``) driven through
Playwright, started for one job with no network access (every request that is not ``data:`` or
``about:`` is refused) and stopped afterwards. Plotly.js comes from the installed ``plotly``
package, so nothing is downloaded. Where Chromium is missing, :class:`ChromiumMissing` says
which exports need it and how to install it.

Every browser job runs in its own thread with a wall-clock limit, and the inputs are bounded in
size, so a stuck render ends with a readable error instead of a hung page.
"""

from __future__ import annotations

import base64
import concurrent.futures
import csv
import functools
import io
import json
import logging
import os
import shutil
import urllib.parse
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import plotly
import plotly.graph_objects as go

from explainer.errors import ExplainerError

T = TypeVar("T")
LOG = logging.getLogger(__name__)

CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
"""Where Debian and Ubuntu install Chromium; ``$CHROMIUM_PATH`` takes precedence."""
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage")
RENDER_TIMEOUT_S = 60.0
"""Wall-clock limit of one browser job (start, every figure, stop)."""
MAX_FIGURE_BYTES = 40 * 1024 * 1024
"""Largest figure (as JSON) that is drawn; larger ones are refused with a message."""
MAX_HTML_BYTES = 200 * 1024 * 1024
"""Largest HTML page turned into a PDF."""
MAX_IMAGE_SIDE = 4000
"""Largest width or height, in pixels, of an exported figure."""
MAX_CSV_VALUES = 20_000_000
"""Arrays with more values than this are offered as NPZ only."""
INSTALL_HINT = (
    "PNG, SVG and PDF downloads are drawn by Chromium, which is not installed on this server. "
    "Install it with `apt-get install chromium` (Debian or Ubuntu) and restart the app. CSV, "
    "NPZ and HTML downloads work without it."
)


class ExportError(ExplainerError):
    """A figure, array or report could not be exported."""


class ChromiumMissing(ExportError):
    """The browser that draws PNG, SVG and PDF files is not installed."""

    def __init__(self, path: str | None = None) -> None:
        super().__init__(INSTALL_HINT)
        self.path = path
        """The executable that was tried and is not there (``None``: none was found)."""


class ExportTimeout(ExportError):
    """A browser job ran past its wall-clock limit and was stopped."""


class ChromiumFailed(ExportError):
    """Chromium could not start, crashed, or did not finish the job.

    ``reason`` says what happened in plain words (:func:`chromium_failure_reason`); the message
    is ``"<what> failed: <reason>."``. Playwright's own text goes to the server log only.
    """

    def __init__(self, what: str, reason: str, kind: str = "error") -> None:
        super().__init__(f"{what} failed: {reason}.")
        self.reason = reason
        """What happened, in plain words (no period)."""
        self.kind = kind
        """``"start"``, ``"closed"``, ``"timeout"`` or ``"error"``."""


# Playwright's errors start with the API call that failed ("BrowserType.launch: ...",
# "Page.goto: ..."): words for developers. These patterns sort them into what a user can act on.
_FAILURE_KINDS = (
    (
        "start",
        (
            "browsertype.launch",
            "failed to launch",
            "spawn ",
            "eacces",
            "enoent",
            "permission denied",
            "exec format error",
            "error while loading shared libraries",
        ),
    ),
    ("timeout", ("timeout", "timed out")),
    ("closed", ("has been closed", "target closed", "crash", "disconnected", "has exited")),
)
_FAILURE_REASONS = {
    "start": "Chromium could not be started on the server",
    "closed": "Chromium closed before it was done (it may have run out of memory or crashed)",
    "timeout": "Chromium did not finish in time",
    "error": "Chromium stopped with an error",
}


def chromium_failure_reason(text: str) -> tuple[str, str]:
    """Sort a browser error's text into ``(kind, reason)``: what happened, in plain words.

    ``kind`` is ``"start"`` (the executable did not start), ``"closed"`` (the browser closed or
    crashed during the job), ``"timeout"`` or ``"error"`` (anything else); ``reason`` is a
    sentence without a period that names no programming interface.
    """
    lowered = text.lower()
    for kind, patterns in _FAILURE_KINDS:
        if any(pattern in lowered for pattern in patterns):
            return kind, _FAILURE_REASONS[kind]
    return "error", _FAILURE_REASONS["error"]


def render_failure_message(exc: BaseException, fmt: str) -> str:
    """What a failed PNG or SVG download tells the user: what happened and what to do.

    ``fmt`` is ``"png"`` or ``"svg"``. The sentence always ends by naming the downloads that
    still work, so nobody thinks the page's results are lost.
    """
    what = f"The {fmt.upper()} could not be drawn"
    if isinstance(exc, ChromiumMissing):
        where = f" (looked for {exc.path})" if exc.path else ""
        why = (
            f"the server's Chromium is missing{where}. Operator: install it with "
            "apt-get install chromium (or set CHROMIUM_PATH to its executable) and restart "
            "the app"
        )
    elif isinstance(exc, ExportTimeout):
        why = (
            f"drawing took longer than {RENDER_TIMEOUT_S:.0f} s and was stopped. Try again when "
            "the server is less busy, or show fewer channels"
        )
    elif isinstance(exc, ChromiumFailed):
        if exc.kind == "start":
            todo = (
                "Try again in a moment; if it keeps failing, the operator should check that "
                "Chromium runs on the server (the server log has the details). Meanwhile, a "
                "screenshot of the chart keeps the picture"
            )
        else:
            todo = (
                "Try again; if it keeps failing, show fewer channels, or take a screenshot of "
                "the chart instead"
            )
        why = f"{exc.reason}. {todo}"
    elif isinstance(exc, ExportError):
        why = str(exc).rstrip(".")
    else:
        why = f"an unexpected error occurred ({type(exc).__name__}: {exc})"
    return (
        f"{what}: {why}. Nothing on this page is lost: the CSV and NPZ downloads and the HTML "
        "report still work."
    )


# --- arrays -------------------------------------------------------------------------------------
def _numeric(array: Any, name: str) -> np.ndarray:
    values = np.asarray(array)
    if values.dtype.kind not in "biuf":
        raise ExportError(f"{name} holds {values.dtype} values; only numbers can be exported.")
    return values


def array_csv(array: Any, dims: Sequence[str] | None = None, name: str = "The array") -> bytes:
    """One array as CSV: one row per value, with its index along every dimension.

    The long form reads back exactly (:func:`read_array_csv`) for any number of dimensions and
    opens in any spreadsheet. Floats are written with the shortest text that reads back to the
    same number.
    """
    values = _numeric(array, name)
    if values.size > MAX_CSV_VALUES:
        raise ExportError(
            f"{name} has {values.size:,} values, too many for a CSV file; download the NPZ file."
        )
    if dims is None or len(dims) != values.ndim:
        dims = [f"dim{i}" for i in range(values.ndim)]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*dims, "value"])
    is_float = values.dtype.kind == "f"
    for index in np.ndindex(values.shape):
        value = values[index]
        writer.writerow([*index, repr(float(value)) if is_float else int(value)])
    return out.getvalue().encode("utf-8")


def read_array_csv(data: bytes) -> np.ndarray:
    """The array written by :func:`array_csv` (float64, or int64 for integer columns)."""
    rows = list(csv.reader(io.StringIO(data.decode("utf-8"))))
    if not rows:
        raise ExportError("The CSV file is empty.")
    ndim = len(rows[0]) - 1
    body = rows[1:]
    if not body:
        return np.zeros((0,) * max(ndim, 1))
    index = np.array([[int(v) for v in row[:ndim]] for row in body], dtype=np.int64)
    texts = [row[ndim] for row in body]
    integral = all(t.lstrip("-").isdigit() for t in texts)
    flat = np.array([int(t) if integral else float(t) for t in texts])
    shape = tuple(int(s) for s in index.max(axis=0) + 1) if ndim else ()
    out = np.zeros(shape, dtype=flat.dtype)
    out[tuple(index.T)] = flat
    return out


def arrays_npz(arrays: Mapping[str, Any]) -> bytes:
    """Named arrays in one compressed ``.npz`` file, readable with ``allow_pickle=False``."""
    clean = {}
    for key, value in arrays.items():
        if value is None:
            continue
        name = "".join(c if c.isalnum() or c in "_-" else "_" for c in str(key)) or "array"
        clean[name] = _numeric(value, f"Array {key!r}")
    if not clean:
        raise ExportError("There is no array to export.")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **clean)
    return buffer.getvalue()


def read_npz(data: bytes) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file, read without unpickling anything."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise ExportError(f"The NPZ file could not be read ({exc}).") from exc


# --- plotly -------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def plotly_js() -> str:
    """The minified plotly.js that ships inside the installed ``plotly`` package."""
    path = Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ExportError(
            f"plotly.js was not found in the installed plotly package ({path}); reinstall plotly."
        ) from exc


def figure_json(fig: go.Figure | Mapping[str, Any] | str) -> str:
    """A figure as plotly JSON text (data, layout), refusing figures over the size limit."""
    if isinstance(fig, str):
        text = fig
    elif isinstance(fig, go.Figure):
        text = fig.to_json()
    else:
        text = json.dumps(fig)
    if len(text) > MAX_FIGURE_BYTES:
        raise ExportError(
            f"The figure is too large to draw ({len(text) / 2**20:.0f} MB of data); show fewer "
            "channels or download its arrays instead."
        )
    return text


def figure_size(spec: Mapping[str, Any], default_width: int = 900) -> tuple[int, int]:
    """Width and height in pixels to draw a figure at: its own, else a readable default."""
    layout = spec.get("layout") or {}
    width = int(layout.get("width") or default_width)
    height = int(layout.get("height") or 450)
    return min(max(width, 100), MAX_IMAGE_SIDE), min(max(height, 100), MAX_IMAGE_SIDE)


# --- the browser --------------------------------------------------------------------------------
def chromium_path() -> str | None:
    """Chromium's executable, or ``None`` where it is not installed."""
    candidates = [os.environ.get("CHROMIUM_PATH", ""), *CHROMIUM_PATHS]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    found = shutil.which("chromium")
    return found


def chromium_available() -> bool:
    """Whether PNG, SVG and PDF exports can run on this server."""
    return chromium_path() is not None


def _with_timeout(job: Callable[[], T], timeout_s: float, what: str) -> T:
    """Run ``job`` in a fresh thread (Playwright's sync API needs one without an event loop)."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="export")
    try:
        future = pool.submit(job)
        try:
            return future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError as exc:
            raise ExportTimeout(
                f"{what} took longer than {timeout_s:.0f} s and was stopped; try a smaller view."
            ) from exc
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _browser_job(work: Callable[[Any], T], what: str, timeout_s: float) -> T:
    """Start Chromium, give ``work`` a page with no network access, stop Chromium."""
    executable = chromium_path()
    if executable is None:
        raise ChromiumMissing()
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        raise ExportError(
            f"{what} needs the playwright package: install it with `pip install playwright` "
            "(no browser download is needed; the system's Chromium is used)."
        ) from exc

    def job() -> T:
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(
                    executable_path=executable,
                    args=list(CHROMIUM_ARGS),
                    timeout=timeout_s * 1000,
                )
                try:
                    context = browser.new_context(
                        viewport={"width": 1200, "height": 900}, device_scale_factor=1
                    )
                    context.set_default_timeout(timeout_s * 1000)
                    context.route("**/*", _offline)
                    return work(context.new_page())
                finally:
                    browser.close()
        except PlaywrightError as exc:
            text = str(exc).strip() or type(exc).__name__
            if "executable doesn't exist" in text.lower():
                LOG.warning("%s: Chromium is missing at %s: %s", what, executable, text)
                raise ChromiumMissing(executable) from exc
            kind, reason = chromium_failure_reason(text)
            # The user reads the plain reason; the browser's own words are for the operator.
            LOG.warning("%s failed in Chromium (%s, %s): %s", what, kind, executable, text)
            raise ChromiumFailed(what, reason, kind) from exc

    return _with_timeout(job, timeout_s, what)


def _offline(route: Any) -> None:
    """Refuse every request that would leave the page (only inline data may load)."""
    url = route.request.url
    if url.startswith(("data:", "about:", "blob:")):
        route.continue_()
    else:
        route.abort()


_RENDER_PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8"><script>{js}</script></head>
<body style="margin:0;background:white"><div id="fig"></div></body></html>"""

_RENDER_SCRIPT = """async ([spec, fmt, width, height, limitMs]) => {
  const gd = document.getElementById('fig');
  const timeout = new Promise((_, reject) =>
    setTimeout(() => reject(new Error('drawing the figure timed out')), limitMs));
  const layout = Object.assign({}, spec.layout || {}, {width: width, height: height});
  Object.keys(layout).forEach((key) => {
    if (/^[xy]axis[0-9]*$/.test(key)) {
      layout[key] = Object.assign({}, layout[key], {automargin: true});
    }
  });
  if (!layout.paper_bgcolor || layout.paper_bgcolor === 'rgba(0,0,0,0)') {
    layout.paper_bgcolor = 'white';
  }
  const draw = Plotly.newPlot(gd, spec.data || [], layout, {staticPlot: true})
    .then(() => Plotly.toImage(gd, {
      format: fmt, width: width, height: height, scale: fmt === 'png' ? 2 : 1}));
  const url = await Promise.race([draw, timeout]);
  Plotly.purge(gd);
  return url;
}"""


def _decode_data_url(url: str) -> bytes:
    head, _, body = url.partition(",")
    if ";base64" in head:
        return base64.b64decode(body)
    return urllib.parse.unquote(body).encode("utf-8")


def render_figures(
    figures: Sequence[go.Figure | Mapping[str, Any] | str],
    fmt: str,
    timeout_s: float = RENDER_TIMEOUT_S,
) -> list[bytes]:
    """Draw figures as ``"png"`` or ``"svg"`` files in one Chromium session.

    Raises
    ------
    ChromiumMissing
        Where Chromium is not installed.
    ExportError
        When a figure is too large, drawing fails or takes longer than ``timeout_s``.
    """
    if fmt not in ("png", "svg"):
        raise ValueError(f"unknown image format {fmt!r}")
    specs = [json.loads(figure_json(fig)) for fig in figures]
    html = _RENDER_PAGE.format(js=plotly_js())
    limit_ms = int(timeout_s * 1000)

    def work(page: Any) -> list[bytes]:
        page.set_content(html, wait_until="load")
        out = []
        for spec in specs:
            width, height = figure_size(spec)
            url = page.evaluate(_RENDER_SCRIPT, [spec, fmt, width, height, limit_ms])
            out.append(_decode_data_url(url))
        return out

    return _browser_job(work, f"Drawing {fmt.upper()} files", timeout_s)


def figure_png(fig: go.Figure | Mapping[str, Any] | str) -> bytes:
    """One figure as a PNG file (twice the figure's pixel size, for sharp printing)."""
    return render_figures([fig], "png")[0]


def figure_svg(fig: go.Figure | Mapping[str, Any] | str) -> bytes:
    """One figure as an SVG file."""
    return render_figures([fig], "svg")[0]


def html_pdf(
    html: str, ready_js: str = "", width: int = 760, timeout_s: float = RENDER_TIMEOUT_S * 2
) -> bytes:
    """An HTML page printed to an A4 PDF by Chromium, with no network access.

    ``ready_js`` is an expression that turns true once the page has finished drawing (its
    figures); printing waits for it. The page is laid out ``width`` pixels wide first, about
    the printable width of A4, so figures are drawn at the size they are printed.
    """
    if len(html) > MAX_HTML_BYTES:
        raise ExportError("The report is too large to print; remove some views and try again.")

    def work(page: Any) -> bytes:
        page.set_viewport_size({"width": int(width), "height": 1000})
        page.set_content(html, wait_until="load")
        if ready_js:
            page.wait_for_function(ready_js)
        page.emulate_media(media="print")
        return page.pdf(
            format="A4",
            print_background=True,
            margin={"top": "14mm", "bottom": "14mm", "left": "12mm", "right": "12mm"},
        )

    return _browser_job(work, "Printing the PDF", timeout_s)
