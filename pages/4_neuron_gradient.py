"""Neuron gradient: which input pixels would change one neuron of the chosen layer, and how."""

from __future__ import annotations

import numpy as np
import streamlit as st

import webapp
from explainer.analysis import neighbours
from webapp import backend
from webapp import figures as F
from webapp import layouts as L
from webapp import report as RP
from webapp import state as S
from webapp import widgets as W
from webapp.text import md

ctx = webapp.setup()
W.page_header(
    "Neuron gradient",
    "One neuron is one number in the layer's output: a channel at one position. Its gradient "
    "with respect to the input shows which pixels would raise it (**red**) or lower it "
    "(**blue**) if nudged, i.e. what the neuron is looking at; the bright region of the "
    "|gradient| map is its effective receptive field. Step to a neighbouring neuron to see how "
    "the view shifts.",
)
lm, image, prep, layer = W.require_usable_layer(ctx)
ok, act = W.attempt("Reading the layer's output", backend.activation, lm, image, prep, layer)
if not ok or act is None:
    st.stop()
act = np.asarray(act)
# Neurons are chosen in the layout's view terms (feature, patch row, column for a vision
# transformer, or its class token); the engine gets each one's raw index (layout.to_raw).
layout = L.layout_choice(lm, layer, act.shape, "ng")
view = layout.view(act)
act = view.values
class_token = view.class_token
shape = layout.view_shape
word = layout.channel_word


def _fits(neuron: tuple[int, ...] | None) -> bool:
    return layout.fits(neuron)


def _default_neuron() -> tuple[int, ...]:
    """The strongest neuron of the selected channel (or of the whole layer)."""
    channel = st.session_state.get(S.CHANNEL)
    if len(shape) >= 2:
        if channel is None or not 0 <= int(channel) < shape[0]:
            channel = int(np.argmax(act.reshape(shape[0], -1).max(axis=1)))
        position = np.unravel_index(int(np.argmax(act[channel])), shape[1:])
        return (int(channel), *(int(p) for p in position))
    return (int(np.argmax(act)),)


neuron = S.get(S.NEURON)
if neuron is None or not _fits(tuple(neuron)):
    S.select_neuron(_default_neuron())
    shown = md(layout.neuron_text(S.get(S.NEURON)))
    if neuron is not None:
        # One message: the old selection is gone and what is shown instead.
        st.warning(
            f"The selected neuron {tuple(neuron)} does not exist in layer {md(layer)} "
            f"({md(layout.ranges_text())}); showing the most active neuron instead: {shown}."
        )
    else:
        st.caption(
            f"No neuron selected yet: showing the most active one ({shown}). Click a map cell "
            "here or on the Layer conductance page to choose another."
        )


def _sync_inputs() -> None:
    ss = st.session_state
    values = [int(ss.get(f"_w_n{i}", 0)) for i in range(len(shape) if len(shape) <= 3 else 1)]
    if layout.has_class_token and ss.get("_w_ncls"):
        values = values[:1]
    if len(shape) <= 3 and _fits(tuple(values)):
        S.select_neuron(tuple(values))


def _move(target: tuple[int, ...]) -> None:
    S.select_neuron(target)


def _neighbour_buttons(current: tuple[int, ...]) -> None:
    """One-click steps to the neurons around the current one."""
    if layout.is_class_token(current):
        (f,) = current
        moves = [(f"{word} −1", (f - 1,)), (f"{word} +1", (f + 1,))]
    elif len(current) == 2:
        c, p = current
        moves = [
            ("← position −1", (c, p - 1)),
            ("position +1 →", (c, p + 1)),
            (f"{word} −1", (c - 1, p)),
            (f"{word} +1", (c + 1, p)),
        ]
    elif len(current) == 3:
        c, y, x = current
        moves = [
            ("↑ up", (c, y - 1, x)),
            ("↓ down", (c, y + 1, x)),
            ("← left", (c, y, x - 1)),
            ("→ right", (c, y, x + 1)),
            (f"{word} −1", (c - 1, y, x)),
            (f"{word} +1", (c + 1, y, x)),
        ]
    elif len(current) == 1:
        (f,) = current
        moves = [("← unit −1", (f - 1,)), ("unit +1 →", (f + 1,))]
    else:
        return
    cols = st.columns(len(moves))
    for col, (text, target) in zip(cols, moves, strict=True):
        col.button(
            text,
            key=f"_w_move_{text}",
            on_click=_move,
            args=(target,),
            disabled=not _fits(target),
            width="stretch",
        )


# One height and one colour-bar layout for the three maps give plots of equal size. (A comment,
# not a docstring: Streamlit would print a bare string on the page.)
PANEL_HEIGHT = 360
RANGES = {"robust": "Robust (percentile)", "full": "Full range"}


def _store_controls() -> None:
    ss = st.session_state
    choice = ss.get("_w_grad_range")
    if choice in RANGES:
        ss[S.GRADIENT_RANGE] = choice
    ss[S.GRADIENT_ZOOM] = bool(ss.get("_w_grad_zoom", False))


def _map_controls() -> tuple[bool, bool]:
    """The colour range and zoom controls; returns (robust colours, zoom to the field)."""
    choice = S.get(S.GRADIENT_RANGE)
    choice = choice if choice in RANGES else "robust"
    zoom = bool(S.get(S.GRADIENT_ZOOM))
    c1, c2 = st.columns(2, vertical_alignment="bottom")
    W.bind("_w_grad_range", choice)
    c1.radio(
        "Colour range of the gradient maps",
        list(RANGES),
        format_func=RANGES.get,
        key="_w_grad_range",
        horizontal=True,
        on_change=_store_controls,
        help=(
            "Robust: colours saturate at the "
            f"{F.GRADIENT_PERCENTILE:g}th percentile of |gradient| over the pixels where it "
            "is not zero, so the few strongest pixels do not make the rest invisible. "
            "Full range: colours end at the largest value."
        ),
    )
    W.bind("_w_grad_zoom", zoom)
    c2.toggle(
        "Zoom to the receptive field",
        key="_w_grad_zoom",
        on_change=_store_controls,
        help=(
            "Crop both gradient maps to where |gradient| reaches at least 1% of the robust "
            "colour limit, with a small margin."
        ),
    )
    return choice == "robust", zoom


def _zoom_text(box: F.FieldBox | None, image_hw: tuple[int, ...]) -> str:
    h, w = int(image_hw[0]), int(image_hw[1])
    if box is None:
        return "No pixel has a noticeable gradient: there is nothing to zoom to."
    field = f"{box.support_width}×{box.support_height} px of {w}×{h}"
    if box.whole_image:
        return f"Receptive field about {field}: about the whole image, so nothing is cropped."
    return (
        f"Receptive field about {field} (|gradient| ≥ 1% of its "
        f"{F.GRADIENT_PERCENTILE:g}th percentile); showing "
        f"{box.width}×{box.height} px around it, rows {box.top}–{box.bottom - 1}, columns "
        f"{box.left}–{box.right - 1}."
    )


def _range_text(limit: float, peak: float, robust: bool, *, signed: bool) -> str:
    what = "|value|" if signed else "value"
    sign = "±" if signed else ""
    if robust and peak > limit:
        return (
            f"Colours saturate at the {F.GRADIENT_PERCENTILE:g}th percentile, "
            f"{sign}{F.value_text(limit)} (of {what} over non-zero pixels); the largest "
            f"{what} is {F.value_text(peak)}."
        )
    return f"Colours span the full range, {sign}{F.value_text(peak)}."


def _activation_heading(current: tuple[int, ...], spatial: bool, on_token: bool) -> None:
    if spatial:
        st.markdown(f"**Activation of {word} {current[0]}**")
        st.caption(
            "Click a patch to select that neuron, or the class token below."
            if layout.has_class_token
            else "Click a cell to select that neuron."
        )
    elif len(shape) == 1:
        st.markdown("**Activation of every unit**")
        st.caption("Click a bar to select that unit.")
    elif len(shape) == 2:
        st.markdown(f"**Activation of {word} {current[0]}** at every position")
        st.caption("Use the buttons below to step along the positions.")
    else:
        st.markdown(f"Layer output {shape}: choose the neuron on the Layer conductance page.")


def _activation_panel(current: tuple[int, ...], spatial: bool, on_token: bool) -> None:
    if spatial:
        values = (
            act[current[0]]
            if class_token is None
            else np.append(act[current[0]].ravel(), class_token[current[0]])
        )
        figure = F.spatial_map(
            act[current[0]],
            channel=current[0],
            selected_cell=None if on_token else (current[1], current[2]),
            colorbar_title="activation",
            height=PANEL_HEIGHT - 60 if class_token is not None else PANEL_HEIGHT,
            zmax=F.symmetric_limit(values),
        )
        F.bottom_colorbar(figure, "activation", signed=True)
        W.plotly_click(figure, "ng_activation", W.on_click_neuron("ng_activation"))
        if class_token is not None:
            t1, t2 = st.columns([1, 3], gap="small")
            with t1:
                W.plotly_click(
                    F.class_token_cell(
                        float(class_token[current[0]]),
                        channel=current[0],
                        selected=on_token,
                        zmax=F.symmetric_limit(values),
                        colorbar_title="activation",
                        height=80,
                    ),
                    "ng_class_token",
                    W.on_click_neuron("ng_class_token"),
                )
            t2.markdown(
                f"**Class token**, {word} {current[0]}: {float(class_token[current[0]]):.4g}"
                + (" · selected" if on_token else "")
            )
    elif len(shape) == 1:
        W.plotly_click(
            F.feature_strip(
                act, selected=current[0], yaxis_title="activation", height=PANEL_HEIGHT
            ),
            "ng_strip",
            W.on_click_neuron("ng_strip"),
        )
    elif len(shape) == 2:
        W.plotly_static(
            F.feature_strip(
                act[current[0]], selected=current[1], yaxis_title="activation", height=PANEL_HEIGHT
            ),
            key="ng_positions",
        )


@st.fragment
def neuron_views(lm: backend.ServedModel) -> None:
    """Everything about the selected neuron; a click reruns only this fragment."""
    try:
        _neuron_views(lm)
    except Exception as exc:  # noqa: BLE001 - shown in the page; the choices stay as they were
        W.show_error(exc, "Drawing the neuron views")
    st.divider()
    W.view_actions("ng", lambda: RP.neuron_view(ctx, layer))


def _neuron_views(lm: backend.ServedModel) -> None:
    current = tuple(int(i) for i in S.get(S.NEURON))
    spatial = len(shape) == 3
    on_token = layout.is_class_token(current)

    # --- choose the neuron by number
    if len(shape) <= 3:
        rows = "patch row" if layout.is_tokens else "row"
        names = (
            [word, rows, "column"]
            if spatial
            else (["unit"] if len(shape) == 1 else [word, "position"])
        )
        cols = st.columns([1] * len(names) + [3])
        for i, name in enumerate(names):
            W.bind(f"_w_n{i}", int(current[i]) if i < len(current) else 0)
            cols[i].number_input(
                name,
                min_value=0,
                max_value=shape[i] - 1,
                step=1,
                key=f"_w_n{i}",
                on_change=_sync_inputs,
                disabled=on_token and i > 0,
            )
        if layout.has_class_token:  # on its own line: a narrow column clips its label
            W.bind("_w_ncls", on_token)
            st.toggle(
                "Class token",
                key="_w_ncls",
                on_change=_sync_inputs,
                help="The class token is not a patch: it gathers the whole image.",
            )
        with cols[-1]:
            st.markdown(
                f"Neuron **{current}** ({md(layout.neuron_text(current))}) of layer "
                f"{md(layer)} · {md(layout.describe())}"
            )

    if on_token:
        others = [(f,) for f in (current[0] - 1, current[0] + 1) if 0 <= f < shape[0]]
    else:
        others = neighbours(current, shape, radius=1)
    with st.spinner("Computing input gradients..."):
        ok, results = W.attempt(
            "Computing the input gradients",
            backend.neuron_gradients,
            lm,
            image,
            prep,
            layer,
            [layout.to_raw(n) for n in (current, *others)],
        )
    if not ok or not results:
        return
    ok, pixels = W.attempt("Reading the image", backend.display_image, image, prep)
    if not ok or pixels is None:
        return
    main = results[0]
    grad = np.asarray(main.gradient, dtype=np.float64)

    signed_map = grad.sum(axis=0)
    abs_map = np.abs(grad).max(axis=0)

    m1, m2, m3 = st.columns(3)
    m1.metric("Activation", f"{main.activation:.4g}", help="The neuron's value for this image.")
    m2.metric("Max |gradient|", f"{main.abs_max:.3g}")
    with m3:
        opacity = st.slider("Map opacity", 0.2, 1.0, 0.9, 0.05, key="_w_opacity")
    robust, zoom = _map_controls()

    if main.abs_max == 0.0:
        st.info(
            "This neuron's gradient is zero everywhere: for this image it does not respond to "
            "small changes of any pixel (a ReLU that outputs 0, or a max-pool that passed on "
            "another input). Pick a strongly coloured cell of the activation map.",
            icon=":material/info:",
        )
    # Colours end at a high percentile (robust) or at the largest value (full range); the
    # zoom box always uses the robust limit, so switching the range does not move the crop.
    signed_peak = F.symmetric_limit(signed_map)
    abs_peak = F.symmetric_limit(abs_map)
    abs_robust = F.robust_limit(abs_map)
    signed_limit = F.robust_limit(signed_map) if robust else signed_peak
    abs_limit = abs_robust if robust else abs_peak
    box = F.receptive_field_box(abs_map, abs_robust) if zoom and main.abs_max > 0.0 else None
    if zoom and main.abs_max > 0.0:
        st.caption(_zoom_text(box, abs_map.shape))
    crop = box if box is not None and not box.whole_image else None

    # Three rows of equal columns (titles, figures, notes): the figures start at the same
    # height whatever their titles wrap to, and share one height and colour-bar layout.
    heads = st.columns(3, gap="medium")
    panels = st.columns(3, gap="medium")
    notes = st.columns(3, gap="medium")
    with heads[0]:
        _activation_heading(current, spatial, on_token)
    with panels[0]:
        _activation_panel(current, spatial, on_token)
    heads[1].markdown("**Signed gradient** (summed over colour channels)")
    heads[1].caption("Red: nudging the pixel up raises the neuron; blue: lowers it.")
    heads[2].markdown("**|gradient|** (largest over colour channels)")
    heads[2].caption("Where the neuron looks: its effective receptive field.")
    with panels[1]:
        W.plotly_static(
            F.gradient_panel(
                pixels,
                signed_map,
                signed=True,
                limit=signed_limit,
                opacity=opacity,
                height=PANEL_HEIGHT,
                crop=crop,
            ),
            key="ng_signed",
        )
    with panels[2]:
        W.plotly_static(
            F.gradient_panel(
                pixels,
                abs_map,
                signed=False,
                limit=abs_limit,
                opacity=opacity,
                height=PANEL_HEIGHT,
                crop=crop,
            ),
            key="ng_abs",
        )
    if main.abs_max > 0.0:
        notes[1].caption(_range_text(signed_limit, signed_peak, robust, signed=True))
        notes[2].caption(_range_text(abs_limit, abs_peak, robust, signed=False))
    if crop is not None and spatial:
        notes[0].caption("The activation map stays whole: click it to choose another neuron.")

    if st.toggle("Show each colour channel", key="_w_per_channel"):
        channels = F.gradient_channels(grad)
        channel_peak = F.symmetric_limit(grad)
        channel_limit = F.robust_limit(grad) if robust else channel_peak
        channels.update_traces(zmin=-channel_limit, zmax=channel_limit)
        W.plotly_static(F.zoom_to(channels, crop), key="ng_channels")
        st.caption(
            "Same colour scale for all three: a pixel that turns red in one channel and blue in "
            "another means the neuron responds to a colour, not just to brightness. "
            + _range_text(channel_limit, channel_peak, robust, signed=True)
        )

    st.subheader("Neighbouring neurons")
    st.caption(
        f"The same {word} one step up, down, left, right and diagonally, and the {word}s just "
        "before and after at the same position. Thumbnails show |gradient|, each on its own "
        "scale (black: a neuron that does not respond here). Click one, or use the buttons, "
        "to move there."
    )
    _neighbour_buttons(current)
    if others:
        tiles = [np.abs(np.asarray(r.gradient)).max(axis=0) for r in results]
        W.plotly_click(
            F.neighbour_tiles(
                tiles,
                [current, *others],
                [r.activation for r in results],
                current=current,
                ncols=6,
            ),
            "ng_neighbours",
            W.on_click_neuron("ng_neighbours"),
        )


if S.get(S.NEURON) is not None:
    neuron_views(lm)

card = "All about this neuron: the Neuron card"
st.page_link(W.PAGE_NEURON_CARD, label=card, icon=":material/badge:")
W.next_step(
    W.PAGE_CONVERGENCE,
    "Next: check that the conductance numbers can be trusted",
    previous=(W.PAGE_CONDUCTANCE, "Layer conductance"),
)
