"""The guided tour of the built-in model: its steps as data, and the runner that plays them.

Each :class:`Step` names the real page it opens and a ``prepare`` function that sets the app's
state for it (model, image, layer, neuron, settings) and measures what the step's text claims,
through the same worker-backed :mod:`webapp.backend` functions the pages use (so the page that
opens shows exactly the numbers the step quotes, from the cache). Nothing is hard-coded about
the model's insides: the edge-detecting neuron, for one, is found by measuring every channel of
the first layer (:func:`edge_fit`).

While a tour runs (:data:`webapp.state.TOUR_STEP` is set), :func:`step_box` draws a box at the
top of every page with the step's text and Back / Next / End tour buttons.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import streamlit as st

from explainer.demo import sample_image_paths
from explainer.errors import ExplainerError
from webapp import backend
from webapp import state as S
from webapp.text import md

PAGE_MODEL = "pages/1_model_and_images.py"
PAGE_LAYER = "pages/2_layer_picker.py"
PAGE_CONDUCTANCE = "pages/3_layer_conductance.py"
PAGE_NEURON = "pages/4_neuron_gradient.py"
PAGE_CONVERGENCE = "pages/5_convergence.py"
PAGE_TOUR = "pages/11_tour.py"
PAGE_GLOSSARY = "pages/12_glossary.py"

TOUR_IMAGE = "03_triangle.png"
"""The sample the tour explains: a triangle has edges in three directions."""
EDGE_LAYER = "conv1.relu"
"""The first layer's output at full resolution: each neuron sees a 3x3 patch of pixels."""
FEW_STEPS, MANY_STEPS = 2, 64
"""Step counts the delta step compares."""
EVEN_METHOD = "riemann_trapezoid"
"""The evenly spaced integration rule the delta step quotes."""
SWEEP = S.SweepSettings(methods=("riemann_trapezoid", "gausslegendre"), steps=(2, 4, 8, 16, 32, 64))
"""The convergence sweep the delta step shows."""


# --- measuring an edge detector -----------------------------------------------------------------
def edge_fit(gradient: np.ndarray) -> tuple[float, float]:
    """How much a neuron's input gradient looks like an oriented edge, and the edge's direction.

    The gradient (``(C, H, W)``, summed over colour channels) is restricted to the patch where
    it is not zero (the neuron's receptive field) and fitted, by least squares, with a tilted
    plane through zero: ``a * x + b * y`` in patch coordinates centred on the patch. Such a
    ramp is positive on one side of a line and negative on the other, the shape of an edge
    detector. The fit is the share of the gradient's size (its L2 norm) the ramp explains,
    between 0 (no edge at all: a blob, a colour or nothing) and 1 (a perfect ramp).

    Returns
    -------
    (fit, angle)
        ``angle`` in degrees is the direction (image coordinates, y pointing down) in which the
        ramp rises: toward the side where brighter pixels raise the neuron.
    """
    g = np.asarray(gradient, dtype=np.float64)
    if g.ndim == 3:
        g = g.sum(axis=0)
    ys, xs = np.nonzero(np.abs(g) > 0)
    if len(ys) < 4:
        return 0.0, 0.0
    patch = g[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    yy, xx = np.mgrid[0 : patch.shape[0], 0 : patch.shape[1]].astype(np.float64)
    design = np.stack([(xx - xx.mean()).ravel(), (yy - yy.mean()).ravel()], axis=1)
    coef, *_ = np.linalg.lstsq(design, patch.ravel(), rcond=None)
    norm = float(np.linalg.norm(patch))
    if norm == 0.0:
        return 0.0, 0.0
    fit = float(np.linalg.norm(design @ coef)) / norm
    return min(1.0, fit), math.degrees(math.atan2(float(coef[1]), float(coef[0])))


_SIDES = (
    "right",
    "lower right",
    "bottom",
    "lower left",
    "left",
    "upper left",
    "top",
    "upper right",
)


def side_name(angle: float) -> str:
    """The side an angle points to in image coordinates (y down): ``"upper left"``..."""
    return _SIDES[int(round(angle / 45.0)) % 8]


def opposite(side: str) -> str:
    """The side across from ``side``."""
    return _SIDES[(_SIDES.index(side) + 4) % 8]


def edge_strength_rank(pixels: np.ndarray, y: int, x: int) -> float:
    """Share of pixels where the picture's brightness changes less sharply than at ``(y, x)``.

    Near 1 means the point sits on one of the picture's sharpest edges.
    """
    grey = np.asarray(pixels, dtype=np.float64).mean(axis=2)
    gy, gx = np.gradient(grey)
    strength = np.hypot(gx, gy)
    # The strongest change within one pixel: a 3x3 neuron straddles the edge, not sits on it.
    y0, y1 = max(0, y - 1), min(strength.shape[0], y + 2)
    x0, x1 = max(0, x - 1), min(strength.shape[1], x + 2)
    here = float(strength[y0:y1, x0:x1].max())
    return float(np.mean(strength < here))


def line_fit(values: np.ndarray, share: float = 0.01) -> tuple[float, float]:
    """Where a map's strongest places lie: the slant of the line through them, and how straight.

    The top ``share`` of the map's places (at least 3) are fitted with a line through their
    centre (principal direction of their coordinates). Returns ``(angle, straightness)``:
    ``angle`` in degrees in [0, 180), image coordinates with y pointing down; ``straightness``
    is the share of the points' spread along that line, 1 for points exactly on it.
    """
    m = np.asarray(values, dtype=np.float64)
    flat = m.ravel()
    count = max(3, int(round(share * flat.size)))
    order = np.argsort(-flat, kind="stable")[:count]
    ys, xs = np.unravel_index(order, m.shape)
    points = np.stack([xs, ys], axis=1).astype(np.float64)
    points -= points.mean(axis=0)
    spread, axes = np.linalg.eigh(points.T @ points)
    total = float(spread.sum())
    if total <= 0.0:
        return 0.0, 0.0
    direction = axes[:, 1]
    angle = math.degrees(math.atan2(float(direction[1]), float(direction[0]))) % 180.0
    return angle, float(spread[1]) / total


def slant_difference(a: float, b: float) -> float:
    """Smallest angle between two undirected lines, in degrees (0 to 90)."""
    d = abs(a - b) % 180.0
    return min(d, 180.0 - d)


# --- the tour's model, image and steps -----------------------------------------------------------
@dataclass(frozen=True)
class Subject:
    """The model, preprocessing and image every step works on."""

    lm: backend.ServedModel
    prep: Any
    image: S.ImageEntry


def _tour_image() -> S.ImageEntry:
    """The tour's sample, taken from the session's images (added there when missing)."""
    images: list[S.ImageEntry] = list(S.get(S.IMAGES) or [])
    for entry in images:
        if entry.name == TOUR_IMAGE and entry.source == "sample":
            return entry
    path = next((p for p in sample_image_paths() if p.name == TOUR_IMAGE), None)
    if path is None:
        raise ExplainerError(
            f"The sample image {TOUR_IMAGE} is missing from assets/samples; the tour needs it."
        )
    entry = S.ImageEntry.from_bytes(path.name, path.read_bytes(), source="sample")
    st.session_state[S.IMAGES] = [*images, entry]
    return entry


def subject() -> Subject:
    """Switch the session to the built-in model and the tour's image; return them."""
    if S.get(S.MODEL).kind != "builtin":
        st.session_state[S.MODEL] = S.ModelRef()
        st.session_state[S.LABELS] = None
        S.set_layer(None)
    st.session_state[S.PREP] = S.PrepSpec()
    lm = backend.resolve_model(S.ModelRef())
    prep = backend.preprocessing(S.PrepSpec(), lm)
    image = _tour_image()
    st.session_state[S.ACTIVE_IMAGE] = image.digest
    return Subject(lm, prep, image)


def deep_layer(lm: backend.ServedModel) -> str:
    """The layer the conductance and delta steps look at (the app's default layer)."""
    name = backend.default_layer(lm)
    if name is None:
        raise ExplainerError("The built-in model has no layer to explain.")
    return name


def _prepare_image() -> dict[str, Any]:
    sub = subject()
    st.session_state[S.SETTINGS] = S.AttributionSettings()
    label, _index, prob = backend.predictions(sub.lm, sub.image, sub.prep, 1)[0]
    return {
        "image": sub.image.name,
        "label": label,
        "prob": float(prob),
        "classes": sub.lm.num_classes,
    }


def _prepare_layer() -> dict[str, Any]:
    sub = subject()
    S.set_layer(EDGE_LAYER)
    node = backend.tree(sub.lm).nodes[EDGE_LAYER]
    shape = "×".join(str(d) for d in node.output_shapes[0][1:])
    return {"layer": EDGE_LAYER, "shape": shape, "channels": int(node.output_shapes[0][1])}


def find_edge_neuron(sub: Subject, layer: str = EDGE_LAYER) -> dict[str, Any]:
    """The neuron of ``layer`` whose input gradient is most like an oriented edge.

    For every channel, the neuron with the strongest activation on the image is measured with
    :func:`edge_fit`; channels that do not respond to the image are skipped. Deterministic: the
    same model and image always give the same neuron.
    """
    act = np.asarray(backend.activation(sub.lm, sub.image, sub.prep, layer))
    neurons = []
    for c in range(act.shape[0]):
        if float(act[c].max()) <= 0.0:
            continue
        y, x = np.unravel_index(int(np.argmax(act[c])), act.shape[1:])
        neurons.append((c, int(y), int(x)))
    if not neurons:
        raise ExplainerError(f"No neuron of layer {layer} responds to {sub.image.name}.")
    results = backend.neuron_gradients(sub.lm, sub.image, sub.prep, layer, neurons)
    scored = [
        (edge_fit(np.asarray(r.gradient)), n, r) for n, r in zip(neurons, results, strict=True)
    ]
    (fit, angle), neuron, result = max(scored, key=lambda item: (item[0][0], -item[1][0]))
    fits = sorted((s[0][0] for s in scored), reverse=True)
    pixels = backend.display_image(sub.image, sub.prep)
    side = side_name(angle)
    # An edge detector's map lights up along the picture's edges of its slant: the edge runs
    # across the direction in which its gradient rises.
    slant, straightness = line_fit(act[neuron[0]])
    off = slant_difference(slant, angle + 90.0)
    line = (
        f"On the left map, the channel's strongest 1% of places lie on one straight line "
        f"slanted like that edge (within {off:.0f}°): one side of the shape."
        if straightness > 0.9 and off < 25.0
        else ""
    )
    return {
        "layer": layer,
        "neuron": neuron,
        "channel": neuron[0],
        "y": neuron[1],
        "x": neuron[2],
        "fit": fit,
        "runner_up": fits[1] if len(fits) > 1 else 0.0,
        "measured": len(neurons),
        "angle": angle,
        "red_side": side,
        "blue_side": opposite(side),
        "activation": float(result.activation),
        "edge_rank": edge_strength_rank(pixels, neuron[1], neuron[2]),
        "line_straightness": straightness,
        "line_off": off,
        "line": line,
    }


def _prepare_edge() -> dict[str, Any]:
    sub = subject()
    S.set_layer(EDGE_LAYER)
    facts = find_edge_neuron(sub)
    S.select_neuron(facts["neuron"])
    return facts


def _prepare_conductance() -> dict[str, Any]:
    sub = subject()
    layer = deep_layer(sub.lm)
    S.set_layer(layer)
    settings = S.AttributionSettings()
    st.session_state[S.SETTINGS] = settings
    result = backend.conductance(sub.lm, sub.image, sub.prep, layer, settings)
    totals = np.asarray(result.channel_totals, dtype=np.float64)
    top = int(np.argmax(totals))
    S.select_channel(top)
    facts: dict[str, Any] = {
        "layer": layer,
        "channels": int(totals.size),
        "top_channel": top,
        "top_value": float(totals[top]),
        "diff": float(result.output_diff),
    }
    if result.spatial is None:
        raise ExplainerError(f"Layer {layer} has no map of places to show conductance on.")
    spatial = np.asarray(result.spatial, dtype=np.float64)
    size = np.abs(spatial).ravel()
    cells = int(size.size)
    top_cells = max(1, round(0.1 * cells))
    row, col = np.unravel_index(int(np.argmax(spatial)), spatial.shape)
    facts.update(
        cells=cells,
        grid="×".join(str(d) for d in spatial.shape),
        top_cells=top_cells,
        cell_share=float(np.sort(size)[::-1][:top_cells].sum() / size.sum()) if size.sum() else 0.0,
        even_share=top_cells / cells,
        row=int(row),
        col=int(col),
    )
    return facts


def _prepare_delta() -> dict[str, Any]:
    sub = subject()
    layer = deep_layer(sub.lm)
    S.set_layer(layer)
    settings = S.AttributionSettings()
    st.session_state[S.SETTINGS] = settings
    st.session_state[S.SWEEP] = SWEEP
    tolerance = float(S.get(S.TOLERANCE))
    points = backend.sweep(sub.lm, sub.image, sub.prep, layer, settings, SWEEP.methods, SWEEP.steps)
    even = {int(p.n_steps): float(p.relative_delta) for p in points if p.method == EVEN_METHOD}
    # The fewest steps from which every larger count tried stays within the tolerance.
    stable = None
    for n in sorted(even, reverse=True):
        if even[n] > tolerance:
            break
        stable = n
    used = backend.conductance(sub.lm, sub.image, sub.prep, layer, settings)
    trusted = used.relative_delta <= tolerance
    return {
        "layer": layer,
        "few": FEW_STEPS,
        "many": MANY_STEPS,
        "few_delta": even[FEW_STEPS],
        "many_delta": even[MANY_STEPS],
        "stable": stable if stable is not None else "no number of steps tried here",
        "tolerance": tolerance,
        "used_steps": int(settings.n_steps),
        "used_method": S.METHOD_NAMES.get(settings.method, settings.method),
        "used_delta": float(used.relative_delta),
        "verdict": "within the tolerance: that map can be trusted"
        if trusted
        else "over the tolerance: that map needs more steps before it can be trusted",
    }


def _prepare_glossary() -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Step:
    """One step of the tour.

    Attributes
    ----------
    key : str
        Stable name (tests and anchors).
    title : str
        A few words, shown as the step's heading.
    page : str
        The page the step opens.
    text : str
        What the step shows, in plain words; true whatever the measurements say.
    finding : str
        What was measured, as a template filled with the facts ``prepare`` returns
        (``{fit:.0%}``...); left out when measuring failed.
    look : str
        Where on the page to look.
    prepare : callable
        Sets the state and returns the facts (plain values).
    """

    key: str
    title: str
    page: str
    text: str
    finding: str
    look: str
    prepare: Callable[[], dict[str, Any]]


STEPS: tuple[Step, ...] = (
    Step(
        "image",
        "A picture and a guess",
        PAGE_MODEL,
        "The built-in model is a small network that looks at a 64×64 picture and names the "
        "shape in it. The tour follows one sample picture through it.",
        "For **{image}** the model's guess is **{label}**, {prob:.0%} sure, out of {classes} "
        "possible shapes.",
        "Scroll to the cards at the bottom of the page: the picture as the model sees it, "
        "and its five best guesses.",
        _prepare_image,
    ),
    Step(
        "layer",
        "The network's layers",
        PAGE_LAYER,
        "The network works in stages called layers. Early layers look at a few pixels at a "
        "time and respond to simple things such as edges; later layers combine those into "
        "corners and whole shapes.",
        "The tour picks **{layer}**, the output of the first layer: {channels} channels, each a "
        "map of the whole picture ({shape}).",
        "The table lists every layer with the size of what it outputs; the chosen one is shown "
        "at the top and in the sidebar.",
        _prepare_layer,
    ),
    Step(
        "edge",
        "A neuron that detects an edge",
        PAGE_NEURON,
        "A neuron is one number inside the network. Its gradient shows which pixels would raise "
        "it (red) or lower it (blue). An edge detector has red on one side of a line and blue "
        "on the other.",
        "Measured on all {measured} active channels of {layer}: the gradient of channel "
        "**{channel}** is the most edge-like, {fit:.0%} of it is a clean light-to-dark ramp "
        "(the next best channel: {runner_up:.0%}). Red lies toward the {red_side}, blue toward "
        "the {blue_side}. Its strongest neuron, at row {y}, column {x}, sits where the "
        "picture's brightness changes more sharply than at {edge_rank:.0%} of all pixels: on "
        "the shape's outline. {line}",
        "The middle map is the neuron's gradient: a small patch at the neuron's place (it sees "
        "3×3 pixels), red on one side and blue on the other. The left map shows where in the "
        "picture the neuron's channel responds.",
        _prepare_edge,
    ),
    Step(
        "conductance",
        "Where conductance concentrates",
        PAGE_CONDUCTANCE,
        "Conductance shares out the score difference (the score for the picture minus the "
        "score for a black picture) among the parts of a layer. Red parts pushed the score up, "
        "blue parts pushed it down.",
        "In layer **{layer}** just {top_cells} of the {cells} places of its {grid} map carry "
        "**{cell_share:.0%}** of all conductance (an even spread would give {even_share:.0%}): "
        "the score comes from a few places. The place that pushes the score up most is row "
        "{row}, column {col}. Of the {channels} channels, channel **{top_channel}** adds the "
        "most: {top_value:.3g} of the {diff:.3g} score difference.",
        "The bars rank the channels. Under 'Where in the image', the map of all channels "
        "summed shows the few places the score comes from.",
        _prepare_conductance,
    ),
    Step(
        "delta",
        "Why the delta matters",
        PAGE_CONVERGENCE,
        "Conductance is worked out with a limited number of in-between pictures (steps) on the "
        "way from the black picture to the real one. All shares together should add up to the "
        "score difference; the delta says how far they miss. With a big delta the "
        "conductance maps cannot be trusted yet.",
        "With only {few} evenly spaced steps the shares miss the score difference by "
        "**{few_delta:.0%}**; with {many} steps by **{many_delta:.1%}**. From {stable} steps on "
        "the miss stays under the app's {tolerance:.0%} tolerance. The conductance of the "
        "previous step used {used_steps} {used_method} steps: its delta is {used_delta:.1%}, "
        "{verdict}.",
        "The chart shows the delta as the steps grow, one line per recipe; below the dashed "
        "line the result is good enough. The lines are not smooth: a lucky small delta at few "
        "steps is no promise, so check the steps you actually use.",
        _prepare_delta,
    ),
    Step(
        "glossary",
        "Words to keep",
        PAGE_GLOSSARY,
        "That is the whole journey: a picture, a layer, a neuron, where the score comes from, "
        "and whether to trust the numbers. Every word the app uses is explained here in plain "
        "words; the Glossary is linked from the sidebar of every page.",
        "",
        "End the tour to explore on your own, or go back to any step.",
        _prepare_glossary,
    ),
)
"""The tour, in order."""


# --- the runner ---------------------------------------------------------------------------------
def current() -> int | None:
    """Index of the running step, or ``None`` when no tour is running."""
    index = st.session_state.get(S.TOUR_STEP)
    if index is None or not 0 <= int(index) < len(STEPS):
        return None
    return int(index)


def prepare(index: int) -> dict[str, Any]:
    """Make step ``index`` current: set its state and record what it measured.

    A measurement that fails keeps the step (the page still opens) and records the readable
    reason under ``"error"``, which the step box shows.
    """
    step = STEPS[index]
    try:
        facts = dict(step.prepare())
    except ExplainerError as exc:
        facts = {"error": str(exc)}
    st.session_state[S.TOUR_STEP] = index
    st.session_state[S.TOUR_FACTS] = facts
    return facts


def go(index: int) -> None:
    """Prepare step ``index`` and open its page."""
    with st.spinner("Preparing the next step of the tour..."):
        prepare(index)
    st.switch_page(STEPS[index].page)


def end() -> None:
    """Stop the tour (the state it set stays, so the user can keep exploring from there)."""
    st.session_state[S.TOUR_STEP] = None
    st.session_state[S.TOUR_FACTS] = None


def finding_text(step: Step, facts: dict[str, Any] | None) -> str:
    """The step's measured sentence, or ``""`` when it has none or measuring failed."""
    if not step.finding or not facts or "error" in facts:
        return ""
    safe = {k: md(v) if isinstance(v, str) else v for k, v in facts.items()}
    try:
        return step.finding.format(**safe)
    except (KeyError, ValueError, IndexError):
        return ""


def step_box() -> None:
    """The running step's box (title, text, Back / Next / End tour), at the top of a page."""
    index = current()
    if index is None:
        return
    step = STEPS[index]
    facts = st.session_state.get(S.TOUR_FACTS) or {}
    with st.container(border=True, key="tour_box"):
        head, back, forward, stop = st.columns([4.2, 1, 1.1, 1.3], vertical_alignment="center")
        head.markdown(
            f":gray[:material/school: Guided tour · step {index + 1} of {len(STEPS)}]  \n"
            f"**{step.title}**"
        )
        if back.button(
            "Back",
            key="tour_back",
            icon=":material/arrow_back:",
            disabled=index == 0,
            width="stretch",
        ):
            go(index - 1)
        last = index == len(STEPS) - 1
        if forward.button(
            "Finish" if last else "Next",
            key="tour_next",
            type="primary",
            icon=":material/check:" if last else ":material/arrow_forward:",
            width="stretch",
        ):
            if last:
                end()
                st.switch_page(PAGE_TOUR)
            go(index + 1)
        if stop.button("End tour", key="tour_end", icon=":material/close:", width="stretch"):
            end()
            st.rerun()
        found = finding_text(step, facts)
        st.markdown(f"{step.text} {found}".strip())
        if not found and "error" in facts:
            st.warning(
                f"This step could not measure what it shows: {md(facts['error'])} "
                "The page below still shows the real data."
            )
        st.caption(f":material/visibility: {step.look}")
