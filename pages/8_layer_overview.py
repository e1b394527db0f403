"""Layer overview: conductance at every usable layer from one pass, to see where the decision
forms; a click on a layer opens it on the conductance page."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import streamlit as st

import webapp
from explainer.cache import digest
from webapp import backend
from webapp import figures as F
from webapp import report as RP
from webapp import state as S
from webapp import widgets as W
from webapp.text import md

# Overviews cheaper than this (parameters x steps) run without a click.
AUTO_RUN_BUDGET = 2e9

ctx = webapp.setup()
W.page_header(
    "Layer overview",
    "Conductance at many layers of the network from **one pass** along the path from the "
    "baseline to the image. For each layer: its total conductance, its **share** of "
    "F(image) − F(baseline) (100% when everything the score gained passes through the layer; "
    "less where a skip connection or a branch goes around it), whether completeness holds "
    "(✓, or the relative delta), and its strongest channels. Where the strongest few "
    "channels start to hold most of a layer's conductance, the evidence for the target has "
    "narrowed down to a few detectors: that is where the decision forms. Click a bar or a row "
    "to open that layer.",
)

if ctx.lm is None or ctx.prep is None or ctx.image is None:
    W.require_ready(ctx)  # says what is missing, with a link to fix it
    st.stop()
lm, image, prep = ctx.lm, ctx.image, ctx.prep

# A layer clicked on the previous run opens on the conductance page.
opening = st.session_state.get(S.OVERVIEW_OPEN)
if opening:
    st.session_state[S.OVERVIEW_OPEN] = None
    S.set_layer(opening)
    st.switch_page(W.PAGE_CONDUCTANCE)

ok, plan = W.attempt("Choosing the layers", backend.overview_plan, lm)
if not ok or plan is None:
    st.page_link(W.PAGE_LAYER, label="Layer picker", icon=":material/account_tree:")
    st.stop()
layers, rule = plan

settings = W.settings_form(ctx, "ovw")
tolerance = float(S.get(S.TOLERANCE))
st.caption(f"Layers: {md(rule)}")

ok, overview = W.attempt(
    "Looking up the overview", backend.layer_overview_cached, lm, image, prep, settings
)
if not ok:
    st.stop()
request = digest(
    "overview-request",
    backend.model_key(lm),
    image.digest,
    backend.prep_key(prep),
    repr(settings),
)
cost = lm.num_params * int(settings.n_steps)
if (
    overview is None
    and cost > AUTO_RUN_BUDGET
    and st.session_state.get(S.OVERVIEW_ASKED) != request
):
    st.info(
        f"This model has {lm.num_params:,} parameters: the overview of {len(layers)} layers "
        f"with {settings.n_steps} steps takes a while, so it runs when you ask.",
        icon=":material/hourglass:",
    )
    if st.button(f"Compute the overview of {len(layers)} layers", type="primary"):
        st.session_state[S.OVERVIEW_ASKED] = request
        st.rerun()
    st.stop()
if overview is None:
    with W.progress_bar(f"Integrating along the path for {len(layers)} layers") as report:
        ok, overview = W.attempt(
            "Computing the layer overview",
            backend.layer_overview,
            lm,
            image,
            prep,
            settings,
            report,
        )
    if not ok or overview is None:
        st.caption("Your choices are kept: change the settings above and compute again.")
        st.stop()

summaries = overview.layers

# --- summary ------------------------------------------------------------------------------------
m1, m2, m3, m4 = st.columns(4)
m1.metric("Target", md(W.target_label(lm, overview.target)))
m2.metric("F(image) − F(baseline)", f"{overview.output_diff:.4g}")
m3.metric("Layers", f"{len(summaries)}")
holding = sum(1 for s in summaries if s.relative_delta <= tolerance)
m4.metric(
    "Completeness holds",
    f"{holding} of {len(summaries)}",
    help=f"Layers whose |delta| is at most {tolerance:.1%} of |F(image) − F(baseline)| (the "
    "tolerance of the Convergence page). A layer that misses it needs more steps, or part of "
    "the score goes around it.",
)
if math.isclose(overview.output_diff, 0.0, abs_tol=1e-12):
    st.warning(
        "F(image) − F(baseline) is zero for this target: there is no score difference to "
        "share out, so the shares are not defined. Try another baseline or target."
    )


def _open_from_chart() -> None:
    event = st.session_state.get("ovw_chart")
    try:
        points = event["selection"]["points"]
    except (KeyError, TypeError):
        return
    if points:
        data = W.customdata(points[0])
        if data and 0 <= data[0] < len(summaries):
            st.session_state[S.OVERVIEW_OPEN] = summaries[data[0]].layer


def _open_from_table() -> None:
    event = st.session_state.get("ovw_table")
    try:
        rows = event["selection"]["rows"]
    except (KeyError, TypeError):
        return
    if rows and 0 <= rows[0] < len(summaries):
        st.session_state[S.OVERVIEW_OPEN] = summaries[rows[0]].layer


st.subheader("Layer by layer, in network order")
st.caption(
    "Top: each layer's total conductance as a share of F(image) − F(baseline); ✓ marks "
    f"layers where completeness holds to {tolerance:.1%}, hatched bars show the relative delta "
    "where it does not. Bottom: the share of the layer's absolute conductance that its "
    f"{len(summaries[0].top_channels) if summaries else 5} strongest channels hold. Click a "
    "bar to open the layer."
)
chart = F.overview_chart(
    [s.layer for s in summaries],
    [s.share for s in summaries],
    [s.concentration for s in summaries],
    [s.relative_delta for s in summaries],
    tolerance=tolerance,
    selected=S.get(S.LAYER),
)
W.plotly_click(chart, "ovw_chart", _open_from_chart)


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(str(d) for d in shape)


def _top(summary) -> str:
    unit = "#" if len(summary.shape) > 1 else "unit "
    return ", ".join(
        f"{unit}{c} ({v:+.3g})"
        for c, v in zip(summary.top_channels, summary.top_values, strict=True)
    )


table = pd.DataFrame(
    [
        {
            "layer": s.layer,
            "output": _shape(s.shape),
            "share": s.share * 100.0,
            "completeness": "✓" if s.relative_delta <= tolerance else "⚠",
            "top channels": _top(s),
            "top share": s.concentration * 100.0,
            "total conductance": s.total,
            "|delta| relative": s.relative_delta * 100.0,
            "positive": s.positive,
            "negative": s.negative,
        }
        for s in summaries
    ]
)
st.markdown("**Every layer's numbers** (click a row to open the layer)")
st.dataframe(
    table,
    hide_index=True,
    width="stretch",
    key="ovw_table",
    on_select=_open_from_table,
    selection_mode="single-row",
    column_config={
        "layer": st.column_config.TextColumn("layer", width="medium"),
        "total conductance": st.column_config.NumberColumn(format="%.4g"),
        "share": st.column_config.NumberColumn("share of F(x) − F(b)", format="%.1f%%"),
        "positive": st.column_config.NumberColumn(format="%.4g"),
        "negative": st.column_config.NumberColumn(format="%.4g"),
        "|delta| relative": st.column_config.NumberColumn(format="%.2f%%"),
        "top channels": st.column_config.TextColumn(width="large"),
        "top share": st.column_config.NumberColumn("top channels' share", format="%.0f%%"),
    },
    height=min(35 * (len(summaries) + 1) + 12, 600),
)


def _overview_view() -> RP.ReportView:
    """The overview as a report view: the chart, and the table's numbers one array a column
    (the layer names, in row order, are in the view's settings)."""
    names = [s.layer for s in summaries]
    return RP.page_view(
        "overview",
        f"Layer overview of {len(names)} layers for {image.name}",
        ctx=ctx,
        layer=f"{len(names)} layers",
        target=W.target_label(lm, overview.target),
        settings=(
            *RP.settings_rows(settings, RP.setting_names()),
            ("Tolerance", f"{tolerance:.3%}"),
            ("Layers (the rows of every array, in order)", ", ".join(names)),
        ),
        summary=(
            ("F(image) − F(baseline)", f"{overview.output_diff:.6g}"),
            ("Completeness holds", f"{holding} of {len(names)}"),
        ),
        arrays={
            "share": np.array([s.share for s in summaries], dtype=np.float64),
            "total_conductance": np.array([s.total for s in summaries], dtype=np.float64),
            "relative_delta": np.array([s.relative_delta for s in summaries], dtype=np.float64),
            "top_share": np.array([s.concentration for s in summaries], dtype=np.float64),
            "positive": np.array([s.positive for s in summaries], dtype=np.float64),
            "negative": np.array([s.negative for s in summaries], dtype=np.float64),
            "completeness_holds": np.array(
                [s.relative_delta <= tolerance for s in summaries], dtype=np.int64
            ),
        },
        dims={
            k: ("layer",)
            for k in (
                "share",
                "total_conductance",
                "relative_delta",
                "top_share",
                "positive",
                "negative",
                "completeness_holds",
            )
        },
        figures=[
            (
                "overview",
                "Every layer's share of F(image) − F(baseline), in network order",
                "Top: each layer's total conductance as a share of the score difference. "
                "Bottom: the share its strongest channels hold.",
                chart,
            )
        ],
    )


W.view_actions("ovw", _overview_view)
silent = [s.layer for s in summaries if s.total == 0.0 and s.positive == 0.0]
if silent:
    st.caption(
        "No conductance at: " + ", ".join(md(n) for n in silent) + ". Their output does not "
        "change between baseline and image, or no gradient reaches them from the target."
    )

W.next_step(
    W.PAGE_CONDUCTANCE,
    "Next: the channels of the chosen layer",
    previous=(W.PAGE_LAYER, "Layer picker"),
)
