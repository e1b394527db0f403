"""Layer conductance and neuron gradients, with Captum's argument names and semantics.

The results match ``captum.attr.LayerConductance`` and ``captum.attr.NeuronGradient``; the
engine differs where the reference does work it does not need:

* Conductance runs the network up to the layer without recording autograd history: the layer's
  output becomes the root of the graph, so only the part of the network after the layer is kept
  for the backward pass. The earliest of several listed layers is the root, and one backward
  pass yields the gradients of every listed layer.
* A neuron gradient needs the network only up to the layer: the forward pass stops there.
  Many neurons of one layer share that forward pass and run one batched backward pass.
* The model is never modified (no ``requires_grad`` or ``training`` changes) and hooks act only
  for the calling thread, so threads may explain one shared model at the same time.
* Memory is bounded: the first pass is as small as it can be (one path point, or one neuron
  copy, per example) and is metered (:mod:`explainer.memory`: its real peak on the device, and
  an estimate from the tensors it holds); the later passes hold as many rows as the operator's
  memory budget allows. When even the smallest pass exceeds the budget,
  the engine stops with a message instead of exhausting the server.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import DataParallel, Module

from explainer.arguments import (
    BaselineType,
    TargetType,
    as_input_tuple,
    check_target,
    dense_baselines,
    format_additional_args,
    format_baselines,
    repeat_additional_args,
    repeat_target,
    select_target,
)
from explainer.errors import AttributionError, AttributionTypeError
from explainer.hooks import (
    LayerTap,
    NeedsFullGraph,
    StopForward,
    layer_label,
    tap_layers,
)
from explainer.integration import alphas as integration_alphas
from explainer.integration import check_method
from explainer.limits import memory_budget_bytes
from explainer.memory import PassMeter, format_mib

__all__ = ["LayerConductance", "NeuronGradient"]

ProgressFn = Callable[[int, int], None]

# Input bytes per pass of stacked copies for many neuron gradients (about 8 images of 224x224):
# larger passes measured slower on the CPU, the activations no longer fitting in its caches.
_COPY_PASS_BYTES = 5 * 2**20
Selector = int | tuple | Callable[..., Tensor]


def _unwrap(forward_func: Callable) -> Callable:
    """Run DataParallel models on their wrapped module (hooks then fire on one device)."""
    return forward_func.module if isinstance(forward_func, DataParallel) else forward_func


def _run(forward_func: Callable, inputs: tuple[Tensor, ...], args: tuple | None) -> Any:
    return forward_func(*inputs, *args) if args is not None else forward_func(*inputs)


def _layers_of(layer: Module | Sequence[Module], what: str) -> tuple[list[Module], bool]:
    if isinstance(layer, Module):
        return [layer], False
    if isinstance(layer, (list, tuple)) and layer and all(isinstance(m, Module) for m in layer):
        return list(layer), True
    raise AttributionTypeError(
        f"{what} must be a torch.nn.Module or a non-empty list of modules, "
        f"not {type(layer).__name__}."
    )


def _check_output(output: Any) -> Tensor:
    if not isinstance(output, Tensor):
        raise AttributionTypeError(
            f"The forward function returned a {type(output).__name__}; it must return a tensor "
            "of scores (wrap the model so that it returns one)."
        )
    return output


def _fast_layout(t: Tensor) -> Tensor:
    """Images in channels-last order on the CPU, where oneDNN convolutions and pooling run much
    faster on it; values are unchanged and outputs are handed back in the default layout."""
    if t.dim() == 4 and t.device.type == "cpu" and t.is_floating_point():
        return t.contiguous(memory_format=torch.channels_last)
    return t


def _run_fast(
    forward_func: Callable,
    inputs: tuple[Tensor, ...],
    args: tuple | None,
    state: dict[str, bool],
    tap: LayerTap,
) -> Any:
    """Run the forward on channels-last inputs; fall back to the given layout for good when the
    model cannot take them (e.g. it calls ``.view`` on an activation)."""
    tap.reset()
    grad_mode = torch.is_grad_enabled()  # a root hook switches it on mid-pass
    if state.setdefault("fast", True):
        fast = tuple(_fast_layout(t) for t in inputs)
        try:
            return _run(forward_func, fast, args)
        except RuntimeError:
            if all(t.is_contiguous() for t in fast):
                raise
            state["fast"] = False
            tap.reset()
            torch.set_grad_enabled(grad_mode)
    return _run(forward_func, tuple(t.contiguous() for t in inputs), args)


def _path_points(
    inp: Tensor, base: Tensor | int | float, alphas: list[float], *, requires_grad: bool = False
) -> Tensor:
    """``base + a * (inp - base)`` for every ``a``, stacked step-major, written once in the
    layout the forward pass prefers (a fresh tensor: the caller's are never touched)."""
    inp = inp.detach()
    if isinstance(base, Tensor):
        base = base.detach()
    if not inp.is_floating_point():
        inp = inp.to(torch.get_default_dtype())
    k, shape = len(alphas), tuple(inp.shape)
    base_t = base.to(device=inp.device, dtype=inp.dtype) if isinstance(base, Tensor) else base
    diff = inp - base_t
    if not isinstance(base_t, Tensor):
        base_t = torch.tensor(base_t, dtype=inp.dtype, device=inp.device)
    coef = torch.tensor(alphas, dtype=inp.dtype, device=inp.device).reshape(k, *([1] * len(shape)))
    out = torch.empty((k * shape[0], *shape[1:]), dtype=inp.dtype, device=inp.device)
    out = _fast_layout(out)
    torch.addcmul(base_t, coef, diff, out=out.view(k, *shape))
    return out.requires_grad_(requires_grad)


@dataclass
class _Plan:
    """Example rows of the pass being run (for messages) and the measured cost of one row."""

    rows: int
    row_bytes: int | None = None


@contextmanager
def _out_of_memory_explained(what: str, plan: _Plan) -> Iterator[None]:
    """Turn an allocation failure into an error that says how to make the work fit."""
    try:
        yield
    except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError too
        text = str(exc)
        if not (
            isinstance(exc, torch.OutOfMemoryError)
            or "out of memory" in text.lower()
            or "can't allocate memory" in text
        ):
            raise
        cost = (
            f" (about {format_mib(plan.rows * plan.row_bytes)} measured)"
            if plan.row_bytes is not None
            else ""
        )
        raise AttributionError(
            f"Ran out of memory computing {what} with {plan.rows} example rows per pass{cost}. "
            "Pass a smaller internal_batch_size, use fewer steps or a smaller image, or lower "
            "EXPLAINER_MEMORY_BUDGET_MB so that the work is split into smaller passes."
        ) from exc


@contextmanager
def _metering(meter: PassMeter | None) -> Iterator[None]:
    """Count saved tensors into ``meter`` (when given) while the block runs."""
    if meter is None:
        yield
        return
    with meter.saving():
        yield


@contextmanager
def _measuring(meter: PassMeter | None, device: torch.device) -> Iterator[None]:
    """Measure the real peak memory of the block on ``device`` into ``meter`` (when given)."""
    if meter is None:
        yield
        return
    with meter.measuring(device):
        yield


def _worth_another_look(meter: PassMeter, rows_done: int, group_rows: int, wanted: int) -> bool:
    """Whether to meter one more pass of the smallest size before sizing the rest.

    The first pass of a process, or of a new shape, pays one-time costs (the autograd engine's
    threads, kernels built for the shapes) that its measured peak includes. A second smallest
    pass, measured afresh, leaves them out. It costs one more small pass, so it runs only when
    the measured peak rather than the estimate would make the next pass hold fewer than
    ``wanted`` groups of ``group_rows`` rows (or refuse the call).
    """
    if meter.measured is None or meter.measured <= meter.estimate() or wanted < 1:
        return False
    budget = memory_budget_bytes()
    measured = budget // meter.bytes_per_row(rows_done) // group_rows
    estimated = budget // meter.bytes_per_row(rows_done, measured=False) // group_rows
    return measured < min(wanted, estimated)


def _rows_within_budget(
    plan: _Plan, meter: PassMeter, rows_done: int, group_rows: int, what: str, remaining: int
) -> int:
    """How many example rows later passes may hold, from the metered first pass.

    ``group_rows`` is the smallest step a pass can grow by (one path point or one neuron copy
    for every example). Raises when even one such step does not fit the budget and work is left.
    """
    budget = memory_budget_bytes()
    plan.row_bytes = meter.bytes_per_row(rows_done)
    step = plan.row_bytes * group_rows
    if step > budget and remaining > 0:
        nearer = "output" if what == "layer conductance" else "input"
        rows = f"{group_rows} example row{'s' if group_rows > 1 else ''}"
        raise AttributionError(
            f"Computing {what} needs about {format_mib(step)} per pass (measured on a pass of "
            f"that size) even when split as finely as possible ({rows} per pass), more than the "
            f"memory budget of {format_mib(budget)} (EXPLAINER_MEMORY_BUDGET_MB). Use fewer "
            f"images at once, smaller images or a layer nearer the {nearer}, or ask the operator "
            "to raise the budget."
        )
    return max(group_rows, budget // plan.row_bytes // group_rows * group_rows)


def _attribution_total(attributions: Tensor | tuple[Tensor, ...], dtype: torch.dtype) -> Tensor:
    """Sum of all attribution values of each example."""
    attrs = attributions if isinstance(attributions, tuple) else (attributions,)
    with torch.no_grad():
        return torch.stack([a.reshape(a.shape[0], -1).sum(1) for a in attrs]).sum(0).to(dtype)


class _LayerMethod:
    """Shared state of the layer and neuron methods: the forward function and its layer(s)."""

    def __init__(
        self,
        forward_func: Callable,
        layer: Module | Sequence[Module],
        device_ids: list[int] | None = None,
    ) -> None:
        if not callable(forward_func):
            raise AttributionTypeError(
                f"forward_func must be a model or a function, not {type(forward_func).__name__}."
            )
        self.forward_func = forward_func
        self.layer = layer
        self.device_ids = device_ids
        self._layers, self._is_list = _layers_of(layer, "layer")
        self._labels = [layer_label(m, _unwrap(forward_func)) for m in self._layers]

    def compute_convergence_delta(
        self,
        attributions: Tensor | tuple[Tensor, ...],
        start_point: BaselineType,
        end_point: Tensor | tuple[Tensor, ...],
        target: TargetType = None,
        additional_forward_args: Any = None,
    ) -> Tensor:
        """Per example: the sum of ``attributions`` minus ``F(end_point) - F(start_point)``.

        ``start_point`` takes every form a baseline may take. The result is signed, one value
        per example; zero means the attributions account exactly for the change in output.
        """
        ends = as_input_tuple(end_point, "end_point")
        starts = dense_baselines(format_baselines(start_point, ends), ends)
        attrs = attributions if isinstance(attributions, tuple) else (attributions,)
        n = ends[0].shape[0]
        for a in attrs:
            if not isinstance(a, Tensor) or a.dim() == 0 or a.shape[0] != n:
                raise AttributionError(
                    f"Each attribution tensor must have {n} rows, one per example of end_point."
                )
        change = self._output_change(
            ends, starts, target, format_additional_args(additional_forward_args)
        )
        return _attribution_total(attributions, change.dtype) - change

    def _output_change(
        self,
        ends: tuple[Tensor, ...],
        starts: tuple[Tensor, ...],
        target: TargetType,
        args: tuple | None,
    ) -> Tensor:
        """``F(end) - F(start)`` of the target output, one value per example."""
        forward = _unwrap(self.forward_func)
        with torch.no_grad():
            end_out = _check_output(_run(forward, ends, args))
            check_target(target, end_out.shape, ends[0].shape[0])
            end_sum = select_target(end_out, target)
            start_sum = select_target(_check_output(_run(forward, starts, args)), target)
        return end_sum - start_sum


class LayerConductance(_LayerMethod):
    """Conductance of every neuron of a layer: how much of the change in the target output,
    from the baseline to the input, flows through each neuron.

    Arguments and results follow ``captum.attr.LayerConductance``. ``layer`` may also be a
    list of modules: one pass then returns a list with the conductance of every listed layer.
    References: https://arxiv.org/abs/1805.12233, https://arxiv.org/abs/1807.09946
    """

    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        baselines: BaselineType = None,
        target: TargetType = None,
        additional_forward_args: Any = None,
        n_steps: int = 50,
        method: str = "gausslegendre",
        internal_batch_size: int | None = None,
        return_convergence_delta: bool = False,
        attribute_to_layer_input: bool = False,
        *,
        progress: ProgressFn | None = None,
    ) -> Any:
        """Compute the conductance of the layer's output (or input) neurons.

        Parameters follow the reference. ``internal_batch_size`` bounds how many path points
        times examples run in one pass; it must be at least the number of examples. Passes are
        also kept within the memory budget (``EXPLAINER_MEMORY_BUDGET_MB``), so they may hold
        fewer rows than asked for; the results do not depend on the split. ``progress``,
        when given, is called as ``progress(done, total)`` in path points after every pass.

        Returns
        -------
        A tensor shaped like the layer's output (a tuple when the layer has several output
        tensors), a list of those when ``layer`` is a list, and with
        ``return_convergence_delta=True`` a pair ``(attributions, delta)`` where ``delta`` holds
        one signed value per example (a list of such when ``layer`` is a list).
        """
        inputs_t = as_input_tuple(inputs)
        baselines_t = format_baselines(baselines, inputs_t)
        check_method(method)
        if isinstance(n_steps, bool) or not isinstance(n_steps, numbers.Integral) or n_steps < 1:
            raise AttributionError(f"n_steps must be a positive integer, got {n_steps!r}.")
        n_steps = int(n_steps)
        num_examples = inputs_t[0].shape[0]
        if num_examples == 0:
            raise AttributionError("inputs hold no examples (dimension 0 is empty).")
        points = n_steps + 1
        cap = points
        if internal_batch_size is not None:
            if isinstance(internal_batch_size, bool) or not isinstance(
                internal_batch_size, numbers.Integral
            ):
                raise AttributionTypeError("internal_batch_size must be an int or None.")
            internal_batch_size = int(internal_batch_size)
            if internal_batch_size < num_examples:
                raise AttributionError(
                    f"internal_batch_size={internal_batch_size} is smaller than the number of "
                    f"examples ({num_examples}); use at least {num_examples}, or None to run "
                    "all path points in one pass."
                )
            cap = max(1, internal_batch_size // num_examples)
        args = format_additional_args(additional_forward_args)
        alphas = integration_alphas(method, points)

        plan = _Plan(rows=num_examples)
        with _out_of_memory_explained("layer conductance", plan):
            totals, tuple_layers = self._integrate(
                inputs_t,
                baselines_t,
                target,
                args,
                alphas,
                cap,
                plan,
                attribute_to_layer_input,
                progress,
            )
        results = [
            tuple(total) if is_tuple else total[0]
            for total, is_tuple in zip(totals, tuple_layers, strict=True)
        ]
        attributions = results if self._is_list else results[0]
        if not return_convergence_delta:
            return attributions
        # One pair of forward passes serves every listed layer.
        change = self._output_change(inputs_t, dense_baselines(baselines_t, inputs_t), target, args)
        deltas = [_attribution_total(r, change.dtype) - change for r in results]
        return attributions, (deltas if self._is_list else deltas[0])

    def _integrate(
        self,
        inputs: tuple[Tensor, ...],
        baselines: tuple[Tensor | int | float, ...],
        target: TargetType,
        args: tuple | None,
        alphas: list[float],
        cap: int,
        plan: _Plan,
        use_input: bool,
        progress: ProgressFn | None,
    ) -> tuple[list[list[Tensor]], list[bool]]:
        """Sum over path points i of grad(F)(layer_i) * (layer_{i+1} - layer_i), pass by pass.

        Passes hold consecutive path points; the gradient at the last point of a pass is kept
        until the next pass supplies the layer value that follows it. The first pass holds one
        point and is metered; later passes hold as many points as the memory budget allows,
        at most ``cap``.
        """
        forward = _unwrap(self.forward_func)
        num_examples = inputs[0].shape[0]
        total_points = len(alphas)
        sums: list[list[Tensor]] | None = None
        carry: list[list[tuple[Tensor, Tensor]]] | None = None  # (grad, value) at last point
        checked = False
        tuple_layers = [False] * len(self._layers)
        layout: dict[str, bool] = {}

        # Lean passes record the graph from the layer on; a layer input (or a tensor passed
        # straight through) may have been used before the layer ran, so it needs the full graph.
        lean = not use_input
        meter: PassMeter | None = PassMeter.for_model(forward)
        per_pass, start, looks = 1, 0, 1  # looks: metered passes so far (two at most)
        with (
            torch.inference_mode(False),
            tap_layers(self._layers, self._labels, use_input=use_input, mode="root") as tap,
        ):
            while start < total_points:
                chunk = alphas[start : start + per_pass]
                k = len(chunk)
                plan.rows = k * num_examples
                with _measuring(meter, inputs[0].device):
                    while True:
                        tap.lean = lean
                        scaled = tuple(
                            _path_points(inp, base, chunk, requires_grad=not lean)
                            for inp, base in zip(inputs, baselines, strict=True)
                        )
                        try:
                            with torch.set_grad_enabled(not lean), _metering(meter):
                                output = _run_fast(
                                    forward, scaled, repeat_additional_args(args, k), layout, tap
                                )
                                output = _check_output(output)
                                if not checked:
                                    check_target(
                                        target, (num_examples, *output.shape[1:]), num_examples
                                    )
                                    checked = True
                                picked = select_target(output, repeat_target(target, k)).sum()
                            break
                        except NeedsFullGraph:
                            lean = False
                            if meter is not None:
                                meter.forget()  # the retry starts afresh
                    tap.check_reached()
                    tuple_layers = list(tap.is_tuple)
                    flat = [t for values in tap.values for t in values]
                    if picked.requires_grad:
                        grads = torch.autograd.grad(picked, flat, allow_unused=True)
                    else:  # the output does not depend on any tapped layer
                        grads = (None,) * len(flat)
                    grads = [
                        torch.zeros_like(t) if g is None else g
                        for g, t in zip(grads, flat, strict=True)
                    ]
                    if meter is not None:
                        meter.add((*scaled, *flat, output))
                        # Gradients of the layer, and the clones handed on to the network.
                        meter.add_transient(2 * sum(t.nelement() * t.element_size() for t in flat))

                    pos = 0
                    new_carry: list[list[tuple[Tensor, Tensor]]] = []
                    if sums is None:
                        sums = [[] for _ in self._layers]
                    for li, values in enumerate(tap.values):
                        layer_carry = []
                        for ti, value in enumerate(values):
                            grad = grads[pos]
                            pos += 1
                            v = value.detach().reshape(k, num_examples, *value.shape[1:])
                            g = grad.reshape(k, num_examples, *value.shape[1:])
                            part = (
                                (g[:-1] * (v[1:] - v[:-1])).sum(0)
                                if k > 1
                                else torch.zeros_like(v[0])
                            )
                            if carry is not None:
                                g_prev, v_prev = carry[li][ti]
                                part = part + g_prev * (v[0] - v_prev)
                            if len(sums[li]) <= ti:
                                sums[li].append(part)
                            else:
                                sums[li][ti] = sums[li][ti] + part
                            layer_carry.append((g[-1].clone(), v[-1].clone()))  # frees the pass
                        new_carry.append(layer_carry)
                    carry = new_carry
                    del flat, grads, output, picked
                start += k
                if progress is not None:
                    progress(start, total_points)
                if meter is not None:
                    left = total_points - start
                    if looks < 2 and _worth_another_look(
                        meter, k * num_examples, num_examples, min(cap, left)
                    ):
                        meter, looks = PassMeter.for_model(forward), looks + 1
                    else:
                        rows = _rows_within_budget(
                            plan, meter, k * num_examples, num_examples, "layer conductance", left
                        )
                        per_pass = min(cap, rows // num_examples)
                        meter = None
        assert sums is not None
        return [[t.contiguous() for t in layer] for layer in sums], tuple_layers

    @property
    def multiplies_by_inputs(self) -> bool:
        return True


class NeuronGradient(_LayerMethod):
    """Gradient of one neuron (or a sum of neurons) of a layer with respect to the inputs.

    Arguments and results follow ``captum.attr.NeuronGradient``. ``neuron_selector`` may also
    be a list of selectors: the result then has a new leading dimension, one entry per selector,
    computed with one forward pass and one batched backward pass.
    """

    def __init__(
        self,
        forward_func: Callable,
        layer: Module,
        device_ids: list[int] | None = None,
    ) -> None:
        if not isinstance(layer, Module):
            raise AttributionTypeError(
                f"layer must be a torch.nn.Module, not {type(layer).__name__}."
            )
        super().__init__(forward_func, layer, device_ids)

    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        neuron_selector: Selector | list[Selector],
        additional_forward_args: Any = None,
        attribute_to_neuron_input: bool = False,
    ) -> Tensor | tuple[Tensor, ...]:
        """Gradients of the selected neuron(s) with respect to every input feature.

        ``neuron_selector`` is an int (2-D layers), a tuple of ints and slices (slices sum the
        neurons they cover), a callable taking the layer's output and returning one value per
        example, or a list of any of those.
        """
        is_tuple = isinstance(inputs, tuple)
        inputs_t = as_input_tuple(inputs)
        many = isinstance(neuron_selector, list)
        selectors = neuron_selector if many else [neuron_selector]
        if many and not selectors:
            raise AttributionError("neuron_selector is an empty list; give at least one selector.")
        args = format_additional_args(additional_forward_args)
        num_examples = inputs_t[0].shape[0]
        if num_examples == 0:
            raise AttributionError("inputs hold no examples (dimension 0 is empty).")
        for i, t in enumerate(inputs_t):
            if not t.is_floating_point():
                raise AttributionTypeError(
                    f"inputs[{i}] has dtype {t.dtype}; gradients need floating-point inputs "
                    "(pass integer arguments such as token ids through additional_forward_args)."
                )
        # Stacked copies run best in passes that stay small enough for the CPU caches; the first
        # pass (one copy) is metered, and later ones also stay within the memory budget.
        row_bytes = sum(t[0].numel() * t.element_size() for t in inputs_t)
        cache_rows = max(1, _COPY_PASS_BYTES // max(row_bytes, 1))
        plan = _Plan(rows=num_examples)
        meter: PassMeter | None = PassMeter.for_model(_unwrap(self.forward_func))
        # Written in place pass by pass: no second copy of all the gradients at the end.
        results = [
            torch.empty((len(selectors), *t.shape), dtype=t.dtype, device=t.device)
            for t in inputs_t
        ]
        layout: dict[str, bool] = {}
        per_pass, start, looks = 1, 0, 1  # looks: metered passes so far (two at most)
        while start < len(selectors):
            group = selectors[start : start + per_pass]
            plan.rows = len(group) * num_examples
            with (
                _out_of_memory_explained("neuron gradients", plan),
                _measuring(meter, inputs_t[0].device),
            ):
                grads = self._group_gradients(
                    inputs_t, group, args, attribute_to_neuron_input, layout, meter
                )
            for i, g in enumerate(grads):
                results[i][start : start + len(group)] = g.reshape(len(group), *inputs_t[i].shape)
            start += len(group)
            if meter is not None:
                left = len(selectors) - start
                wanted = min(max(1, cache_rows // num_examples), left)
                if looks < 2 and _worth_another_look(meter, num_examples, num_examples, wanted):
                    meter, looks = PassMeter.for_model(_unwrap(self.forward_func)), looks + 1
                else:
                    rows = _rows_within_budget(
                        plan, meter, num_examples, num_examples, "neuron gradients", left
                    )
                    per_pass = max(1, min(rows, cache_rows) // num_examples)
                    meter = None
        out = tuple(r if many else r[0] for r in results)
        return out if is_tuple else out[0]

    def _group_gradients(
        self,
        inputs: tuple[Tensor, ...],
        group: list[Any],
        args: tuple | None,
        use_input: bool,
        layout: dict[str, bool],
        meter: PassMeter | None = None,
    ) -> tuple[Tensor, ...]:
        """Gradients for several selectors in one pass over stacked copies of the inputs.

        Copy ``j`` of every example carries selector ``j``; the forward stops at the layer and
        one backward pass, seeded per copy, yields all gradients. ``meter``, when given, counts
        what the pass holds.
        """
        copies = len(group)
        num_examples = inputs[0].shape[0]
        label = self._labels[0]
        forward = _unwrap(self.forward_func)
        with torch.inference_mode(False), torch.enable_grad():
            leaves = tuple(
                (torch.cat([t.detach()] * copies) if copies > 1 else t.detach()).requires_grad_(
                    True
                )
                for t in inputs
            )
            with tap_layers(self._layers, self._labels, use_input=use_input, mode="stop") as tap:
                try:
                    with _metering(meter):
                        _run_fast(
                            forward, leaves, repeat_additional_args(args, copies), layout, tap
                        )
                except StopForward:
                    pass
                tap.check_reached()
                values = tap.values[0]
                layer_is_tuple = tap.is_tuple[0]

            def rows(j: int) -> slice:
                return slice(j * num_examples, (j + 1) * num_examples)

            if all(not callable(s) for s in group):
                if layer_is_tuple:
                    raise AttributionError(
                        f"Layer {label} has {len(values)} tensors; an index selector cannot pick "
                        "a neuron from several tensors. Pass a callable that takes the tuple and "
                        "returns one value per example."
                    )
                out = values[0]
                seed = torch.zeros_like(out)
                for j, selector in enumerate(group):
                    seed[(rows(j), *self._index(out, selector, label))] = 1
            else:
                picked = []
                for j, selector in enumerate(group):
                    copy = tuple(v[rows(j)] for v in values)
                    picked.append(self._pick(copy if layer_is_tuple else copy[0], selector, label))
                out, seed = torch.stack([p.sum() for p in picked]).sum(), None
            if meter is not None:
                meter.add((*leaves, *values))
                # The seed and the layer's gradient, then the gradients of the inputs.
                meter.add_transient(2 * sum(v.nelement() * v.element_size() for v in values))
                meter.add_transient(sum(t.nelement() * t.element_size() for t in leaves))
            if not out.requires_grad:  # the layer does not depend on the inputs
                return tuple(torch.zeros_like(t) for t in leaves)
            grads = torch.autograd.grad(out, leaves, grad_outputs=seed, allow_unused=True)
        return tuple(
            torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves, strict=True)
        )

    @staticmethod
    def _index(layer_out: Tensor, selector: Any, label: str) -> tuple:
        """Check an index selector against the layer's shape; return it as a tuple."""
        sel = (
            (selector,)
            if isinstance(selector, int) and not isinstance(selector, bool)
            else selector
        )
        if not isinstance(sel, tuple) or not all(
            (isinstance(s, int) and not isinstance(s, bool)) or isinstance(s, slice) for s in sel
        ):
            raise AttributionTypeError(
                "neuron_selector must be an int, a tuple of ints and slices, a callable, or a list "
                f"of those; got {selector!r}."
            )
        dims = tuple(layer_out.shape[1:])
        has_slice = any(isinstance(s, slice) for s in sel)
        if len(sel) > len(dims) or (len(sel) < len(dims) and not has_slice):
            raise AttributionError(
                f"neuron_selector {selector!r} has {len(sel)} index(es) but the neurons of layer "
                f"{label} are addressed by {len(dims)} (its output per example has shape {dims}); "
                f"give a tuple of {len(dims)} indices."
            )
        for s, size in zip(sel, dims, strict=False):
            if (
                isinstance(s, slice)
                and s.step is not None
                and (not isinstance(s.step, int) or s.step < 1)
            ):
                raise AttributionError(
                    f"neuron_selector {selector!r} has a slice with step {s.step!r}; slice steps "
                    "must be positive whole numbers."
                )
            if isinstance(s, int) and not -size <= s < size:
                raise AttributionError(
                    f"neuron_selector {selector!r} is out of range for layer {label} with neuron "
                    f"shape {dims}; each index must be below its dimension's size."
                )
        return sel

    def _pick(self, layer_arg: Any, selector: Any, label: str) -> Tensor:
        """The selected value(s) of one copy: one per example, or one in total."""
        if callable(selector):
            value = selector(layer_arg)
            if not isinstance(value, Tensor):
                raise AttributionTypeError(
                    f"The neuron selector function returned a {type(value).__name__}; it must "
                    "return a tensor with one value, or one value per example."
                )
            first = layer_arg[0] if isinstance(layer_arg, tuple) else layer_arg
            if value.numel() not in (1, first.shape[0]):
                raise AttributionError(
                    f"The neuron selector function returned {value.numel()} values for "
                    f"{first.shape[0]} examples; return one value per example (or one in total)."
                )
            return value
        if isinstance(layer_arg, tuple):
            raise AttributionError(
                f"Layer {label} has {len(layer_arg)} tensors; use a callable neuron selector."
            )
        return layer_arg[(slice(None), *self._index(layer_arg, selector, label))]
