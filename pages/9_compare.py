"""Compare: two to four conductance views side by side, on one colour scale where the units
agree, with one neuron selection shared by every pane."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import streamlit as st

import webapp
from explainer.baselines import BASELINE_KINDS
from webapp import backend, presentation
from webapp import compare as C
from webapp import figures as F
from webapp import report as RP
from webapp import state as S
from webapp import widgets as W
from webapp.text import md

ctx = webapp.setup()
W.page_header(
    "Compare",
    "Two to four conductance views side by side: of several images, layers, target classes or "
    "baselines, or of the model against a copy of itself whose weights are shuffled (an "
    "explanation that looks the same for both says little about what the model learned). "
    "Panes that explain the same score share one colour scale, so their colours compare "
    "directly. Click a cell in any pane to select that neuron: every pane that has it shows "
    "it.",
)
lm, image, prep, layer = W.require_usable_layer(ctx)
images = {e.digest: e for e in ctx.images}

ok, tree = W.attempt("Discovering the layers", backend.tree, lm)
if not ok or tree is None:
    st.stop()
usable = tree.usable_names()


def candidates(mode: str) -> list:
    """The values a pane can take in ``mode``, most useful first."""
    if mode == "images":
        return list(images)
    if mode == "layers":
        return [*reversed(tree.suggested), *usable]
    if mode == "targets":
        ok, preds = W.attempt("Predicting", backend.predictions, lm, image, prep, lm.num_classes)
        ranked = [index for _, index, _ in preds] if ok and preds else []
        return [*ranked, *range(lm.num_classes)]
    if mode == "baselines":
        return list(BASELINE_KINDS)
    return list(C.RANDOM_PANES)


def current_first(mode: str):
    """The app's current choice for ``mode``: the first pane starts from it."""
    settings: S.AttributionSettings = S.get(S.SETTINGS)
    return {
        "images": image.digest,
        "layers": layer,
        "targets": settings.target,
        "baselines": settings.baseline,
    }.get(mode)


def fresh_spec(mode: str, count: int) -> C.CompareSpec:
    return C.CompareSpec(mode, C.default_panes(mode, count, candidates(mode), current_first(mode)))


spec: C.CompareSpec = st.session_state.get(S.COMPARE) or fresh_spec("images", 2)
if spec.mode not in C.MODES:
    spec = fresh_spec("images", 2)


def _on_mode() -> None:
    old: C.CompareSpec = S.get(S.COMPARE) or C.CompareSpec()
    mode = st.session_state["_w_cmp_mode"]
    fresh = fresh_spec(mode, max(C.MIN_PANES, len(old.panes)))
    st.session_state[S.COMPARE] = replace(fresh, view=old.view, shared=old.shared)


def _on_count() -> None:
    now: C.CompareSpec = S.get(S.COMPARE)
    count = int(st.session_state["_w_cmp_count"])
    st.session_state[S.COMPARE] = replace(
        now, panes=C.resized(now.panes, count, candidates(now.mode))
    )


def _on_pane(index: int) -> None:
    now: C.CompareSpec = S.get(S.COMPARE)
    panes = list(now.panes)
    panes[index] = st.session_state[f"_w_cmp_pane{index}"]
    st.session_state[S.COMPARE] = replace(now, panes=tuple(panes))


# --- what is compared ---------------------------------------------------------------------------
# Every choice of what is compared and how it is drawn goes in one box (an expander in
# presentation mode); the messages about the choices stay outside it, in view.
with presentation.controls("What is compared, the panes and their colour scale") as choices:
    c1, c2 = st.columns([3, 2])
W.bind("_w_cmp_mode", spec.mode)
c1.radio(
    "Compare",
    list(C.MODES),
    format_func=C.MODES.__getitem__,
    horizontal=True,
    key="_w_cmp_mode",
    on_change=_on_mode,
)
if spec.mode == "images" and len(images) < 2:
    st.session_state[S.COMPARE] = spec
    st.warning(
        "Comparing images needs at least two images, and there is only one. Add images on "
        "the Model & images page, or compare layers, targets or baselines of this one.",
        icon=":material/image:",
    )
    st.page_link(W.PAGE_MODEL, label="Add images", icon=":material/arrow_forward:")
    st.stop()
options = candidates(spec.mode)
most = C.MAX_PANES if spec.mode != "random" else len(C.RANDOM_PANES)
most = min(most, len(dict.fromkeys(options)))
known = set(options)
gone = [v for v in spec.panes if v not in known]
panes = C.resized(
    tuple(v for v in spec.panes if v in known),
    max(C.MIN_PANES, min(len(spec.panes), most)),
    options,
)
if gone and spec.mode == "images":
    st.warning("An image of this comparison was removed, so its pane now shows another one.")
elif gone:
    what = {"layers": "layer", "targets": "class", "baselines": "baseline"}
    st.warning(
        f"This model has no {what.get(spec.mode, 'value')} "
        + ", ".join(md(repr(v)) for v in gone)
        + ", so its pane now shows another one."
    )
spec = replace(spec, panes=panes)
st.session_state[S.COMPARE] = spec
if spec.mode != "random" and most > C.MIN_PANES:
    W.bind("_w_cmp_count", len(panes))
    c2.slider("Panes", C.MIN_PANES, most, key="_w_cmp_count", on_change=_on_count)
elif spec.mode == "images":
    c2.caption("Two panes: add images on the Model & images page to compare more.")
else:
    c2.caption(
        "The copy has the model's architecture with every weight tensor's entries shuffled "
        "(a fixed seed): the same values, none of the learned arrangement. It lives in the "
        "model's worker; the model itself is not changed."
    )

with presentation.controls("Target, baseline and integration, shared by every pane", always=True):
    settings = W.settings_form(ctx, "cmp")


def describe(mode: str, value) -> str:
    """A pane value in words (plain text)."""
    if mode == "images":
        entry = images.get(value)
        return entry.name if entry else "an image no longer loaded"
    if mode == "targets":
        return W.target_label(lm, int(value))
    if mode == "baselines":
        return S.BASELINE_NAMES.get(value, str(value))
    if mode == "random":
        return "The model" if value == "model" else "Randomised copy"
    return str(value)


unique = list(dict.fromkeys(options))
if spec.mode != "random":
    columns = choices.columns(len(panes))
    for i, value in enumerate(panes):
        W.bind(f"_w_cmp_pane{i}", value if value in unique else unique[0])
        columns[i].selectbox(
            f"Pane {i + 1}",
            unique,
            format_func=lambda v, mode=spec.mode: describe(mode, v),
            key=f"_w_cmp_pane{i}",
            on_change=_on_pane,
            args=(i,),
        )


def _on_view() -> None:
    st.session_state[S.COMPARE] = replace(
        S.get(S.COMPARE),
        view=st.session_state["_w_cmp_view"],
        shared=bool(st.session_state["_w_cmp_shared"]),
    )


v1, v2 = choices.columns([2, 3])
W.bind("_w_cmp_view", spec.view)
view = v1.radio(
    "Each pane shows",
    ["channel", "sum"],
    format_func=lambda v: "The selected channel" if v == "channel" else "All channels summed",
    horizontal=True,
    key="_w_cmp_view",
    on_change=_on_view,
    help="A spatial layer's map of the selected neuron's channel (each pane's strongest "
    "channel until a neuron is selected), or the sum over its channels.",
)
W.bind("_w_cmp_shared", spec.shared)
shared = v2.toggle(
    "One colour scale for panes that explain the same score",
    key="_w_cmp_shared",
    on_change=_on_view,
    help="Conductance is measured in units of the explained score, so panes that explain the "
    "same class (at the same output position) compare on one scale. Every pane draws the "
    "scale it uses under its map.",
)
for a, b in C.duplicates(panes):
    st.info(f"Panes {a} and {b} show the same thing; pick another value for one of them.")


# --- compute every pane -------------------------------------------------------------------------
def compute(value) -> C.Pane:
    """One pane's conductance, or a pane that says why it has none (shown in the page)."""
    mode, pane_image, pane_layer, pane_settings = spec.mode, image, layer, settings
    if mode == "images":
        pane_image = images.get(value, image)
    elif mode == "layers":
        pane_layer = str(value)
        ok, _ = W.attempt(f"Checking layer {pane_layer}", backend.check_layer, lm, pane_layer)
        if not ok:
            return C.Pane(describe(mode, value), pane_layer, None)
    elif mode == "targets":
        pane_settings = replace(settings, target=int(value))
    elif mode == "baselines":
        pane_settings = replace(settings, baseline=str(value))
    title = describe(mode, value)
    fn = backend.random_conductance if value == "random" else backend.conductance
    with W.progress_bar(f"{md(title)}: integrating") as report:
        ok, result = W.attempt(
            f"Conductance for {title}", fn, lm, pane_image, prep, pane_layer, pane_settings, report
        )
    return C.Pane(title, pane_layer, result if ok else None)


computed = [compute(value) for value in panes]
results = [p.result for p in computed if p.result is not None]
if not results:
    st.caption("Your choices are kept: change the settings above or the panes' values.")
    st.stop()

# --- what is drawn: the shown channels and the colour scales ------------------------------------
selection = st.session_state.get(S.COMPARE_SELECTION)
keys = [C.units_key(p.result) if p.result is not None else None for p in computed]
distinct = {k for k in keys if k is not None}
if len(distinct) > 1:
    targets = ", ".join(
        md(W.target_label(lm, p.result.target)) for p in computed if p.result is not None
    )
    st.info(
        f"The panes explain different scores ({targets}), so conductance is in different "
        "units: panes of different targets get their own colour scale. Fix one target class "
        "in the settings to put them all on one scale.",
        icon=":material/palette:",
    )
elif shared and len(results) > 1:
    st.caption(
        f"All panes explain **{md(W.target_label(lm, results[0].target))}** and share one "
        "colour scale."
    )


def shown_channel(pane: C.Pane) -> int:
    """The selected neuron's channel where it exists in the pane, else its strongest one."""
    result = pane.result
    assert result is not None
    if C.neuron_exists(result, pane.layer, selection):
        return int(selection[1][0])
    return int(np.argmax(np.abs(result.channel_totals))) if result.channel_totals.size else 0


channels = [shown_channel(p) if p.result is not None else 0 for p in computed]
maps = [
    C.shown_map(p.result, view, channels[i]) if p.result is not None else None
    for i, p in enumerate(computed)
]
groups = C.scale_groups(
    [
        (keys[i], p.result is not None and p.result.is_spatial) if shared else i
        for i, p in enumerate(computed)
    ]
)
drawn_maps = [
    values is not None and p.result is not None and p.result.is_spatial
    for values, p in zip(maps, computed, strict=True)
]
limits: dict[int, float] = {}
for i, values in enumerate(maps):
    if values is not None:
        limits[groups[i]] = max(limits.get(groups[i], 0.0), F.symmetric_limit(values))


def _on_click(index: int) -> None:
    """A click in pane ``index`` selects that neuron in every pane."""
    data = W.clicked_data(f"cmp_map{index}")
    if not data:
        return
    if len(data) == 3 and data[0] < 0:
        data[0] = channels[index]
    neuron = tuple(int(i) for i in data)
    pane_layer = computed[index].layer
    st.session_state[S.COMPARE_SELECTION] = (pane_layer, neuron)
    if pane_layer == S.get(S.LAYER):
        S.select_neuron(neuron)  # the other pages follow


if selection:
    st.info(
        f"Selected: neuron **{tuple(selection[1])}** of layer **{md(selection[0])}**",
        icon=":material/ads_click:",
    )
else:
    st.caption("Click a cell (or a bar) in any pane to select that neuron in every pane.")

# --- the panes ----------------------------------------------------------------------------------
drawn: list[tuple[str, str, str, object]] = []  # (name, title, caption, figure) for downloads
st.html(C.PANES_CSS)
row = st.container(key=C.PANES_KEY).columns(len(computed))
for i, (pane, column) in enumerate(zip(computed, row, strict=True)):
    with column, st.container(border=True, key=f"cmp_pane{i}"):
        st.markdown(f"**{i + 1}. {md(pane.title)}**")
        result = pane.result
        if result is None:
            st.caption("No map: see the message above.")
            continue
        st.caption(
            f"Layer {md(pane.layer)} · target {md(W.target_label(lm, result.target))} · "
            f"F(x) − F(b) {result.output_diff:.3g} · delta {result.relative_delta:.1%}"
        )
        limit = limits[groups[i]]
        here = C.neuron_exists(result, pane.layer, selection)
        neuron = tuple(selection[1]) if here else None
        if result.is_spatial:
            what = f"channel {channels[i]}" if view == "channel" else "all channels"
            figure = F.spatial_map(
                maps[i],
                channel=channels[i],  # a click on the sum selects the shown channel's neuron
                selected_cell=(neuron[1], neuron[2]) if neuron else None,
                zmax=limit,
                height=340,  # the map, and its colour bar under it
                title=what,
            )
        else:
            figure = F.feature_strip(
                maps[i], selected=neuron[0] if neuron else None, yaxis_title="conductance"
            )
            figure.update_yaxes(range=[-limit * 1.05, limit * 1.05])
        if result.is_spatial:
            # Every pane carries its colour bar (a screenshot or a download of one pane stays
            # readable), under the map so that all maps keep the same size.
            F.bottom_colorbar(figure, "conductance", signed=True)
            figure.update_traces(
                colorbar_title_text=C.scale_title(groups, drawn_maps, i),
                selector=dict(type="heatmap"),
            )
        W.plotly_click(figure, f"cmp_map{i}", lambda i=i: _on_click(i))
        shows = f"channel {channels[i]}" if result.is_spatial and view == "channel" else "sum"
        drawn.append(
            (
                f"pane{i + 1}_map",
                f"Pane {i + 1}: {pane.title}",
                f"Layer {pane.layer}, target {W.target_label(lm, result.target)}, {shows}.",
                figure,
            )
        )
        if neuron is not None:
            value = float(result.attributions[neuron] if result.is_spatial else maps[i][neuron])
            st.markdown(f"Neuron **{neuron}**: conductance **{value:.4g}**")
        elif selection:
            chosen_layer, chosen = selection
            if chosen_layer != pane.layer:
                st.caption(
                    f"The selected neuron {tuple(chosen)} belongs to layer {md(chosen_layer)}; "
                    f"this pane shows layer {md(pane.layer)}, which does not have it."
                )
            else:
                st.caption(f"The selected neuron {tuple(chosen)} is outside this layer.")


def _compare_view() -> RP.ReportView:
    """The panes as a report view: each pane's map as drawn, and its channel totals."""
    arrays: dict[str, np.ndarray] = {}
    dims: dict[str, tuple[str, ...]] = {}
    rows = []
    for i, pane in enumerate(computed):
        if pane.result is None or maps[i] is None:
            rows.append((f"Pane {i + 1}", f"{pane.title}: no map"))
            continue
        result = pane.result
        shown = np.asarray(maps[i], dtype=np.float64)
        arrays[f"pane{i + 1}_map"] = shown
        dims[f"pane{i + 1}_map"] = ("y", "x") if shown.ndim == 2 else ("unit",)[: shown.ndim]
        arrays[f"pane{i + 1}_channel_totals"] = np.asarray(result.channel_totals)
        dims[f"pane{i + 1}_channel_totals"] = ("channel",)
        rows.append(
            (
                f"Pane {i + 1}",
                f"{pane.title} · layer {pane.layer} · target "
                f"{W.target_label(lm, result.target)} · F(x) − F(b) {result.output_diff:.6g} · "
                f"delta {result.relative_delta:.3%}",
            )
        )
    return RP.page_view(
        "compare",
        f"Comparison of {len(computed)} panes ({C.MODES.get(spec.mode, spec.mode)}) for "
        f"{image.name}",
        ctx=ctx,
        layer=layer,
        target=W.target_setting_text(lm, settings),
        settings=(
            *RP.settings_rows(settings, RP.setting_names()),
            ("Each pane shows", "the selected channel" if view == "channel" else "all channels"),
            ("One colour scale for the same score", "yes" if shared else "no"),
        ),
        summary=tuple(rows),
        arrays=arrays,
        dims=dims,
        figures=drawn,
    )


W.view_actions("cmp", _compare_view)
W.next_step(
    W.PAGE_CONDUCTANCE,
    "Next: every channel of the chosen layer",
    previous=(W.PAGE_OVERVIEW, "Layer overview"),
)
