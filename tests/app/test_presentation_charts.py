"""Presentation mode makes chart text larger: the figures a page sends carry larger fonts while
the mode is on, and the figures themselves (which downloads and the report use) keep theirs."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest
from apphelpers import PAGE_COMPARE, PAGE_CONDUCTANCE, PAGE_DATASET, open_page, plotly_specs
from test_dataset_page import runs  # noqa: F401 - a fixture

from webapp import presentation
from webapp import state as S

FACTOR = presentation.CHART_SCALE


def font_sizes(node, path: str = "") -> dict[str, float]:
    """Every font size in a figure's JSON by its path, e.g. ``layout.xaxis.tickfont``."""
    found: dict[str, float] = {}
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{path}.{key}" if path else key
            if key.endswith("font") and isinstance(value, dict) and "size" in value:
                found[here] = value["size"]
            found.update(font_sizes(value, here))
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found.update(font_sizes(item, f"{path}[{i}]"))
    return found


def _charts(app, page: str, present: bool) -> dict[str, dict]:
    app.session_state[S.PRESENTATION] = present
    open_page(app, page)
    assert not app.exception, [e.value for e in app.exception]
    charts = plotly_specs(app)
    assert charts, "the page drew no chart"
    return charts


def _check_scaled(
    normal: dict[str, dict], presenting: dict[str, dict], own_sizes: bool = True
) -> None:
    """Every chart's base font and each font size it sets are :data:`FACTOR` times larger;
    ``own_sizes``: some chart sets a size of its own (a tick font, a title's font...)."""
    assert normal.keys() == presenting.keys()
    explicit = 0
    for key, spec in normal.items():
        before, after = font_sizes(spec), font_sizes(presenting[key])
        # The base font every tick, axis title and annotation without a size inherits.
        base = before.pop("layout.font", presentation.PLOTLY_FONT_SIZE)
        assert after.pop("layout.font") == pytest.approx(base * FACTOR, abs=0.05), key
        assert before.keys() <= after.keys(), key
        for path, size in before.items():
            assert after[path] == pytest.approx(size * FACTOR, abs=0.05), (key, path)
            explicit += 1
        # Text with no size of its own gets one, at least the larger base size: ticks and
        # titles of every axis and colour bar (else the page's theme sizes them, less large).
        added = {path: after[path] for path in after.keys() - before.keys()}
        assert all(size >= base * FACTOR - 0.05 for size in added.values()), (key, added)
        for axis in ("xaxis", "yaxis"):
            if spec["layout"].get(axis, {}).get("showticklabels", True):
                assert f"layout.{axis}.tickfont" in after, (key, axis)
    assert explicit or not own_sizes, "no chart sets a font size of its own"


def test_conductance_charts_have_larger_text_while_presenting(app):
    app.session_state["layer"] = "block2"
    normal = _charts(app, PAGE_CONDUCTANCE, False)
    assert all(font_sizes(s).get("layout.font", 12) <= 14 for s in normal.values())
    presenting = _charts(app, PAGE_CONDUCTANCE, True)
    _check_scaled(normal, presenting)
    # The page's colour bars: their ticks and titles grow too.
    bars = {p: v for s in presenting.values() for p, v in font_sizes(s).items() if "colorbar" in p}
    assert any(p.endswith("colorbar.tickfont") for p in bars), bars
    assert any(p.endswith("colorbar.title.font") for p in bars), bars
    assert min(bars.values()) >= 12 * FACTOR - 0.05
    # Turning the mode off gives the normal sizes back.
    assert {k: font_sizes(s) for k, s in _charts(app, PAGE_CONDUCTANCE, False).items()} == {
        k: font_sizes(s) for k, s in normal.items()
    }


def test_compare_charts_have_larger_text_while_presenting(app):
    app.session_state[S.SETTINGS] = S.AttributionSettings(target=2)
    normal = _charts(app, PAGE_COMPARE, False)
    _check_scaled(normal, _charts(app, PAGE_COMPARE, True))


def test_dataset_heatmap_has_larger_text_while_presenting(app, runs, monkeypatch):  # noqa: F811
    monkeypatch.setenv("EXPLAINER_DATASET_DIR", str(runs))
    normal = _charts(app, PAGE_DATASET, False)
    presenting = _charts(app, PAGE_DATASET, True)
    _check_scaled(normal, presenting, own_sizes=False)  # the base font only
    assert "ds_heatmap" in presenting


def test_scaling_leaves_the_figure_itself_as_it_was():
    fig = go.Figure(go.Heatmap(z=[[1, 2], [3, 4]], colorbar=dict(tickfont=dict(size=11))))
    fig.update_layout(annotations=[dict(text="a", font=dict(size=10))])
    before = fig.to_dict()
    bigger = presentation.scale_text(fig, 2.0)
    assert fig.to_dict() == before
    assert bigger.layout.font.size == 24
    assert bigger.data[0].colorbar.tickfont.size == 22
    assert bigger.layout.annotations[0].font.size == 20
    # Ticks and titles without a size of their own get the larger base size (titles a step up).
    assert bigger.layout.xaxis.tickfont.size == bigger.layout.yaxis.tickfont.size == 24
    assert bigger.data[0].colorbar.title.font.size == 28
