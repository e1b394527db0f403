"""Chart text in a real browser, at 1400x900 and on a 1024x768 projector, with and without
presentation mode: no tick label, axis or colour-bar title or annotation falls outside its
chart (where the browser would cut it off), and a colour bar's title never covers its ticks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import plotly
import pytest
from test_app_browser import SCREENSHOTS, assert_no_exception, settle
from test_dataset_browser import dataset_url  # noqa: F401 - a fixture (a server with a store)

from webapp import presentation
from webapp.dataset import class_heatmap

pytestmark = pytest.mark.browser

SIZES = ((1400, 900), (1024, 768))
# Per page: its address and the chart to wait for (the page's other charts are checked too).
PAGES = {
    "layer_conductance": "cond_bars",
    "compare": "cmp_map1",
    "dataset": "ds_heatmap",
    "neuron_card": "card_flip",
}
OUT = Path(os.environ.get("EXPLAINER_SHOTS_DIR") or SCREENSHOTS / "chart_text")

# Every piece of text of every drawn plotly chart, with the box of its chart and of its colour
# bar's ticks; charts out of the page's layout (a closed expander, a hidden tab) are skipped.
_MEASURE = """() => {
  const box = e => { const r = e.getBoundingClientRect();
                     return [r.left, r.top, r.right, r.bottom]; };
  const out = [];
  for (const plot of document.querySelectorAll('.js-plotly-plot')) {
    const svg = plot.querySelector('.main-svg');
    if (!svg || !svg.getBoundingClientRect().width) continue;
    const holder = plot.closest('[class*="st-key-"]');
    const key = holder ? [...holder.classList].find(c => c.startsWith('st-key-')) : '?';
    const texts = [];
    const selectors = ['.xtick text', '.ytick text', '.g-xtitle text', '.g-ytitle text',
                       '.gtitle', '.annotation-text', '.cbtitle text', '.cbaxis text'];
    for (const sel of selectors) {
      for (const t of plot.querySelectorAll(sel)) {
        const r = t.getBoundingClientRect();
        if (!r.width || !t.textContent.trim()) continue;
        texts.push({kind: sel, text: t.textContent.slice(0, 40), box: box(t),
                    size: parseFloat(getComputedStyle(t).fontSize)});
      }
    }
    out.push({key, chart: box(plot), texts});
  }
  return out;
}"""


def _overlap(a: list[float], b: list[float]) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    return max(0.0, width) * max(0.0, height)


def _problems(charts: list[dict]) -> list[str]:
    found = []
    for chart in charts:
        left, top, right, bottom = chart["chart"]
        for t in chart["texts"]:
            x0, y0, x1, y1 = t["box"]
            if x0 < left - 1 or y0 < top - 1 or x1 > right + 1 or y1 > bottom + 1:
                found.append(f"{chart['key']}: {t['kind']} {t['text']!r} is cut off {t['box']}")
        titles = [t for t in chart["texts"] if t["kind"] == ".cbtitle text"]
        ticks = [t for t in chart["texts"] if t["kind"] == ".cbaxis text"]
        for title in titles:
            for tick in ticks:
                if _overlap(title["box"], tick["box"]) > 4:
                    found.append(f"{chart['key']}: colour-bar title covers tick {tick['text']!r}")
    return found


@pytest.mark.parametrize("presenting", [False, True], ids=["plain", "presenting"])
@pytest.mark.parametrize("path", list(PAGES))
def test_chart_text_is_whole_at_both_sizes(browser, dataset_url, path, presenting):  # noqa: F811
    url, _store = dataset_url
    OUT.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": SIZES[0][0], "height": SIZES[0][1]})
    page = context.new_page()
    page.set_default_timeout(240_000)
    sizes: dict[str, list[float]] = {}
    try:
        page.goto(f"{url}/{path}" + ("?present=1" if presenting else ""))
        page.wait_for_selector("h1")
        page.wait_for_selector(f".st-key-{PAGES[path]} .js-plotly-plot")
        settle(page)
        assert_no_exception(page)
        mode = "presenting" if presenting else "plain"
        for width, height in SIZES:
            page.set_viewport_size({"width": width, "height": height})
            page.wait_for_timeout(1500)  # plotly redraws on resize
            settle(page)
            charts = page.evaluate(_MEASURE)
            assert charts, "no chart was drawn"
            problems = _problems(charts)
            name = f"{path}_{mode}_{width}x{height}"
            for chart in charts:
                key = chart["key"].removeprefix("st-key-")
                holder = page.locator(f".st-key-{key}").first
                if holder.count():
                    holder.scroll_into_view_if_needed()
                    holder.screenshot(path=str(OUT / f"{name}_{key}.png"))
            page.locator("h1").first.scroll_into_view_if_needed()
            page.screenshot(path=str(OUT / f"{name}.png"))
            (OUT / f"{name}.json").write_text(json.dumps(charts, indent=1))
            assert not problems, "\n".join(problems)
            sizes[f"{width}"] = [t["size"] for c in charts for t in c["texts"]]
        print(f"[chart text] {path} {mode}: tick/title sizes {sorted(set(sizes['1024']))}")
    finally:
        context.close()


LONG_NAMES = [
    "circle (2)",
    "great white shark, white shark, man-eater, man-eating shark (12)",
    "square (1)",
    "cross (3)",
]


@pytest.mark.parametrize("scale", [2.0, 0.0023, 1234.5], ids=["units", "small", "large"])
def test_the_dataset_heatmap_keeps_its_labels_and_colour_bar_title_whole(browser, scale):
    """The class x channel heatmap drawn alone by plotly.js at the widths it gets on a 1024 px
    screen (sidebar open, or presenting with the sidebar closed) and at 1400 px, with a long
    class name and colour-bar ticks of every length, in normal and presentation text."""
    OUT.mkdir(parents=True, exist_ok=True)
    script = (Path(plotly.__file__).parent / "package_data" / "plotly.min.js").read_text()
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    try:
        page.set_content(f"<html><body style='margin:0'><script>{script}</script><div id=d>")
        z = np.linspace(-1.0, 1.0, 4 * 64).reshape(4, 64) * scale
        for width in (420, 564, 970, 1100):
            for presenting in (False, True):
                fig = class_heatmap(LONG_NAMES, list(range(4)), list(range(64)), z)
                if presenting:
                    fig = presentation.scale_text(fig, presentation.CHART_SCALE)
                fig.update_layout(width=width)
                page.evaluate(
                    "s => { const f = JSON.parse(s);"
                    " return Plotly.newPlot('d', f.data, f.layout); }",
                    fig.to_json(),
                )
                charts = page.evaluate(_MEASURE)
                name = f"heatmap_{scale:g}_{width}{'_presenting' if presenting else ''}"
                page.locator("#d").screenshot(path=str(OUT / f"{name}.png"))
                problems = _problems(charts)
                assert not problems, f"{name}: " + "\n".join(problems)
                kinds = {t["kind"] for c in charts for t in c["texts"]}
                assert {".cbtitle text", ".ytick text"} <= kinds  # the check saw the text
    finally:
        page.close()
