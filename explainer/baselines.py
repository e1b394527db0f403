"""Reference inputs ("baselines") for path attributions, built in the model's normalised space.

Conductance integrates gradients along a straight path from a baseline to the input, so the
baseline decides the question being asked: "what does this layer add compared with a black
image / a blurred copy / random noise?". Every baseline here is returned already normalised
with the model's mean and std, so it can be fed to the model exactly like the input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from explainer.errors import AttributionError, AttributionTypeError

__all__ = ["BASELINE_KINDS", "make_baseline"]

BASELINE_KINDS: tuple[str, ...] = ("black", "zeros", "blur", "noise", "constant")


def make_baseline(
    kind: str,
    x: Tensor,
    prep: Any,
    *,
    value: float = 0.0,
    seed: int = 0,
    blur_sigma: float = 5.0,
) -> Tensor:
    """Build a baseline shaped like ``x`` in the model's normalised input space.

    Parameters
    ----------
    kind : str
        One of :data:`BASELINE_KINDS`:

        - ``"black"``: a black image (pixel value 0) after normalisation, ``(0 - mean) / std``.
        - ``"zeros"``: the zero tensor (the per-channel mean colour in pixel space).
        - ``"constant"``: an image filled with ``value`` (pixel units in [0, 1]), normalised.
        - ``"noise"``: uniform pixel noise in [0, 1) from a generator seeded with ``seed``,
          normalised; the same seed always gives the same baseline.
        - ``"blur"``: ``x`` blurred with a gaussian of standard deviation ``blur_sigma`` pixels.
    x : Tensor
        The normalised input batch, shaped ``(N, C, H, W)``.
    prep : Preprocessing
        Anything with ``mean`` and ``std`` sequences (one entry per channel, or one entry for
        all channels), such as :class:`explainer.images.Preprocessing`.
    value : float, optional
        Fill value for ``"constant"``, in pixel units between 0 and 1.
    seed : int, optional
        Seed for ``"noise"``.
    blur_sigma : float, optional
        Gaussian standard deviation in pixels for ``"blur"``; must be positive.

    Returns
    -------
    Tensor
        A tensor with the shape, dtype and device of ``x``; it never requires grad.

    Raises
    ------
    AttributionError
        For an unknown kind, a tensor that is not ``(N, C, H, W)``, a mean/std that does not
        match the channel count, or an out-of-range ``value`` / ``blur_sigma``.
    AttributionTypeError
        When ``x`` is not a floating-point tensor.
    """
    if not isinstance(kind, str) or kind not in BASELINE_KINDS:
        raise AttributionError(
            f"Unknown baseline kind {kind!r}; choose one of: {', '.join(BASELINE_KINDS)}."
        )
    if not isinstance(x, Tensor):
        raise AttributionTypeError(
            f"The input must be a torch.Tensor shaped (N, C, H, W), got {type(x).__name__}."
        )
    if x.dim() != 4:
        raise AttributionError(
            f"The input must be shaped (N, C, H, W); got a tensor with shape {tuple(x.shape)}."
        )
    if not x.is_floating_point():
        raise AttributionTypeError(
            f"The input must hold floating-point values (it is {x.dtype}); preprocess the "
            "image before building a baseline."
        )
    x = x.detach()

    if kind == "zeros":
        return torch.zeros_like(x)
    if kind == "blur":
        return _gaussian_blur(x, blur_sigma)

    mean, std = _channel_stats(prep, x)
    if kind == "black":
        pixels = torch.zeros_like(x)
    elif kind == "constant":
        value = float(value)
        if not (0.0 <= value <= 1.0) or math.isnan(value):
            raise AttributionError(
                f"The constant baseline value must be a pixel value between 0 and 1; got {value}."
            )
        pixels = torch.full_like(x, value)
    else:  # "noise"
        generator = torch.Generator(device="cpu")
        generator.manual_seed(int(seed))
        pixels = torch.rand(x.shape, generator=generator, dtype=torch.float64)
        pixels = pixels.to(device=x.device, dtype=x.dtype)
    return (pixels - mean) / std


def _channel_stats(prep: Any, x: Tensor) -> tuple[Tensor, Tensor]:
    """Return ``mean`` and ``std`` of ``prep`` as ``(1, C, 1, 1)`` tensors matching ``x``."""
    try:
        mean_seq = prep.mean
        std_seq = prep.std
    except AttributeError as exc:
        raise AttributionTypeError(
            "The preprocessing settings must have `mean` and `std` (for example an "
            f"explainer.images.Preprocessing); got {type(prep).__name__}."
        ) from exc
    channels = x.shape[1]
    mean = _per_channel(mean_seq, channels, "mean")
    std = _per_channel(std_seq, channels, "std")
    if any(s <= 0 or math.isnan(s) for s in std):
        raise AttributionError(f"Every std must be positive to normalise a baseline; got {std}.")
    shape = (1, channels, 1, 1)
    return (
        torch.tensor(mean, dtype=x.dtype, device=x.device).reshape(shape),
        torch.tensor(std, dtype=x.dtype, device=x.device).reshape(shape),
    )


def _per_channel(values: Sequence[float] | float, channels: int, what: str) -> list[float]:
    """Expand ``values`` to one float per channel, accepting a single shared value."""
    if isinstance(values, (int, float)):
        values = (values,)
    floats = [float(v) for v in values]
    if len(floats) == 1:
        return floats * channels
    if len(floats) != channels:
        raise AttributionError(
            f"The preprocessing {what} has {len(floats)} values but the input has {channels} "
            f"channels; use preprocessing settings made for this model."
        )
    return floats


def _gaussian_kernel(sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A normalised 1-D gaussian kernel covering three standard deviations each side."""
    radius = max(1, math.ceil(3.0 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(offsets**2) / (2.0 * sigma * sigma))
    kernel = kernel / kernel.sum()
    return kernel.to(dtype=dtype, device=device)


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable gaussian blur of ``x`` (N, C, H, W) with edge-replicating borders.

    The kernel sums to one and the borders replicate edge pixels, so blurring commutes with
    the per-channel affine normalisation: blurring the normalised tensor equals normalising
    the blurred pixels.
    """
    sigma = float(sigma)
    if not sigma > 0 or math.isinf(sigma):
        raise AttributionError(f"The blur sigma must be a positive number of pixels; got {sigma}.")
    kernel = _gaussian_kernel(sigma, x.dtype, x.device)
    radius = (kernel.numel() - 1) // 2
    n, c, h, w = x.shape
    planes = x.reshape(n * c, 1, h, w)
    # Replicate padding works for any image size, unlike reflect padding.
    planes = F.pad(planes, (radius, radius, 0, 0), mode="replicate")
    planes = F.conv2d(planes, kernel.reshape(1, 1, 1, -1))
    planes = F.pad(planes, (0, 0, radius, radius), mode="replicate")
    planes = F.conv2d(planes, kernel.reshape(1, 1, -1, 1))
    return planes.reshape(n, c, h, w)
