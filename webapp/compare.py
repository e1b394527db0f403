"""What the Compare page compares: its modes, its panes, their shared colour scale and selection.

A comparison has one *mode* (what varies from pane to pane: the image, the layer, the target,
the baseline, or the model against a randomised copy) and 2 to 4 panes, each one value of what
varies; everything else comes from the shared settings. Plain values and small pure functions
here; the page draws them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from explainer.analysis import ConductanceResult

MODES: dict[str, str] = {
    "images": "Images",
    "layers": "Layers",
    "targets": "Target classes",
    "baselines": "Baselines",
    "random": "Model vs randomised copy",
}
"""What varies between the panes, with its name on the page."""

MIN_PANES, MAX_PANES = 2, 4
RANDOM_PANES: tuple[str, ...] = ("model", "random")
"""The two panes of the ``"random"`` mode: the model, and its copy with shuffled weights."""


@dataclass(frozen=True)
class CompareSpec:
    """The Compare page's choices.

    Attributes
    ----------
    mode : str
        One of :data:`MODES`.
    panes : tuple
        One value per pane: image digests, layer names, class indices, baseline kinds, or
        :data:`RANDOM_PANES`.
    view : str
        ``"channel"`` (one channel's map per pane) or ``"sum"`` (the sum over channels).
    shared : bool
        Whether panes that explain the same score share one colour scale.
    """

    mode: str = "images"
    panes: tuple[Any, ...] = ()
    view: str = "channel"
    shared: bool = True


@dataclass(frozen=True)
class Pane:
    """One computed pane: what it shows and its result (``None`` when it failed)."""

    title: str
    layer: str
    result: ConductanceResult | None


def default_panes(mode: str, count: int, candidates: Sequence[Any], first: Any = None) -> tuple:
    """``count`` pane values for ``mode``: ``first`` (the current choice) leads, then the
    candidates in their order, each once."""
    if mode == "random":
        return RANDOM_PANES
    chosen: list[Any] = []
    for value in ([first] if first is not None else []) + list(candidates):
        if value not in chosen:
            chosen.append(value)
        if len(chosen) == count:
            break
    return tuple(chosen)


def resized(panes: tuple, count: int, candidates: Sequence[Any]) -> tuple:
    """``panes`` cut or filled up (with unused candidates) to ``count`` values."""
    if len(panes) >= count:
        return tuple(panes[:count])
    extra = [c for c in candidates if c not in panes]
    return tuple(panes) + tuple(extra[: count - len(panes)])


def duplicates(panes: Sequence[Any]) -> list[tuple[int, int]]:
    """Pairs of pane numbers (from 1) that show the same value."""
    pairs = []
    for i, a in enumerate(panes):
        for j in range(i + 1, len(panes)):
            if panes[j] == a:
                pairs.append((i + 1, j + 1))
    return pairs


def units_key(result: ConductanceResult) -> tuple[int, ...]:
    """What a pane's conductance is measured in: the explained score (class, position)."""
    target = result.target
    return tuple(int(i) for i in target) if isinstance(target, tuple) else (int(target),)


def neuron_exists(result: ConductanceResult, layer: str, selection: Any) -> bool:
    """Whether the selected ``(layer, neuron)`` is a unit of this pane's layer."""
    if not selection:
        return False
    chosen_layer, neuron = selection
    if chosen_layer != layer or neuron is None:
        return False
    shape = tuple(result.attributions.shape) if result.is_spatial else (result.channel_totals.size,)
    return len(neuron) == len(shape) and all(
        0 <= int(i) < s for i, s in zip(neuron, shape, strict=True)
    )


def shown_map(result: ConductanceResult, view: str, channel: int) -> np.ndarray:
    """The values a pane draws: one channel's map, the channels' sum, or the per-unit totals
    of a layer without a spatial layout."""
    if not result.is_spatial:
        return np.asarray(result.channel_totals, dtype=np.float64)
    if view == "sum" and result.spatial is not None:
        return np.asarray(result.spatial, dtype=np.float64)
    return np.asarray(result.attributions[channel], dtype=np.float64)


def scale_groups(keys: Sequence[Any]) -> list[int]:
    """For each pane, the index of its colour-scale group (panes of equal keys share one)."""
    seen: dict[Any, int] = {}
    return [seen.setdefault(k, len(seen)) for k in keys]


def _numbers(panes: Sequence[int]) -> str:
    """Pane numbers in words: runs of three or more joined with a dash ("1–3, 5")."""
    runs: list[list[int]] = []
    for n in panes:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(
        f"{run[0]}–{run[-1]}" if len(run) >= 3 else ", ".join(map(str, run)) for run in runs
    )


def scale_title(groups: Sequence[int], drawn: Sequence[bool], index: int) -> str:
    """The colour-bar title of pane ``index`` (Plotly text): which panes share its scale, when
    others do, on a second line so that it fits a narrow pane.

    ``groups`` are the panes' colour-scale groups (:func:`scale_groups`), ``drawn`` whether
    each pane draws a map with a colour bar.
    """
    members = [j + 1 for j, g in enumerate(groups) if g == groups[index] and drawn[j]]
    if len(members) < 2:
        return "conductance"
    return f"conductance<br>shared by panes {_numbers(members)}"


PANES_KEY = "cmp_panes"
PANES_CSS = f"""
<style>
/* Panes never get narrower than a readable map with its colour bar: where the row has no room
   for all of them (four panes beside the sidebar at 1024 px), they wrap into rows of two. */
.st-key-{PANES_KEY} [data-testid="stHorizontalBlock"] {{ flex-wrap: wrap; }}
.st-key-{PANES_KEY} [data-testid="stColumn"] {{ min-width: 200px; }}
</style>
"""
"""The style sheet of the row of panes (the container keyed :data:`PANES_KEY`)."""
