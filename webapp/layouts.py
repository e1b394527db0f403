"""The layout of the chosen layer's output in the pages: detection, the user's choice, the widget.

The layout (see :mod:`explainer.layout`) is detected from the layer's output shape and the size
of the model's input image; where the detection is unsure the user picks one, and the pick is
kept per layer in :data:`webapp.state.LAYOUTS`. Selections (:data:`webapp.state.NEURON`,
:data:`webapp.state.CHANNEL`) are in the layout's view terms: ``(channel, row, column)`` on a
grid, ``(feature,)`` for a feature of the class token. :meth:`Layout.to_raw` turns them into the
engine's index right before a computation.
"""

from __future__ import annotations

from collections.abc import Sequence

import streamlit as st

from explainer.layout import Detection, Layout, choose_layout, detect_layout
from webapp import backend
from webapp import state as S
from webapp import widgets as W
from webapp.text import md


def image_size(lm: backend.ServedModel) -> tuple[int, int] | None:
    """Height and width of the model's input (the size the module tree was probed with)."""
    shapes = backend.tree(lm).input_shapes
    if shapes and len(shapes[0]) == 4:
        return int(shapes[0][2]), int(shapes[0][3])
    return None


def detection(lm: backend.ServedModel, shape: Sequence[int]) -> Detection:
    """What the layout of an output of ``shape`` (no batch dimension) looks like."""
    return detect_layout(tuple(int(s) for s in shape), image_size(lm))


def layer_layout(lm: backend.ServedModel, layer: str, shape: Sequence[int]) -> Layout:
    """The layout in use for ``layer``: the user's choice when it fits, else the detected one."""
    choice = dict(S.get(S.LAYOUTS) or {}).get(layer)
    return choose_layout(detection(lm, shape), choice)


def _on_choice(layer: str, key: str) -> None:
    kind = st.session_state.get(key)
    chosen = dict(S.get(S.LAYOUTS) or {})  # a new dict: the default is never changed in place
    if kind is None:
        chosen.pop(layer, None)
    else:
        chosen[layer] = str(kind)
    st.session_state[S.LAYOUTS] = chosen
    # Selections are in the old layout's terms: they name other units now.
    if S.get(S.LAYER) == layer:
        st.session_state[S.NEURON] = None
        st.session_state[S.CHANNEL] = None


def layout_choice(lm: backend.ServedModel, layer: str, shape: Sequence[int], key: str) -> Layout:
    """Say how the layer's output is read and, when more than one layout fits, let the user
    choose; returns the layout in use."""
    found = detection(lm, shape)
    layout = layer_layout(lm, layer, shape)
    text = f"**Layout:** {md(layout.describe())}"
    if len(found.options) == 1:
        st.caption(text)
        return layout
    widget = f"_w_layout_{key}"
    W.bind(widget, layout.kind)
    st.selectbox(
        "Layout of this layer's output",
        [o.kind for o in found.options],
        key=widget,
        format_func=lambda kind: (
            found.option(kind).name + ("  (detected)" if kind == found.layout.kind else "")
        ),
        on_change=_on_choice,
        args=(layer, widget),
        help="How the numbers of the output are arranged: which dimension holds the channels "
        "(features) and which ones are positions in the image. Your choice is kept for this "
        "layer.",
    )
    if not found.sure and layout.kind == found.layout.kind:
        st.warning(
            f"The layout of this output is a guess: {md(found.reason)}. Check it, and choose "
            "another if the maps look scrambled.",
            icon=":material/help:",
        )
    else:
        st.caption(text)
    return layout


def layout_of(lm: backend.ServedModel, layer: str) -> Layout | None:
    """The layout in use for ``layer``, from the module tree's output shape; None when the
    layer has no single tensor output."""
    node = backend.tree(lm).nodes.get(layer)
    if node is None or len(node.output_shapes) != 1:
        return None
    return layer_layout(lm, layer, node.output_shapes[0][1:])


def raw_neuron(lm: backend.ServedModel, layer: str, neuron: Sequence[int]) -> tuple[int, ...]:
    """The engine's index of a selected neuron (:data:`webapp.state.NEURON`, in view terms):
    what :func:`webapp.backend.neuron_gradients` takes. Raises
    :class:`~explainer.errors.AttributionError` with the valid ranges when it does not exist."""
    layout = layout_of(lm, layer)
    return tuple(int(i) for i in neuron) if layout is None else layout.to_raw(neuron)
