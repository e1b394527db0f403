"""Path points chosen to a tolerance: ``n_steps="auto"`` for layer conductance.

Layer conductance sums, over neighbouring path points ``a < b``, the gradient at ``a`` times the
change of the layer from ``a`` to ``b``. For one such interval the exact share of the output
change is ``F(b) - F(a)``, and every evaluated point gives ``F`` for free, so the error of each
interval is known exactly::

    e(a, b) = sum(grad(a) * (layer(b) - layer(a))) - (F(b) - F(a))

and the convergence delta of the whole sum is the sum of these errors. The engine starts from
the two ends of the path and, round by round, splits the intervals with the largest errors
until ``|delta| <= tolerance * |F(input) - F(baseline)|`` for every example. Every evaluated
point is kept: a split adds points and never discards any. The split follows the error model
of this sum (first order: an interval cut into ``k`` equal parts keeps about ``1/k`` of its
error), sizing each interval's cut so that the predicted error fits the tolerance, at most
tripling the points per round so that a poor prediction costs little.

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

__all__ = ["StepsRound", "split_points", "STATUSES"]

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
) -> list[float]:
    """New path points that bring the error of the sum under ``allowed``.

    ``points`` are ascending; ``errors[i]`` is the signed error of the interval from
    ``points[i]`` to ``points[i + 1]`` (the gradient taken at its left end), and
    ``right_errors[i]`` the same with the gradient taken at its right end. The intervals
    with the largest errors are split until the others hold at most ``allowed`` in total.

    Where the two errors have opposite signs, the gradient changes inside the interval, and
    by the sizes of the two errors at about the fraction ``t = right / (right - left)`` of it
    (exactly so when the gradient jumps there, as it does where ReLUs switch): the first new
    point goes there. Intervals with much more error than their share also get the midpoints
    on either side. At most ``max_new`` points are returned.
    """
    if max_new < 1 or not errors:
        return []
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
        left, right = errors[i], right_errors[i]
        t = right / (right - left) if left * right <= 0 and left != right else 0.5
        t = min(max(t, 0.02), 0.98)
        m = a + (b - a) * t
        new.append(m)
        if sizes[i] > 4 * share and len(new) + 2 <= max_new:
            new.extend(((a + m) / 2, (m + b) / 2))
    return sorted(p for p in set(new) if points[0] < p < points[-1] and p not in points)


@dataclass
class _Example:
    """One example's evaluated path points: per point the layer values, the gradients of the
    target there (per layer, per tensor, without the example dimension) and the output."""

    points: list[float] = field(default_factory=list)
    values: list[list[list[Tensor]]] = field(default_factory=list)
    grads: list[list[list[Tensor]]] = field(default_factory=list)
    outputs: list[float] = field(default_factory=list)
    status: str | None = None
    history: list[list[float]] = field(default_factory=list)

    def add(self, alpha: float, values: list[list[Tensor]], grads, output: float) -> None:
        at = sum(1 for p in self.points if p < alpha)
        self.points.insert(at, alpha)
        self.values.insert(at, values)
        self.grads.insert(at, grads)
        self.outputs.insert(at, output)

    def change(self) -> float:
        return self.outputs[-1] - self.outputs[0]

    def intervals(self) -> tuple[list[list[float]], list[list[float]]]:
        """Per interval, per layer: the conductance total of that interval with the gradient
        at its left end (the sum's own rule) and at its right end."""
        lefts, rights = [], []
        for i in range(len(self.points) - 1):
            left, right = [], []
            for li in range(len(self.values[0])):
                lo = hi = 0.0
                for g0, g1, v0, v1 in zip(
                    self.grads[i][li],
                    self.grads[i + 1][li],
                    self.values[i][li],
                    self.values[i + 1][li],
                    strict=True,
                ):
                    step = v1 - v0
                    lo += float((g0 * step).sum())
                    hi += float((g1 * step).sum())
                left.append(lo)
                right.append(hi)
            lefts.append(left)
            rights.append(right)
        return lefts, rights

    def conductance(self) -> list[list[Tensor]]:
        """Per layer, per tensor: the conductance from the points evaluated so far."""
        layers = []
        for li in range(len(self.values[0])):
            tensors = []
            for ti in range(len(self.values[0][li])):
                total = torch.zeros_like(self.values[0][li][ti])
                for i in range(len(self.points) - 1):
                    total += self.grads[i][li][ti] * (
                        self.values[i + 1][li][ti] - self.values[i][li][ti]
                    )
                tensors.append(total)
            layers.append(tensors)
        return layers

    def nbytes(self) -> int:
        if not self.values:
            return 0
        one = sum(t.nelement() * t.element_size() for layer in self.values[0] for t in layer)
        return 2 * one * len(self.points)


@dataclass
class AutoSteps:
    """The state of one ``n_steps="auto"`` call across its rounds."""

    num_examples: int
    tolerance: float
    max_steps: int
    memory_bytes: int
    examples: list[_Example] = field(default_factory=list)
    rounds: int = 0

    def __post_init__(self) -> None:
        self.examples = [_Example() for _ in range(self.num_examples)]

    def first_rows(self) -> list[tuple[int, float]]:
        """Both ends of the path for every example: the first round."""
        return [(e, a) for a in (0.0, 1.0) for e in range(self.num_examples)]

    def record(self, rows: list[tuple[int, float]], values, grads, outputs: Tensor) -> None:
        """Store what one pass found for its rows (values and grads per layer, per tensor,
        with the rows as dimension 0)."""
        out = outputs.tolist()
        for r, (e, alpha) in enumerate(rows):
            row_values = [[t[r].clone() for t in layer] for layer in values]
            row_grads = [[t[r].clone() for t in layer] for layer in grads]
            self.examples[e].add(alpha, row_values, row_grads, float(out[r]))

    def _slack(self, ex: _Example) -> float:
        scale = max(abs(ex.outputs[0]), abs(ex.outputs[-1]), 1e-30)
        return self.tolerance * abs(ex.change()) + 1e-6 * scale

    def deltas(self) -> list[list[float]]:
        """Per example, per layer: the signed delta of the sum over the points so far."""
        out = []
        for ex in self.examples:
            parts, _ = ex.intervals()
            change = ex.change()
            out.append([sum(p[li] for p in parts) - change for li in range(len(parts[0]))])
        return out

    def next_rows(self) -> list[tuple[int, float]]:
        """Decide which examples are done and which points the others need next."""
        self.rounds += 1
        rows: list[tuple[int, float]] = []
        stored = sum(ex.nbytes() for ex in self.examples)
        for e, ex in enumerate(self.examples):
            if ex.status is not None:
                continue
            parts, rights = ex.intervals()
            change = ex.change()
            layers = range(len(parts[0]))
            totals = [sum(p[li] for p in parts) for li in layers]
            deltas = [totals[li] - change for li in layers]
            slack = self._slack(ex)
            if all(abs(d) <= slack for d in deltas):
                ex.status = "converged"
                continue
            ex.history.append(deltas)
            if len(ex.history) >= 4 and all(abs(d) > _STALL * slack for d in deltas):
                # Three rounds of points that leave a large delta (nearly) where it was: the
                # delta does not come from the spacing of the points.
                last = ex.history[-4:]
                if all(
                    abs(b[li] - a[li]) <= _STEADY * abs(b[li])
                    for a, b in zip(last, last[1:], strict=False)
                    for li in layers
                ):
                    ex.status = "stalled"
                    continue
            room = self.max_steps - len(ex.points)
            if room <= 0:
                ex.status = "cap"
                continue
            per_point = ex.nbytes() // max(len(ex.points), 1)
            fits = (self.memory_bytes - stored) // max(per_point, 1)
            if fits <= 0:
                ex.status = "memory"
                continue
            steps = [ex.outputs[i + 1] - ex.outputs[i] for i in range(len(parts))]
            worst = max(layers, key=lambda li: abs(deltas[li]))
            errors = [p[worst] - step for p, step in zip(parts, steps, strict=True)]
            right_errors = [r[worst] - step for r, step in zip(rights, steps, strict=True)]
            budget = min(room, fits, max(3, len(ex.points)))
            new = split_points(ex.points, errors, right_errors, _AIM * slack, budget)
            if not new:
                ex.status = "stalled"
                continue
            stored += per_point * len(new)
            rows.extend((e, a) for a in new)
        return rows

    def stop(self) -> None:
        for ex in self.examples:
            if ex.status is None:
                ex.status = "stopped"

    def steps(self) -> list[int]:
        return [len(ex.points) for ex in self.examples]

    def status(self) -> list[str | None]:
        return [ex.status for ex in self.examples]

    def results(self) -> list[list[Tensor]]:
        """Per layer, per tensor: the conductance of all examples (examples as dimension 0)."""
        per_example = [ex.conductance() for ex in self.examples]
        return [
            [torch.stack([pe[li][ti] for pe in per_example]) for ti in range(len(layer))]
            for li, layer in enumerate(per_example[0])
        ]


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
