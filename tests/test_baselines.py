"""Tests for explainer.baselines: every kind, by hand-checkable values."""

from __future__ import annotations

import math

import pytest
import torch

from explainer.baselines import BASELINE_KINDS, make_baseline
from explainer.errors import AttributionError, AttributionTypeError
from explainer.images import Preprocessing

MEAN = (0.5, 0.25, 0.125)
STD = (0.5, 0.25, 2.0)


@pytest.fixture
def prep() -> Preprocessing:
    return Preprocessing.custom(MEAN, STD, 8)


def _image(n: int = 2, h: int = 8, w: int = 8, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(n, 3, h, w, dtype=dtype)


@pytest.mark.parametrize("kind", BASELINE_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_kind_keeps_shape_dtype_device_and_needs_no_grad(prep, kind, dtype):
    x = _image(dtype=dtype).requires_grad_(True)
    b = make_baseline(kind, x, prep, value=0.3)
    assert b.shape == x.shape
    assert b.dtype == dtype
    assert b.device == x.device
    assert not b.requires_grad
    assert torch.isfinite(b).all()


def test_black_is_zero_pixels_normalised_per_channel(prep):
    b = make_baseline("black", _image(), prep)
    expected = [(0.0 - m) / s for m, s in zip(MEAN, STD, strict=True)]  # -1, -1, -0.0625
    for c, value in enumerate(expected):
        assert torch.equal(b[:, c], torch.full_like(b[:, c], value))


def test_zeros_is_the_zero_tensor(prep):
    b = make_baseline("zeros", _image(), prep)
    assert torch.count_nonzero(b) == 0


def test_constant_is_the_pixel_value_normalised(prep):
    b = make_baseline("constant", _image(), prep, value=0.75)
    expected = [(0.75 - m) / s for m, s in zip(MEAN, STD, strict=True)]  # 0.5, 2.0, 0.3125
    for c, value in enumerate(expected):
        assert torch.allclose(b[:, c], torch.full_like(b[:, c], value))


def test_constant_zero_equals_black(prep):
    x = _image()
    black = make_baseline("black", x, prep)
    assert torch.equal(make_baseline("constant", x, prep, value=0.0), black)


@pytest.mark.parametrize("value", [-0.1, 1.5, math.nan])
def test_constant_outside_pixel_range_is_refused(prep, value):
    with pytest.raises(AttributionError, match="between 0 and 1"):
        make_baseline("constant", _image(), prep, value=value)


def test_noise_is_seeded_and_within_the_pixel_range(prep):
    x = _image()
    first = make_baseline("noise", x, prep, seed=7)
    again = make_baseline("noise", x, prep, seed=7)
    other = make_baseline("noise", x, prep, seed=8)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    mean = torch.tensor(MEAN).reshape(1, 3, 1, 1)
    std = torch.tensor(STD).reshape(1, 3, 1, 1)
    pixels = first * std + mean
    assert pixels.min() >= -1e-6
    assert pixels.max() < 1.0 + 1e-6
    # Uniform noise: mean near one half over 384 samples, and not constant.
    assert abs(float(pixels.mean()) - 0.5) < 0.1
    assert float(pixels.std()) > 0.2


def test_noise_does_not_touch_the_global_generator(prep):
    x = _image()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_baseline("noise", x, prep, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_blur_of_a_constant_image_is_unchanged(prep):
    x = torch.full((1, 3, 6, 9), 0.7, dtype=torch.float64)
    assert torch.allclose(make_baseline("blur", x, prep, blur_sigma=2.0), x)


def test_blur_of_an_impulse_is_a_normalised_gaussian(prep):
    sigma = 1.5
    x = torch.zeros(1, 3, 31, 31, dtype=torch.float64)
    x[0, :, 15, 15] = 1.0
    b = make_baseline("blur", x, prep, blur_sigma=sigma)
    # The kernel stays away from the borders, so the total is preserved exactly.
    assert torch.allclose(b.sum(dim=(2, 3)), torch.ones(1, 3, dtype=torch.float64))
    centre = b[0, 0, 15, 15]
    ratio_one = math.exp(-1.0 / (2 * sigma**2))
    ratio_diag = math.exp(-2.0 / (2 * sigma**2))
    assert float(b[0, 0, 15, 16] / centre) == pytest.approx(ratio_one)
    assert float(b[0, 0, 14, 15] / centre) == pytest.approx(ratio_one)
    assert float(b[0, 0, 16, 16] / centre) == pytest.approx(ratio_diag)
    # Radius is ceil(3 * sigma) = 5: nothing beyond it.
    assert b[0, 0, 15, 21] == 0
    assert b[0, 0, 15, 20] > 0


def test_blur_smooths_and_keeps_channels_and_images_apart(prep):
    x = _image(n=2)
    b = make_baseline("blur", x, prep, blur_sigma=1.0)

    def variation(t: torch.Tensor) -> torch.Tensor:
        return (t[..., 1:, :] - t[..., :-1, :]).abs().sum() + (t[..., 1:] - t[..., :-1]).abs().sum()

    assert variation(b) < 0.5 * variation(x)
    # Blurring one image/channel alone gives the same planes: no mixing between them.
    alone = make_baseline("blur", x[1:2], prep, blur_sigma=1.0)
    assert torch.allclose(alone, b[1:2])


def test_blur_works_on_images_smaller_than_the_kernel(prep):
    x = _image(n=1, h=3, w=2)
    b = make_baseline("blur", x, prep, blur_sigma=5.0)
    assert b.shape == x.shape
    # Heavy blur with replicated borders moves every pixel toward the plane mean.
    spread_before = x.amax(dim=(2, 3)) - x.amin(dim=(2, 3))
    spread_after = b.amax(dim=(2, 3)) - b.amin(dim=(2, 3))
    assert (spread_after < spread_before).all()


@pytest.mark.parametrize("sigma", [0.0, -1.0, math.nan, math.inf])
def test_blur_sigma_must_be_positive(prep, sigma):
    with pytest.raises(AttributionError, match="sigma"):
        make_baseline("blur", _image(), prep, blur_sigma=sigma)


def test_unknown_kind_lists_the_choices(prep):
    with pytest.raises(AttributionError, match="black, zeros, blur, noise, constant"):
        make_baseline("grey", _image(), prep)


def test_wrong_input_shape_or_type_is_refused(prep):
    with pytest.raises(AttributionError, match=r"\(N, C, H, W\)"):
        make_baseline("black", torch.zeros(3, 8, 8), prep)
    with pytest.raises(AttributionTypeError):
        make_baseline("black", torch.zeros(1, 3, 8, 8, dtype=torch.uint8), prep)
    with pytest.raises(AttributionTypeError):
        make_baseline("black", [[0.0]], prep)


def test_channel_count_must_match_the_preprocessing():
    grey = Preprocessing.custom((0.5,), (0.5,), 8)
    rgb = Preprocessing.custom(MEAN, STD, 8)
    # One shared value serves every channel ...
    b = make_baseline("black", _image(n=1), grey)
    assert torch.equal(b, torch.full_like(b, -1.0))
    # ... but three values cannot describe a one-channel image.
    with pytest.raises(AttributionError, match="3 values but the input has 1 channels"):
        make_baseline("black", torch.zeros(1, 1, 4, 4), rgb)


def test_preprocessing_is_duck_typed():
    class Stats:
        mean = (0.0, 0.0, 0.0)
        std = (0.5, 0.5, 0.5)

    b = make_baseline("constant", _image(n=1), Stats(), value=1.0)
    assert torch.allclose(b, torch.full_like(b, 2.0))
    with pytest.raises(AttributionTypeError, match="mean"):
        make_baseline("black", _image(n=1), object())
