"""The built-in demo: a small CNN that tells simple shapes apart, and the generator of its data.

The demo model is trained by ``scripts/train_demo.py`` on images this module draws from scratch
(nothing is downloaded): one shape per 64x64 RGB image, in a random colour, position, size and
rotation, over a noisy background with a colour gradient and a few thin distractor lines. The class
is the shape, never the colour, so the network has to learn edges, corners and curvature, which is
what makes its neurons worth looking at.

The weights, the model card and the labels live in ``assets/demo/``; a few sample images rendered by
the same generator live in ``assets/samples/``. Reading them into a model ready to explain is
:func:`explainer.intake.load_demo_model`'s work.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from explainer.errors import ModelLoadError

__all__ = [
    "ASSETS_DIR",
    "DEMO_INPUT_SIZE",
    "DEMO_LABELS",
    "DEMO_MEAN",
    "DEMO_STD",
    "ConvBlock",
    "DemoNet",
    "build_demo_model",
    "demo_weights_path",
    "make_dataset",
    "render_sample",
    "sample_image_paths",
    "sample_label",
]

ASSETS_DIR: Path = Path(__file__).resolve().parent.parent / "assets"
"""The repository's ``assets/`` folder (read-only at run time)."""

DEMO_INPUT_SIZE: tuple[int, int, int] = (3, 64, 64)
"""Input of the demo model as ``(channels, height, width)``."""

DEMO_LABELS: list[str] = [
    "circle",
    "square",
    "triangle",
    "cross",
    "star",
    "ring",
    "crescent",
    "stripes",
]
"""Class names, in output order."""

# Per-channel statistics of the generated images (pixel values in [0, 1]), measured once on
# ``make_dataset(20000, seed=0)`` and rounded; training and inference both use these values.
DEMO_MEAN: tuple[float, float, float] = (0.508, 0.502, 0.497)
DEMO_STD: tuple[float, float, float] = (0.304, 0.299, 0.303)

WEIGHTS_FILENAME = "demo_cnn.safetensors"
LABELS_FILENAME = "labels.txt"
CARD_FILENAME = "card.json"
ARCH_NAME = "demo_cnn"


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class ConvBlock(nn.Module):
    """One stage: 3x3 convolution, batch norm, ReLU, then (optionally) 2x2 max pooling.

    The ReLU is not in-place, so hooks on ``bn`` and ``relu`` see separate tensors.

    Parameters
    ----------
    in_channels, out_channels : int
        Channels in and out of the convolution.
    downsample : bool
        Whether to halve the height and width at the end of the stage.
    """

    def __init__(self, in_channels: int, out_channels: int, *, downsample: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.down: nn.Module = nn.MaxPool2d(2) if downsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.relu(self.bn(self.conv(x))))


class DemoNet(nn.Module):
    """A four-stage CNN for 3x64x64 images, with stages named for a layer picker.

    ``conv1`` (16 channels, 64x64 -> 32x32), ``block1`` (32, -> 16x16), ``block2`` (64, -> 8x8),
    ``block3`` (64, stays 8x8), ``pool`` (global max), ``classifier`` (linear).

    The global max pool keeps, per channel, the strongest response anywhere in the image: a
    shape detector that fires on a small shape is not diluted by the background around it
    (with an average pool the same network learns several times more slowly).

    Parameters
    ----------
    num_classes : int
        Number of outputs.
    """

    def __init__(self, num_classes: int = len(DEMO_LABELS)) -> None:
        super().__init__()
        if num_classes < 1:
            raise ModelLoadError(f"The demo model needs at least one class, got {num_classes}.")
        self.conv1 = ConvBlock(3, 16)
        self.block1 = ConvBlock(16, 32)
        self.block2 = ConvBlock(32, 64)
        self.block3 = ConvBlock(64, 64, downsample=False)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.block1(x)
        x = self.block2(x)
        x = self.block3(x)
        x = self.pool(x)
        return self.classifier(torch.flatten(x, 1))


def build_demo_model(num_classes: int = len(DEMO_LABELS)) -> nn.Module:
    """Build an untrained :class:`DemoNet` (random weights, train mode).

    Parameters
    ----------
    num_classes : int
        Number of outputs; defaults to the number of demo labels.

    Returns
    -------
    torch.nn.Module
        The new model.
    """
    return DemoNet(num_classes)


# --------------------------------------------------------------------------------------------
# Assets
# --------------------------------------------------------------------------------------------


def demo_weights_path(directory: Path | None = None) -> Path:
    """Path of the demo weights file (``assets/demo/demo_cnn.safetensors`` unless told otherwise).

    Parameters
    ----------
    directory : Path, optional
        A folder written by ``scripts/train_demo.py``; defaults to ``assets/demo``.
    """
    base = ASSETS_DIR / "demo" if directory is None else Path(directory)
    return base / WEIGHTS_FILENAME


def sample_image_paths(directory: Path | None = None) -> list[Path]:
    """The shipped sample images (PNG files), sorted by name.

    Parameters
    ----------
    directory : Path, optional
        A folder of samples; defaults to ``assets/samples``.

    Returns
    -------
    list[Path]
        The PNG files in the folder; empty if the folder does not exist.
    """
    base = ASSETS_DIR / "samples" if directory is None else Path(directory)
    if not base.is_dir():
        return []
    return sorted(p for p in base.iterdir() if p.suffix.lower() == ".png" and p.is_file())


_SAMPLE_NAME = re.compile(r"^\d+_(?P<label>[a-z]+)$")


def sample_label(path: Path | str) -> str | None:
    """The class a sample image shows, read from its name (``03_triangle.png`` -> ``"triangle"``).

    Returns ``None`` for names that do not follow the pattern or name an unknown class.
    """
    match = _SAMPLE_NAME.match(Path(path).stem)
    if match is None or match.group("label") not in DEMO_LABELS:
        return None
    return match.group("label")


# --------------------------------------------------------------------------------------------
# The data generator
# --------------------------------------------------------------------------------------------

_SIZE = DEMO_INPUT_SIZE[1]
_SUPERSAMPLE = 3  # render on a finer grid and average, so edges are anti-aliased

# Pixel-centre coordinates of the fine grid, in units of output pixels.
_FINE = (np.arange(_SIZE * _SUPERSAMPLE, dtype=np.float32) + 0.5) / _SUPERSAMPLE
_FINE.setflags(write=False)
_PX = np.arange(_SIZE, dtype=np.float32) + 0.5
_PXX, _PXY = np.meshgrid(_PX, _PX)
_PXX.setflags(write=False)
_PXY.setflags(write=False)

# Shape colours (RGB in [0, 1]); each draw is jittered around one of them.
_PALETTE = np.array(
    [
        [0.90, 0.15, 0.15],  # red
        [0.95, 0.55, 0.10],  # orange
        [0.95, 0.90, 0.20],  # yellow
        [0.20, 0.75, 0.25],  # green
        [0.15, 0.80, 0.85],  # cyan
        [0.20, 0.30, 0.90],  # blue
        [0.65, 0.25, 0.85],  # purple
        [0.97, 0.97, 0.97],  # white
        [0.08, 0.08, 0.08],  # black
    ],
    dtype=np.float32,
)
_PALETTE.setflags(write=False)


def _regular_polygon(n: int, radius: float, phase: float = -np.pi / 2) -> np.ndarray:
    angles = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _star_polygon(points: int, outer: float, inner: float) -> np.ndarray:
    angles = -np.pi / 2 + np.pi * np.arange(2 * points) / points
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


_TRIANGLE = _regular_polygon(3, 1.05)
_STAR = _star_polygon(5, 1.05, 0.45)


def _inside_polygon(u: np.ndarray, v: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd rule: is each point (u, v) inside the closed polygon?"""
    inside = np.zeros(u.shape, dtype=bool)
    n = len(vertices)
    for i in range(n):
        x0, y0 = vertices[i]
        x1, y1 = vertices[(i + 1) % n]
        if y0 == y1:
            continue
        crosses = (v < y0) != (v < y1)
        x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (u < x_at)
    return inside


def _shape_mask(label: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test per shape, in local coordinates where the shape spans about [-1, 1]."""
    name = DEMO_LABELS[label]
    rho2 = u * u + v * v
    if name == "circle":
        return rho2 <= 0.85**2
    if name == "square":
        return (np.abs(u) <= 0.75) & (np.abs(v) <= 0.75)
    if name == "triangle":
        return _inside_polygon(u, v, _TRIANGLE)
    if name == "cross":
        arm, half = 0.28, 0.95
        return ((np.abs(u) <= arm) & (np.abs(v) <= half)) | (
            (np.abs(v) <= arm) & (np.abs(u) <= half)
        )
    if name == "star":
        return _inside_polygon(u, v, _STAR)
    if name == "ring":
        return (rho2 <= 0.95**2) & (rho2 >= 0.55**2)
    if name == "crescent":
        return (rho2 <= 0.9**2) & ((u - 0.42) ** 2 + v * v > 0.75**2)
    if name == "stripes":
        # Three parallel bars, 0.4 wide, with 0.25 gaps.
        bars = (np.abs(v) <= 0.2) | (np.abs(v) >= 0.45)
        return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85) & bars
    raise ValueError(f"No drawing rule for class {name!r}.")


def _background(rng: np.random.Generator) -> np.ndarray:
    """A colour with a gradient, a soft blob and thin distractor lines; (H, W, 3) in [0, 1]."""
    base = rng.uniform(0.0, 1.0, size=3).astype(np.float32)
    angle = float(rng.uniform(0.0, 2 * np.pi))
    ramp = (np.cos(angle) * (_PXX - _SIZE / 2) + np.sin(angle) * (_PXY - _SIZE / 2)) / _SIZE
    tint = rng.uniform(-0.35, 0.35, size=3).astype(np.float32)
    img = base + ramp[..., None] * tint
    # A large, soft blob of another colour.
    bx, by = (float(c) for c in rng.uniform(0, _SIZE, size=2))
    sigma = float(rng.uniform(8.0, 20.0))
    blob = np.exp(((_PXX - bx) ** 2 + (_PXY - by) ** 2) * (-0.5 / sigma**2))
    img += blob[..., None] * rng.uniform(-0.3, 0.3, size=3).astype(np.float32)
    # Thin straight lines: clutter that is not a shape.
    for _ in range(int(rng.integers(0, 4))):
        x0, y0 = (float(c) for c in rng.uniform(0, _SIZE, size=2))
        theta = float(rng.uniform(0.0, np.pi))
        half_length = float(rng.uniform(5.0, 20.0))
        colour = rng.uniform(0.0, 1.0, size=3).astype(np.float32)
        ddx, ddy = _PXX - x0, _PXY - y0
        dist = np.abs(np.sin(theta) * ddx - np.cos(theta) * ddy)
        along = np.abs(np.cos(theta) * ddx + np.sin(theta) * ddy)
        line = np.clip(1.0 - dist, 0.0, 1.0) * (along <= half_length)
        img += line[..., None] * (colour - img)
    return img


def _label_index(label: int | str) -> int:
    if isinstance(label, str):
        if label not in DEMO_LABELS:
            raise ValueError(f"Unknown demo class {label!r}; choose one of {DEMO_LABELS}.")
        return DEMO_LABELS.index(label)
    index = int(label)
    if not 0 <= index < len(DEMO_LABELS):
        raise ValueError(f"Demo class index {index} is out of range 0..{len(DEMO_LABELS) - 1}.")
    return index


def render_sample(label: int | str, rng: np.random.Generator) -> np.ndarray:
    """Draw one image of the given class.

    Position, size (about 20 to 46 pixels across), rotation, a slight stretch, the colour of the
    shape and the background are all drawn from ``rng``; the shape colour is kept clearly apart
    from the background behind it.

    Parameters
    ----------
    label : int or str
        Class index into :data:`DEMO_LABELS`, or the class name.
    rng : numpy.random.Generator
        Source of all randomness (the image is a pure function of the generator's state).

    Returns
    -------
    numpy.ndarray
        ``(64, 64, 3)`` uint8 RGB (height, width, channels), ready for ``PIL.Image.fromarray``.
    """
    index = _label_index(label)
    radius = float(rng.uniform(10.0, 23.0))
    stretch = float(rng.uniform(0.85, 1.15))
    extent = 1.06 * radius * max(1.0, stretch)  # every shape fits in [-1.06, 1.06] locally
    cx, cy = (float(c) for c in rng.uniform(extent + 1.0, _SIZE - extent - 1.0, size=2))
    theta = float(rng.uniform(0.0, 2 * np.pi))
    cos_t, sin_t = np.cos(theta), np.sin(theta)

    # Only the fine pixels of the shape's bounding box are computed.
    x0, x1 = max(int(cx - extent) - 1, 0), min(int(cx + extent) + 2, _SIZE)
    y0, y1 = max(int(cy - extent) - 1, 0), min(int(cy + extent) + 2, _SIZE)
    k = _SUPERSAMPLE
    dx = _FINE[x0 * k : x1 * k][None, :] - cx
    dy = _FINE[y0 * k : y1 * k][:, None] - cy
    u = (cos_t * dx + sin_t * dy) / radius
    v = (-sin_t * dx + cos_t * dy) / (radius * stretch)
    fine = _shape_mask(index, u, v).astype(np.float32)
    mask = np.zeros((_SIZE, _SIZE), dtype=np.float32)
    mask[y0:y1, x0:x1] = fine.reshape(y1 - y0, k, x1 - x0, k).sum(axis=3).sum(axis=1) / (k * k)

    colour = _PALETTE[int(rng.integers(len(_PALETTE)))] + rng.normal(0.0, 0.05, size=3)
    colour = np.clip(colour, 0.0, 1.0).astype(np.float32)
    # Redraw the background until the shape stands out against what lies under it.
    for _ in range(50):
        bg = _background(rng)
        under = (bg * mask[..., None]).sum(axis=(0, 1)) / max(float(mask.sum()), 1.0)
        if float(np.linalg.norm(colour - under)) >= 0.45:
            break
    # A faint light-to-dark ramp across the shape, along its own axis.
    along = (cos_t * (_PXX - cx) + sin_t * (_PXY - cy)) / radius
    shade = 1.0 + float(rng.uniform(-0.12, 0.12)) * along
    img = bg + mask[..., None] * (colour * shade[..., None] - bg)
    img += float(rng.uniform(0.01, 0.06)) * rng.standard_normal(size=img.shape, dtype=np.float32)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def make_dataset(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate ``n`` labelled images, balanced over the classes, from one seed.

    Parameters
    ----------
    n : int
        Number of images.
    seed : int
        Seed of the ``numpy.random.Generator`` that draws everything; the same seed gives the
        same images and labels, bit for bit.

    Returns
    -------
    images : torch.Tensor
        ``(n, 3, 64, 64)`` uint8.
    labels : torch.Tensor
        ``(n,)`` int64 class indices into :data:`DEMO_LABELS`.
    """
    if n < 0:
        raise ValueError(f"The number of images must be non-negative, got {n}.")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(DEMO_LABELS))
    images = np.empty((n, _SIZE, _SIZE, 3), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i] = render_sample(int(label), rng)
    return (
        torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        torch.from_numpy(labels.astype(np.int64)),
    )
