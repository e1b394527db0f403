"""Scoped hooks that read (and, for gradients, re-root) what flows through chosen layers.

Hooks exist only inside :func:`tap_layers`; they are removed on exit, also when the forward
pass raises. They act only for the thread that opened the tap, so two threads explaining the
same shared model never see each other's tensors.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.nn import Module

from explainer.errors import AttributionError, AttributionTypeError

__all__ = [
    "LayerTap",
    "NeedsFullGraph",
    "StopForward",
    "any_module",
    "layer_label",
    "lone_tensor_index",
    "skippable",
    "tap_layers",
    "thread_bound",
    "with_tensor_at",
]

# What may sit next to the one tensor of a layer output that is still explained as that tensor.
_CARRIED = (int, float, bool, type(None), torch.SymInt, torch.SymFloat, torch.SymBool)


_THREAD_BOUND = "explainer_thread_bound"

H = TypeVar("H")


def thread_bound(hook: H) -> H:
    """Mark ``hook`` as one that acts only for the thread that registered it (the hook checks
    the thread itself). Code that rebuilds a model for one thread (batch-norm folding) may
    leave such a hook's module out: the hook would do nothing there."""
    setattr(hook, _THREAD_BOUND, True)
    return hook


_ANY_MODULE = "explainer_any_module"


def any_module(hook: H) -> H:
    """Mark ``hook`` (a hook on every module) as one that does not depend on which modules run:
    a cancellation check, say. Batch-norm folding may run fewer modules under it."""
    setattr(hook, _ANY_MODULE, True)
    return hook


def skippable(hook: Any) -> bool:
    """Whether a model rebuilt without ``hook``'s module (or with fewer modules, for a hook on
    every module) still does what the hook's owner needs: a hook marked with
    :func:`thread_bound` or :func:`any_module`."""
    return any(getattr(hook, mark, False) is True for mark in (_THREAD_BOUND, _ANY_MODULE))


class NeedsFullGraph(BaseException):
    """Raised by a root hook when a tapped tensor existed before its layer ran (a layer input,
    or an output passed straight through): uses of it that came earlier were not recorded, so
    the pass must be redone with the whole graph recorded."""


class StopForward(BaseException):
    """Raised from a hook to end a forward pass once the layer has been read.

    A ``BaseException`` so that a model's own ``except Exception`` cannot swallow it.
    """


def layer_label(layer: Module, root: Any = None) -> str:
    """A readable name for ``layer``: its dotted path inside ``root`` when found."""
    if isinstance(root, Module):
        for name, module in root.named_modules():
            if module is layer:
                return (
                    f"'{name}' ({type(layer).__name__})"
                    if name
                    else f"the root module ({type(layer).__name__})"
                )
    return f"a {type(layer).__name__} layer"


def lone_tensor_index(value: Any) -> int | None:
    """Where the one tensor of a list or tuple sits when its other items are numbers or None.

    A submodule of an exported program rebuilt by ``torch.export.unflatten`` returns such a list:
    its output tensor next to sizes (e.g. the batch size) that later parts of the graph read;
    torchvision's attention blocks return ``(tensor, None)``. The tensor is the layer's output
    and what is explained; the other items are passed on unchanged. ``None`` for anything else,
    including a plain tensor and a sequence of tensors only.
    """
    if not isinstance(value, (tuple, list)):
        return None
    found = [i for i, v in enumerate(value) if isinstance(v, Tensor)]
    if len(found) != 1 or len(value) == 1:
        return None
    if not all(isinstance(v, _CARRIED) for i, v in enumerate(value) if i != found[0]):
        return None
    return found[0]


def with_tensor_at(value: list | tuple, index: int, tensor: Tensor) -> Any:
    """``value`` (a list or tuple of its own kind) with item ``index`` replaced by ``tensor``."""
    items = list(value)
    items[index] = tensor
    try:
        return type(value)(items)
    except TypeError:  # a kind whose constructor takes its items one by one
        return tuple(items) if isinstance(value, tuple) else items


def _as_tensors(value: Any, label: str, side: str) -> tuple[tuple[Tensor, ...], bool]:
    """Split a layer's input or output into tensors; say plainly when it is not tensors."""
    if isinstance(value, Tensor):
        return (value,), False
    lone = lone_tensor_index(value)
    if lone is not None:
        return (value[lone],), False
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, Tensor) for v in value):
        return tuple(value), True
    kind = type(value).__name__
    if isinstance(value, (tuple, list)):
        kinds = ", ".join(sorted({type(v).__name__ for v in value})) or "nothing"
        kind = f"{kind} of {kinds}"
    raise AttributionTypeError(
        f"The {side} of {label} is a {kind}, not a tensor or a tuple of tensors; "
        f"choose a layer whose {side} is a tensor."
    )


@dataclass
class LayerTap:
    """What the hooks saw during one forward pass, per tapped layer (in the order given)."""

    layers: Sequence[Module]
    labels: list[str]
    use_input: bool
    lean: bool = False
    values: list[tuple[Tensor, ...] | None] = field(default_factory=list)
    is_tuple: list[bool] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)
    flipped: list[Tensor] = field(default_factory=list)

    def reset(self) -> None:
        """Forget the last pass; tensors made to require grad by it get their flag back."""
        for t in self.flipped:
            t.requires_grad_(False)
        self.flipped = []
        self.values = [None] * len(self.layers)
        self.is_tuple = [False] * len(self.layers)
        self.calls = [0] * len(self.layers)

    def check_reached(self) -> None:
        """Raise when a tapped layer never ran during the forward pass."""
        for label, value in zip(self.labels, self.values, strict=True):
            if value is None:
                raise AttributionError(
                    f"Layer {label} is not reached by the forward pass, so nothing flows through "
                    "it; choose a layer that the model actually runs."
                )


@contextmanager
def tap_layers(
    layers: Sequence[Module],
    labels: Sequence[str],
    *,
    use_input: bool = False,
    mode: str,
) -> Iterator[LayerTap]:
    """Hook ``layers`` for the calling thread.

    Modes
    -----
    ``"root"``
        For conductance. In a lean pass (``tap.lean = True``) the caller runs the forward under
        ``torch.no_grad()``; the first tapped layer to run becomes the root of the autograd
        graph: its tensors are made to require grad and grad mode is switched on for the rest of
        the pass, so nothing upstream of the layer is recorded. Later tapped layers are recorded
        where they stand. A tensor that existed before its layer ran cannot be a lean root
        (:class:`NeedsFullGraph`); the caller then records the whole graph instead.
    ``"stop"``
        For neuron gradients. Record the first tapped layer and end the forward pass at once by
        raising :class:`StopForward` (the caller catches it).

    Values handed on to the rest of the network are clones, so in-place operations downstream
    (``ReLU(inplace=True)``) cannot overwrite what was recorded.
    """
    if mode not in ("root", "stop"):
        raise ValueError(f"unknown tap mode {mode!r}")
    owner = threading.get_ident()
    tap = LayerTap(layers=layers, labels=list(labels), use_input=use_input)
    tap.reset()
    handles = []

    def capture(index: int, value: Any, args: tuple = ()) -> Any:
        tap.calls[index] += 1
        if tap.calls[index] > 1:
            raise AttributionError(
                f"Layer {tap.labels[index]} runs more than once in one forward pass (a reused "
                "module), so its activations are ambiguous; choose a module that runs once."
            )
        side = "input" if use_input else "output"
        tensors, is_tuple = _as_tensors(value, tap.labels[index], side)
        if use_input:
            is_tuple = len(tensors) > 1
        tap.is_tuple[index] = is_tuple
        if any(not t.is_floating_point() and not t.is_complex() for t in tensors):
            raise AttributionTypeError(
                f"The {side} of {tap.labels[index]} holds integer or boolean values, which have no "
                "gradient; choose a layer with floating-point activations."
            )
        if mode == "root":
            rooted = []
            for t in tensors:
                existed = use_input or any(t is a for a in args)
                if not t.requires_grad and existed and tap.lean:
                    raise NeedsFullGraph()
                if not t.requires_grad:
                    # Like the reference: the tensor itself becomes a graph root, so every later
                    # use of it counts, not only the use by this layer. Flipped back on exit.
                    try:
                        t.requires_grad_(True)
                        tap.flipped.append(t)
                    except RuntimeError:
                        t = t.detach().requires_grad_(True)
                rooted.append(t)
            tensors = tuple(rooted)
            torch.set_grad_enabled(True)  # restored by the caller's no_grad block on exit
        tap.values[index] = tensors
        if mode == "stop":
            raise StopForward()
        handed = tuple(t.clone() for t in tensors)
        lone = lone_tensor_index(value)
        if lone is not None:  # the numbers next to the tensor go on as they came
            return with_tensor_at(value, lone, handed[0])
        if use_input:
            return handed
        return type(value)(handed) if is_tuple else handed[0]

    def make_hooks(index: int):
        def forward_hook(module: Module, args: Any, output: Any) -> Any:
            if threading.get_ident() != owner:
                return None
            return capture(index, output, args)

        def pre_hook(module: Module, args: Any) -> Any:
            if threading.get_ident() != owner:
                return None
            return capture(index, args)

        return thread_bound(forward_hook), thread_bound(pre_hook)

    try:
        for i, layer in enumerate(layers):
            forward_hook, pre_hook = make_hooks(i)
            if use_input:
                handles.append(layer.register_forward_pre_hook(pre_hook))
            else:
                handles.append(layer.register_forward_hook(forward_hook))
        yield tap
    finally:
        for handle in handles:
            handle.remove()
        tap.reset()
