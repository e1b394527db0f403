"""Widgets and page scaffolding shared by every page.

Each page starts with :func:`setup`, which is idempotent across reruns and works whether the page
runs under ``app.py``'s navigation or on its own (as ``AppTest.switch_page`` runs it): it fills in
default session state, loads the model and the sample images, and draws the shared sidebar.
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import streamlit as st
from streamlit import config as st_config

from explainer.analysis import Target, position_names
from explainer.baselines import BASELINE_KINDS
from explainer.demo import sample_image_paths
from explainer.errors import ExplainerError
from explainer.images import Preprocessing
from explainer.limits import max_steps, max_upload_bytes
from webapp import backend, presentation, refine, style, tour, urlstate
from webapp import glossary as G
from webapp import state as S
from webapp.text import md

LOG = logging.getLogger(__name__)

# The libraries just imported (torch, plotly, streamlit) hold a few hundred thousand objects
# for the life of the server. Moved out of the collector's sight, they no longer make each
# full collection, which stops every thread of the server for a moment, cost a fifth of a
# second: a click answered while one runs would wait for it. (Streamlit's own collection
# after every run is switched off in .streamlit/config.toml for the same reason.)
gc.freeze()

T = TypeVar("T")

ICON = Path(__file__).resolve().parent.parent / "assets" / "icon.png"
"""The browser tab's icon (a small heatmap)."""

PAGE_MODEL = "pages/1_model_and_images.py"
PAGE_LAYER = "pages/2_layer_picker.py"
PAGE_CONDUCTANCE = "pages/3_layer_conductance.py"
PAGE_NEURON = "pages/4_neuron_gradient.py"
PAGE_CONVERGENCE = "pages/5_convergence.py"
PAGE_DATASET = "pages/6_dataset.py"
PAGE_NEURON_CARD = "pages/7_neuron_card.py"
PAGE_OVERVIEW = "pages/8_layer_overview.py"
PAGE_COMPARE = "pages/9_compare.py"
PAGE_REPORT = "pages/10_report.py"
PAGE_TOUR = "pages/11_tour.py"
PAGE_GLOSSARY = "pages/12_glossary.py"

PAGES: list[tuple[str, str, str]] = [
    (PAGE_MODEL, "Model & images", ":material/image:"),
    (PAGE_LAYER, "Layer picker", ":material/account_tree:"),
    (PAGE_OVERVIEW, "Layer overview", ":material/stacked_bar_chart:"),
    (PAGE_CONDUCTANCE, "Layer conductance", ":material/grid_on:"),
    (PAGE_NEURON, "Neuron gradient", ":material/my_location:"),
    (PAGE_NEURON_CARD, "Neuron card", ":material/badge:"),
    (PAGE_CONVERGENCE, "Convergence", ":material/trending_down:"),
    (PAGE_COMPARE, "Compare", ":material/compare:"),
    (PAGE_DATASET, "Dataset", ":material/dataset:"),
    (PAGE_REPORT, "Report", ":material/description:"),
    (PAGE_TOUR, "Guided tour", ":material/school:"),
    (PAGE_GLOSSARY, "Glossary", ":material/menu_book:"),
]
"""(path, title, icon) of every page, in the order of the journey."""


@dataclass
class Context:
    """What every page needs, resolved once per run by :func:`setup`.

    ``lm`` is ``None`` only when no model could be loaded (the page shows why).
    """

    lm: backend.ServedModel | None
    prep: Preprocessing | None
    images: list[S.ImageEntry]
    image: S.ImageEntry | None
    layer: str | None

    @property
    def ready(self) -> bool:
        """A model, preprocessing and an image are all available."""
        return self.lm is not None and self.prep is not None and self.image is not None


# --- errors -------------------------------------------------------------------------------------
def show_error(exc: BaseException, action: str) -> None:
    """Show a failure as a readable message in the page (never a traceback).

    Project errors carry a sentence the user can act on; anything else is logged on the server
    and summarised in one line. ``action`` and the error's text may quote file names, labels and
    module names, so both are shown literally (:func:`webapp.text.md`), never as markdown.
    """
    if isinstance(exc, ExplainerError):
        st.error(f"**{md(action)} failed.** {md(exc)}", icon=":material/error:")
        return
    LOG.exception("Unexpected error while %s", action.lower())
    text = " ".join(str(exc).split())
    if len(text) > 240:
        text = text[:237] + "..."
    st.error(
        f"**{md(action)} failed** because of an unexpected {type(exc).__name__}"
        f"{': ' + md(text) if text else ''}. Check that the model accepts images of the chosen "
        "size and preprocessing, or try other settings.",
        icon=":material/error:",
    )


def _attempt(
    action: str, seen: set[str] | None, fn: Callable[..., T], args: tuple, kwargs: dict
) -> tuple[bool, T | None]:
    try:
        # Shown only when the call takes longer than half a second, with the time it has taken:
        # the app's own sign that work is running (Streamlit's is hidden by the minimal toolbar).
        with st.spinner(f"{action}…", show_time=True):
            return True, fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - every failure is shown to the user, none is hidden
        if seen is not None and isinstance(exc, ExplainerError):
            if str(exc) in seen:
                st.caption(f":material/error: {md(action)} failed: the same problem as above.")
                return False, None
            seen.add(str(exc))
        show_error(exc, action)
        return False, None


def attempt(action: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[bool, T | None]:
    """Call ``fn``; on failure show :func:`show_error` and return ``(False, None)``."""
    return _attempt(action, None, fn, args, kwargs)


def attempt_each(
    action: str, seen: set[str], fn: Callable[..., T], *args: Any, **kwargs: Any
) -> tuple[bool, T | None]:
    """:func:`attempt` for one item of a list: a failure whose message was already shown for an
    earlier item (in ``seen``) gets a one-line reminder instead of the whole message again."""
    return _attempt(action, seen, fn, args, kwargs)


def output_positions(lm: backend.ServedModel) -> tuple[int, ...]:
    """The output grid of a model that scores every output position (e.g. ``(H, W)``); ``()``
    for a classifier, or when the scores cannot be read (the failure is shown)."""
    ok, shape = attempt("Reading the model's scores", backend.score_shape, lm)
    return tuple(shape[1:]) if ok and shape else ()


@contextmanager
def progress_bar(label: str, unit: str = "steps") -> Iterator[Callable[[int, int], None]]:
    """A progress callback for the engine, drawn as ``st.progress`` (removed when done).

    Nothing is drawn when the result comes from the cache (the callback is never called).
    """
    slot = st.empty()

    def report(done: int, total: int) -> None:
        fraction = min(1.0, done / total) if total else 0.0
        slot.progress(fraction, text=f"{label}: {done} / {total} {unit}")

    try:
        yield report
    finally:
        slot.empty()


# --- page scaffolding ---------------------------------------------------------------------------
def table_height(rows: int, max_rows: int = 20) -> int:
    """Pixel height of an ``st.dataframe`` that shows ``rows`` rows (at most ``max_rows``, then
    it scrolls) without hiding the last one: the header and each row take 35 px."""
    return 35 * (min(max(rows, 1), max_rows) + 1) + 3


def page_header(title: str, explanation: str) -> None:
    """Title plus the one or two sentences that say what the page shows and how to read it."""
    st.title(title)
    st.markdown(explanation)


def next_step(page: str, label: str, previous: tuple[str, str] | None = None) -> None:
    """Links to the next step of the journey (and optionally back)."""
    st.divider()
    cols = st.columns(2)
    if previous is not None:
        with cols[0]:
            st.page_link(previous[0], label=previous[1], icon=":material/arrow_back:")
    with cols[1]:
        st.page_link(page, label=label, icon=":material/arrow_forward:")


def _show_flash() -> None:
    messages = st.session_state.get(S.FLASH) or []
    st.session_state[S.FLASH] = []
    for kind, text in messages:
        getattr(st, kind, st.info)(text)


def load_samples() -> list[S.ImageEntry]:
    """The shipped sample images as :class:`~webapp.state.ImageEntry` (unreadable ones warned)."""
    entries = []
    for path in sample_image_paths():
        try:
            data = path.read_bytes()
        except OSError as exc:
            LOG.warning("Sample image %s could not be read: %s", path, exc)
            st.warning(f"The sample image {md(path.name)} could not be read ({md(exc)}).")
            continue
        entries.append(S.ImageEntry.from_bytes(path.name, data, source="sample"))
    return entries


def page_config() -> None:
    """Wide layout and the app's title; also applied when a page runs without ``app.py``.

    A deep link opened before the server ran ``app.py`` once (and ``AppTest.switch_page``) runs
    the page file on its own; calling this from :func:`setup` keeps the layout the same then.
    """
    st.set_page_config(
        page_title="Layer explainer",
        page_icon=str(ICON),  # a file served by the app: a material icon is fetched from outside
        layout="wide",
        initial_sidebar_state=presentation.sidebar_state(),
    )
    sync_upload_cap()


def upload_limit_mb(read: Callable[[], int] = max_upload_bytes) -> int | None:
    """An operator's file size limit from :mod:`explainer.limits` (by default the model file's,
    ``EXPLAINER_MAX_UPLOAD_MB``) in whole MB for ``st.file_uploader``, or ``None`` when that
    setting is broken (reading the file then says why)."""
    try:
        return max(1, math.ceil(read() / 2**20))
    except ExplainerError:
        return None


def sync_upload_cap() -> None:
    """Make Streamlit's own upload cap (``server.maxUploadSize``, which rejects a larger request
    before the app sees it) follow the project's limit, so there is one limit, set in one place:
    ``EXPLAINER_MAX_UPLOAD_MB``. The cap is only ever raised, never lowered."""
    limit = upload_limit_mb()
    if limit is not None and int(st_config.get_option("server.maxUploadSize")) < limit:
        st_config.set_option("server.maxUploadSize", limit, "EXPLAINER_MAX_UPLOAD_MB")


def setup() -> Context:
    """Initialise state, load the model and images, draw the sidebar; call once at a page's top."""
    page_config()
    S.init_defaults()
    style.apply()
    presentation.apply()
    urlstate.restore_once()  # a link's view, on the session's first run
    refine.leave()  # another page than the one refining a map: stop that work
    if S.IMAGES not in st.session_state:
        samples = load_samples()
        st.session_state[S.IMAGES] = samples
        if samples:
            st.session_state[S.ACTIVE_IMAGE] = samples[0].digest
    _show_flash()

    ok, lm = attempt("Loading the model", backend.resolve_model, S.get(S.MODEL), S.get(S.LABELS))
    if not ok:
        if S.get(S.MODEL).kind != "builtin":
            st.info("Choose the built-in model or upload another file on the Model & images page.")
        lm = None
    prep = None
    if lm is not None:
        lm = urlstate.apply_model_view(lm)  # the link's layer, neuron and target, once loaded
        ok, prep = attempt("Setting up the preprocessing", backend.preprocessing, S.get(S.PREP), lm)
        if S.get(S.LAYER) is None:
            ok_layer, layer = attempt("Discovering the layers", backend.default_layer, lm)
            if ok_layer and layer is not None:
                S.set_layer(layer)

    images: list[S.ImageEntry] = list(S.get(S.IMAGES) or [])
    active = st.session_state.get(S.ACTIVE_IMAGE)
    image = next((e for e in images if e.digest == active), images[0] if images else None)
    if image is not None:
        st.session_state[S.ACTIVE_IMAGE] = image.digest
    ctx = Context(lm=lm, prep=prep, images=images, image=image, layer=S.get(S.LAYER))
    urlstate.show_notes()
    urlstate.write_view()  # the address always holds the view: copy it to share or reload
    _sidebar(ctx)
    tour.step_box()  # the running tour's step, on top of the page
    return ctx


def bind(widget_key: str, value: Any) -> None:
    """Make a keyed widget show ``value`` (call before drawing it, and pass it no default).

    The app keeps its own copy of every choice; widgets only display it. Binding before each
    draw keeps the two in step when the value was changed elsewhere (another page, a button).
    The value is assigned even when unchanged: only an assigned value is sent to the browser,
    which otherwise shows the widget's default when it draws the widget on another page.
    """
    st.session_state[widget_key] = value


def _on_active_image() -> None:
    value = st.session_state.get("_w_active_image")
    if value:
        st.session_state[S.ACTIVE_IMAGE] = value


def _sidebar(ctx: Context) -> None:
    with st.sidebar:
        st.markdown("### :material/biotech: Layer explainer")
        for path, title, icon in PAGES:
            st.page_link(path, label=title, icon=icon)
        st.caption("New words? Every one is explained in plain words in the **Glossary**.")
        presentation.toggle()
        st.divider()
        if ctx.lm is not None:
            lm = ctx.lm
            c, h, w = lm.input_size
            st.markdown(f"**Model** · {md(lm.name)}")
            st.caption(f"{md(lm.arch)} · {lm.num_params:,} parameters · input {c}×{h}×{w}")
        else:
            st.markdown("**Model** · none loaded")
        if ctx.images:
            digests = [e.digest for e in ctx.images]
            names = {e.digest: e.name for e in ctx.images}
            bind("_w_active_image", ctx.image.digest if ctx.image else digests[0])
            st.selectbox(
                "Image",
                digests,
                format_func=lambda d: names.get(d, d[:8]),
                key="_w_active_image",
                on_change=_on_active_image,
                help="The image the explanation pages show. Add images on the Model & images page.",
            )
            if ctx.ready:
                ok, pixels = attempt(
                    "Reading the image", backend.display_image, ctx.image, ctx.prep
                )
                if ok:
                    st.image(pixels, width=160, clamp=True)
                    ok, preds = attempt(
                        "Predicting", backend.predictions, ctx.lm, ctx.image, ctx.prep, 5
                    )
                    if ok and preds:
                        label, index, value = preds[0]
                        if output_positions(ctx.lm):
                            st.caption(
                                f"Top class: **{md(label)}** (#{index}) · covers {value:.0%} "
                                "of the output"
                            )
                        else:
                            st.caption(f"Predicted: **{md(label)}** (#{index}) · {value:.1%}")
        else:
            st.caption("No image yet: add one on the Model & images page.")
        layer = S.get(S.LAYER)
        st.markdown(f"**Layer** · {md(layer)}" if layer else "**Layer** · none chosen")


def require_ready(ctx: Context) -> bool:
    """Say what is missing (with a link to fix it) when a model, image or layer is absent."""
    if ctx.lm is None:
        st.warning("No model is ready. Load one on the Model & images page.")
        st.page_link(PAGE_MODEL, label="Model & images", icon=":material/arrow_forward:")
        return False
    if ctx.prep is None:
        st.warning(
            "The preprocessing does not fit this model: pick another preset on the "
            "Model & images page."
        )
        st.page_link(PAGE_MODEL, label="Model & images", icon=":material/arrow_forward:")
        return False
    if ctx.image is None:
        st.warning("No image is selected. Add or pick one on the Model & images page.")
        st.page_link(PAGE_MODEL, label="Model & images", icon=":material/arrow_forward:")
        return False
    if not ctx.layer:
        st.warning("No layer is chosen. Pick one on the Layer picker page.")
        st.page_link(PAGE_LAYER, label="Layer picker", icon=":material/arrow_forward:")
        return False
    return True


def require_usable_layer(ctx: Context) -> tuple[Any, Any, Any, str]:
    """``(lm, image, prep, layer)`` when all are ready and the layer can be explained; otherwise
    say what is missing, link to the page that fixes it, and stop the page."""
    if not require_ready(ctx):
        st.stop()
    assert ctx.lm is not None and ctx.image is not None and ctx.prep is not None and ctx.layer
    ok, _ = attempt("Checking the layer", backend.check_layer, ctx.lm, ctx.layer)
    if not ok:
        st.page_link(PAGE_LAYER, label="Choose another layer", icon=":material/arrow_forward:")
        st.stop()
    return ctx.lm, ctx.image, ctx.prep, ctx.layer


# --- chart clicks -------------------------------------------------------------------------------
def _first_point(chart_key: str) -> dict | None:
    event = st.session_state.get(chart_key)
    if event is None:
        return None
    try:
        points = event["selection"]["points"]
    except (KeyError, TypeError):
        return None
    return points[0] if points else None


def clicked_data(chart_key: str) -> list[int] | None:
    """The integer indices of the point last clicked on the chart ``chart_key``, or ``None``."""
    point = _first_point(chart_key)
    return customdata(point) if point else None


def customdata(point: dict) -> list[int] | None:
    """The integer indices stored in a clicked point's ``customdata``.

    Plotly sends a list, or (for data that went through a typed array) an object keyed
    ``"0"``, ``"1"``, ...; both are accepted.
    """
    data = point.get("customdata")
    if data is None:
        return None
    if isinstance(data, dict):
        try:
            data = [data[k] for k in sorted(data, key=int)]
        except (TypeError, ValueError):
            return None
    if not isinstance(data, (list, tuple)):
        data = [data]
    try:
        return [int(round(float(v))) for v in data]
    except (TypeError, ValueError):
        return None


def on_click_channel(chart_key: str) -> Callable[[], None]:
    """``on_select`` callback: a clicked bar or grid tile selects its channel."""

    def callback() -> None:
        data = clicked_data(chart_key)
        if data:
            S.select_channel(data[0])

    return callback


def on_click_position(chart_key: str, position: tuple[int, ...]) -> Callable[[], None]:
    """``on_select`` callback of the output score map: the clicked cell becomes the explained
    output position.

    Cells carry their indices in the last one or two position dimensions (``customdata``);
    leading indices are kept from ``position``, the position shown.
    """

    def callback() -> None:
        data = clicked_data(chart_key)
        if not data or len(data) > len(position):
            return
        chosen = (*position[: len(position) - len(data)], *data)
        st.session_state[S.SETTINGS] = replace(S.get(S.SETTINGS), position=tuple(chosen))

    return callback


def on_click_neuron(chart_key: str) -> Callable[[], None]:
    """``on_select`` callback: a clicked cell selects the neuron in its ``customdata``.

    Cells drawn without a channel carry ``-1``; the selected channel (or 0) is used then.
    """

    def callback() -> None:
        data = clicked_data(chart_key)
        if not data:
            # A second click on the selected cell clears the browser's own outline: the
            # chart is sent its mark again (see browser_mark).
            st.session_state[S.NEURON_CLICK] = None
            entry = (st.session_state.get(S.BROWSER_MARKS) or {}).get(chart_key)
            if entry is not None:
                entry["shown"] = None
            return
        if len(data) == 3 and data[0] < 0:
            channel = st.session_state.get(S.CHANNEL)
            data[0] = int(channel) if channel is not None else 0
        S.select_neuron(tuple(data))
        st.session_state[S.NEURON_CLICK] = (chart_key, st.session_state[S.NEURON])

    return callback


def fragment_rerun() -> bool:
    """Whether this run reruns fragments only (a chart that stayed in the page), not the
    whole page (after which a chart may have been drawn anew: another page came between)."""
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    run = get_script_run_ctx(suppress_warning=True)
    return bool(run is not None and run.fragment_ids_this_run)


def browser_mark(chart_key: str, content: object, cell: object) -> tuple[object, int]:
    """The cell a chart that outlines its selected cell in the browser is drawn with, and the
    figure's revision: ``(cell, revision)`` belong in the figure's cache key.

    A click on such a chart moves its outline in the browser at once. Sending a figure
    with the new outline would make Streamlit draw the chart anew (its identity is its
    figure), so while a fragment reruns after the user's own click on the chart, the chart
    keeps the figure it was sent. A new figure is sent when its content changes, when the
    selection changed by other means and the chart shows another cell (``cell`` is what it
    must show: ``None`` for no outline), and on a run of the whole page while the browser
    shows another cell than the figure (the chart may be drawn anew from its figure then).
    """
    marks = st.session_state.get(S.BROWSER_MARKS)
    if marks is None:
        marks = st.session_state[S.BROWSER_MARKS] = {}
    neuron = st.session_state.get(S.NEURON)
    own = neuron is not None and st.session_state.get(S.NEURON_CLICK) == (
        chart_key,
        tuple(int(i) for i in neuron),
    )
    entry = marks.get(chart_key)
    if entry is None or entry["content"] != content:
        revision = 0 if entry is None else entry["revision"] + 1
        entry = {"content": content, "cell": cell, "revision": revision, "shown": cell}
    elif own and fragment_rerun():
        entry["shown"] = cell  # the browser outlines the clicked cell: keep the figure
    elif entry["shown"] != cell or entry["cell"] != cell:
        entry = {**entry, "cell": cell, "revision": entry["revision"] + 1, "shown": cell}
    marks[chart_key] = entry
    return entry["cell"], entry["revision"]


def plotly_click(fig: Any, key: str, callback: Callable[[], None]) -> None:
    """Draw a clickable figure: point selection only, no mode bar, callback copies the click."""
    st.plotly_chart(
        presentation.chart(fig),  # larger text while presenting
        key=key,
        on_select=callback,
        selection_mode="points",
        config={"displayModeBar": False, "scrollZoom": False, "doubleClick": False},
        width="stretch",
    )


def plotly_static(fig: Any, key: str | None = None) -> None:
    """Draw a figure that only shows information (hover, no selection)."""
    st.plotly_chart(
        presentation.chart(fig), key=key, config={"displayModeBar": False}, width="stretch"
    )


def view_actions(key: str, make_view: Callable[[], Any]) -> None:
    """The "Download" and "Add this view to the report" row under a page's views.

    ``make_view`` returns the page's :class:`webapp.report.ReportView` (or ``None`` when there
    is nothing to keep); a failure to build it is shown and costs nothing else on the page.
    It is called only when the user opens the download menu or adds the view, never on the
    reruns of other clicks (a snapshot of a page is not free to build).
    """
    from webapp import report  # report builds on this module

    report.actions_row(key, make_view)


# --- attribution settings (shared by the conductance and convergence pages) ---------------------
def _apply_settings(prefix: str, position_dims: int = 0) -> None:
    ss = st.session_state
    old: S.AttributionSettings = S.get(S.SETTINGS)
    batch = int(ss.get(f"{prefix}_batch", 0) or 0)
    position = old.position
    if position_dims:
        entries = [ss.get(f"{prefix}_pos{i}") for i in range(position_dims)]
        chosen = tuple(None if e is None else int(e) for e in entries)
        position = None if all(e is None for e in chosen) else chosen
    st.session_state[S.SETTINGS] = replace(
        old,
        target=ss.get(f"{prefix}_target", old.target),
        position=position,
        baseline=ss.get(f"{prefix}_baseline", old.baseline),
        constant=float(ss.get(f"{prefix}_constant", old.constant)),
        blur_sigma=float(ss.get(f"{prefix}_sigma", old.blur_sigma)),
        noise_seed=int(ss.get(f"{prefix}_seed", old.noise_seed)),
        method=ss.get(f"{prefix}_method", old.method),
        n_steps=int(ss.get(f"{prefix}_steps", old.n_steps)),
        internal_batch_size=batch if batch > 0 else None,
        tolerance=float(S.get(S.TOLERANCE)) if ss.get(f"{prefix}_auto", old.auto_steps) else None,
    )


def position_text(position: tuple[int, ...]) -> str:
    """``"row 12, column 30"`` for an output position (``"position 7"`` for one index)."""
    names = position_names(len(position))
    return ", ".join(f"{name} {int(i)}" for name, i in zip(names, position, strict=True))


def target_label(lm: backend.ServedModel, target: Target) -> str:
    """``"name (#index)"`` for a class index (or just the index when out of range); for a
    per-position target ``(class, *position)``, ``"name (#index) at row r, column c"``.

    Plain text that holds the class name as written: pass it through :func:`webapp.text.md`
    before it joins markdown (captions, metrics, alerts)."""
    if isinstance(target, tuple):
        index, position = int(target[0]), tuple(target[1:])
    else:
        index, position = int(target), ()
    text = f"{lm.labels[index]} (#{index})" if 0 <= index < lm.num_classes else f"#{index}"
    return f"{text} at {position_text(position)}" if position else text


def target_setting_text(lm: backend.ServedModel, settings: S.AttributionSettings) -> str:
    """What the settings explain in each image, in words (no trailing full stop).

    Plain text (it may hold a class name): escape it with :func:`webapp.text.md` for markdown."""
    positions = output_positions(lm)
    if settings.target is None:
        what = "each image's top class" if positions else "each image's predicted class"
    else:
        what = target_label(lm, settings.target)
    if not positions:
        return what
    chosen = settings.position_for(len(positions))
    if chosen is None or all(i is None for i in chosen):
        return f"{what}, at the output position where it scores highest"
    names = position_names(len(positions))
    fixed = ", ".join(f"{n} {i}" for n, i in zip(names, chosen, strict=True) if i is not None)
    free = [n for n, i in zip(names, chosen, strict=True) if i is None]
    if free:
        return f"{what}, at {fixed} with the {' and '.join(free)} where it scores highest"
    return f"{what}, at {fixed}"


def _position_inputs(prefix: str, settings: S.AttributionSettings, sizes: tuple[int, ...]) -> None:
    """One number input per output position dimension; empty means automatic."""
    names = position_names(len(sizes))
    chosen = settings.position_for(len(sizes))
    count = len(sizes)
    cols = st.columns([1.4] * count + [max(2.0, 8.0 - 1.4 * count)])
    for i, (name, size) in enumerate(zip(names, sizes, strict=True)):
        value = chosen[i] if chosen is not None else None
        bind(f"{prefix}_pos{i}", value if value is not None and 0 <= value < size else None)
        cols[i].number_input(
            f"Output {name}",
            min_value=0,
            max_value=size - 1,
            value=None,
            step=1,
            placeholder="automatic",
            key=f"{prefix}_pos{i}",
            help=f"0 to {size - 1}. Leave it empty to explain the {name} where the target "
            "class scores highest.",
        )
    grid = " × ".join(str(s) for s in sizes)
    cols[-1].caption(
        f"This model scores every position of its {grid} output, so the explained score is "
        "the target class's at one output position. Empty fields are chosen automatically: "
        "where that class scores highest."
    )


def _baseline_previews(ctx: Context, settings: S.AttributionSettings) -> None:
    """One small picture of every baseline for the active image (with the options below as last
    applied), the one in use marked, so the choice is seen, not guessed."""
    ok, previews = attempt(
        "Drawing the baselines", backend.baseline_previews, ctx.image, ctx.prep, settings
    )
    if not ok or not previews:
        return
    st.caption(
        "What each baseline looks like for this image: the path runs from it to the image. "
        "The options below change the grey level, the blur and the noise."
    )
    for column, (kind, picture) in zip(st.columns(len(previews)), previews.items(), strict=True):
        name = S.BASELINE_NAMES.get(kind, kind)
        column.image(
            picture,
            caption=f"{name} (in use)" if kind == settings.baseline else name,
            width="stretch",
        )


def settings_form(
    ctx: Context, prefix: str, *, show_method: bool = True, auto_steps: bool = False
) -> S.AttributionSettings:
    """The target / baseline / integration form; returns the settings in force.

    Values are applied only when the form is submitted, so changing several at once costs one
    computation. ``auto_steps`` offers the engine's automatic steps (for pages whose maps come
    from :func:`webapp.backend.conductance`).
    """
    lm = ctx.lm
    assert lm is not None and ctx.image is not None and ctx.prep is not None
    settings: S.AttributionSettings = S.get(S.SETTINGS)
    if settings.auto_steps and settings.tolerance != float(S.get(S.TOLERANCE)):
        # Automatic steps follow the tolerance, wherever it was changed (Convergence, a link).
        settings = replace(settings, tolerance=float(S.get(S.TOLERANCE)))
        st.session_state[S.SETTINGS] = settings
    positions = output_positions(lm)
    ok, predicted = attempt("Predicting", backend.predicted_class, lm, ctx.image, ctx.prep)
    options: list[int | None] = [None, *range(lm.num_classes)]
    automatic = "Top class" if positions else "Predicted class"

    def fmt(value: int | None) -> str:
        if value is None:
            return (
                f"{automatic}: {target_label(lm, predicted)}"
                if ok and predicted is not None
                else automatic
            )
        return target_label(lm, value)

    target_index = options.index(settings.target) if settings.target in options else 0
    # Presentation mode folds the form away; inside a fold the baseline options are a bordered
    # box, not an expander in an expander.
    with (
        presentation.controls("Settings: target, baseline, steps"),
        st.form(f"{prefix}_form", border=True),
    ):
        # Two rows, so that at 1024x768 (a projector) no label or value is clipped.
        c1, c2 = st.columns([3, 2])
        c3, c4, c5 = st.columns([2, 1, 1])
        c1.selectbox(
            "Target class",
            options,
            index=target_index,
            format_func=fmt,
            key=f"{prefix}_target",
            help="The output whose score is explained. Type to search by label name."
            + (
                " 'Top class' is the class with the highest score at the most output positions."
                if positions
                else ""
            ),
        )
        c2.selectbox(
            "Baseline",
            list(BASELINE_KINDS),
            index=list(BASELINE_KINDS).index(settings.baseline)
            if settings.baseline in BASELINE_KINDS
            else 0,
            format_func=lambda k: S.BASELINE_NAMES.get(k, k),
            key=f"{prefix}_baseline",
            help=G.help_text(
                "baseline", "The reference input: conductance explains F(image) − F(baseline)."
            ),
        )
        if show_method:
            c3.selectbox(
                "Integration method",
                list(S.METHODS),
                index=list(S.METHODS).index(settings.method) if settings.method in S.METHODS else 0,
                format_func=lambda m: S.METHOD_NAMES.get(m, m),
                key=f"{prefix}_method",
                help=G.help_text(
                    "integration-method",
                    "How the path integral is approximated. Gauss-Legendre converges fastest.",
                ),
            )
        c4.number_input(
            "n_steps",
            min_value=1,
            max_value=max_steps(),
            value=int(settings.n_steps),
            step=10,
            key=f"{prefix}_steps",
            help=G.help_text(
                "steps", "Points on the path from baseline to image. More steps, smaller delta."
            ),
        )
        if auto_steps:
            st.checkbox(
                "Choose the steps for me: add path points until the convergence delta is within "
                f"your tolerance ({float(S.get(S.TOLERANCE)) * 100:.3g}% of the score difference), "
                "using at most n_steps",
                value=settings.auto_steps,
                key=f"{prefix}_auto",
                help=G.help_text(
                    "steps",
                    "The engine places the points where the path needs them and stops once the "
                    "delta is small enough; the map says how many it used. The tolerance is set "
                    "on the Convergence page.",
                ),
            )
        c5.number_input(
            "Batch size",
            min_value=0,
            max_value=4096,
            value=int(settings.internal_batch_size or 0),
            step=8,
            key=f"{prefix}_batch",
            help="Path points per forward pass (0 = automatic, about n_steps / 8). Passes never "
            "exceed the server's memory budget, whatever the value; the result does not change.",
        )
        if positions:
            _position_inputs(prefix, settings, positions)
        folded = presentation.folded()
        with st.container(border=True) if folded else st.expander("Baseline options"):
            _baseline_previews(ctx, settings)
            b1, b2, b3 = st.columns(3)
            b1.slider(
                "Constant grey level",
                0.0,
                1.0,
                float(settings.constant),
                0.05,
                key=f"{prefix}_constant",
                help="Pixel value of the 'Constant grey level' baseline.",
            )
            b2.slider(
                "Blur sigma (pixels)",
                0.5,
                20.0,
                float(settings.blur_sigma),
                0.5,
                key=f"{prefix}_sigma",
                help="Width of the gaussian for the 'Blurred input' baseline.",
            )
            b3.number_input(
                "Noise seed",
                min_value=0,
                max_value=2**31 - 1,
                value=int(settings.noise_seed),
                key=f"{prefix}_seed",
                help="Seed of the 'Uniform noise' baseline (same seed, same noise).",
            )
        st.form_submit_button(
            "Compute", type="primary", on_click=_apply_settings, args=(prefix, len(positions))
        )
    return S.get(S.SETTINGS)
