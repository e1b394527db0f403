"""The pure figure builders: clickable layers map back to the right indices, scales are shared."""

from __future__ import annotations

import numpy as np
import pytest

from webapp import figures as F


def _click_points(fig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scatter = next(t for t in fig.data if t.type == "scatter")
    return np.asarray(scatter.x), np.asarray(scatter.y), np.asarray(scatter.customdata)


def test_rank_channels_orders():
    totals = np.array([0.5, -2.0, 1.0, 0.0])
    assert F.rank_channels(totals, "abs") == [1, 2, 0, 3]
    assert F.rank_channels(totals, "pos") == [2, 0, 3, 1]
    assert F.rank_channels(totals, "neg") == [1, 3, 0, 2]
    assert F.rank_channels(totals, "index") == [0, 1, 2, 3]
    assert F.rank_channels(totals, "abs", only=[0, 3, 2]) == [2, 0, 3]


def test_parse_channel_filter():
    assert F.parse_channel_filter("", 10) is None
    assert F.parse_channel_filter("3, 5-7, 3, 40", 10) == [3, 5, 6, 7]
    assert F.parse_channel_filter("7-5", 10) == [5, 6, 7]
    with pytest.raises(ValueError, match="not a channel"):
        F.parse_channel_filter("a-b", 10)
    with pytest.raises(ValueError, match="0 to 9"):
        F.parse_channel_filter("50-60", 10)


def test_symmetric_limit_never_zero():
    assert F.symmetric_limit(np.zeros(4)) == 1.0
    assert F.symmetric_limit(np.array([1e-9, -2e-9])) == 2e-9
    assert F.symmetric_limit(np.array([np.nan, -3.0, 2.0])) == 3.0
    assert F.symmetric_limit(np.array([np.nan])) == 1.0


def test_channel_grid_tiles_hold_their_channel_and_values():
    rng = np.random.default_rng(0)
    attributions = rng.normal(size=(10, 5, 4))
    channels = [7, 2, 9, 0]
    fig = F.channel_grid(
        attributions, channels, attributions.sum(axis=(1, 2)), zmax=3.0, selected=2, ncols=3
    )
    heat = fig.data[0]
    assert heat.zmid == 0 and heat.zmin == -3.0 and heat.zmax == 3.0
    xs, ys, custom = _click_points(fig)
    assert custom[:, 0].tolist() == channels
    mosaic = np.asarray(heat.z)
    for x, y, (channel,) in zip(xs, ys, custom, strict=True):
        # The click point sits at the centre of the tile showing that channel's map.
        x0, y0 = int(round(x - 1.5)), int(round(y - 2.0))
        np.testing.assert_allclose(
            mosaic[y0 : y0 + 5, x0 : x0 + 4], attributions[channel], rtol=1e-6
        )
    assert len(fig.layout.shapes) == 1  # only the selected channel is outlined


def test_channel_grid_pools_large_maps():
    attributions = np.ones((2, 100, 60))
    fig = F.channel_grid(attributions, [0, 1], np.ones(2), zmax=1.0)
    mosaic = np.asarray(fig.data[0].z, dtype=float)
    assert mosaic.shape[0] < 100 and np.nanmax(mosaic) == pytest.approx(1.0)


def test_spatial_map_cells_report_channel_y_x():
    values = np.arange(12, dtype=float).reshape(3, 4) - 5
    fig = F.spatial_map(values, channel=6, selected_cell=(1, 2))
    xs, ys, custom = _click_points(fig)
    assert custom.shape == (12, 3)
    for x, y, (c, cy, cx) in zip(xs, ys, custom, strict=True):
        assert c == 6 and (cx, cy) == (x, y)
    heat = fig.data[0]
    assert heat.zmid == 0 and heat.zmax == pytest.approx(6.0)
    box = fig.layout.shapes[0]
    assert (box.x0, box.x1, box.y0, box.y1) == (1.5, 2.5, 0.5, 1.5)


def test_overlay_cells_are_centred_on_their_image_blocks():
    image = np.zeros((64, 32, 3), dtype=np.uint8)
    fig = F.overlay_map(image, np.zeros((64, 32)), (4, 2), channel=None)
    xs, ys, custom = _click_points(fig)
    assert custom[0].tolist() == [-1, 0, 0]  # no channel: the page fills in the selected one
    index = custom[:, 1].tolist().index(3)
    assert ys[index] == pytest.approx(3.5 * 16 - 0.5)
    assert xs[custom[:, 2].tolist().index(1)] == pytest.approx(1.5 * 16 - 0.5)


def test_feature_strip_keeps_the_selected_unit_when_thinned():
    values = np.linspace(-1, 1, 1000)
    fig = F.feature_strip(values, selected=500, max_bars=50)
    units = [c[0] for c in fig.data[0].customdata]
    assert 500 in units and len(units) == 51
    assert units == sorted(units)


def test_channel_bars_follow_the_given_order_and_colour_by_sign():
    totals = np.array([0.2, -0.4, 0.1])
    fig = F.channel_bars([1, 0, 2], totals, selected=0)
    bar = fig.data[0]
    assert [c[0] for c in bar.customdata] == [1, 0, 2]
    assert np.asarray(bar.y).tolist() == [-0.4, 0.2, 0.1]
    assert bar.marker.color[0] == F.NEGATIVE_COLOUR and bar.marker.color[1] == F.POSITIVE_COLOUR
    assert list(bar.marker.line.width) == [0, 3, 0]


def test_overlay_scales_make_zero_transparent():
    zero_signed = F.SIGNED_OVERLAY_SCALE[len(F.SIGNED_OVERLAY_SCALE) // 2][1]
    assert zero_signed.endswith(",0.000)")
    assert F.MAGNITUDE_OVERLAY_SCALE[0][1].endswith(",0.000)")
    assert F.SIGNED_SCALE[0][1] != F.SIGNED_SCALE[-1][1]


def test_convergence_plot_uses_log_axes_and_tolerance_line():
    points = [("gausslegendre", 4, 0.1), ("gausslegendre", 16, 0.001), ("riemann_left", 4, 0.0)]
    fig = F.convergence_plot(points, tolerance=0.05)
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    assert [t.name for t in fig.data] == ["gausslegendre", "riemann_left"]
    assert min(fig.data[1].y) > 0  # an exact zero is drawn at a floor, not dropped by log axes
    assert any(shape.y0 == 0.05 for shape in fig.layout.shapes)


def test_overlay_map_of_any_resolution_covers_the_image():
    image = np.zeros((224, 224, 3), dtype=np.uint8)
    assert F.overlay_size((224, 224)) == (128, 128)
    assert F.overlay_size((64, 48)) == (64, 48)
    fig = F.overlay_map(image, np.ones((128, 128)), (7, 7), channel=0)
    picture, heat = fig.data[0], fig.data[1]
    assert picture.source.startswith("data:image/png;base64,")
    left = heat.x0 - heat.dx / 2
    right = heat.x0 + heat.dx * (128 - 0.5)
    assert left == pytest.approx(-0.5) and right == pytest.approx(223.5)


def test_score_map_cells_report_their_output_position():
    scores = np.arange(12.0).reshape(3, 4)
    fig = F.score_map(scores, (2, 1))
    heat = fig.data[0]
    np.testing.assert_array_equal(np.asarray(heat.z), scores)
    assert heat.zmin == 0.0 and heat.zmax == 11.0
    xs, ys, custom = _click_points(fig)
    assert [tuple(c) for c in custom] == [(r, c) for r in range(3) for c in range(4)]
    np.testing.assert_array_equal(xs, custom[:, 1])
    np.testing.assert_array_equal(ys, custom[:, 0])
    marker = fig.data[-1]
    assert (tuple(marker.x), tuple(marker.y)) == ((1,), (2,))
    assert marker.marker.symbol == "circle-open"


def test_a_large_score_map_is_pooled_but_clicks_stay_in_output_coordinates():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(130, 100))
    fig = F.score_map(scores, (129, 3))
    heat = fig.data[0]
    pooled = np.asarray(heat.z)
    assert max(pooled.shape) <= F.SCORE_CELLS_MAX
    fy, fx = heat.dy, heat.dx
    assert pooled[0, 0] == pytest.approx(scores[:fy, :fx].mean())
    xs, ys, custom = _click_points(fig)
    assert custom[:, 0].max() <= 129 and custom[:, 1].max() <= 99
    # Each click point sits on its pooled cell and reports an output position inside it.
    np.testing.assert_allclose(ys, (custom[:, 0] // fy) * fy + (fy - 1) / 2)
    np.testing.assert_allclose(xs, (custom[:, 1] // fx) * fx + (fx - 1) / 2)
    marker = fig.data[-1]
    assert (tuple(marker.x), tuple(marker.y)) == ((3,), (129,))


def test_score_profile_points_carry_their_position():
    scores = np.linspace(-1.0, 1.0, 2000)
    fig = F.score_profile(scores, 1234)
    line = fig.data[0]
    assert len(line.x) <= F.SCORE_POINTS_MAX
    assert [c[0] for c in line.customdata] == list(line.x)
    np.testing.assert_allclose(line.y, scores[np.asarray(line.x)])
    marker = fig.data[-1]
    assert tuple(marker.x) == (1234,) and marker.y[0] == pytest.approx(scores[1234])


def test_prediction_bars_say_what_the_share_is():
    preds = [("road", 0, 0.63), ("sky", 1, 0.37)]
    fig = F.prediction_bars(preds, hover_suffix=" of the output")
    assert fig.data[0].hovertemplate == "%{customdata}: %{x:.2%} of the output<extra></extra>"
    assert list(fig.data[0].customdata) == ["sky (#1)", "road (#0)"]
    assert list(fig.data[0].x) == [0.37, 0.63]
    assert [a.text for a in fig.layout.annotations] == ["sky (#1)", "road (#0)"]


def test_long_class_names_are_wrapped_whole_not_clipped():
    name = "Greater Swiss Mountain dog, also called Grosser Schweizer Sennenhund"
    fig = F.prediction_bars([(name, 238, 0.41), ("cat", 1, 0.2)])
    lines = fig.layout.annotations[1].text.split("<br>")  # the top row is the last one drawn
    assert len(lines) > 1 and all(len(line) <= 26 for line in lines)
    assert " ".join(lines) == f"{name} (#238)"
    assert not fig.layout.yaxis.showticklabels  # no axis labels to clip
    # Every name sits above its own bar: rows do not overlap.
    bars, tops = list(fig.data[0].y), [a.y for a in fig.layout.annotations]
    assert bars[0] < tops[0] <= bars[1] - 0.45 < tops[1]


def test_class_and_title_text_is_escaped_for_plotly():
    import html

    names = ['<a href="https://example.invalid">x</a>', "<b>bold</b> & 'quoted'", "plain"]
    fig = F.prediction_bars([(n, i, 0.3) for i, n in enumerate(names)])
    labels = [
        *fig.data[0].customdata,
        *(a.text.replace("<br>", " ") for a in fig.layout.annotations),
    ]
    assert not any(set("<>\"'") & set(label) for label in labels), labels
    expected = [f"{n} (#{i})" for i, n in reversed(list(enumerate(names)))]
    assert [html.unescape(label) for label in labels] == expected * 2
    fig = F.spatial_map(np.zeros((2, 2)), channel=0, title="<img src=x> layer")
    assert fig.layout.title.text == "&lt;img src=x&gt; layer"
    fig = F.gradient_channels(np.zeros((2, 2, 2)), names=("<b>a</b>", "b"))
    titles = [a.text for a in fig.layout.annotations]
    assert titles == ["&lt;b&gt;a&lt;/b&gt;", "b"]
    assert all("<b>" not in t.hovertemplate for t in fig.data)
    fig = F.convergence_plot([("<i>m</i>", 4, 0.1)], method_names={})
    assert fig.data[0].name == "&lt;i&gt;m&lt;/i&gt;" and "<i>" not in fig.data[0].hovertemplate


# --- robust colour range and receptive-field zoom of gradient maps ------------------------------
def test_robust_limit_is_the_percentile_of_the_non_zero_magnitudes():
    rng = np.random.default_rng(0)
    grad = np.zeros((224, 224))
    grad[90:130, 80:120] = rng.standard_cauchy((40, 40))  # heavy tails: a few huge pixels
    magnitudes = np.abs(grad[grad != 0])
    assert F.robust_limit(grad) == pytest.approx(np.percentile(magnitudes, 99.5), rel=1e-12)
    assert F.robust_limit(grad, 99.0) == pytest.approx(np.percentile(magnitudes, 99), rel=1e-12)
    assert F.robust_limit(grad) < F.symmetric_limit(grad)  # the outliers do not set the scale
    # The zeros around a small field do not pull the limit down; NaNs are ignored.
    grad[0, 0] = np.nan
    assert F.robust_limit(grad) == pytest.approx(np.percentile(magnitudes, 99.5), rel=1e-12)
    assert F.robust_limit(np.zeros((4, 4))) == 1.0
    assert F.robust_limit([np.nan, 0.0]) == 1.0


def test_receptive_field_box_finds_a_known_support():
    grad = np.full((224, 224), 1e-6)  # everywhere, far below 1% of the limit
    grad[100:131, 50:71] = 2.0  # the support: 31 rows x 21 columns
    box = F.receptive_field_box(grad, limit=2.0)
    assert (box.support_height, box.support_width) == (31, 21)
    pad = 4  # 10% of the longer side, rounded up
    assert box.height == box.width == 31 + 2 * pad  # square, around the longer side
    assert (box.top, box.bottom) == (100 - pad, 131 + pad)
    assert box.left <= 50 and box.right >= 71 and (box.left + box.right) // 2 == 60
    assert not box.whole_image
    # A pixel at 1% of the limit counts, one just below does not.
    grad[10, 60] = 0.02
    grad[200, 60] = 0.0199
    box = F.receptive_field_box(grad, limit=2.0)
    assert box.support_height == 131 - 10 and box.top < 10 and box.bottom < 200


def test_receptive_field_box_stays_inside_the_image():
    corner = np.zeros((224, 224))
    corner[0:3, 220:224] = -5.0  # signed values count by magnitude
    box = F.receptive_field_box(corner, limit=5.0)
    assert (box.top, box.bottom, box.left, box.right) == (0, 16, 208, 224)  # at least 16 px
    wide = np.ones((32, 48))
    box = F.receptive_field_box(wide, limit=1.0)
    assert (box.top, box.bottom, box.left, box.right) == (0, 32, 0, 48) and box.whole_image
    assert F.receptive_field_box(np.zeros((8, 8)), limit=1.0) is None
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        F.receptive_field_box(np.zeros((3, 8, 8)), limit=1.0)


def test_gradient_panel_saturates_honestly_and_zooms():
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    grad = np.zeros((64, 64))
    grad[20:30, 30:40] = np.linspace(-1.0, 1.0, 100).reshape(10, 10)
    grad[25, 35] = 50.0  # one outlier
    limit = F.robust_limit(grad)
    box = F.receptive_field_box(grad, limit)
    fig = F.gradient_panel(image, grad, signed=True, limit=limit, crop=box)
    heat = next(t for t in fig.data if t.type == "heatmap")
    assert heat.zmax == pytest.approx(limit) and heat.zmin == pytest.approx(-limit)
    np.testing.assert_allclose(np.asarray(heat.z), grad, rtol=1e-6)  # values are not clipped
    bar = heat.colorbar
    assert bar.orientation == "h" and list(bar.tickvals) == pytest.approx([-limit, 0, limit])
    assert bar.ticktext[-1] == "\u2265 " + F.value_text(limit)  # the clipped end is marked
    assert bar.ticktext[0] == F.value_text(-limit)  # nothing below -limit: not marked
    assert list(fig.layout.xaxis.range) == [box.left - 0.5, box.right - 0.5]
    assert list(fig.layout.yaxis.range) == [box.bottom - 0.5, box.top - 0.5]
    # Full range: nothing saturates, so no end is marked; no crop shows the whole image.
    fig = F.gradient_panel(image, grad, signed=False, limit=F.symmetric_limit(grad))
    bar = next(t for t in fig.data if t.type == "heatmap").colorbar
    assert not any("\u2265" in t or "\u2264" in t for t in bar.ticktext)
    assert list(fig.layout.xaxis.range) == [-0.5, 63.5]


def test_panels_with_bottom_colour_bars_reserve_the_same_space():
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    a = F.bottom_colorbar(
        F.spatial_map(np.ones((4, 4)), channel=0, height=300), "activation", signed=True
    )
    b = F.gradient_panel(image, np.ones((32, 32)), signed=True, limit=0.5, height=300)
    for fig in (a, b):
        bar = next(t for t in fig.data if t.type == "heatmap").colorbar
        assert (bar.orientation, bar.len, bar.thickness, bar.tickangle) == ("h", 0.8, 10, 0)
        assert fig.layout.height == 300 and fig.layout.margin.r == fig.layout.margin.l == 8
