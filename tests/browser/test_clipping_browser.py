"""Nothing is cut off at 1024x768: metric labels, values and deltas show all their text.

Screenshots: ``screenshots/clipping_*.png``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_app_browser import assert_no_exception, open_app, settle

pytestmark = pytest.mark.browser

SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"
PAGES = ["Layer conductance", "Layer overview", "Layer picker", "Model & images"]
# Every metric part whose text is wider than its box (Streamlit ends those in an ellipsis).
CLIPPED = """() => [...document.querySelectorAll(
    '[data-testid="stMetricLabel"], [data-testid="stMetricLabel"] *,'
    + ' [data-testid="stMetricValue"], [data-testid="stMetricValue"] *,'
    + ' [data-testid="stMetricDelta"], [data-testid="stMetricDelta"] *')]
  .filter(el => el.clientWidth > 0 && el.scrollWidth > el.clientWidth + 1)
  .map(el => el.innerText)"""


@pytest.fixture
def small_page(browser, app_url: str):
    context = browser.new_context(viewport={"width": 1024, "height": 768})
    tab = context.new_page()
    tab.set_default_timeout(120_000)
    try:
        yield tab
    finally:
        context.close()


def test_metrics_are_not_clipped_at_1024(small_page, app_url):
    page = small_page
    open_app(page, app_url)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for title in PAGES:
        page.locator('[data-testid="stSidebar"] a', has_text=title).first.click()
        page.wait_for_selector('[data-testid="stMetric"]')
        settle(page)
        assert_no_exception(page)
        page.locator('[data-testid="stMetric"]').first.scroll_into_view_if_needed()
        name = title.lower().replace(" & ", "_").replace(" ", "_")
        page.screenshot(path=str(SCREENSHOTS / f"clipping_{name}.png"))
        assert page.evaluate(CLIPPED) == [], title
