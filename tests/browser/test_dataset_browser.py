"""The Dataset page in a real browser: a store of the operator's folder, screenshots at two sizes,
and a click on a heatmap cell that selects a channel and shows the images that drive it."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import serve_app
from PIL import Image
from test_app_browser import assert_no_exception, click_at, settle

from explainer.batch.runner import BatchSettings, run_batch
from explainer.batch.store import ResultsStore
from explainer.compute import ModelSession, ModelSource
from explainer.compute.jobs import JobHandle
from explainer.demo import DEMO_LABELS, render_sample

pytestmark = pytest.mark.browser

SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"
LAYER = "block3"


class _InProcess:
    parallelism = 1

    def __init__(self) -> None:
        self.sessions: dict[str, ModelSession] = {}

    def submit(self, model, op, args=None):
        handle = JobHandle(op)
        session = self.sessions.setdefault(model.key, ModelSession(model))
        try:
            handle.set_result(session.run(op, args or {}))
        except Exception as exc:  # noqa: BLE001 - the handle carries it
            handle.set_exception(exc)
        return handle


@pytest.fixture(scope="module")
def dataset_url(tmp_path_factory):
    """``streamlit run app.py`` with a dataset folder holding one store of labelled shapes."""
    base = tmp_path_factory.mktemp("dataset-browser")
    images, runs = base / "images", base / "runs"
    rng = np.random.default_rng(1)
    for i in range(9):
        shape = DEMO_LABELS[i % len(DEMO_LABELS)]
        folder = shape if i < 7 else DEMO_LABELS[(i + 1) % len(DEMO_LABELS)]
        (images / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(render_sample(shape, rng)).save(images / folder / f"img{i:02d}.png")
    runs.mkdir()
    settings = BatchSettings(layers=("block2", LAYER), n_steps=8, labels_from_folders=True)
    run_batch(ModelSource("builtin"), images, runs / "shapes.sqlite", settings, _InProcess())

    env = {**os.environ, "EXPLAINER_DATASET_DIR": str(runs)}
    with serve_app(SCREENSHOTS / "streamlit-dataset-server.log", env) as (url, _process):
        yield url, runs / "shapes.sqlite"


def selected_channel(page) -> int:
    text = page.locator('[data-testid="stAlert"]', has_text="Selected:").first.inner_text()
    return int(re.search(r"channel (\d+)", text).group(1))


def test_dataset_page_heatmap_click_shows_the_top_images(browser, dataset_url):
    url, store_path = dataset_url
    with ResultsStore(store_path, readonly=True) as store:
        classes = sorted({r.true_label for r in store.images("ok")})
        channels = store.layer_row(store.images("ok")[0].path, LAYER)["shape"][0]
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    try:
        page.goto(f"{url}/dataset")
        page.wait_for_selector("h1:has-text('Dataset')")
        page.wait_for_selector(".st-key-ds_heatmap .js-plotly-plot")
        settle(page)
        assert_no_exception(page)
        assert selected_channel(page) == 0
        page.screenshot(path=str(SCREENSHOTS / "dataset_1400x900.png"))

        # Click the cell of the second class and channel 5 (every channel is drawn).
        area = page.locator(".st-key-ds_heatmap .nsewdrag").first
        area.scroll_into_view_if_needed()
        box = area.bounding_box()
        assert box is not None
        column, row = 5, min(1, len(classes) - 1)
        x = box["x"] + (column + 0.5) / channels * box["width"]
        y = box["y"] + (row + 0.5) / len(classes) * box["height"]
        click_at(page, x, y)
        page.wait_for_function(
            "() => [...document.querySelectorAll('[data-testid=stAlert]')]"
            ".some(e => e.innerText.includes('channel 5 '))"
        )
        settle(page)
        assert selected_channel(page) == column
        with ResultsStore(store_path, readonly=True) as store:
            expected = store.top_images(LAYER, column, k=8)
        body = page.locator("body").inner_text()
        assert expected[0][0] in body
        assert page.locator('[data-testid="stImage"]').count() >= len(expected)
        assert_no_exception(page)
        page.screenshot(path=str(SCREENSHOTS / "dataset_1400x900_selected.png"))
        page.locator(".st-key-_w_ds_channel").scroll_into_view_if_needed()
        page.screenshot(path=str(SCREENSHOTS / "dataset_1400x900_top_images.png"))

        page.set_viewport_size({"width": 1024, "height": 768})
        time.sleep(1.0)
        settle(page)
        page.locator("h1").first.scroll_into_view_if_needed()
        page.screenshot(path=str(SCREENSHOTS / "dataset_1024x768.png"))
        overflow = page.evaluate(
            "() => document.querySelector('[data-testid=stMain]').scrollWidth"
            " - document.querySelector('[data-testid=stMain]').clientWidth"
        )
        assert overflow <= 1, f"the page scrolls sideways by {overflow} px at 1024x768"
        page.locator(".st-key-ds_heatmap").scroll_into_view_if_needed()
        page.screenshot(path=str(SCREENSHOTS / "dataset_1024x768_heatmap.png"))
        page.locator(".st-key-_w_ds_channel").scroll_into_view_if_needed()
        page.screenshot(path=str(SCREENSHOTS / "dataset_1024x768_top_images.png"))
    finally:
        context.close()
