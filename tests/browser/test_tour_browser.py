"""The guided tour in a real browser, start to end, on a desktop and on a 1024x768 projector."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from test_app_browser import settle

pytestmark = pytest.mark.browser

SCREENSHOTS = Path(__file__).resolve().parent / "screenshots" / "tour"
BOX = ".st-key-tour_box"
STEPS = 6


def shot(page, name: str, scroll_to: str | None = None) -> None:
    """What the screen shows (Streamlit scrolls inside its own container); with ``scroll_to``,
    a second picture with that element scrolled into view."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))
    if scroll_to is not None:
        page.locator(scroll_to).first.scroll_into_view_if_needed()
        time.sleep(0.5)
        page.screenshot(path=str(SCREENSHOTS / f"{name}_view.png"))
        page.locator("h1").first.scroll_into_view_if_needed()


def assert_clean(page) -> None:
    assert page.locator('[data-testid="stException"]').count() == 0
    assert "Traceback" not in page.locator("body").inner_text()


def box_text(page) -> str:
    return page.locator(BOX).inner_text()


def main_text(page) -> str:
    return page.locator('[data-testid="stMain"]').inner_text()


def sidebar_text(page) -> str:
    return page.locator('[data-testid="stSidebar"]').inner_text()


def click_next(page, title: str) -> None:
    page.locator(".st-key-tour_next button").click()
    page.wait_for_selector(f"h1:has-text('{title}')", timeout=240_000)
    settle(page)
    assert_clean(page)


def fits_the_width(page) -> None:
    """Nothing sticks out sideways: no horizontal scrolling, the tour's buttons fully shown."""
    overflow = page.evaluate(
        "() => { const m = document.querySelector('[data-testid=\"stMain\"]');"
        " return [m.scrollWidth, m.clientWidth]; }"
    )
    assert overflow[0] <= overflow[1] + 1, f"the page scrolls sideways: {overflow}"
    clipped = page.evaluate(
        "() => [...document.querySelectorAll('[data-testid=\"stMain\"] button')]"
        ".filter(b => b.offsetParent !== null && [b, ...b.querySelectorAll('*')]"
        ".some(e => e.scrollWidth > e.clientWidth + 1"
        " && getComputedStyle(e).overflow !== 'visible'))"
        ".map(b => b.innerText)"
    )
    assert not clipped, f"buttons whose label is cut off: {clipped}"
    width = page.viewport_size["width"]
    for key in ("tour_back", "tour_next", "tour_end"):
        box = page.locator(f".st-key-{key} button").bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width, key
        label = page.locator(f".st-key-{key} button").inner_text().strip()
        assert label, f"{key} shows no label"
        # One line: a wrapped or clipped label would make the button taller than the others.
        assert box["height"] < 70, (key, box)


def run_tour(page, url: str, prefix: str, presenting: bool) -> None:
    page.goto(f"{url}/tour")
    page.wait_for_selector("h1:has-text('Guided tour')")
    settle(page)
    if presenting:
        page.locator(".st-key-_w_presentation label").click()
        settle(page)
        size = page.evaluate("() => getComputedStyle(document.documentElement).fontSize")
        assert size == "19px"
    shot(page, f"{prefix}_00_tour_page")
    if presenting:
        # The sidebar folds away for the audience; the tour needs none of it.
        right = page.evaluate(
            "() => document.querySelector('[data-testid=\"stSidebar\"]')"
            ".getBoundingClientRect().right"
        )
        assert right <= 1, f"the sidebar is still open (right edge at {right}px)"
        # The page title is not hidden under the app's header.
        title = page.locator("h1").first.bounding_box()
        header = page.locator('[data-testid="stHeader"]').bounding_box()
        assert title["y"] >= header["y"] + header["height"] - 1, (title, header)

    page.locator(".st-key-tour_start button").click()
    page.wait_for_selector("h1:has-text('Model & images')", timeout=240_000)
    settle(page)
    assert_clean(page)
    text = box_text(page)
    assert f"step 1 of {STEPS}" in text and "triangle" in text
    assert page.locator(".st-key-tour_back button").is_disabled()
    shot(page, f"{prefix}_01_image", '[data-testid="stMain"] [data-testid="stImage"]')
    fits_the_width(page)

    click_next(page, "Layer picker")
    assert f"step 2 of {STEPS}" in box_text(page)
    assert "conv1.relu" in box_text(page)
    assert re.search(r"Layer\s*·\s*conv1\.relu", page.locator("body").inner_text())
    shot(page, f"{prefix}_02_layer")
    fits_the_width(page)

    click_next(page, "Neuron gradient")
    text = box_text(page)
    assert f"step 3 of {STEPS}" in text
    channel = re.search(r"channel (\d+) is the most edge-like", text).group(1)
    row, col = re.search(r"at row (\d+), column (\d+)", text).groups()
    page.wait_for_selector(".st-key-ng_signed .js-plotly-plot")
    settle(page)
    assert f"Neuron ({channel}, {row}, {col})" in main_text(page)
    assert "conv1.relu" in main_text(page)
    shot(page, f"{prefix}_03_edge_neuron", ".st-key-ng_signed")
    fits_the_width(page)

    click_next(page, "Layer conductance")
    text = box_text(page)
    assert f"step 4 of {STEPS}" in text and "block3" in text
    top = re.search(r"channel (\d+) adds the most", text).group(1)
    page.wait_for_selector(".st-key-cond_bars .js-plotly-plot")
    settle(page)
    assert f"channel {top}" in main_text(page)
    shot(page, f"{prefix}_04_conductance", ".st-key-cond_overlay")
    fits_the_width(page)

    click_next(page, "Convergence")
    text = box_text(page)
    assert f"step 5 of {STEPS}" in text
    assert re.search(r"With only 2 evenly spaced steps the shares miss .* by \d+%", text)
    page.wait_for_selector(".st-key-conv_plot .js-plotly-plot")
    settle(page)
    shot(page, f"{prefix}_05_delta", ".st-key-conv_plot")
    fits_the_width(page)

    click_next(page, "Glossary")
    assert f"step 6 of {STEPS}" in box_text(page)
    assert "Score difference" in main_text(page)
    shot(page, f"{prefix}_06_glossary")
    fits_the_width(page)
    assert page.locator(".st-key-tour_next button").inner_text().strip().endswith("Finish")

    page.locator(".st-key-tour_next button").click()
    page.wait_for_selector(".st-key-tour_start button", timeout=180_000)
    settle(page)
    assert page.locator(BOX).count() == 0
    assert_clean(page)
    if presenting:
        # The folded sidebar opens again, and the mode switches off there.
        page.locator('[data-testid="stExpandSidebarButton"]').click()
        toggle = page.locator(".st-key-_w_presentation label")
        toggle.wait_for(state="visible")
        time.sleep(1.0)  # the sidebar slides in
        toggle.click()
        settle(page)
        page.wait_for_function(
            "() => getComputedStyle(document.documentElement).fontSize === '16px'",
            timeout=60_000,
        )
        shot(page, f"{prefix}_07_presentation_off")


def test_tour_runs_from_start_to_end(browser, app_url):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(180_000)
    try:
        run_tour(page, app_url, "1400x900", presenting=False)
    finally:
        context.close()


def test_tour_in_presentation_mode_on_a_1024x768_projector(browser, app_url):
    context = browser.new_context(viewport={"width": 1024, "height": 768})
    page = context.new_page()
    page.set_default_timeout(180_000)
    try:
        run_tour(page, app_url, "1024x768_presenting", presenting=True)
    finally:
        context.close()
