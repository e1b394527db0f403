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

import inspect
import numbers
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.nn import DataParallel, Module

from explainer.adaptive import (
    AutoSteps,
    LayerPath,
    StepsRound,
    check_auto_arguments,
    unconverged_message,
)
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
    take_additional_args,
    take_target,
)
from explainer.errors import AttributionError, AttributionIndexError, AttributionTypeError
from explainer.hooks import (
    LayerTap,
    NeedsFullGraph,
    StopForward,
    layer_label,
    tap_layers,
)
from explainer.folding import folded
from explainer.integration import alphas as integration_alphas
from explainer.integration import check_method
from explainer.limits import memory_budget_bytes
from explainer.memory import FreedMemory, PassMeter, format_mib, reusing_freed_memory

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


def _path_rows(
    inp: Tensor,
    base: Tensor | int | float,
    examples: Tensor,
    alphas: list[float],
    *,
    requires_grad: bool = False,
) -> Tensor:
    """Path points for arbitrary rows: row ``r`` is ``base + alphas[r] * (inp - base)`` of
    example ``examples[r]``. The two ends of the path are the baseline and the input exactly."""
    inp = inp.detach()
    if not inp.is_floating_point():
        inp = inp.to(torch.get_default_dtype())
    x = inp.index_select(0, examples)
    if isinstance(base, Tensor) and base.dim() > 0:
        b = base.detach().to(device=inp.device, dtype=inp.dtype)
        b = b.expand_as(inp).index_select(0, examples) if b.shape[0] == inp.shape[0] else b
        b = b.expand_as(x)
    else:
        value = base.item() if isinstance(base, Tensor) else base
        b = torch.full_like(x, float(value))
    coef = torch.tensor(alphas, dtype=inp.dtype, device=inp.device)
    coef = coef.reshape(len(alphas), *([1] * (x.dim() - 1)))
    out = _fast_layout(torch.empty_like(x))
    torch.addcmul(b, coef, x - b, out=out)
    ends = torch.tensor([a in (0.0, 1.0) for a in alphas], device=inp.device)
    if bool(ends.any()):
        exact = torch.where(coef == 1.0, x, b)
        out[ends] = exact[ends]
    return out.requires_grad_(requires_grad)


@dataclass
class _Plan:
    """Example rows of the pass being run (for messages), the measured cost of one row, and the
    freed memory the call keeps between its passes."""

    rows: int
    row_bytes: int | None = None
    kept: FreedMemory | None = None

    def start_pass(self, rows: int) -> None:
        """Before a pass of ``rows`` example rows: bound the memory kept since the last one."""
        self.rows = rows
        if self.kept is not None:
            self.kept.next_pass()


@dataclass
class _PassState:
    """What the passes of one call learn as they go: whether the lean graph works, whether
    the target was checked against the output, and the input layout the model accepts."""

    lean: bool
    target: TargetType
    num_examples: int
    checked: bool = False
    layout: dict[str, bool] = field(default_factory=dict)


@contextmanager
def _out_of_memory_explained(what: str, plan: _Plan) -> Iterator[None]:
    """Turn an allocation failure into an error that says how to make the work fit; memory
    freed while the block runs is kept for the next tensor (:func:`reusing_freed_memory`)."""
    try:
        with reusing_freed_memory(memory_budget_bytes()) as kept:
            plan.kept = kept
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


# Measured bytes per example row of earlier calls, per model (dropped with the model).
_ROW_COSTS: weakref.WeakKeyDictionary[Module, dict[tuple, int]] = weakref.WeakKeyDictionary()


def _row_cost_key(
    kind: str,
    forward: Callable,
    layers: Sequence[Module],
    inputs: tuple[Tensor, ...],
    args: tuple | None,
    use_input: bool,
) -> tuple | None:
    """What the cost of a row of a ``kind`` of pass depends on, or ``None`` when a call cannot
    be matched safely (a forward that is not a module, or extra arguments other than tensors
    and numbers)."""
    if not isinstance(forward, Module):
        return None
    extra = []
    for a in args or ():
        if isinstance(a, Tensor):
            extra.append((tuple(a.shape), a.dtype, a.device.type))
        elif isinstance(a, (bool, int, float, str, type(None))):
            extra.append(a)
        else:
            return None
    return (
        kind,
        tuple(id(layer) for layer in layers),
        use_input,
        forward.training,
        tuple((tuple(t.shape[1:]), t.dtype, str(t.device)) for t in inputs),
        tuple(extra),
    )


def _row_cost(forward: Callable, key: tuple | None) -> int | None:
    """The measured bytes per row of an earlier call with the same ``key``, or ``None``."""
    if key is None:
        return None
    try:
        return _ROW_COSTS.get(forward, {}).get(key)
    except TypeError:  # a module that cannot be weakly referenced
        return None


def _remember_row_cost(forward: Callable, key: tuple | None, row_bytes: int | None) -> None:
    if key is None or row_bytes is None:
        return
    try:
        costs = _ROW_COSTS.setdefault(forward, {})
    except TypeError:
        return
    if len(costs) > 64:  # many shapes on one model: keep the newest only
        costs.clear()
    costs[key] = int(row_bytes)


def _known_rows(plan: _Plan, known: int | None, num_examples: int, cap: int) -> int | None:
    """Path points per pass from a remembered row cost (``None``: meter afresh)."""
    if known is None:
        return None
    budget = memory_budget_bytes()
    if known * num_examples > budget:
        return None
    plan.row_bytes = known
    rows = budget // known // num_examples * num_examples
    return max(1, min(cap, rows // num_examples))


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


def _points_per_pass(internal_batch_size: Any, num_examples: int, points: int) -> int:
    """Path points per pass allowed by ``internal_batch_size`` (all of them for ``None``).

    Like the reference, a size below the number of examples is raised to that number with a
    warning: every pass holds at least one path point for every example.
    """
    if internal_batch_size is None:
        return points
    if isinstance(internal_batch_size, bool) or not isinstance(
        internal_batch_size, numbers.Integral
    ):
        raise AttributionTypeError("internal_batch_size must be an int or None.")
    size = int(internal_batch_size)
    if size < 1:
        raise AttributionError(
            f"internal_batch_size={size} must be a positive number of rows per pass, or None "
            "to run all path points in one pass."
        )
    if size < num_examples:
        warnings.warn(
            f"internal_batch_size={size} is below the number of examples ({num_examples}); "
            f"using {num_examples}, one path point for every example per pass.",
            UserWarning,
            stacklevel=3,
        )
    return max(1, size // num_examples)


_GRAD_ARGUMENTS = ("outputs", "inputs", "grad_outputs", "only_inputs", "is_grads_batched")
_GRAD_PARAMETERS = frozenset(inspect.signature(torch.autograd.grad).parameters)


def _grad_options(grad_kwargs: Any) -> dict[str, Any]:
    """Keyword arguments for ``torch.autograd.grad``: unused layers give zero gradients unless
    the caller says otherwise, and what the engine itself decides cannot be overridden."""
    if grad_kwargs is None:
        return {"allow_unused": True}
    if not isinstance(grad_kwargs, dict) or not all(isinstance(k, str) for k in grad_kwargs):
        raise AttributionTypeError(
            "grad_kwargs must be a dict of keyword arguments for torch.autograd.grad, not "
            f"{type(grad_kwargs).__name__}."
        )
    known = _GRAD_PARAMETERS
    unknown = sorted(k for k in grad_kwargs if k not in known)
    if unknown:
        raise AttributionTypeError(
            f"grad_kwargs has {', '.join(unknown)}, which torch.autograd.grad does not take; "
            f"its options are {', '.join(sorted(known - set(_GRAD_ARGUMENTS)))}."
        )
    fixed = sorted(k for k in grad_kwargs if k in _GRAD_ARGUMENTS)
    if fixed:
        raise AttributionError(
            f"grad_kwargs may not set {', '.join(fixed)}: the engine chooses what is "
            "differentiated. Pass options such as materialize_grads or retain_graph."
        )
    return {"allow_unused": True, **grad_kwargs}


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

    def _model(self, inputs: Sequence[Tensor] | None = None, args: tuple | None = None) -> Callable:
        """What the passes run: the forward function (a DataParallel's module), with its
        convolution + batch norm pairs folded where it is a model, and given the call's
        ``inputs`` and ``args``, the tokens it never reads left out (:func:`folded`)."""
        return folded(_unwrap(self.forward_func), self._layers, inputs, args)

    @property
    def multiplies_by_inputs(self) -> bool:
        """Whether the attributions are multiplied by ``input - baseline`` (as in Captum)."""
        return False

    def has_convergence_delta(self) -> bool:
        """Whether :meth:`attribute` can return a convergence delta (as in Captum)."""
        return False

    @classmethod
    def get_name(cls) -> str:
        """The class name in words, e.g. ``"Layer Conductance"`` (as in Captum)."""
        return "".join(f" {c}" if c.isupper() and i else c for i, c in enumerate(cls.__name__))

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
        forward = self._model(ends, args)
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

    def has_convergence_delta(self) -> bool:
        return True

    @staticmethod
    def interpolate(
        layer_attribution: Tensor,
        interpolate_dims: int | tuple[int, ...],
        interpolate_mode: str = "nearest",
    ) -> Tensor:
        """Resize a layer attribution to ``interpolate_dims`` (for instance the input's height
        and width), as Captum's ``LayerAttribution.interpolate`` does."""
        return torch.nn.functional.interpolate(
            layer_attribution, interpolate_dims, mode=interpolate_mode
        )

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
        grad_kwargs: dict[str, Any] | None = None,
        *,
        tolerance: float = 0.01,
        max_steps: int = 512,
        callback: Callable[[StepsRound], Any] | None = None,
        progress: ProgressFn | None = None,
    ) -> Any:
        """Compute the conductance of the layer's output (or input) neurons.

        Parameters follow the reference. ``internal_batch_size`` bounds how many path points
        times examples run in one pass; below the number of examples it is raised to that
        number with a warning, as in the reference. ``grad_kwargs`` are passed on to
        ``torch.autograd.grad`` (for example ``{"materialize_grads": True}``). Passes are
        also kept within the memory budget (``EXPLAINER_MEMORY_BUDGET_MB``), so they may hold
        fewer rows than asked for; the results do not depend on the split. ``progress``,
        when given, is called as ``progress(done, total)`` in path points after every pass.

        ``n_steps="auto"`` places path points until, for every example,
        ``|delta| <= tolerance * |F(input) - F(baseline)|``, or ``max_steps`` points are used
        (see :mod:`explainer.adaptive`; ``method`` is then not used). After every round of
        points ``callback``, when given, receives a :class:`~explainer.adaptive.StepsRound`
        with the result so far; returning ``False`` from it stops the refinement there. The
        returned delta is the delta reached. After any call, ``last_steps`` holds the number
        of path points each example used and ``last_status`` why each stopped refining
        (``"converged"``, ``"cap"``, ``"stalled"``, ``"memory"`` or ``"stopped"``; always
        ``"fixed"`` for a fixed ``n_steps``), and ``last_points`` the path points of each.
        Examples that end other than converged are named in a warning.

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
        num_examples = inputs_t[0].shape[0]
        if num_examples == 0:
            raise AttributionError("inputs hold no examples (dimension 0 is empty).")
        if isinstance(n_steps, str) and n_steps == "auto":
            return self._attribute_auto(
                inputs_t,
                baselines_t,
                target,
                format_additional_args(additional_forward_args),
                internal_batch_size,
                return_convergence_delta,
                attribute_to_layer_input,
                _grad_options(grad_kwargs),
                *check_auto_arguments(tolerance, max_steps, callback),
                callback,
                progress,
            )
        if isinstance(n_steps, bool) or not isinstance(n_steps, numbers.Integral) or n_steps < 1:
            raise AttributionError(
                f'n_steps must be a positive integer or "auto", got {n_steps!r}.'
            )
        n_steps = int(n_steps)
        points = n_steps + 1
        cap = _points_per_pass(internal_batch_size, num_examples, points)
        grad_options = _grad_options(grad_kwargs)
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
                grad_options,
            )
        self.last_steps = [points] * num_examples
        self.last_status = ["fixed"] * num_examples
        self.last_points = [list(alphas)] * num_examples
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

    def _attribute_auto(
        self,
        inputs: tuple[Tensor, ...],
        baselines: tuple[Tensor | int | float, ...],
        target: TargetType,
        args: tuple | None,
        internal_batch_size: int | None,
        return_delta: bool,
        use_input: bool,
        grad_options: dict[str, Any],
        tolerance: float,
        max_steps: int,
        callback: Callable[[StepsRound], Any] | None,
        progress: ProgressFn | None,
    ) -> Any:
        """``n_steps="auto"``: rounds of path points chosen by :class:`AutoSteps`, each round
        run in passes of rows (example, point) that stay within the memory budget."""
        forward = self._model(inputs, args)
        num_examples = inputs[0].shape[0]
        max_rows = _points_per_pass(internal_batch_size, num_examples, max_steps) * num_examples
        budget = memory_budget_bytes()
        auto = AutoSteps(
            [LayerPath() for _ in range(num_examples)], tolerance, max_steps, budget // 2
        )
        state = _PassState(lean=not use_input, target=target, num_examples=num_examples)
        plan = _Plan(rows=num_examples)
        meter: PassMeter | None = PassMeter.for_model(forward)
        tuple_layers: list[bool] = [False] * len(self._layers)
        per_pass, done = num_examples, 0
        # Rows cost what they cost in a fixed-step call: either call reuses the other's meter.
        key = _row_cost_key("layer conductance", forward, self._layers, inputs, args, use_input)
        known = _known_rows(plan, _row_cost(forward, key), 1, max_rows)  # rows, not points
        if known is not None:
            per_pass, meter = known, None
        rows = auto.first_rows()
        with (
            _out_of_memory_explained("layer conductance", plan),
            torch.inference_mode(False),
            tap_layers(self._layers, self._labels, use_input=use_input, mode="root") as tap,
        ):
            while rows:
                start = 0
                while start < len(rows):
                    chunk = rows[start : start + per_pass]
                    plan.start_pass(len(chunk))
                    examples = torch.tensor([e for e, _ in chunk], device=inputs[0].device)
                    alphas = [a for _, a in chunk]
                    with _measuring(meter, inputs[0].device):
                        values, grads, outputs = self._pass(
                            forward,
                            lambda lean, examples=examples, alphas=alphas: tuple(
                                _path_rows(inp, base, examples, alphas, requires_grad=not lean)
                                for inp, base in zip(inputs, baselines, strict=True)
                            ),
                            take_additional_args(args, examples),
                            take_target(target, examples),
                            tap,
                            state,
                            meter,
                            grad_options,
                        )
                    tuple_layers = list(tap.is_tuple)
                    out = outputs.tolist()
                    auto.record(
                        chunk,
                        [
                            (
                                [[t[r].clone() for t in layer] for layer in values],
                                [[t[r].clone() for t in layer] for layer in grads],
                                float(out[r]),
                            )
                            for r in range(len(chunk))
                        ],
                    )
                    del values, grads
                    start += len(chunk)
                    done += len(chunk)
                    if meter is not None:
                        row_cap = _rows_within_budget(
                            plan, meter, len(chunk), 1, "layer conductance", len(rows) - start
                        )
                        per_pass, meter = max(1, min(max_rows, row_cap)), None
                        _remember_row_cost(forward, key, plan.row_bytes)
                    if progress is not None:
                        progress(done, max(done, num_examples * max_steps))
                rows = auto.next_rows()
                if callback is not None and rows:
                    keep_going = callback(
                        StepsRound(
                            round=auto.rounds - 1,
                            attributions=self._format(auto.results(), tuple_layers),
                            delta=self._format_deltas(auto.deltas(), inputs[0]),
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
        unfinished = [i for i, st in enumerate(self.last_status) if st != "converged"]
        if unfinished:
            warnings.warn(
                unconverged_message(self.last_status, tolerance, max_steps),
                UserWarning,
                stacklevel=3,
            )
        attributions = self._format(auto.results(), tuple_layers)
        if not return_delta:
            return attributions
        return attributions, self._format_deltas(auto.deltas(), inputs[0])

    def _format(self, totals: list[list[Tensor]], tuple_layers: list[bool]) -> Any:
        results = [
            tuple(t.contiguous() for t in total) if is_tuple else total[0].contiguous()
            for total, is_tuple in zip(totals, tuple_layers, strict=True)
        ]
        return results if self._is_list else results[0]

    def _format_deltas(self, deltas: list[list[float]], like: Tensor) -> Tensor | list[Tensor]:
        dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
        per_layer = [
            torch.tensor([d[li] for d in deltas], dtype=dtype, device=like.device)
            for li in range(len(self._layers))
        ]
        return per_layer if self._is_list else per_layer[0]

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
        grad_options: dict[str, Any],
        rule: str = "left",
    ) -> tuple[list[list[Tensor]], list[bool]]:
        """Sum over path points i of grad(F)(layer_i) * (layer_{i+1} - layer_i), pass by pass
        (the reference's rule); with ``rule="trapezoid"`` the gradient is the mean of those at
        points i and i+1, the rule of ``n_steps="auto"``.

        Passes hold consecutive path points; the gradient at the last point of a pass is kept
        until the next pass supplies the layer value that follows it. The first pass holds one
        point and is metered; later passes hold as many points as the memory budget allows,
        at most ``cap``.
        """
        forward = self._model(inputs, args)
        num_examples = inputs[0].shape[0]
        total_points = len(alphas)
        sums: list[list[Tensor]] | None = None
        carry: list[list[tuple[Tensor, Tensor]]] | None = None  # (grad, value) at last point
        tuple_layers = [False] * len(self._layers)
        # Lean passes record the graph from the layer on; a layer input (or a tensor passed
        # straight through) may have been used before the layer ran, so it needs the full graph.
        state = _PassState(lean=not use_input, target=target, num_examples=num_examples)
        meter: PassMeter | None = PassMeter.for_model(forward)
        per_pass, start, looks = 1, 0, 1  # looks: metered passes so far (two at most)
        # A call like an earlier one (same model, layers, shapes) reuses its measured row
        # cost: no small metered passes, the same pass sizes as if measured afresh.
        key = _row_cost_key("layer conductance", forward, self._layers, inputs, args, use_input)
        known = _known_rows(plan, _row_cost(forward, key), num_examples, cap)
        if known is not None:
            per_pass, meter = known, None
        with (
            torch.inference_mode(False),
            tap_layers(self._layers, self._labels, use_input=use_input, mode="root") as tap,
        ):
            while start < total_points:
                chunk = alphas[start : start + per_pass]
                k = len(chunk)
                plan.start_pass(k * num_examples)
                with _measuring(meter, inputs[0].device):
                    values, grads, _ = self._pass(
                        forward,
                        lambda lean, chunk=chunk: tuple(
                            _path_points(inp, base, chunk, requires_grad=not lean)
                            for inp, base in zip(inputs, baselines, strict=True)
                        ),
                        repeat_additional_args(args, k),
                        repeat_target(target, k),
                        tap,
                        state,
                        meter,
                        grad_options,
                    )
                    tuple_layers = list(tap.is_tuple)
                    new_carry: list[list[tuple[Tensor, Tensor]]] = []
                    if sums is None:
                        sums = [[] for _ in self._layers]
                    for li, (layer_values, layer_grads) in enumerate(
                        zip(values, grads, strict=True)
                    ):
                        layer_carry = []
                        for ti, (value, grad) in enumerate(
                            zip(layer_values, layer_grads, strict=True)
                        ):
                            v = value.reshape(k, num_examples, *value.shape[1:])
                            g = grad.reshape(k, num_examples, *value.shape[1:])
                            lead = 0.5 * (g[:-1] + g[1:]) if rule == "trapezoid" else g[:-1]
                            part = (
                                (lead * (v[1:] - v[:-1])).sum(0)
                                if k > 1
                                else torch.zeros_like(v[0])
                            )
                            if carry is not None:
                                g_prev, v_prev = carry[li][ti]
                                if rule == "trapezoid":
                                    g_prev = 0.5 * (g_prev + g[0])
                                part = part + g_prev * (v[0] - v_prev)
                            if len(sums[li]) <= ti:
                                sums[li].append(part)
                            else:
                                sums[li][ti] = sums[li][ti] + part
                            layer_carry.append((g[-1].clone(), v[-1].clone()))  # frees the pass
                        new_carry.append(layer_carry)
                    carry = new_carry
                    del values, grads
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
                        _remember_row_cost(forward, key, plan.row_bytes)
        assert sums is not None
        return [[t.contiguous() for t in layer] for layer in sums], tuple_layers

    def _pass(
        self,
        forward: Callable,
        make_rows: Callable[[bool], tuple[Tensor, ...]],
        args: tuple | None,
        target: TargetType,
        tap: LayerTap,
        state: _PassState,
        meter: PassMeter | None,
        grad_options: dict[str, Any],
    ) -> tuple[list[tuple[Tensor, ...]], list[tuple[Tensor, ...]], Tensor]:
        """One forward and backward pass over a batch of path rows.

        ``make_rows(lean)`` builds the rows (they require grad unless the pass is lean).
        Returns the layer values and the gradients of the summed target output with respect
        to them (both detached, per layer), and the target output of every row.
        """
        while True:
            tap.lean = state.lean
            scaled = make_rows(state.lean)
            try:
                with torch.set_grad_enabled(not state.lean), _metering(meter):
                    output = _check_output(_run_fast(forward, scaled, args, state.layout, tap))
                    if not state.checked:
                        n = state.num_examples
                        check_target(state.target, (n, *output.shape[1:]), n)
                        state.checked = True
                    per_row = select_target(output, target)
                    picked = per_row.sum()
                break
            except NeedsFullGraph:
                state.lean = False
                if meter is not None:
                    meter.forget()  # the retry starts afresh
        tap.check_reached()
        flat = [t for values in tap.values for t in values]
        if picked.requires_grad:
            found = torch.autograd.grad(picked, flat, **grad_options)
        else:  # the output does not depend on any tapped layer
            found = (None,) * len(flat)
        flat_grads = [
            torch.zeros_like(t) if g is None else g.detach()
            for g, t in zip(found, flat, strict=True)
        ]
        if meter is not None:
            meter.add((*scaled, *flat, output))
            # Gradients of the layer, and the clones handed on to the network.
            meter.add_transient(2 * sum(t.nelement() * t.element_size() for t in flat))
        values, grads, pos = [], [], 0
        for layer_values in tap.values:
            size = len(layer_values)
            values.append(tuple(v.detach() for v in layer_values))
            grads.append(tuple(flat_grads[pos : pos + size]))
            pos += size
        return values, grads, per_row.detach()

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
        meter: PassMeter | None = PassMeter.for_model(self._model())
        # Written in place pass by pass: no second copy of all the gradients at the end.
        results = [
            torch.empty((len(selectors), *t.shape), dtype=t.dtype, device=t.device)
            for t in inputs_t
        ]
        layout: dict[str, bool] = {}
        per_pass, start, looks = 1, 0, 1  # looks: metered passes so far (two at most)
        with _out_of_memory_explained("neuron gradients", plan):
            while start < len(selectors):
                group = selectors[start : start + per_pass]
                plan.start_pass(len(group) * num_examples)
                with _measuring(meter, inputs_t[0].device):
                    grads = self._group_gradients(
                        inputs_t, group, args, attribute_to_neuron_input, layout, meter
                    )
                for i, g in enumerate(grads):
                    results[i][start : start + len(group)] = g.reshape(
                        len(group), *inputs_t[i].shape
                    )
                start += len(group)
                if meter is not None:
                    left = len(selectors) - start
                    wanted = min(max(1, cache_rows // num_examples), left)
                    if looks < 2 and _worth_another_look(
                        meter, num_examples, num_examples, wanted
                    ):
                        meter, looks = PassMeter.for_model(self._model()), looks + 1
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
        forward = self._model()
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
                raise AttributionIndexError(
                    f"neuron_selector {selector!r} is out of range for layer {label} with neuron "
                    f"shape {dims}; each index must be below its dimension's size."
                )
        return sel

    @classmethod
    def _pick(cls, layer_arg: Any, selector: Any, label: str) -> Tensor:
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
        return layer_arg[(slice(None), *cls._index(layer_arg, selector, label))]
