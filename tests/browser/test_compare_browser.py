"""Compare and Layer overview in a real browser: linked panes, and a layer opened by a click."""

from __future__ import annotations

import re

import pytest
from test_app_browser import SCREENSHOTS, assert_no_exception, click_at, open_app, plot_area, settle

pytestmark = pytest.mark.browser

SIZES = ((1400, 900), (1024, 768))


def shots_at_sizes(page, name: str, anchor: str) -> None:
    """Screenshots of what a user sees at two common window sizes, scrolled to ``anchor``."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for width, height in SIZES:
        page.set_viewport_size({"width": width, "height": height})
        settle(page, quiet_s=1.0)
        page.locator(anchor).first.evaluate("(e) => e.scrollIntoView({block: 'start'})")
        settle(page, quiet_s=0.5)
        page.screenshot(path=str(SCREENSHOTS / f"{name}_{width}x{height}.png"))


def selected_box(page, key: str) -> list[float] | None:
    """Centre (x, y) of the selection box drawn on the pane chart ``key``, or None."""
    return page.evaluate(
        """(key) => {
            const gd = document.querySelector(`.st-key-${key} .js-plotly-plot`);
            const shapes = (gd && gd.layout.shapes) || [];
            if (!shapes.length) return null;
            const s = shapes[0];
            return [(s.x0 + s.x1) / 2, (s.y0 + s.y1) / 2];
        }""",
        key,
    )


def test_a_neuron_clicked_in_one_pane_is_selected_in_every_pane(page, app_url):
    page.set_default_timeout(180_000)  # three panes of work on a busy machine
    open_app(page, app_url, "compare")
    assert page.locator("h1").first.inner_text() == "Compare"
    page.locator(".st-key-_w_cmp_mode label", has_text="Baselines").click()
    page.wait_for_selector(".st-key-cmp_map1 .js-plotly-plot")
    settle(page)
    # Three panes: the slider one step to the right.
    page.locator(".st-key-_w_cmp_count input[type=range]").focus()
    page.keyboard.press("ArrowRight")
    page.wait_for_selector(".st-key-cmp_map2 .js-plotly-plot")
    settle(page)
    for key in ("cmp_map0", "cmp_map1", "cmp_map2"):
        assert selected_box(page, key) is None

    # Click the strongest cell of the middle pane.
    box = plot_area(page, "cmp_map1")
    y, x, height, width = page.evaluate(
        """() => {
            const gd = document.querySelector('.st-key-cmp_map1 .js-plotly-plot');
            const z = gd._fullData[0].z;
            let best = [0, 0], top = -1;
            z.forEach((row, i) => row.forEach((v, j) => {
                if (Math.abs(v) > top) { top = Math.abs(v); best = [i, j]; }
            }));
            return [best[0], best[1], z.length, z[0].length];
        }"""
    )
    click_at(
        page,
        box["x"] + (x + 0.5) / width * box["width"],
        box["y"] + (y + 0.5) / height * box["height"],
    )
    page.wait_for_selector('[data-testid="stAlert"]:has-text("Selected: neuron")')
    settle(page)
    selected = page.locator('[data-testid="stAlert"]', has_text="Selected: neuron").inner_text()
    channel, cy, cx = (int(v) for v in re.search(r"\((\d+), (\d+), (\d+)\)", selected).groups())
    assert (cy, cx) == (y, x)
    # Every pane shows the same neuron: its box on the same cell, the same channel's map.
    keys = ["cmp_map0", "cmp_map1", "cmp_map2"]
    page.wait_for_function(
        """([keys, x, y]) => keys.every((k) => {
            const gd = document.querySelector(`.st-key-${k} .js-plotly-plot`);
            const s = gd && gd.layout.shapes && gd.layout.shapes[0];
            return s && (s.x0 + s.x1) / 2 === x && (s.y0 + s.y1) / 2 === y;
        })""",
        arg=[keys, x, y],
        timeout=30_000,
    )
    for key in keys:
        assert selected_box(page, key) == [x, y], key
        title = page.evaluate(
            "(k) => document.querySelector(`.st-key-${k} .js-plotly-plot`).layout.title.text",
            key,
        )
        assert re.sub(r"<[^>]+>", "", title) == f"channel {channel}", key
    body = page.locator("body").inner_text()
    assert body.count(f"Neuron ({channel}, {y}, {x}): conductance") == 3
    assert_no_exception(page)
    shots_at_sizes(page, "compare_linked", ".st-key-cmp_pane0")

    # Panes of different layers: the neuron exists in one, the others say so.
    page.set_viewport_size({"width": 1500, "height": 2400})
    page.locator(".st-key-_w_cmp_mode label", has_text="Layers").click()
    page.wait_for_selector("text=which does not have it")
    settle(page)
    assert_no_exception(page)
    shots_at_sizes(page, "compare_layers", ".st-key-cmp_pane0")


def test_a_click_on_an_overview_bar_opens_that_layer(page, app_url):
    page.set_default_timeout(300_000)
    open_app(page, app_url, "layer_overview")
    page.wait_for_selector(".st-key-ovw_chart .js-plotly-plot")
    settle(page)
    assert_no_exception(page)
    shots_at_sizes(page, "layer_overview", ".st-key-ovw_chart")
    page.set_viewport_size({"width": 1500, "height": 2400})
    settle(page, quiet_s=1.0)
    # The bar of the fifth layer in the top chart.
    layer, cx, cy = page.evaluate(
        """() => {
            const gd = document.querySelector('.st-key-ovw_chart .js-plotly-plot');
            const bar = gd._fullData[0];
            const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
            const rect = gd.querySelector('.nsewdrag').getBoundingClientRect();
            const i = 4;
            return [bar.x[i], rect.left + xa.l2p(xa.d2l(bar.x[i])),
                    rect.top + ya.l2p(Math.max(bar.y[i], 0) / 2)];
        }"""
    )
    click_at(page, cx, cy)
    page.wait_for_selector("h1:has-text('Layer conductance')")
    settle(page)
    sidebar = page.locator('[data-testid="stSidebar"]').inner_text()
    assert f"Layer · {layer}" in sidebar
    assert_no_exception(page)
