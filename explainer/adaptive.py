"""Path points chosen to a tolerance: ``n_steps="auto"`` for layer conductance.

Layer conductance sums, over neighbouring path points ``a < b``, the gradient of the target
with respect to the layer times the change of the layer from ``a`` to ``b``. A fixed
``n_steps`` takes the gradient at ``a`` (the reference's rule); ``"auto"`` takes the mean of
the gradients at ``a`` and ``b`` (the trapezoid rule, as NeuronConductance's automatic map
does), whose error shrinks with the square of the spacing instead of linearly. Every
evaluated point has both gradients, so this costs nothing extra. For one interval the exact
share of the output change is ``F(b) - F(a)``, and every evaluated point gives ``F`` for
free, so the error of each interval is known exactly::

    e(a, b) = sum((grad(a) + grad(b)) / 2 * (layer(b) - layer(a))) - (F(b) - F(a))

and the convergence delta of the whole sum is the sum of these errors. The engine starts from
the two ends of the path and, round by round, splits the intervals with the largest errors
until ``|delta| <= tolerance * |F(input) - F(baseline)|`` for every example. Every evaluated
point is kept: a split adds points and never discards any. Where the errors of the interval
with the gradient at either end alone have opposite signs, the gradient changes inside the
interval, and the first new point goes where the two suggest (see :func:`split_points`). The
split follows the error model of the trapezoid rule (an interval cut in two keeps about a
quarter of its error), sizing each interval's cut so that the predicted error fits the
tolerance, at most tripling the points per round so that a poor prediction costs little.

A delta that no number of points can remove (part of the output change bypasses the layer,
for instance through a residual connection) is recognised when three rounds of new points
leave a delta of several tolerances nearly where it was: the example then stops with status
``"stalled"`` instead of running to the cap.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "STATUSES",
    "AutoSteps",
    "LayerPath",
    "NeuronPath",
    "PathPoints",
    "StepsRound",
    "split_points",
]

STATUSES = ("converged", "cap", "stalled", "memory", "stopped")
"""Why an example stopped: the tolerance was met; the cap on path points was reached; the
delta stopped shrinking (it does not come from the steps); the memory budget could not hold
more points; or the callback asked to stop."""

# The refinement aims below the tolerance, so that one round usually suffices.
_AIM = 0.6
# The share of its error an interval is expected to keep once split.
_KEPT = 0.25
# A delta over this many tolerances that three rounds of points move by less than this share
# of itself does not come from the spacing of the points.
_STALL = 3.0
_STEADY = 0.1
# An end's error this small next to the other end's is taken as zero: the gradient changes at
# the interval's other end (at a fraction of 1e-3 or less, well inside the smallest first cut
# of 0.02), and float rounding may have given that zero either sign.
_NEGLIGIBLE = 1e-3


@dataclass
class StepsRound:
    """What the callback of ``n_steps="auto"`` receives after every round.

    Attributes
    ----------
    round : int
        0 for the first round (the two ends of the path), then 1, 2, ...
    attributions : Any
        The conductance so far, in the form :meth:`LayerConductance.attribute` returns.
    delta : Tensor or list of Tensor
        The signed convergence delta of every example (a list per layer for a list of layers).
    steps : list of int
        Path points used so far by each example.
    status : list of str or None
        Per example, why it stopped (one of :data:`STATUSES`), or ``None`` while it refines.
    """

    round: int
    attributions: Any
    delta: Tensor | list[Tensor]
    steps: list[int]
    status: list[str | None]


def split_points(
    points: Sequence[float],
    errors: Sequence[float],
    right_errors: Sequence[float],
    allowed: float,
    max_new: int,
    left_errors: Sequence[float] | None = None,
) -> list[float]:
    """New path points that bring the error of the sum under ``allowed``.

    ``points`` are ascending; ``errors[i]`` is the signed error of the sum's rule on the
    interval from ``points[i]`` to ``points[i + 1]``; ``left_errors[i]`` and
    ``right_errors[i]`` the same with the gradient taken at its left or right end only
    (``left_errors`` defaults to ``errors``, for a sum that takes the left end). The intervals
    with the largest errors are split until the others hold at most ``allowed`` in total.

    Where the left and right errors have opposite signs, the gradient changes inside the
    interval, and by the sizes of the two errors at about the fraction
    ``t = right / (right - left)`` of it (exactly so when the gradient jumps there, as it does
    where ReLUs switch): the first new point goes there. An end's error under
    :data:`_NEGLIGIBLE` times the other's counts as zero, of either sign: the gradient then
    changes right next to the other end. Intervals with much more error than their share also
    get the midpoints on either side. At most ``max_new`` points are returned.
    """
    if max_new < 1 or not errors:
        return []
    lefts = errors if left_errors is None else left_errors
    sizes = [abs(e) for e in errors]
    # The delta is predicted as chosen intervals lose most of their error. Errors of the sign
    # of the delta are served first, largest first: they make up the bias that remains.
    predicted = sum(errors)
    sign = 1.0 if predicted >= 0 else -1.0
    order = sorted(range(len(errors)), key=lambda i: -sign * errors[i])
    chosen: list[int] = []
    for i in order:
        if abs(predicted) <= allowed or sign * errors[i] <= 0.0:
            break
        chosen.append(i)
        predicted -= (1 - _KEPT) * errors[i]
    share = max(allowed, 1e-300) / max(len(chosen), 1)
    new: list[float] = []
    for i in chosen:
        if len(new) >= max_new:
            break
        a, b = points[i], points[i + 1]
        left, right = lefts[i], right_errors[i]
        if abs(right) <= _NEGLIGIBLE * abs(left):  # rounding may give a zero either sign
            right = 0.0
        elif abs(left) <= _NEGLIGIBLE * abs(right):
            left = 0.0
        t = right / (right - left) if left * right <= 0 and left != right else 0.5
        t = min(max(t, 0.02), 0.98)
        m = a + (b - a) * t
        new.append(m)
        if sizes[i] > 4 * share and len(new) + 2 <= max_new:
            new.extend(((a + m) / 2, (m + b) / 2))
    return sorted(p for p in set(new) if points[0] < p < points[-1] and p not in points)


@dataclass
class Assessment:
    """Where one example stands: per part (a layer, or a neuron selector) the signed delta and
    the largest delta allowed; per interval (for the worst part) the error of the sum's own
    rule and of the rule with the integrand taken at the interval's right end, and at its left
    end (``None``: the sum's own rule takes the left end)."""

    deltas: list[float]
    slacks: list[float]
    errors: list[float]
    right_errors: list[float]
    left_errors: list[float] | None = None


@dataclass
class PathPoints:
    """One example's evaluated path points, ascending, each with what the method stored for
    it. Subclasses say what the result and the errors are."""

    points: list[float] = field(default_factory=list)
    items: list[Any] = field(default_factory=list)
    status: str | None = None
    history: list[list[float]] = field(default_factory=list)
    cache: dict[tuple[float, float], Any] = field(default_factory=dict, repr=False)

    def add(self, alpha: float, item: Any) -> None:
        at = sum(1 for p in self.points if p < alpha)
        self.points.insert(at, alpha)
        self.items.insert(at, item)

    def assess(self, tolerance: float) -> Assessment:  # pragma: no cover - abstract
        raise NotImplementedError

    def result(self) -> list[list[Tensor]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes held for the stored points."""
        return sum(t.nelement() * t.element_size() for item in self.items for t in _tensors(item))


def _tensors(item: Any):
    if isinstance(item, Tensor):
        yield item
    elif isinstance(item, (list, tuple)):
        for x in item:
            yield from _tensors(x)


def slack(tolerance: float, outputs: Sequence[float]) -> float:
    """The largest delta allowed: ``tolerance`` times the change of the output along the path,
    plus a rounding allowance for a path along which the output does not change."""
    scale = max(abs(outputs[0]), abs(outputs[-1]), 1e-30)
    return tolerance * abs(outputs[-1] - outputs[0]) + 1e-6 * scale


class LayerPath(PathPoints):
    """Layer conductance: per point, per layer, per tensor the layer's value and the gradient
    of the target there (without the example dimension), and the target output. The result
    is the trapezoid rule: each interval's change of the layer times the mean of the
    gradients at its two ends."""

    def intervals(self) -> tuple[list[list[float]], list[list[float]]]:
        """Per interval, per layer: the conductance total of that interval with the gradient
        at its left end and at its right end (the rule's total is their mean)."""
        lefts, rights = [], []
        cache = self.cache  # per interval (a, b): its sums never change once computed
        for a, b, (v0s, g0s, _), (v1s, g1s, _) in zip(
            self.points, self.points[1:], self.items, self.items[1:], strict=False
        ):
            if (a, b) in cache:
                left, right = cache[(a, b)]
                lefts.append(left)
                rights.append(right)
                continue
            left, right = [], []
            for v0l, g0l, v1l, g1l in zip(v0s, g0s, v1s, g1s, strict=True):
                lo = hi = 0.0
                for v0, g0, v1, g1 in zip(v0l, g0l, v1l, g1l, strict=True):
                    step = v1 - v0
                    lo += float((g0 * step).sum())
                    hi += float((g1 * step).sum())
                left.append(lo)
                right.append(hi)
            cache[(a, b)] = (left, right)
            lefts.append(left)
            rights.append(right)
        return lefts, rights

    def assess(self, tolerance: float) -> Assessment:
        outputs = [item[2] for item in self.items]
        lefts, rights = self.intervals()
        steps = [b - a for a, b in zip(outputs, outputs[1:], strict=False)]
        change = outputs[-1] - outputs[0]
        layers = range(len(lefts[0]))
        deltas = [
            sum(0.5 * (p[li] + r[li]) for p, r in zip(lefts, rights, strict=True)) - change
            for li in layers
        ]
        worst = max(layers, key=lambda li: abs(deltas[li]))
        left_errors = [p[worst] - d for p, d in zip(lefts, steps, strict=True)]
        right_errors = [r[worst] - d for r, d in zip(rights, steps, strict=True)]
        return Assessment(
            deltas=deltas,
            slacks=[slack(tolerance, outputs)] * len(deltas),
            errors=[0.5 * (a + b) for a, b in zip(left_errors, right_errors, strict=True)],
            right_errors=right_errors,
            left_errors=left_errors,
        )

    def result(self) -> list[list[Tensor]]:
        """Per layer, per tensor: the conductance from the points evaluated so far."""
        first = self.items[0][0]
        layers = [[torch.zeros_like(t) for t in layer] for layer in first]
        for (v0s, g0s, _), (v1s, g1s, _) in zip(self.items, self.items[1:], strict=False):
            for total, v0l, g0l, v1l, g1l in zip(layers, v0s, g0s, v1s, g1s, strict=True):
                for t, v0, g0, v1, g1 in zip(total, v0l, g0l, v1l, g1l, strict=True):
                    t.addcmul_(g0 + g1, v1 - v0, value=0.5)
        return layers


class NeuronPath(PathPoints):
    """Neuron conductance: per point the target output and, per selector, the gradient of the
    target with respect to the neuron, the neuron's value, the rate ``m * ds/dalpha`` at which
    its conductance accrues, and the weighted input gradients (without the example dimension).

    The map is the trapezoid rule over the points. Its sum equals that rule applied to the
    rate, so it is checked against the neuron's conductance along the same points taken the
    other way, ``sum((m(a) + m(b)) / 2 * (s(b) - s(a)))``: both converge to the same integral.
    """

    def assess(self, tolerance: float) -> Assessment:
        outputs = [item[0] for item in self.items]
        change = abs(outputs[-1] - outputs[0])
        rounding = 1e-6 * max(abs(outputs[0]), abs(outputs[-1]), 1e-30)
        deltas, slacks, per_selector = [], [], []
        for j in range(len(self.items[0][1])):
            errors, total = [], 0.0
            for (a, (_, sel_a)), (b, (_, sel_b)) in zip(
                zip(self.points, self.items, strict=True),
                zip(self.points[1:], self.items[1:], strict=True),
                strict=False,
            ):
                m_a, s_a, q_a, _ = sel_a[j]
                m_b, s_b, q_b, _ = sel_b[j]
                flow = 0.5 * (m_a + m_b) * (s_b - s_a)
                errors.append(0.5 * (b - a) * (q_a + q_b) - flow)
                total += flow
            deltas.append(sum(errors))
            slacks.append(tolerance * max(abs(total), tolerance * change) + rounding)
            per_selector.append(errors)
        worst = max(range(len(deltas)), key=lambda j: abs(deltas[j]) / slacks[j])
        errors = per_selector[worst]
        return Assessment(
            deltas=deltas, slacks=slacks, errors=errors, right_errors=[-e for e in errors]
        )

    def result(self) -> list[list[Tensor]]:
        """Per selector, per input tensor: the trapezoid sum of the weighted input gradients."""
        p = self.points
        weights = [((p[min(i + 1, len(p) - 1)] - p[max(i - 1, 0)]) / 2) for i in range(len(p))]
        out = []
        for j in range(len(self.items[0][1])):
            sums = [torch.zeros_like(t) for t in self.items[0][1][j][3]]
            for w, (_, per_selector) in zip(weights, self.items, strict=True):
                for total, part in zip(sums, per_selector[j][3], strict=True):
                    total.add_(part, alpha=w)
            out.append(sums)
        return out


@dataclass
class AutoSteps:
    """The rounds of one ``n_steps="auto"`` call: which points each example needs next."""

    paths: list[PathPoints]
    tolerance: float
    max_steps: int
    memory_bytes: int
    rounds: int = 0

    def first_rows(self) -> list[tuple[int, float]]:
        """Both ends of the path for every example: the first round."""
        return [(e, a) for a in (0.0, 1.0) for e in range(len(self.paths))]

    def record(self, rows: list[tuple[int, float]], items: list[Any]) -> None:
        """Store what a pass found for each of its rows."""
        for (e, alpha), item in zip(rows, items, strict=True):
            self.paths[e].add(alpha, item)

    def deltas(self) -> list[list[float]]:
        """Per example, per part: the signed delta over the points so far."""
        return [path.assess(self.tolerance).deltas for path in self.paths]

    def next_rows(self) -> list[tuple[int, float]]:
        """Decide which examples are done and which points the others need next."""
        self.rounds += 1
        rows: list[tuple[int, float]] = []
        stored = sum(path.nbytes() for path in self.paths)
        for e, path in enumerate(self.paths):
            if path.status is not None:
                continue
            state = path.assess(self.tolerance)
            pairs = list(zip(state.deltas, state.slacks, strict=True))
            if all(abs(d) <= s for d, s in pairs):
                path.status = "converged"
                continue
            path.history.append(state.deltas)
            if len(path.history) >= 4 and all(abs(d) > _STALL * s for d, s in pairs):
                # Three rounds of points that leave a large delta (nearly) where it was: the
                # delta does not come from the spacing of the points.
                last = path.history[-4:]
                if all(
                    abs(b[i] - a[i]) <= _STEADY * abs(b[i])
                    for a, b in zip(last, last[1:], strict=False)
                    for i in range(len(pairs))
                ):
                    path.status = "stalled"
                    continue
            room = self.max_steps - len(path.points)
            if room <= 0:
                path.status = "cap"
                continue
            per_point = path.nbytes() // max(len(path.points), 1)
            fits = (self.memory_bytes - stored) // max(per_point, 1)
            if fits <= 0:
                path.status = "memory"
                continue
            allowed = min(s for _, s in pairs)
            budget = min(room, fits, max(3, len(path.points)))
            new = split_points(
                path.points,
                state.errors,
                state.right_errors,
                _AIM * allowed,
                budget,
                left_errors=state.left_errors,
            )
            if not new:
                path.status = "stalled"
                continue
            stored += per_point * len(new)
            rows.extend((e, a) for a in new)
        return rows

    def stop(self) -> None:
        for path in self.paths:
            if path.status is None:
                path.status = "stopped"

    def steps(self) -> list[int]:
        return [len(path.points) for path in self.paths]

    def status(self) -> list[str | None]:
        return [path.status for path in self.paths]

    def points(self) -> list[list[float]]:
        return [list(path.points) for path in self.paths]

    def results(self) -> list[list[Tensor]]:
        """Per part, per tensor: the result of all examples (examples as dimension 0)."""
        per_example = [path.result() for path in self.paths]
        return [
            [torch.stack([pe[li][ti] for pe in per_example]) for ti in range(len(part))]
            for li, part in enumerate(per_example[0])
        ]


def unconverged_message(status: list[str | None], tolerance: float, max_steps: int) -> str:
    """The warning for examples that ended other than converged."""
    parts = []
    for what, text in (
        ("cap", f"reached the cap of {max_steps} path points"),
        (
            "stalled",
            "have a delta that more points do not reduce: part of the output change "
            "does not flow through the layer (for instance it bypasses it through a residual "
            "connection)",
        ),
        ("memory", "ran out of memory budget for more points"),
        ("stopped", "were stopped by the callback"),
    ):
        which = [i for i, st in enumerate(status) if st == what]
        if which:
            parts.append(f"examples {which} {text}")
    return (
        f'n_steps="auto" did not reach the tolerance of {tolerance:g} everywhere: '
        + "; ".join(parts)
        + ". The returned delta says how far each example got."
    )


def check_auto_arguments(tolerance: Any, max_steps: Any, callback: Any) -> tuple[float, int]:
    """Validate the settings of ``n_steps="auto"``; return them as numbers."""
    from explainer.errors import AttributionError, AttributionTypeError

    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)):
        raise AttributionTypeError(f"tolerance must be a number, not {type(tolerance).__name__}.")
    if not (0 < float(tolerance) < 1) or math.isnan(float(tolerance)):
        raise AttributionError(
            f"tolerance={tolerance!r} must be between 0 and 1 (a share of the output change, "
            "e.g. 0.01 for 1%)."
        )
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 2:
        raise AttributionError(
            f"max_steps={max_steps!r} must be a whole number of path points, at least 2."
        )
    if callback is not None and not isinstance(callback, Callable):
        raise AttributionTypeError("callback must be a function taking a StepsRound, or None.")
    return float(tolerance), int(max_steps)
