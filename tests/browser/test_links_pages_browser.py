"""A link that carries the pages' own settings, in a real browser: presentation mode from the
first paint (collapsed sidebar, large type) and the channel grid as the link says."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from test_app_browser import settle

pytestmark = pytest.mark.browser

SHOTS = Path(os.environ.get("EXPLAINER_SHOTS_DIR", Path(__file__).parent / "screenshots"))
LINK = {
    "layer": "block2",
    "present": "1",
    "rank": "neg",
    "top": "7",
    "tiles": "16",
    "tile_page": "3",
    "only": "8-60",
}


@pytest.mark.parametrize("size", [(1400, 900), (1024, 768)], ids=["wide", "small"])
def test_a_link_opens_in_presentation_mode_with_its_channel_grid(browser, app_url, size):
    context = browser.new_context(viewport={"width": size[0], "height": size[1]})
    page = context.new_page()
    page.set_default_timeout(180_000)
    try:
        query = "&".join(f"{k}={v}" for k, v in LINK.items())
        page.goto(f"{app_url}/layer_conductance?{query}")
        page.wait_for_selector("h1")
        settle(page)
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / f"links_pages_{size[0]}x{size[1]}.png"))
        assert page.locator('[data-testid="stException"]').count() == 0
        assert "could not be shown in full" not in page.locator("body").inner_text()
        # Presentation mode from the link's first run: closed sidebar, large type.
        sidebar = page.locator('[data-testid="stSidebar"]')
        assert sidebar.get_attribute("data-collapsed") == "true"
        font = page.evaluate("getComputedStyle(document.documentElement).fontSize")
        assert font == "19px"
        # The channel grid as the link says, and the address still holds the whole view.
        assert page.locator('input[aria-label="Only channels"]').input_value() == "8-60"
        assert page.locator('input[aria-label="Page (of 4)"]').input_value() == "3"
        params = {k: v[0] for k, v in parse_qs(urlsplit(page.url).query).items()}
        assert {k: params.get(k) for k in LINK} == LINK
    finally:
        context.close()


def test_presentation_mode_from_a_link_holds_on_a_page_that_runs_once(browser, app_url):
    """The Glossary draws in one run: the sidebar is closed by that first run itself."""
    context = browser.new_context(viewport={"width": 1024, "height": 768})
    page = context.new_page()
    page.set_default_timeout(180_000)
    try:
        page.goto(f"{app_url}/glossary?present=1")
        page.wait_for_selector("h1")
        settle(page)
        page.screenshot(path=str(SHOTS / "links_pages_glossary_1024x768.png"))
        assert page.locator('[data-testid="stSidebar"]').get_attribute("data-collapsed") == "true"
        assert page.evaluate("getComputedStyle(document.documentElement).fontSize") == "19px"
        assert "present=1" in page.url
    finally:
        context.close()
