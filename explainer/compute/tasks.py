"""What a compute worker does: load one model, then answer operations on it with plain data.

This module is the same for every executor: a local worker process holds one
:class:`ModelSession`, and so would a cluster actor. Operations take plain data and numpy
arrays and return numpy arrays and the small result dataclasses of :mod:`explainer.analysis` and
:mod:`explainer.tree` (everything :mod:`explainer.compute.wire` can carry).

:func:`cancellable` makes a running computation stop at the next module it enters once its
event is set, so a superseded request ends within about one layer's time.
"""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.nn.modules.module import register_module_forward_pre_hook

from explainer import analysis
from explainer.compute.jobs import ModelSource
from explainer.errors import AttributionError, ExplainerError, JobCancelled
from explainer.hooks import any_module

__all__ = [
    "DEVICE_ENV",
    "OPERATIONS",
    "ModelSession",
    "cancellable",
    "info_problem",
    "load_source",
    "result_fits",
]

DEVICE_ENV = "EXPLAINER_DEVICE"
"""Where workers run models: ``auto`` (CUDA when available, the default), ``cpu`` or ``cuda``."""

Progress = Callable[[int, int], None]


def _device() -> torch.device:
    wanted = os.environ.get(DEVICE_ENV, "auto").strip().lower() or "auto"
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(wanted)
    except RuntimeError:
        raise AttributionError(
            f"The server setting {DEVICE_ENV}={wanted!r} names no device; use auto, cpu or cuda."
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AttributionError(
            f"The server setting {DEVICE_ENV}={wanted!r} asks for CUDA, which this machine lacks."
        )
    return device


def load_source(source: ModelSource) -> Any:
    """Load the model a source names with every intake check: a LoadedModel in eval mode."""
    from explainer.intake import load_demo_model, load_model

    if source.kind == "builtin":
        return load_demo_model()
    return load_model(
        source.data,
        filename=source.filename or None,
        arch=source.arch,
        num_classes=source.num_classes,
    )


@contextmanager
def cancellable(event: threading.Event) -> Iterator[None]:
    """While the block runs, every module forward in this process checks ``event`` first and
    raises :class:`~explainer.errors.JobCancelled` once it is set."""

    def check(module: torch.nn.Module, args: Any) -> None:
        if event.is_set():
            raise JobCancelled("The request was cancelled.")

    handle = register_module_forward_pre_hook(any_module(check))
    try:
        yield
    finally:
        handle.remove()


def _tensor(value: Any, name: str) -> torch.Tensor:
    if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
        raise AttributionError(f"The {name} must be an array of floats.")
    return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))


def _target(value: Any) -> analysis.Target:
    return tuple(int(i) for i in value) if isinstance(value, (tuple, list)) else int(value)


def _indices(value: Any, name: str) -> tuple[int, ...]:
    """A tuple of whole numbers (a neuron, a unit, a channel order) from the wire."""
    if isinstance(value, np.ndarray) and value.dtype.kind in "iu":
        value = value.tolist()
    if not isinstance(value, (tuple, list)) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in value
    ):
        raise AttributionError(f"The {name} must be a list of whole numbers.")
    return tuple(int(i) for i in value)


class ModelSession:
    """One loaded model and the operations a server may ask of it.

    Parameters
    ----------
    source : ModelSource
        The model to load (all intake checks apply).
    """

    def __init__(self, source: ModelSource) -> None:
        loaded = load_source(source)
        self.device = _device()
        self.model = loaded.model.to(self.device).eval()
        self.info = loaded.info()
        self._source = source
        # Operation "x" is the method "_x"; OPERATIONS lists them.
        self._operations: dict[str, Callable[..., Any]] = {
            op: getattr(self, f"_{op}") for op in OPERATIONS
        }

    def _copy_model(self) -> torch.nn.Module:
        """An independent copy of the model: a deep copy, or, for a model that cannot be
        deep-copied (an exported program), the same file loaded again."""
        try:
            return copy.deepcopy(self.model)
        except Exception:  # noqa: BLE001 - any copy failure: load the file once more
            return load_source(self._source).model.to(self.device).eval()

    def run(self, op: str, args: Mapping[str, Any], progress: Progress | None = None) -> Any:
        """Run operation ``op`` with ``args``; ``progress(done, total)`` where it reports it."""
        operation = self._operations.get(op)
        if operation is None:
            raise AttributionError(f"Unknown operation {op!r}.")
        return operation(progress=progress, **dict(args))

    # --- operations (keyword arguments are the wire arguments)
    def _info(self, progress: Progress | None = None) -> Any:
        return self.info

    def _zeros(self) -> torch.Tensor:
        return torch.zeros((1, *self.info.input_size), device=self.device)

    def _tree(self, progress: Progress | None = None) -> Any:
        from explainer.tree import module_tree

        return module_tree(self.model, self._zeros())

    def _score_shape(self, progress: Progress | None = None) -> tuple[int, ...]:
        return analysis.score_shape(self.model, self._zeros())

    def _scores(self, x: Any, progress: Progress | None = None) -> np.ndarray:
        return analysis.class_scores(self.model, _tensor(x, "image"))

    def _conductance(
        self,
        layer: str,
        x: Any,
        target: Any,
        baseline: Any,
        method: str,
        n_steps: Any,
        internal_batch_size: int | None = None,
        tolerance: Any = None,
        steps_cap: Any = None,
        progress: Progress | None = None,
    ) -> analysis.ConductanceResult:
        auto = n_steps == "auto"
        return analysis.compute_conductance(
            self.model,
            layer,
            _tensor(x, "image"),
            _target(target),
            _tensor(baseline, "baseline"),
            method=method,
            n_steps="auto" if auto else int(n_steps),
            internal_batch_size=internal_batch_size,
            progress=progress,
            tolerance=float(tolerance) if auto and tolerance is not None else None,
            steps_cap=int(steps_cap) if auto and steps_cap is not None else None,
        )

    def _neuron_gradients(
        self, layer: str, x: Any, neurons: Any, progress: Progress | None = None
    ) -> list[analysis.NeuronGradientResult]:
        chosen = [tuple(int(i) for i in n) for n in neurons]
        return analysis.compute_neuron_gradients(self.model, layer, _tensor(x, "image"), chosen)

    def _activation(self, layer: str, x: Any, progress: Progress | None = None) -> np.ndarray:
        return analysis.layer_activation(self.model, layer, _tensor(x, "image"))

    # --- the neuron card (explainer.checks)
    def _neuron_conductance(
        self,
        layer: str,
        x: Any,
        target: Any,
        baseline: Any,
        neuron: Any,
        method: str,
        n_steps: int,
        internal_batch_size: int | None = None,
        progress: Progress | None = None,
    ) -> Any:
        from explainer.checks import neuron_conductance_map

        return neuron_conductance_map(
            self.model,
            layer,
            _tensor(x, "image"),
            _target(target),
            _tensor(baseline, "baseline"),
            _indices(neuron, "neuron"),
            method=str(method),
            n_steps=int(n_steps),
            internal_batch_size=internal_batch_size,
            progress=progress,
        )

    def _ablate(
        self, layer: str, x: Any, target: Any, variants: Any, progress: Progress | None = None
    ) -> Any:
        from explainer.checks import ablate

        if not isinstance(variants, list) or not all(isinstance(v, list) for v in variants):
            raise AttributionError("ablate takes a list of lists of units to zero.")
        units = [[_indices(u, "unit") for u in v] for v in variants]
        return ablate(self.model, layer, _tensor(x, "image"), _target(target), units)

    def _flip_search(
        self,
        layer: str,
        x: Any,
        target: Any,
        order: Any,
        limit: int | None = None,
        channel_axis: int = 0,
        progress: Progress | None = None,
    ) -> Any:
        from explainer.checks import flip_search

        return flip_search(
            self.model,
            layer,
            _tensor(x, "image"),
            _target(target),
            list(_indices(order, "channel order")),
            limit=None if limit is None else int(limit),
            channel_axis=int(channel_axis),
            progress=progress,
        )

    def _randomisation(
        self,
        layer: str,
        x: Any,
        target: Any,
        baseline: Any,
        neuron: Any,
        method: str,
        n_steps: int,
        seed: int = 0,
        internal_batch_size: int | None = None,
        progress: Progress | None = None,
    ) -> Any:
        from explainer.checks import cascading_randomisation

        return cascading_randomisation(
            self.model,
            layer,
            _tensor(x, "image"),
            _target(target),
            _tensor(baseline, "baseline"),
            _indices(neuron, "neuron"),
            method=str(method),
            n_steps=int(n_steps),
            seed=int(seed),
            internal_batch_size=internal_batch_size,
            progress=progress,
            copy_model=self._copy_model,
        )

    def _sweep(
        self,
        layer: str,
        x: Any,
        target: Any,
        baseline: Any,
        methods: Any,
        steps: Any,
        progress: Progress | None = None,
    ) -> list[analysis.ConvergencePoint]:
        return analysis.convergence_sweep(
            self.model,
            layer,
            _tensor(x, "image"),
            _target(target),
            _tensor(baseline, "baseline"),
            [str(m) for m in methods],
            [int(s) for s in steps],
            progress=progress,
        )

    def _layer_overview(
        self,
        layers: Any,
        x: Any,
        target: Any,
        baseline: Any,
        method: str,
        n_steps: int,
        internal_batch_size: int | None = None,
        progress: Progress | None = None,
    ) -> Any:
        from explainer.overview import layer_overview

        if not isinstance(layers, list) or not all(isinstance(n, str) for n in layers):
            raise AttributionError("layer_overview takes a list of layer names.")
        return layer_overview(
            self.model,
            layers,
            _tensor(x, "image"),
            _target(target),
            _tensor(baseline, "baseline"),
            method=str(method),
            n_steps=int(n_steps),
            internal_batch_size=internal_batch_size,
            progress=progress,
        )

    def _random_conductance(
        self,
        layer: str,
        x: Any,
        target: Any,
        baseline: Any,
        method: str,
        n_steps: int,
        seed: int = 0,
        internal_batch_size: int | None = None,
        progress: Progress | None = None,
    ) -> analysis.ConductanceResult:
        """Layer conductance in a copy of the model with shuffled weights (the served model is
        never changed); the copy of the last seed asked for is kept for the next request."""
        from explainer.randomise import randomised_copy

        kept = getattr(self, "_randomised", None)
        if kept is None or kept[0] != int(seed):
            self._randomised = None  # free the old copy before making the new one
            kept = (int(seed), randomised_copy(self.model, int(seed), self._copy_model).eval())
            self._randomised = kept
        return analysis.compute_conductance(
            kept[1],
            layer,
            _tensor(x, "image"),
            _target(target),
            _tensor(baseline, "baseline"),
            method=method,
            n_steps=int(n_steps),
            internal_batch_size=internal_batch_size,
            progress=progress,
        )

    def _dataset_record(
        self,
        images: Any,
        targets: Any,
        layers: Any,
        baseline: Any,
        method: str,
        n_steps: Any,
        tolerance: Any = None,
        maps: bool = False,
        progress: Progress | None = None,
    ) -> list[dict[str, Any]]:
        """Dataset mode: one record per image (see :func:`explainer.batch.record.image_record`).

        An image the model cannot explain (NaN scores, a target out of range) gets a record
        of the reason instead, so the other images of the request are kept.
        """
        from explainer.batch.record import error_record, image_record

        if not isinstance(images, list) or not isinstance(targets, list):
            raise AttributionError("dataset_record takes a list of images and one of targets.")
        if len(images) != len(targets):
            raise AttributionError("dataset_record needs one target (or None) per image.")
        steps = n_steps if n_steps == "auto" else int(n_steps)
        records: list[dict[str, Any]] = []
        for done, (image, target) in enumerate(zip(images, targets, strict=True)):
            if progress is not None:
                progress(done, len(images))
            try:
                records.append(
                    image_record(
                        self.model,
                        self.info,
                        _tensor(image, "image"),
                        layers=[str(name) for name in layers],
                        target_class=None if target is None else int(target),
                        baseline=dict(baseline),
                        method=str(method),
                        n_steps=steps,
                        tolerance=None if tolerance is None else float(tolerance),
                        maps=bool(maps),
                    )
                )
            except JobCancelled:
                raise
            except ExplainerError as exc:
                if _out_of_memory(exc):
                    raise  # the worker's limits, not the image: the job fails, to be retried
                records.append(error_record(exc))
        if progress is not None:
            progress(len(images), len(images))
        return records


OPERATIONS: tuple[str, ...] = (
    "info",
    "tree",
    "score_shape",
    "scores",
    "conductance",
    "neuron_gradients",
    "activation",
    "sweep",
    "dataset_record",
    "neuron_conductance",
    "ablate",
    "flip_search",
    "randomisation",
    "layer_overview",
    "random_conductance",
)
"""The operations a :class:`ModelSession` answers."""


def _out_of_memory(exc: BaseException) -> bool:
    """Whether an allocation failure lies behind ``exc`` (the engine wraps them in its own
    message)."""
    cause: BaseException | None = exc
    while cause is not None:
        text = str(cause)
        if isinstance(cause, MemoryError) or (
            isinstance(cause, RuntimeError)
            and ("can't allocate memory" in text or "out of memory" in text.lower())
        ):
            return True
        cause = cause.__cause__
    return False


def _ints(value: Any, length: int | None = None) -> bool:
    return (
        isinstance(value, tuple)
        and (length is None or len(value) == length)
        and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)
    )


def _texts(value: Any, count: int, chars: int) -> bool:
    return (
        isinstance(value, tuple)
        and len(value) <= count
        and all(isinstance(t, str) and len(t) <= chars for t in value)
    )


def info_problem(info: Any) -> str | None:
    """Why a worker's description of its model cannot be trusted, or None.

    A worker runs an uploaded model, so the server checks what it reports before it uses it:
    the input size within the operator's limit (the server preprocesses images to it), the
    labels and classes within theirs, every field of the right type.
    """
    from explainer.intake.loaded import ModelInfo
    from explainer.limits import MAX_LABEL_CHARS, max_classes, max_input_pixels

    if not isinstance(info, ModelInfo):
        return "no model description"
    if not (_ints(info.input_size, 3) and all(info.input_size)):
        return "an input size that is not three positive whole numbers"
    channels, height, width = info.input_size
    if channels > 4 or height * width > max_input_pixels():
        return f"an input of {channels} x {height} x {width}"
    if not (1 <= len(info.labels) <= max_classes()):
        return f"{len(info.labels)} classes"
    if not _texts(info.labels, max_classes(), MAX_LABEL_CHARS):
        return "class names that are not short texts"
    floats = (*info.mean, *info.std)
    if not (len(info.mean) == len(info.std) == channels) or not all(
        isinstance(v, float) for v in floats
    ):
        return "a normalisation that does not match the input's channels"
    if not (isinstance(info.name, str) and len(info.name) <= 1000):
        return "a name that is not a short text"
    if not (isinstance(info.arch, str) and len(info.arch) <= 100):
        return "an architecture name that is not a short text"
    if not _texts(info.notes, 50, 4000):
        return "notes that are not short texts"
    if not (isinstance(info.num_params, int) and isinstance(info.sha256, str)):
        return "a parameter count or digest of the wrong kind"
    if info.static_batch is not None and not _ints((info.static_batch,)):
        return "a batch size that is not a whole number"
    if info.output_shape is not None and not (
        _ints(info.output_shape) and info.output_shape and info.output_shape[0] == len(info.labels)
    ):
        return "an output shape that does not match its classes"
    return None


def _overview_fits(value: Any) -> bool:
    from explainer.overview import LayerOverview, LayerSummary

    return isinstance(value, LayerOverview) and all(
        isinstance(v, LayerSummary) for v in value.layers
    )


def _check_result(value: Any, kind: str) -> bool:
    """Whether ``value`` is an :mod:`explainer.checks` result of class ``kind``, well formed."""
    from explainer import checks

    # By name, not isinstance: see checks.well_formed.
    return type(value).__name__ == kind and checks.well_formed(value)


def result_fits(op: str, value: Any) -> bool:
    """Whether a worker's result for ``op`` is of the kind that operation returns."""
    from explainer.intake.loaded import ModelInfo
    from explainer.tree import ModuleTree

    def all_of(kind: type) -> bool:
        return isinstance(value, list) and all(isinstance(v, kind) for v in value)

    checks: dict[str, Callable[[], bool]] = {
        "info": lambda: isinstance(value, ModelInfo),
        "tree": lambda: isinstance(value, ModuleTree),
        "score_shape": lambda: _ints(value) and len(value) >= 1,
        "scores": lambda: isinstance(value, np.ndarray) and value.dtype.kind == "f",
        "conductance": lambda: isinstance(value, analysis.ConductanceResult),
        "neuron_gradients": lambda: all_of(analysis.NeuronGradientResult),
        "activation": lambda: isinstance(value, np.ndarray),
        "sweep": lambda: all_of(analysis.ConvergencePoint),
        "dataset_record": lambda: all_of(dict),
        "neuron_conductance": lambda: _check_result(value, "NeuronConductanceResult"),
        "ablate": lambda: _check_result(value, "AblationResult"),
        "flip_search": lambda: _check_result(value, "FlipResult"),
        "randomisation": lambda: _check_result(value, "RandomisationResult"),
        "layer_overview": lambda: _overview_fits(value),
        "random_conductance": lambda: isinstance(value, analysis.ConductanceResult),
    }
    check = checks.get(op)
    return check is not None and check()
