"""The cached boundary between the pages and the compute tier.

Pages ask this module for models, input tensors and results; it answers from a process-wide cache
keyed by content digests (the model's sha256 plus its architecture, the image bytes' sha256, the
preprocessing, the layer and the settings), never by object identity. So a click that only changes
what is drawn never recomputes anything, a page visited again is served from the cache, and two
browser sessions looking at the same model and image share one copy of every result.

The web server never loads or runs a model itself. Models live in worker processes
(:class:`explainer.compute.LocalExecutor`, one per model, with the operator's memory and time
limits); this module sends them jobs (plain data and numpy arrays) and waits for the results,
which are plain dataclasses. While it waits, it keeps the page's progress bar up to date and
stops the job when the user moves on (a newer request reruns the page) or closes the tab.

- The executor lives in ``st.cache_resource``; the built-in model's worker starts with it.
- Results live in one bounded :class:`explainer.cache.ContentCache` (an LRU by entries and bytes)
  held in ``st.cache_resource``. ``get_or_compute`` runs each computation once per key even when
  sessions ask at the same time, and a failed or cancelled computation leaves no entry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import streamlit as st
import torch
from streamlit.runtime.scriptrunner import get_script_run_ctx

from explainer import analysis
from explainer.baselines import BASELINE_KINDS, make_baseline
from explainer.cache import ContentCache, digest
from explainer.compute import LocalExecutor, ModelSource
from explainer.errors import AttributionError, ExplainerError
from explainer.images import (
    FitLayout,
    Preprocessing,
    deprocess,
    fit_layout,
    fit_preview,
    load_image,
    mark_padding,
    preprocess,
)
from explainer.intake import ModelInfo
from explainer.tree import ModuleTree
from webapp.state import AttributionSettings, ImageEntry, LabelsOverride, ModelRef, PrepSpec

Progress = Callable[[int, int], None]

RESULT_CACHE_BYTES = 768 * 1024 * 1024
RESULT_CACHE_ENTRIES = 1024
BUILTIN = ModelSource("builtin")
"""The built-in demo model."""

FIRST_LOOK_STEPS = 4
"""Gauss-Legendre steps of a first look: a coarse map shown while the asked-for one is
refined in the background."""

# How often a waiting page checks its job's progress and whether the user moved on.
_POLL_S = 0.1
# A session-state key read while waiting: reading session state is where Streamlit stops a
# script whose user asked for a rerun or closed the tab.
_YIELD_KEY = "_compute_wait"


# --- shared resources ---------------------------------------------------------------------------
@st.cache_resource(show_spinner=False)
def result_cache() -> ContentCache:
    """The process-wide, bounded cache of computed results."""
    return ContentCache(max_bytes=RESULT_CACHE_BYTES, max_entries=RESULT_CACHE_ENTRIES)


@st.cache_resource(show_spinner=False)
def executor() -> LocalExecutor:
    """The process-wide pool of compute workers; the built-in model's worker starts at once."""
    pool = LocalExecutor()
    pool.submit(BUILTIN, "info")
    return pool


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """A model as the server knows it: its description and where a worker loads it from.

    Every attribute of :class:`~explainer.intake.ModelInfo` (``name``, ``arch``, ``labels``,
    ``input_size``...) reads through, so pages use it like the description itself. The module
    lives only in the model's worker process.
    """

    info: ModelInfo
    source: ModelSource

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.info, name)


def _source(ref: ModelRef) -> ModelSource:
    if ref.kind != "upload":
        return BUILTIN
    return ModelSource(
        kind="file",
        data=ref.data,
        filename=ref.filename,
        arch=ref.arch,
        num_classes=ref.num_classes,
        data_digest=ref.digest,  # computed once, when the file was uploaded
    )


def wait(handle: Any, progress: Progress | None = None) -> Any:
    """The result of a submitted job, reporting its progress while it runs.

    Inside a page run this polls: when the user reruns the page (a newer request) or closes the
    tab, Streamlit raises its stop exception here and the job is cancelled on the way out.
    """
    in_script = get_script_run_ctx(suppress_warning=True) is not None
    shown = None
    try:
        while True:
            try:
                value = handle.result(timeout=_POLL_S)
            except TimeoutError:
                value, finished = None, False
            else:
                finished = True
            current = handle.progress
            if progress is not None and current is not None and current != shown:
                shown = current
                progress(*current)
            if finished:
                return value
            if in_script:
                st.session_state.get(_YIELD_KEY)
    finally:
        if not handle.done():
            handle.cancel()


def run(
    lm: ServedModel,
    op: str,
    args: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
) -> Any:
    """Run ``op`` on ``lm``'s worker and wait for its result (see :func:`wait`)."""
    return wait(executor().submit(lm.source, op, args), progress)


def submit(lm: ServedModel, op: str, args: Mapping[str, Any] | None = None) -> Any:
    """Start ``op`` on ``lm``'s background worker and return its job handle at once."""
    return executor().submit(lm.source, op, args, background=True)


def resolve_model(ref: ModelRef, labels: LabelsOverride | None = None) -> ServedModel:
    """The model a :class:`ModelRef` names, with the user's labels applied.

    The first call for a model starts its worker, which loads the file with every intake check;
    the description it returns is cached.

    Raises
    ------
    explainer.errors.ModelLoadError
        When the file cannot be loaded with the chosen options (the worker is stopped).
    explainer.errors.WorkerLimitError
        When loading went over the worker's memory or time limit.
    """
    source = _source(ref)

    def load() -> ModelInfo:
        # A model that cannot load stops its own worker; nothing else to clean up here.
        return wait(executor().submit(source, "info"))

    key = digest("info", source.key)
    cache = result_cache()
    if key in cache or get_script_run_ctx(suppress_warning=True) is None:
        info = cache.get_or_compute(key, load)
    else:
        with st.spinner("Starting the model's worker and loading the model..."):
            info = cache.get_or_compute(key, load)
    if labels is not None and len(labels.labels) == info.num_classes:
        info = dataclasses.replace(info, labels=tuple(labels.labels))
    return ServedModel(info, source)


def model_key(lm: ServedModel) -> str:
    """Digest naming the computation a model performs: its source (the file's bytes and the
    loading options), as the server computed it, never what the model's worker reports."""
    return digest("model", lm.source.key)


# --- preprocessing and inputs -------------------------------------------------------------------
def preprocessing(spec: PrepSpec, lm: ServedModel) -> Preprocessing:
    """Turn the user's preset and fit mode into a :class:`~explainer.images.Preprocessing` for
    this model."""
    prep = _preset(spec, lm)
    return prep if spec.fit == "crop" else dataclasses.replace(prep, fit=spec.fit)


def _preset(spec: PrepSpec, lm: ServedModel) -> Preprocessing:
    """The preset's normalisation and geometry for this model (centre crop)."""
    channels, height, width = lm.input_size
    size = (height, width)
    if spec.preset == "imagenet":
        return Preprocessing.imagenet(size)
    if spec.preset == "none":
        return Preprocessing.none(size)
    if spec.preset == "custom":
        return Preprocessing.custom(spec.mean, spec.std, size, None)
    prep = Preprocessing.for_model(lm.input_size, lm.mean, lm.std)
    if prep.resize is not None and _scores_every_position(lm):
        # A map of the whole image is wanted, not of its centre: scale, do not crop.
        prep = dataclasses.replace(prep, resize=None)
    return prep


def _scores_every_position(lm: ServedModel) -> bool:
    """:func:`per_position`, False when the output cannot be read (said elsewhere)."""
    try:
        return per_position(lm)
    except ExplainerError:
        return False


def prep_key(prep: Preprocessing) -> str:
    """Digest of every preprocessing field (a frozen dataclass).

    The default fit mode, ``"crop"``, is left out: keys made before there was a choice stay.
    """
    fields = tuple(
        getattr(prep, f.name)
        for f in dataclasses.fields(prep)
        if f.name != "fit" or prep.fit != "crop"
    )
    return digest("prep", repr(fields))


def input_tensor(image: ImageEntry, prep: Preprocessing) -> torch.Tensor:
    """The image as a ``(1, C, H, W)`` float32 CPU tensor, ready for the model.

    Raises
    ------
    explainer.errors.ImageLoadError
        When the bytes are not a readable image.
    """
    key = digest("input", image.digest, prep_key(prep))
    return result_cache().get_or_compute(key, lambda: preprocess(load_image(image.data), prep))


def _array(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(device="cpu", dtype=torch.float32).numpy()


def display_image(image: ImageEntry, prep: Preprocessing) -> np.ndarray:
    """What the model sees, as an ``(H, W, 3)`` uint8 array (the preprocessed input, undone).

    Padding (fit mode ``"pad"``) is hatched, so it is not mistaken for part of the picture.
    """
    key = digest("display", image.digest, prep_key(prep))

    def compute() -> np.ndarray:
        pixels = deprocess(input_tensor(image, prep), prep)
        if prep.fit == "pad":
            layout = image_fit(image, prep)
            if any(layout.padding):
                pixels = mark_padding(pixels, layout.placed)
        return pixels

    return result_cache().get_or_compute(key, compute)


def image_fit(image: ImageEntry, prep: Preprocessing) -> FitLayout:
    """What ``prep`` cuts, pads or stretches of ``image`` (:func:`explainer.images.fit_layout`).

    Raises
    ------
    explainer.errors.ImageLoadError
        When the bytes are not a readable image.
    """
    key = digest("fit", image.digest, prep_key(prep))

    def compute() -> FitLayout:
        width, height = load_image(image.data).size
        return fit_layout(width, height, prep)

    return result_cache().get_or_compute(key, compute)


def fit_picture(image: ImageEntry, prep: Preprocessing, max_side: int = 240) -> np.ndarray:
    """A preview of what ``prep`` does to ``image``'s shape (:func:`explainer.images.fit_preview`):
    the cut parts shaded, or the padding hatched, or the stretched picture."""
    key = digest("fit_preview", image.digest, prep_key(prep), max_side)
    return result_cache().get_or_compute(
        key, lambda: fit_preview(load_image(image.data), prep, max_side)
    )


def validate_image(data: bytes) -> None:
    """Raise :class:`~explainer.errors.ImageLoadError` when ``data`` is not a readable image."""
    load_image(data)  # pixel limit: EXPLAINER_MAX_IMAGE_PIXELS (explainer.images)


# --- scores, predictions and structure ----------------------------------------------------------
def score_shape(lm: ServedModel) -> tuple[int, ...]:
    """The model's scores for one image: ``(classes,)``, or ``(classes, *positions)`` for a
    model that scores every output position.

    Taken from the loader when it could read it, else from one forward pass of a zero image in
    the model's worker (cached per model).

    Raises
    ------
    explainer.errors.AttributionError
        When the model's output is not class scores, with what to do about it.
    """
    if lm.output_shape is not None:
        return tuple(int(d) for d in lm.output_shape)
    key = digest("score-shape", model_key(lm))
    return result_cache().get_or_compute(key, lambda: tuple(run(lm, "score_shape")))


def per_position(lm: ServedModel) -> bool:
    """Whether the model scores every output position (e.g. a segmentation model)."""
    return len(score_shape(lm)) > 1


def scores(lm: ServedModel, image: ImageEntry, prep: Preprocessing) -> np.ndarray:
    """The model's scores for one image, ``(classes,)`` or ``(classes, *positions)``."""
    key = digest("scores", model_key(lm), image.digest, prep_key(prep))
    return result_cache().get_or_compute(
        key, lambda: run(lm, "scores", {"x": _array(input_tensor(image, prep))})
    )


def predictions(
    lm: ServedModel, image: ImageEntry, prep: Preprocessing, k: int = 5
) -> list[tuple[str, int, float]]:
    """Top-``k`` ``(label, index, value)`` for one image.

    The value is the softmax probability for class scores, and the share of output positions
    where the class scores highest for per-position scores (see
    :func:`explainer.analysis.rank_classes`).
    """
    key = digest("top", model_key(lm), image.digest, prep_key(prep), k, tuple(lm.labels))
    return result_cache().get_or_compute(
        key, lambda: analysis.rank_classes(scores(lm, image, prep), list(lm.labels), k=k)
    )


def predicted_class(lm: ServedModel, image: ImageEntry, prep: Preprocessing) -> int:
    """Index of the top class for one image (for per-position scores: the one covering most
    positions)."""
    return int(predictions(lm, image, prep, k=1)[0][1])


def score_view(
    lm: ServedModel, image: ImageEntry, prep: Preprocessing, target: analysis.Target
) -> np.ndarray:
    """The target class's scores over the output positions, for drawing.

    ``(L,)`` or ``(H, W)`` for one or two position dimensions; with more, the ``(H, W)`` plane
    through the target's position (its leading indices fixed). Class scores give ``(classes,)``.
    """
    values = scores(lm, image, prep)
    if not isinstance(target, tuple) or len(target) < 2:
        return values
    cls, position = int(target[0]), tuple(int(i) for i in target[1:])
    return values[(cls, *position[:-2])]


def tree(lm: ServedModel) -> ModuleTree:
    """The model's module tree, discovered with one forward pass of a zero input."""
    key = digest("tree", model_key(lm))
    return result_cache().get_or_compute(key, lambda: run(lm, "tree"))


def default_layer(lm: ServedModel) -> str | None:
    """The layer the app opens on: the deepest suggested layer that still has a spatial map.

    A layer that computes the model's output itself (the score layer of a model that scores
    every output position) is skipped: its conductance sits in the one explained unit. Falls
    back to the last suggested layer, then to the last usable one.
    """
    t = tree(lm)
    output_shapes = t.root.output_shapes
    spatial = [
        name
        for name in t.suggested
        if len(t.nodes[name].output_shapes) == 1
        and len(t.nodes[name].output_shapes[0]) == 4
        and t.nodes[name].output_shapes[0][2] * t.nodes[name].output_shapes[0][3] > 1
        and t.nodes[name].output_shapes != output_shapes
    ]
    if spatial:
        return spatial[-1]
    if t.suggested:
        return t.suggested[-1]
    usable = t.usable_names()
    return usable[-1] if usable else None


def check_layer(lm: ServedModel, name: str) -> None:
    """Raise :class:`~explainer.errors.AttributionError` if ``name`` is unknown or unusable."""
    t = tree(lm)
    node = t.nodes.get(name)
    if node is None:
        close = [n for n in t.usable_names() if name.lower() in n.lower()][:5]
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise AttributionError(
            f"The model has no layer named {name!r}.{hint} Pick one on the Layer picker page."
        )
    if not node.usable:
        raise AttributionError(
            f"Layer {name!r} ({node.type}) cannot be explained: {node.reason} "
            "Pick another layer; suggested layers are marked with a star."
        )


# --- attributions -------------------------------------------------------------------------------
def resolve_target(
    lm: ServedModel, image: ImageEntry, prep: Preprocessing, settings: AttributionSettings
) -> analysis.Target:
    """The output to explain, in full.

    The class is the user's choice, or the top class when none was made. For a model that
    scores every output position the target is ``(class, *position)``: the user's position,
    with every index left automatic (None) where that class scores highest (see
    :func:`explainer.analysis.default_target`).

    Raises
    ------
    explainer.errors.AttributionError
        For a class or a position outside the model's scores.
    """
    cls = predicted_class(lm, image, prep) if settings.target is None else int(settings.target)
    if not 0 <= cls < lm.num_classes:
        raise AttributionError(
            f"Target class {cls} is out of range: this model has {lm.num_classes} classes "
            f"(0 to {lm.num_classes - 1}). Choose a class from the list."
        )
    if not per_position(lm):
        return cls
    return analysis.default_target(scores(lm, image, prep), cls, settings.position)


def target_key(target: analysis.Target) -> int | tuple[int, ...]:
    """The full target as plain ints, for cache keys."""
    return tuple(int(i) for i in target) if isinstance(target, tuple) else int(target)


PROGRESS_CHUNKS = 8


def chunk_size(settings: AttributionSettings) -> int:
    """Path points per forward pass: the user's choice, else the path in about 8 chunks.

    Chunks bound memory and let the engine report progress as each one finishes; the result
    is the same for any chunk size.
    """
    if settings.internal_batch_size:
        return int(settings.internal_batch_size)
    steps = max(1, int(settings.n_steps))
    return max(1, -(-steps // PROGRESS_CHUNKS))


def _baseline_parts(settings: AttributionSettings) -> tuple[Any, ...]:
    """The settings that change the baseline tensor (and nothing else)."""
    if settings.baseline == "constant":
        return ("constant", round(float(settings.constant), 6))
    if settings.baseline == "blur":
        return ("blur", round(float(settings.blur_sigma), 6))
    if settings.baseline == "noise":
        return ("noise", int(settings.noise_seed))
    return (settings.baseline,)


def baseline_tensor(
    x: torch.Tensor, prep: Preprocessing, settings: AttributionSettings
) -> torch.Tensor:
    """The baseline for ``x`` that ``settings`` describe."""
    return make_baseline(
        settings.baseline,
        x,
        prep,
        value=float(settings.constant),
        seed=int(settings.noise_seed),
        blur_sigma=float(settings.blur_sigma),
    )


def baseline_previews(
    image: ImageEntry, prep: Preprocessing, settings: AttributionSettings
) -> dict[str, np.ndarray]:
    """What each baseline kind looks like for ``image`` with ``settings``' options (grey level,
    blur sigma, noise seed): ``kind -> (H, W, 3)`` uint8, the preprocessing undone. Light work
    on the server (no model runs); cached by content."""
    key = digest(
        "baseline previews",
        image.digest,
        prep_key(prep),
        float(settings.constant),
        float(settings.blur_sigma),
        int(settings.noise_seed),
    )

    def compute() -> dict[str, np.ndarray]:
        x = input_tensor(image, prep)
        previews = {}
        for kind in BASELINE_KINDS:
            base = make_baseline(
                kind,
                x,
                prep,
                value=float(settings.constant),
                seed=int(settings.noise_seed),
                blur_sigma=float(settings.blur_sigma),
            )
            previews[kind] = deprocess(base, prep)
        return previews

    return result_cache().get_or_compute(key, compute)


def _conductance_key(
    lm: ServedModel,
    image: ImageEntry,
    prep: Preprocessing,
    layer: str,
    target: analysis.Target,
    settings: AttributionSettings,
    method: str,
    n_steps: int,
) -> str:
    # internal_batch_size only trades memory for speed: it is not part of the key.
    return digest(
        "conductance",
        model_key(lm),
        image.digest,
        prep_key(prep),
        layer,
        target_key(target),
        _baseline_parts(settings),
        method,
        int(n_steps),
    )


def conductance(
    lm: ServedModel,
    image: ImageEntry,
    prep: Preprocessing,
    layer: str,
    settings: AttributionSettings,
    progress: Progress | None = None,
) -> analysis.ConductanceResult:
    """Layer conductance of ``layer`` for one image (computed once per content key).

    Raises
    ------
    explainer.errors.ExplainerError
        For an unusable layer, a target out of range, bad settings or an unreadable image.
    """
    target, key = _request(lm, image, prep, layer, settings)

    def compute() -> analysis.ConductanceResult:
        args = _conductance_args(image, prep, layer, target, settings)
        return run(lm, "conductance", args, progress)

    return result_cache().get_or_compute(key, compute)


def _conductance_args(
    image: ImageEntry,
    prep: Preprocessing,
    layer: str,
    target: analysis.Target,
    settings: AttributionSettings,
) -> dict[str, Any]:
    x = input_tensor(image, prep)
    base = baseline_tensor(x, prep, settings)
    return {
        "layer": layer,
        "x": _array(x),
        "target": target,
        "baseline": _array(base),
        "method": settings.method,
        "n_steps": int(settings.n_steps),
        "internal_batch_size": chunk_size(settings),
    } | (
        {"n_steps": "auto", "tolerance": float(settings.tolerance), "steps_cap": settings.n_steps}
        if settings.auto_steps
        else {}
    )


def first_look_settings(settings: AttributionSettings) -> AttributionSettings | None:
    """The cheap settings of a first look at ``settings``' map, or ``None`` when the asked-for
    map is about as cheap already (few steps)."""
    if int(settings.n_steps) <= 2 * FIRST_LOOK_STEPS:
        return None
    return dataclasses.replace(
        settings,
        method="gausslegendre",
        n_steps=FIRST_LOOK_STEPS,
        internal_batch_size=None,
        tolerance=None,
    )


def start_conductance(
    lm: ServedModel,
    image: ImageEntry,
    prep: Preprocessing,
    layer: str,
    settings: AttributionSettings,
) -> Any:
    """Submit the conductance :func:`conductance` computes as a background job, without
    waiting: its job handle. The job runs on the model's background worker, so the page's
    clicks are answered while it runs; :func:`keep_result` stores its value under
    :func:`conductance_key`."""
    target, _ = _request(lm, image, prep, layer, settings)
    args = _conductance_args(image, prep, layer, target, settings)
    return submit(lm, "conductance", args)


def conductance_key(
    lm: ServedModel,
    image: ImageEntry,
    prep: Preprocessing,
    layer: str,
    settings: AttributionSettings,
) -> str:
    """The cache key of :func:`conductance`'s result (reads the scores when the target depends
    on them)."""
    return _request(lm, image, prep, layer, settings)[1]


def _request(
    lm: ServedModel,
    image: ImageEntry,
    prep: Preprocessing,
    layer: str,
    settings: AttributionSettings,
) -> tuple[analysis.Target, str]:
    """The target a conductance request explains and the cache key of its result."""
    target = resolve_target(lm, image, prep, settings)
    # Automatic steps: the method is not used, the tolerance and the cap on steps decide.
    method = f"auto<={float(settings.tolerance)!r}" if settings.auto_steps else settings.method
    key = _conductance_key(lm, image, prep, layer, target, settings, method, settings.n_steps)
    return target, key


def keep_result(key: str, value: Any) -> None:
    """Store a background job's result under its cache key."""
    result_cache().put(key, value)


def conductance_cached(
    lm: ServedModel,
    image: ImageEntry,
    prep: Preprocessing,
    layer: str,
    settings: AttributionSettings,
) -> analysis.ConductanceResult | None:
    """The conductance :func:`conductance` would return, if it was computed already, else
    ``None``. Never runs the model: where the target depends on scores that were not computed
    yet, the answer is ``None`` too."""
    if settings.target is None or per_position(lm):
        scores_key = digest("scores", model_key(lm), image.digest, prep_key(prep))
        if result_cache().get(scores_key) is None:
            return None
    target, key = _request(lm, image, prep, layer, settings)
    return result_cache().get(key)


def _gradient_keys(
    lm: ServedModel,
    image: ImageEntry,
    prep: Preprocessing,
    layer: str,
    neurons: list[tuple[int, ...]],
) -> list[str]:
    base_parts = (model_key(lm), image.digest, prep_key(prep), layer)
    return [digest("ngrad", *base_parts, tuple(int(i) for i in n)) for n in neurons]


def neuron_gradients(
    lm: ServedModel,
    image: ImageEntry,
    prep: Preprocessing,
    layer: str,
    neurons: list[tuple[int, ...]],
) -> list[analysis.NeuronGradientResult]:
    """Input gradients of several neurons; the ones not cached yet come from ONE batched call.

    Each neuron is cached on its own, so a neighbour shown as a thumbnail opens instantly.
    """
    cache = result_cache()
    keys = _gradient_keys(lm, image, prep, layer, neurons)
    found: dict[int, analysis.NeuronGradientResult] = {}
    missing: list[int] = []
    for i, key in enumerate(keys):
        hit = cache.get(key)
        if hit is None:
            missing.append(i)
        else:
            found[i] = hit
    if missing:
        args = {
            "layer": layer,
            "x": _array(input_tensor(image, prep)),
            "neurons": [tuple(int(j) for j in neurons[i]) for i in missing],
        }
        computed = run(lm, "neuron_gradients", args)
        if len(computed) != len(missing):
            raise AttributionError("The worker returned the wrong number of neuron gradients.")
        for i, result in zip(missing, computed, strict=True):
            cache.put(keys[i], result)
            found[i] = result
    return [found[i] for i in range(len(neurons))]


PREFETCH_BYTES = 24 * 2**20
"""The most gradient bytes one prefetch may compute (a float32 copy of the input per neuron)."""


@dataclasses.dataclass
class GradientPrefetch:
    """A background job computing the input gradients of neurons the user may click next.

    Attributes
    ----------
    keys : list of str
        The cache key of each neuron's gradient, in the job's order.
    args : dict
        The worker's ``neuron_gradients`` arguments.
    handle : Any
        The job's :class:`explainer.compute.JobHandle` once :meth:`start` ran, else ``None``.
    kept : bool
        Whether its results went into the cache.
    """

    keys: list[str]
    args: dict[str, Any] = dataclasses.field(repr=False)
    handle: Any = dataclasses.field(default=None, repr=False)
    kept: bool = False

    def start(self, lm: ServedModel) -> GradientPrefetch:
        """Submit the job to ``lm``'s background worker (an interactive request pauses it)."""
        self.handle = submit(lm, "neuron_gradients", self.args)
        return self

    @property
    def pending(self) -> bool:
        """Whether the job runs (or waits to run) and its results are not in the cache yet."""
        return self.handle is not None and not self.kept and not self.handle.done()

    def cancel(self) -> None:
        if self.pending:
            self.handle.cancel()

    def collect(self) -> bool:
        """Store the gradients of a finished job in the cache; whether they are stored."""
        if self.kept:
            return True
        if self.handle is None or not self.handle.done():
            return False
        try:
            computed = self.handle.result(timeout=0)
        except Exception:  # noqa: BLE001 - cancelled or failed: a click computes its own
            return False
        if len(computed) != len(self.keys):
            return False
        cache = result_cache()
        for key, result in zip(self.keys, computed, strict=True):
            cache.put(key, result)
        self.kept = True
        return True


def prefetch_limit(image: ImageEntry, prep: Preprocessing) -> int:
    """How many neurons' gradients one prefetch may compute for this input
    (:data:`PREFETCH_BYTES` over a float32 copy of the input each)."""
    return PREFETCH_BYTES // (4 * input_tensor(image, prep).numel())


def plan_gradient_prefetch(
    lm: ServedModel,
    image: ImageEntry,
    prep: Preprocessing,
    layer: str,
    neurons: list[tuple[int, ...]],
) -> GradientPrefetch | None:
    """The prefetch of the gradients :func:`neuron_gradients` would give for ``neurons`` that
    are not cached yet (not started); ``None`` when they all are, or when computing them all
    would take more than :data:`PREFETCH_BYTES` (a model with large inputs)."""
    if not 0 < len(neurons) <= prefetch_limit(image, prep):
        return None
    x = input_tensor(image, prep)
    keys = _gradient_keys(lm, image, prep, layer, neurons)
    cache = result_cache()
    missing = [i for i, key in enumerate(keys) if key not in cache]
    if not missing:
        return None
    args = {
        "layer": layer,
        "x": _array(x),
        "neurons": [tuple(int(j) for j in neurons[i]) for i in missing],
    }
    return GradientPrefetch([keys[i] for i in missing], args)


def activation(lm: ServedModel, image: ImageEntry, prep: Preprocessing, layer: str) -> np.ndarray:
    """The layer's output for one image (batch dimension dropped)."""
    key = digest("activation", model_key(lm), image.digest, prep_key(prep), layer)
    return result_cache().get_or_compute(
        key, lambda: run(lm, "activation", {"layer": layer, "x": _array(input_tensor(image, prep))})
    )


def _sweep_key(
    lm: ServedModel,
    image: ImageEntry,
    prep: Preprocessing,
    layer: str,
    target: analysis.Target,
    settings: AttributionSettings,
    methods: tuple[str, ...],
    steps: tuple[int, ...],
) -> str:
    return digest(
        "sweep",
        model_key(lm),
        image.digest,
        prep_key(prep),
        layer,
        target_key(target),
        _baseline_parts(settings),
        tuple(methods),
        tuple(int(s) for s in steps),
    )


def sweep(
    lm: ServedModel,
    image: ImageEntry,
    prep: Preprocessing,
    layer: str,
    settings: AttributionSettings,
    methods: tuple[str, ...],
    steps: tuple[int, ...],
    progress: Progress | None = None,
) -> list[analysis.ConvergencePoint]:
    """Convergence delta for each method and step count."""
    target = resolve_target(lm, image, prep, settings)
    key = _sweep_key(lm, image, prep, layer, target, settings, methods, steps)

    def compute() -> list[analysis.ConvergencePoint]:
        x = input_tensor(image, prep)
        base = baseline_tensor(x, prep, settings)
        args = {
            "layer": layer,
            "x": _array(x),
            "target": target,
            "baseline": _array(base),
            "methods": tuple(methods),
            "steps": tuple(int(n) for n in steps),
        }
        return run(lm, "sweep", args, progress)

    return result_cache().get_or_compute(key, compute)


def sweep_cached(
    lm: ServedModel,
    image: ImageEntry,
    prep: Preprocessing,
    layer: str,
    settings: AttributionSettings,
    methods: tuple[str, ...],
    steps: tuple[int, ...],
) -> list[analysis.ConvergencePoint] | None:
    """The sweep if it was computed already, else ``None`` (never computes)."""
    target = resolve_target(lm, image, prep, settings)
    return result_cache().get(_sweep_key(lm, image, prep, layer, target, settings, methods, steps))


# --- layer overview and comparisons -------------------------------------------------------------
def overview_plan(lm: ServedModel) -> tuple[list[str], str]:
    """The layers the overview shows for ``lm`` and the rule that chose them, in words (see
    :func:`explainer.overview.overview_layers`)."""
    from explainer.overview import overview_layers

    key = digest("overview-plan", model_key(lm))
    return result_cache().get_or_compute(key, lambda: overview_layers(tree(lm)))


def _overview_key(
    lm: ServedModel,
    image: ImageEntry,
    prep: Preprocessing,
    layers: list[str],
    target: analysis.Target,
    settings: AttributionSettings,
) -> str:
    return digest(
        "overview",
        model_key(lm),
        image.digest,
        prep_key(prep),
        tuple(layers),
        target_key(target),
        _baseline_parts(settings),
        settings.method,
        int(settings.n_steps),
    )


def layer_overview(
    lm: ServedModel,
    image: ImageEntry,
    prep: Preprocessing,
    settings: AttributionSettings,
    progress: Progress | None = None,
) -> Any:
    """Conductance summaries of the overview's layers, from one pass along the path.

    Returns an :class:`explainer.overview.LayerOverview`, computed once per content key.
    """
    layers, _ = overview_plan(lm)
    target = resolve_target(lm, image, prep, settings)
    key = _overview_key(lm, image, prep, layers, target, settings)

    def compute() -> Any:
        x = input_tensor(image, prep)
        args = {
            "layers": list(layers),
            "x": _array(x),
            "target": target,
            "baseline": _array(baseline_tensor(x, prep, settings)),
            "method": settings.method,
            "n_steps": int(settings.n_steps),
            "internal_batch_size": chunk_size(settings),
        }
        result = run(lm, "layer_overview", args, progress)
        if [s.layer for s in result.layers] != list(layers):
            raise AttributionError("The worker answered for other layers than were asked for.")
        return result

    return result_cache().get_or_compute(key, compute)


def layer_overview_cached(
    lm: ServedModel, image: ImageEntry, prep: Preprocessing, settings: AttributionSettings
) -> Any:
    """The overview if it was computed already, else ``None`` (never computes)."""
    layers, _ = overview_plan(lm)
    target = resolve_target(lm, image, prep, settings)
    return result_cache().get(_overview_key(lm, image, prep, layers, target, settings))


def random_conductance(
    lm: ServedModel,
    image: ImageEntry,
    prep: Preprocessing,
    layer: str,
    settings: AttributionSettings,
    progress: Progress | None = None,
) -> analysis.ConductanceResult:
    """Layer conductance of ``layer`` in a copy of the model whose weights are shuffled with a
    fixed seed (:func:`explainer.randomise.randomised_copy`), for the same target as the model.

    The copy lives in the model's worker; the served model is never changed.
    """
    from explainer.randomise import RANDOM_SEED

    target = resolve_target(lm, image, prep, settings)
    key = digest(
        "random-conductance",
        RANDOM_SEED,
        _conductance_key(
            lm, image, prep, layer, target, settings, settings.method, settings.n_steps
        ),
    )

    def compute() -> analysis.ConductanceResult:
        x = input_tensor(image, prep)
        args = {
            "layer": layer,
            "x": _array(x),
            "target": target,
            "baseline": _array(baseline_tensor(x, prep, settings)),
            "method": settings.method,
            "n_steps": int(settings.n_steps),
            "seed": RANDOM_SEED,
            "internal_batch_size": chunk_size(settings),
        }
        return run(lm, "random_conductance", args, progress)

    return result_cache().get_or_compute(key, compute)


# --- the neuron card (explainer.checks) ---------------------------------------------------------
RANDOMISATION_STEPS = 16
"""Most integration steps per map of the randomisation test (it computes one map per stage)."""


def _card_parts(
    lm: ServedModel,
    image: ImageEntry,
    prep: Preprocessing,
    layer: str,
    target: analysis.Target,
    settings: AttributionSettings,
) -> tuple[Any, ...]:
    return (
        model_key(lm),
        image.digest,
        prep_key(prep),
        layer,
        target_key(target),
        _baseline_parts(settings),
    )


def neuron_conductance(
    lm: ServedModel,
    image: ImageEntry,
    prep: Preprocessing,
    layer: str,
    neuron: tuple[int, ...],
    settings: AttributionSettings,
    progress: Progress | None = None,
) -> Any:
    """The neuron's conductance per input value (an
    :class:`explainer.checks.NeuronConductanceResult`), with the settings' target, baseline,
    rule and steps; computed once per content key."""
    target = resolve_target(lm, image, prep, settings)
    chosen = tuple(int(i) for i in neuron)
    parts = _card_parts(lm, image, prep, layer, target, settings)
    key = digest("neuron-conductance", *parts, chosen, settings.method, int(settings.n_steps))

    def compute() -> Any:
        x = input_tensor(image, prep)
        args = {
            "layer": layer,
            "x": _array(x),
            "target": target,
            "baseline": _array(baseline_tensor(x, prep, settings)),
            "neuron": chosen,
            "method": settings.method,
            "n_steps": int(settings.n_steps),
            "internal_batch_size": chunk_size(settings),
        }
        result = run(lm, "neuron_conductance", args, progress)
        if tuple(result.neuron) != chosen or result.attributions.shape != x.shape[1:]:
            raise AttributionError("The worker answered for another neuron than was asked for.")
        return result

    return result_cache().get_or_compute(key, compute)


def ablation(
    lm: ServedModel,
    image: ImageEntry,
    prep: Preprocessing,
    layer: str,
    settings: AttributionSettings,
    variants: list[list[tuple[int, ...]]],
) -> Any:
    """The scores with units of ``layer`` zeroed, one variant per list of units (an
    :class:`explainer.checks.AblationResult`); ``(c,)`` zeroes a channel, ``(c, y, x)`` one
    neuron."""
    target = resolve_target(lm, image, prep, settings)
    chosen = [[tuple(int(i) for i in unit) for unit in units] for units in variants]
    key = digest(
        "ablate",
        model_key(lm),
        image.digest,
        prep_key(prep),
        layer,
        target_key(target),
        tuple(tuple(units) for units in chosen),
    )

    def compute() -> Any:
        args = {
            "layer": layer,
            "x": _array(input_tensor(image, prep)),
            "target": target,
            "variants": chosen,
        }
        result = run(lm, "ablate", args)
        if len(result.zeroed) != len(chosen) or result.ablated.shape[0] != len(chosen):
            raise AttributionError("The worker answered for other units than were asked for.")
        return result

    return result_cache().get_or_compute(key, compute)


def flip_search(
    lm: ServedModel,
    image: ImageEntry,
    prep: Preprocessing,
    layer: str,
    settings: AttributionSettings,
    progress: Progress | None = None,
    channel_axis: int = 0,
) -> Any:
    """How many channels of ``layer``, zeroed by decreasing conductance, change the predicted
    class (an :class:`explainer.checks.FlipResult`); the ranking is the layer conductance the
    settings describe (:func:`conductance`, usually cached).

    ``channel_axis`` is the output dimension (without the batch dimension) that holds the
    channels, as :attr:`explainer.layout.Layout.channel_axis` says: the ranking sums the
    conductance over every other dimension, and the search zeroes slices along it."""
    from explainer.checks import channel_order

    result = conductance(lm, image, prep, layer, settings)
    values = np.asarray(result.attributions, dtype=np.float64)
    axis = int(channel_axis)
    if not 0 <= axis < max(1, values.ndim):
        raise AttributionError(
            f"Layer {layer!r} has outputs shaped {values.shape}, without a dimension {axis} to "
            "take as channels; pick another layout."
        )
    if axis == 0:
        totals = result.channel_totals
    else:
        totals = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1).sum(axis=1)
    order = channel_order(totals)
    # The ranking's own key: automatic steps to another tolerance rank the channels anew.
    key = digest("flip", conductance_key(lm, image, prep, layer, settings), axis)

    def compute() -> Any:
        args = {
            "layer": layer,
            "x": _array(input_tensor(image, prep)),
            "target": result.target,
            "order": tuple(int(c) for c in order),
            "channel_axis": axis,
        }
        found = run(lm, "flip_search", args, progress)
        if int(found.channels) != len(order) or int(found.channel_axis) != axis:
            raise AttributionError("The worker answered for other channels than were asked for.")
        return found

    return result_cache().get_or_compute(key, compute)


def _randomisation_key(
    lm: ServedModel,
    image: ImageEntry,
    prep: Preprocessing,
    layer: str,
    neuron: tuple[int, ...],
    target: analysis.Target,
    settings: AttributionSettings,
) -> str:
    from explainer.checks import MAX_STAGES

    parts = _card_parts(lm, image, prep, layer, target, settings)
    steps = min(int(settings.n_steps), RANDOMISATION_STEPS)
    return digest("randomisation", *parts, tuple(neuron), settings.method, steps, MAX_STAGES, 0)


def randomisation(
    lm: ServedModel,
    image: ImageEntry,
    prep: Preprocessing,
    layer: str,
    neuron: tuple[int, ...],
    settings: AttributionSettings,
    progress: Progress | None = None,
) -> Any:
    """The cascading randomisation test of the neuron's conductance map (an
    :class:`explainer.checks.RandomisationResult`), at most :data:`RANDOMISATION_STEPS` steps
    per map. The weights are randomised in a copy inside the worker."""
    target = resolve_target(lm, image, prep, settings)
    chosen = tuple(int(i) for i in neuron)
    key = _randomisation_key(lm, image, prep, layer, chosen, target, settings)

    def compute() -> Any:
        x = input_tensor(image, prep)
        steps = min(int(settings.n_steps), RANDOMISATION_STEPS)
        args = {
            "layer": layer,
            "x": _array(x),
            "target": target,
            "baseline": _array(baseline_tensor(x, prep, settings)),
            "neuron": chosen,
            "method": settings.method,
            "n_steps": steps,
            "seed": 0,
            "internal_batch_size": max(1, -(-steps // 2)),
        }
        return run(lm, "randomisation", args, progress)

    return result_cache().get_or_compute(key, compute)


def randomisation_cached(
    lm: ServedModel,
    image: ImageEntry,
    prep: Preprocessing,
    layer: str,
    neuron: tuple[int, ...],
    settings: AttributionSettings,
) -> Any:
    """The randomisation test if it was computed already, else ``None`` (never computes)."""
    target = resolve_target(lm, image, prep, settings)
    chosen = tuple(int(i) for i in neuron)
    return result_cache().get(_randomisation_key(lm, image, prep, layer, chosen, target, settings))
