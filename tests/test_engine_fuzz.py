"""Property-based tests of the attribution engine over its whole argument space.

Hypothesis draws shapes, baselines, targets, neuron selectors, integration methods, step counts,
batch sizes and memory budgets, valid and invalid. Every call must either return a result that
satisfies the invariants below or raise an :class:`explainer.errors.ExplainerError`: valid
arguments must succeed and invalid ones must be refused; no other exception may escape.

After every call, successful or not: no hook is left on any module, the model's parameters,
``requires_grad`` flags and training mode are as they were, parameter ``.grad`` stays unset,
the inputs are unmodified (values and ``requires_grad``), and the grad mode is unchanged. A valid
``internal_batch_size`` below the number of examples warns (as Captum does) and no other does.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from explainer.attribution import LayerConductance, NeuronGradient
from explainer.errors import AttributionError, ExplainerError
from explainer.neuron_conductance import NeuronConductance

METHODS = ("riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid", "gausslegendre")
BUDGET_VAR = "EXPLAINER_MEMORY_BUDGET_MB"
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------------
# models


class TinyConvNet(nn.Module):
    """Accepts any spatial size; ``scale`` is an optional extra argument (tensor or number)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(3, 2, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(2, 4)
        self.unused = nn.Linear(4, 4)  # never runs in forward

    def forward(self, x: Tensor, scale: Any = None) -> Tensor:
        if scale is not None:
            x = x * scale
        return self.fc(self.flat(self.pool(self.conv2(self.relu(self.conv1(x))))))


def _make_conv() -> TinyConvNet:
    torch.manual_seed(0)
    return TinyConvNet().double()


def _make_linear() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3)).double()


CONV = _make_conv()
LINEAR = _make_linear()
CONV_LAYERS = ("conv1", "relu", "conv2", "pool", "flat", "fc")


def layer_shape(name: str, to_input: bool, n: int, h: int, w: int) -> tuple[int, ...]:
    """Shape of a TinyConvNet layer's output (or input) for an (n, 2, h, w) input."""
    outputs = {
        "conv1": (n, 3, h, w),
        "relu": (n, 3, h, w),
        "conv2": (n, 2, h, w),
        "pool": (n, 2, 1, 1),
        "flat": (n, 2),
        "fc": (n, 4),
    }
    inputs = {
        "conv1": (n, 2, h, w),
        "relu": (n, 3, h, w),
        "conv2": (n, 3, h, w),
        "pool": (n, 2, h, w),
        "flat": (n, 2, 1, 1),
        "fc": (n, 2),
    }
    return (inputs if to_input else outputs)[name]


# --------------------------------------------------------------------------------------------
# invariants checked after every call


@dataclass
class Snapshot:
    """What a call must leave exactly as it found it."""

    model: nn.Module
    inputs: tuple[Tensor, ...]
    params: dict[str, Tensor] = field(default_factory=dict)
    flags: dict[str, bool] = field(default_factory=dict)
    modes: dict[str, bool] = field(default_factory=dict)
    values: list[Tensor] = field(default_factory=list)
    input_flags: list[bool] = field(default_factory=list)
    grad_mode: bool = True

    @classmethod
    def take(cls, model: nn.Module, inputs: tuple[Tensor, ...]) -> Snapshot:
        return cls(
            model=model,
            inputs=inputs,
            params={k: p.detach().clone() for k, p in model.named_parameters()},
            flags={k: p.requires_grad for k, p in model.named_parameters()},
            modes={k: m.training for k, m in model.named_modules()},
            values=[t.detach().clone() for t in inputs],
            input_flags=[t.requires_grad for t in inputs],
            grad_mode=torch.is_grad_enabled(),
        )

    def check(self) -> None:
        for name, module in self.model.named_modules():
            assert not module._forward_hooks, f"forward hook left on {name!r}"
            assert not module._forward_pre_hooks, f"forward pre-hook left on {name!r}"
            assert not module._backward_hooks, f"backward hook left on {name!r}"
            assert module.training == self.modes[name], f"training mode of {name!r} changed"
        for name, p in self.model.named_parameters():
            assert p.requires_grad == self.flags[name], f"requires_grad of {name!r} changed"
            assert p.grad is None, f"{name!r} received a .grad"
            assert torch.equal(p.detach(), self.params[name]), f"{name!r} was modified"
        for t, value, flag in zip(self.inputs, self.values, self.input_flags, strict=True):
            assert t.requires_grad == flag, "an input's requires_grad flag changed"
            assert torch.equal(t.detach(), value), "an input was modified"
        assert torch.is_grad_enabled() == self.grad_mode, "the grad mode changed"


def set_model_state(model: nn.Module, training: bool, frozen: bool) -> None:
    model.train(training)
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(not (frozen and i % 2 == 0))


@contextlib.contextmanager
def memory_budget(mb: str | None):
    """Run with EXPLAINER_MEMORY_BUDGET_MB set to ``mb`` (unset for None)."""
    old = os.environ.pop(BUDGET_VAR, None)
    try:
        if mb is not None:
            os.environ[BUDGET_VAR] = mb
        yield
    finally:
        os.environ.pop(BUDGET_VAR, None)
        if old is not None:
            os.environ[BUDGET_VAR] = old


def grad_context(kind: str):
    return {
        "default": contextlib.nullcontext,
        "no_grad": torch.no_grad,
        "inference_mode": torch.inference_mode,
    }[kind]()


def call_checked(
    snapshot: Snapshot, fn, *, valid: bool, ctx: str = "default", warns: bool | None = None
):
    """Run ``fn`` inside the grad context ``ctx``; return its result, or None when it raised an
    ExplainerError. Any other exception escapes and fails the test. ``warns`` (when not None):
    whether a successful call must warn that ``internal_batch_size`` was raised."""
    error: ExplainerError | None = None
    result = None
    with grad_context(ctx), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mode = torch.is_grad_enabled()
        try:
            result = fn()
        except ExplainerError as err:
            error = err
        assert torch.is_grad_enabled() == mode, "the grad mode inside the caller's block changed"
    snapshot.check()
    if error is not None:
        assert not valid, f"valid arguments were refused: {error}"
        assert str(error).strip(), "an error without a message"
        return None
    assert valid, "invalid arguments were accepted"
    if warns is not None:
        raised = [
            w
            for w in caught
            if issubclass(w.category, UserWarning) and "internal_batch_size" in str(w.message)
        ]
        assert bool(raised) == warns, (
            "expected a warning that internal_batch_size was raised" if warns else raised
        )
    return result


def small_batch(ibs: Any, n: int) -> bool:
    """A valid ``internal_batch_size`` below the number of examples: it warns."""
    return isinstance(ibs, int) and not isinstance(ibs, bool) and 1 <= ibs < n


# --------------------------------------------------------------------------------------------
# strategies: each draws a valid value, or an invalid one when asked for (one argument at a
# time is broken, so valid calls stay frequent and every refusal has a single cause)

FIELDS_LC = ("layer", "method", "n_steps", "internal_batch_size", "baselines", "target")
FIELDS_NG = ("layer", "selector")


def broken_field(fields: tuple[str, ...]):
    """None (every argument valid) about 40% of the time, else the one field to break."""
    return st.sampled_from((None,) * (2 * len(fields) // 3 + 1) + fields)


@st.composite
def tensors(draw, shape: tuple[int, ...]) -> Tensor:
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


@st.composite
def baselines(draw, x: Tensor, valid: bool):
    n = x.shape[0]
    if valid:
        kind = draw(st.sampled_from(["none", "float", "int", "full", "batch1"]))
        return {
            "none": lambda: None,
            "float": lambda: draw(st.floats(-2, 2, allow_nan=False)),
            "int": lambda: draw(st.integers(-2, 2)),
            "full": lambda: draw(tensors(tuple(x.shape))),
            "batch1": lambda: draw(tensors((1, *x.shape[1:]))),
        }[kind]()
    kind = draw(st.sampled_from(["wrong-shape", "no-batch-dim", "two", "string", "bool"]))
    return {
        "wrong-shape": lambda: draw(tensors((n, x.shape[1] + 1, *x.shape[2:]))),
        "no-batch-dim": lambda: draw(tensors((n + 1, *x.shape[1:]))),
        "two": lambda: (0.0, 0.0),
        "string": lambda: "zeros",
        "bool": lambda: True,
    }[kind]()


@st.composite
def targets(draw, n: int, classes: int, valid: bool):
    """Targets for an (n, classes) output. Per-example lists hold non-negative indices only:
    negative ones are the subject of test_negative_per_example_targets."""
    in_range = st.integers(-classes, classes - 1)
    per_example = st.lists(st.integers(0, classes - 1), min_size=n, max_size=n)
    if valid:
        kind = draw(st.sampled_from(["int", "tensor1", "tensor0", "list", "tensor", "tuple"]))
        return {
            "int": lambda: draw(in_range),
            "tensor1": lambda: torch.tensor([draw(in_range)]),
            "tensor0": lambda: torch.tensor(draw(in_range)),
            "list": lambda: draw(per_example),
            "tensor": lambda: torch.tensor(draw(per_example)),
            "tuple": lambda: (draw(in_range),),
        }[kind]()
    kind = draw(
        st.sampled_from(
            ["bad-int", "bad-list", "long-list", "2d-tensor", "bad-tuple", "none", "bool", "float"]
        )
    )

    def bad_list():
        values = draw(per_example)
        values[draw(st.integers(0, n - 1))] = draw(st.integers(classes, classes + 3))
        return values

    return {
        "bad-int": lambda: draw(
            st.one_of(st.integers(classes, classes + 5), st.integers(-classes - 5, -classes - 1))
        ),
        "bad-list": bad_list,
        "long-list": lambda: [0] * (n + 1),
        "2d-tensor": lambda: torch.zeros(n, 2, dtype=torch.long),
        "bad-tuple": lambda: (0, 0),
        "none": lambda: None,
        "bool": lambda: True,
        "float": lambda: 1.5,
    }[kind]()


def methods(valid: bool):
    if valid:
        return st.sampled_from(METHODS)
    return st.sampled_from(["riemann", "", "GaussLegendre", "trapezoid", None])


def step_counts(valid: bool):
    if valid:
        return st.integers(1, 8)
    return st.sampled_from([0, -1, 2.5, True, "3", None])


def batch_sizes(n: int, points: int, valid: bool):
    """Valid: None or any positive int (below ``n`` it warns and is raised to ``n``, as in
    Captum). Invalid: zero, negative, or not an int."""
    if valid:
        options = [st.none(), st.integers(n, n * points + 3)]
        if n > 1:
            options.append(st.integers(1, n - 1))
        return st.one_of(*options)
    return st.one_of(st.integers(-2, 0), st.sampled_from([2.5, True, "4"]))


# --------------------------------------------------------------------------------------------
# LayerConductance


@st.composite
def conductance_cases(draw):
    broken = draw(broken_field(FIELDS_LC))
    n = draw(st.integers(1, 3))
    h, w = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    # Inputs that require grad: see test_inputs_that_require_grad.
    x = draw(tensors((n, 2, h, w)))
    if broken == "layer":
        names, is_list = [draw(st.sampled_from(["unused", "string", "empty", "list-unused"]))], True
    elif draw(st.booleans()):
        names, is_list = [draw(st.sampled_from(CONV_LAYERS))], False
    else:
        names = draw(st.lists(st.sampled_from(CONV_LAYERS), min_size=1, max_size=3, unique=True))
        is_list = True
    n_steps = draw(step_counts(broken != "n_steps"))
    points = n_steps + 1 if broken != "n_steps" else 2
    extra = draw(st.sampled_from(["none", "number", "tensor"]))
    return dict(
        x=x,
        names=names,
        is_list=is_list,
        method=draw(methods(broken != "method")),
        n_steps=n_steps,
        ibs=draw(batch_sizes(n, points, broken != "internal_batch_size")),
        baselines=draw(baselines(x, broken != "baselines")),
        target=draw(targets(n, 4, broken != "target")),
        args={"none": None, "number": 0.5, "tensor": draw(tensors((n, 1, 1, 1)))}[extra],
        to_input=draw(st.booleans()),
        delta=draw(st.booleans()),
        tuple_input=draw(st.booleans()),
        budget=draw(st.sampled_from([None, "0.15"])),
        training=draw(st.booleans()),
        frozen=draw(st.booleans()),
        ctx=draw(st.sampled_from(["default", "default", "no_grad", "inference_mode"])),
        broken=broken,
        valid=broken is None,
    )


def resolve_layers(model: nn.Module, names: list[str], is_list: bool):
    if names == ["string"]:
        return "conv1"
    if names == ["empty"]:
        return []
    if names == ["list-unused"]:
        return [model.conv1, model.unused]
    layers = [getattr(model, name) for name in names]
    return layers if is_list else layers[0]


@FUZZ
@given(case=conductance_cases())
def test_layer_conductance_fuzz(case):
    model = CONV
    set_model_state(model, case["training"], case["frozen"])
    x = case["x"]
    inputs = (x,) if case["tuple_input"] else x
    layer = resolve_layers(model, case["names"], case["is_list"])
    kwargs = dict(
        baselines=case["baselines"],
        target=case["target"],
        additional_forward_args=case["args"],
        n_steps=case["n_steps"],
        method=case["method"],
        internal_batch_size=case["ibs"],
        return_convergence_delta=case["delta"],
        attribute_to_layer_input=case["to_input"],
    )
    snapshot = Snapshot.take(model, (x,))
    with memory_budget(case["budget"]):
        result = call_checked(
            snapshot,
            lambda: LayerConductance(model, layer).attribute(inputs, **kwargs),
            valid=case["valid"],
            ctx=case["ctx"],
            warns=small_batch(case["ibs"], x.shape[0]) if case["valid"] else None,
        )
        if result is None:
            return
        # The same call with the other batching: unchunked when it was chunked, else one path
        # point per pass. Results must not depend on the split.
        other_ibs = None if case["ibs"] is not None else x.shape[0]
        other = call_checked(
            snapshot,
            lambda: LayerConductance(model, layer).attribute(
                inputs, **{**kwargs, "internal_batch_size": other_ibs}
            ),
            valid=True,
            warns=False,
        )

    attrs, deltas = result if case["delta"] else (result, None)
    other_attrs = other[0] if case["delta"] else other
    n, _, h, w = x.shape
    names = case["names"]
    attr_list = attrs if case["is_list"] else [attrs]
    other_list = other_attrs if case["is_list"] else [other_attrs]
    assert isinstance(attrs, list) == case["is_list"]
    assert len(attr_list) == len(names)
    for name, attr, again in zip(names, attr_list, other_list, strict=True):
        assert isinstance(attr, Tensor)
        assert attr.shape == layer_shape(name, case["to_input"], n, h, w)
        assert attr.dtype == torch.float64
        assert torch.isfinite(attr).all()
        assert not attr.requires_grad
        scale = 1.0 + float(attr.abs().max())
        torch.testing.assert_close(attr, again, rtol=0, atol=1e-6 * scale)

    if case["delta"]:
        delta_list = deltas if case["is_list"] else [deltas]
        assert len(delta_list) == len(names)
        for layer_i, attr, delta in zip(
            layer if case["is_list"] else [layer], attr_list, delta_list, strict=True
        ):
            assert delta.shape == (n,)
            assert torch.isfinite(delta).all()
            direct = LayerConductance(model, layer_i).compute_convergence_delta(
                attr, case["baselines"], inputs, case["target"], case["args"]
            )
            snapshot.check()
            torch.testing.assert_close(delta, direct, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------------------------
# Completeness on a linear model


def first_and_last_alpha(method: str, points: int) -> tuple[float, float]:
    """Independent of the engine: where each rule puts its first and last path point."""
    if method == "riemann_left":
        return 0.0, (points - 1) / points
    if method == "riemann_right":
        return 1 / points, 1.0
    if method == "riemann_middle":
        return 0.5 / points, 1 - 0.5 / points
    if method == "riemann_trapezoid":
        return 0.0, 1.0
    nodes, _ = np.polynomial.legendre.leggauss(points)
    return (nodes[0] + 1) / 2, (nodes[-1] + 1) / 2


@st.composite
def linear_cases(draw):
    n = draw(st.integers(1, 3))
    x = draw(tensors((n, 5)))
    base_kind = draw(st.sampled_from(["none", "scalar", "full", "batch1"]))
    base = {
        "none": None,
        "scalar": draw(st.floats(-2, 2, allow_nan=False)),
        "full": draw(tensors((n, 5))),
        "batch1": draw(tensors((1, 5))),
    }[base_kind]
    n_steps = draw(st.integers(1, 8))
    return dict(
        x=x,
        baselines=base,
        n_steps=n_steps,
        method=draw(st.sampled_from(METHODS)),
        target=draw(
            st.one_of(st.integers(-3, 2), st.lists(st.integers(0, 2), min_size=n, max_size=n))
        ),
        layer=draw(st.sampled_from([0, 1])),
        to_input=draw(st.booleans()),
        ibs=draw(st.one_of(st.none(), st.integers(n, n * (n_steps + 1)))),
    )


@FUZZ
@given(case=linear_cases())
def test_linear_model_conductance_sums_to_the_covered_part_of_the_output_change(case):
    """For a linear model the layer moves linearly along the path and the gradient is constant,
    so the finite differences telescope: the conductance sums to
    (alpha_last - alpha_first) * (F(x) - F(baseline)). Only riemann_trapezoid spans [0, 1]."""
    model, x = LINEAR, case["x"]
    snapshot = Snapshot.take(model, (x,))
    layer = model[case["layer"]]
    attrs, delta = call_checked(
        snapshot,
        lambda: LayerConductance(model, layer).attribute(
            x,
            baselines=case["baselines"],
            target=case["target"],
            n_steps=case["n_steps"],
            method=case["method"],
            internal_batch_size=case["ibs"],
            attribute_to_layer_input=case["to_input"],
            return_convergence_delta=True,
        ),
        valid=True,
    )
    with torch.no_grad():
        base = case["baselines"]
        start = torch.zeros_like(x) if base is None else torch.as_tensor(base, dtype=x.dtype)
        change = model(x) - model(start.expand_as(x))
    target = case["target"]
    if isinstance(target, int):
        change = change[:, target]
    else:
        change = change.gather(1, torch.tensor(target).reshape(-1, 1)).reshape(-1)
    first, last = first_and_last_alpha(case["method"], case["n_steps"] + 1)
    span = last - first
    assert 0 < span <= 1
    tol = 1e-8 * (1 + float(change.abs().max()))
    torch.testing.assert_close(attrs.sum(1), span * change, rtol=0, atol=tol)
    torch.testing.assert_close(delta, (span - 1) * change, rtol=0, atol=tol)
    if case["method"] == "riemann_trapezoid":
        torch.testing.assert_close(delta, torch.zeros_like(delta), rtol=0, atol=tol)


# --------------------------------------------------------------------------------------------
# NeuronGradient


class PerExample:
    """A callable selector: one value per example (a weighted neuron of the layer)."""

    def __call__(self, t: Tensor) -> Tensor:
        return 2.0 * t.reshape(t.shape[0], -1)[:, -1]

    def __repr__(self) -> str:
        return "PerExample()"


class Total:
    """A callable selector: one value in total."""

    def __call__(self, t: Tensor) -> Tensor:
        return (t**2).sum()

    def __repr__(self) -> str:
        return "Total()"


class NotATensor:
    def __call__(self, t: Tensor) -> float:
        return 1.0

    def __repr__(self) -> str:
        return "NotATensor()"


class TooMany:
    """Returns one value more than there are examples."""

    def __call__(self, t: Tensor) -> Tensor:
        return t.reshape(-1)[: t.shape[0] + 1]

    def __repr__(self) -> str:
        return "TooMany()"


@st.composite
def index_slices(draw, size: int):
    start = draw(st.one_of(st.none(), st.integers(-size - 2, size + 2)))
    stop = draw(st.one_of(st.none(), st.integers(-size - 2, size + 2)))
    step = draw(st.sampled_from([None, 1, 2]))
    return slice(start, stop, step)


@st.composite
def selectors(draw, dims: tuple[int, ...], valid: bool):
    """A neuron selector for a layer whose neurons have shape ``dims``. Slices use positive
    steps only: other steps are the subject of test_slice_steps_below_one."""
    k = len(dims)
    if valid:
        kinds = ["ints", "slices", "per-example", "total"] + (["int"] if k == 1 else [])
        kind = draw(st.sampled_from(kinds))
        if kind == "int":
            return draw(st.integers(-dims[0], dims[0] - 1))
        if kind == "ints":
            return tuple(draw(st.integers(-size, size - 1)) for size in dims)
        if kind == "slices":
            length = draw(st.integers(1, k))
            parts = [
                draw(st.one_of(index_slices(size), st.integers(-size, size - 1)))
                for size in dims[:length]
            ]
            if not any(isinstance(p, slice) for p in parts):
                parts[draw(st.integers(0, length - 1))] = slice(None)
            return tuple(parts)
        return PerExample() if kind == "per-example" else Total()
    kinds = [
        "out-of-range",
        "too-long",
        "too-short",
        "not-a-tensor",
        "too-many",
        "float",
        "string",
        "bool-in-tuple",
        "none",
    ] + (["int"] if k > 1 else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "int":  # one index for a layer whose neurons need several
        return draw(st.integers(0, dims[0] - 1))
    if kind == "out-of-range":
        value = [draw(st.integers(-size, size - 1)) for size in dims]
        bad = draw(st.integers(0, k - 1))
        value[bad] = draw(st.sampled_from([dims[bad], dims[bad] + 3, -dims[bad] - 1]))
        return tuple(value)
    return {
        "too-long": (0,) * (k + 1),
        "too-short": (0,) * (k - 1),
        "not-a-tensor": NotATensor(),
        "too-many": TooMany(),
        "float": 1.5,
        "string": "neuron",
        "bool-in-tuple": (True,) + (0,) * (k - 1),
        "none": None,
    }[kind]


@st.composite
def neuron_cases(draw):
    broken = draw(broken_field(FIELDS_NG))
    n = draw(st.integers(1, 3))
    h, w = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    x = draw(tensors((n, 2, h, w)))
    x.requires_grad_(draw(st.booleans()))
    to_input = draw(st.booleans())
    if broken == "layer":
        name = draw(st.sampled_from(["unused", "list", "string"]))
        dims = layer_shape("fc", to_input, n, h, w)[1:]
    else:
        name = draw(st.sampled_from(CONV_LAYERS))
        dims = layer_shape(name, to_input, n, h, w)[1:]
    many = draw(st.booleans())
    if not many:
        selector = draw(selectors(dims, broken != "selector"))
    elif broken != "selector":
        selector = draw(st.lists(selectors(dims, True), min_size=1, max_size=3))
    else:  # an empty list, or a list with one invalid entry
        selector = draw(st.lists(selectors(dims, True), max_size=2))
        if selector or draw(st.booleans()):
            selector.insert(draw(st.integers(0, len(selector))), draw(selectors(dims, False)))
    extra = draw(st.sampled_from(["none", "number", "tensor"]))
    return dict(
        x=x,
        name=name,
        to_input=to_input,
        selector=selector,
        many=many,
        args={"none": None, "number": 0.5, "tensor": draw(tensors((n, 1, 1, 1)))}[extra],
        tuple_input=draw(st.booleans()),
        budget=draw(st.sampled_from([None, "0.15"])),
        training=draw(st.booleans()),
        frozen=draw(st.booleans()),
        ctx=draw(st.sampled_from(["default", "default", "no_grad", "inference_mode"])),
        broken=broken,
        valid=broken is None,
    )


def reference_neuron_gradient(model, layer, x, selector, to_input, args) -> Tensor:
    """Plain autograd through a temporary hook: the gradient of the selected value(s)."""
    seen: dict[str, Tensor] = {}
    if to_input:
        handle = layer.register_forward_pre_hook(lambda m, a: seen.setdefault("v", a[0]))
    else:
        handle = layer.register_forward_hook(lambda m, a, out: seen.setdefault("v", out))
    leaf = x.detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            model(leaf, args)
            value = seen["v"]
            if callable(selector):
                picked = selector(value)
            else:
                index = (selector,) if isinstance(selector, int) else selector
                picked = value[(slice(None), *index)]
            (grad,) = torch.autograd.grad(picked.sum(), leaf, allow_unused=True)
    finally:
        handle.remove()
    return torch.zeros_like(leaf) if grad is None else grad


@FUZZ
@given(case=neuron_cases())
def test_neuron_gradient_fuzz(case):
    model = CONV
    set_model_state(model, case["training"], case["frozen"])
    x = case["x"]
    inputs = (x,) if case["tuple_input"] else x
    layer = {"list": [model.fc], "string": "fc"}.get(case["name"]) or getattr(model, case["name"])
    snapshot = Snapshot.take(model, (x,))
    with memory_budget(case["budget"]):
        result = call_checked(
            snapshot,
            lambda: NeuronGradient(model, layer).attribute(
                inputs,
                case["selector"],
                additional_forward_args=case["args"],
                attribute_to_neuron_input=case["to_input"],
            ),
            valid=case["valid"],
            ctx=case["ctx"],
        )
    if result is None:
        return
    if case["tuple_input"]:
        assert isinstance(result, tuple) and len(result) == 1
        (result,) = result
    selectors_ = case["selector"] if case["many"] else [case["selector"]]
    expected_shape = (len(selectors_), *x.shape) if case["many"] else tuple(x.shape)
    assert result.shape == expected_shape
    assert result.dtype == torch.float64
    assert torch.isfinite(result).all()
    assert not result.requires_grad
    grads = result if case["many"] else result.unsqueeze(0)
    set_model_state(model, False, False)
    for selector, grad in zip(selectors_, grads, strict=True):
        ref = reference_neuron_gradient(model, layer, x, selector, case["to_input"], case["args"])
        torch.testing.assert_close(grad, ref, rtol=1e-9, atol=1e-12)
    Snapshot.take(model, (x,)).check()  # the reference left no hook behind either


# --------------------------------------------------------------------------------------------
# NeuronConductance

FIELDS_NC = ("layer", "selector", "method", "n_steps", "internal_batch_size", "baselines", "target")


def nc_step_counts(method: Any, valid: bool):
    """Neuron conductance evaluates ``n_steps`` points (not ``n_steps + 1``): Gauss-Legendre
    works from one, the Riemann rules from two, as in Captum."""
    if valid:
        return st.integers(1 if method == "gausslegendre" else 2, 6)
    bad = st.sampled_from([0, -1, 2.5, True, "3", None])
    if method in METHODS and method != "gausslegendre":
        return st.one_of(st.just(1), bad)
    return bad


@st.composite
def nc_selectors(draw, dims: tuple[int, ...], n: int, valid: bool):
    """As :func:`selectors`, except that a callable must give one value per example (as
    Captum asks): ``Total`` is valid for the neuron gradient but not here, where it is
    refused whenever there are several examples."""
    if valid:
        return draw(selectors(dims, True).filter(lambda s: not isinstance(s, Total)))
    if n > 1 and draw(st.integers(0, 9)) == 0:
        return Total()
    return draw(selectors(dims, False))


@st.composite
def neuron_conductance_cases(draw):
    broken = draw(broken_field(FIELDS_NC))
    n = draw(st.integers(1, 3))
    h, w = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    x = draw(tensors((n, 2, h, w)))
    x.requires_grad_(draw(st.booleans()))
    to_input = draw(st.booleans())
    if broken == "layer":
        name = draw(st.sampled_from(["unused", "list", "string"]))
        dims = layer_shape("fc", to_input, n, h, w)[1:]
    else:
        name = draw(st.sampled_from(CONV_LAYERS))
        dims = layer_shape(name, to_input, n, h, w)[1:]
    many = draw(st.booleans())
    if not many:
        selector = draw(nc_selectors(dims, n, broken != "selector"))
    elif broken != "selector":
        selector = draw(st.lists(nc_selectors(dims, n, True), min_size=1, max_size=3))
    else:  # an empty list, or a list with one invalid entry
        selector = draw(st.lists(nc_selectors(dims, n, True), max_size=2))
        if selector or draw(st.booleans()):
            bad = draw(nc_selectors(dims, n, False))
            selector.insert(draw(st.integers(0, len(selector))), bad)
    method = draw(methods(broken != "method"))
    n_steps = draw(nc_step_counts(method, broken != "n_steps"))
    points = n_steps if broken != "n_steps" else 2
    extra = draw(st.sampled_from(["none", "number", "tensor"]))
    return dict(
        x=x,
        name=name,
        to_input=to_input,
        selector=selector,
        many=many,
        method=method,
        n_steps=n_steps,
        ibs=draw(batch_sizes(n, points, broken != "internal_batch_size")),
        baselines=draw(baselines(x, broken != "baselines")),
        target=draw(targets(n, 4, broken != "target")),
        multiply=draw(st.booleans()),
        args={"none": None, "number": 0.5, "tensor": draw(tensors((n, 1, 1, 1)))}[extra],
        tuple_input=draw(st.booleans()),
        budget=draw(st.sampled_from([None, "0.15"])),
        training=draw(st.booleans()),
        frozen=draw(st.booleans()),
        ctx=draw(st.sampled_from(["default", "default", "no_grad", "inference_mode"])),
        broken=broken,
        valid=broken is None,
    )


def quadrature_reference(method: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Points and weights of each rule as Captum defines them, independent of the engine."""
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n)
        return (nodes + 1) / 2, weights / 2
    weights = np.full(n, 1.0 / n)
    i = np.arange(n, dtype=np.float64)
    points = {
        "riemann_left": i / n,
        "riemann_right": (i + 1) / n,
        "riemann_middle": (i + 0.5) / n,
        "riemann_trapezoid": i / (n - 1),
    }[method]
    if method == "riemann_trapezoid":
        weights[0] /= 2
        weights[-1] /= 2
    return points, weights


def pick_target(output: Tensor, target: Any) -> Tensor:
    """The target score of every example, for the valid target forms the strategy draws."""
    if isinstance(target, tuple):
        (target,) = target
    if isinstance(target, Tensor) and target.numel() == 1:
        target = int(target)
    if isinstance(target, int):
        return output[:, target]
    index = torch.as_tensor(target).reshape(-1, 1)
    return output.gather(1, index).reshape(-1)


def pick_neuron(value: Tensor, selector: Any) -> Tensor:
    """One value per example: the selected neuron, or the sum of the neurons a slice covers."""
    if callable(selector):
        return selector(value)
    index = (selector,) if isinstance(selector, int) else selector
    picked = value[(slice(None), *index)]
    return picked.reshape(picked.shape[0], -1).sum(1)


def reference_neuron_conductance(model, layer, case: dict, selector) -> Tensor:
    """Plain autograd, one path point at a time: the weighted sum over the points of
    (d target / d neuron) * (d neuron / d input), times ``input - baseline`` if asked for."""
    x = case["x"].detach()
    base = case["baselines"]
    start = torch.zeros_like(x) if base is None else torch.as_tensor(base, dtype=x.dtype)
    start = start.expand_as(x)
    seen: dict[str, Tensor] = {}
    if case["to_input"]:
        handle = layer.register_forward_pre_hook(lambda m, a: seen.__setitem__("v", a[0]))
    else:
        handle = layer.register_forward_hook(lambda m, a, out: seen.__setitem__("v", out))
    total = torch.zeros_like(x)
    try:
        alphas, weights = quadrature_reference(case["method"], case["n_steps"])
        for alpha, weight in zip(alphas.tolist(), weights.tolist(), strict=True):
            point = (start + alpha * (x - start)).requires_grad_(True)
            with torch.enable_grad():
                score = pick_target(model(point, case["args"]), case["target"]).sum()
                value = seen["v"]
                (layer_grad,) = torch.autograd.grad(
                    score, value, retain_graph=True, allow_unused=True
                )
                if layer_grad is None:
                    layer_grad = torch.zeros_like(value)
                neuron = pick_neuron(value, selector)
                if not neuron.requires_grad:
                    continue
                (grad,) = torch.autograd.grad(
                    neuron,
                    point,
                    grad_outputs=pick_neuron(layer_grad, selector).reshape(neuron.shape),
                    allow_unused=True,
                )
            if grad is not None:
                total += weight * grad
    finally:
        handle.remove()
    return total * (x - start) if case["multiply"] else total


@FUZZ
@given(case=neuron_conductance_cases())
def test_neuron_conductance_fuzz(case):
    model = CONV
    set_model_state(model, case["training"], case["frozen"])
    x = case["x"]
    n = x.shape[0]
    inputs = (x,) if case["tuple_input"] else x
    layer = {"list": [model.fc], "string": "fc"}.get(case["name"]) or getattr(model, case["name"])
    kwargs = dict(
        baselines=case["baselines"],
        target=case["target"],
        additional_forward_args=case["args"],
        n_steps=case["n_steps"],
        method=case["method"],
        internal_batch_size=case["ibs"],
        attribute_to_neuron_input=case["to_input"],
    )

    def run(selector, **changes):
        return NeuronConductance(model, layer, multiply_by_inputs=case["multiply"]).attribute(
            inputs, selector, **{**kwargs, **changes}
        )

    def unwrap(result):
        if case["tuple_input"]:
            assert isinstance(result, tuple) and len(result) == 1
            (result,) = result
        return result

    snapshot = Snapshot.take(model, (x,))
    with memory_budget(case["budget"]):
        result = call_checked(
            snapshot,
            lambda: run(case["selector"]),
            valid=case["valid"],
            ctx=case["ctx"],
            warns=small_batch(case["ibs"], n) if case["valid"] else None,
        )
        if result is None:
            return
        # The same call with the other batching: results must not depend on the split.
        other_ibs = None if case["ibs"] is not None else n
        other = call_checked(
            snapshot,
            lambda: run(case["selector"], internal_batch_size=other_ibs),
            valid=True,
            warns=False,
        )
        selectors_ = case["selector"] if case["many"] else [case["selector"]]
        # Every map of a list equals the call for its selector alone.
        singles = (
            [unwrap(call_checked(snapshot, lambda s=s: run(s), valid=True)) for s in selectors_]
            if case["many"]
            else None
        )

    result, other = unwrap(result), unwrap(other)
    expected_shape = (len(selectors_), *x.shape) if case["many"] else tuple(x.shape)
    assert result.shape == expected_shape
    assert result.dtype == torch.float64
    assert torch.isfinite(result).all()
    assert not result.requires_grad
    scale = 1.0 + float(result.abs().max())
    torch.testing.assert_close(result, other, rtol=0, atol=1e-9 * scale)
    maps = result if case["many"] else result.unsqueeze(0)
    if singles is not None:
        for one, single in zip(maps, singles, strict=True):
            torch.testing.assert_close(one, single, rtol=0, atol=1e-9 * scale)
    set_model_state(model, False, False)
    for selector, one in zip(selectors_, maps, strict=True):
        ref = reference_neuron_conductance(model, layer, case, selector)
        torch.testing.assert_close(one, ref, rtol=1e-7, atol=1e-9 * scale)
    Snapshot.take(model, (x,)).check()  # the reference left no hook behind either


# --------------------------------------------------------------------------------------------
# Regressions found by fuzzing


@pytest.mark.parametrize("target", [[-1, 0], torch.tensor([-1, -4])], ids=["list", "tensor"])
def test_negative_per_example_targets(target):
    """Either a result equal to the wrapped indices' or an ExplainerError; never a bare error."""
    model = CONV
    set_model_state(model, False, False)
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    snapshot = Snapshot.take(model, (x,))
    try:
        result = LayerConductance(model, model.conv2).attribute(x, target=target, n_steps=3)
    except ExplainerError:
        return  # refusing them with a sentence is acceptable
    finally:
        snapshot.check()
    wrapped = [t % 4 for t in (target.tolist() if isinstance(target, Tensor) else target)]
    expected = LayerConductance(model, model.conv2).attribute(x, target=wrapped, n_steps=3)
    torch.testing.assert_close(result, expected)


@pytest.mark.parametrize("step", [0, -1])
def test_slice_steps_below_one(step):
    model = CONV
    set_model_state(model, False, False)
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    snapshot = Snapshot.take(model, (x,))
    try:
        with pytest.raises(AttributionError):
            NeuronGradient(model, model.conv1).attribute(x, (slice(None, None, step), 0, 0))
    finally:
        snapshot.check()


@pytest.mark.parametrize("which", ["input", "baseline"])
def test_inputs_that_require_grad(which):
    model = CONV
    set_model_state(model, False, False)
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    base = torch.full((1, 2, 3, 3), 0.5, dtype=torch.float64)
    (x if which == "input" else base).requires_grad_(True)
    snapshot = Snapshot.take(model, (x, base))
    kwargs = dict(target=1, n_steps=4, return_convergence_delta=True)
    try:
        attrs, delta = LayerConductance(model, model.conv2).attribute(x, base, **kwargs)
    finally:
        snapshot.check()
    expected, expected_delta = LayerConductance(model, model.conv2).attribute(
        x.detach(), base.detach(), **kwargs
    )
    torch.testing.assert_close(attrs, expected)
    torch.testing.assert_close(delta, expected_delta)


def test_neuron_gradient_empty_batch():
    model = CONV
    set_model_state(model, False, False)
    x = torch.randn(0, 2, 3, 3, dtype=torch.float64)
    snapshot = Snapshot.take(model, (x,))
    try:
        result = NeuronGradient(model, model.conv1).attribute(x, (0, 0, 0))
    except ExplainerError:
        return  # refusing an empty batch with a sentence is acceptable
    finally:
        snapshot.check()
    assert result.shape == x.shape  # so is an empty result


class Quantise(nn.Module):
    """A layer with an integer output: nothing can flow back through it."""

    def forward(self, x: Tensor) -> Tensor:
        return (x > 0).long()


class QuantisedGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quantise = Quantise()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.quantise(x).to(x.dtype) * x)


def test_conductance_of_an_integer_layer_output():
    torch.manual_seed(0)
    model = QuantisedGate().double()
    x = torch.randn(2, 3, dtype=torch.float64)
    snapshot = Snapshot.take(model, (x,))
    try:
        with pytest.raises(ExplainerError):
            LayerConductance(model, model.quantise).attribute(x, target=0, n_steps=3)
    finally:
        snapshot.check()
