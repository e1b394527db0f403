"""A long conductance map: a first look at once, then refined in the background while the page
stays live.

The request is the built-in model's ``conv1`` at 1000 Gauss-Legendre steps in passes of one path
point (a request no other test makes, so the server's cache cannot hold it), far longer than the
quarter second the page waits before it shows a first look. While the refinement runs, a click on
a map cell must select the neuron and draw its input gradient (the click is answered by the
model's other worker), the progress must keep moving, and the refined map must replace the first
look by itself. Times are printed, not asserted.
"""

from __future__ import annotations

import re
import time

import pytest
from test_app_browser import click_at, plot_area
from test_cancel_browser import fill_steps
from test_load_browser import (
    CONDUCTANCE,
    go_to,
    metrics,
    open_session,
    pick_layer,
    press_compute,
    probe,
    screenshot,
    settle,
)

pytestmark = pytest.mark.browser

FIRST = re.compile(r"First look at (\d+) steps shown.*?(\d+) / (\d+) steps")
SELECTED = re.compile(r"neuron \*?\*?\((\d+), (\d+), (\d+)\)")


def first_look_progress(page) -> tuple[int, int, int] | None:
    """``(first-look steps, done, total)`` from the refinement's progress bar, or None."""
    for text in probe(page)["progress"]:
        match = FIRST.search(" ".join(text.split()))
        if match:
            return int(match.group(1)), int(match.group(2)), int(match.group(3))
    return None


def selection(page) -> str:
    alert = page.locator('[data-testid="stAlert"]', has_text="Selected:").first
    return alert.inner_text()


def test_first_look_then_refined_while_the_page_stays_live(browser, app_server):
    url, _server = app_server
    context, page = open_session(browser, url)
    try:
        go_to(page, "Layer picker")
        settle(page)
        pick_layer(page, "conv1")
        go_to(page, CONDUCTANCE)
        page.wait_for_selector('[data-testid="stMetric"]')
        settle(page)
        fill_steps(page, 1000, 1)
        asked = time.monotonic()
        press_compute(page)

        seen = None
        for _ in range(1200):  # bounded: at most about 2 minutes
            seen = first_look_progress(page)
            if seen is not None:
                break
            time.sleep(0.1)
        assert seen is not None, f"no first look: progress bars {probe(page)['progress']}"
        first_shown = time.monotonic() - asked
        assert seen[0] == 4 and seen[2] in (1000, 1001), seen  # the end point may count
        page.wait_for_selector(".st-key-cond_channel_map .js-plotly-plot")
        values = metrics(probe(page))
        assert "Sum of conductance" in values, values
        first_sum = values["Sum of conductance"]
        print(f"[first look] shown {first_shown:.2f} s after Compute; progress {seen}")
        screenshot(page, "first_look_1400")
        page.set_viewport_size({"width": 1024, "height": 768})
        time.sleep(0.5)
        screenshot(page, "first_look_1024")
        page.set_viewport_size({"width": 1400, "height": 900})

        # A click while it refines: the neuron is selected and its gradient drawn, and the
        # refinement is still running afterwards.
        before = selection(page)
        box = plot_area(page, "cond_channel_map")
        clicked = time.monotonic()
        click_at(page, box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.6)
        page.wait_for_function(
            "(old) => [...document.querySelectorAll('[data-testid=\"stAlert\"]')]"
            ".some(a => a.innerText.includes('Selected:') && a.innerText.includes('neuron')"
            " && a.innerText !== old)",
            arg=before,
            timeout=60_000,
        )
        page.wait_for_selector(".st-key-cond_preview .js-plotly-plot", timeout=60_000)
        answered = time.monotonic() - clicked
        during = first_look_progress(page)
        print(f"[click while refining] gradient shown {answered:.2f} s after the click; {during}")
        assert during is not None, "the refinement ended before the click was answered"
        assert during[1] >= seen[1]
        assert re.search(r"neuron", selection(page))

        # The refined map replaces the first look by itself (the fragment polls the job).
        for _ in range(3000):  # bounded: at most about 5 minutes
            if first_look_progress(page) is None:
                break
            time.sleep(0.1)
        assert first_look_progress(page) is None, "the refinement never finished"
        settle(page)
        refined = time.monotonic() - asked
        values = metrics(probe(page))
        print(
            f"[refined] {refined:.1f} s after Compute; sum of conductance {first_sum} at the "
            f"first look, {values.get('Sum of conductance')} refined"
        )
        assert "First look" not in page.locator("body").inner_text()
        assert values.get("Sum of conductance") not in (None, first_sum)
        assert "neuron" in selection(page)  # the selection survived the refinement
        assert page.locator('[data-testid="stException"]').count() == 0
        screenshot(page, "first_look_refined_1400")
    finally:
        context.close()
