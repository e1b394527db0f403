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
module (and its weights) with the model. The same copy leaves out the token rows a
transformer never reads (:mod:`explainer.pruning`). A model that cannot be traced, that has
nothing to fold or leave out, that stores a traced value on itself in ``forward`` (as an
attribute, or in a list, dict or set attribute), or that runs under a hook on every module,
runs as it is. A traced copy is kept until any of the model's tensors (identity,
version, storage), modules (identity, type, plain attributes such as modes, strides or eps)
or hooks change.

Tracing patches ``torch.nn.Module.__call__`` and ``__getattr__`` for the whole process while
it runs (a few to a few hundred milliseconds, once per model, layers and state). The tracer here
hands calls from every other thread straight to the module, so models run by other threads
meanwhile run as usual; traces themselves take turns (two at once would restore each other's
patches out of order). Every call therefore gets the same folded copy, whatever other threads
do. Hooks that act for one thread only, or on every module whatever runs (the engine's own,
marked with :func:`explainer.hooks.thread_bound` or :func:`explainer.hooks.any_module`), do not
keep their module whole. Other code's ``torch.fx`` traces running in other threads at the same
moment may be disturbed (fx keeps one set of patches for the process); the tracer here passes
every call through once its trace is over, should such an overlap leave its patch in place.
Code that runs its own traces in other threads can switch folding off with
``EXPLAINER_FOLD_BATCH_NORM=0``. Functions fx wraps while tracing (``math`` functions met in
other threads' modules) may stay wrapped after such an overlap; the wrappers pass values on.
"""

from __future__ import annotations

import copy
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from explainer.hooks import skippable
from explainer.pruning import first_token_only

__all__ = ["folded"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_COPIES = 8  # traced copies kept per model (one per set of chosen layers and hooked modules)

_LOCK = threading.Lock()  # guards _FOLDED
_TRACE = threading.Lock()  # one trace at a time in the process


@dataclass
class _Folds:
    """What is kept for one model while its weights, buffers and modes stay as they were."""

    state: tuple
    held: tuple  # the tensors named in ``state``, kept alive so that their ids stay theirs
    fused: dict[tuple[int, int], nn.Module] = field(default_factory=dict)  # shared by the copies
    copies: OrderedDict[tuple, nn.Module | None] = field(default_factory=OrderedDict)


_FOLDED: weakref.WeakKeyDictionary[nn.Module, _Folds] = weakref.WeakKeyDictionary()

# fx's tracer asks torch for its table of overridable functions at the first torch function
# it meets; torch builds that table once per process (12 ms here). Built at import, it is not
# paid by the first explanation (on the built-in model: 31 -> 24 ms, the whole call).
torch.overrides.get_overridable_functions()


def _acting(*registries: Any) -> bool:
    """Whether a hook in ``registries`` may act for the calling thread. Each registry is
    copied in one step first: other threads add and remove hooks meanwhile."""
    return any(
        not skippable(hook) for hooks in registries for hook in tuple(hooks.values())
    )


def _hooked(module: nn.Module) -> bool:
    """Whether ``module`` has a hook that may act for the calling thread."""
    return _acting(
        module._forward_hooks,
        module._forward_pre_hooks,
        module._backward_hooks,
        getattr(module, "_backward_pre_hooks", {}),
    )


def _global_hooks() -> bool:
    """Whether a hook for every module (``register_module_forward_hook`` and its kin) may act
    for the calling thread: it would miss the batch norms folded away."""
    return _acting(
        *(
            getattr(torch.nn.modules.module, name, {})
            for name in (
                "_global_forward_hooks",
                "_global_forward_pre_hooks",
                "_global_backward_hooks",
                "_global_backward_pre_hooks",
            )
        )
    )


_SIMPLE = (int, float, bool, str, type(None))


def _settings(module: nn.Module) -> tuple:
    """The module's plain attributes (numbers, flags, strings and tuples of them: a
    convolution's stride and padding, a batch norm's eps, flags read in ``forward``), which
    the traced graph may have taken as constants."""
    return tuple(
        (name, value)
        for name, value in vars(module).items()
        if type(value) in _SIMPLE
        or (type(value) is tuple and all(type(v) in _SIMPLE for v in value))
    )


class _Tracer(fx.Tracer):
    """Keeps the chosen layers and hooked modules whole, and records only its own thread."""

    def __init__(self, whole: set[int]) -> None:
        super().__init__()
        self.whole = whole
        self.thread = threading.get_ident()
        self.active = False

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        self.active = True
        try:
            return super().trace(root, concrete_args)
        finally:
            # Off for good: should another fx trace of the process restore this tracer's
            # patches after it (traces that overlap undo each other's patches in the wrong
            # order), every call still reaches its module.
            self.active = False

    def _records(self) -> bool:
        return self.active and threading.get_ident() == self.thread

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) in self.whole or super().is_leaf_module(m, module_qualified_name)

    def call_module(
        self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict
    ) -> Any:
        if not self._records():  # another thread runs a model meanwhile
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if not self._records():
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


def _keys(model: nn.Module, layers: Sequence[nn.Module]) -> tuple[tuple, tuple, tuple]:
    """What the folds depend on: every tensor's identity, version and storage, every module's
    identity, type and plain attributes (its mode among them), shared by all copies; and, for
    one copy, the modules kept whole (the chosen layers and the modules with hooks). The
    tensors themselves come first: the cache holds them, so that their ids are not reused
    while it compares them."""
    modules = list(model.modules())  # one walk of the tree: this runs on every call
    tensors = tuple(
        t
        for m in modules
        for t in (*m._parameters.values(), *m._buffers.values())
        if t is not None
    )
    state = (
        tuple((id(t), t._version, t.data_ptr()) for t in tensors),  # also `.data = ...`
        tuple((id(m), type(m), _settings(m)) for m in modules),  # swapped modules, modes
    )
    chosen = {id(layer) for layer in layers}
    hooked = tuple(id(m) for m in modules if id(m) not in chosen and _hooked(m))
    return tensors, state, (tuple(sorted(chosen)), hooked)


def _fused(conv: nn.Module, norm: nn.Module) -> nn.Module:
    """A new convolution computing ``norm(conv(x))`` (a shallow copy of ``conv`` with new
    weights and bias: the old weights are not copied first, as ``fuse_conv_bn_eval`` does)."""
    fused = copy.copy(conv)
    for name, value in vars(conv).items():  # registries of its own, so nothing is shared
        if isinstance(value, dict):
            setattr(fused, name, type(value)() if "hook" in name else type(value)(value))
    fused._parameters = {}
    with torch.no_grad():
        weight, bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps,
            norm.weight, norm.bias,
        )
    fused.weight, fused.bias = weight, bias
    return fused


def _attributes(module: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """The module's attributes, and a copy of each list, dict or set among them (a traced
    ``forward`` may append to one)."""
    now = dict(vars(module))
    return now, {
        name: type(value)(value)
        for name, value in now.items()
        if type(value) in (list, dict, set) or isinstance(value, OrderedDict)
    }


def _holds_proxy(value: Any) -> bool:
    if isinstance(value, dict):
        return any(isinstance(v, fx.Proxy) for v in (*value.keys(), *value.values()))
    if isinstance(value, (list, set)):
        return any(isinstance(v, fx.Proxy) for v in value)
    return False


def _restore_attributes(
    modules: list[nn.Module], before: list[tuple[dict[str, Any], dict[str, Any]]]
) -> bool:
    """Undo what a traced ``forward`` stored on the model as a Proxy, as an attribute or in a
    list, dict or set attribute (it would be read by later calls); whether there was any."""
    found = False
    for module, (was, contents) in zip(modules, before, strict=True):
        for name, value in list(vars(module).items()):
            if isinstance(value, fx.Proxy):
                found = True
                if name in was:
                    setattr(module, name, was[name])
                else:
                    delattr(module, name)
            elif name in contents and _holds_proxy(value):
                found = True
                value.clear()
                if isinstance(value, list):
                    value.extend(contents[name])
                else:
                    value.update(contents[name])
    return found


def _fold(
    model: nn.Module,
    whole: set[int],
    fused: dict[tuple[int, int], nn.Module],
    example: tuple | None = None,
) -> nn.Module | None:
    """The traced copy of ``model`` with its convolution + batch norm pairs outside ``whole``
    folded, and with the tokens it never reads left out (:mod:`explainer.pruning`, given two
    ``example`` rows of the inputs), or None. Folded convolutions are taken from, and added
    to, ``fused``."""
    modules = list(model.modules())
    if example is None and not any(isinstance(m, _NORMS) and not m.training for m in modules):
        return None
    before = [_attributes(m) for m in modules]
    try:
        graph = _Tracer(whole).trace(model)
    except Exception:  # noqa: BLE001 - any model fx cannot trace runs as it is
        graph = None
    finally:
        if _restore_attributes(modules, before):
            graph = None  # the graph lacks what forward stores on the model
    if graph is None:
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
        pair = (id(conv), id(norm))
        if pair not in fused:
            fused[pair] = _fused(conv, norm)
        name = f"_folded_{count}"
        count += 1
        traced.add_submodule(name, fused[pair])
        conv_node.target = name
        node.replace_all_uses_with(conv_node)
        traced.graph.erase_node(node)
    traced.graph.lint()
    traced.recompile()
    traced.training = model.training  # not .train(): that would set the shared modules' modes
    if example is not None and first_token_only(traced, whole, example):
        count += 1
    return traced if count else None


def _cached(model: nn.Module, state: tuple, copy: tuple) -> tuple[bool, nn.Module | None]:
    """(found, traced copy or None) from the cache; call with ``_LOCK`` held."""
    folds = _FOLDED.get(model)
    if folds is None or folds.state != state or copy not in folds.copies:
        return False, None
    folds.copies.move_to_end(copy)
    return True, folds.copies[copy]


def _example(
    state: tuple, copy: tuple, inputs: Sequence[Any] | None, args: Any
) -> tuple[tuple | None, tuple | None]:
    """(two rows of every input, their key) where the model may have token rows to leave
    out: it has an attention module, no module has hooks and the forward takes the inputs
    alone; else (None, None)."""
    if (
        inputs is None
        or os.environ.get("EXPLAINER_PRUNE_TOKENS", "1") == "0"
        or args
        or copy[1]
        or not inputs
        or not all(isinstance(t, torch.Tensor) and t.dim() > 0 and len(t) > 0 for t in inputs)
        or not any(kind is nn.MultiheadAttention for _, kind, _ in state[1])  # module types
    ):
        return None, None
    key = tuple((tuple(t.shape[1:]), t.dtype, t.device) for t in inputs)
    # two rows, so that a size of one in the example is not the batch's (``squeeze()``)
    rows = tuple((t[:2] if len(t) > 1 else torch.cat([t[:1], t[:1]])).detach() for t in inputs)
    return rows, key


def folded(
    forward: Callable,
    layers: Sequence[nn.Module],
    inputs: Sequence[Any] | None = None,
    args: Any = None,
) -> Callable:
    """``forward`` with its convolution + batch norm pairs folded (see the module's text) and,
    given the ``inputs`` (and ``args``) of the call, the tokens it never reads left out (see
    :mod:`explainer.pruning`); or ``forward`` itself when it is not a module, has nothing to
    change, or cannot be traced."""
    if (
        not isinstance(forward, nn.Module)
        or isinstance(forward, fx.GraphModule)
        or os.environ.get("EXPLAINER_FOLD_BATCH_NORM", "1") == "0"
    ):
        return forward
    if _global_hooks():
        return forward
    tensors, state, copy = _keys(forward, layers)
    example, example_key = _example(state, copy, inputs, args)
    copy = (*copy, example_key)
    with _LOCK:
        try:
            found, traced = _cached(forward, state, copy)
        except TypeError:  # a module that cannot be weakly referenced
            return forward
    if not found:
        with _TRACE:
            with _LOCK:  # another thread may have traced it while this one waited
                found, traced = _cached(forward, state, copy)
                folds = _FOLDED.get(forward)
                if folds is None or folds.state != state:
                    folds = _FOLDED[forward] = _Folds(state, tensors)
            if not found:
                whole = set(copy[0]) | set(copy[1])
                traced = _fold(forward, whole, folds.fused, example)
                with _LOCK:
                    folds.copies[copy] = traced
                    while len(folds.copies) > _COPIES:
                        folds.copies.popitem(last=False)
    return traced if traced is not None else forward
