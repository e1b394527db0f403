"""Layer conductance: how much each channel and position of the layer adds to the target score."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import streamlit as st

import webapp
from explainer.analysis import ConductanceResult, negligible_difference, position_names
from explainer.images import resize_map
from explainer.layout import Layout, LayoutView
from webapp import backend, refine
from webapp import figures as F
from webapp import glossary as G
from webapp import layouts as L
from webapp import report as RP
from webapp import state as S
from webapp import widgets as W
from webapp.text import md

ctx = webapp.setup()
W.page_header(
    "Layer conductance",
    "Conductance splits the model's score for the target class (at one output position, for "
    "a model that scores every position), F(image) − F(baseline), among "
    "the units of the chosen layer: **red** units push the score up, **blue** ones push it "
    "down, and all of them together add up to the score difference. Click a bar or a tile to "
    "select a channel, and a cell of a map to select a neuron.",
)
lm, image, prep, layer = W.require_usable_layer(ctx)

settings = W.settings_form(ctx, "cond", auto_steps=True)
with W.progress_bar("Integrating along the path") as report:
    ok, answer = W.attempt(
        "Computing conductance", refine.conductance, lm, image, prep, layer, settings, report
    )
if not ok or answer is None:
    st.caption("Your choices are kept: change the settings above or pick another layer.")
    st.page_link(W.PAGE_LAYER, label="Layer picker", icon=":material/account_tree:")
    st.stop()
result, refinement = answer
if refinement is not None:  # a first look: the asked-for map is refined in the background
    refine.progress(refinement, result.n_steps)

# --- summary ------------------------------------------------------------------------------------
total = float(np.sum(result.channel_totals))
m1, m2, m3, m4 = st.columns(4)
if result.target_position:
    m1.metric(
        "Target",
        md(W.target_label(lm, result.target_class)),
        delta=f"at {W.position_text(result.target_position)}",
        delta_color="off",
        delta_arrow="off",
        help="The class, and the output position whose score is explained.",
    )
else:
    m1.metric("Target", md(W.target_label(lm, result.target)))
m2.metric("F(image) − F(baseline)", f"{result.output_diff:.4g}")
m3.metric("Sum of conductance", f"{total:.4g}")
tolerance = float(S.get(S.TOLERANCE))
converged = result.relative_delta <= tolerance
m4.metric(
    "Convergence delta",
    f"{result.delta:.2g}",
    delta=f"{result.relative_delta:.2%} {'≤' if converged else '>'} "
    f"{tolerance * 100:.3g}% tolerance"
    if refinement is None
    else f"{result.relative_delta:.2%} at a first look",
    delta_color="off" if refinement is not None else "green" if converged else "red",
    delta_arrow="off",
    help="Sum of conductance minus the score difference, and its size in % of the score "
    "difference against your tolerance (green within it, red above). The tolerance is set on "
    "the Convergence page, which also shows how the delta shrinks with more steps.",
)
G.explain("score-difference", "conductance", "delta", label="What do these numbers mean?")
if result.method == "auto" and refinement is None:
    st.caption(
        f"Automatic steps: the engine used {result.n_steps} steps "
        + {
            "converged": "to bring the delta within your tolerance.",
            "cap": f"(the most you allow, n_steps = {result.n_steps}) and stopped there.",
            "stalled": "and stopped: more steps no longer shrank the delta.",
            "memory": "and stopped: more points would not fit in the server's memory budget.",
        }.get(result.status, f"({md(result.status)}).")
    )
if not converged and refinement is None:  # a first look is approximate by design
    if result.status == "stalled":
        advice = (
            "More steps do not shrink this delta: part of the score difference does not pass "
            "through this layer (a skip connection around it, for example). Pick a layer the "
            "whole signal passes through to see all of it."
        )
    elif result.method == "auto":
        advice = "Allow more steps (n_steps above is the most the engine may use)."
    else:
        advice = (
            "Raise the number of steps, switch to Gauss-Legendre, or let the engine choose the "
            "steps above; the Convergence page shows how many steps this image needs."
        )
    st.warning(
        f"The conductance misses the score difference by {result.relative_delta:.1%}, more than "
        f"your tolerance of {tolerance:.2%}: the maps below are not reliable yet. {advice}"
    )
ok_scores, image_scores = W.attempt("Reading the model's scores", backend.scores, lm, image, prep)
score_scale = float(np.max(np.abs(image_scores))) if ok_scores and image_scores is not None else 0.0
if result.output_diff == 0:
    st.info(
        "The target's score is exactly the same for the image and the baseline, so there is "
        "nothing to explain: conductance shares out F(image) − F(baseline), which is zero here. "
        "This happens when the model gives this class the same score whatever the input (for "
        "example a head that scores every class alike) or when the baseline equals the image. "
        "Try another baseline or another target class."
    )
elif negligible_difference(result.output_diff, score_scale):
    st.warning(
        f"The score difference F(image) − F(baseline) is {result.output_diff:.2g}, negligible "
        f"next to the scores themselves (up to {score_scale:.2g}): the maps below show rounding "
        "noise, not what the model uses. Try another baseline or target class."
    )
elif not np.any(result.attributions):
    if result.layer_moves:
        st.info(
            "Every unit of this layer has zero conductance: its output changes between the "
            "baseline and the image, but no gradient reaches it from the target score, so none "
            "of that change counts (something between this layer and the output has no "
            "gradient: a step function, rounding, an argmax or a detached branch). Try a layer "
            "after that point."
        )
    else:
        st.info(
            "Every unit of this layer has zero conductance: its output is the same for the "
            "image and the baseline, so nothing flows through it. Try another baseline, or a "
            "layer closer to the output."
        )


# --- the explained output (models that score every output position) ----------------------------
def explained_output(lm: backend.ServedModel, result: ConductanceResult) -> None:
    """The target class's score over the output, with the explained position circled."""
    position = result.target_position
    ok, view = W.attempt(
        "Reading the model's scores", backend.score_view, lm, image, prep, result.target
    )
    if not ok or view is None:
        return
    chosen = S.get(S.SETTINGS).position_for(len(position))
    automatic = [
        name
        for i, name in enumerate(position_names(len(position)))
        if chosen is None or chosen[i] is None
    ]
    label = md(W.target_label(lm, result.target_class))
    where = W.position_text(position)
    left, right = st.columns([3, 2], gap="medium")
    with left:
        st.markdown(f"**Score of {label} at every output position**")
        if view.ndim == 2:
            figure = F.score_map(view, (position[-2], position[-1]))
        else:
            figure = F.score_profile(view, position[-1])
        W.plotly_click(figure, "cond_scores", W.on_click_position("cond_scores", position))
    with right:
        score = float(view[position[-2:]] if view.ndim == 2 else view[position[-1]])
        st.metric(
            "Explained score",
            f"{score:.4g}",
            help="The model's score for the target class at the explained position, F(image).",
        )
        if len(automatic) == len(position):
            how = "chosen automatically: where this class scores highest"
        elif automatic:
            how = f"the {' and '.join(automatic)} chosen where this class scores highest"
        else:
            how = "the position you chose"
        st.markdown(f"Explaining the score of **{label}** at **{where}** ({how}).")
        st.caption(
            "The circle marks the explained position. Click the map to explain another "
            "position; clear the output fields in the form above to go back to automatic."
        )


if result.target_position:
    st.subheader("The explained output")
    explained_output(lm, result)


# --- interactive views (one fragment: a click reruns only this part) ----------------------------
def _sync_grid() -> None:
    """Copy the grid widgets into the shared view; a new order or filter starts at page 1."""
    ss = st.session_state
    view: S.GridView = S.get(S.GRID)
    new = replace(
        view,
        rank=ss.get("_w_rank", view.rank),
        top_k=int(ss.get("_w_topk", view.top_k)),
        page_size=int(ss.get("_w_page_size", view.page_size)),
        filter=ss.get("_w_filter", view.filter),
    )
    if (new.rank, new.page_size, new.filter) != (view.rank, view.page_size, view.filter):
        new = replace(new, page=1)
    ss[S.GRID] = new


def _sync_page() -> None:
    view: S.GridView = S.get(S.GRID)
    st.session_state[S.GRID] = replace(view, page=int(st.session_state.get("_w_page", 1)))


def _grid_controls(num_channels: int) -> tuple[S.GridView, list[int] | None]:
    view: S.GridView = S.get(S.GRID)
    c1, c2, c3, c4 = st.columns([3.4, 2, 1.6, 2.6])  # the ranking names are the longest
    W.bind("_w_rank", view.rank)
    c1.selectbox(
        "Order channels by",
        list(F.RANKINGS),
        format_func=lambda r: F.RANKINGS[r],
        key="_w_rank",
        on_change=_sync_grid,
    )
    top_max = max(1, min(num_channels, 100))
    if top_max > 1:
        W.bind("_w_topk", max(1, min(view.top_k, top_max)))
        c2.slider(
            "Bars shown",
            1,
            top_max,
            key="_w_topk",
            on_change=_sync_grid,
            help="How many channels the bar chart shows: the top k in the chosen order.",
        )
    sizes = [16, 36, 64, 100]
    W.bind("_w_page_size", view.page_size if view.page_size in sizes else 36)
    c3.selectbox("Tiles per page", sizes, key="_w_page_size", on_change=_sync_grid)
    W.bind("_w_filter", view.filter)
    c4.text_input(
        "Only channels",
        key="_w_filter",
        placeholder="e.g. 3, 10-20, 40",
        help="Restrict the bars and tiles to these channels.",
        on_change=_sync_grid,
    )
    only = None
    try:
        only = F.parse_channel_filter(view.filter, num_channels)
    except ValueError as exc:
        st.warning(f"{md(exc)} Showing every channel.")
    return replace(view, top_k=max(1, min(view.top_k, top_max))), only


def _pager(count: int, view: S.GridView) -> tuple[int, int]:
    pages = max(1, math.ceil(count / view.page_size))
    page = min(max(1, view.page), pages)
    if pages > 1:
        W.bind("_w_page", page)
        st.number_input(
            f"Page (of {pages})",
            min_value=1,
            max_value=pages,
            step=1,
            key="_w_page",
            on_change=_sync_page,
        )
    start = (page - 1) * view.page_size
    return start, min(count, start + view.page_size)


def _array_part(*arrays: np.ndarray) -> str:
    """A digest of arrays (their types, shapes and bytes): one part of a figure's key."""
    from explainer.cache import digest

    parts = []
    for values in arrays:
        values = np.ascontiguousarray(values)
        parts.append((str(values.dtype), tuple(int(s) for s in values.shape), values.tobytes()))
    return digest("arrays", *parts)


def _figure(parts: tuple, build, nbytes: int) -> F.go.Figure:
    """The figure ``build()`` draws, made once per content: ``parts`` name everything it shows.

    A click that changes one chart reruns the whole fragment; the charts it did not change
    come from the cache instead of being drawn again (drawing a plotly figure costs tens of
    milliseconds per chart). Nothing changes a figure after it is built.
    """
    from explainer.cache import digest

    cache = backend.result_cache()
    key = digest("conductance-figure", *parts)
    figure = cache.get(key)
    if figure is None:
        figure = build()
        cache.put(key, figure, nbytes=nbytes)
    return figure


def _neuron_preview(
    lm: backend.ServedModel,
    layer: str,
    neuron: tuple[int, ...],
    layout: Layout | None = None,
    *,
    slots: tuple[st.delta_generator.DeltaGenerator, st.delta_generator.DeltaGenerator]
    | None = None,
) -> None:
    """The input gradient of ``neuron`` (in the layout's view terms; the engine gets its raw
    index), and its numbers beside it, or in the two given ``slots`` (gradient, numbers)."""
    raw = layout.to_raw(neuron) if layout is not None else neuron
    # A short title: the plot can be narrow.
    short = f"neuron {tuple(neuron)}"
    ok, grads = W.attempt(
        "Computing the neuron's gradient",
        backend.neuron_gradients,
        lm,
        image,
        prep,
        layer,
        [raw],
    )
    if not ok or not grads:
        return
    g = grads[0]
    ok, pixels = W.attempt("Reading the image", backend.display_image, image, prep)
    if not ok:
        return
    c1, c2 = slots if slots is not None else st.columns([1, 1])
    with c1:
        signed = g.gradient.sum(axis=0)
        W.plotly_static(
            _figure(
                ("preview", _array_part(pixels), _array_part(signed), short),
                lambda: F.gradient_overlay(
                    pixels, signed, signed=True, title=f"Input gradient: {short}", height=340
                ),
                nbytes=4 * (pixels.nbytes + signed.nbytes),
            ),
            key="cond_preview",
        )
    with c2:
        st.metric("Activation", f"{g.activation:.4g}")
        if slots is None:  # with slots, the gradient's own column says it
            st.caption(
                "Where a small change of the input pixels would raise (red) or lower (blue) this "
                "neuron's activation."
            )
        if g.abs_max == 0.0:
            st.info(
                "Its gradient is zero everywhere: this neuron does not respond to small "
                "changes of the image here. Try a strongly coloured cell.",
                icon=":material/info:",
            )
        st.page_link(
            W.PAGE_NEURON, label="Open in Neuron gradient", icon=":material/arrow_forward:"
        )


def _on_position_click(chart_key: str, channel: int) -> None:
    """A clicked position of the selected channel's profile selects ``(channel, position)``."""
    event = st.session_state.get(chart_key) or {}
    try:
        points = event["selection"]["points"]
        position = int(round(float(points[0]["customdata"][0])))
    except (KeyError, IndexError, TypeError, ValueError):
        return
    S.select_neuron((channel, position))


def _sequence_views(
    lm: backend.ServedModel,
    result: ConductanceResult,
    layout: Layout,
    attributions: np.ndarray,
    totals: np.ndarray,
    channel: int,
    neuron: tuple[int, ...] | None,
) -> None:
    """A layer without a map: bars per channel, then the selected channel along its positions."""
    word = layout.channel_word
    top_max = max(1, min(totals.size, 100))
    ranked = F.rank_channels(totals, "abs")[:top_max]
    st.subheader(f"Conductance per {word}")
    st.caption(
        f"{md(layout.describe())} Each bar is one {word}'s total over every position; click a "
        f"bar to select the {word}."
    )
    W.plotly_click(
        F.channel_bars(ranked, totals, selected=channel, height=320),
        "cond_bars",
        W.on_click_channel("cond_bars"),
    )
    if len(layout.view_shape) != 2:
        st.caption("This layer's output has more dimensions than the maps can show.")
        return
    place = "token" if layout.kind == "tokens" else "position"
    st.markdown(f"**{word.capitalize()} {channel}** at every {place}")
    st.caption(f"Click a bar to select the neuron of {word} {channel} at that {place}.")
    selected = neuron[1] if neuron is not None and neuron[0] == channel else None
    figure = F.feature_strip(attributions[channel], selected=selected, yaxis_title="conductance")
    figure.update_xaxes(title=place)
    W.plotly_click(figure, "cond_positions", lambda: _on_position_click("cond_positions", channel))
    if neuron is not None:
        st.subheader("Selected neuron")
        _neuron_preview(lm, result.layer, neuron, layout)


@st.fragment
def views(lm: backend.ServedModel, result: ConductanceResult) -> None:
    """Charts and selection; a click reruns only this fragment (the result is an argument)."""
    refine.collect_gradients()  # the shown channel's cells, computed while the user looked
    try:
        _views(lm, result)
    except Exception as exc:  # noqa: BLE001 - shown in the page; the choices stay as they were
        W.show_error(exc, "Drawing the conductance views")
    st.divider()
    W.view_actions("cond", lambda: RP.conductance_view(ctx, result))


def _views(lm: backend.ServedModel, result: ConductanceResult) -> None:
    # The page works on the layout's channels-first view: (C, H, W) maps with the class token
    # of a vision transformer beside them, (C, L) sequences or (C,) vectors.
    layout = L.layout_choice(lm, result.layer, result.attributions.shape, "cond")
    lv = layout.view(result.attributions)
    attributions, is_spatial = lv.values, layout.is_grid
    word = layout.channel_word
    totals = lv.channel_totals
    num_channels = totals.size
    channel = st.session_state.get(S.CHANNEL)
    if channel is None or not 0 <= int(channel) < num_channels:
        channel = F.rank_channels(totals, "abs")[0] if num_channels else 0
        st.session_state[S.CHANNEL] = channel
    if not is_spatial:  # the maps' part says what is selected itself (see _where)
        neuron = _selected_neuron(layout)
        _selection_box(layout, channel, neuron)
        if len(layout.view_shape) != 1:
            _sequence_views(lm, result, layout, attributions, totals, channel, neuron)
            return
        top_max = max(1, min(num_channels, 512))
        ranked = F.rank_channels(totals, "abs")[:top_max]
        st.subheader("Conductance per unit")
        st.caption(
            "This layer has no spatial layout (a vector per image): each bar is one unit. "
            "Click a bar to select it as the neuron."
        )
        W.plotly_click(
            F.feature_strip(
                totals,
                selected=neuron[0] if neuron else None,
                yaxis_title="conductance",
            ),
            "cond_strip",
            W.on_click_neuron("cond_strip"),
        )
        if len(ranked) < num_channels:
            st.caption(f"Showing the {top_max} units with the largest |conductance|.")
        if neuron is not None:
            _neuron_preview(lm, result.layer, tuple(neuron), layout)
        return

    view, only = _grid_controls(num_channels)
    ranked = F.rank_channels(totals, view.rank, only)
    zmax = F.symmetric_limit(
        attributions if lv.class_token is None else np.append(attributions, lv.class_token)
    )
    # What every chart below is drawn from: a chart whose inputs did not change is not redrawn.
    content = _array_part(attributions, totals)
    size = 4 * attributions.nbytes

    left, right = st.columns([2, 3], gap="medium")
    with left:
        st.markdown(f"**Total conductance per {word}**")
        st.caption(
            f"The {min(view.top_k, len(ranked))} {word}s with the {F.RANKINGS[view.rank]} "
            f"of {num_channels}. Click a bar to select its {word}."
            + (" Totals include the class token." if layout.has_class_token else "")
        )
        shown = [int(c) for c in ranked[: view.top_k]]
        W.plotly_click(
            _figure(
                ("bars", content, shown, int(channel)),
                lambda: F.channel_bars(ranked[: view.top_k], totals, selected=channel, height=420),
                nbytes=4 * totals.nbytes,
            ),
            "cond_bars",
            W.on_click_channel("cond_bars"),
        )
    with right:
        st.markdown(f"**{word.capitalize()} maps** (one shared colour scale)")
        start, stop = _pager(len(ranked), view)
        st.caption(
            f"{word.capitalize()}s {start + 1}–{stop} of {len(ranked)} in this order; each tile "
            f"is where in the image the {word}'s conductance sits"
            + (" (over the patch grid)" if layout.is_tokens else "")
            + f". Click a tile to select its {word}."
        )
        tiles = [int(c) for c in ranked[start:stop]]
        ncols = 6 if view.page_size <= 36 else 10
        W.plotly_click(
            _figure(
                ("grid", content, tiles, float(zmax), int(channel), ncols),
                lambda: F.channel_grid(
                    attributions,
                    ranked[start:stop],
                    totals,
                    zmax=zmax,
                    selected=channel,
                    ncols=ncols,
                ),
                nbytes=size,
            ),
            "cond_grid",
            W.on_click_channel("cond_grid"),
        )

    _where(lm, result, layout, lv, content, float(zmax))


def _selected_neuron(layout: Layout) -> tuple[int, ...] | None:
    """The selected neuron, or ``None`` (with a warning) when this layer has no such neuron."""
    neuron = st.session_state.get(S.NEURON)
    if neuron is not None and not layout.fits(neuron):
        st.warning(
            f"The selected neuron {tuple(neuron)} does not exist in this layer "
            f"({layout.ranges_text()}); pick another one."
        )
        return None
    return None if neuron is None else tuple(int(i) for i in neuron)


def _selection_box(layout: Layout, channel: int, neuron: tuple[int, ...] | None) -> None:
    word = layout.channel_word
    label = f"{word} **{channel}**" if layout.kind != "flat" else f"unit **{channel}**"
    chosen = (
        f" · neuron **{neuron}** ({md(layout.neuron_text(neuron))})" if neuron is not None else ""
    )
    st.info(f"Selected: {label}{chosen}", icon=":material/ads_click:")


@st.fragment
def _where(
    lm: backend.ServedModel,
    result: ConductanceResult,
    layout: Layout,
    lv: LayoutView,
    content: str,
    zmax: float,
) -> None:
    """The selected channel's map, the summed map over the image and the selected neuron.

    A fragment of its own: a click on a cell here reruns only this part (the bars and tiles
    above keep their channel), so the page answers a click quickly.
    """
    refine.collect_gradients()  # the shown channel's cells, computed while the user looked
    try:
        _where_views(lm, result, layout, lv, content, zmax)
    except Exception as exc:  # noqa: BLE001 - shown in the page; the choices stay as they were
        W.show_error(exc, "Drawing the selected channel's maps")


def _where_views(
    lm: backend.ServedModel,
    result: ConductanceResult,
    layout: Layout,
    lv: LayoutView,
    content: str,
    zmax: float,
) -> None:
    attributions, spatial = lv.values, lv.spatial
    word = layout.channel_word
    channel = int(st.session_state.get(S.CHANNEL) or 0)
    neuron = _selected_neuron(layout)
    st.subheader("Where in the image")
    _selection_box(layout, channel, neuron)
    cell = (int(neuron[1]), int(neuron[2])) if neuron is not None and len(neuron) == 3 else None
    ok, pixels = W.attempt("Reading the image", backend.display_image, image, prep)
    # The selected neuron sits beside the maps it is picked on: a click on the channel map
    # shows its gradient right next to it, and its numbers next to the summed map below.
    a, c = st.columns(2, gap="medium")
    b, d = st.columns(2, gap="medium")
    with a:
        where = "over the patch grid" if layout.is_tokens else "at the layer's resolution"
        st.markdown(f"**{word.capitalize()} {channel}** {where}")
        if layout.has_class_token:
            st.caption("Click a patch to select that neuron, or the class token beside the grid.")
            grid_col, token_col = st.columns([5, 2], gap="small")
        else:
            st.caption(f"Click a cell to select that neuron ({word}, row, column).")
            grid_col = token_col = None
        with grid_col if grid_col is not None else st.container():
            marked = cell if neuron is not None and neuron[0] == channel else None
            # The browser outlines a clicked cell itself: the map is not drawn again.
            drawn, revision = W.browser_mark(
                "cond_channel_map", (content, int(channel), float(zmax)), marked
            )
            W.plotly_click(
                _figure(
                    ("map", content, int(channel), drawn, revision, float(zmax)),
                    lambda: F.spatial_map(
                        attributions[channel],
                        channel=channel,
                        selected_cell=drawn,
                        zmax=zmax,
                        revision=revision,
                    ),
                    nbytes=4 * attributions[channel].nbytes,
                ),
                "cond_channel_map",
                W.on_click_neuron("cond_channel_map"),
            )
        if token_col is not None and lv.class_token is not None:
            with token_col:
                st.caption("**Class token**")
                W.plotly_click(
                    F.class_token_cell(
                        float(lv.class_token[channel]),
                        channel=channel,
                        selected=neuron is not None and neuron == (channel,),
                        zmax=zmax,
                        height=110,
                    ),
                    "cond_class_token",
                    W.on_click_neuron("cond_class_token"),
                )
                st.caption(f"{float(lv.class_token[channel]):.3g}")
        if lv.class_token is not None and not np.any(attributions) and np.any(lv.class_token):
            st.info(
                "All of this layer's conductance sits in the class token: the classifier reads "
                "only the class token, and after this layer nothing mixes the patches into it "
                "(the last block). Pick an earlier block to see which patches matter.",
                icon=":material/info:",
            )
    with b:
        st.markdown(f"**All {word}s summed**, upsampled over the image")
        st.caption(f"Click a cell to select the neuron of {word} {channel} at that position.")
        if ok and pixels is not None and spatial is not None:
            W.plotly_click(
                _figure(
                    ("overlay", _array_part(pixels), _array_part(spatial), int(channel)),
                    # Not outlined: a click on the channel map then changes nothing here,
                    # and the page answers without drawing this chart again.
                    lambda: F.overlay_map(
                        pixels,
                        resize_map(spatial, F.overlay_size(pixels.shape[:2])),
                        spatial.shape,
                        channel=channel,
                        layer_values=spatial,
                    ),
                    nbytes=8 * pixels.nbytes,
                ),
                "cond_overlay",
                W.on_click_neuron("cond_overlay"),
            )
    with c:
        st.markdown("**Selected neuron**")
        if neuron is None:
            st.caption("Click a cell of a map to select a neuron and see its input gradient here.")
        else:
            st.caption(
                "Its input gradient: where a small change of the pixels would raise (red) or "
                "lower (blue) this neuron's activation."
            )
    if neuron is not None:  # last: the maps are on screen while its gradient is computed
        _neuron_preview(lm, result.layer, tuple(neuron), layout, slots=(c, d))
    # Every cell of the shown channel map, computed in the background while the user looks:
    # the next click on it is answered from the cache (small models; see the backend's limit).
    rows, cols = attributions.shape[-2:]
    if rows * cols <= backend.prefetch_limit(image, prep):  # else not worth listing the cells
        refine.prefetch_gradients(
            lm,
            image,
            prep,
            result.layer,
            [layout.to_raw((channel, y, x)) for y in range(rows) for x in range(cols)],
        )


views(lm, result)

W.next_step(
    W.PAGE_NEURON,
    "Next: what in the image drives the selected neuron",
    previous=(W.PAGE_LAYER, "Layer picker"),
)
