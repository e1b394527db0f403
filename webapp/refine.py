"""A conductance map shown at once and refined in the background.

On a large model the asked-for map takes seconds to tens of seconds. The conductance page asks
:func:`conductance` for it: the full computation starts as a background job at once (on the
model's background worker, see :meth:`explainer.compute.LocalExecutor.submit`), and when it is
not done within ``EXPLAINER_FIRST_LOOK_AFTER_S`` the page gets a coarse *first look* instead
(:data:`webapp.backend.FIRST_LOOK_STEPS` Gauss-Legendre steps), draws it, and
:func:`progress` polls the job in a fragment: a progress bar, a Stop button, and a rerun of the
page with the refined map when it lands. Meanwhile the page stays live: clicks are answered by
the model's other worker, and a change of settings replaces the job with a new one.

One refinement per browser session, in ``st.session_state[S.REFINEMENT]``: a newer request
cancels an older one that is still running.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import streamlit as st
from streamlit import runtime
from streamlit.runtime.scriptrunner import get_script_run_ctx

from explainer import analysis
from explainer.limits import first_look_after_s
from webapp import backend
from webapp import state as S
from webapp.state import AttributionSettings, ImageEntry
from webapp.text import md

LOG = logging.getLogger(__name__)

POLL_S = 0.5
"""How often the progress fragment looks at the job."""

ORPHAN_S = 10.0
"""A running refinement whose page has not looked at it for this long is cancelled: the page
stopped answering (coming back starts it again; the first look is cached). One whose browser tab
closed, or whose user went to another page, is cancelled at once (see :func:`leave`). Generous:
on a busy server the page's polls can be seconds apart."""

_WAIT_S = 0.05


@dataclass
class Refinement:
    """The background job that computes one conductance map.

    Attributes
    ----------
    key : str
        The cache key its result is stored under (that of :func:`webapp.backend.conductance`).
    handle : Any
        The job's :class:`explainer.compute.JobHandle`.
    what : str
        What it computes, in words ("50 Gauss-Legendre steps").
    started : float
        ``time.monotonic()`` when it was submitted.
    stopped : bool
        Whether the user stopped it.
    kept : bool
        Whether its result went into the cache.
    seen : float
        ``time.monotonic()`` when a page last looked at it (see :data:`ORPHAN_S`).
    orphaned : bool
        Whether it was cancelled because no page looked at it any more.
    session_id : str or None
        The browser session that asked for it.
    auto : bool
        Whether the engine chooses its steps (its progress total is then a cap, not a goal).
    page : str or None
        The page that shows it (Streamlit's page script hash).
    """

    key: str
    handle: Any = field(repr=False)
    what: str
    started: float
    stopped: bool = False
    kept: bool = False
    seen: float = 0.0
    orphaned: bool = False
    session_id: str | None = None
    auto: bool = False
    page: str | None = None

    def __post_init__(self) -> None:
        self.seen = self.started

    @property
    def running(self) -> bool:
        return not self.handle.done()

    def error(self) -> BaseException | None:
        """The error the job ended with (``None`` while it runs, when it worked, or when the
        user stopped it)."""
        if self.running or self.stopped:
            return None
        try:
            self.handle.result(timeout=0)
        except Exception as exc:  # noqa: BLE001 - any failure (cancelled, limits, bugs) is shown
            return exc
        return None


def current() -> Refinement | None:
    """The session's refinement, if any."""
    value = st.session_state.get(S.REFINEMENT)
    return value if isinstance(value, Refinement) else None


def collect(refinement: Refinement | None = None) -> bool:
    """Store the result of a finished refinement in the cache; whether it is stored now."""
    refinement = refinement or current()
    if refinement is None or refinement.kept or refinement.running or refinement.stopped:
        return refinement is not None and refinement.kept
    try:
        value = refinement.handle.result(timeout=0)
    except Exception:  # noqa: BLE001 - the progress part shows it (see Refinement.error)
        return False
    backend.keep_result(refinement.key, value)
    refinement.kept = True
    return True


def _settings_words(settings: AttributionSettings) -> str:
    if settings.auto_steps:
        return (
            f"a delta within {float(settings.tolerance) * 100:.3g}% (automatic steps, at most "
            f"{int(settings.n_steps)})"
        )
    return f"{int(settings.n_steps)} {S.METHOD_NAMES.get(settings.method, settings.method)} steps"


def _start(
    lm: backend.ServedModel,
    image: ImageEntry,
    prep: Any,
    layer: str,
    settings: AttributionSettings,
) -> tuple[Refinement, bool]:
    """The refinement of this request, and whether it was started now: the session's one when
    it is for the same map (running, done, stopped or failed: it is not started twice), else a
    new job replacing the old one."""
    old = current()
    key = backend.conductance_key(lm, image, prep, layer, settings)
    if old is not None and old.key == key and not old.orphaned:
        return old, False
    if old is not None and old.running:
        old.handle.cancel()  # a newer request replaces the older one
    _cancel_prefetch()  # the refinement needs the background worker more
    handle = backend.start_conductance(lm, image, prep, layer, settings)
    refinement = Refinement(
        key, handle, _settings_words(settings), time.monotonic(), auto=settings.auto_steps
    )
    run = get_script_run_ctx(suppress_warning=True)
    refinement.session_id = run.session_id if run is not None else None
    refinement.page = run.page_script_hash if run is not None else None
    st.session_state[S.REFINEMENT] = refinement
    _watchdog().watch(refinement)
    return refinement, True


class _Watchdog:
    """Cancels running refinements that no page looks at any more (a closed tab)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: list[Refinement] = []
        self._thread: threading.Thread | None = None

    def watch(self, refinement: Refinement) -> None:
        with self._lock:
            self._watched.append(refinement)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="refinement-watchdog", daemon=True
                )
                self._thread.start()

    def sweep(self, now: float) -> bool:
        """Cancel the orphans among the watched refinements; whether any is left to watch."""
        with self._lock:
            for refinement in self._watched:
                if refinement.running and (
                    now - refinement.seen > ORPHAN_S or _closed(refinement.session_id)
                ):
                    refinement.orphaned = True
                    refinement.handle.cancel()
            self._watched = [r for r in self._watched if r.running and not r.orphaned]
            if not self._watched:
                self._thread = None
            return bool(self._watched)

    def _run(self) -> None:
        while True:
            time.sleep(min(0.5, ORPHAN_S / 4))
            try:
                if not self.sweep(time.monotonic()):
                    return
            except Exception:  # noqa: BLE001 - the watchdog must outlive one bad entry
                LOG.exception("The refinement watchdog failed; it goes on.")


def _closed(session_id: str | None) -> bool:
    """Whether the browser session ``session_id`` is gone (its tab closed)."""
    if session_id is None or not runtime.exists():
        return False
    try:
        return not runtime.get_instance().is_active_session(session_id)
    except Exception:  # noqa: BLE001 - no runtime to ask (a test harness): the heartbeat decides
        return False


@st.cache_resource(show_spinner=False)
def _watchdog() -> _Watchdog:
    return _Watchdog()


def conductance(
    lm: backend.ServedModel,
    image: ImageEntry,
    prep: Any,
    layer: str,
    settings: AttributionSettings,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[analysis.ConductanceResult, Refinement | None]:
    """The asked-for conductance map if it is ready within ``EXPLAINER_FIRST_LOOK_AFTER_S``,
    else a first look at it; with the refinement still running (``None`` when the map returned
    is the asked-for one).

    Raises
    ------
    explainer.errors.ExplainerError
        As :func:`webapp.backend.conductance` (for the first look, or for the map itself when
        it failed quickly).
    """
    collect()  # a refinement that finished while the user was elsewhere
    cached = backend.conductance_cached(lm, image, prep, layer, settings)
    if cached is not None:
        return cached, None
    quick = backend.first_look_settings(settings)
    if quick is None:  # few steps: the map itself is about as cheap as a first look
        return backend.conductance(lm, image, prep, layer, settings, progress), None
    refinement, fresh = _start(lm, image, prep, layer, settings)
    # Waiting for the asked-for map is pointless when even a first look of this model took
    # longer than the wait: draw the first look at once.
    if fresh and _first_look_seconds().get(lm.source.key, 0.0) < first_look_after_s():
        deadline = time.monotonic() + first_look_after_s()
        while refinement.running and time.monotonic() < deadline:
            if progress is not None and refinement.handle.progress is not None:
                progress(*refinement.handle.progress)
            try:
                refinement.handle.result(timeout=_WAIT_S)
            except Exception:  # noqa: BLE001 - still running, or failed: both handled below
                pass
            refinement.seen = time.monotonic()
            # Reading session state is where Streamlit stops a rerun: the job runs on.
            st.session_state.get(S.REFINEMENT)
        if collect(refinement):
            return refinement.handle.result(timeout=0), None
        error = refinement.error()
        if error is not None:
            # It failed before a first look was due (a bad target, the worker's limits):
            # that is the page's error, as for any other request; the next run tries again.
            restart()
            raise error
    elif refinement.kept:  # done earlier, then evicted from the cache: run it again
        restart()
        return conductance(lm, image, prep, layer, settings, progress)
    timed = backend.conductance_cached(lm, image, prep, layer, quick) is None
    started = time.monotonic()
    first = backend.conductance(lm, image, prep, layer, quick, progress)
    if timed:
        _first_look_seconds()[lm.source.key] = time.monotonic() - started
    return first, refinement


@st.cache_resource(show_spinner=False)
def _first_look_seconds() -> dict[str, float]:
    """How long the last computed first look took, per model key (process-wide)."""
    return {}


def collect_gradients() -> None:
    """Store the gradients of the session's finished prefetch (:func:`prefetch_gradients`) in
    the cache, so a click on one of those cells is answered from it."""
    pending = st.session_state.get(S.PREFETCH)
    if isinstance(pending, backend.GradientPrefetch):
        pending.collect()


def prefetch_gradients(
    lm: backend.ServedModel,
    image: ImageEntry,
    prep: Any,
    layer: str,
    neurons: list[tuple[int, ...]],
) -> None:
    """Compute the input gradients of ``neurons`` (the cells the user may click next) in the
    background, unless the model's background worker refines a map for this session; a newer
    set replaces an older one still running. Small models only: see
    :func:`webapp.backend.plan_gradient_prefetch`."""
    refinement = current()
    if refinement is not None and refinement.running:
        return
    old = st.session_state.get(S.PREFETCH)
    try:
        new = backend.plan_gradient_prefetch(lm, image, prep, layer, neurons)
        if new is None:
            return
        if isinstance(old, backend.GradientPrefetch) and old.pending:
            if set(new.keys) <= set(old.keys):
                return  # already on its way
            old.cancel()
        st.session_state[S.PREFETCH] = new.start(lm)
    except Exception:  # noqa: BLE001 - only a head start: a click computes its own gradient
        LOG.warning("Prefetching neuron gradients failed; clicks compute them.", exc_info=True)


def _cancel_prefetch() -> None:
    pending = st.session_state.get(S.PREFETCH)
    if isinstance(pending, backend.GradientPrefetch):
        pending.cancel()
    st.session_state[S.PREFETCH] = None


def leave() -> None:
    """Cancel the session's refinement when this run is another page's: the user moved on
    (coming back to its page starts it again). Call at the top of every page run."""
    refinement = current()
    if refinement is None or not refinement.running or refinement.page is None:
        return
    run = get_script_run_ctx(suppress_warning=True)
    if run is not None and run.page_script_hash != refinement.page:
        refinement.orphaned = True
        refinement.handle.cancel()


def stop() -> None:
    """Stop the session's refinement (the first look stays)."""
    refinement = current()
    if refinement is not None:
        refinement.stopped = True
        refinement.handle.cancel()


def restart() -> None:
    """Forget the session's refinement, so the next page run starts it again."""
    st.session_state[S.REFINEMENT] = None


def progress(refinement: Refinement, first_steps: int) -> None:
    """The refinement's state under the page's title: a live progress bar with a Stop button
    while it runs, then a rerun of the page with the refined map; or why it ended."""
    if refinement.running and not refinement.stopped:
        _live(refinement, first_steps)
        return
    error = refinement.error()
    if refinement.orphaned:  # cancelled while nobody looked: the next run starts it again
        st.rerun(scope="app")
    left, right = st.columns([5, 1], vertical_alignment="center")
    if refinement.stopped:
        left.info(
            f"Showing a first look at {first_steps} steps: you stopped the refinement to "
            f"{refinement.what}. The map's shape is usually right already; its values are "
            "approximate (see the convergence delta).",
            icon=":material/pause_circle:",
        )
        right.button("Refine now", key="refine_again", on_click=restart)
    elif error is not None:
        left.warning(
            f"Showing a first look at {first_steps} steps: refining to {refinement.what} "
            f"failed. {md(error)}",
            icon=":material/warning:",
        )
        right.button("Try again", key="refine_again", on_click=restart)


@st.fragment(run_every=POLL_S)
def _live(refinement: Refinement, first_steps: int) -> None:
    if not refinement.running or refinement.stopped:
        if not refinement.stopped:
            collect(refinement)
            st.rerun(scope="app")  # redraw the page with the refined map, or say why it failed
        return
    refinement.seen = time.monotonic()
    elapsed = refinement.seen - refinement.started
    done, total = refinement.handle.progress or (0, 0)
    fraction = min(1.0, done / total) if total else 0.0
    left, right = st.columns([5, 1], vertical_alignment="center")
    if refinement.auto:  # the total is the cap: the engine usually stops well before it
        so_far = f"{done} path points so far (at most {total or '…'})"
    else:
        so_far = f"{done} / {total or '…'} steps"
    left.progress(
        fraction,
        text=f"First look at {first_steps} steps shown. Refining to {refinement.what} in the "
        f"background: {so_far}, {elapsed:.0f} s. You can keep clicking.",
    )
    right.button("Stop", key="refine_stop", on_click=stop, icon=":material/stop_circle:")
