"""Neuron conductance: how the input features reach the target through one neuron of a layer.

The result matches ``captum.attr.NeuronConductance``: for every path point between the baseline
and the input, the gradient of the target with respect to the neuron times the gradient of the
neuron with respect to the inputs, summed over the points with the rule's weights and (by
default) multiplied by ``input - baseline``.

The engine differs from the reference where that saves work:

* One forward pass along the path and one backward pass from the target to the layer serve
  every neuron asked for: a list of selectors returns all their maps, and each further neuron
  costs only a backward pass from the layer to the inputs.
* The gradient of the target with respect to the neuron already weighs the backward pass from
  the layer, so no per-neuron products over the inputs are formed afterwards.
* Passes are kept within the memory budget and the inputs run in the layout the CPU prefers,
  as for :class:`~explainer.attribution.LayerConductance`.
* When an input goes straight into a convolution (the stem of most image models), the backward
  pass from the neuron stops at that convolution's output: the convolution is linear and the
  same for every path point, so the weighted sum over the points is taken there and carried
  back through the convolution once per example instead of once per point.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge
from torch.nn import Module

from explainer.adaptive import (
    AutoSteps,
    NeuronPath,
    StepsRound,
    check_auto_arguments,
    unconverged_message,
)
from explainer.arguments import (
    BaselineType,
    TargetType,
    as_input_tuple,
    check_target,
    format_additional_args,
    format_baselines,
    repeat_additional_args,
    repeat_target,
    select_target,
    take_additional_args,
    take_target,
)
from explainer.attribution import (
    NeuronGradient,
    ProgressFn,
    Selector,
    _check_output,
    _grad_options,
    _known_rows,
    _LayerMethod,
    _measuring,
    _metering,
    _out_of_memory_explained,
    _PassState,
    _path_points,
    _path_rows,
    _Plan,
    _points_per_pass,
    _remember_row_cost,
    _row_cost,
    _row_cost_key,
    _rows_within_budget,
    _run_fast,
    _worth_another_look,
)
from explainer.errors import AttributionError, AttributionTypeError
from explainer.hooks import tap_layers
from explainer.integration import check_method, quadrature
from explainer.limits import memory_budget_bytes
from explainer.memory import PassMeter

__all__ = ["NeuronConductance"]


class NeuronConductance(_LayerMethod):
    """Conductance of one neuron (or a sum of neurons) broken down by input feature.

    Arguments and results follow ``captum.attr.NeuronConductance``. ``neuron_selector`` may
    also be a list of selectors: the result then has a new leading dimension, one map per
    selector, from one forward pass along the path. References:
    https://arxiv.org/abs/1805.12233
    """

    def __init__(
        self,
        forward_func: Callable,
        layer: Module,
        device_ids: list[int] | None = None,
        multiply_by_inputs: bool = True,
    ) -> None:
        if not isinstance(layer, Module):
            raise AttributionTypeError(
                f"layer must be a torch.nn.Module, not {type(layer).__name__}."
            )
        super().__init__(forward_func, layer, device_ids)
        self._multiply_by_inputs = bool(multiply_by_inputs)

    @property
    def multiplies_by_inputs(self) -> bool:
        return self._multiply_by_inputs

    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        neuron_selector: Selector | list[Selector],
        baselines: BaselineType = None,
        target: TargetType = None,
        additional_forward_args: Any = None,
        n_steps: int = 50,
        method: str = "riemann_trapezoid",
        internal_batch_size: int | None = None,
        attribute_to_neuron_input: bool = False,
        grad_kwargs: dict[str, Any] | None = None,
        *,
        tolerance: float = 0.01,
        max_steps: int = 512,
        callback: Callable[[StepsRound], Any] | None = None,
        progress: ProgressFn | None = None,
    ) -> Tensor | tuple[Tensor, ...]:
        """Attribute the selected neuron's conductance to every input feature.

        ``neuron_selector`` is an int (2-D layers), a tuple of ints and slices (slices sum the
        neurons they cover), a callable taking the layer's output and returning one value per
        example, or a list of any of those. The other parameters follow the reference;
        ``internal_batch_size`` bounds the rows (path points times examples) of one pass, and
        ``grad_kwargs`` go to ``torch.autograd.grad`` for the gradient at the layer.
        ``progress``, when given, is called as ``progress(done, total)`` in path points.

        ``n_steps="auto"`` places path points (``method`` is then not used) until, for every
        example and selector, the sum of the map differs from the neuron's conductance at the
        same points by at most ``tolerance`` times that conductance (and never less than
        ``tolerance`` squared times ``|F(input) - F(baseline)|``), or ``max_steps`` points are
        used. The map is the trapezoid rule over the points used (``last_points``);
        ``callback``, ``last_steps`` and ``last_status`` work as for
        :meth:`LayerConductance.attribute`.

        Returns
        -------
        Tensors shaped like the inputs (a tuple when ``inputs`` is a tuple); with a list of
        selectors each has a leading dimension of one entry per selector.
        """
        is_tuple = isinstance(inputs, tuple)
        inputs_t = as_input_tuple(inputs)
        baselines_t = format_baselines(baselines, inputs_t)
        many = isinstance(neuron_selector, list)
        selectors = neuron_selector if many else [neuron_selector]
        if many and not selectors:
            raise AttributionError("neuron_selector is an empty list; give at least one selector.")
        for i, t in enumerate(inputs_t):
            if not t.is_floating_point():
                raise AttributionTypeError(
                    f"inputs[{i}] has dtype {t.dtype}; gradients need floating-point inputs "
                    "(pass integer arguments such as token ids through additional_forward_args)."
                )
        num_examples = inputs_t[0].shape[0]
        if num_examples == 0:
            raise AttributionError("inputs hold no examples (dimension 0 is empty).")
        if isinstance(n_steps, str) and n_steps == "auto":
            check_method(method)
            tolerance, max_steps = check_auto_arguments(tolerance, max_steps, callback)
            plan = _Plan(rows=num_examples)
            with _out_of_memory_explained("neuron conductance", plan):
                maps = self._attribute_auto(
                    inputs_t,
                    baselines_t,
                    target,
                    format_additional_args(additional_forward_args),
                    selectors,
                    internal_batch_size,
                    attribute_to_neuron_input,
                    _grad_options(grad_kwargs),
                    tolerance,
                    max_steps,
                    callback,
                    progress,
                    many,
                    is_tuple,
                    plan,
                )
            return _as_returned(maps, many, is_tuple)
        if isinstance(n_steps, bool) or not isinstance(n_steps, numbers.Integral) or n_steps < 1:
            raise AttributionError(
                f'n_steps must be a positive integer or "auto", got {n_steps!r}.'
            )
        alphas, weights = quadrature(method, int(n_steps))
        cap = _points_per_pass(internal_batch_size, num_examples, len(alphas))
        grad_options = _grad_options(grad_kwargs)
        args = format_additional_args(additional_forward_args)

        plan = _Plan(rows=num_examples)
        with (
            _out_of_memory_explained("neuron conductance", plan),
            torch.inference_mode(False),  # the sums are written in place, also under it
        ):
            totals = [
                torch.zeros((len(selectors), *t.shape), dtype=t.dtype, device=t.device)
                for t in inputs_t
            ]
            self._integrate(
                inputs_t,
                baselines_t,
                target,
                args,
                selectors,
                alphas,
                weights,
                cap,
                plan,
                attribute_to_neuron_input,
                grad_options,
                totals,
                progress,
            )
            if self._multiply_by_inputs:
                for total, inp, base in zip(totals, inputs_t, baselines_t, strict=True):
                    base_t = base.to(inp.dtype) if isinstance(base, Tensor) else base
                    total.mul_((inp.detach() - base_t).unsqueeze(0))
        self.last_steps = [len(alphas)] * num_examples
        self.last_status = ["fixed"] * num_examples
        self.last_points = [list(alphas)] * num_examples
        return _as_returned(totals, many, is_tuple)

    def _integrate(
        self,
        inputs: tuple[Tensor, ...],
        baselines: tuple[Tensor | int | float, ...],
        target: TargetType,
        args: tuple | None,
        selectors: list[Any],
        alphas: list[float],
        weights: list[float],
        cap: int,
        plan: _Plan,
        use_input: bool,
        grad_options: dict[str, Any],
        totals: list[Tensor],
        progress: ProgressFn | None,
    ) -> None:
        """Add the weighted gradient products of every path point into ``totals``, pass by
        pass. The first pass holds one path point and is metered; later ones hold as many as
        the memory budget allows, at most ``cap``."""
        forward = self._model(inputs, args)
        num_examples = inputs[0].shape[0]
        total_points = len(alphas)
        state = _PassState(lean=False, target=target, num_examples=num_examples)
        meter: PassMeter | None = PassMeter.for_model(forward)
        per_pass, start, looks = 1, 0, 1
        # A call like an earlier one (same model, layer, shapes) reuses its measured row cost:
        # no small metered passes, the same pass sizes as if measured afresh.
        key = _row_cost_key("neuron conductance", forward, self._layers, inputs, args, use_input)
        known = _known_rows(plan, _row_cost(forward, key), num_examples, cap)
        if known is not None:
            per_pass, meter = known, None
        # Per input: the convolution its gradients stop at, and their weighted sums so far.
        folded: list[_FoldedStem | None] = [None] * len(inputs)
        with torch.inference_mode(False):
            while start < total_points:
                chunk = alphas[start : start + per_pass]
                k = len(chunk)
                plan.start_pass(k * num_examples)
                stems: list[_FoldedStem | None] = []
                coef = torch.tensor(
                    weights[start : start + k], dtype=inputs[0].dtype, device=inputs[0].device
                )
                with _measuring(meter, inputs[0].device):
                    _, found = self._pass(
                        forward,
                        tuple(
                            _path_points(inp, base, chunk, requires_grad=True)
                            for inp, base in zip(inputs, baselines, strict=True)
                        ),
                        repeat_additional_args(args, k),
                        repeat_target(target, k),
                        selectors,
                        use_input,
                        state,
                        meter,
                        grad_options,
                        stems,
                        lambda part, coef=coef: _weighted_rows(coef, part, num_examples),
                    )
                for i, stem in enumerate(stems):
                    if folded[i] is not None and (stem is None or not folded[i].same_as(stem)):
                        folded[i].finish(totals[i])  # the model changed its first step
                        folded[i] = None
                    if stem is not None and folded[i] is None:
                        folded[i] = stem
                for j, (_, _, parts) in enumerate(found):
                    for i, (total, weighted) in enumerate(zip(totals, parts, strict=True)):
                        if stems[i] is not None:
                            folded[i].add(j, len(selectors), weighted)
                        else:
                            total[j] += weighted
                del found
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
                            plan, meter, k * num_examples, num_examples, "neuron conductance", left
                        )
                        per_pass = min(cap, rows // num_examples)
                        meter = None
                        _remember_row_cost(forward, key, plan.row_bytes)
        for i, stem in enumerate(folded):
            if stem is not None:
                stem.finish(totals[i])

    def _pass(
        self,
        forward: Callable,
        scaled: tuple[Tensor, ...],
        args: tuple | None,
        target: TargetType,
        selectors: list[Any],
        use_input: bool,
        state: _PassState,
        meter: PassMeter | None,
        grad_options: dict[str, Any],
        stems: list[_FoldedStem | None] | None = None,
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor, tuple[Tensor, ...]]]]:
        """One forward pass over path rows that require grad, one backward pass to the layer,
        and per selector one backward pass from the layer to the inputs.

        Returns the target output of every row and, per selector: the gradient of the target
        with respect to the selected neuron, the neuron's value, and the input gradients of
        the neuron weighed by that gradient (all per row, detached).

        ``stems``, when given (an empty list), receives per input the convolution that input
        goes straight into (a :class:`_FoldedStem`) or ``None``; for an input with a stem the
        gradients returned are those of the convolution's output, not of the input.
        ``reduce``, when given, is applied to every selector's gradients as soon as they are
        found, so that the full per-row gradients of only one selector are held at a time.
        """
        rows = scaled[0].shape[0]
        with (
            torch.enable_grad(),
            tap_layers(self._layers, self._labels, use_input=use_input, mode="root") as tap,
        ):
            with _metering(meter):
                output = _check_output(_run_fast(forward, scaled, args, state.layout, tap))
            if not state.checked:
                n = state.num_examples
                check_target(state.target, (n, *output.shape[1:]), n)
                state.checked = True
            tap.check_reached()
            values = tap.values[0]
            layer_is_tuple = tap.is_tuple[0]
            per_row = select_target(output, target)
            picked = per_row.sum()
            if picked.requires_grad:
                grads = torch.autograd.grad(picked, values, retain_graph=True, **grad_options)
            else:
                grads = (None,) * len(values)
            grads = tuple(
                torch.zeros_like(v) if g is None else g for g, v in zip(grads, values, strict=True)
            )
            if meter is not None:
                meter.add((*scaled, *values, output))
                meter.add_transient(
                    sum(t.nelement() * t.element_size() for t in (*values, *scaled))
                )
            layer_arg = values if layer_is_tuple else values[0]
            grad_arg = grads if layer_is_tuple else grads[0]
            wrt: list[Tensor | GradientEdge] = list(scaled)
            if stems is not None:
                stems.extend(_stems(scaled, values))
                for i, stem in enumerate(stems):
                    if stem is not None:
                        wrt[i] = stem.edge
            found = []
            for j, selector in enumerate(selectors):
                neuron = self._select(layer_arg, selector, rows)
                weight = self._select(grad_arg, selector, rows).detach()
                last = j == len(selectors) - 1
                if neuron.requires_grad:
                    parts = torch.autograd.grad(
                        neuron,
                        wrt,
                        grad_outputs=weight.reshape(neuron.shape),
                        retain_graph=not last,
                        allow_unused=True,
                    )
                else:  # the neuron does not depend on the inputs
                    parts = (None,) * len(scaled)
                parts = tuple(
                    g.detach()
                    if g is not None
                    else torch.zeros_like(t)
                    if stems is None or stems[i] is None
                    else stems[i].zeros(rows)
                    for i, (g, t) in enumerate(zip(parts, scaled, strict=True))
                )
                if reduce is not None:
                    parts = tuple(reduce(p) for p in parts)
                found.append((weight, neuron.detach().reshape(rows), parts))
        return per_row.detach(), found

    def _attribute_auto(
        self,
        inputs: tuple[Tensor, ...],
        baselines: tuple[Tensor | int | float, ...],
        target: TargetType,
        args: tuple | None,
        selectors: list[Any],
        internal_batch_size: int | None,
        use_input: bool,
        grad_options: dict[str, Any],
        tolerance: float,
        max_steps: int,
        callback: Callable[[StepsRound], Any] | None,
        progress: ProgressFn | None,
        many: bool,
        is_tuple: bool,
        plan: _Plan,
    ) -> list[Tensor]:
        """``n_steps="auto"``: rounds of path points chosen by :class:`AutoSteps`, each run in
        passes of rows (example, point) within the memory budget. Returns, per input tensor,
        the trapezoid sums over the points used (not yet multiplied by the inputs)."""
        forward = self._model(inputs, args)
        num_examples = inputs[0].shape[0]
        max_rows = _points_per_pass(internal_batch_size, num_examples, max_steps) * num_examples
        diffs = [
            (inp.detach() - (base.to(inp.dtype) if isinstance(base, Tensor) else base))
            if self._multiply_by_inputs
            else None
            for inp, base in zip(inputs, baselines, strict=True)
        ]
        full = [
            inp.detach() - (base.to(inp.dtype) if isinstance(base, Tensor) else base)
            for inp, base in zip(inputs, baselines, strict=True)
        ]
        auto = AutoSteps(
            [NeuronPath() for _ in range(num_examples)],
            tolerance,
            max_steps,
            memory_budget_bytes() // 2,
        )
        state = _PassState(lean=False, target=target, num_examples=num_examples)
        meter: PassMeter | None = PassMeter.for_model(forward)
        per_pass, done = num_examples, 0
        rows = auto.first_rows()
        with torch.inference_mode(False):
            while rows:
                start = 0
                while start < len(rows):
                    chunk = rows[start : start + per_pass]
                    plan.start_pass(len(chunk))
                    examples = torch.tensor([e for e, _ in chunk], device=inputs[0].device)
                    alphas = [a for _, a in chunk]
                    with _measuring(meter, inputs[0].device):
                        outputs, found = self._pass(
                            forward,
                            tuple(
                                _path_rows(inp, base, examples, alphas, requires_grad=True)
                                for inp, base in zip(inputs, baselines, strict=True)
                            ),
                            take_additional_args(args, examples),
                            take_target(target, examples),
                            selectors,
                            use_input,
                            state,
                            meter,
                            grad_options,
                        )
                    out = outputs.tolist()
                    items = []
                    for r, (e, _) in enumerate(chunk):
                        per_selector = []
                        for weight, neuron, parts in found:
                            rate = sum(
                                float((p[r] * d[e]).sum()) for p, d in zip(parts, full, strict=True)
                            )
                            per_selector.append(
                                (
                                    float(weight[r]),
                                    float(neuron[r]),
                                    rate,
                                    tuple(p[r].clone() for p in parts),
                                )
                            )
                        items.append((float(out[r]), per_selector))
                    auto.record(chunk, items)
                    del found
                    start += len(chunk)
                    done += len(chunk)
                    if meter is not None:
                        row_cap = _rows_within_budget(
                            plan, meter, len(chunk), 1, "neuron conductance", len(rows) - start
                        )
                        per_pass, meter = max(1, min(max_rows, row_cap)), None
                    if progress is not None:
                        progress(done, max(done, num_examples * max_steps))
                rows = auto.next_rows()
                if callback is not None and rows:
                    keep_going = callback(
                        StepsRound(
                            round=auto.rounds - 1,
                            attributions=_as_returned(
                                self._finish(auto.results(), diffs), many, is_tuple
                            ),
                            delta=self._deltas(auto.deltas(), inputs[0], many),
                            steps=auto.steps(),
                            status=auto.status(),
                        )
                    )
                    if keep_going is False:
                        auto.stop()
                        rows = []
        self.last_steps = auto.steps()
        self.last_status = auto.status()
        self.last_points = auto.points()
        if any(st != "converged" for st in self.last_status):
            warnings.warn(
                unconverged_message(self.last_status, tolerance, max_steps),
                UserWarning,
                stacklevel=3,
            )
        return self._finish(auto.results(), diffs)

    @staticmethod
    def _finish(sums: list[list[Tensor]], diffs: list[Tensor | None]) -> list[Tensor]:
        """Per input tensor, the maps of every selector (selectors first), multiplied by
        ``input - baseline`` when the method does."""
        out = []
        for i, diff in enumerate(diffs):
            stacked = torch.stack([per_selector[i] for per_selector in sums], dim=0)
            if diff is not None:
                stacked = stacked * diff.unsqueeze(0)
            out.append(stacked)
        return out

    @staticmethod
    def _deltas(deltas: list[list[float]], like: Tensor, many: bool) -> Tensor:
        """Per example and selector: the signed delta (selectors first when there are many)."""
        table = torch.tensor(deltas, dtype=like.dtype, device=like.device).T
        return table if many else table[0]

    def _select(self, layer_arg: Any, selector: Any, rows: int) -> Tensor:
        """The selected value of every row (summed over slices), as the reference selects
        both the neuron and its gradient."""
        value = NeuronGradient._pick(layer_arg, selector, self._labels[0])
        if value.dim() > 1:
            value = value.reshape(value.shape[0], -1).sum(1)
        if value.numel() != rows:
            raise AttributionError(
                f"The neuron selector gave {value.numel()} values for {rows} rows (path points "
                "times examples); return one value per example."
            )
        return value.reshape(rows)


def _as_returned(maps: list[Tensor], many: bool, is_tuple: bool) -> Any:
    """Maps per input tensor (selectors first) in the form the caller's arguments call for."""
    out = tuple(m if many else m[0] for m in maps)
    return out if is_tuple else out[0]


def _weighted_rows(coef: Tensor, part: Tensor, num_examples: int) -> Tensor:
    """``sum_p coef[p] * part[p * num_examples : (p + 1) * num_examples]``: the weighted sum
    over the path points of a pass (rows are point-major), as one matrix-vector product over
    the rows in memory order where the layout allows it."""
    k = coef.shape[0]
    if part.dim() == 4 and not part.is_contiguous():
        if part.is_contiguous(memory_format=torch.channels_last):
            n, c, h, w = num_examples, *part.shape[1:]
            flat = part.permute(0, 2, 3, 1).reshape(k, -1)
            return (coef.to(part.dtype) @ flat).reshape(n, h, w, c).permute(0, 3, 1, 2)
    elif part.is_contiguous():
        flat = part.reshape(k, -1)
        return (coef.to(part.dtype) @ flat).reshape(num_examples, *part.shape[1:])
    part = part.reshape(k, num_examples, *part.shape[1:])
    return (part * coef.reshape(k, *([1] * (part.dim() - 1)))).sum(0)


class _FoldedStem:
    """A convolution that one input goes straight into, and the weighted sums (over path
    points, per selector and example) of the neuron's gradients at its output.

    The convolution is linear in its input and the same for every path point, so carrying the
    summed gradient back through it once equals carrying every point's gradient back and
    summing afterwards.
    """

    def __init__(self, node: Any, input_shape: tuple[int, ...], out_shape: tuple[int, ...]):
        self.edge = GradientEdge(node, 0)
        self.weight = node._saved_weight.detach()
        self.stride = tuple(node._saved_stride)
        self.padding = tuple(node._saved_padding)
        self.dilation = tuple(node._saved_dilation)
        self.groups = int(node._saved_groups)
        self.input_shape = input_shape  # of one example
        self.out_shape = out_shape  # of one example, at the convolution's output
        self.sums: Tensor | None = None

    def same_as(self, other: _FoldedStem) -> bool:
        return (
            self.weight is other.weight
            or (self.weight.shape == other.weight.shape and torch.equal(self.weight, other.weight))
        ) and (
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.input_shape,
            self.out_shape,
        ) == (
            other.stride,
            other.padding,
            other.dilation,
            other.groups,
            other.input_shape,
            other.out_shape,
        )

    def zeros(self, rows: int) -> Tensor:
        return self.weight.new_zeros((rows, *self.out_shape))

    def add(self, selector: int, selectors: int, weighted: Tensor) -> None:
        """Add one selector's weighted sum over a pass's path points (examples first)."""
        if self.sums is None:
            self.sums = weighted.new_zeros((selectors, *weighted.shape))
        self.sums[selector] += weighted

    def finish(self, total: Tensor) -> None:
        """Carry the sums back through the convolution into ``total`` (selectors first)."""
        if self.sums is None:
            return
        sums = self.sums.reshape(-1, *self.out_shape)
        shape = (sums.shape[0], *self.input_shape)
        grad_in = torch.ops.aten.convolution_backward(
            sums,
            sums.new_empty(()).expand(shape),
            self.weight,
            None,
            self.stride,
            self.padding,
            self.dilation,
            False,
            [0] * len(self.stride),
            self.groups,
            [True, False, False],
        )[0]
        total += grad_in.reshape(total.shape)
        self.sums = None


def _stems(scaled: tuple[Tensor, ...], values: tuple[Tensor, ...]) -> list[_FoldedStem | None]:
    """Per input: the convolution it goes straight into when that convolution is its only use
    on the way to the layer (a plain, non-transposed convolution), else ``None``."""
    leaves = {id(t): i for i, t in enumerate(scaled)}
    uses: list[list[tuple[Any, int]]] = [[] for _ in scaled]
    if any(id(v) in leaves for v in values):
        return [None] * len(scaled)
    stack = [v.grad_fn for v in values if v.grad_fn is not None]
    seen: set[int] = set()
    keep = []  # holds the nodes so that their ids stay unique during the walk
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        keep.append(node)
        for slot, (child, _) in enumerate(node.next_functions):
            if child is None:
                continue
            variable = getattr(child, "variable", None)
            if variable is not None:
                i = leaves.get(id(variable))
                if i is not None:
                    uses[i].append((node, slot))
                continue
            stack.append(child)
    out: list[_FoldedStem | None] = []
    for t, found in zip(scaled, uses, strict=True):
        stem = None
        if len(found) == 1:
            node, slot = found[0]
            if (
                slot == 0
                and type(node).__name__ == "ConvolutionBackward0"
                and not node._saved_transposed
                and t.dim() >= 3
            ):
                weight = node._saved_weight
                dims = t.dim() - 2
                out_size = [
                    (
                        t.shape[2 + d]
                        + 2 * node._saved_padding[d]
                        - node._saved_dilation[d] * (weight.shape[2 + d] - 1)
                        - 1
                    )
                    // node._saved_stride[d]
                    + 1
                    for d in range(dims)
                ]
                if weight.dtype == t.dtype and weight.device == t.device:
                    stem = _FoldedStem(node, tuple(t.shape[1:]), (weight.shape[0], *out_size))
        out.append(stem)
    return out
