"""How a layer's output is laid out: channels, positions and tokens, in the user's terms.

The engine indexes a neuron by its index into the raw layer output without the batch dimension,
e.g. ``(token, feature)`` for a vision transformer's ``(N, 197, 768)`` output or
``(row, column, channel)`` for a Swin stage's ``(N, 56, 56, 96)``. People think of the same unit
as "feature 100 at patch row 3, column 4". A :class:`Layout` holds the mapping between the two:

- a *view* of the output, always channels first: ``(C,)``, ``(C, L)`` or ``(C, H, W)``, plus,
  for a vision transformer, the class token's ``(C,)`` values beside the patch grid;
- a *view neuron*, an index into that view: ``(c,)``, ``(c, l)`` or ``(c, row, column)``; for a
  layout with a class token, ``(c,)`` is feature ``c`` of the class token;
- :meth:`Layout.to_raw` and :meth:`Layout.from_raw` between view neurons and the engine's raw
  indices. What is computed is always the raw index.

:func:`detect_layout` guesses the layout from the output shape and the input image size, and
says when it is unsure (a shape that fits several layouts), so that a user can choose.

Layout kinds (:data:`KINDS`), for an output of shape ``shape`` without the batch dimension:

``flat``
    ``(D,)``: one vector per image.
``channels_first``
    ``(C, H, W)``: a convolution's feature map.
``sequence``
    ``(C, L)``: channels first along one position dimension (a 1-D convolution).
``tokens``
    ``(L, D)``: ``L`` tokens of ``D`` features with no grid (features last).
``patch_tokens``
    ``(h * w, D)``: one token per image patch, row by row.
``class_patch_tokens``
    ``(1 + h * w, D)``: a class token first, then the patch tokens (torchvision's ViT).
``channels_last``
    ``(H, W, C)``: a feature map with channels last (Swin stages, ConvNeXt blocks).
``other``
    Any other shape: shown as it is, the first dimension taken as channels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from explainer.errors import AttributionError

__all__ = [
    "KINDS",
    "KIND_NAMES",
    "Detection",
    "Layout",
    "LayoutView",
    "choose_layout",
    "detect_layout",
    "layout_for",
]

KINDS: tuple[str, ...] = (
    "flat",
    "channels_first",
    "sequence",
    "tokens",
    "patch_tokens",
    "class_patch_tokens",
    "channels_last",
    "other",
)

KIND_NAMES: dict[str, str] = {
    "flat": "Vector (features)",
    "channels_first": "Feature map, channels first (C×H×W)",
    "sequence": "Sequence, channels first (C×L)",
    "tokens": "Tokens, features last (L×D)",
    "patch_tokens": "Patch tokens on a grid (h·w×D)",
    "class_patch_tokens": "Class token + patch grid (1+h·w×D)",
    "channels_last": "Feature map, channels last (H×W×C)",
    "other": "Raw tensor",
}
"""Names of the layouts for choices and captions."""


@dataclass(frozen=True)
class LayoutView:
    """A layer output (or its attributions) in the channels-first view of a layout.

    Attributes
    ----------
    values : np.ndarray
        ``(C,)``, ``(C, L)`` or ``(C, H, W)``.
    class_token : np.ndarray or None
        ``(C,)`` values of the class token, for ``class_patch_tokens`` layouts.
    """

    values: np.ndarray
    class_token: np.ndarray | None = None

    @property
    def channel_totals(self) -> np.ndarray:
        """``(C,)`` sum of each channel over every position, the class token included."""
        v = np.asarray(self.values, dtype=np.float64)
        totals = v if v.ndim == 1 else v.reshape(v.shape[0], -1).sum(axis=1)
        if self.class_token is not None:
            totals = totals + np.asarray(self.class_token, dtype=np.float64)
        return totals

    @property
    def spatial(self) -> np.ndarray | None:
        """``(H, W)`` sum over channels for a grid view, else None."""
        if self.values.ndim != 3:
            return None
        return np.asarray(self.values, dtype=np.float64).sum(axis=0)


@dataclass(frozen=True)
class Layout:
    """The layout of one layer's output and the mapping between view neurons and raw indices.

    Attributes
    ----------
    kind : str
        One of :data:`KINDS`.
    shape : tuple of int
        The raw output shape without the batch dimension.
    grid : (int, int) or None
        ``(rows, columns)`` of the patch grid or feature map; None without one.
    """

    kind: str
    shape: tuple[int, ...]
    grid: tuple[int, int] | None = None

    # --- what the view looks like
    @property
    def has_class_token(self) -> bool:
        return self.kind == "class_patch_tokens"

    @property
    def is_grid(self) -> bool:
        """Whether the view is ``(C, H, W)``: a map over the image."""
        return len(self.view_shape) == 3

    @property
    def is_tokens(self) -> bool:
        return self.kind in ("tokens", "patch_tokens", "class_patch_tokens")

    @property
    def view_shape(self) -> tuple[int, ...]:
        """Shape of the channels-first view (the class token not included)."""
        s = self.shape
        if self.kind in ("patch_tokens", "class_patch_tokens"):
            assert self.grid is not None
            return (s[1], *self.grid)
        if self.kind == "tokens":
            return (s[1], s[0])
        if self.kind == "channels_last":
            return (s[2], s[0], s[1])
        return s

    @property
    def channel_axis(self) -> int:
        """The dimension of the raw output (without the batch dimension) that holds the
        channels: the last one for tokens and channels-last maps, else the first."""
        if self.is_tokens or self.kind == "channels_last":
            return len(self.shape) - 1
        return 0

    @property
    def num_channels(self) -> int:
        return int(self.view_shape[0]) if self.view_shape else 1

    @property
    def channel_word(self) -> str:
        """``"feature"`` for token layouts and vectors, ``"channel"`` for feature maps."""
        return "feature" if self.is_tokens or self.kind == "flat" else "channel"

    @property
    def dims(self) -> str:
        """What the raw dimensions hold, e.g. ``"C×H×W"`` or ``"tokens×features"``."""
        return {
            "flat": "features",
            "channels_first": "C×H×W",
            "sequence": "C×L",
            "tokens": "tokens×features",
            "patch_tokens": "tokens×features",
            "class_patch_tokens": "tokens×features",
            "channels_last": "H×W×C",
        }.get(self.kind, "")

    @property
    def name(self) -> str:
        return KIND_NAMES[self.kind]

    def describe(self) -> str:
        """One sentence about the layout, e.g. for a caption under the layer's name."""
        s = self.shape
        if self.kind == "class_patch_tokens":
            h, w = self.grid or (0, 0)
            return (
                f"{s[0]} tokens × {s[1]} features: a class token and a {h}×{w} grid of image "
                "patches."
            )
        if self.kind == "patch_tokens":
            h, w = self.grid or (0, 0)
            return f"{s[0]} tokens × {s[1]} features: a {h}×{w} grid of image patches."
        if self.kind == "tokens":
            return f"{s[0]} tokens × {s[1]} features, in a sequence with no image grid."
        if self.kind == "channels_last":
            return f"{s[2]} channels on a {s[0]}×{s[1]} map (channels last)."
        if self.kind == "channels_first":
            return f"{s[0]} channels on a {s[1]}×{s[2]} map."
        if self.kind == "sequence":
            return f"{s[0]} channels along {s[1]} positions."
        if self.kind == "flat":
            return f"One vector of {s[0]} features per image."
        return f"A tensor shaped {'×'.join(map(str, s))}; the first dimension is taken as channels."

    # --- neurons
    def fits(self, neuron: Sequence[int] | None) -> bool:
        """Whether ``neuron`` is a view neuron of this layout (the class token included)."""
        if neuron is None:
            return False
        try:
            index = tuple(int(i) for i in neuron)
        except (TypeError, ValueError):
            return False
        shape = self.view_shape
        if self.has_class_token and len(index) == 1:
            return 0 <= index[0] < shape[0]
        return len(index) == len(shape) and all(
            0 <= i < n for i, n in zip(index, shape, strict=True)
        )

    def is_class_token(self, neuron: Sequence[int] | None) -> bool:
        """Whether ``neuron`` names a feature of the class token."""
        return self.has_class_token and neuron is not None and len(tuple(neuron)) == 1

    def to_raw(self, neuron: Sequence[int]) -> tuple[int, ...]:
        """The engine's index into the raw output for a view neuron.

        Raises
        ------
        AttributionError
            When the neuron is not in this layout, with the valid ranges.
        """
        if not self.fits(neuron):
            raise AttributionError(
                f"Neuron {tuple(neuron)} does not exist in this layer ({self.ranges_text()})."
            )
        index = tuple(int(i) for i in neuron)
        kind = self.kind
        if kind == "class_patch_tokens" and len(index) == 1:
            return (0, index[0])
        if kind in ("patch_tokens", "class_patch_tokens"):
            assert self.grid is not None
            c, y, x = index
            token = y * self.grid[1] + x + (1 if kind == "class_patch_tokens" else 0)
            return (token, c)
        if kind == "tokens":
            c, token = index
            return (token, c)
        if kind == "channels_last":
            c, y, x = index
            return (y, x, c)
        return index

    def from_raw(self, raw: Sequence[int]) -> tuple[int, ...]:
        """The view neuron of a raw index (the inverse of :meth:`to_raw`)."""
        index = tuple(int(i) for i in raw)
        if len(index) != len(self.shape) or not all(
            0 <= i < n for i, n in zip(index, self.shape, strict=True)
        ):
            raise AttributionError(
                f"Index {index} is outside the layer's output (shape {self.shape})."
            )
        kind = self.kind
        if kind in ("patch_tokens", "class_patch_tokens"):
            assert self.grid is not None
            token, c = index
            if kind == "class_patch_tokens":
                if token == 0:
                    return (c,)
                token -= 1
            y, x = divmod(token, self.grid[1])
            return (c, y, x)
        if kind == "tokens":
            token, c = index
            return (c, token)
        if kind == "channels_last":
            y, x, c = index
            return (c, y, x)
        return index

    def neuron_text(self, neuron: Sequence[int]) -> str:
        """A neuron in words, e.g. ``"feature 100 at patch row 3, column 4"``."""
        index = tuple(int(i) for i in neuron)
        word = self.channel_word
        if self.is_class_token(index):
            return f"{word} {index[0]} of the class token"
        if len(index) == 3 and len(self.view_shape) == 3:
            where = "patch row" if self.is_tokens else "row"
            return f"{word} {index[0]} at {where} {index[1]}, column {index[2]}"
        if len(index) == 2 and len(self.view_shape) == 2:
            place = "token" if self.kind == "tokens" else "position"
            return f"{word} {index[0]} at {place} {index[1]}"
        if len(index) == 1 and len(self.view_shape) == 1:
            return f"{word} {index[0]}"
        return "neuron (" + ", ".join(map(str, index)) + ")"

    def ranges_text(self) -> str:
        """The valid view neurons in words."""
        shape = self.view_shape
        word = self.channel_word
        if len(shape) == 3:
            where = "patch rows" if self.is_tokens else "rows"
            text = f"{word}s 0–{shape[0] - 1}, {where} 0–{shape[1] - 1}, columns 0–{shape[2] - 1}"
            return text + (", or the class token" if self.has_class_token else "")
        if len(shape) == 2:
            place = "tokens" if self.kind == "tokens" else "positions"
            return f"{word}s 0–{shape[0] - 1} at {place} 0–{shape[1] - 1}"
        if len(shape) == 1:
            return f"{word}s 0–{shape[0] - 1}"
        return f"shape {'×'.join(map(str, shape))}"

    # --- values
    def view(self, values: np.ndarray) -> LayoutView:
        """Raw values shaped like the output (activations or attributions) as a channels-first
        view plus the class token."""
        arr = np.asarray(values)
        if tuple(arr.shape) != self.shape:
            raise AttributionError(
                f"Values shaped {tuple(arr.shape)} do not match the layer's output {self.shape}."
            )
        kind = self.kind
        if kind in ("patch_tokens", "class_patch_tokens"):
            assert self.grid is not None
            h, w = self.grid
            patches = arr[1:] if kind == "class_patch_tokens" else arr
            grid = np.ascontiguousarray(patches.T.reshape(arr.shape[1], h, w))
            cls = np.array(arr[0]) if kind == "class_patch_tokens" else None
            return LayoutView(grid, cls)
        if kind == "tokens":
            return LayoutView(np.ascontiguousarray(arr.T))
        if kind == "channels_last":
            return LayoutView(np.ascontiguousarray(arr.transpose(2, 0, 1)))
        return LayoutView(arr)


@dataclass(frozen=True)
class Detection:
    """What :func:`detect_layout` found for one output shape.

    Attributes
    ----------
    layout : Layout
        The most likely layout.
    options : tuple of Layout
        Every layout that fits the shape, the detected one first; a user may pick any.
    sure : bool
        False when several layouts fit about equally well (the user should confirm).
    reason : str
        Why, in one sentence.
    """

    layout: Layout
    options: tuple[Layout, ...]
    sure: bool
    reason: str

    def option(self, kind: str | None) -> Layout | None:
        """The option of ``kind``, or None when that kind does not fit this shape."""
        return next((o for o in self.options if o.kind == kind), None)


# --------------------------------------------------------------------------- detection


def _plausible_map(h: int, w: int, image_hw: tuple[int, int] | None) -> bool:
    """Whether an ``h × w`` map can be a downsampling of the image: not larger than it, with
    the same aspect ratio (within one pixel of the input)."""
    if h < 1 or w < 1:
        return False
    if image_hw is None:
        return True
    ih, iw = image_hw
    if h > ih or w > iw:
        return False
    return abs(h * iw - w * ih) <= max(ih, iw)


def _token_grid(count: int, image_hw: tuple[int, int] | None) -> tuple[int, int] | None:
    """A ``(rows, columns)`` patch grid with ``count`` cells consistent with the image."""
    if count < 4:
        return None
    if image_hw is None:
        side = math.isqrt(count)
        return (side, side) if side * side == count else None
    ih, iw = image_hw
    best = None
    for rows in range(2, count // 2 + 1):
        if count % rows:
            continue
        cols = count // rows
        if cols < 2 or rows > ih or cols > iw:
            continue
        # The patch size must be (close to) the same along both sides and divide the image.
        ph, pw = ih / rows, iw / cols
        if abs(ph - pw) > 1.0 or abs(ph - round(ph)) * rows > 1.0 + 1e-9:
            continue
        score = abs(ph - pw)
        if best is None or score < best[0]:
            best = (score, (rows, cols))
    return None if best is None else best[1]


def detect_layout(shape: Sequence[int], image_hw: tuple[int, int] | None = None) -> Detection:
    """Guess the layout of a layer output from its shape and the input image size.

    Parameters
    ----------
    shape : sequence of int
        The layer output's shape without the batch dimension.
    image_hw : (int, int), optional
        Height and width of the model's input image; without it a grid must be square.

    Returns
    -------
    Detection
    """
    s = tuple(int(d) for d in shape)
    hw = None if image_hw is None else (int(image_hw[0]), int(image_hw[1]))
    if len(s) == 1:
        only = Layout("flat", s)
        return Detection(only, (only,), True, "one vector per image")
    if len(s) == 3:
        first = Layout("channels_first", s, (s[1], s[2]))
        last = Layout("channels_last", s, (s[0], s[1]))
        fits_first = _plausible_map(s[1], s[2], hw)
        fits_last = _plausible_map(s[0], s[1], hw)
        if fits_first and not fits_last:
            return Detection(first, (first,), True, "the last two dimensions are a map")
        if fits_last and not fits_first:
            return Detection(
                last, (last, first), True, "the first two dimensions are a map of the image"
            )
        reason = (
            "both the first and the last two dimensions could be a map of the image"
            if fits_first
            else "neither the first nor the last two dimensions look like a map of the image"
        )
        return Detection(first, (first, last), False, reason)
    if len(s) == 2:
        tokens, features = s
        sequence = Layout("sequence", s)
        plain = Layout("tokens", s)
        with_class = _token_grid(tokens - 1, hw)
        without = _token_grid(tokens, hw)
        if with_class is not None:
            vit = Layout("class_patch_tokens", s, with_class)
            return Detection(
                vit,
                (vit, plain, sequence),
                True,
                f"{tokens - 1} = {with_class[0]}×{with_class[1]} patches plus a class token",
            )
        if without is not None:
            grid = Layout("patch_tokens", s, without)
            return Detection(
                grid,
                (grid, plain, sequence),
                True,
                f"{tokens} = {without[0]}×{without[1]} patches",
            )
        return Detection(
            sequence,
            (sequence, plain),
            False,
            "no dimension is a grid of image patches: channels first or tokens are both possible",
        )
    other = Layout("other", s)
    return Detection(other, (other,), True, "no known layout")


def choose_layout(detection: Detection, choice: str | None) -> Layout:
    """The user's choice among the detection's options, or the detected layout."""
    return detection.option(choice) or detection.layout


def layout_for(
    shape: Sequence[int], image_hw: tuple[int, int] | None = None, choice: str | None = None
) -> Layout:
    """Shortcut: :func:`detect_layout` then :func:`choose_layout`."""
    return choose_layout(detect_layout(shape, image_hw), choice)
