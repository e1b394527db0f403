"""Hostile class names in a real browser: shown as text, no outside request, link or image."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest
from test_app_browser import SCREENSHOTS, assert_no_exception, choose_model_file, open_app, settle

pytestmark = pytest.mark.browser

DEMO_WEIGHTS = Path(__file__).resolve().parents[2] / "assets" / "demo" / "demo_cnn.safetensors"
OUTSIDE = ("http://127.0.0.1:9/", "https://example.invalid/")


def hostile_label(i: int) -> str:
    """Markdown and HTML pointing outside: an image, a link, a raw tag and a bare address."""
    return (
        f"![i{i}](http://127.0.0.1:9/i{i}.png) [Update{i}](https://example.invalid/u{i}) "
        f'<img src="http://127.0.0.1:9/h{i}.png"> https://example.invalid/b{i}'
    )


def outside_elements(page) -> list[str]:
    """Links and images of the whole page whose address points at one of the outside targets."""
    return page.evaluate(
        """(targets) => [...document.querySelectorAll('a[href], img[src]')]
            .map(e => (e.tagName === 'A' ? e.href : e.src) || '')
            .filter(u => targets.some(t => u.startsWith(t)))""",
        list(OUTSIDE),
    )


def test_hostile_class_names_make_no_outside_request_link_or_image(page, app_url):
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(app_url))
    requested: list[str] = []

    def guard(route) -> None:
        url = route.request.url
        if url.startswith((origin + "/", "data:", "blob:")) or url == origin:
            route.continue_()
        else:
            requested.append(url)
            route.abort()

    page.route("**/*", guard)
    labels = [hostile_label(i) for i in range(8)]
    open_app(page, app_url)
    choose_model_file(page, "demo_cnn.safetensors", DEMO_WEIGHTS.read_bytes())
    combo = page.locator(".st-key-_w_arch input[role='combobox']")
    combo.click()
    combo.fill("demo_cnn")
    page.get_by_role("option", name="demo_cnn", exact=True).click()
    page.locator(".st-key-_w_labels_file input[type=file]").set_input_files(
        files=[
            {
                "name": "labels.txt",
                "mimeType": "text/plain",
                "buffer": "\n".join(labels).encode(),
            }
        ]
    )
    page.wait_for_selector(".st-key-_w_labels_file >> text=labels.txt")
    settle(page)
    page.locator("button", has_text="Load model").click()
    page.wait_for_selector("text=Loaded")
    settle(page)
    assert_no_exception(page)

    # The names are shown, literally, in the sidebar's prediction.
    sidebar = page.locator('[data-testid="stSidebar"]').inner_text().replace("\u2060", "")
    assert any(f"Predicted: {label} (#" in sidebar for label in labels), sidebar
    assert outside_elements(page) == []
    page.set_viewport_size({"width": 1400, "height": 900})
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "literal_text_model_page.png"))

    # The conductance page shows the target class in its metrics.
    page.locator('[data-testid="stSidebar"] a', has_text="Layer conductance").click()
    page.wait_for_selector(".st-key-cond_grid .js-plotly-plot", timeout=120_000)
    settle(page)
    assert_no_exception(page)
    metrics = page.locator('[data-testid="stMetric"]').first.inner_text().replace("\u2060", "")
    assert any(label in metrics for label in labels), metrics
    assert outside_elements(page) == []
    page.screenshot(path=str(SCREENSHOTS / "literal_text_conductance.png"))
    assert not [url for url in requested if url.startswith(OUTSIDE)], requested
    assert requested == []  # nothing at all goes anywhere but the app itself (the icon included)
