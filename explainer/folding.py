"""Batch norms folded into the convolutions before them, for the engine's passes.

A batch norm in evaluation mode is an affine map per channel, so a convolution followed by one
computes the same as a single convolution with scaled weights and a shifted bias. Folded, the
path batch skips the batch norm's forward pass, its backward pass and the memory of its output:
on resnet18 the batch norms took 15% of a NeuronConductance call. The results are the same up to
float rounding.

The model is traced with :mod:`torch.fx`; the chosen layers, and every module with hooks of its
own, stay whole (their hooks fire as before and nothing inside them changes). A pair is folded
only where the convolution's output goes to the batch norm alone. The user's model is never
changed: the folded convolutions are new modules of the traced copy, which shares every other
module (and its weights) with the model. A model that cannot be traced, or that has no pair to
fold, runs as it is. The traced copy is kept for the model until its weights, buffers, modes
or hooks change.

Tracing patches ``torch.nn.Module.__call__`` for the whole process while it runs (a few to a few
hundred milliseconds, once per model, layers and state): a model run by another thread at that
moment would be traced instead. So the engine's calls pass through :func:`engine_call`: a call
traces only while no other thread is inside one (otherwise it runs unfolded, with the same
results up to rounding), and calls that start during a trace wait for it. Code that runs models
in other threads outside the engine can switch folding off with ``EXPLAINER_FOLD_BATCH_NORM=0``.
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["engine_call", "folded"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

_GATE = threading.Condition()
_inside: dict[int, int] = {}  # thread id -> depth of engine calls it is in
_tracing = False
# model -> (state key, traced copy or None when there is nothing to fold)
_FOLDED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, nn.Module | None]] = (
    weakref.WeakKeyDictionary()
)


def _hooked(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or getattr(module, "_backward_pre_hooks", None)
    )


class _Tracer(fx.Tracer):
    """Keeps the chosen layers and hooked modules whole."""

    def __init__(self, whole: set[int]) -> None:
        super().__init__()
        self.whole = whole

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) in self.whole or super().is_leaf_module(m, module_qualified_name)


def _state(model: nn.Module, layers: Sequence[nn.Module]) -> tuple:
    """What the traced copy depends on: the layers, every tensor's identity and version, the
    modules' modes and hooks."""
    tensors = tuple((id(t), t._version) for t in (*model.parameters(), *model.buffers()))
    chosen = {id(layer) for layer in layers}  # whole anyway, with or without the engine's hooks
    modules = tuple(
        (id(m), m.training, id(m) not in chosen and _hooked(m)) for m in model.modules()
    )
    return tuple(chosen), tensors, modules


def _fold(model: nn.Module, layers: Sequence[nn.Module]) -> nn.Module | None:
    """The traced copy of ``model`` with its convolution + batch norm pairs folded, or None."""
    whole = {id(layer) for layer in layers} | {id(m) for m in model.modules() if _hooked(m)}
    if not any(isinstance(m, _NORMS) and not m.training for m in model.modules()):
        return None
    try:
        graph = _Tracer(whole).trace(model)
    except Exception:  # noqa: BLE001 - any model fx cannot trace runs as it is
        return None
    traced = fx.GraphModule(model, graph, class_name=type(model).__name__)
    modules = dict(traced.named_modules())
    count = 0
    for node in list(traced.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        norm, conv_node = modules.get(node.target), node.args[0]
        if (
            type(norm) not in _NORMS
            or norm.training
            or norm.running_mean is None
            or id(norm) in whole
            or not isinstance(conv_node, fx.Node)
            or conv_node.op != "call_module"
            or len(conv_node.users) != 1
        ):
            continue
        conv = modules.get(conv_node.target)
        if type(conv) not in _CONVS or id(conv) in whole or conv.training:
            continue
        with torch.no_grad():
            fused = fuse_conv_bn_eval(conv, norm)
        name = f"_folded_{count}"
        count += 1
        traced.add_submodule(name, fused)
        conv_node.target = name
        node.replace_all_uses_with(conv_node)
        traced.graph.erase_node(node)
    if count == 0:
        return None
    traced.graph.lint()
    traced.recompile()
    traced.training = model.training  # not .train(): that would set the shared modules' modes
    return traced


F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def _engine_block() -> Iterator[None]:
    me = threading.get_ident()
    with _GATE:
        while _tracing and _inside.get(me, 0) == 0:
            _GATE.wait()
        _inside[me] = _inside.get(me, 0) + 1
    try:
        yield
    finally:
        with _GATE:
            _inside[me] -= 1
            if _inside[me] == 0:
                del _inside[me]
            _GATE.notify_all()


def engine_call(method: F) -> F:
    """Mark an engine entry point: tracing for :func:`folded` waits for no other thread's call
    (see the module's text)."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _engine_block():
            return method(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def folded(forward: Callable, layers: Sequence[nn.Module]) -> Callable:
    """``forward`` with its convolution + batch norm pairs folded (see the module's text), or
    ``forward`` itself when it is not a module, has nothing to fold, or cannot be traced now
    because another thread is inside an engine call."""
    global _tracing
    if (
        not isinstance(forward, nn.Module)
        or isinstance(forward, fx.GraphModule)
        or os.environ.get("EXPLAINER_FOLD_BATCH_NORM", "1") == "0"
    ):
        return forward
    key = _state(forward, layers)
    me = threading.get_ident()
    with _GATE:
        try:
            cached = _FOLDED.get(forward)
        except TypeError:  # a module that cannot be weakly referenced
            return forward
        if cached is not None and cached[0] == key:
            return cached[1] if cached[1] is not None else forward
        if _tracing or any(thread != me for thread in _inside):
            return forward  # another thread runs a model: no trace now
        _tracing = True
    traced = None
    try:
        traced = _fold(forward, layers)
    finally:
        with _GATE:
            _tracing = False
            _FOLDED[forward] = (key, traced)
            _GATE.notify_all()
    return traced if traced is not None else forward
