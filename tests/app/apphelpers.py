"""Helpers for the AppTest suites: pages, element lookups and small uploads made in memory."""

from __future__ import annotations

import base64
import functools
import io
import json
import re
from pathlib import Path

import hostile
import numpy as np
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

REPO = Path(__file__).resolve().parents[2]
APP = str(REPO / "app.py")

PAGE_MODEL = "pages/1_model_and_images.py"
PAGE_LAYER = "pages/2_layer_picker.py"
PAGE_CONDUCTANCE = "pages/3_layer_conductance.py"
PAGE_NEURON = "pages/4_neuron_gradient.py"
PAGE_CONVERGENCE = "pages/5_convergence.py"
PAGE_DATASET = "pages/6_dataset.py"
PAGE_NEURON_CARD = "pages/7_neuron_card.py"
PAGE_OVERVIEW = "pages/8_layer_overview.py"
PAGE_COMPARE = "pages/9_compare.py"
PAGE_REPORT = "pages/10_report.py"
PAGE_TOUR = "pages/11_tour.py"
PAGE_GLOSSARY = "pages/12_glossary.py"
ALL_PAGES = [
    PAGE_MODEL,
    PAGE_LAYER,
    PAGE_CONDUCTANCE,
    PAGE_NEURON,
    PAGE_CONVERGENCE,
    PAGE_DATASET,
    PAGE_NEURON_CARD,
    PAGE_OVERVIEW,
    PAGE_COMPARE,
    PAGE_REPORT,
    PAGE_TOUR,
    PAGE_GLOSSARY,
]

TIMEOUT = 120  # the first run imports torch and torchvision


def open_page(at: AppTest, page: str) -> AppTest:
    """Switch to ``page``, run it, and fail on any uncaught exception."""
    at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def visible(markdown: str) -> str:
    """Markdown text as the reader sees it: user strings are escaped for markdown
    (``webapp.text.md``), so backslash escapes and invisible word joiners are removed."""
    return re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", markdown).replace("\u2060", "")


def error_text(at: AppTest) -> str:
    """All ``st.error`` messages of the last run, joined, as the reader sees them."""
    return visible("\n".join(str(e.value) for e in at.error))


def plotly_specs(at: AppTest) -> dict[str, dict]:
    """Plotly figures of the last run by widget key (``"cond_grid"`` etc.)."""
    specs = {}
    for chart in at.get("plotly_chart"):
        key = chart.proto.id.rsplit("-", 1)[-1]
        specs[key] = json.loads(chart.proto.spec)
    return specs


def values(data) -> np.ndarray:
    """A figure array as numpy: plotly writes numpy arrays as ``{"dtype", "bdata", "shape"}``."""
    if isinstance(data, dict) and "bdata" in data:
        array = np.frombuffer(base64.b64decode(data["bdata"]), dtype=np.dtype(data["dtype"]))
        shape = data.get("shape")
        if shape:
            dims = [int(d) for d in str(shape).split(",")]
            array = array.reshape(dims)
        return array
    return np.asarray(data)


def widget(at: AppTest, kind: str, key: str):
    """The widget of ``kind`` (``"selectbox"``, ``"number_input"``...) with ``key``."""
    for element in getattr(at, kind):
        if element.key == key:
            return element
    raise AssertionError(f"no {kind} with key {key!r} on the page")


def png_bytes(
    colour: tuple[int, int, int] = (220, 40, 40), size: tuple[int, int] = (48, 40)
) -> bytes:
    """A small PNG: a coloured square on grey."""
    w, h = size
    pixels = np.full((h, w, 3), 128, dtype=np.uint8)
    pixels[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = colour
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@functools.lru_cache(maxsize=1)
def resnet18_state_dict_bytes(num_classes: int = 10) -> bytes:
    """A randomly initialised torchvision resnet18 state_dict, saved with ``torch.save``."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def upload_model(
    at: AppTest,
    data: bytes,
    filename: str,
    arch: str,
    labels: bytes | None = None,
) -> AppTest:
    """Fill the model upload form on the Model & images page and press Load."""
    widget(at, "radio", "_w_model_source").set_value("upload")
    at.run()
    widget(at, "file_uploader", "_w_model_file").set_value(
        (filename, data, "application/octet-stream")
    )
    widget(at, "selectbox", "_w_arch").set_value(arch)
    if labels is not None:
        widget(at, "file_uploader", "_w_labels_file").set_value(
            ("labels.txt", labels, "text/plain")
        )
    at.run()
    next(b for b in at.button if b.label == "Load model").click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def export_bytes(module: torch.nn.Module, size: int = 32) -> bytes:
    """``module`` exported with ``torch.export`` (dynamic batch) for ``(3, size, size)`` images."""
    return hostile.export_bytes(module, size)


class PixelScores(torch.nn.Module):
    """A tiny segmentation-style model: two class scores at every pixel, ``(N, 2, H, W)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.head = torch.nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)))


@functools.lru_cache(maxsize=1)
def pixel_model_bytes() -> bytes:
    """:class:`PixelScores` with fixed random weights, exported for 32 x 32 images."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return export_bytes(PixelScores())


def count_jobs(monkeypatch, op: str) -> list[dict]:
    """Record the arguments of every ``op`` job ``webapp.backend`` sends to a model's worker,
    waited for or in the background (what was computed, as opposed to served from the
    cache)."""
    from webapp import backend

    calls: list[dict] = []
    real = backend.run

    def counting(lm, name, args=None, progress=None):
        if name == op:
            calls.append(dict(args or {}))
        return real(lm, name, args, progress)

    def counting_background(lm, name, args=None):
        if name == op:
            calls.append(dict(args or {}))
        return real_submit(lm, name, args)

    real_submit = backend.submit
    monkeypatch.setattr(backend, "run", counting)
    monkeypatch.setattr(backend, "submit", counting_background)
    return calls


def check_every_image(app: AppTest) -> None:
    """Press "Check all ... images" (absent when an earlier test in this process left every
    result in the server's cache); afterwards every image has its row."""
    offers = [b for b in app.button if b.key == "check_all_images"]
    if offers:
        offers[0].click()
        app.run()
    assert not app.exception, [e.value for e in app.exception]
    assert len(app.dataframe[0].value) == len(app.session_state["images"])
