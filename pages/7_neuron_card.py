"""Neuron card: everything about the selected neuron, with a causal check and a sanity check."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import streamlit as st

import webapp
from explainer.checks import MAX_STAGES, channel_order
from explainer.errors import ExplainerError, JobCancelled
from webapp import backend
from webapp import dataset as D
from webapp import figures as F
from webapp import layouts as L
from webapp import neuron_card as N
from webapp import state as S
from webapp import widgets as W
from webapp.text import md

REMAPPED_KINDS = ("patch_tokens", "class_patch_tokens", "tokens", "channels_last")
"""Layouts whose neurons (feature, row, column) are not the raw index into the output."""

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
# The card works on the engine's raw index into the layer output. Where the layer's layout
# differs from it (transformer tokens, channels last), the selection other pages keep (in the
# layout's terms: feature, patch row, patch column) is translated on the way in and out.
layout = L.layout_of(lm, layer)
remapped = layout is not None and layout.kind in REMAPPED_KINDS


def _to_view(raw: tuple[int, ...]) -> tuple[int, ...]:
    return layout.from_raw(raw) if remapped else raw


def _select(raw: tuple[int, ...]) -> None:
    S.select_neuron(_to_view(tuple(int(i) for i in raw)))


def _on_click(chart_key: str):
    copy = W.on_click_neuron(chart_key)

    def run() -> None:
        copy()
        picked = st.session_state.get(S.NEURON)
        if remapped and picked is not None and N.fits(tuple(picked), shape):
            _select(tuple(picked))

    return run


neuron = S.get(S.NEURON)
if remapped and neuron is not None:
    try:
        neuron = layout.to_raw(neuron)
    except ExplainerError:
        neuron = (-1,)  # not in this layer: the message below says so
if neuron is not None and not N.fits(tuple(neuron), shape):
    st.warning(
        f"The selected neuron {tuple(S.get(S.NEURON))} does not exist in layer {md(layer)} (output "
        f"{'×'.join(map(str, shape))}); showing the strongest neuron instead."
    )
    neuron = None
if neuron is None:
    _select(N.default_neuron(act, None if remapped else st.session_state.get(S.CHANNEL)))
    st.caption(
        "No neuron selected yet: showing the most active one. Click a map cell here or on "
        "the Layer conductance page to choose another."
    )
neuron = tuple(int(i) for i in S.get(S.NEURON))
if remapped:
    neuron = layout.to_raw(neuron)
    st.caption(
        f"{md(layout.describe())} This card shows the output in the engine's own order "
        f"({'×'.join(map(str, shape))}); the selected neuron is "
        f"{md(layout.neuron_text(_to_view(neuron)))}, index {neuron} here."
    )
channel = neuron[0]
spatial = len(shape) == 3


def _sync_inputs() -> None:
    values = tuple(int(st.session_state.get(f"_w_card_n{i}", 0)) for i in range(len(shape)))
    if N.fits(values, shape):
        _select(values)


if len(shape) <= 3:
    names = (
        ["channel", "y", "x"]
        if spatial
        else (["unit"] if len(shape) == 1 else ["channel", "position"])
    )
    cols = st.columns([1] * len(names) + [3])
    for i, name in enumerate(names):
        W.bind(f"_w_card_n{i}", int(neuron[i]))
        cols[i].number_input(
            name,
            min_value=0,
            max_value=shape[i] - 1,
            step=1,
            key=f"_w_card_n{i}",
            on_change=_sync_inputs,
        )
    cols[-1].markdown(
        f"Neuron **{neuron}** of layer {md(layer)} · output {'×'.join(map(str, shape))}"
    )
else:
    st.markdown(f"Neuron **{neuron}** of layer {md(layer)} · output {'×'.join(map(str, shape))}")

with st.expander("Target, baseline and integration settings (shared with Layer conductance)"):
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
        neuron,
        settings,
        report,
    )
ok_g, grads = W.attempt(
    "Computing the neuron's gradient", backend.neuron_gradients, lm, image, prep, layer, [neuron]
)
ok_p, pixels = W.attempt("Reading the image", backend.display_image, image, prep)
share = N.shares(cond.attributions, cond.channel_totals, neuron)

m1, m2, m3, m4 = st.columns(4)
m1.metric(
    "Activation",
    f"{float(act[neuron]):.4g}",
    help="The neuron's value for this image: how strongly it fires.",
)
m2.metric(
    "Conductance",
    f"{share.neuron:.4g}",
    help="The neuron's conductance: how much of the target's score difference, "
    "F(image) − F(baseline), flows through this neuron. Positive: it pushes the target's score up.",
)
m3.metric(
    "Channel share",
    "–" if math.isnan(share.channel_share) else f"{share.channel_share:.1%}",
    help="The conductance of the neuron's whole channel divided by the layer's total, which "
    "is the score difference F(image) − F(baseline). Channels push in both directions, so a "
    "share can be negative or above 100%.",
)
m4.metric(
    "Channel rank",
    f"{share.rank} of {share.channels}",
    help="Where the channel stands when the layer's channels are ordered by conductance, "
    "largest first.",
)
st.caption(
    f"Explaining the score of **{target_text}**. The channel carries {share.channel:.4g} of "
    f"the layer's {share.layer:.4g} ("
    + ("–" if math.isnan(share.abs_share) else f"{share.abs_share:.1%}")
    + " of all the conductance in the layer, counting pushes up and down alike)."
)

opacity = st.columns([1, 3])[0].slider("Map opacity", 0.2, 1.0, 0.9, 0.05, key="_w_card_opacity")
a, b, c = st.columns(3, gap="medium")
with a:
    if spatial:
        st.markdown(f"**Activation of channel {channel}**")
        st.caption(
            "The channel over the image; the outlined cell is the neuron. Click a cell "
            "to select that neuron."
        )
        W.plotly_click(
            F.spatial_map(
                act[channel],
                channel=channel,
                selected_cell=(neuron[1], neuron[2]),
                colorbar_title="activation",
                height=340,
            ),
            "card_activation",
            _on_click("card_activation"),
        )
    elif len(shape) == 1:
        st.markdown("**Activation of every unit**")
        st.caption("Click a bar to select that unit.")
        W.plotly_click(
            F.feature_strip(act, selected=neuron[0], yaxis_title="activation", height=340),
            "card_strip",
            _on_click("card_strip"),
        )
    else:
        st.markdown(f"Layer output {shape}: choose the neuron with the numbers above.")
with b:
    st.markdown("**Gradient** (summed over colour channels)")
    st.caption(
        "Which pixels would raise (red) or lower (blue) the neuron if nudged: what it looks at."
    )
    if ok_g and grads and ok_p:
        grad = np.asarray(grads[0].gradient, dtype=np.float64)
        W.plotly_static(
            F.gradient_overlay(pixels, grad.sum(axis=0), signed=True, opacity=opacity, height=340),
            key="card_gradient",
        )
with c:
    st.markdown("**Neuron conductance** (summed over colour channels)")
    st.caption(
        "The input pixels whose effect on the target flows through this neuron: red "
        "pushes the target's score up through it, blue down."
    )
    if ok_nc and nc is not None and ok_p:
        W.plotly_static(
            N.conductance_overlay(pixels, np.asarray(nc.attributions).sum(axis=0), opacity),
            key="card_nc",
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
    channels = shape[0]
    order = channel_order(cond.channel_totals)
    top_default = min(3, channels)
    k = st.columns([1, 1])[0].slider(
        "Zero the top k channels (largest conductance first)",
        1,
        max(2, channels),
        top_default,
        key="_w_card_k",
        disabled=channels < 2,
    )
    k = min(int(k), channels)
    variants: list[list[tuple[int, ...]]] = [[neuron]]
    names = ["this neuron"]
    if len(shape) > 1:
        variants.append([(channel,)])
        names.append(f"its whole channel {channel}")
    variants.append([(int(i),) for i in order[:k]])
    names.append(f"the top {k} channel{'s' if k > 1 else ''}")
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
        st.caption(
            f"The target score is the model's score for {target_text}. Top channels: "
            + ", ".join(str(int(i)) for i in order[:k][:20])
            + (" …" if k > 20 else "")
            + "."
        )

    st.markdown("**How many top channels does it take to change the decision?**")
    with W.progress_bar("Zeroing more and more top channels", unit="channels") as report:
        ok, flip = W.attempt(
            "Searching for the flip", backend.flip_search, lm, image, prep, layer, settings, report
        )
    if ok and flip is not None:
        if flip.flipped_at is not None:
            st.success(
                f"Zeroing the top **{flip.flipped_at}** channel"
                f"{'s' if flip.flipped_at > 1 else ''} of {flip.channels} changes the prediction "
                f"from **{_label(flip.before)}** to **{_label(flip.after)}**.",
                icon=":material/bolt:",
            )
        else:
            st.info(
                f"No number of top channels, up to all {flip.searched} of {flip.channels}, "
                f"changes the prediction ({_label(flip.before)}): the decision does not rest "
                "on this layer's channels ranked this way.",
                icon=":material/info:",
            )
        W.plotly_static(N.flip_figure(flip, lm.labels), key="card_flip")
        st.caption(
            "Channels are zeroed in order of their conductance, those that push the target's "
            "score up most first. The conductance paper (Dhamdhere et al., 2018) reports that "
            "on average 3.7 filters of a layer of Inception are enough to flip its decision: a "
            "small number means the decision is concentrated in a few channels."
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
    W.plotly_static(N.randomisation_figure(result), key="card_randomisation")
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


def _run_button() -> None:
    st.button(
        "Run the sanity check",
        type="primary",
        key="_w_card_run",
        on_click=_ask,
        help=f"Computes up to {MAX_STAGES + 1} maps with at most "
        f"{backend.RANDOMISATION_STEPS} steps each; you can stop it.",
    )


def _sanity_check(asked: bool) -> None:
    """The Run button, or (once asked) the computation with a Stop button while it runs."""
    stopped = "The sanity check was stopped before it finished. Run it again when you are ready."
    if not asked:
        _run_button()
        if st.session_state.get(S.CARD_STOPPED) == request:
            st.info(stopped, icon=":material/info:")
        return
    slot = st.empty()
    slot.button("Stop the sanity check", key="_w_card_stop", on_click=_stop)
    result = None
    with W.progress_bar("Randomising the layers from the output down", unit="maps") as report:
        try:
            result = backend.randomisation(lm, image, prep, layer, neuron, settings, report)
        except JobCancelled:
            st.session_state[S.CARD_CHECK] = None
            st.session_state[S.CARD_STOPPED] = request
        except Exception as exc:  # noqa: BLE001 - shown in the page; the choices stay
            st.session_state[S.CARD_CHECK] = None
            W.show_error(exc, "Running the sanity check")
        finally:
            slot.empty()
    if result is not None:
        st.rerun()  # drawn from the cache, with the Run button gone
    _run_button()
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
request = (backend.model_key(lm), image.digest, layer, neuron, settings)
ok, done = W.attempt(
    "Reading the sanity check",
    backend.randomisation_cached,
    lm,
    image,
    prep,
    layer,
    neuron,
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
