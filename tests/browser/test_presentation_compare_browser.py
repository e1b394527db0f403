"""Presentation mode and Compare's colour bars in a real browser, at 1400x900 and on a 1024x768
projector: the controls folded away, the figures in view, every pane with its own colour bar."""

from __future__ import annotations

import pytest
from test_app_browser import SCREENSHOTS, assert_no_exception, settle
from test_dataset_browser import dataset_url  # noqa: F401 - a fixture (a server with a store)

pytestmark = pytest.mark.browser

SIZES = ((1400, 900), (1024, 768))
# Per page: its address, a figure it draws, and the folds its controls go in.
PAGES = {
    "layer_conductance": ("cond_bars", ["Settings: target, baseline, steps"]),
    "convergence": ("conv_plot", ["Settings: target, baseline, steps", "Sweep: methods and steps"]),
    "dataset": ("ds_heatmap", ["Results store", "Layer, images and grouping"]),
    "compare": (
        "cmp_map1",
        [
            "What is compared, the panes and their colour scale",
            "Target, baseline and integration, shared by every pane",
        ],
    ),
}
OUT = SCREENSHOTS / "presentation"


def _open(browser, url: str, path: str, figure: str):
    context = browser.new_context(viewport={"width": SIZES[0][0], "height": SIZES[0][1]})
    page = context.new_page()
    page.set_default_timeout(180_000)
    page.goto(f"{url}/{path}")
    page.wait_for_selector("h1")
    page.wait_for_selector(f".st-key-{figure} .js-plotly-plot")
    settle(page)
    return context, page


def _present(page) -> None:
    page.locator(".st-key-_w_presentation label").click()
    page.wait_for_function("() => getComputedStyle(document.documentElement).fontSize === '19px'")
    settle(page)


def _fold_labels(page) -> list[str]:
    return [
        s.strip()
        for s in page.locator(
            '[data-testid="stMain"] [data-testid="stExpander"] summary'
        ).all_inner_texts()
    ]


def _loose_forms(page) -> int:
    """Forms of the main area that are not inside an expander."""
    return page.evaluate(
        "() => [...document.querySelectorAll('[data-testid=stMain] [data-testid=stForm]')]"
        ".filter(f => !f.closest('[data-testid=stExpander]')).length"
    )


def _sideways(page) -> int:
    return page.evaluate(
        "() => document.querySelector('[data-testid=stMain]').scrollWidth"
        " - document.querySelector('[data-testid=stMain]').clientWidth"
    )


@pytest.mark.parametrize("path", list(PAGES))
def test_presentation_mode_folds_each_pages_controls(browser, dataset_url, path):  # noqa: F811
    url, _ = dataset_url
    figure, folds = PAGES[path]
    context, page = _open(browser, url, path, figure)
    try:
        assert_no_exception(page)
        _present(page)
        OUT.mkdir(parents=True, exist_ok=True)
        for width, height in SIZES:
            page.set_viewport_size({"width": width, "height": height})
            settle(page, quiet_s=1.0)
            page.locator("h1").first.scroll_into_view_if_needed()
            page.screenshot(path=str(OUT / f"{path}_{width}x{height}.png"))
            labels = _fold_labels(page)
            for fold in folds:
                assert any(label.endswith(fold) for label in labels), (fold, labels)
            assert _loose_forms(page) == 0
            assert _sideways(page) <= 1, f"{path} scrolls sideways at {width}x{height}"
            # The figure is drawn at the page's full width, less the thin margins.
            chart = page.locator(f".st-key-{figure}").bounding_box()
            assert chart is not None and chart["x"] + chart["width"] <= width
        # A fold opens on a click, with its controls usable at 1024x768.
        page.locator('[data-testid="stMain"] [data-testid="stExpander"] summary').filter(
            has_text=folds[-1]
        ).first.click()
        settle(page, quiet_s=1.0)
        opened = page.locator('[data-testid="stMain"] [data-testid="stExpander"] details[open]')
        assert opened.count() >= 1
        opened.first.scroll_into_view_if_needed()
        page.screenshot(path=str(OUT / f"{path}_1024x768_fold_open.png"))
        assert _sideways(page) <= 1
        assert_no_exception(page)
    finally:
        context.close()


def _colour_bars(page, count: int) -> list[list[str]]:
    """Each pane's colour-bar tick labels, as drawn."""
    return [
        page.locator(f".st-key-cmp_map{i} .colorbar .cbaxis text").all_text_contents()
        for i in range(count)
    ]


@pytest.mark.parametrize("presenting", [False, True], ids=["plain", "presenting"])
def test_every_compare_pane_shows_the_shared_colour_bar(browser, dataset_url, presenting):  # noqa: F811
    url, _ = dataset_url
    context, page = _open(browser, url, "compare", "cmp_map1")
    try:
        if presenting:
            _present(page)
            page.locator("summary", has_text="What is compared").first.click()
        # The same image against several baselines: one score, so one colour scale.
        page.locator(".st-key-_w_cmp_mode label", has_text="Baselines").click()
        page.wait_for_selector(".st-key-cmp_map1 .js-plotly-plot")
        settle(page)
        # Four panes, the narrowest they get: the slider two steps to the right.
        page.locator(".st-key-_w_cmp_count input[type=range]").focus()
        page.keyboard.press("ArrowRight")
        page.keyboard.press("ArrowRight")
        page.wait_for_selector(".st-key-cmp_map3 .js-plotly-plot")
        settle(page)
        assert_no_exception(page)
        name = "compare_shared_scale" + ("_presenting" if presenting else "")
        for width, height in SIZES:
            page.set_viewport_size({"width": width, "height": height})
            settle(page, quiet_s=1.0)
            page.locator(".st-key-cmp_pane0").scroll_into_view_if_needed()
            page.screenshot(path=str(OUT / f"{name}_{width}x{height}.png"))
            ticks = _colour_bars(page, 4)
            assert all(len(t) == 3 for t in ticks), ticks
            assert all(t == ticks[0] for t in ticks), ticks  # one range, read from any pane
            for i in range(4):
                lines = page.locator(f".st-key-cmp_map{i} .colorbar .cbtitle tspan.line")
                assert lines.all_text_contents() == ["conductance", "shared by panes 1–4"]
                bar = page.locator(f".st-key-cmp_map{i} .colorbar").bounding_box()
                pane = page.locator(f".st-key-cmp_pane{i}").bounding_box()
                assert bar is not None and pane is not None
                assert (
                    pane["x"] <= bar["x"] and bar["x"] + bar["width"] <= pane["x"] + pane["width"]
                )
            # No pane is squeezed below a readable width: beside the sidebar at 1024 px the
            # four panes wrap into two rows.
            panes = [page.locator(f".st-key-cmp_pane{i}").bounding_box() for i in range(4)]
            assert min(p["width"] for p in panes) >= 200, panes
            # The maps have one size: a colour bar in every pane takes the same room.
            plots = [page.locator(f".st-key-cmp_map{i} .nsewdrag").bounding_box() for i in range(4)]
            assert len({(round(p["width"]), round(p["height"])) for p in plots}) == 1, plots
            assert _sideways(page) <= 1
    finally:
        context.close()
