"""Neuron card: everything about the selected neuron, with a causal check and a sanity check."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import streamlit as st

import webapp
from explainer.checks import MAX_STAGES, channel_order
from explainer.errors import JobCancelled
from webapp import backend, presentation
from webapp import dataset as D
from webapp import figures as F
from webapp import layouts as L
from webapp import neuron_card as N
from webapp import report as RP
from webapp import state as S
from webapp import widgets as W
from webapp.text import md

ctx = webapp.setup()
W.page_header(
    "Neuron card",
    "Everything about one neuron of the chosen layer in one place. A **neuron** is one number "
    "in the layer's output: one channel at one position. The card shows what the neuron "
    "responds to, how much of the model's decision flows through it, what happens when it is "
    "switched off, and whether its explanation really depends on what the model learned.",
)
lm, image, prep, layer = W.require_usable_layer(ctx)

ok, act = W.attempt("Reading the layer's output", backend.activation, lm, image, prep, layer)
if not ok or act is None:
    st.stop()
act = np.asarray(act)
shape = tuple(int(s) for s in act.shape)
if not shape or shape[0] == 0 or act.size == 0:
    st.warning(
        f"Layer {md(layer)} gives outputs shaped {shape or '()'} for one image: it has no "
        "channels or units, so there is no neuron to describe. Pick a layer with channels "
        "(a convolution, a block or a linear layer)."
    )
    st.page_link(W.PAGE_LAYER, label="Choose another layer", icon=":material/arrow_forward:")
    st.stop()

# --- which neuron (the rule of the Neuron gradient page) ----------------------------------------
# The card shows the layer in its layout's view terms: (channel, row, column) for a feature map,
# (feature, patch row, patch column) or the class token for a vision transformer. The selection
# (shared with the other pages) is kept in those terms; ``raw`` is the engine's index into the
# layer output, used only for the computations.
layout = L.layout_choice(lm, layer, shape, "card")
view = layout.view(act)
vact = np.asarray(view.values)
class_token = None if view.class_token is None else np.asarray(view.class_token)
vshape = tuple(int(s) for s in layout.view_shape)
word = layout.channel_word
spatial = len(vshape) == 3


def _select(neuron: tuple[int, ...]) -> None:
    S.select_neuron(tuple(int(i) for i in neuron))


neuron = S.get(S.NEURON)
if neuron is not None and not layout.fits(tuple(neuron)):
    st.warning(
        f"The selected neuron {tuple(neuron)} does not exist in layer {md(layer)} "
        f"({md(layout.ranges_text())}); showing the strongest neuron instead."
    )
    neuron = None
if neuron is None:
    _select(N.default_neuron(vact, st.session_state.get(S.CHANNEL)))
    st.caption(
        "No neuron selected yet: showing the most active one. Click a map cell here or on "
        "the Layer conductance page to choose another."
    )
neuron = tuple(int(i) for i in S.get(S.NEURON))  # in view terms
raw = layout.to_raw(neuron)  # the engine's index
on_class_token = layout.is_class_token(neuron)
channel = neuron[0]
who = layout.neuron_text(neuron)
remapped = layout.kind in N.REMAPPED_KINDS


def _sync_inputs() -> None:
    ss = st.session_state
    values = tuple(int(ss.get(f"_w_card_n{i}", 0)) for i in range(len(vshape)))
    if layout.has_class_token and ss.get("_w_card_cls"):
        values = values[:1]
    if layout.fits(values):
        _select(values)


def _input_names() -> list[str]:
    if spatial:
        return [word, "patch row", "patch column"] if layout.is_tokens else ["channel", "y", "x"]
    if len(vshape) == 2:
        return [word, "token" if layout.kind == "tokens" else "position"]
    return ["unit" if word == "channel" else word]


heading = (
    f"Neuron **{neuron}** ({md(who)}) of layer {md(layer)} · output "
    f"{'×'.join(map(str, shape))}" + (f", raw index {raw}" if remapped else "")
)
if len(vshape) <= 3:
    names = _input_names()
    extra = 1 if layout.has_class_token else 0
    cols = st.columns([1] * len(names) + [3], vertical_alignment="bottom")
    for i, name in enumerate(names):
        W.bind(f"_w_card_n{i}", int(neuron[i]) if i < len(neuron) else 0)
        cols[i].number_input(
            name,
            min_value=0,
            max_value=vshape[i] - 1,
            step=1,
            key=f"_w_card_n{i}",
            on_change=_sync_inputs,
            disabled=i > 0 and on_class_token,
        )
    if extra:
        W.bind("_w_card_cls", on_class_token)
        st.toggle(  # on its own line: a narrow column clips its label
            "Class token",
            key="_w_card_cls",
            on_change=_sync_inputs,
            help="The class token is the transformer's summary of the whole image: it has no "
            "place on the patch grid.",
        )
    cols[-1].markdown(heading)
else:
    st.markdown(heading)

with presentation.controls(
    "Target, baseline and integration settings (shared with Layer conductance)", always=True
):
    W.settings_form(ctx, "card")
settings = S.get(S.SETTINGS)

# --- the neuron ---------------------------------------------------------------------------------
st.subheader("What the neuron responds to")
with W.progress_bar("Layer conductance: integrating along the path") as report:
    ok, cond = W.attempt(
        "Computing the layer's conductance",
        backend.conductance,
        lm,
        image,
        prep,
        layer,
        settings,
        report,
    )
if not ok or cond is None:
    st.caption("Your choices are kept: change the settings above or pick another layer.")
    st.stop()
target_text = md(W.target_label(lm, cond.target))
with W.progress_bar("Neuron conductance: integrating along the path") as report:
    ok_nc, nc = W.attempt(
        "Computing the neuron's conductance map",
        backend.neuron_conductance,
        lm,
        image,
        prep,
        layer,
        raw,
        settings,
        report,
    )
ok_g, grads = W.attempt(
    "Computing the neuron's gradient", backend.neuron_gradients, lm, image, prep, layer, [raw]
)
ok_p, pixels = W.attempt("Reading the image", backend.display_image, image, prep)
cond_view = layout.view(np.asarray(cond.attributions))
totals = cond_view.channel_totals  # per channel (feature) of the view, class token included
share = N.shares(cond.attributions, totals, raw, channel=channel)

m1, m2, m3, m4 = st.columns(4)
m1.metric(
    "Activation",
    f"{float(act[raw]):.4g}",
    help="The neuron's value for this image: how strongly it fires.",
)
m2.metric(
    "Conductance",
    f"{share.neuron:.4g}",
    help="The neuron's conductance: how much of the target's score difference, "
    "F(image) − F(baseline), flows through this neuron. Positive: it pushes the target's score up.",
)
m3.metric(
    f"{word.capitalize()} share",
    "–" if math.isnan(share.channel_share) else f"{share.channel_share:.1%}",
    help="The conductance of the neuron's whole channel divided by the layer's total, which "
    "is the score difference F(image) − F(baseline). Channels push in both directions, so a "
    "share can be negative or above 100%.",
)
m4.metric(
    f"{word.capitalize()} rank",
    f"{share.rank} of {share.channels}",
    help="Where the channel stands when the layer's channels are ordered by conductance, "
    "largest first.",
)
st.caption(
    f"Explaining the score of **{target_text}**. The {word} carries {share.channel:.4g} of "
    f"the layer's {share.layer:.4g} ("
    + ("–" if math.isnan(share.abs_share) else f"{share.abs_share:.1%}")
    + " of all the conductance in the layer, counting pushes up and down alike)."
)

opacity = st.columns([1, 3])[0].slider("Map opacity", 0.2, 1.0, 0.9, 0.05, key="_w_card_opacity")
# The figures drawn here, (name, title, caption, figure): the download row offers them.
drawn: list[tuple[str, str, str, object]] = []
grad = nc_map = None
a, b, c = st.columns(3, gap="medium")
with a:
    if spatial and not on_class_token:
        where = "patch grid" if layout.is_tokens else "image"
        title = f"Activation of {word} {channel}"
        st.markdown(f"**{title}**")
        st.caption(
            f"The {word} over the {where}; the outlined cell is the neuron. Click a cell "
            "to select that neuron."
        )
        figure = F.spatial_map(
            vact[channel],
            channel=channel,
            selected_cell=(neuron[1], neuron[2]),
            colorbar_title="activation",
            height=340,
        )
        W.plotly_click(figure, "card_activation", W.on_click_neuron("card_activation"))
        drawn.append(("activation_map", title, f"The selected neuron is {who}.", figure))
    elif on_class_token and class_token is not None:
        title = f"Activation of every {word} of the class token"
        st.markdown(f"**{title}**")
        st.caption(
            "The class token has no place on the patch grid. Click a bar to select that "
            f"{word}, or switch the class token off above to pick a patch."
        )
        figure = F.feature_strip(
            class_token, selected=channel, yaxis_title="activation", height=340
        )
        W.plotly_click(figure, "card_strip", W.on_click_neuron("card_strip"))
        drawn.append(("activation", title, f"The selected neuron is {who}.", figure))
    elif len(vshape) == 1:
        title = "Activation of every unit"
        st.markdown(f"**{title}**")
        st.caption("Click a bar to select that unit.")
        figure = F.feature_strip(vact, selected=channel, yaxis_title="activation", height=340)
        W.plotly_click(figure, "card_strip", W.on_click_neuron("card_strip"))
        drawn.append(("activation", title, f"The selected neuron is {who}.", figure))
    else:
        st.markdown(f"Layer output {shape}: choose the neuron with the numbers above.")
with b:
    st.markdown("**Gradient** (summed over colour channels)")
    st.caption(
        "Which pixels would raise (red) or lower (blue) the neuron if nudged: what it looks at."
    )
    if ok_g and grads and ok_p:
        grad = np.asarray(grads[0].gradient, dtype=np.float64)
        figure = F.gradient_overlay(
            pixels, grad.sum(axis=0), signed=True, opacity=opacity, height=340
        )
        W.plotly_static(figure, key="card_gradient")
        drawn.append(
            (
                "neuron_gradient",
                f"Input gradient of {who}",
                "Summed over the colour channels: red pixels would raise the neuron, blue "
                "lower it.",
                figure,
            )
        )
with c:
    st.markdown("**Neuron conductance** (summed over colour channels)")
    st.caption(
        "The input pixels whose effect on the target flows through this neuron: red "
        "pushes the target's score up through it, blue down."
    )
    if ok_nc and nc is not None and ok_p:
        nc_map = np.asarray(nc.attributions)
        figure = N.conductance_overlay(pixels, nc_map.sum(axis=0), opacity)
        W.plotly_static(figure, key="card_nc")
        drawn.append(
            (
                "neuron_conductance",
                f"Neuron conductance of {who}",
                "Summed over the colour channels: the pixels whose effect on the target flows "
                "through the neuron.",
                figure,
            )
        )
if ok_nc and nc is not None:
    if not np.any(nc.attributions):
        st.info(
            "This neuron's conductance map is zero everywhere: for this image nothing of the "
            "target's score flows through it (it is switched off, or another input won a "
            "max-pool). Pick a strongly coloured cell of the activation map.",
            icon=":material/info:",
        )
    st.caption(
        f"The map adds up to {nc.total:.4g}, the neuron's conductance; the layer view gives "
        f"{share.neuron:.4g} (the two differ only by the integration error, which shrinks "
        f"with more steps). {nc.n_steps} steps, {S.METHOD_NAMES.get(nc.method, nc.method)}."
    )


def _card_view() -> RP.ReportView:
    """The card's maps as a report view: what the three maps show, and the numbers behind."""
    spatial_dims = ("channel", "y", "x") if spatial else ("unit",)
    if layout.is_tokens and spatial:
        spatial_dims = ("feature", "patch_row", "patch_column")
    return RP.page_view(
        "neuron_card",
        f"Neuron card: {who}, layer {layer}, for {image.name}",
        ctx=ctx,
        layer=layer,
        target=W.target_label(lm, cond.target),
        settings=tuple(RP.settings_rows(settings, RP.setting_names())),
        summary=(
            ("Neuron", who),
            ("Raw index into the output", f"{raw} of {'×'.join(map(str, shape))}"),
            ("Activation", f"{float(act[raw]):.6g}"),
            ("Conductance", f"{share.neuron:.6g}"),
            (f"{word.capitalize()} rank", f"{share.rank} of {share.channels}"),
        ),
        channel=channel,
        neuron=neuron,
        arrays={
            "activation": vact,
            "class_token_activation": class_token,
            f"{word}_conductance_totals": totals,
            "neuron_gradient": grad,
            "neuron_conductance": nc_map,
        },
        dims={
            "activation": spatial_dims[: vact.ndim],
            "class_token_activation": ("feature",),
            f"{word}_conductance_totals": (word,),
            "neuron_gradient": ("rgb", "y", "x"),
            "neuron_conductance": ("rgb", "y", "x"),
        },
        figures=drawn,
    )


W.view_actions("card", _card_view)


# --- causal check -------------------------------------------------------------------------------
def _label(index: int) -> str:
    return md(W.target_label(lm, index))


@st.fragment
def causal_check() -> None:
    """Zero the neuron, its channel, or the top k channels; the flip count. A slider move
    reruns only this part."""
    try:
        _causal_check()
    except Exception as exc:  # noqa: BLE001 - shown in the page; the choices stay as they were
        W.show_error(exc, "Drawing the causal check")


def _causal_check() -> None:
    st.subheader("Causal check: what happens without it")
    st.markdown(
        "Conductance says how much flows through a unit; switching the unit off shows whether "
        "the model actually **needs** it. Here a unit is *zeroed*: its output is set to 0 while "
        "the rest of the model runs unchanged, and the model's new prediction and score are "
        "shown."
    )
    channels = int(totals.size)
    order = channel_order(totals)
    top_default = min(3, channels)
    k = st.columns([1, 1])[0].slider(
        f"Zero the top k {word}s (largest conductance first)",
        1,
        max(2, channels),
        top_default,
        key="_w_card_k",
        disabled=channels < 2,
    )
    k = min(int(k), channels)
    variants: list[list[tuple[int, ...]]] = [[raw]]
    names = [f"this neuron ({who})"]
    if len(vshape) > 1:
        variants.append(N.channel_units(layout, channel))
        names.append(f"its whole {word} {channel}")
    variants.append([u for i in order[:k] for u in N.channel_units(layout, int(i))])
    names.append(f"the top {k} {word}{'s' if k > 1 else ''}")
    arrays: dict[str, np.ndarray] = {}
    drawn_here: list[tuple[str, str, str, object]] = []
    ok, ablated = W.attempt(
        "Zeroing units of the layer", backend.ablation, lm, image, prep, layer, settings, variants
    )
    if ok and ablated is not None:
        before = ablated.target_score()
        rows = [
            {
                "zeroed": "nothing (the model as it is)",
                "predicted class": W.target_label(lm, ablated.predicted()),
                "target score": f"{before:.4g}",
                "change": "",
            }
        ]
        for i, name in enumerate(names):
            after = ablated.target_score(i)
            changed = ablated.predicted(i) != ablated.predicted()
            rows.append(
                {
                    "zeroed": name,
                    "predicted class": W.target_label(lm, ablated.predicted(i))
                    + ("  ← changed" if changed else ""),
                    "target score": f"{after:.4g}",
                    "change": f"{after - before:+.4g}",
                }
            )
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
        scores = [before] + [ablated.target_score(i) for i in range(len(names))]
        arrays["causal_target_score"] = np.asarray(scores, dtype=np.float64)
        arrays["causal_change"] = np.asarray(scores, dtype=np.float64) - before
        arrays["causal_predicted_class"] = np.asarray(
            [ablated.predicted()] + [ablated.predicted(i) for i in range(len(names))],
            dtype=np.int64,
        )
        arrays["top_channels"] = np.asarray(order[:k], dtype=np.int64)
        st.caption(
            f"The target score is the model's score for {target_text}. Top {word}s: "
            + ", ".join(str(int(i)) for i in order[:k][:20])
            + (" …" if k > 20 else "")
            + "."
        )

    st.markdown(f"**How many top {word}s does it take to change the decision?**")
    with W.progress_bar(f"Zeroing more and more top {word}s", unit=f"{word}s") as report:
        ok, flip = W.attempt(
            "Searching for the flip",
            backend.flip_search,
            lm,
            image,
            prep,
            layer,
            settings,
            report,
            channel_axis=layout.channel_axis,
        )
    if ok and flip is not None:
        if flip.flipped_at is not None:
            st.success(
                f"Zeroing the top **{flip.flipped_at}** {word}"
                f"{'s' if flip.flipped_at > 1 else ''} of {flip.channels} changes the prediction "
                f"from **{_label(flip.before)}** to **{_label(flip.after)}**.",
                icon=":material/bolt:",
            )
        else:
            st.info(
                f"No number of top {word}s, up to all {flip.searched} of {flip.channels}, "
                f"changes the prediction ({_label(flip.before)}): the decision does not rest "
                f"on this layer's {word}s ranked this way.",
                icon=":material/info:",
            )
        figure = N.flip_figure(flip, lm.labels, word=word)
        W.plotly_static(figure, key="card_flip")
        where = (
            f" A {word} is zeroed in every token, the class token included."
            if layout.is_tokens
            else (
                f" A {word} is zeroed at every position of the map."
                if layout.kind == "channels_last"
                else ""
            )
        )
        st.caption(
            f"{word.capitalize()}s are zeroed in order of their conductance, those that push the "
            f"target's score up most first.{where} The conductance paper (Dhamdhere et al., "
            "2018) reports that on average 3.7 filters of a layer of Inception are enough to "
            "flip its decision: a small number means the decision is concentrated in a few "
            "channels."
        )
        drawn_here.append(
            (
                "flip_search",
                f"The target score as more and more top {word}s are zeroed",
                f"{word.capitalize()}s are zeroed in order of their conductance, largest first."
                + where,
                figure,
            )
        )
        arrays["flip_target_score"] = np.asarray(flip.target_scores, dtype=np.float64)
        arrays["flip_predicted_class"] = np.asarray(flip.predicted, dtype=np.int64)
    _causal_row(arrays, drawn_here, names)


def _causal_row(arrays: dict[str, np.ndarray], drawn_here: list, names: list[str]) -> None:
    """The download row of the causal check (inside its fragment, so a new k is what it keeps)."""
    rows = ["nothing", *names]
    W.view_actions(
        "card_causal",
        lambda: RP.page_view(
            "causal_check",
            f"Causal check of {who}, layer {layer}, for {image.name}",
            ctx=ctx,
            layer=layer,
            target=W.target_label(lm, cond.target),
            settings=(("Zeroed (causal_* rows, in order)", "; ".join(rows)),),
            summary=(("Neuron", who), ("Raw index", str(raw))),
            channel=channel,
            neuron=neuron,
            arrays=arrays,
            dims={
                "causal_target_score": ("variant",),
                "causal_change": ("variant",),
                "causal_predicted_class": ("variant",),
                "top_channels": ("rank",),
                "flip_target_score": ("zeroed",),
                "flip_predicted_class": ("zeroed",),
            },
            figures=drawn_here,
            with_image=False,
        ),
    )


causal_check()


# --- sanity check -------------------------------------------------------------------------------
def _ask() -> None:
    st.session_state[S.CARD_CHECK] = request
    st.session_state[S.CARD_STOPPED] = None


def _stop() -> None:
    st.session_state[S.CARD_STOPPED] = st.session_state.get(S.CARD_CHECK)
    st.session_state[S.CARD_CHECK] = None


def _show_randomisation(result) -> None:
    kind, sentence = result.verdict
    show = {"depends": st.success, "same": st.warning, "partly": st.info, "empty": st.info}
    show.get(kind, st.info)(f"**Verdict.** {sentence}")
    figure = N.randomisation_figure(result)
    W.plotly_static(figure, key="card_randomisation")
    rows = []
    for number, title in enumerate(N.stage_titles(result)):
        rows.append(
            {
                "map": title,
                "Spearman ρ": "1.00" if number == 0 else N.number(result.spearman[number - 1]),
                "SSIM": "1.00" if number == 0 else N.number(result.ssim[number - 1]),
                "predicted class": W.target_label(lm, int(result.predicted[number])),
            }
        )
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    st.caption(
        N.THRESHOLDS_TEXT
        + f" Each map: {result.n_steps} steps, {S.METHOD_NAMES.get(result.method, result.method)}"
        f"; the weights are re-initialised with the model's own initialisation, seed "
        f"{result.seed}, in a copy of the model (the model in use is not changed)."
    )
    stages = ["learned weights", *(f"after re-initialising {t}" for t in result.stages)]
    W.view_actions(
        "card_sanity",
        lambda: RP.page_view(
            "sanity_check",
            f"Sanity check of {who}, layer {layer}, for {image.name}",
            ctx=ctx,
            layer=layer,
            target=W.target_label(lm, result.target),
            settings=(
                ("Integration", f"{result.n_steps} steps, {result.method}"),
                ("Seed", str(result.seed)),
                ("Maps (rows of randomisation_maps, in order)", "; ".join(stages)),
            ),
            summary=(("Neuron", who), ("Verdict", f"{kind}: {sentence}")),
            channel=channel,
            neuron=neuron,
            arrays={
                "randomisation_maps": np.asarray(result.maps, dtype=np.float64),
                "spearman": np.asarray(result.spearman, dtype=np.float64),
                "ssim": np.asarray(result.ssim, dtype=np.float64),
                "predicted_class": np.asarray(result.predicted, dtype=np.int64),
                "modules_reinitialised": np.asarray(result.modules, dtype=np.int64),
            },
            dims={
                "randomisation_maps": ("stage", "y", "x"),
                "spearman": ("stage_after_first",),
                "ssim": ("stage_after_first",),
                "predicted_class": ("stage",),
                "modules_reinitialised": ("stage_after_first",),
            },
            figures=[
                (
                    "randomisation",
                    "The neuron's conductance map as the layers are re-initialised",
                    N.THRESHOLDS_TEXT,
                    figure,
                )
            ],
            with_image=False,
        ),
    )


def _run_or_stop_button(running: bool, key: str = "_w_card_check") -> None:
    """One button that starts the check and, while it runs, stops it.

    One widget, relabelled, rather than two: a clicked Run button would otherwise linger below
    as a stale element while the check runs, and vanish when the pointer presses Stop (its
    focus moves): near the foot of the page that shifts Stop from under the pointer before
    the button is released, and the click is lost. After a run that ended in this script run
    (stopped or failed) the Run button takes another key, as one key may appear once a run.
    """
    if running:
        st.button("Stop the sanity check", key=key, on_click=_stop)
    else:
        st.button(
            "Run the sanity check",
            type="primary",
            key=key,
            on_click=_ask,
            help=f"Computes up to {MAX_STAGES + 1} maps with at most "
            f"{backend.RANDOMISATION_STEPS} steps each; you can stop it.",
        )


def _sanity_check(asked: bool) -> None:
    """The Run button, or (once asked) the computation with a Stop button while it runs."""
    stopped = "The sanity check was stopped before it finished. Run it again when you are ready."
    slot = st.empty()
    if asked:
        with slot:
            _run_or_stop_button(running=True)
        result = None
        with W.progress_bar("Randomising the layers from the output down", unit="maps") as report:
            try:
                result = backend.randomisation(lm, image, prep, layer, raw, settings, report)
            except JobCancelled:
                st.session_state[S.CARD_CHECK] = None
                st.session_state[S.CARD_STOPPED] = request
            except Exception as exc:  # noqa: BLE001 - shown in the page; the choices stay
                st.session_state[S.CARD_CHECK] = None
                W.show_error(exc, "Running the sanity check")
        if result is not None:
            st.rerun()  # drawn from the cache, with the Run button gone
    with slot:
        _run_or_stop_button(running=False, key="_w_card_again" if asked else "_w_card_check")
    if st.session_state.get(S.CARD_STOPPED) == request:
        st.info(stopped, icon=":material/info:")


st.subheader("Sanity check: does the map depend on what the model learned?")
st.markdown(
    "An explanation should change when the model's learned weights are replaced by random "
    "ones; if it does not, it shows the image (edges, bright spots) rather than the model. "
    "This is the *cascading randomisation* test of Adebayo et al. (2018): the layers are "
    "re-initialised from the output down, a few at a time, the neuron's conductance map is "
    "computed again after each step, and compared with the original by its **Spearman rank "
    "correlation** (do the same pixels come first?) and its **SSIM** (does it have the same "
    "local structure?). 1 means identical, 0 means unrelated. Layers above the neuron mostly "
    "rescale its map, so the first steps often keep a correlation of 1; the layers at and below "
    "it decide."
)
request = (backend.model_key(lm), image.digest, layer, raw, settings)
ok, done = W.attempt(
    "Reading the sanity check",
    backend.randomisation_cached,
    lm,
    image,
    prep,
    layer,
    raw,
    settings,
)
if ok and done is not None:
    try:
        _show_randomisation(done)
    except Exception as exc:  # noqa: BLE001 - shown in the page; the choices stay as they were
        W.show_error(exc, "Drawing the sanity check")
elif ok:
    _sanity_check(st.session_state.get(S.CARD_CHECK) == request)

# --- the dataset --------------------------------------------------------------------------------
st.subheader("Across a dataset")
st.markdown(
    f"One image says little about what a channel is for. The Dataset page shows the images of "
    f"a whole dataset run where channel **{channel}** of layer {md(layer)} matters most."
)


def _to_dataset() -> None:
    st.session_state[D.FOCUS] = (layer, channel)


if st.button(
    f"See channel {channel} on the Dataset page",
    key="_w_card_dataset",
    icon=":material/dataset:",
    on_click=_to_dataset,
):
    st.switch_page(W.PAGE_DATASET)

W.next_step(
    W.PAGE_CONVERGENCE,
    "Next: check that the conductance numbers can be trusted",
    previous=(W.PAGE_NEURON, "Neuron gradient"),
)
