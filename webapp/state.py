"""Session-state keys and the small value types the pages share.

Every key the app keeps in ``st.session_state`` is named here, so pages never invent their own.
The values are plain, immutable dataclasses (or ints, strings and tuples): cheap to keep per browser
session and safe to compare. Heavy objects (models, tensors, results) never live in session state;
they are looked up in the process-wide caches of :mod:`webapp.backend` by content digest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import streamlit as st

# --- keys ---------------------------------------------------------------------------------------
MODEL = "model_ref"
"""The :class:`ModelRef` of the model in use."""
LABELS = "labels_override"
"""A :class:`LabelsOverride` from the user's labels file, or ``None``."""
IMAGES = "images"
"""``list[ImageEntry]``: the images the user is working with, in display order."""
ACTIVE_IMAGE = "active_image"
"""Digest of the image the explanation pages show."""
PREP = "prep"
"""The :class:`PrepSpec` (preprocessing preset)."""
LAYER = "layer"
"""Name of the chosen layer (``str``) or ``None`` before the first pick."""
SETTINGS = "attr_settings"
"""The :class:`AttributionSettings` for conductance and convergence."""
CHANNEL = "channel"
"""Selected channel (``int``) of the chosen layer, or ``None``."""
NEURON = "neuron"
"""Selected neuron of the chosen layer, e.g. ``(channel, y, x)`` or ``(feature,)``, or ``None``."""
TOLERANCE = "tolerance"
"""Relative tolerance (``float``) for the convergence badge."""
SWEEP = "sweep_settings"
"""The :class:`SweepSettings` of the convergence page."""
GRID = "grid_view"
"""The :class:`GridView` of the conductance page (ranking, paging, filter)."""
FLASH = "flash"
"""``list[tuple[str, str]]`` of (kind, text) messages to show once at the top of the next page."""
UPLOAD_ERRORS = "upload_errors"
"""``list[str]``: readable messages about image files that could not be read."""
LAYER_ERROR = "layer_error"
"""A readable message about the last layer that could not be chosen, or ``None``."""
CHECK_ALL = "check_all_request"
"""The request (a text naming model, layer and settings) for which the convergence page checks
every image, or ``None``: other images than the active one are computed only on request."""
CARD_CHECK = "card_check"
"""What the sanity check of the Neuron card was asked for (model, image, layer, neuron and
settings), or ``None``: the check is heavy, so it runs only on request."""
CARD_STOPPED = "card_stopped"
"""What the Neuron card's sanity check was asked for when the user stopped it before it
finished (as :data:`CARD_CHECK`), or ``None``."""
LAYOUTS = "layouts"
"""``dict[str, str]``: layer name -> the layout kind the user chose for that layer's output (one
of :data:`explainer.layout.KINDS`); layers not in it use the detected layout."""
REPORT_VIEWS = "report_views"
"""``list[webapp.report.ReportView]``: the views collected for the review report, in order."""
REPORT_TITLE = "report_title"
"""Title of the review report (``str``)."""
REPORT_NOTES = "report_notes"
"""The reviewer's notes printed at the top of the report (``str``)."""
PRESENTATION = "presentation"
"""``bool``: presentation mode (large type, full-width figures, controls folded away)."""
TOUR_STEP = "tour_step"
"""Index (``int``) of the guided tour's current step, or ``None`` when no tour is running."""
TOUR_FACTS = "tour_facts"
"""``dict[str, Any]`` of what the tour measured for its current step (plain numbers, text),
or ``None``; always replaced whole, never changed in place."""
OVERVIEW_ASKED = "overview_asked"
"""Digest of the layer overview the user asked to compute (large models compute on request)."""
OVERVIEW_OPEN = "overview_open"
"""Name of the layer clicked on the overview, to open on the conductance page, or ``None``."""
COMPARE = "compare_spec"
"""The :class:`webapp.compare.CompareSpec` of the Compare page (mode and what each pane shows)."""
COMPARE_SELECTION = "compare_selection"
"""``(layer, neuron)`` selected on the Compare page, shared by every pane, or ``None``."""
GRADIENT_RANGE = "gradient_range"
"""How neuron-gradient maps are coloured: ``"robust"`` (colours saturate at a high percentile
of |gradient|) or ``"full"`` (up to the largest value)."""
GRADIENT_ZOOM = "gradient_zoom"
"""``bool``: neuron-gradient maps are cropped to where the gradient is non-negligible."""
ARCH_OFFER = "arch_offer"
"""``(file digest, architectures)``: the architectures offered for a weights-only file that did
not load as it was (several fit it, or not the one picked), or ``None``."""
ARCH_PICK = "arch_pick"
"""The architecture the user picked from :data:`ARCH_OFFER`, to load with on this run, or
``None``."""
REFINEMENT = "refinement"
"""The :class:`webapp.refine.Refinement` of the map the conductance page refines in the
background (a job handle and what it computes), or ``None``."""

PREFETCH = "gradient_prefetch"
"""The :class:`webapp.backend.GradientPrefetch` computing the gradients of the cells the user
may click next on the conductance page, or ``None``."""

NEURON_CLICK = "neuron_click"
"""``(chart key, neuron)`` when the selected neuron was picked by a click on that chart (whose
browser outlines the clicked cell itself), else ``None``."""

BROWSER_MARKS = "browser_marks"
"""Per chart key, what a chart that outlines its selected cell in the browser was last sent and
shows: ``{"content": ..., "cell": ..., "revision": int, "shown": ...}``."""

METHODS: tuple[str, ...] = (
    "gausslegendre",
    "riemann_trapezoid",
    "riemann_middle",
    "riemann_left",
    "riemann_right",
)
"""Integration rules the engine accepts (captum's names)."""

METHOD_NAMES: dict[str, str] = {
    "auto": "automatic steps",
    "gausslegendre": "Gauss-Legendre",
    "riemann_trapezoid": "Riemann, trapezoid",
    "riemann_middle": "Riemann, midpoint",
    "riemann_left": "Riemann, left",
    "riemann_right": "Riemann, right",
}

BASELINE_NAMES: dict[str, str] = {
    "black": "Black image",
    "zeros": "Zeros (the mean colour)",
    "blur": "Blurred input",
    "noise": "Uniform noise",
    "constant": "Constant grey level",
}

PREP_PRESETS: dict[str, str] = {
    "model": "Model default",
    "imagenet": "ImageNet",
    "none": "None (pixels in [0, 1])",
    "custom": "Custom mean / std",
}

FIT_NAMES: dict[str, str] = {
    "crop": "Crop the centre",
    "pad": "Pad to a square",
    "resize": "Stretch",
}
"""How a non-square picture is fitted to the model's input (:data:`explainer.images.FIT_MODES`)."""


# --- value types --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelRef:
    """Where the model in use comes from; enough to load it again after a cache eviction.

    Attributes
    ----------
    kind : str
        ``"builtin"`` or ``"upload"``.
    digest : str
        sha256 of the uploaded bytes (empty for the built-in model).
    filename : str
        Name of the uploaded file.
    arch : str or None
        Architecture picked for weights-only files, ``None`` to let the loader decide.
    num_classes : int or None
        Number of classes asked for, ``None`` to let the loader decide.
    data : bytes
        The uploaded bytes (kept so the model can be rebuilt if the shared cache dropped it).
    """

    kind: str = "builtin"
    digest: str = ""
    filename: str = ""
    arch: str | None = None
    num_classes: int | None = None
    data: bytes = field(default=b"", repr=False, compare=False)


@dataclass(frozen=True)
class LabelsOverride:
    """Class names read from the user's labels file."""

    filename: str
    labels: tuple[str, ...]
    digest: str = ""
    """sha256 of the labels file (names it in links), or empty."""


@dataclass(frozen=True)
class ImageEntry:
    """One image the user works with.

    Attributes
    ----------
    name : str
        File name shown in the app.
    digest : str
        sha256 of ``data``; the key of every cached result about this image.
    data : bytes
        The encoded file (PNG, JPEG, ...).
    source : str
        ``"sample"`` or ``"upload"``.
    """

    name: str
    digest: str
    data: bytes = field(repr=False)
    source: str = "upload"

    @classmethod
    def from_bytes(cls, name: str, data: bytes, source: str = "upload") -> ImageEntry:
        return cls(name=name, digest=hashlib.sha256(data).hexdigest(), data=data, source=source)


@dataclass(frozen=True)
class PrepSpec:
    """The preprocessing preset, resolved against a model by :func:`webapp.backend.preprocessing`.

    ``mean`` and ``std`` are only used by the ``"custom"`` preset. ``fit`` is how a picture whose
    shape is not the model's input is fitted to it (:data:`FIT_NAMES`).
    """

    preset: str = "model"
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.25, 0.25, 0.25)
    fit: str = "crop"


@dataclass(frozen=True)
class AttributionSettings:
    """What conductance is computed for.

    Attributes
    ----------
    target : int or None
        Output class; ``None`` means "the class the model predicts for the image" (for a model
        that scores every output position: the class covering most positions).
    position : tuple of (int or None), or None
        For a model that scores every output position: the position whose score is explained,
        one index per position dimension (e.g. ``(row, column)``). ``None``, or a ``None``
        entry, means automatic: where the class scores highest (the other indices fixed).
        Ignored for classifiers.
    baseline : str
        One of :data:`explainer.baselines.BASELINE_KINDS`.
    constant : float
        Grey level in [0, 1] for the ``"constant"`` baseline.
    blur_sigma : float
        Gaussian sigma in pixels for the ``"blur"`` baseline.
    noise_seed : int
        Seed of the ``"noise"`` baseline.
    method : str
        Integration rule, one of :data:`METHODS`.
    n_steps : int
        Number of integration steps.
    internal_batch_size : int or None
        Path points per forward pass; ``None`` to let :func:`webapp.backend.chunk_size` choose.
        Does not change the result.
    tolerance : float or None
        ``None``: exactly ``n_steps`` steps of ``method``. A relative delta such as ``0.01``:
        the conductance map's steps are chosen by the engine (``n_steps="auto"``) until its
        delta is within this share of F(image) − F(baseline), with at most ``n_steps`` steps.
    """

    target: int | None = None
    position: tuple[int | None, ...] | None = None
    baseline: str = "black"
    constant: float = 0.5
    blur_sigma: float = 5.0
    noise_seed: int = 0
    method: str = "gausslegendre"
    n_steps: int = 50
    internal_batch_size: int | None = None
    tolerance: float | None = None

    @property
    def auto_steps(self) -> bool:
        """Whether the engine chooses the steps (to :attr:`tolerance`)."""
        return self.tolerance is not None

    def position_for(self, count: int) -> tuple[int | None, ...] | None:
        """The chosen position when it has ``count`` indices (one per position dimension of
        the model's output); ``None`` (all automatic) otherwise."""
        if self.position is not None and len(self.position) == count:
            return self.position
        return None


@dataclass(frozen=True)
class SweepSettings:
    """The step counts and methods of the convergence sweep."""

    methods: tuple[str, ...] = ("gausslegendre", "riemann_trapezoid")
    steps: tuple[int, ...] = (4, 8, 16, 32, 64, 128)
    relative: bool = True
    """Plot |delta| relative to the score difference (``False``: absolute |delta|)."""


SWEEP_STEPS: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 128, 256, 512)
"""The step counts the convergence sweep offers."""


@dataclass(frozen=True)
class GridView:
    """How the conductance page orders, filters and pages the channels."""

    rank: str = "abs"
    top_k: int = 20
    page: int = 1
    page_size: int = 36
    filter: str = ""


DEFAULTS: dict[str, Any] = {
    MODEL: ModelRef(),
    LABELS: None,
    PREP: PrepSpec(),
    LAYER: None,
    SETTINGS: AttributionSettings(),
    CHANNEL: None,
    NEURON: None,
    TOLERANCE: 0.05,
    SWEEP: SweepSettings(),
    GRID: GridView(),
    FLASH: [],
    UPLOAD_ERRORS: [],
    LAYER_ERROR: None,
    LAYOUTS: {},
    REPORT_VIEWS: [],
    REPORT_TITLE: "Layer explainer review report",
    REPORT_NOTES: "",
    PRESENTATION: False,
    TOUR_STEP: None,
    TOUR_FACTS: None,
    GRADIENT_RANGE: "robust",
    GRADIENT_ZOOM: False,
}


def init_defaults() -> None:
    """Put a default value under every key that is not set yet (idempotent)."""
    for key, value in DEFAULTS.items():
        if key not in st.session_state:
            # Lists and dicts are copied so sessions never share a mutable default.
            if isinstance(value, (list, dict)):
                value = type(value)(value)
            st.session_state[key] = value


def get(key: str) -> Any:
    """Read one key, falling back to its default."""
    return st.session_state.get(key, DEFAULTS.get(key))


def set_layer(name: str | None) -> None:
    """Choose a layer; the channel and neuron selections belong to the old layer and are cleared."""
    if st.session_state.get(LAYER) != name:
        st.session_state[LAYER] = name
        st.session_state[CHANNEL] = None
        st.session_state[NEURON] = None
        grid = get(GRID)
        st.session_state[GRID] = GridView(
            rank=grid.rank, top_k=grid.top_k, page=1, page_size=grid.page_size, filter=""
        )


def select_channel(channel: int) -> None:
    """Select a channel; a neuron in another channel moves to the same position in this one."""
    st.session_state[CHANNEL] = int(channel)
    neuron = st.session_state.get(NEURON)
    if neuron is not None and len(neuron) == 3 and neuron[0] != channel:
        st.session_state[NEURON] = (int(channel), int(neuron[1]), int(neuron[2]))
    _view_changed()


def select_neuron(neuron: tuple[int, ...]) -> None:
    """Select a neuron; its channel (the first index) becomes the selected channel."""
    neuron = tuple(int(i) for i in neuron)
    st.session_state[NEURON] = neuron
    st.session_state[CHANNEL] = neuron[0]
    _view_changed()


def _view_changed() -> None:
    """Write the new selection into the page's address at once: a click inside a fragment
    reruns only the fragment, not :func:`webapp.setup`, which writes it otherwise."""
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    if get_script_run_ctx(suppress_warning=True) is None:
        return
    from webapp import urlstate  # urlstate builds on this module's keys

    urlstate.write_view()


def flash(kind: str, text: str) -> None:
    """Queue a message for the next page draw (``kind``: ``"success"``, ``"info"``, ...)."""
    messages = list(st.session_state.get(FLASH, []))
    messages.append((kind, text))
    st.session_state[FLASH] = messages
