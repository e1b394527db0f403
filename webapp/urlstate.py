"""The view in the page's address: links that open the same view, and reloads that keep it.

Every page writes what it shows into the query string (:func:`write_view`), and a new browser
session reads it back on its first run (:func:`restore_once`). The page itself is the address's
path (``/neuron_gradient``); the query string holds the rest, each value short and checked:

==========  ======================================================================================
parameter   value
==========  ======================================================================================
model       the first 16 hex digits of the uploaded model's sha256 (absent: the built-in model)
arch        architecture picked for a weights-only file; ``classes``: number of classes asked for
labels      digest prefix of the uploaded class-names file
images      the session's images in order, comma-separated digest prefixes (``none``: no image;
            absent: the sample images); ``image``: the one explained, when not the first
prep        preprocessing preset; ``mean`` and ``std`` for the custom one; ``fit``: how a
            non-square picture is fitted (``pad`` or ``resize``; absent: ``crop``)
layer       the chosen layer's name; ``layout`` the layout the user chose for it, if any
target      class explained (absent: the predicted class); ``position``: output position of a
            per-position model, ``_`` for automatic
baseline    baseline kind, with ``constant``, ``sigma`` and ``seed`` when not the defaults
method      integration rule; ``steps``: n_steps
channel     selected channel; ``neuron``: selected neuron, e.g. ``3,4,5``
tol         convergence tolerance in % of the score difference, e.g. ``2.5`` (absent: 5);
            ``auto=1``: the steps are chosen automatically, to that tolerance
sweep       the convergence sweep's methods, comma-separated (``none``: no method);
            ``sweep_steps``: its step counts, e.g. ``4,16,64``; ``sweep_abs=1``: absolute |delta|
rank        how the conductance page orders channels; ``top``: bars shown; ``tiles``: tiles per
            page; ``tile_page``: the page of tiles; ``only``: its channel filter, e.g. ``3,10-20``
present     ``1``: presentation mode
range       colour range of the neuron-gradient maps (``full``; absent: ``robust``);
            ``zoom=1``: the maps are zoomed to the receptive field
==========  ======================================================================================

Digests are shortened to :data:`~webapp.persist.LINK_PREFIX` hex digits, found in the upload
store (:mod:`webapp.persist`) or among the sample images, so a link to the demo works on any
server. Values that are not valid are dropped with a plain message, the rest of the link still
applies. When the link's model is not on this server, the built-in model is shown, the parts that
belong to that model (layer, neuron, target, the tile page and filter) wait, and the address keeps
them: uploading the same file again opens the view. The same holds for the link's images: the
address keeps the ones this server lacks; each one uploaded again goes back to its place in the
link's order of images, and the explained one is explained again.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import streamlit as st

from explainer.baselines import BASELINE_KINDS
from explainer.demo import sample_image_paths
from explainer.errors import ExplainerError
from explainer.layout import KINDS as LAYOUT_KINDS
from explainer.limits import max_classes, max_images, max_steps
from webapp import backend, persist, presentation
from webapp import state as S
from webapp.text import md

LOG = logging.getLogger(__name__)

RESTORED = "_url_restored"
"""Session key: the address was read for this session (done once, on its first run)."""
APPLY = "_url_apply"
"""Session key: the model-dependent parts of a link (``dict``) to apply once the model is loaded."""
PENDING = "_url_pending"
"""Session key: the model-dependent parts of a link whose model is not on this server."""
IMAGES_PENDING = "_url_images_pending"
"""Session key: the link's images that are not on this server (``dict``: ``missing``, their
digest prefixes; ``active``, the prefix of the explained one while it is missing, or ``None``;
``notes``, the messages about them), until they are uploaded again."""
NOTES = "_url_notes"
"""Session key: ``list[str]``, what could not be shown of the link (markdown, escaped)."""
LAYOUT_KEY = S.LAYOUTS
"""Session key of the per-layer layout choices (layer name -> kind), carried as ``layout`` for
the chosen layer when the user picked one."""
LAYOUTS = LAYOUT_KINDS
"""Accepted values of ``layout``."""

MODEL_PARAMS = (
    "model",
    "arch",
    "classes",
    "labels",
    "layer",
    "layout",
    "target",
    "position",
    "channel",
    "neuron",
    "tile_page",
    "only",
)
"""Parameters that only make sense with the link's model (the tile page and filter belong to the
link's layer)."""
PARAMS = (
    *MODEL_PARAMS,
    "images",
    "image",
    "prep",
    "mean",
    "std",
    "fit",
    "baseline",
    "constant",
    "sigma",
    "seed",
    "method",
    "steps",
    "tol",
    "auto",
    "sweep",
    "sweep_steps",
    "sweep_abs",
    "rank",
    "top",
    "tiles",
    "present",
    "range",
    "zoom",
)
"""Every parameter of a view, in the order written."""

GRADIENT_RANGES = ("robust", "full")
"""Accepted values of ``range`` (see :data:`webapp.state.GRADIENT_RANGE`)."""
RANKINGS = ("abs", "pos", "neg", "index")
"""Accepted values of ``rank`` (:data:`webapp.figures.RANKINGS`)."""
TILE_SIZES = (16, 36, 64, 100)
"""Accepted values of ``tiles`` (the conductance page's choices)."""
TOP_MAX = 100
"""Most bars the conductance page shows."""
FILTER_CHARS = 100
FILTER_CHANNELS = 100_000
"""Most channels a link's filter may name (its ranges are expanded when the page draws)."""

NAME_CHARS = 300
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_DEFAULT = S.AttributionSettings()


# --- parsing: plain text in, checked values and messages out ------------------------------------
def _int(text: str, low: int, high: int) -> int:
    value = int(text.strip())
    if not low <= value <= high:
        raise ValueError
    return value


def _float(text: str, low: float, high: float) -> float:
    value = float(text.strip())
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError
    return value


def _ints(text: str, count: tuple[int, int], auto: bool = False) -> tuple[int | None, ...]:
    parts = text.split(",")
    if not count[0] <= len(parts) <= count[1]:
        raise ValueError
    values = tuple(None if auto and p.strip() == "_" else _int(p, 0, 2**31 - 1) for p in parts)
    if not auto and any(v is None for v in values):
        raise ValueError
    return values


def _floats(text: str, low: float, high: float) -> tuple[float, ...]:
    parts = text.split(",")
    if not 1 <= len(parts) <= 4:
        raise ValueError
    return tuple(_float(p, low, high) for p in parts)


def _layer(text: str) -> str:
    if not 1 <= len(text) <= NAME_CHARS or _CONTROL.search(text) or text != text.strip():
        raise ValueError
    return text


def _model(text: str) -> str:
    if text == "builtin" or persist.is_prefix(text):
        return text
    raise ValueError


def _prefix(text: str) -> str:
    if not persist.is_prefix(text):
        raise ValueError
    return text


def _flag(text: str) -> bool:
    if text not in ("0", "1"):
        raise ValueError
    return text == "1"


def _tolerance(text: str) -> float:
    return _float(text, 0.001, 100.0) / 100.0


def _sweep_methods(text: str) -> tuple[str, ...]:
    if text == "none":
        return ()
    parts = text.split(",")
    if any(p not in S.METHODS for p in parts):
        raise ValueError
    return tuple(dict.fromkeys(parts))


def _sweep_steps(text: str) -> tuple[int, ...]:
    if text == "none":
        return ()
    parts = text.split(",")
    if len(parts) > len(S.SWEEP_STEPS):
        raise ValueError
    steps = {_int(p, 1, max(S.SWEEP_STEPS)) for p in parts}
    if not steps <= set(S.SWEEP_STEPS):
        raise ValueError
    return tuple(sorted(steps))


def _tiles(text: str) -> int:
    value = _int(text, 1, max(TILE_SIZES))
    if value not in TILE_SIZES:
        raise ValueError
    return value


_FILTER_PART = re.compile(r"\s*([0-9]{1,6})\s*(?:-\s*([0-9]{1,6})\s*)?")


def _channel_filter(text: str) -> str:
    """A channel filter like ``3, 10-20, 40`` naming at most :data:`FILTER_CHANNELS` channels
    (the page expands its ranges)."""
    if not 1 <= len(text) <= FILTER_CHARS:
        raise ValueError
    count = 0
    for part in text.replace(";", ",").split(","):
        if not part.strip():
            continue
        match = _FILTER_PART.fullmatch(part)
        if match is None:
            raise ValueError
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        count += abs(high - low) + 1
    if not 0 < count <= FILTER_CHANNELS:
        raise ValueError
    return text


def _choice(options: tuple[str, ...] | list[str]):
    def check(text: str) -> str:
        if text not in options:
            raise ValueError
        return text

    return check


def _architectures() -> list[str]:
    from explainer.intake import list_architectures

    return list(list_architectures())


_CHECKS: dict[str, tuple[Any, str]] = {
    # name: (parser, what a valid value looks like)
    "model": (_model, "a model digest from a link of this app, or builtin"),
    "arch": (lambda t: _choice(_architectures())(t), "one of the architectures this server knows"),
    "classes": (lambda t: _int(t, 1, max_classes()), "a number of classes"),
    "labels": (_prefix, "a digest from a link of this app"),
    "image": (_prefix, "a digest from a link of this app"),
    "prep": (_choice(tuple(S.PREP_PRESETS)), ", ".join(S.PREP_PRESETS)),
    "mean": (lambda t: _floats(t, -1e6, 1e6), "one to four numbers, like 0.485,0.456,0.406"),
    "std": (lambda t: _floats(t, 1e-9, 1e6), "one to four positive numbers"),
    "fit": (_choice(tuple(S.FIT_NAMES)), ", ".join(S.FIT_NAMES)),
    "layer": (_layer, "a layer name"),
    "layout": (_choice(LAYOUTS), ", ".join(LAYOUTS)),
    "target": (lambda t: _int(t, 0, max_classes() - 1), "a class number"),
    "position": (lambda t: _ints(t, (1, 4), auto=True), "row,column numbers or _"),
    "baseline": (_choice(tuple(BASELINE_KINDS)), ", ".join(BASELINE_KINDS)),
    "constant": (lambda t: _float(t, 0.0, 1.0), "a grey level from 0 to 1"),
    "sigma": (lambda t: _float(t, 0.5, 20.0), "a blur width from 0.5 to 20"),
    "seed": (lambda t: _int(t, 0, 2**31 - 1), "a whole number"),
    "method": (_choice(S.METHODS), ", ".join(S.METHODS)),
    "steps": (lambda t: _int(t, 1, max_steps()), f"a number of steps from 1 to {max_steps()}"),
    "channel": (lambda t: _int(t, 0, 2**31 - 1), "a channel number"),
    "neuron": (lambda t: _ints(t, (1, 4)), "indices like 3,4,5"),
    "tol": (_tolerance, "a tolerance in % from 0.001 to 100"),
    "auto": (_flag, "1 or 0"),
    "sweep": (_sweep_methods, "integration rules separated by commas, or none"),
    "sweep_steps": (
        _sweep_steps,
        "step counts separated by commas, each one of " + ", ".join(map(str, S.SWEEP_STEPS)),
    ),
    "sweep_abs": (_flag, "1 or 0"),
    "rank": (_choice(RANKINGS), ", ".join(RANKINGS)),
    "top": (lambda t: _int(t, 1, TOP_MAX), f"a number of bars from 1 to {TOP_MAX}"),
    "tiles": (_tiles, ", ".join(map(str, TILE_SIZES))),
    "tile_page": (lambda t: _int(t, 1, 10_000), "a page number"),
    "only": (_channel_filter, "channel numbers and ranges like 3,10-20,40"),
    "present": (_flag, "1 or 0"),
    "range": (_choice(GRADIENT_RANGES), ", ".join(GRADIENT_RANGES)),
    "zoom": (_flag, "1 or 0"),
}


def _shown(text: str, limit: int = 40) -> str:
    text = _CONTROL.sub("", text)
    return md(text if len(text) <= limit else text[: limit - 1] + "…")


def parse(params: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """Check every known parameter of a link.

    Returns the valid values by name and one plain message (escaped markdown) per value that was
    dropped. Unknown parameters are ignored; nothing here raises.
    """
    values: dict[str, Any] = {}
    notes: list[str] = []
    for name in PARAMS:
        raw = params.get(name)
        if raw is None:
            continue
        raw = str(raw)
        if name == "images":
            images, note = _parse_images(raw)
            values[name] = images
            if note:
                notes.append(note)
            continue
        parser, expected = _CHECKS[name]
        try:
            values[name] = parser(raw)
        except (ValueError, ExplainerError):
            notes.append(
                f"The link's **{name}** value “{_shown(raw)}” is not valid ({md(expected)}); "
                "it was left out."
            )
    if "neuron" in values and "channel" in values and values["neuron"][0] != values["channel"]:
        values.pop("channel")
    return values, notes


def _parse_images(raw: str) -> tuple[tuple[str, ...], str | None]:
    if raw == "none":
        return (), None
    parts = [p for p in raw.split(",") if p]
    good = [p for p in parts if persist.is_prefix(p)]
    note = None
    bad = len(parts) - len(good)
    try:
        limit = max_images()
    except ExplainerError:
        limit = len(good)
    if bad:
        note = (
            f"{bad} of the link's image references {'is' if bad == 1 else 'are'} not a valid "
            f"digest; {'it was' if bad == 1 else 'they were'} left out."
        )
    if len(good) > limit:
        note = (note + " " if note else "") + (
            f"The link names {len(good)} images; this server keeps at most {limit} per session, "
            "so the first ones are shown."
        )
        good = good[:limit]
    return tuple(dict.fromkeys(good)), note


# --- writing: session state to parameters -------------------------------------------------------
def _short(digest: str) -> str:
    return digest[: persist.LINK_PREFIX]


def _ints_text(values: tuple[int | None, ...]) -> str:
    return ",".join("_" if v is None else str(int(v)) for v in values)


def _number(value: float) -> str:
    return f"{float(value):g}"


def view_params() -> dict[str, str]:
    """The current view as query parameters (defaults left out, to keep links short)."""
    ss = st.session_state
    out: dict[str, str] = {}
    ref: S.ModelRef = S.get(S.MODEL)
    if ref.kind == "upload" and ref.digest:
        out["model"] = _short(ref.digest)
        if ref.arch:
            out["arch"] = ref.arch
        if ref.num_classes:
            out["classes"] = str(int(ref.num_classes))
        labels = S.get(S.LABELS)
        if labels is not None and getattr(labels, "digest", ""):
            out["labels"] = _short(labels.digest)
    layer = S.get(S.LAYER)
    if layer:
        out["layer"] = str(layer)
        layout = (ss.get(LAYOUT_KEY) or {}).get(layer)  # only when the user chose one
        if isinstance(layout, str) and layout in LAYOUTS:
            out["layout"] = layout
    settings: S.AttributionSettings = S.get(S.SETTINGS)
    if settings.target is not None:
        out["target"] = str(int(settings.target))
    if settings.position is not None:
        out["position"] = _ints_text(settings.position)
    channel, neuron = ss.get(S.CHANNEL), ss.get(S.NEURON)
    if neuron is not None:
        out["neuron"] = _ints_text(tuple(neuron))
    elif channel is not None:
        out["channel"] = str(int(channel))

    images: list[S.ImageEntry] = list(S.get(S.IMAGES) or [])
    if not _are_default_samples(images):
        out["images"] = ",".join(_short(e.digest) for e in images) or "none"
    active = ss.get(S.ACTIVE_IMAGE)
    if images and active and active != images[0].digest:
        out["image"] = _short(active)
    prep: S.PrepSpec = S.get(S.PREP)
    if prep.preset != "model":
        out["prep"] = prep.preset
        if prep.preset == "custom":
            out["mean"] = ",".join(_number(v) for v in prep.mean)
            out["std"] = ",".join(_number(v) for v in prep.std)
    if prep.fit != "crop":
        out["fit"] = prep.fit
    if settings.baseline != _DEFAULT.baseline:
        out["baseline"] = settings.baseline
    if settings.constant != _DEFAULT.constant:
        out["constant"] = _number(settings.constant)
    if settings.blur_sigma != _DEFAULT.blur_sigma:
        out["sigma"] = _number(settings.blur_sigma)
    if settings.noise_seed != _DEFAULT.noise_seed:
        out["seed"] = str(int(settings.noise_seed))
    if settings.method != _DEFAULT.method:
        out["method"] = settings.method
    if settings.n_steps != _DEFAULT.n_steps:
        out["steps"] = str(int(settings.n_steps))
    if settings.tolerance is not None:
        out["auto"] = "1"
    out.update(_page_params())

    waiting = ss.get(IMAGES_PENDING)
    if waiting:  # the link's images missing here stay in the address until uploaded again
        have = [e.digest for e in images]
        missing = [p for p in waiting["missing"] if not any(d.startswith(p) for d in have)]
        if missing:
            out["images"] = ",".join([_short(d) for d in have] + missing)
        if waiting["active"]:
            out["image"] = waiting["active"]

    pending = ss.get(PENDING)
    if pending:  # the link's model is missing here: its parts stay in the address
        for name in MODEL_PARAMS:
            out.pop(name, None)
        out.update(pending["params"])
    return {name: out[name] for name in PARAMS if name in out}


def _page_params() -> dict[str, str]:
    """The pages' own view settings (tolerance, sweep, channel grid, presentation mode,
    gradient maps) that differ from their defaults."""
    out: dict[str, str] = {}
    tolerance = float(S.get(S.TOLERANCE))
    if tolerance != S.DEFAULTS[S.TOLERANCE]:
        out["tol"] = _number(tolerance * 100.0)
    sweep: S.SweepSettings = S.get(S.SWEEP)
    default_sweep = S.SweepSettings()
    if sweep.methods != default_sweep.methods:
        out["sweep"] = ",".join(sweep.methods) or "none"
    if sweep.steps != default_sweep.steps:
        out["sweep_steps"] = ",".join(str(int(s)) for s in sweep.steps) or "none"
    if not sweep.relative:
        out["sweep_abs"] = "1"
    grid: S.GridView = S.get(S.GRID)
    default_grid = S.GridView()
    if grid.rank != default_grid.rank and grid.rank in RANKINGS:
        out["rank"] = grid.rank
    if grid.top_k != default_grid.top_k:
        out["top"] = str(int(grid.top_k))
    if grid.page_size != default_grid.page_size and grid.page_size in TILE_SIZES:
        out["tiles"] = str(int(grid.page_size))
    if grid.page != default_grid.page:
        out["tile_page"] = str(int(grid.page))
    if grid.filter.strip():
        try:  # a filter the page cannot read (it shows every channel then) is not written
            out["only"] = _channel_filter(grid.filter)
        except ValueError:
            pass
    if S.get(S.PRESENTATION):
        out["present"] = "1"
    if S.get(S.GRADIENT_RANGE) == "full":
        out["range"] = "full"
    if S.get(S.GRADIENT_ZOOM):
        out["zoom"] = "1"
    return out


def _samples() -> list[S.ImageEntry]:
    """The shipped sample images (unreadable ones are left out; the pages say so)."""
    entries = []
    for path in sample_image_paths():
        try:
            data = path.read_bytes()
        except OSError:
            continue
        entries.append(S.ImageEntry(path.name, hashlib.sha256(data).hexdigest(), data, "sample"))
    return entries


def _sample_digests() -> list[str]:
    return [e.digest for e in _samples()]


def _are_default_samples(images: list[S.ImageEntry]) -> bool:
    if not images or any(e.source != "sample" for e in images):
        return False
    return [e.digest for e in images] == _sample_digests()


def write_view() -> None:
    """Put the current view into the address (only when it changed)."""
    try:
        params = view_params()
    except Exception:  # noqa: BLE001 - a view that cannot be written must not break the page
        LOG.exception("Could not write the view into the address")
        return
    if st.query_params.to_dict() != params:  # Streamlit keeps its own embed parameters
        st.query_params.from_dict(params)


# --- restoring: parameters to session state -----------------------------------------------------
def _find(prefix: str, kind: str, store: persist.UploadStore) -> persist.Stored | str:
    """The stored entry for a link's digest prefix, or the reason it cannot be used."""
    matches = store.find(prefix)
    if len(matches) > 1:
        return "ambiguous"
    if not matches:
        return "missing"
    entry = store.get(matches[0], kind=kind)
    return entry if entry is not None else "missing"


def _store() -> persist.UploadStore | None:
    try:
        return persist.default_store()
    except persist.StoreError as exc:
        _note(md(exc))
        return None


def _note(text: str) -> None:
    notes = list(st.session_state.get(NOTES) or [])
    if text not in notes:
        notes.append(text)
    st.session_state[NOTES] = notes


def restore_once() -> bool:
    """On a session's first run, turn the link in the address into session state.

    Returns True when the address held a view. What cannot be shown is listed by
    :func:`show_notes`; the parts that need the link's model are applied by
    :func:`apply_model_view` once the model is loaded. On the later runs, a link's image that
    was missing and has been uploaded again becomes the explained image
    (:func:`_complete_images`).
    """
    ss = st.session_state
    if ss.get(RESTORED):
        _complete_images()
        return False
    ss[RESTORED] = True
    params = st.query_params.to_dict()
    if not any(name in PARAMS for name in params):
        return False
    values, notes = parse(params)
    for note in notes:
        _note(note)
    store = _store()
    _restore_settings(values)
    _restore_images(values, store)
    _restore_model(values, params, store)
    return True


def _restore_settings(values: dict[str, Any]) -> None:
    old: S.AttributionSettings = S.get(S.SETTINGS)
    st.session_state[S.SETTINGS] = replace(
        old,
        baseline=values.get("baseline", old.baseline),
        constant=values.get("constant", old.constant),
        blur_sigma=values.get("sigma", old.blur_sigma),
        noise_seed=values.get("seed", old.noise_seed),
        method=values.get("method", old.method),
        n_steps=values.get("steps", old.n_steps),
    )
    preset = values.get("prep")
    if preset is not None:
        spec: S.PrepSpec = S.get(S.PREP)
        mean, std = values.get("mean", spec.mean), values.get("std", spec.std)
        if preset == "custom" and len(mean) != len(std):
            _note("The link's custom mean and std have different lengths; they were left out.")
            mean, std = spec.mean, spec.std
        st.session_state[S.PREP] = S.PrepSpec(preset, tuple(mean), tuple(std))
    fit = values.get("fit")
    if fit is not None:
        st.session_state[S.PREP] = replace(S.get(S.PREP), fit=fit)
    _restore_page_settings(values)


def _restore_page_settings(values: dict[str, Any]) -> None:
    """The pages' own settings; the tile page and filter wait for the layer
    (:func:`apply_model_view`)."""
    ss = st.session_state
    if "tol" in values:
        ss[S.TOLERANCE] = values["tol"]
    if values.get("auto"):
        ss[S.SETTINGS] = replace(S.get(S.SETTINGS), tolerance=float(S.get(S.TOLERANCE)))
    sweep: S.SweepSettings = S.get(S.SWEEP)
    ss[S.SWEEP] = replace(
        sweep,
        methods=values.get("sweep", sweep.methods),
        steps=values.get("sweep_steps", sweep.steps),
        relative=not values["sweep_abs"] if "sweep_abs" in values else sweep.relative,
    )
    grid: S.GridView = S.get(S.GRID)
    ss[S.GRID] = replace(
        grid,
        rank=values.get("rank", grid.rank),
        top_k=values.get("top", grid.top_k),
        page_size=values.get("tiles", grid.page_size),
    )
    if "range" in values:
        ss[S.GRADIENT_RANGE] = values["range"]
    if "zoom" in values:
        ss[S.GRADIENT_ZOOM] = values["zoom"]
    if values.get("present"):
        ss[S.PRESENTATION] = True
        # This run's page setup came before the link was read: present from this run on.
        st.set_page_config(initial_sidebar_state=presentation.sidebar_state())
        presentation.apply()


def _restore_images(values: dict[str, Any], store: persist.UploadStore | None) -> None:
    if "images" not in values:
        wanted_active = values.get("image")
        if wanted_active:
            samples = _samples()
            st.session_state[S.IMAGES] = samples
            match = [e for e in samples if e.digest.startswith(wanted_active)]
            if match:
                st.session_state[S.ACTIVE_IMAGE] = match[0].digest
        return
    samples = {e.digest: e for e in _samples()}
    images: list[S.ImageEntry] = []
    lost: list[str] = []
    for prefix in values["images"]:
        sample = next((e for d, e in samples.items() if d.startswith(prefix)), None)
        if sample is not None:
            images.append(sample)
            continue
        found = _find(prefix, "image", store) if store is not None else "missing"
        if isinstance(found, persist.Stored):
            images.append(S.ImageEntry(found.name, found.digest, found.data, source="upload"))
        else:
            lost.append(prefix)
    notes: list[str] = []
    if lost:
        missing, total = len(lost), len(values["images"])
        which = "The image" if total == 1 else f"{missing} of the {total} images"
        them = "it" if missing == 1 else "them"
        fallback = ""
        if not images:
            images = list(samples.values())
            fallback = " The sample images are shown meanwhile."
        notes.append(
            f"**{which} in this link {'is' if missing == 1 else 'are'} no longer on this server**; "
            f"upload {them} again on the Model & images page to see the view.{fallback} The "
            "other parts of the view are kept."
        )
    st.session_state[S.IMAGES] = images
    # The explained image: the link's ``image``, or else its first image.
    wanted = values.get("image") or (values["images"][0] if values["images"] else None)
    chosen = next((e for e in images if wanted and e.digest.startswith(wanted)), None)
    waiting = None
    if wanted and chosen is None:
        waiting = wanted
        if wanted not in lost:
            lost.append(wanted)
        if images:
            notes.append(
                "The image the link explains is not on this server; the first image is shown "
                "until you upload it again."
            )
    if chosen is None and images:
        chosen = images[0]
    st.session_state[S.ACTIVE_IMAGE] = chosen.digest if chosen else None
    for note in notes:
        _note(note)
    if lost:
        st.session_state[IMAGES_PENDING] = {
            "missing": lost,
            "active": waiting,
            "notes": notes,
            "order": tuple(values["images"]),
        }


def _link_rank(digest: str, order: tuple[str, ...]) -> int | None:
    """The place of an image in the link's order of images, or ``None`` when the link lacks it."""
    return next((i for i, prefix in enumerate(order) if digest.startswith(prefix)), None)


def _in_link_order(
    images: list[S.ImageEntry], order: tuple[str, ...], returned: list[str]
) -> list[S.ImageEntry]:
    """``images`` with each image of ``returned`` (digest prefixes) moved to its place in the
    link's ``order``: just after the nearest earlier image of the link that is in the list, or
    else just before the nearest later one. Images the link does not name keep their places."""
    out = list(images)
    for prefix in sorted(returned, key=lambda p: order.index(p) if p in order else len(order)):
        if prefix not in order:
            continue
        entry = next((e for e in out if e.digest.startswith(prefix)), None)
        if entry is None:
            continue
        rank = order.index(prefix)
        out.remove(entry)
        ranks = [_link_rank(e.digest, order) for e in out]
        earlier = [i for i, r in enumerate(ranks) if r is not None and r < rank]
        later = [i for i, r in enumerate(ranks) if r is not None and r > rank]
        if earlier:
            out.insert(earlier[-1] + 1, entry)
        elif later:
            out.insert(later[0], entry)
        else:
            out.insert(images.index(entry), entry)
    return out


def _complete_images() -> None:
    """Put each of the link's missing images that is uploaded again back in its place in the
    link's order of images, and make the link's explained image active once it is back; forget
    the link's missing images once every one of them is back (their messages go with them)."""
    ss = st.session_state
    waiting = ss.get(IMAGES_PENDING)
    if not waiting:
        return
    images = list(S.get(S.IMAGES) or [])
    have = [e.digest for e in images]
    returned = [p for p in waiting["missing"] if any(d.startswith(p) for d in have)]
    if returned and waiting.get("order"):
        placed = _in_link_order(images, tuple(waiting["order"]), returned)
        if [e.digest for e in placed] != have:
            ss[S.IMAGES] = placed
    active = waiting["active"]
    back = next((d for d in have if active and d.startswith(active)), None)
    if back is not None:
        ss[S.ACTIVE_IMAGE] = back
        active = None
        S.flash("success", "This is the image the link explains: it is explained again.")
    missing = [p for p in waiting["missing"] if not any(d.startswith(p) for d in have)]
    if missing or active:
        ss[IMAGES_PENDING] = {**waiting, "missing": missing, "active": active}
        return
    ss[IMAGES_PENDING] = None
    ss[NOTES] = [n for n in ss.get(NOTES) or [] if n not in waiting["notes"]]


def _model_part(values: dict[str, Any]) -> dict[str, Any]:
    return {name: values[name] for name in MODEL_PARAMS if name in values}


def _restore_model(
    values: dict[str, Any], params: Mapping[str, str], store: persist.UploadStore | None
) -> None:
    parts = _model_part(values)
    model = values.get("model", "builtin")
    if model == "builtin":
        parts.pop("model", None)
        st.session_state[S.MODEL] = S.ModelRef()
        st.session_state[APPLY] = {**parts, "digest": ""}
        return
    found = _find(model, "model", store) if store is not None else "missing"
    if isinstance(found, persist.Stored):
        st.session_state[S.MODEL] = S.ModelRef(
            kind="upload",
            digest=found.digest,
            filename=found.name,
            arch=values.get("arch"),
            num_classes=values.get("classes"),
            data=found.data,
        )
        st.session_state[APPLY] = {**parts, "digest": found.digest}
        return
    # Keep the link's model-dependent parts (as written) for when the file is uploaded again.
    raw = {n: str(params[n]) for n in MODEL_PARAMS if n in values and params.get(n) is not None}
    st.session_state[PENDING] = {"prefix": model, "values": parts, "params": raw}
    if found == "ambiguous":
        _note(
            "The model in this link matches more than one file on this server; upload it again "
            "to see the view. The built-in model is shown meanwhile."
        )
    else:
        _note(
            "**The model in this link is no longer on this server**; upload it again on the "
            "Model & images page to see the view (its layer, neuron and target are kept until "
            "then). The built-in model is shown meanwhile."
        )


def model_loaded(ref: S.ModelRef) -> None:
    """Call when the user loads a model: it completes a link whose model was missing, or
    replaces that link's model (its waiting parts are dropped)."""
    ss = st.session_state
    pending = ss.get(PENDING)
    ss[PENDING] = None
    if not pending:
        return
    if ref.kind == "upload" and ref.digest.startswith(pending["prefix"]):
        ss[APPLY] = {**pending["values"], "digest": ref.digest}
        ss[NOTES] = []
        S.flash("success", "This is the model of the link: its view is restored.")


def apply_model_view(lm: Any) -> Any:
    """Apply the waiting model-dependent parts of a link to the loaded model ``lm``.

    The layer must exist in the model and be usable, the target must be one of its classes;
    each part that does not fit is dropped with a message. Returns ``lm`` (with the link's class
    names when they came with it).
    """
    ss = st.session_state
    parts = ss.get(APPLY)
    ref: S.ModelRef = S.get(S.MODEL)
    if not parts or parts.get("digest", "") != ref.digest:
        return lm
    ss[APPLY] = None
    store = None
    if parts.get("labels") and S.get(S.LABELS) is None:
        store = _store()
        lm = _apply_labels(parts["labels"], ref, lm, store)
    target = parts.get("target")
    if target is not None:
        if target < lm.num_classes:
            settings = S.get(S.SETTINGS)
            ss[S.SETTINGS] = replace(settings, target=target, position=parts.get("position"))
        else:
            _note(
                f"The link's target class #{target} does not exist in this model "
                f"({lm.num_classes} classes); the predicted class is explained instead."
            )
    elif parts.get("position") is not None:
        ss[S.SETTINGS] = replace(S.get(S.SETTINGS), position=parts["position"])
    layer = parts.get("layer")
    if layer is None:
        if parts.get("tile_page") is not None or parts.get("only") is not None:
            _note(
                "The link's tile page and channel filter belong to a layer the link does not "
                "name; they were left out."
            )
        return lm
    try:
        node = backend.tree(lm).nodes.get(layer)
    except ExplainerError as exc:
        _note(f"The link's layer could not be checked: {md(exc)}")
        return lm
    if node is None or not node.usable:
        reason = "is not in this model" if node is None else "cannot be explained"
        _note(
            f"The link's layer **{md(layer)}** {reason}; pick one on the Layer picker page. "
            "The other parts of the view are kept."
        )
        return lm
    S.set_layer(layer)
    if parts.get("layout") is not None:
        ss[LAYOUT_KEY] = {**(ss.get(LAYOUT_KEY) or {}), layer: parts["layout"]}
    if parts.get("tile_page") is not None or parts.get("only") is not None:
        grid: S.GridView = S.get(S.GRID)  # after set_layer, which starts a new layer's grid
        ss[S.GRID] = replace(
            grid, page=parts.get("tile_page", grid.page), filter=parts.get("only", grid.filter)
        )
    if parts.get("neuron") is not None:
        S.select_neuron(parts["neuron"])
    elif parts.get("channel") is not None:
        S.select_channel(parts["channel"])
    return lm


def _apply_labels(prefix: str, ref: S.ModelRef, lm: Any, store: Any) -> Any:
    from explainer.intake import load_labels

    found = _find(prefix, "labels", store) if store is not None else "missing"
    if not isinstance(found, persist.Stored):
        _note("The class names of this link are no longer on this server; numbers are shown.")
        return lm
    try:
        names = load_labels(found.data, num_classes=lm.num_classes)
    except ExplainerError as exc:
        _note(f"The class names of this link could not be used: {md(exc)}")
        return lm
    labels = S.LabelsOverride(found.name, tuple(names), digest=found.digest)
    st.session_state[S.LABELS] = labels
    return backend.resolve_model(ref, labels)


# --- the upload side ----------------------------------------------------------------------------
def keep_upload(data: bytes, kind: str, name: str) -> str | None:
    """Keep an upload in the store so links and reloads find it; ``None`` (with a note to the
    user) when it cannot be kept. The upload itself works either way."""
    try:
        return persist.default_store().put(data, kind=kind, name=name)
    except persist.StoreError as exc:
        S.flash("info", f"{md(name)}: {md(exc)}")
        return None


# --- messages -----------------------------------------------------------------------------------
def _dismiss() -> None:
    st.session_state[NOTES] = []
    st.session_state[PENDING] = None
    st.session_state[IMAGES_PENDING] = None


def show_notes() -> None:
    """What could not be shown of the link, until the user dismisses it."""
    notes = st.session_state.get(NOTES) or []
    if not notes:
        return
    with st.container(border=True):
        st.warning(
            "**This link could not be shown in full.**\n\n" + "\n".join(f"- {n}" for n in notes),
            icon=":material/link_off:",
        )
        label = "Keep the built-in model" if st.session_state.get(PENDING) else "Dismiss"
        st.button(label, key="_w_link_dismiss", on_click=_dismiss)
